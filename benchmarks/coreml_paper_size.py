#!/usr/bin/env python
"""Paper-size Core ML export benchmark (CPU; random weights are fine for structure and size).

Converts the paper-configuration SnapGen UNet (~379M parameters, 128x128 latent = 1024² image) and TinyDecoder
(~1.4M parameters) to Core ML for one deployment target, compresses the UNet to each variant, and records package
sizes, op counts, structure checks and timings in ``benchmarks/results/coreml_paper_size.{json,md}``.

    python benchmarks/coreml_paper_size.py [--resolution 1024] [--target iOS18] [--palettize-mode uniform]

Sizes do not depend on the look-up-table values, so ``--palettize-mode uniform`` (the default here) measures the
exact package size of k-means palettization without hours of CPU k-means on 379M weights; the k-means time is
measured on a sample of the UNet's weight tensors and extrapolated (reported as such). ``--validate`` adds the
PyTorch PSNR checks (several fp32 forwards of the full UNet at 128², slow on a laptop CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_snapgen import SnapGenUNet2DModel, TinyDecoder
from diffusers_snapgen.coreml.components import decoder_component, unet_component
from diffusers_snapgen.coreml.export import _versions, export_components

RESULTS = Path(__file__).resolve().parent / "results"


def kmeans_time_estimate(unet_component_, nbits: int, group_size: int, sample: int, seed: int = 0) -> dict:
    """Time coremltools' k-means on ``sample`` random weight tensors of the UNet and scale by element count."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig

    params = [(n, p) for n, p in unet_component_.module.named_parameters() if p.ndim >= 2 and p.numel() > 2048]
    rng = np.random.default_rng(seed)
    chosen = [params[i] for i in rng.choice(len(params), size=min(sample, len(params)), replace=False)]
    total = sum(p.numel() for _, p in params)
    seconds = 0.0
    for _, weight in chosen:
        w = weight.detach().float().numpy().reshape(weight.shape[0], -1)

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                self.linear.weight.data = torch.from_numpy(w.copy())

            def forward(self, x):
                return self.linear(x)

        model = ct.convert(torch.jit.trace(One().eval(), torch.zeros(1, w.shape[1])),
                           inputs=[ct.TensorType(shape=(1, w.shape[1]))], convert_to="mlprogram",
                           minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
        granularity = "per_grouped_channel" if w.shape[0] % group_size == 0 else "per_tensor"
        config = OptimizationConfig(global_config=OpPalettizerConfig(
            mode="kmeans", nbits=nbits, granularity=granularity, group_size=group_size, weight_threshold=2048))
        start = time.perf_counter()
        ct.optimize.coreml.palettize_weights(model, config)
        seconds += time.perf_counter() - start
    sampled = sum(p.numel() for _, p in chosen)
    return {"nbits": nbits, "sampled_tensors": len(chosen), "sampled_elements": sampled,
            "sample_seconds": round(seconds, 1), "estimated_total_seconds": round(seconds * total / sampled, 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--target", default="iOS18", choices=("iOS17", "iOS18"))
    parser.add_argument("--variants", default="fp16,palettize8,palettize6,palettize4")
    parser.add_argument("--palettize-mode", default="uniform", choices=("uniform", "kmeans"))
    parser.add_argument("--kmeans-sample", type=int, default=3, help="tensors timed for the k-means estimate (0: skip)")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "coreml_paper_size"))
    parser.add_argument("--render-only", action="store_true", help="rewrite OUTPUT.md from OUTPUT.json")
    args = parser.parse_args(argv)
    if args.render_only:
        out = Path(args.output)
        out.with_suffix(".md").write_text(_markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = SnapGenUNet2DModel().eval()
    decoder = TinyDecoder().eval()
    latent = args.resolution // 8
    components = [unet_component(unet, latent), decoder_component(decoder, latent)]
    print(f"built models in {time.perf_counter() - start:.1f}s: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M"
          f", decoder {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M parameters", flush=True)
    with tempfile.TemporaryDirectory(prefix="snapgen-coreml-bench-") as tmp:
        start = time.perf_counter()
        report = export_components(components, Path(tmp) / "packages", args.target, args.variants.split(","),
                                   validate=args.validate, palettize_mode=args.palettize_mode,
                                   progress=lambda m: print(m, flush=True))
        total_seconds = time.perf_counter() - start
    kmeans = []
    if args.kmeans_sample > 0:
        for variant in args.variants.split(","):
            if variant.startswith("palettize"):
                kmeans.append(kmeans_time_estimate(components[0], int(variant[len("palettize"):]), 16,
                                                   args.kmeans_sample))
                print(f"k-means estimate: {kmeans[-1]}", flush=True)
    result = {
        "benchmark": "coreml_paper_size",
        "resolution": args.resolution,
        "latent_size": latent,
        "target": args.target,
        "palettize_mode_for_sizes": args.palettize_mode,
        "validated": args.validate,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        "total_seconds": round(total_seconds, 1),
        "kmeans_time_estimates": kmeans,
        **report,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def _markdown(result: dict) -> str:
    lines = [
        f"# Core ML export of the paper-size SnapGen ({result['resolution']}², {result['target']})",
        "",
        f"Random weights; CPU conversion on `{result['machine']['platform']}` "
        f"({result['machine']['torch_threads']} torch threads); coremltools {result['versions']['coremltools']}, "
        f"torch {result['versions']['torch']}. Palettized sizes measured with `{result['palettize_mode_for_sizes']}` "
        "look-up tables (same bytes as k-means tables of the same bits and granularity).",
        "",
        "| component | parameters | conversion | route | ops (non-const) | SDPA | `tile` | structure | ANE form PSNR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in result["components"].items():
        ops = c["op_counts"]
        ane = c.get("ane_form_psnr_db")
        lines.append(f"| {c['package']} | {c['parameters'] / 1e6:.2f}M | {c['conversion_seconds']:.0f}s | {c['route']} | "
                     f"{sum(ops.values())} | {ops.get('scaled_dot_product_attention', 0)} | {ops.get('tile', 0)} | "
                     f"{'ok' if c['structure']['passed'] else 'FAIL'} | {'—' if ane is None else ('same module' if ane == 'inf' else f'{ane} dB')} |")
    lines += ["", "PSNR: the variant's weights decompressed back into PyTorch vs the fp32 model, same inputs "
              f"(Apple's bar 35 dB; palettized with `{result['palettize_mode_for_sizes']}` tables here, random weights).",
              "", "| variant | component | size (MiB) | palettized tensors | compression time | PSNR |",
              "|---|---|---|---|---|---|"]
    for variant, data in result["variants"].items():
        for name, entry in data["components"].items():
            comp = entry["compression"]
            value = entry.get("psnr_db")
            lines.append(f"| {variant} | {result['components'][name]['package']} | {entry['size_bytes'] / 2**20:.1f} | "
                         f"{comp.get('palettized_tensors', '—')} | {comp.get('seconds', '—')} | "
                         f"{'—' if value is None else f'{value} dB'} |")
    lines += ["", "Op counts of the UNet:", "", "| op | count |", "|---|---|"]
    for op, count in result["components"]["unet"]["op_counts"].items():
        lines.append(f"| `{op}` | {count} |")
    if result["kmeans_time_estimates"]:
        lines += ["", "k-means palettization time (sampled tensors, extrapolated by element count):", "",
                  "| bits | sampled tensors | sample time | estimated full UNet |", "|---|---|---|---|"]
        for k in result["kmeans_time_estimates"]:
            lines.append(f"| {k['nbits']} | {k['sampled_tensors']} | {k['sample_seconds']}s | "
                         f"~{k['estimated_total_seconds'] / 60:.0f} min |")
    lines.append(f"\nTotal export time (conversion + compression + saving): {result['total_seconds'] / 60:.1f} min.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
