"""Params and FLOPs of the SnapGen UNet design steps (paper Fig. 2 / Fig. 3) next to the paper's relative changes.

FLOPs are counted with ``torch.utils.flop_counter`` for one forward pass at a 128x128 latent (a 1024² image), on
the ``meta`` device, so no memory or accelerator is needed. ``--latency`` also times each variant (bf16, batch 1)
on the given device; the paper's latency is iPhone 15 Pro's and is shown for direction only.

    python benchmarks/ablation_table.py [--out benchmarks/results] [--latency --device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, markdown_table, time_ms, write_results  # noqa: E402

from diffusers_snapgen import SnapGenUNet2DModel  # noqa: E402
from diffusers_snapgen.models.unet_variants import ablation_variants  # noqa: E402


def _inputs(device, dtype, latent, text_tokens):
    return dict(
        sample=torch.randn(1, 16, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, text_tokens, 4096, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, 2048, device=device, dtype=dtype),
    )


def count(config: dict, latent: int, text_tokens: int) -> tuple[int, int]:
    with torch.device("meta"):
        model = SnapGenUNet2DModel(**config)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**_inputs("meta", torch.float32, latent, text_tokens))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def latency(config: dict, latent: int, text_tokens: int, device: torch.device) -> float:
    model = SnapGenUNet2DModel(**config).to(device=device, dtype=torch.bfloat16).eval()
    inputs = _inputs(device, torch.bfloat16, latent, text_tokens)
    with torch.inference_mode():
        return time_ms(lambda: model(**inputs), device, warmup=3, iters=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--latent", type=int, default=128, help="latent size (128 = 1024² image)")
    parser.add_argument("--text-tokens", type=int, default=333, help="CLIP 77 + T5 256 tokens, as SD3.5")
    parser.add_argument("--latency", action="store_true", help="also time each variant on --device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.latent <= 0 or args.latent % 4:
        parser.error(f"--latent must be a positive multiple of 4, got {args.latent}")
    device = torch.device(args.device)

    rows, previous = [], None
    for key, variant in ablation_variants().items():
        params, flops = count(variant["config"], args.latent, args.text_tokens)
        row = dict(variant=key, step=variant["description"], params_m=params / 1e6, gflops=flops / 1e9)
        if args.latency:
            row["ms"] = latency(variant["config"], args.latent, args.text_tokens, device)
        if previous is not None:
            row["d_params"] = f"{params / previous['params'] - 1:+.1%}"
            row["d_flops"] = f"{flops / previous['flops'] - 1:+.1%}"
            if args.latency:
                row["d_ms"] = f"{row['ms'] / previous['ms'] - 1:+.1%}"
        paper = variant["paper_change"]
        for metric in ("params", "flops", "latency"):
            if metric in paper:
                row[f"paper_d_{metric}"] = f"{paper[metric]:+.0%}"
        previous = dict(params=params, flops=flops, ms=row.get("ms"))
        rows.append(row)
        print(row, flush=True)

    columns = ["variant", "step", "params_m", "d_params", "paper_d_params", "gflops", "d_flops", "paper_d_flops"]
    if args.latency:
        columns += ["ms", "d_ms", "paper_d_latency"]
    title = (
        f"# SnapGen UNet ablation (paper Fig. 2/3) — FLOPs at a {args.latent}x{args.latent} latent, "
        f"{args.text_tokens} text tokens"
        + (f"; latency on {device_name(device)}, bf16, batch 1" if args.latency else "")
    )
    notes = (
        "\n\nChanges are against the previous row. `e1` is the multi-query half of step (e) alone. Step (e)'s "
        "first-stage conditioning adds one CA+FFN transformer block after each stage-1 residual block (the "
        "concrete config, docs/design.md, UNet); the paper replaces those residual blocks, which it reports as smaller "
        "and faster, so here that half adds FLOPs instead."
    )
    table = title + "\n\n" + markdown_table(rows, columns) + notes
    print(table)
    if args.out is not None:
        stem = "ablation_table" + (f"_{device.type}" if args.latency else "")
        write_results(args.out, stem, dict(latent=args.latent, text_tokens=args.text_tokens, rows=rows), table)


if __name__ == "__main__":
    main()
