#!/usr/bin/env python
"""Mixed-bit Core ML palettization: search a recipe, export every variant, measure image-level quality (CPU).

    python benchmarks/coreml_mixed_bit.py default   # embedded default model, trained weights
    python benchmarks/coreml_mixed_bit.py default --eval-prompts DATA/eval_prompts.json \
        --classifier runs/emoji_classifier.safetensors   # + classifier top-1 per variant
    python benchmarks/coreml_mixed_bit.py paper     # paper-size UNet, random weights (structural check)

``default`` searches a recipe for the embedded default model (``load_default_pipeline()``; k-means tables, the
model's full sampling on prompt/seed pairs of ``--eval-prompts``), then exports fp16, 6-bit, 4-bit and the mixed
recipe and measures each variant end to end on *other* pairs. Writes ``coreml_mixed_bit_default.{md,json}`` and the
recipe ``coreml_mixed_bit_default_recipe.json``.

``--eval-prompts`` reads either the ``eval_prompts.json`` of a rendered emoji dataset
(``training_examples/data/prepare_emoji.py``: ``{"seen": [...], "heldout_pair": [...], ...}``; the variants are
measured on the first ``--report-pairs`` prompts of ``seen`` and of ``heldout_pair`` at seed 0, the search uses the
next ``--search-pairs`` prompts of each at seed 1) or an evaluation table of ``snapgen eval``
(``{"prompts": [{"prompt", "group", "seed"}, ...]}``, default benchmarks/results/eval_quality.json; groups ``seen``
and ``heldout_pair``, or ``heldout``; search and report pairs share prompts, not seeds). ``--classifier`` (the emoji
classifier of that dataset, from ``snapgen eval --train-classifier``) adds classifier top-1 of the fp32 reference and
of every variant against the prompt's concept, and each variant's difference to fp16 in points.

``paper`` builds the paper-size UNet (random weights), converts it once at a low resolution (weights do not depend
on it), palettizes it with evenly spaced tables (``uniform``: same bytes as k-means, which takes about an hour per
width on two cores), measures sensitivity per layer group on one UNet call and saves the mixed package to measure
its size. Writes ``coreml_mixed_bit_paper.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_atomically  # noqa: E402  (also puts src/ on the path: runs from a plain checkout)

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_PROMPTS = RESULTS / "eval_quality.json"
#: Evaluation groups the benchmark samples, by preference: concepts the model was trained on.
GROUPS = (("seen", "heldout_pair"), ("seen", "heldout"))
#: The target of a mixed-bit variant: UNet bits per weight, held-out image PSNR, top-1 distance to fp16.
CRITERION = {"max_unet_bits_per_weight": 4.5, "min_image_psnr_db": 35.0, "max_top1_points_from_fp16": 2.0}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _bar(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of dB, got {text!r}")
    return value


def _bits_per_weight(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be a number of bits per weight in [1, 16] (e.g. 4.5), got {text!r}")
    return value


def parse_args(argv=None):
    from diffusers_snapgen.coreml.mixed_bit import parse_bits

    def bits(text):
        try:
            return parse_bits(text, "--bits")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("default", "paper"))
    parser.add_argument("--bar", type=_bar, default=35.0, help="end-to-end PSNR bar in dB (35)")
    parser.add_argument("--bits", type=bits, default=(2, 4, 6), help="offered widths (2,4,6)")
    parser.add_argument("--search-pairs", type=_positive, default=8, help="default: prompt/seed pairs per eval "
                        "group (seen, heldout_pair or heldout) the search samples (8)")
    parser.add_argument("--report-pairs", type=_positive, default=24, help="default: other pairs per group the "
                        "variants are measured on (24)")
    parser.add_argument("--eval-prompts", type=Path, default=EVAL_PROMPTS,
                        help="default: eval_prompts.json of the model's emoji dataset, or a `snapgen eval` table "
                             "(benchmarks/results/eval_quality.json)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="default: emoji classifier .safetensors (`snapgen eval --train-classifier`): top-1 "
                             "per variant")
    parser.add_argument("--resolution", type=_positive, default=256, help="paper: conversion/search image side (256)")
    parser.add_argument("--group-depth", type=_positive, default=None,
                        help="name parts that form one unit (paper: 4 by default; default model: one unit per layer)")
    parser.add_argument("--search-components", default="unet,text", help="default: packages the search covers")
    parser.add_argument("--group-size", type=_positive, default=16,
                        help="default: output channels per look-up table (iOS18 per-grouped-channel; 16)")
    parser.add_argument("--eight-bit", choices=("palette", "linear"), default="palette",
                        help="default: 8-bit layers as 8-bit tables or as int8 with per-channel scales")
    parser.add_argument("--target-bits", type=_bits_per_weight, default=None,
                        help="default: the mixed variant is the best recipe of at most this many bits per weight "
                             "(tables included), not the cheapest that keeps --bar; results get a _<B>bit_<widths> "
                             "suffix")
    parser.add_argument("--sensitivities-from", type=Path, default=None,
                        help="default: reuse the sensitivities of a recipe searched with the same settings and pairs")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads")
    parser.add_argument("--tag", type=_tag, default=None,
                        help="a name part after the model's in the result files (e.g. cfg2: ..._default_cfg2.md), so a "
                             "run under other sampling settings does not overwrite the published one")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (benchmarks/results)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    return parser.parse_args(argv)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}


def _prompts_error(path, problem: str) -> ValueError:
    return ValueError(f"--eval-prompts {str(path)!r}: {problem}; pass the eval_prompts.json of the model's emoji "
                      "dataset (training_examples/data/prepare_emoji.py) or a `snapgen eval` table such as "
                      "benchmarks/results/eval_quality.json.")


def _groups(available, path) -> tuple[str, ...]:
    for groups in GROUPS:
        if all(g in available for g in groups):
            return groups
    raise _prompts_error(path, f"no 'seen' and 'heldout_pair' (or 'heldout') groups (has {sorted(available)})")


def eval_pairs(search_pairs: int, report_pairs: int, path=EVAL_PROMPTS):
    """``(search, report)``: ``[prompt, seed, group]`` triples from ``path``, disjoint (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _prompts_error(path, f"cannot read it ({err})") from err
    if not isinstance(data, dict):
        raise _prompts_error(path, "not a JSON object")
    search, report = [], []
    if "prompts" in data:  # a `snapgen eval` table: search and report pairs share prompts, not seeds
        entries = data["prompts"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("prompt"), str)
                                                     and "group" in e and "seed" in e for e in entries):
            raise _prompts_error(path, "'prompts' must be a list of {prompt, group, seed}")
        for group in _groups({e["group"] for e in entries}, path):
            rows = [[e["prompt"], int(e["seed"]), group] for e in entries if e["group"] == group]
            chosen = rows[0:2 * search_pairs:2]
            rest = [r for r in rows if r not in chosen]
            if len(chosen) < search_pairs or len(rest) < report_pairs:
                raise _prompts_error(path, f"group {group!r} has {len(rows)} pairs, fewer than --search-pairs "
                                           f"{search_pairs} + --report-pairs {report_pairs}")
            search += chosen
            report += rest[:report_pairs]
        return search, report
    for group in _groups(data, path):  # eval_prompts.json: other prompts and other seeds for the search
        prompts = data[group]
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _prompts_error(path, f"{group!r} must be a list of prompts")
        if len(prompts) < report_pairs + search_pairs:
            raise _prompts_error(path, f"group {group!r} has {len(prompts)} prompts, fewer than --report-pairs "
                                       f"{report_pairs} + --search-pairs {search_pairs}")
        report += [[p, 0, group] for p in prompts[:report_pairs]]
        search += [[p, 1, group] for p in prompts[report_pairs:report_pairs + search_pairs]]
    return search, report


def load_eval_classifier(path, prompts):
    """The emoji classifier at ``path`` (``--classifier``), checked to know every prompt's concept."""
    from diffusers_snapgen.evaluation import load_classifier
    from diffusers_snapgen.evaluation.harness import _is_class

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"--classifier must be a .safetensors emoji classifier (`snapgen eval --train-classifier`), "
                         f"got {str(path)!r}.")
    try:
        classifier = load_classifier(path)
    except ValueError as err:
        raise ValueError(f"--classifier: {err}") from err
    unknown = sorted({p for p in prompts if not _is_class(classifier, p)})
    if unknown:
        raise ValueError(f"--classifier {Path(path).name!r} has no class for {len(unknown)} prompt(s) of "
                         f"--eval-prompts (e.g. {unknown[0]!r}): use the classifier of the dataset those prompts "
                         "come from.")
    return classifier


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def criterion(variants: dict) -> dict:
    """Whether the mixed variant meets :data:`CRITERION` (top-1 only when measured), from measured numbers only."""
    mixed = variants.get("mixed")
    if mixed is None:
        return {}
    e2e = mixed["end_to_end"]
    # look-up tables counted when the export measured them (older results: index bits only)
    honest = mixed.get("unet_average_bits_per_weight_with_luts")
    out = {**CRITERION, "unet_bits_per_weight": mixed["unet_average_bits_per_weight"] if honest is None else honest,
           "bits_count_luts": honest is not None,
           "image_psnr_db": e2e["image_psnr_db"], "top1_points_from_fp16": e2e.get("classifier_top1_vs_fp16_points")}
    out["bits_met"] = out["unet_bits_per_weight"] <= CRITERION["max_unet_bits_per_weight"]
    out["psnr_met"] = e2e["image_psnr_db"] == "inf" or e2e["image_psnr_db"] >= CRITERION["min_image_psnr_db"]
    points = out["top1_points_from_fp16"]
    out["top1_met"] = None if points is None else abs(points) <= CRITERION["max_top1_points_from_fp16"]
    out["met"] = bool(out["bits_met"] and out["psnr_met"] and out["top1_met"])
    return out


def run_default(args, search_set, report_set, classifier=None) -> dict:
    from diffusers_snapgen import load_default_pipeline
    from diffusers_snapgen.coreml.export import _versions, export_pipeline
    from diffusers_snapgen.coreml.mixed_bit import search_mixed_bit

    from diffusers_snapgen.default_model import default_model_path

    say = lambda m: print(m, flush=True)  # noqa: E731
    started = time.perf_counter()
    pipe = load_default_pipeline()
    # which default model this is (read now: the package's folder may be replaced while the run goes on)
    unet_digest = _file_digest(default_model_path() / "unet" / "diffusion_pytorch_model.safetensors")
    resolution = pipe.default_sample_size * pipe.vae_scale_factor
    recipe_path = args.out / f"{_stem(args)}_recipe.json"
    start = time.perf_counter()
    recipe, search = search_mixed_bit(pipe, recipe_path, bar_db=args.bar, bits=args.bits, resolution=resolution,
                                      prompts=[p for p, _, _ in search_set], seeds=[s for _, s, _ in search_set],
                                      components=args.search_components.split(","), group_depth=args.group_depth,
                                      group_size=args.group_size, eight_bit=args.eight_bit, progress=say,
                                      max_bits=args.target_bits, sensitivities_from=args.sensitivities_from)
    search_seconds = time.perf_counter() - start
    curve = []
    for bar in sorted({30.0, 33.0, args.bar, 38.0, 40.0}):
        other = search.recipe(bar)
        curve.append({k: other.metadata.get(k) for k in (
            "bar_db", "measured_psnr_db", "meets_bar", "average_bits_per_weight", "component_bits",
            "average_bits_per_weight_with_luts", "component_bits_with_luts")})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snapgen-mixed-bit-") as tmp:
        manifest = export_pipeline(pipe, Path(tmp) / "export", resolution=resolution,
                                   variants=["fp16", "palettize6", "palettize4", f"mixed:{recipe_path}"],
                                   quality_prompts=[p for p, _, _ in report_set],
                                   quality_seeds=[s for _, s, _ in report_set], quality_classifier=classifier,
                                   quality_groups=[g for _, _, g in report_set], group_size=args.group_size,
                                   progress=say)
    export_seconds = time.perf_counter() - start
    variants = {}
    for key, data in manifest["variants"].items():
        variants[key] = {
            "size_bytes": data["size_bytes"],
            "average_bits_per_weight": data["average_bits_per_weight"],
            "unet_average_bits_per_weight": data.get("unet_average_bits_per_weight"),
            "average_bits_per_weight_with_luts": data.get("average_bits_per_weight_with_luts"),
            "unet_average_bits_per_weight_with_luts": data.get("unet_average_bits_per_weight_with_luts"),
            "end_to_end": data["end_to_end"],
            "components": {name: {"size_bytes": c["size_bytes"], "psnr_db": c.get("psnr_db"),
                                  "average_bits_per_weight": c["compression"].get("average_bits_per_weight", 16.0
                                                                                   if name != "decoder" else None),
                                  "average_bits_per_weight_with_luts": c["compression"].get(
                                      "average_bits_per_weight_with_luts")}
                           for name, c in data["components"].items()},
        }
    settings = manifest["end_to_end_settings"]
    measured = settings.get("classifier")
    return {
        "benchmark": "coreml_mixed_bit_default",
        "model": "embedded default model (trained weights)",
        "unet_sha256_16": unet_digest,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder": type(pipe.text_encoder).__name__,
        "resolution": resolution,
        "num_inference_steps": settings["num_inference_steps"],
        "guidance_scale": settings["guidance_scale"],
        "target": manifest["deployment_target"],
        "machine": _machine(),
        "versions": _versions(),
        "bar_db": args.bar,
        "target_bits": args.target_bits,
        "sensitivities_from": None if args.sensitivities_from is None else args.sensitivities_from.name,
        "bits_offered": list(args.bits),
        "search_components": args.search_components.split(","),
        "group_depth": args.group_depth,
        "search": {k: v for k, v in recipe.metadata.items() if k not in ("sensitivity_db", "quality", "groups")},
        "eval_prompts": args.eval_prompts.name,
        "search_pairs": search_set,
        "report_pairs": report_set,
        "search_seconds": round(search_seconds, 1),
        "export_seconds": round(export_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "bar_curve": curve,
        "variants": variants,
        "classifier": None if measured is None else {"file": args.classifier.name, **measured},
        "criterion": criterion(variants),
        "recipe_file": recipe_path.name,
    }


def run_paper(args) -> dict:
    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.coreml.compress import palettizable_parameters, palettize, swapped_parameters
    from diffusers_snapgen.coreml.components import unet_component
    from diffusers_snapgen.coreml.convert import convert_module
    from diffusers_snapgen.coreml.export import _dir_size, _run, _versions
    from diffusers_snapgen.coreml.mixed_bit import MixedBitSearch, palettized_candidates
    from diffusers_snapgen.coreml.validate import psnr

    say = lambda m: print(m, flush=True)  # noqa: E731
    torch.manual_seed(0)
    unet = SnapGenUNet2DModel().eval()
    spec = unet_component(unet, args.resolution // 8)
    del unet
    reference = _run(spec.reference, spec.inputs)[0]
    spec.reference = None
    start = time.perf_counter()
    mlmodel, seconds, _ = convert_module(spec.module, spec.inputs, spec.output_names, target="iOS18")
    say(f"converted in {seconds:.0f}s")
    candidates, sizes = palettized_candidates(mlmodel, spec.module, args.bits, "iOS18", 16, 2048, "uniform", say,
                                              "unet")
    base = {k: v.detach().half() for k, v in spec.module.named_parameters()}
    units = {}
    for param in candidates:
        units.setdefault(".".join(param.split(".")[:args.group_depth]), []).append(("unet", param))

    def evaluate(states):  # the fp16 base is swapped in once, around the whole search
        with swapped_parameters(spec.module, states.get("unet", {})):
            return psnr(reference, _run(spec.module, spec.inputs)[0])

    search = MixedBitSearch({"unet": candidates}, evaluate, args.bits, groups=units, progress=say,
                            metadata={"palettize_mode": "uniform", "resolution": args.resolution})
    with swapped_parameters(spec.module, base):
        search.measure()
        recipe = search.recipe(args.bar)
    del base
    search_seconds = time.perf_counter() - start
    eligible = palettizable_parameters(mlmodel, spec.module, 2048)
    sizes_mib = {}
    with tempfile.TemporaryDirectory(prefix="snapgen-mixed-bit-paper-") as tmp:
        model, info = palettize(mlmodel, spec.module, recipe.layers["unet"], "iOS18", 16, 2048, mode="uniform")
        model.save(str(Path(tmp) / "Unet.mlpackage"))
        sizes_mib["mixed"] = _dir_size(Path(tmp) / "Unet.mlpackage") / 2**20
    previous = json.loads((RESULTS / "coreml_paper_size.json").read_text())
    for key in ("fp16", "palettize6", "palettize4"):
        sizes_mib[key] = previous["variants"][key]["components"]["unet"]["size_bytes"] / 2**20
    return {
        "benchmark": "coreml_mixed_bit_paper",
        "model": "paper-size SnapGenUNet2DModel, random weights (torch seed 0)",
        "parameters": sum(p.numel() for p in spec.module.parameters()),
        "palettizable_weights": sum(m["numel"] for m in eligible.values()),
        "resolution": args.resolution,
        "target": "iOS18",
        "palettize_mode": "uniform",
        "machine": _machine(),
        "versions": _versions(),
        "bar_db": args.bar,
        "bits_offered": list(args.bits),
        "group_depth": args.group_depth,
        "units": len(units),
        "search": {k: v for k, v in recipe.metadata.items() if k not in ("groups",)},
        "unit_bits": {unit: recipe.layers["unet"][members[0][1]] for unit, members in units.items()},
        "search_seconds": round(search_seconds, 1),
        "mixed_average_bits_per_weight": info["average_bits_per_weight"],
        "unet_size_mib": {k: round(v, 1) for k, v in sizes_mib.items()},
        "target_size_mib": 210.0,
        "sizes_from": {"mixed": "this run", "fp16/palettize6/palettize4": "benchmarks/results/coreml_paper_size.json"},
    }


def _fmt(value):
    return "—" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def _units(r: dict) -> str:
    depth = r.get("group_depth")
    if depth is None:
        return f"{r['search']['units']} layers, one width each"
    return (f"{r['search']['units']} units: layers sharing the first {depth} parts of their parameter name share "
            "one width")


def _pct(value):
    return "—" if value is None else f"{value * 100:.1f}%"


def _points(value):
    return "—" if value is None else f"{value:+.1f}"


def _yes(flag):
    return "not measured" if flag is None else ("**yes**" if flag else "**no**")


def markdown_default(r: dict) -> str:
    guidance = r.get("guidance_scale")
    groups = list(dict.fromkeys(pair[2] for pair in r["report_pairs"])) if len(r["report_pairs"][0]) > 2 else []
    counts = ", ".join(f"{sum(1 for p in r['report_pairs'] if p[2] == g)} {g}" for g in groups)
    lines = [
        f"# Mixed-bit Core ML palettization of the embedded default model ({r['resolution']}², {r['target']})",
        "",
        f"Trained weights of the embedded default model (`load_default_pipeline()`: {r['resolution']}×"
        f"{r['resolution']}, {r.get('num_inference_steps', 4)} steps"
        + ("" if guidance is None or guidance <= 1 else f", CFG {guidance:g}")
        + (f"; UNet file sha256 {r['unet_sha256_16']}…" if r.get("unet_sha256_16") else "") + "). "
        f"CPU (`{r['machine']['platform']}`, torch threads: {r['machine']['torch_threads']}), "
        f"coremltools {r['versions']['coremltools']}, torch {r['versions']['torch']}. Quality is measured in "
        "PyTorch with each variant's weights decompressed from its Core ML packages (no Core ML runtime on Linux): "
        f"the full {r['variants']['fp16']['end_to_end']['num_inference_steps']}-step sampling (text encoder "
        "-> UNet -> TinyDecoder) against the fp32 pipeline, same prompts and initial noise.",
        "",
        f"Search: k-means tables of {', '.join(map(str, r['bits_offered']))} bits per layer"
        + (f" ({r['search']['group_size']} output channels per table)" if r["search"].get("group_size") else "")
        + (" (8 bits: int8 with per-channel scales)" if r["search"].get("eight_bit") == "linear" else "")
        + ", bar "
        f"{r['bar_db']} dB end-to-end image PSNR on {len(r['search_pairs'])} prompt/seed pairs of "
        f"`{r.get('eval_prompts', 'eval_quality.json')}`, over the {', '.join(r['search_components'])} "
        f"package(s) ({_units(r)}); {r['search']['evaluations']} pipeline runs, "
        f"{r['search_seconds'] / 60:.1f} min"
        + (f" (sensitivities reused from `{r['sensitivities_from']}`)" if r.get("sensitivities_from") else "")
        + ". Packages the search does not cover stay fp16 in `mixed`. "
        + (f"`mixed` is the best recipe of at most {r['target_bits']:g} bits per weight (tables included) in the "
           "search's greedy order, whatever its PSNR. " if r.get("target_bits") is not None else "")
        + f"Recipe: `{r['recipe_file']}` (measured {r['search']['measured_psnr_db']} dB on the search pairs). "
        "The variants "
        f"below are measured on {len(r['report_pairs'])} *other* pairs"
        + (f" ({counts}; other prompts and seeds than the search)" if counts else " (other seeds)") + ".",
        "",
        "| variant | bits/weight (all) | UNet bits/weight | UNet incl. tables | size (MiB) | UNet MiB | text MiB "
        "| UNet PSNR | text PSNR | end-to-end image PSNR | worst image | nearest-reference agreement "
        "| classifier top-1 | vs fp16 (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in r["variants"].items():
        c = v["components"]
        e = v["end_to_end"]
        lines.append(
            f"| `{key}` | {_fmt(v['average_bits_per_weight'])} | {_fmt(v['unet_average_bits_per_weight'])} | "
            f"{_fmt(v.get('unet_average_bits_per_weight_with_luts'))} | {v['size_bytes'] / 2**20:.2f} | "
            f"{c['unet']['size_bytes'] / 2**20:.2f} | "
            f"{c['text_encoder']['size_bytes'] / 2**20:.2f} | {c['unet']['psnr_db']} dB | "
            f"{c['text_encoder']['psnr_db']} dB | **{e['image_psnr_db']} dB** | {e['worst_image_psnr_db']} dB | "
            f"{e['nearest_reference_agreement'] * 100:.1f}% | {_pct(e.get('classifier_top1'))} | "
            f"{_points(e.get('classifier_top1_vs_fp16_points'))} |")
    clf = r.get("classifier")
    if clf:
        lines += ["", f"Per group ({counts}); fp32 reference top-1: {_pct(clf['reference_top1'])} ("
                  + ", ".join(f"{g} {_pct(v)}" for g, v in clf["reference_top1_by_group"].items()) + ").", "",
                  "| variant | " + " | ".join(f"{g} image PSNR | {g} top-1" for g in groups)
                  + " | same class as fp32 |",
                  "|---|" + "---|---|" * len(groups) + "---|"]
        for key, v in r["variants"].items():
            by = v["end_to_end"].get("by_group", {})
            cells = " | ".join(f"{by[g]['image_psnr_db']} dB | {_pct(by[g].get('classifier_top1'))}" for g in groups)
            lines.append(f"| `{key}` | {cells} | {_pct(v['end_to_end'].get('classifier_same_class_as_reference'))} |")
    top1_note = ("not measured (pass --classifier: the emoji classifier of the model's dataset)" if not clf else
                 f"share of images whose prompt's concept is the top class of the emoji classifier `{clf['file']}` "
                 f"({clf['classes']} concepts; the mapping of `snapgen eval`: \"red apple, noto style\" -> "
                 "\"red apple\"); vs fp16: the variant's top-1 minus fp16's, in points (paired: same prompts and "
                 "noise); same class as fp32: share of images the classifier puts in the class of their fp32 image")
    lines += [
        "",
        "Bits/weight: over the weights palettization applies to (matrices and convolutions above 2048 elements; "
        "fp16 counts 16), index bits only; *incl. tables*: the look-up tables counted as well (fp16 entries, "
        "2^bits per table, one table per group of output channels), as stored in the package. UNet/text PSNR: one "
        "package's output vs fp32 on the export's validation inputs (Apple's 35 dB bar). End-to-end image PSNR: "
        "images in [0, 1], peak 1, squared error pooled over all images. Nearest-reference agreement: share of "
        "images whose nearest fp32 image (pixel L2, over all pairs) is the one of the same prompt and seed. "
        "Classifier top-1: "
        f"{top1_note}. The decoder stays fp16 in every variant.",
    ]
    crit = r.get("criterion")
    if crit:
        counted = " (look-up tables included)" if crit.get("bits_count_luts") else ""
        lines += ["", f"**Criterion** (`mixed`: ≤ {crit['max_unet_bits_per_weight']} bits per UNet weight{counted}, "
                  f"end-to-end image PSNR ≥ {crit['min_image_psnr_db']} dB on the report pairs, classifier top-1 "
                  f"within {crit['max_top1_points_from_fp16']:g} points of fp16): bits "
                  f"{_fmt(crit['unet_bits_per_weight'])} {_yes(crit['bits_met'])}; PSNR {crit['image_psnr_db']} dB "
                  f"{_yes(crit['psnr_met'])}; top-1 {_points(crit['top1_points_from_fp16'])} points "
                  f"{_yes(crit['top1_met'])}. Met: {_yes(crit['met'] if crit['top1_met'] is not None else None)}."]
    lines += [
        "",
        "Same measurements under other bars (search pairs):",
        "",
        "| bar | measured | meets | bits/weight (all) | UNet | UNet incl. tables | text encoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["bar_curve"]:
        comp = row["component_bits"]
        lines.append(f"| {row['bar_db']} dB | {row['measured_psnr_db']} dB | {'yes' if row['meets_bar'] else 'no'} | "
                     f"{_fmt(row['average_bits_per_weight'])} | {_fmt(comp.get('unet'))} | "
                     f"{_fmt((row.get('component_bits_with_luts') or {}).get('unet'))} | "
                     f"{_fmt(comp.get('text_encoder'))} |")
    lines.append(f"\nExport of the four variants with their checks (fp32 reference images included): "
                 f"{r['export_seconds'] / 60:.1f} min"
                 + (f"; whole run {r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "") + ".\n")
    return "\n".join(lines)


def markdown_paper(r: dict) -> str:
    s = r["search"]
    sizes = r["unet_size_mib"]
    lines = [
        f"# Mixed-bit Core ML palettization of the paper-size UNet ({r['target']}, random weights)",
        "",
        "**Structural check only.** The weights are random, so which layers are sensitive says nothing about a "
        "trained SnapGen; this shows that the search, the per-layer recipe and the package writer work at paper "
        "size and what a recipe of this bits/weight costs in MiB.",
        "",
        f"CPU (`{r['machine']['platform']}`, {r['machine']['torch_threads']} torch threads), coremltools "
        f"{r['versions']['coremltools']}. {r['parameters'] / 1e6:.1f}M parameters, "
        f"{r['palettizable_weights'] / 1e6:.1f}M of them palettizable. Tables: `uniform` (evenly spaced; same bytes "
        "as k-means tables, which take about an hour per width on this CPU). Sensitivity: one UNet call at "
        f"{r['resolution']}² ({r['resolution'] // 8}² latent), output PSNR vs fp32, per layer group (first "
        f"{r['group_depth']} parts of the parameter name: {r['units']} groups); bar {r['bar_db']} dB; "
        f"{s['evaluations']} UNet calls, search {r['search_seconds'] / 60:.1f} min in all.",
        "",
        "| UNet variant | bits/weight | size (MiB) | vs 210 MiB target | UNet output PSNR |",
        "|---|---|---|---|---|",
    ]
    for key, bits in (("fp16", 16), ("palettize6", 6), ("palettize4", 4), ("mixed", r["mixed_average_bits_per_weight"])):
        psnr_value = f"{s['measured_psnr_db']} dB" if key == "mixed" else "see coreml_paper_size.md"
        lines.append(f"| `{key}` | {_fmt(float(bits))} | {sizes[key]:.1f} | {sizes[key] - r['target_size_mib']:+.1f} | "
                     f"{psnr_value} |")
    lines += ["", f"fp16/6-bit/4-bit sizes: benchmarks/results/coreml_paper_size.md (same UNet, same seed). "
              f"Mixed recipe measured at {s['measured_psnr_db']} dB (bar {r['bar_db']} dB, meets: "
              f"{'yes' if s['meets_bar'] else 'no'}).", "", "Widths chosen per group:", "",
              "| group | bits | PSNR with only this group at 2 / 4 / 6 bits |", "|---|---|---|"]
    for unit, bits in r["unit_bits"].items():
        sens = s["sensitivity_db"][unit]
        lines.append(f"| `{unit}` | {bits} | {' / '.join(str(sens[str(b)]) for b in sorted(map(int, sens)))} dB |")
    return "\n".join(lines) + "\n"


def _tag(value: str) -> str:
    if not value or not all(c.isalnum() or c in "-." for c in value):
        raise argparse.ArgumentTypeError(f"must be letters, digits, '-' or '.', got {value!r}")
    return value


def _stem(args) -> str:
    stem = f"coreml_mixed_bit_{args.model}" + (f"_{args.tag}" if getattr(args, "tag", None) else "")
    if args.target_bits is None:
        return stem
    return f"{stem}_{args.target_bits:g}bit_{''.join(map(str, args.bits))}"  # e.g. ..._4.5bit_3468: size, widths


def check_default_inputs(args):
    """``(search_set, report_set, classifier)`` of the ``default`` run; ValueError naming the flag at fault."""
    search_set, report_set = eval_pairs(args.search_pairs, args.report_pairs, args.eval_prompts)
    classifier = None if args.classifier is None else load_eval_classifier(
        args.classifier, [p for p, _, _ in search_set + report_set])
    return search_set, report_set, classifier


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "paper" and args.group_depth is None:
        args.group_depth = 4
    if args.model == "paper" and (args.target_bits is not None or args.sensitivities_from is not None):
        print("coreml_mixed_bit.py: error: --target-bits and --sensitivities-from apply to the default model only.",
              file=sys.stderr)
        return 2
    name = _stem(args)
    if args.render_only:
        result = json.loads((args.out / f"{name}.json").read_text())
    elif args.model == "default":
        try:
            inputs = check_default_inputs(args)
        except ValueError as err:
            print(f"coreml_mixed_bit.py: error: {err}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_default(args, *inputs)
    else:
        if args.classifier is not None or args.eval_prompts != EVAL_PROMPTS:
            print("coreml_mixed_bit.py: error: --eval-prompts and --classifier apply to the default model only.",
                  file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_paper(args)
    write_atomically(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    render = markdown_default if args.model == "default" else markdown_paper
    write_atomically(args.out / f"{name}.md", render(result))
    print(f"wrote {args.out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
