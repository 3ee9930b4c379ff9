"""The ``snapgen`` command line: ``snapgen generate PROMPT [--lora PATH]`` and ``snapgen info MODEL``.

Subcommands live in a small registry so other modules can add theirs (``convert-coreml``, ``eval``): define
``configure(parser)`` and ``run(args) -> int`` and call :func:`register_subcommand` at import time of a module listed
in :data:`SUBCOMMAND_MODULES`. Such a module is imported only when its subcommand is asked for, and nothing here
imports torch before a subcommand runs, so ``snapgen --help`` and argument errors are instant. Bad input
(``ValueError``/``TypeError``/``OSError``, argparse errors) becomes one line on stderr and exit code 2, never a
traceback (set ``SNAPGEN_TRACEBACK=1`` to see one).
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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXIT_USAGE = 2
#: Subcommands defined in other modules: name -> (module that registers it when imported, one-line help for
#: ``snapgen --help``). The module is imported only when that subcommand is asked for.
SUBCOMMAND_MODULES: dict[str, tuple[str, str]] = {
    "convert-coreml": (
        "diffusers_snapgen.coreml.cli",
        "export a SnapGen pipeline to Core ML packages (iPhone/iPad/Mac) in the Hub layout",
    ),
    "eval": (
        "diffusers_snapgen.evaluation.cli",
        "measure models on the emoji set: prompt accuracy, FID, prompt/seed ratio, decoder PSNR/SSIM",
    ),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: ``--seed`` range: what ``torch.Generator.manual_seed`` accepts without wrapping.
MAX_SEED = 2**64 - 1
#: The file of a LoRA folder (diffusers' name; ``train_snapgen_lora.py`` writes it).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: ``snapgen generate`` on the CPU refuses images larger than this many pixels unless ``--allow-large`` is given
#: (8192x8192 would run for many minutes without a word).
MAX_CPU_PIXELS = 1024 * 1024


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


def _load_subcommand_module(name: str) -> None:
    """Import the module of the lazily declared subcommand ``name`` (it registers itself at import)."""
    module = SUBCOMMAND_MODULES[name][0]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"snapgen {name}: error: this command is unavailable ({_one_line(e)})") from e
    if name not in _SUBCOMMANDS:
        raise UsageError(f"snapgen {name}: error: {module} did not register the command")


def _requested_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option: top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``snapgen`` parser with one subparser per subcommand. Subcommands of :data:`SUBCOMMAND_MODULES` get their
    full arguments only when ``command`` names them (their module is imported then); otherwise just their help."""
    if command in SUBCOMMAND_MODULES and command not in _SUBCOMMANDS:
        _load_subcommand_module(command)
    parser = _Parser(prog="snapgen", description="SnapGen text-to-image (Hu et al., CVPR 2025) for diffusers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffusers-snapgen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.subcommand_parsers = {}
    for sub in _SUBCOMMANDS.values():
        parser.subcommand_parsers[sub.name] = sub_parser = subparsers.add_parser(
            sub.name, help=sub.help, description=sub.help
        )
        sub.configure(sub_parser)
    for name, (_, help) in SUBCOMMAND_MODULES.items():
        if name not in _SUBCOMMANDS:
            subparsers.add_parser(name, help=help, description=help)
    return parser


def _flag_wording(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Say ``--overwrite`` where an error raised by the Python API says ``overwrite=True`` (on/off options of the
    running subcommand only)."""
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._StoreTrueAction) and action.option_strings:
            message = message.replace(f"{action.dest}=True", action.option_strings[-1])
    return message


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snapgen`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, sub_parser = "snapgen", None
    try:
        parser = build_parser(_requested_command(argv))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        command, sub_parser = f"snapgen {args.command}", parser.subcommand_parsers.get(args.command)
        return int(_SUBCOMMANDS[args.command].run(args) or 0)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`snapgen info | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("SNAPGEN_TRACEBACK"):
            raise
        print(f"{command}: error: {_flag_wording(_one_line(e), sub_parser)}", file=sys.stderr)
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


def whole_number(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= minimum`` (and ``<= maximum``); bad text becomes a one-line usage
    error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


_positive_int = whole_number(1)
_seed = whole_number(0, MAX_SEED)


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
    """Hide the per-component loading bars and notices of diffusers/transformers (the denoising bar stays)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
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
    if name == "float16" and device.type == "cpu":
        print("snapgen generate: warning: --dtype float16 on the CPU is slower than float32 and some models lose "
              "precision; float32 is the CPU default.", file=sys.stderr)
    return getattr(torch, name)


# --------------------------------------------------------------------------- snapgen generate


def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text describing the image")
    parser.add_argument("--model", "-m", help="pipeline folder or Hub repo id (default: the embedded model)")
    parser.add_argument("--negative-prompt", default=None, help="what to avoid (used with guidance > 1)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=_guidance, default=None, help="CFG scale, <= 1 is off")
    parser.add_argument("--seed", type=_seed, default=None,
                        help=f"random seed, 0 to {MAX_SEED} (default: a fresh one, printed)")
    parser.add_argument("--height", type=_size, default=None, help="image height, multiple of 32")
    parser.add_argument("--width", type=_size, default=None, help="image width, multiple of 32")
    parser.add_argument("--num-images", type=_positive_int, default=1, help="images to make (default 1)")
    parser.add_argument("--output", "-o", default=None, help="image file (.png, .jpg, ...) or folder (default: .)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: fp16 on GPU)")
    parser.add_argument("--allow-large", action="store_true",
                        help=f"on the CPU, allow images over {MAX_CPU_PIXELS:,} pixels (slow: minutes)")
    parser.add_argument("--lora", default=None,
                        help=f"LoRA weights to apply: a folder with {LORA_WEIGHT_NAME} (train_snapgen_lora.py's "
                             "output or one of its checkpoints), a .safetensors file, or a Hub repo id")
    parser.add_argument("--lora-scale", "--lora_scale", dest="lora_scale", type=_lora_scale, default=None,
                        help="strength of --lora (default 1.0; 0 is the base model)")


def _lora_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def resolve_lora(lora: str) -> tuple[str, str | None]:
    """``(source, weight_name)`` for ``load_lora_weights`` from ``--lora``: a folder holding
    ``pytorch_lora_weights.safetensors``, a ``.safetensors`` file, or a Hub repo id; ValueError naming ``--lora``
    otherwise (checked before the model loads)."""
    path = Path(lora)
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (it has {', '.join(found)}: pass the file itself)" if found else ""
            raise ValueError(f"--lora: the folder {lora!r} has no {LORA_WEIGHT_NAME}{hint}; pass the --output_dir of "
                             "train_snapgen_lora.py, one of its checkpoint-* folders, or a .safetensors file.")
        return str(path), None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora: {lora!r} is not a .safetensors file.")
        return str(path.parent), path.name
    if re.fullmatch(r"[\w.-]+/[\w.-]+", lora) and not lora.startswith((".", "/")):
        return lora, None
    raise ValueError(f"--lora: {lora!r} is neither a folder, a .safetensors file nor a Hub repo id.")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def output_paths(output: str | None, count: int, prompt: str, seed: int) -> list[Path]:
    """Where ``snapgen generate`` writes ``count`` images: a file name (numbered when count > 1) or names
    ``<prompt-slug>-<seed>[-i].png`` inside a folder (created). Checks that the folder is writable, so a bad
    ``--output`` fails before the model loads."""
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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".snapgen-write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"--output: cannot write to the folder {str(folder)!r} ({e.strerror or type(e).__name__}); "
            "choose a folder you can write to."
        ) from e
    if count == 1:
        return [folder / f"{stem}{suffix}"]
    return [folder / f"{stem}-{i}{suffix}" for i in range(count)]


def save_image(image, path: Path) -> None:
    """Write ``image`` to a temporary file next to ``path`` and rename it into place."""
    from PIL import Image

    image_format = Image.registered_extensions()[path.suffix.lower()]
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        image.save(tmp, format=image_format)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_pipeline(model: str | None, dtype):
    """The pipeline behind ``--model`` (the embedded default when None), with its text encoder; ValueError naming
    ``--model`` when it has none, since ``snapgen generate`` needs one to encode the prompt."""
    from .default_model import load_default_pipeline
    from .pipelines import SnapGenPipeline

    if model is None:
        return load_default_pipeline(dtype=dtype)
    folder = SnapGenPipeline._checked_folder(model, argument="--model")
    pipe = SnapGenPipeline.from_pretrained(folder, dtype=dtype)
    if pipe.text_encoder_mode is None:
        raise ValueError(
            f"--model: {model!r} has no text encoder, so it cannot encode a prompt. Save the pipeline with its "
            "text encoder and tokenizer, or record the text encoder it was trained with "
            "(`pipe.set_packaged_text_encoder(...)`, see docs/model_format.md)."
        )
    return pipe


def _run_generate(args: argparse.Namespace) -> int:
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    paths = output_paths(args.output, args.num_images, args.prompt, seed)  # fail before loading anything heavy
    if args.lora_scale is not None and args.lora is None:
        raise ValueError("--lora-scale sets the strength of --lora: pass --lora too.")
    lora = resolve_lora(args.lora) if args.lora is not None else None
    model = resolve_model(args.model)
    import torch

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    with _quiet_loading():
        pipe = load_pipeline(args.model and model, dtype).to(device)
        if lora is not None:
            pipe.load_lora_weights(lora[0], weight_name=lora[1], adapter_name="lora")
            if args.lora_scale is not None:
                pipe.set_adapters(["lora"], adapter_weights=[args.lora_scale])
    side = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = args.height or side, args.width or side
    if device.type == "cpu" and height * width > MAX_CPU_PIXELS and not args.allow_large:
        raise ValueError(
            f"--height/--width: {height}x{width} is {height * width / MAX_CPU_PIXELS:.0f}x the {MAX_CPU_PIXELS:,}-pixel "
            "limit for the CPU and would run for many minutes; pass --allow-large to run it anyway, or use a GPU."
        )
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=height,
        width=width,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    for image, path in zip(images, paths):
        save_image(image, path)
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
    from .pipelines.text_packages import TEXT_ENCODER_KEY

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
    text_names = [n for n in components if n.startswith("text_encoder")]
    summary["packaged_text_encoder"] = None if text_names else stored.get(TEXT_ENCODER_KEY)
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
    if summary["packaged_text_encoder"]:
        print(f"  {'text_encoder':<15} from the PyPI package {summary['packaged_text_encoder']} (loaded with the model)")
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
