"""``snapgen eval``: train the emoji classifier and/or compare models on the rendered emoji dataset.

    snapgen eval --data data/emoji --classifier runs/emoji_classifier.safetensors --train-classifier
    snapgen eval --data data/emoji --classifier runs/emoji_classifier.safetensors --out benchmarks/results \\
        --models teacher=runs/teacher:28 kd=runs/kd:28 asd=runs/asd:4 --base runs/base --encoder runs/vae

On a GPU: ``--classifier-batch-size 256 --classifier-lr 4e-3 --classifier-max-seconds 60`` (the images stay on the
device, bf16 autocast) and ``--batch-size 256 --autocast bf16`` for sampling; see docs/emoji_evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import DTYPES, _positive_int, register_subcommand, whole_number


_non_negative_int = whole_number(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="rendered emoji dataset (training_examples/data/prepare_emoji.py)")
    parser.add_argument("--classifier", required=True, help="emoji classifier .safetensors (read, or written with "
                        "--train-classifier)")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME=PATH:STEPS[:GUIDANCE]",
                        help="models to compare: a pipeline folder, or an SD3Transformer2DModel folder with --base")
    parser.add_argument("--out", default=None, help="folder for eval_quality.json/.md and eval_quality_grid.png")
    parser.add_argument("--base", default=None, help="SnapGen pipeline whose text encoder, vae and scheduler sample "
                        "bare SD3Transformer2DModel models")
    parser.add_argument("--encoder", default=None, help="AutoencoderKL folder (or pipeline with vae/) whose encoder "
                        "feeds the decoder PSNR/SSIM; without it those columns stay empty")
    parser.add_argument("--prompt-sets", nargs="+", default=None, metavar="SET",
                        help="sets of eval_prompts.json to use (default: all, e.g. heldout seen)")
    parser.add_argument("--max-prompts", type=_positive_int, default=None, help="at most this many prompts per set")
    parser.add_argument("--skip-prompts", type=_non_negative_int, default=0,
                        help="leave out the first N prompts of each set (e.g. to confirm a sampling setting on prompts "
                             "other than those it was chosen on; default 0)")
    parser.add_argument("--images-per-prompt", type=_positive_int, default=1, help="seeds per prompt (default 1)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="first seed (default 0)")
    parser.add_argument("--size", type=_size, default=None, help="image side (default: each model's default)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per pipeline call (default 8)")
    parser.add_argument("--decoder-images", type=_positive_int, default=64,
                        help="held-out images for decoder PSNR/SSIM (default 64)")
    parser.add_argument("--grid-prompts", type=_positive_int, default=8, help="rows of the image grid (default 8)")
    parser.add_argument("--seed-grid", default=None, metavar="NAME",
                        help="model of the prompts x seeds grid eval_quality_seeds.png (default: the last of --models)")
    parser.add_argument("--seed-grid-prompts", type=_positive_int, default=16,
                        help="rows of the prompts x seeds grid (default 16; columns: up to 4 seeds)")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                        help="sample under torch.autocast with this dtype (GPU: bf16), weights stay --dtype")
    parser.add_argument("--save-images", action="store_true", help="also write every generated image")
    parser.add_argument("--no-rendered-row", action="store_true", help="leave out the row of the dataset's own images")
    parser.add_argument("--train-classifier", action="store_true",
                        help="train the classifier on --data (all splits) and save it to --classifier first")
    parser.add_argument("--classifier-epochs", type=_positive_int, default=100, help="training epochs (default 100)")
    parser.add_argument("--classifier-max-seconds", type=_positive_float, default=None,
                        help="end classifier training after this many seconds (learning rate annealed to the end)")
    parser.add_argument("--classifier-batch-size", type=_positive_int, default=64,
                        help="classifier training batch (default 64; a GPU: 256)")
    parser.add_argument("--classifier-lr", type=_positive_float, default=2e-3, help="peak learning rate (2e-3)")
    parser.add_argument("--classifier-widths", type=_positive_int, nargs="+", default=[32, 64, 128, 256],
                        help="classifier stem and stage widths (default 32 64 128 256)")
    parser.add_argument("--classifier-size", type=_size, default=64, help="classifier input side (default 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="pipeline weights dtype (default float32)")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_encoder(path: str, device):
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--encoder: {path!r} is not a folder.")
    subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder).to(device).eval()


def run(args: argparse.Namespace) -> int:
    from functools import partial

    import torch

    from ..cli import _resolve_device, _resolve_dtype
    from .classifier import load_classifier, save_classifier, train_classifier
    from .data import check_data_dir, read_eval_prompts, read_rendered
    from .harness import evaluate_models, write_report
    from .metrics import prompt_accuracy
    from .models import check_model_folder, load_model, parse_model_spec

    data_dir = check_data_dir(args.data, "--data")
    specs = [parse_model_spec(text) for text in args.models]  # fail on a bad spec before any work
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("--models: every NAME must be different.")
    if not specs and not args.train_classifier:
        raise ValueError("nothing to do: pass --models to compare models, or --train-classifier.")
    if specs and args.out is None:
        raise ValueError("--out is required with --models (the folder for the table and the grid).")
    if args.seed_grid is not None and args.seed_grid not in {s.name for s in specs}:
        raise ValueError(f"--seed-grid: {args.seed_grid!r} is not a NAME of --models.")
    if not str(args.classifier).endswith(".safetensors"):
        raise ValueError(f"--classifier must be a .safetensors file, got {args.classifier!r}.")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    prompt_sets = None
    if specs:
        prompt_sets = read_eval_prompts(data_dir)
        chosen = args.prompt_sets or list(prompt_sets)
        missing = [name for name in chosen if name not in prompt_sets]
        if missing:
            raise ValueError(f"--prompt-sets: {missing} not in eval_prompts.json (has {list(prompt_sets)}).")
        short = [f"{name} ({len(prompt_sets[name])})" for name in chosen if len(prompt_sets[name]) <= args.skip_prompts]
        if short:
            raise ValueError(f"--skip-prompts {args.skip_prompts} leaves no prompt of {', '.join(short)}: skip fewer.")
        prompt_sets = {name: prompt_sets[name][args.skip_prompts:][: args.max_prompts] for name in chosen}
        for spec in specs:  # a wrong model path fails now, not after the models before it were evaluated
            check_model_folder(spec.path, args.base)

    rendered = read_rendered(data_dir, "train+test")
    if args.train_classifier:
        _say(f"training the classifier on {len(rendered)} images, {len(set(rendered.concepts))} concepts ...")
        classifier = train_classifier(rendered.images, rendered.concepts, image_size=args.classifier_size,
                                      widths=args.classifier_widths, epochs=args.classifier_epochs,
                                      batch_size=args.classifier_batch_size, learning_rate=args.classifier_lr,
                                      max_seconds=args.classifier_max_seconds, device=device, progress=True)
        path = save_classifier(classifier, args.classifier)
        log = classifier.training_log[-1]
        accuracy = prompt_accuracy(rendered.images, rendered.concepts, classifier, batch_size=512)
        by_kind = {kind: prompt_accuracy([im for im, k in zip(rendered.images, rendered.kinds) if k == kind],
                                         [c for c, k in zip(rendered.concepts, rendered.kinds) if k == kind],
                                         classifier, batch_size=512)["top1"]
                   for kind in dict.fromkeys(rendered.kinds)}
        _say(f"classifier: {log['epoch']} epochs in {log['seconds']:.0f} s, last epoch loss {log['loss']:.3f}; "
             f"rendered-set top-1 {accuracy['top1']:.4f}, top-5 {accuracy['top5']:.4f} ("
             + ", ".join(f"{k} {v:.4f}" for k, v in by_kind.items()) + ")")
        print(path)
        if not specs:
            return 0
    else:
        classifier = load_classifier(args.classifier, device=device)

    reference = classifier.embed(rendered.images, batch_size=512)
    references = None if args.no_rendered_row else rendered.reference_images()
    encoder = decoder_images = None
    if args.encoder is not None:
        encoder = _load_encoder(args.encoder, device)
        decoder_images = read_rendered(data_dir, "test").images[: args.decoder_images]
    models = [(s.name, partial(load_model, s.path, base=args.base, device=device, dtype=dtype), s.steps,
               s.guidance_scale) for s in specs]
    result = evaluate_models(
        models, prompt_sets, classifier, reference_features=reference, rendered=references, seed=args.seed,
        images_per_prompt=args.images_per_prompt, height=args.size, width=args.size, batch_size=args.batch_size,
        encoder=encoder, decoder_images=decoder_images, autocast=autocast, progress=_say, continue_on_error=True,
    )
    result.settings.update(data=str(data_dir), classifier=str(args.classifier), device=str(device),
                           dtype=str(dtype).replace("torch.", ""), encoder=args.encoder, base=args.base,
                           models={s.name: s.path for s in specs}, skip_prompts=args.skip_prompts)
    evaluated = [s.name for s in specs if s.name not in result.failed]
    seed_grid_model = args.seed_grid if args.seed_grid in evaluated else (evaluated or [None])[-1]
    if args.seed_grid is not None and seed_grid_model != args.seed_grid:
        _say(f"--seed-grid {args.seed_grid} failed; the seed grid shows {seed_grid_model} instead")
    paths = write_report(result, args.out, grid_prompts=args.grid_prompts, save_images=args.save_images,
                         seed_grid_model=seed_grid_model, seed_grid_prompts=args.seed_grid_prompts)
    for path in paths.values():
        print(path)
    for name, error in result.failed.items():  # the table holds every other row; the exit status says it is partial
        print(f"snapgen eval: {name} could not be evaluated: {error}", file=sys.stderr)
    return 1 if result.failed else 0


register_subcommand("eval", "measure models on the emoji set: prompt accuracy, FID, prompt/seed ratio, decoder "
                    "PSNR/SSIM",
                    configure, run)
