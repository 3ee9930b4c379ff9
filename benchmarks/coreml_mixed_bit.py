#!/usr/bin/env python
"""Mixed-bit Core ML palettization: search a recipe, export every variant, measure image-level quality (CPU).

    python benchmarks/coreml_mixed_bit.py default   # embedded default model, trained weights
    python benchmarks/coreml_mixed_bit.py paper     # paper-size UNet, random weights (structural check)

``default`` searches a recipe for the embedded default model (UNet + MiniLM text encoder, k-means tables, the full
4-step sampling on prompts and seeds of its evaluation, benchmarks/results/eval_quality.json), then exports fp16,
6-bit, 4-bit and the mixed recipe and measures each variant end to end on *other* prompt/seed pairs of that
evaluation. Writes ``coreml_mixed_bit_default.{md,json}`` and the recipe ``coreml_mixed_bit_default_recipe.json``.

``paper`` builds the paper-size UNet (random weights), converts it once at a low resolution (weights do not depend
on it), palettizes it with evenly spaced tables (``uniform``: same bytes as k-means, which takes about an hour per
width on two cores), measures sensitivity per layer group on one UNet call and saves the mixed package to measure
its size. Writes ``coreml_mixed_bit_paper.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_PROMPTS = RESULTS / "eval_quality.json"


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
                        "group (seen, heldout) the search samples (8)")
    parser.add_argument("--report-pairs", type=_positive, default=24, help="default: other pairs per group the "
                        "variants are measured on (24)")
    parser.add_argument("--resolution", type=_positive, default=256, help="paper: conversion/search image side (256)")
    parser.add_argument("--group-depth", type=_positive, default=None,
                        help="name parts that form one unit (paper: 4 by default; default model: one unit per layer)")
    parser.add_argument("--search-components", default="unet,text", help="default: packages the search covers")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (benchmarks/results)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    return parser.parse_args(argv)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}


def eval_pairs(search_pairs: int, report_pairs: int):
    """Search and report prompt/seed pairs from the default model's evaluation, disjoint (different seeds)."""
    entries = json.loads(EVAL_PROMPTS.read_text())["prompts"]
    search, report = [], []
    for group in ("seen", "heldout"):
        rows = [(e["prompt"], int(e["seed"])) for e in entries if e["group"] == group]
        search += rows[0:2 * search_pairs:2]
        rest = [r for r in rows if r not in search]
        report += rest[:report_pairs]
    return search, report


def run_default(args) -> dict:
    from diffusers_snapgen import load_default_pipeline
    from diffusers_snapgen.coreml.export import _versions, export_pipeline
    from diffusers_snapgen.coreml.mixed_bit import search_mixed_bit

    say = lambda m: print(m, flush=True)  # noqa: E731
    pipe = load_default_pipeline()
    resolution = pipe.default_sample_size * pipe.vae_scale_factor
    search_set, report_set = eval_pairs(args.search_pairs, args.report_pairs)
    recipe_path = args.out / "coreml_mixed_bit_default_recipe.json"
    start = time.perf_counter()
    recipe, search = search_mixed_bit(pipe, recipe_path, bar_db=args.bar, bits=args.bits, resolution=resolution,
                                      prompts=[p for p, _ in search_set], seeds=[s for _, s in search_set],
                                      components=args.search_components.split(","), group_depth=args.group_depth,
                                      progress=say)
    search_seconds = time.perf_counter() - start
    curve = []
    for bar in sorted({30.0, 33.0, args.bar, 38.0, 40.0}):
        other = search.recipe(bar)
        curve.append({k: other.metadata[k] for k in ("bar_db", "measured_psnr_db", "meets_bar",
                                                      "average_bits_per_weight", "component_bits")})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snapgen-mixed-bit-") as tmp:
        manifest = export_pipeline(pipe, Path(tmp) / "export", resolution=resolution,
                                   variants=["fp16", "palettize6", "palettize4", f"mixed:{recipe_path}"],
                                   quality_prompts=[p for p, _ in report_set],
                                   quality_seeds=[s for _, s in report_set], progress=say)
    export_seconds = time.perf_counter() - start
    variants = {}
    for key, data in manifest["variants"].items():
        variants[key] = {
            "size_bytes": data["size_bytes"],
            "average_bits_per_weight": data["average_bits_per_weight"],
            "unet_average_bits_per_weight": data.get("unet_average_bits_per_weight"),
            "end_to_end": data["end_to_end"],
            "components": {name: {"size_bytes": c["size_bytes"], "psnr_db": c.get("psnr_db"),
                                  "average_bits_per_weight": c["compression"].get("average_bits_per_weight", 16.0
                                                                                   if name != "decoder" else None)}
                           for name, c in data["components"].items()},
        }
    return {
        "benchmark": "coreml_mixed_bit_default",
        "model": "embedded default model (trained weights)",
        "resolution": resolution,
        "target": manifest["deployment_target"],
        "machine": _machine(),
        "versions": _versions(),
        "bar_db": args.bar,
        "bits_offered": list(args.bits),
        "search_components": args.search_components.split(","),
        "group_depth": args.group_depth,
        "search": {k: v for k, v in recipe.metadata.items() if k not in ("sensitivity_db", "quality", "groups")},
        "search_pairs": search_set,
        "report_pairs": report_set,
        "search_seconds": round(search_seconds, 1),
        "export_seconds": round(export_seconds, 1),
        "bar_curve": curve,
        "variants": variants,
        "classifier_top1": "not measured (no trained emoji classifier is available offline)",
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


def markdown_default(r: dict) -> str:
    lines = [
        f"# Mixed-bit Core ML palettization of the embedded default model ({r['resolution']}², {r['target']})",
        "",
        f"Trained weights; CPU (`{r['machine']['platform']}`, {r['machine']['torch_threads']} torch threads), "
        f"coremltools {r['versions']['coremltools']}, torch {r['versions']['torch']}. Quality is measured in "
        "PyTorch with each variant's weights decompressed from its Core ML packages (no Core ML runtime on Linux): "
        f"the full {r['variants']['fp16']['end_to_end']['num_inference_steps']}-step sampling (MiniLM text encoder "
        "-> UNet -> TinyDecoder) against the fp32 pipeline, same prompts and initial noise.",
        "",
        f"Search: k-means tables of {', '.join(map(str, r['bits_offered']))} bits per layer, bar "
        f"{r['bar_db']} dB end-to-end image PSNR on {len(r['search_pairs'])} prompt/seed pairs of the model's "
        f"evaluation (benchmarks/results/eval_quality.json), over the {', '.join(r['search_components'])} "
        f"package(s) ({_units(r)}); {r['search']['evaluations']} pipeline runs, "
        f"{r['search_seconds'] / 60:.1f} min. Packages the search does not cover stay fp16 in `mixed`. Recipe: "
        f"`{r['recipe_file']}` (measured {r['search']['measured_psnr_db']} dB on the search pairs). The variants "
        f"below are measured on {len(r['report_pairs'])} *other* pairs (other seeds).",
        "",
        "| variant | bits/weight (all) | UNet bits/weight | size (MiB) | UNet MiB | text MiB | UNet PSNR | text PSNR "
        "| end-to-end image PSNR | worst image | nearest-reference agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in r["variants"].items():
        c = v["components"]
        e = v["end_to_end"]
        lines.append(
            f"| `{key}` | {_fmt(v['average_bits_per_weight'])} | {_fmt(v['unet_average_bits_per_weight'])} | "
            f"{v['size_bytes'] / 2**20:.2f} | {c['unet']['size_bytes'] / 2**20:.2f} | "
            f"{c['text_encoder']['size_bytes'] / 2**20:.2f} | {c['unet']['psnr_db']} dB | "
            f"{c['text_encoder']['psnr_db']} dB | **{e['image_psnr_db']} dB** | {e['worst_image_psnr_db']} dB | "
            f"{e['nearest_reference_agreement'] * 100:.1f}% |")
    lines += [
        "",
        "Bits/weight: over the weights palettization applies to (matrices and convolutions above 2048 elements; "
        "fp16 counts 16; look-up tables not counted). UNet/text PSNR: one package's output vs fp32 on the "
        "export's validation inputs (Apple's 35 dB bar). End-to-end image PSNR: images in [0, 1], peak 1, squared "
        "error pooled over all images. Nearest-reference agreement: share of images whose nearest fp32 image "
        "(pixel L2, over all pairs) is the one of the same prompt and seed. Classifier top-1: "
        f"{r['classifier_top1']}. The decoder stays fp16 in every variant.",
        "",
        "Same measurements under other bars (search pairs):",
        "",
        "| bar | measured | meets | bits/weight (all) | UNet | text encoder |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["bar_curve"]:
        comp = row["component_bits"]
        lines.append(f"| {row['bar_db']} dB | {row['measured_psnr_db']} dB | {'yes' if row['meets_bar'] else 'no'} | "
                     f"{_fmt(row['average_bits_per_weight'])} | {_fmt(comp.get('unet'))} | "
                     f"{_fmt(comp.get('text_encoder'))} |")
    lines.append(f"\nExport of the four variants with their checks: {r['export_seconds'] / 60:.1f} min.\n")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "paper" and args.group_depth is None:
        args.group_depth = 4
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"coreml_mixed_bit_{args.model}"
    if args.render_only:
        result = json.loads((args.out / f"{name}.json").read_text())
    else:
        result = run_default(args) if args.model == "default" else run_paper(args)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    render = markdown_default if args.model == "default" else markdown_paper
    (args.out / f"{name}.md").write_text(render(result))
    print(f"wrote {args.out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
