"""Params and FLOPs of the SnapGen UNet design steps (paper Fig. 2 / Fig. 3) next to the paper's relative changes.

FLOPs are counted with ``torch.utils.flop_counter`` for one forward pass at a 128x128 latent (a 1024² image), on
the ``meta`` device, so no memory or accelerator is needed. ``--latency`` also times each variant (bf16, batch 1,
channels-last) on the given device, eager and as one replayed CUDA graph of the eager forward (``eager+graph``:
kernel time without launch overhead); ``--latency-modes`` adds ``compiled``/``regional``. The paper's latency is
iPhone 15 Pro's and is shown for direction only.

    python benchmarks/ablation_table.py [--out benchmarks/results] [--latency --device cuda] [--variants e,f]
    python benchmarks/ablation_table.py --smoke --latency                  # CPU, narrow widths, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attempt, cuda_graph, device_name, markdown_table, time_ms, write_results  # noqa: E402

from diffusers_snapgen import SnapGenUNet2DModel  # noqa: E402
from diffusers_snapgen.models.unet_variants import ablation_variants  # noqa: E402

#: --smoke: every variant at narrow widths (same structure, tiny cost).
SMOKE_WIDTHS = dict(block_out_channels=(32, 64, 96), attention_head_dim=16, cross_attention_dim=32,
                    joint_attention_dim=32, pooled_projection_dim=16, norm_num_groups=8)
LATENCY_MODES = ("eager", "eager+graph", "compiled", "regional")


def _inputs(device, dtype, latent, text_tokens, config=None, batch=1):
    config = config or {}
    return dict(
        sample=torch.randn(batch, 16, latent, latent, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500.0, device=device),
        encoder_hidden_states=torch.randn(batch, text_tokens, config.get("joint_attention_dim", 4096), device=device,
                                          dtype=dtype),
        pooled_projections=torch.randn(batch, config.get("pooled_projection_dim", 2048), device=device, dtype=dtype),
    )


def count(config: dict, latent: int, text_tokens: int) -> tuple[int, int]:
    with torch.device("meta"):
        model = SnapGenUNet2DModel(**config)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**_inputs("meta", torch.float32, latent, text_tokens, config))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def latency(config: dict, latent: int, text_tokens: int, device: torch.device, mode: str = "eager",
            dtype: torch.dtype = torch.bfloat16, iters: int = 10, compile_backend: str = "inductor") -> float:
    """Median ms of one forward of a fresh ``config`` model (batch 1, channels-last) in ``mode``."""
    with torch.device(device):
        model = SnapGenUNet2DModel(**config)
    model = model.to(dtype=dtype, memory_format=torch.channels_last).eval()
    inputs = _inputs(device, dtype, latent, text_tokens, config)
    inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    call = model
    if mode in ("compiled", "regional"):
        torch._dynamo.reset()  # variants share block code: start each one's compile cache empty
    if mode == "compiled":
        call = torch.compile(model, fullgraph=True, backend=compile_backend)
    elif mode == "regional":
        model.compile_repeated_blocks(fullgraph=True, backend=compile_backend)
    with torch.no_grad():
        fn = lambda: call(**inputs)  # noqa: E731
        fn()
        if mode != "eager" and device.type == "cuda":
            fn, _ = cuda_graph(fn, device)
        return time_ms(fn, device, warmup=2 if device.type == "cuda" else 0, iters=iters)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="narrow widths, 16x16 latent, CPU float32")
    parser.add_argument("--latent", type=int, default=None, help="latent size (128 = 1024² image)")
    parser.add_argument("--text-tokens", type=int, default=None, help="CLIP 77 + T5 256 tokens, as SD3.5")
    parser.add_argument("--variants", default=None, help="comma-separated subset of a,b,c,d,e1,e,f")
    parser.add_argument("--latency", action="store_true", help="also time each variant on --device")
    parser.add_argument("--latency-modes", default="eager,eager+graph", help=f"subset of {LATENCY_MODES}")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    smoke = args.smoke
    latent = args.latent or (16 if smoke else 128)
    text_tokens = args.text_tokens or (8 if smoke else 333)
    if latent <= 0 or latent % 4:
        parser.error(f"--latent must be a positive multiple of 4, got {latent}")
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    modes = args.latency_modes.split(",")
    if set(modes) - set(LATENCY_MODES):
        parser.error(f"--latency-modes must be a subset of {LATENCY_MODES}, got {modes}")
    variants = ablation_variants()
    keys = args.variants.split(",") if args.variants else list(variants)
    if set(keys) - set(variants):
        parser.error(f"--variants must be a subset of {list(variants)}, got {keys}")
    widths = SMOKE_WIDTHS if smoke else {}

    rows, previous = [], None
    for key in keys:
        variant = variants[key]
        config = {**variant["config"], **widths}
        params, flops = count(config, latent, text_tokens)
        row = dict(variant=key, step=variant["description"], params_m=params / 1e6, gflops=flops / 1e9)
        if args.latency:
            for mode in modes:
                timing = attempt({}, lambda: {"ms": latency(config, latent, text_tokens, device, mode, dtype,
                                                            compile_backend="eager" if smoke else "inductor")})
                row[_ms_column(mode)] = timing.get("ms", timing.get("error"))
        if previous is not None:
            row["d_params"] = f"{params / previous['params'] - 1:+.1%}"
            row["d_flops"] = f"{flops / previous['flops'] - 1:+.1%}"
            for mode in modes if args.latency else ():
                now, before = row.get(_ms_column(mode)), previous.get(_ms_column(mode))
                if isinstance(now, float) and isinstance(before, float):
                    row[f"d_{_ms_column(mode)}"] = f"{now / before - 1:+.1%}"
        paper = variant["paper_change"]
        for metric in ("params", "flops", "latency"):
            if metric in paper:
                row[f"paper_d_{metric}"] = f"{paper[metric]:+.0%}"
        previous = dict(row, params=params, flops=flops)
        rows.append(row)
        print(row, flush=True)

    columns = ["variant", "step", "params_m", "d_params", "paper_d_params", "gflops", "d_flops", "paper_d_flops"]
    if args.latency:
        for mode in modes:
            columns += [_ms_column(mode), f"d_{_ms_column(mode)}"]
        columns.append("paper_d_latency")
    title = (
        f"# SnapGen UNet ablation (paper Fig. 2/3) — FLOPs at a {latent}x{latent} latent, {text_tokens} text tokens"
        + (f"; latency on {device_name(device)}, {str(dtype).replace('torch.', '')}, batch 1" if args.latency else "")
        + (" (smoke: narrow widths)" if smoke else "")
    )
    notes = (
        "\n\nChanges are against the previous row. `e1` is the multi-query half of step (e) alone. Step (e)'s "
        "first-stage conditioning adds one CA+FFN transformer block after each stage-1 residual block (the "
        "concrete config, see docs/model_format.md); the paper replaces those residual blocks, which it reports as "
        "smaller and faster, so here that half adds FLOPs instead. Latency columns: `ms_eager` plain PyTorch; "
        "`ms_eager_graph` the same kernels replayed as one CUDA graph (no launch overhead); `ms_compiled` "
        "`torch.compile` + CUDA graph; `ms_regional` `compile_repeated_blocks` + CUDA graph."
    )
    table = title + "\n\n" + markdown_table(rows, columns) + notes
    print(table)
    if args.out is not None:
        stem = "ablation_table" + (f"_{device.type}" if args.latency else "")
        write_results(args.out, stem, dict(latent=latent, text_tokens=text_tokens, rows=rows), table)


def _ms_column(mode: str) -> str:
    return "ms_" + mode.replace("+", "_")


if __name__ == "__main__":
    main()
