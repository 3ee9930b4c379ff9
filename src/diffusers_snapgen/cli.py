"""The ``snapgen`` command line: ``snapgen generate PROMPT`` and ``snapgen info MODEL``.

Subcommands live in a small registry so other modules can add theirs (``convert-coreml``, ``eval``): define
``configure(parser)`` and ``run(args) -> int`` and call :func:`register_subcommand` at import time of a module listed
in :data:`SUBCOMMAND_MODULES`. Bad input (``ValueError``/``TypeError``/``OSError``, argparse errors) becomes one
line on stderr and exit code 2, never a traceback (set ``SNAPGEN_TRACEBACK=1`` to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXIT_USAGE = 2
#: Modules that register more subcommands when imported; a missing module is skipped.
SUBCOMMAND_MODULES: tuple[str, ...] = ("diffusers_snapgen.coreml.cli", "diffusers_snapgen.evaluation.cli")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, help: str, configure: Callable, run: Callable) -> None:
    """Add ``snapgen NAME``; ``configure`` adds its arguments, ``run(args)`` returns the exit code."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name or ""):
        raise ValueError(f"`name` must be a lowercase command name like 'convert-coreml', got {name!r}.")
    if name in _SUBCOMMANDS and _SUBCOMMANDS[name].run is not run:
        raise ValueError(f"`name`: the subcommand {name!r} is already registered.")
    _SUBCOMMANDS[name] = Subcommand(name, help, configure, run)


class UsageError(Exception):
    """A command-line usage error; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block and exit
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _load_subcommand_modules() -> None:
    """Import :data:`SUBCOMMAND_MODULES` (they register at import; heavy imports belong inside ``run``)."""
    for module in SUBCOMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # not written yet / not installed
            print(f"snapgen: warning: commands of {module} are unavailable ({_one_line(e)})", file=sys.stderr)
        except ImportError as e:
            print(f"snapgen: warning: commands of {module} are unavailable ({_one_line(e)})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``snapgen`` parser with one subparser per registered subcommand."""
    _load_subcommand_modules()
    parser = _Parser(prog="snapgen", description="SnapGen text-to-image (Hu et al., CVPR 2025) for diffusers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffusers-snapgen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for sub in _SUBCOMMANDS.values():
        sub.configure(subparsers.add_parser(sub.name, help=sub.help, description=sub.help))
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snapgen`` console script; returns the exit code."""
    command = "snapgen"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        command = f"snapgen {args.command}"
        return int(_SUBCOMMANDS[args.command].run(args) or 0)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("SNAPGEN_TRACEBACK"):
            raise
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- shared helpers


def resolve_model(model: str | None) -> str:
    """``--model`` or the embedded default's folder (:func:`diffusers_snapgen.default_model_path`); ValueError when
    neither exists."""
    from .default_model import default_model_path

    if model:
        return model
    folder = default_model_path()
    if folder is None:
        raise ValueError(
            "--model is required: this build ships no default SnapGen model. Pass --model with a folder "
            "written by `SnapGenPipeline.save_pretrained` or a Hub repo id."
        )
    return str(folder)


def whole_number(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= minimum``; bad text becomes a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


_positive_int = whole_number(1)


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32, got {value} (e.g. {max(32, value // 32 * 32)})")
    return value


@contextlib.contextmanager
def _quiet_loading():
    """Hide the per-component loading bars of diffusers/transformers (the denoising bar stays)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def _resolve_device(device: str | None):
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device: {device!r} is not a torch device ({_one_line(e)}); use e.g. cpu or cuda.") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    return resolved


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------- snapgen generate


def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text describing the image")
    parser.add_argument("--model", "-m", help="pipeline folder or Hub repo id (default: the embedded model)")
    parser.add_argument("--negative-prompt", default=None, help="what to avoid (used with guidance > 1)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=_guidance, default=None, help="CFG scale, <= 1 is off")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--height", type=_size, default=None, help="image height, multiple of 32")
    parser.add_argument("--width", type=_size, default=None, help="image width, multiple of 32")
    parser.add_argument("--num-images", type=_positive_int, default=1, help="images to make (default 1)")
    parser.add_argument("--output", "-o", default=None, help="image file (.png, .jpg, ...) or folder (default: .)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: fp16 on GPU)")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def output_paths(output: str | None, count: int, prompt: str, seed: int) -> list[Path]:
    """Where ``snapgen generate`` writes ``count`` images: a file name (numbered when count > 1) or names
    ``<prompt-slug>-<seed>[-i].png`` inside a folder (created)."""
    from PIL import Image

    target = Path(output) if output else Path(".")
    is_file = target.suffix != "" and not target.is_dir()
    if is_file:
        if target.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"--output: {target.suffix!r} is not an image extension; use .png or .jpg, or a folder.")
        folder, stem, suffix = target.parent, target.stem, target.suffix
    else:
        folder, stem, suffix = target, f"{_slug(prompt)}-{seed}", ".png"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output: {str(folder)!r} exists and is not a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    if count == 1:
        return [folder / f"{stem}{suffix}"]
    return [folder / f"{stem}-{i}{suffix}" for i in range(count)]


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .default_model import load_default_pipeline
    from .pipelines import SnapGenPipeline

    model = resolve_model(args.model)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    paths = output_paths(args.output, args.num_images, args.prompt, seed)  # fail before loading the model

    with _quiet_loading():
        if args.model:
            folder = SnapGenPipeline._checked_folder(model, argument="--model")
            pipe = SnapGenPipeline.from_pretrained(folder, dtype=dtype)
        else:  # the embedded model: its MiniLM text encoder comes from its PyPI package
            pipe = load_default_pipeline(dtype=dtype)
        pipe = pipe.to(device)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    for image, path in zip(images, paths):
        image.save(path)
        print(path)
    return 0


# --------------------------------------------------------------------------- snapgen info


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="pipeline folder or Hub repo id")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def model_summary(model: str) -> dict:
    """Components (class, parameter count), scheduler settings and default sizes of a saved SnapGen pipeline.
    Reads configs and safetensors headers only."""
    from .pipelines import SnapGenPipeline
    from .pipelines.loading import describe_folder
    from .pipelines.pipeline_snapgen import (
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_NUM_INFERENCE_STEPS,
        SAMPLING_DEFAULTS_KEY,
    )

    folder = SnapGenPipeline._resolve_folder(model, argument="MODEL")
    summary = describe_folder(folder, argument="MODEL")
    components = summary["components"]
    scheduler = components.get("scheduler", {}).get("config", {})
    stored = scheduler.get(SAMPLING_DEFAULTS_KEY) or {}
    summary["scheduler"] = {
        "class": components.get("scheduler", {}).get("class"),
        "shift": scheduler.get("shift"),
        "use_dynamic_shifting": scheduler.get("use_dynamic_shifting"),
        "num_train_timesteps": scheduler.get("num_train_timesteps"),
        "num_inference_steps": stored.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS),
        "guidance_scale": stored.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
        "defaults_from": SAMPLING_DEFAULTS_KEY if stored else "built-in",
    }
    unet, vae = components["unet"]["config"], components.get("vae", {}).get("config", {})
    if "sample_size" in unet and "block_out_channels" in vae:
        side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
        summary["default_image_size"] = [side, side]
    summary["model"] = model
    summary["total_parameters"] = sum(c["parameters"] or 0 for c in components.values())
    return summary


def _run_info(args: argparse.Namespace) -> int:
    summary = model_summary(resolve_model(args.model))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"SnapGen pipeline: {summary['model']}")
    if summary["folder"] != summary["model"]:
        print(f"  folder: {summary['folder']}")
    print("components:")
    for name, comp in summary["components"].items():
        params = f"{comp['parameters']:,} parameters" if comp["parameters"] is not None else "-"
        print(f"  {name:<15} {comp['class']:<34} {params}")
    print(f"  {'total':<15} {'':<34} {summary['total_parameters']:,} parameters")
    sched = summary["scheduler"]
    print("scheduler:")
    for key in ("class", "shift", "use_dynamic_shifting", "num_train_timesteps"):
        print(f"  {key}: {sched[key]}")
    print(f"  default steps: {sched['num_inference_steps']}, guidance scale: {sched['guidance_scale']} "
          f"(from {sched['defaults_from']})")
    if "default_image_size" in summary:
        print(f"default image size: {summary['default_image_size'][0]}x{summary['default_image_size'][1]}")
    return 0


register_subcommand("generate", "generate images from a text prompt", _configure_generate, _run_generate)
register_subcommand("info", "show a model's components, parameter counts and scheduler", _configure_info, _run_info)


if __name__ == "__main__":  # `python -m diffusers_snapgen.cli`: run the imported module, where subcommands register
    from diffusers_snapgen.cli import main as _main

    sys.exit(_main())
