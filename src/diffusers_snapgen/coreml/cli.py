"""``snapgen convert-coreml`` and ``python conversion/convert_snapgen_to_coreml.py``.

Importing this module registers the subcommand with :mod:`diffusers_snapgen.cli` (which lists it in
``SUBCOMMAND_MODULES``); heavy imports (coremltools, torch models) happen only in :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import _positive_int

__all__ = ["HELP", "add_convert_coreml_parser", "configure", "run", "main"]

HELP = "export a SnapGen pipeline to Core ML packages (iPhone/iPad/Mac) in the Hub layout"
_TARGETS = ("iOS17", "iOS18")


def _target(text: str) -> str:
    for name in _TARGETS:
        if text.lower() == name.lower():
            return name
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(_TARGETS)}, got {text!r}")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert-coreml`` arguments to ``parser``."""
    parser.add_argument("--model", "-m", required=True, help="SnapGen pipeline folder or Hub repo id")
    parser.add_argument("--output", "-o", default=None,
                        help="output folder (written atomically); required unless --search-mixed-bit is given")
    parser.add_argument("--resolution", type=_positive_int, default=1024, help="square image size in px (1024)")
    parser.add_argument("--target", type=_target, default="iOS18", help="deployment target: iOS17 or iOS18")
    parser.add_argument("--variants", default="fp16,palettize6,palettize4",
                        help="comma list of fp16, palettize8, palettize6, palettize4, mixed:RECIPE.json (per-layer "
                             "widths; with --search-mixed-bit, a bare 'mixed' is the recipe just searched)")
    parser.add_argument("--components", default="unet,decoder,text", help="comma list of unet, decoder, text")
    parser.add_argument("--batch-size", type=int, choices=(1, 2), default=1,
                        help="UNet batch: 1 for few-step CFG-free models, 2 to batch CFG")
    parser.add_argument("--chunk-unet", action="store_true", help="split the UNet into two packages (Apple's chunking)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="steps of the exported schedule (default: the model's)")
    parser.add_argument("--group-size", type=_positive_int, default=16,
                        help="output channels per look-up table for iOS18 per-grouped-channel palettization "
                             "(a mixed recipe keeps the group size it was searched with)")
    parser.add_argument("--weight-threshold", type=int, default=2048, help="palettize weights larger than this")
    parser.add_argument("--strict", action="store_true", help="fail when a compressed variant is below 35 dB PSNR")
    parser.add_argument("--skip-validation", action="store_true", help="skip the PSNR checks (structure is always checked)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card (apache-2.0)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--search-mixed-bit", metavar="RECIPE.json", default=None,
                        help="search per-layer widths that keep the end-to-end image PSNR >= --bar and write the recipe")
    parser.add_argument("--bar", type=float, default=35.0, help="end-to-end PSNR bar of the mixed-bit search in dB (35)")
    parser.add_argument("--search-bits", default="2,4,6", help="widths the mixed-bit search offers (2,4,6)")
    parser.add_argument("--target-bits", type=float, default=None,
                        help="mixed-bit search: instead of the cheapest recipe that keeps --bar, the best recipe of at "
                             "most this many bits per weight, look-up tables included (e.g. 4.5); its PSNR is reported")
    parser.add_argument("--sensitivities-from", metavar="RECIPE.json", default=None,
                        help="mixed-bit search: reuse the per-layer sensitivities of a recipe searched with the same "
                             "settings (another --bar or --target-bits without measuring again)")
    parser.add_argument("--eight-bit", choices=("palette", "linear"), default="palette",
                        help="mixed-bit search: store 8-bit layers as 8-bit tables (palette) or as int8 with one scale "
                             "per output channel (linear: fewer bits, closer to fp16)")
    parser.add_argument("--group-depth", type=_positive_int, default=None,
                        help="mixed-bit search: layers sharing the first N name parts get one width (faster)")
    parser.add_argument("--dry-run", action="store_true",
                        help="load and check the model, list what would be written/uploaded; convert and upload nothing")


def add_convert_coreml_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``convert-coreml`` to an ``argparse`` subparsers object; returns the new parser (``run`` is its default
    ``func``)."""
    parser = subparsers.add_parser("convert-coreml", help=HELP, description=HELP)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def _load_pipeline(model: str):
    from ..pipelines import SnapGenPipeline

    try:
        return SnapGenPipeline.from_pretrained(model)
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"--model {model!r} is not a loadable SnapGen pipeline (unsupported model): {err}") from err


def run(args: argparse.Namespace) -> int:
    """Run the conversion described by ``args``; returns the exit code (errors raise ValueError/OSError)."""
    from .compress import parse_variants
    from .components import parse_components

    def say(message: str) -> None:
        print(message, flush=True)

    search = args.search_mixed_bit
    if search is not None:
        from .mixed_bit import parse_bits

        if not search.endswith(".json"):
            raise ValueError(f"--search-mixed-bit must name a .json recipe file, got {search!r}.")
        parse_bits(args.search_bits, "--search-bits")
        if not (args.bar == args.bar and 0 < args.bar < 200):
            raise ValueError(f"--bar must be a PSNR in dB between 0 and 200 (e.g. 35), got {args.bar}.")
        if args.target_bits is not None and not 1 <= args.target_bits <= 16:
            raise ValueError(f"--target-bits must be a number of bits per weight in [1, 16] (e.g. 4.5), got "
                             f"{args.target_bits}.")
        if args.sensitivities_from is not None and not os.path.isfile(args.sensitivities_from):
            raise ValueError(f"--sensitivities-from {args.sensitivities_from!r} is not a file: pass a recipe written "
                             "by --search-mixed-bit.")
        if args.dry_run:
            raise ValueError("--dry-run lists an export; drop it to run --search-mixed-bit.")
    elif args.target_bits is not None or args.sensitivities_from is not None:
        raise ValueError("--target-bits and --sensitivities-from apply to --search-mixed-bit RECIPE.json only.")
    elif args.output is None:
        raise ValueError("--output is required (the export folder), unless --search-mixed-bit RECIPE.json is given.")
    tokens = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "mixed" in tokens:
        if search is None:
            raise ValueError("--variants 'mixed' needs a recipe: mixed:RECIPE.json, or --search-mixed-bit RECIPE.json.")
        tokens = [t for t in tokens if t != "mixed"]
    variants = parse_variants(tokens) if tokens else []
    components = parse_components(args.components)
    if args.weight_threshold < 0:
        raise ValueError(f"--weight-threshold must be >= 0, got {args.weight_threshold}.")
    if args.push_to_hub is not None and (args.push_to_hub.count("/") != 1 or " " in args.push_to_hub):
        raise ValueError(f"--push-to-hub must be a repo id like 'user/name', got {args.push_to_hub!r}.")
    say(f"loading {args.model}")
    pipe = _load_pipeline(args.model)
    if search is not None:
        from .mixed_bit import search_mixed_bit

        search_mixed_bit(pipe, search, bar_db=args.bar, bits=args.search_bits, resolution=args.resolution,
                         target=args.target, group_size=args.group_size, weight_threshold=args.weight_threshold,
                         components=[g for g in components if g != "decoder"], group_depth=args.group_depth,
                         eight_bit=args.eight_bit, progress=say, max_bits=args.target_bits,
                         sensitivities_from=args.sensitivities_from)
        if "mixed" in [v.strip() for v in args.variants.split(",")]:
            variants.append(f"mixed:{search}")
        if args.output is None:
            return 0
    if not variants:
        raise ValueError("--variants is empty: choose from fp16, palettize8, palettize6, palettize4, mixed:RECIPE.json.")
    if args.dry_run:
        from .export import planned_layout

        files = planned_layout(pipe, variants, components, args.chunk_unet)
        say(f"dry run: would write {len(files)} entries to {args.output} ({args.target}, {args.resolution}px):")
        for name in files:
            say(f"  {name}")
        if args.push_to_hub:
            say(f"dry run: would upload them to https://huggingface.co/{args.push_to_hub}")
        return 0
    from .export import export_pipeline

    export_pipeline(
        pipe,
        args.output,
        resolution=args.resolution,
        target=args.target,
        variants=variants,
        components=components,
        batch_size=args.batch_size,
        chunk_unet=args.chunk_unet,
        num_inference_steps=args.steps,
        group_size=args.group_size,
        weight_threshold=args.weight_threshold,
        validate=not args.skip_validation,
        strict=args.strict,
        model_id=args.model,
        license=args.license,
        overwrite=args.overwrite,
        progress=say,
    )
    if args.push_to_hub:
        from ..cards import push_folder_to_hub

        push_folder_to_hub(args.output, args.push_to_hub, private=args.private or None, progress=say)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``conversion/convert_snapgen_to_coreml.py``): same arguments, same exit codes."""
    parser = argparse.ArgumentParser(prog="convert_snapgen_to_coreml", description=HELP)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"convert_snapgen_to_coreml: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _register() -> None:
    try:
        from ..cli import register_subcommand
    except ImportError:  # pragma: no cover - the console script module is absent
        return
    register_subcommand("convert-coreml", HELP, configure, run)


_register()
