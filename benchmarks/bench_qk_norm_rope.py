#!/usr/bin/env python
"""QK-norm + RoPE of the paper-size UNet: the fused kernel against the plain PyTorch ops, per call and per forward.

One eager forward of the paper-size UNet (random weights, batch ``--batch``, 1024², 333 text tokens) records the
shape of every tensor the attentions normalise and rotate (``models/qk_norm_rope.py``); each distinct shape is then
timed both ways, in the model's dtype:

- *eager*: wall time of ``--iters`` back-to-back calls divided by their number, the host's dispatch included;
- *kernels*: the same calls replayed as one CUDA graph, divided by their number (GPU time only).

The per-forward totals multiply each shape's time by its calls per forward. ``--forward_rounds N`` also times whole
forwards of ablation variants (e) and (f), and (f) with the kernel switched off, in ``N`` interleaved rounds (one
forward of each per round, each round starting with the next variant, synchronised, median per variant: eager
timings of a host-bound step drift between minutes, so they are only compared within rounds), plus each as a
replayed CUDA graph. ``--smoke`` runs narrow widths on the CPU, where the "fused" columns time the plain ops too (no
kernel there). ``--stand_in_kernel`` replaces the kernel in the whole forwards by one ``torch.empty_like`` on any
device (timing only, the outputs are garbage): what (f) would cost if a launch were as cheap as one PyTorch op.

    python benchmarks/bench_qk_norm_rope.py [--batch 1] [--forward_rounds 30] [--out benchmarks/results] [--tag h100]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_table import SMOKE_WIDTHS, _inputs  # noqa: E402
from bench_host_overhead import SNAPGEN_NARROW  # noqa: E402
from common import cuda_graph, device_name, markdown_table, synchronize, time_ms, write_results  # noqa: E402

from diffusers_snapgen import SnapGenUNet2DModel  # noqa: E402
from diffusers_snapgen.models import attention as attention_module  # noqa: E402
from diffusers_snapgen.models import qk_norm_rope  # noqa: E402
from diffusers_snapgen.models.unet_variants import ablation_variants  # noqa: E402

#: The row of variant (f) with the fused kernel switched off.
PLAIN_F = "f_plain_ops"
PAPER = dict(sample_size=128)  # the paper config is the model's default


def record_calls(unet, batch: int, latent: int, text_tokens: int, device, dtype) -> tuple[collections.Counter, dict]:
    """Calls per ``(shape, contiguous)`` one forward makes to ``rms_norm_rotary``, and one call's arguments each."""
    calls, examples, original = collections.Counter(), {}, attention_module.rms_norm_rotary

    def recording(x, norm, rotary):
        if norm is not None and rotary is not None:
            key = tuple(x.shape), x.is_contiguous()
            calls[key] += 1
            examples.setdefault(key, (x.clone(), norm, rotary))
        return original(x, norm, rotary)

    inputs = _inputs(device, dtype, latent, text_tokens, dict(unet.config), batch=batch)
    attention_module.rms_norm_rotary = recording
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        attention_module.rms_norm_rotary = original
    return calls, examples


def per_call_us(fn, device, iters: int) -> tuple[float, float | None]:
    """(eager wall µs per call over ``iters`` back-to-back calls, CUDA-graph µs per call or None on the CPU)."""
    def many():
        for _ in range(iters):
            fn()

    many()
    synchronize(device)
    start = time.perf_counter()
    many()
    synchronize(device)
    eager = (time.perf_counter() - start) / iters * 1e6
    if device.type != "cuda":
        return eager, None
    replay, _ = cuda_graph(many, device)
    replay()
    synchronize(device)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    replay()
    end_event.record()
    synchronize(device)
    return eager, start_event.elapsed_time(end_event) / iters * 1e3


def forward_ab(rounds: int, batch: int, latent: int, tokens: int, smoke: bool, device, dtype,
               stand_in: bool = False) -> list[dict]:
    """Eager forwards of variants (e), (f) and (f) with plain QK-norm + RoPE ops, interleaved; then CUDA graphs."""
    if stand_in:  # the kernel's call becomes one op; the device check and the wrapper's checks stay
        qk_norm_rope._KERNEL_DEVICE_TYPES = (device.type,)
        qk_norm_rope._triton_available = lambda: True
        qk_norm_rope._fused_rms_norm_rotary = lambda x, weight, cos, sin, eps: torch.empty_like(x)
    variants = ablation_variants()
    models, cases = {}, [("e", "e", True), ("f", "f", True), (PLAIN_F, "f", False)]
    for key in ("e", "f"):
        config = {**variants[key]["config"], **(SMOKE_WIDTHS if smoke else {})}
        with torch.device(device):
            models[key] = SnapGenUNet2DModel(**config)
        models[key] = models[key].to(dtype=dtype, memory_format=torch.channels_last).eval()
    config = {**variants["f"]["config"], **(SMOKE_WIDTHS if smoke else {})}
    inputs = _inputs(device, dtype, latent, tokens, config, batch=batch)
    inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    samples = collections.defaultdict(list)

    def forward(key, fused):
        previous = qk_norm_rope.set_fused_qk_norm_rope(fused)
        try:
            return models[key](**inputs)
        finally:
            qk_norm_rope.set_fused_qk_norm_rope(previous)

    with torch.no_grad():
        for _ in range(2):  # warm-up: the kernel's compilation, cuDNN's and cuBLAS's first calls
            for _, key, fused in cases:
                forward(key, fused)
        for round_index in range(rounds):  # each round starts with another variant: no fixed order effect
            shift = round_index % len(cases)
            for name, key, fused in cases[shift:] + cases[:shift]:
                synchronize(device)
                start = time.perf_counter()
                forward(key, fused)
                synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
        rows = [dict(variant=name, eager_ms=round(statistics.median(samples[name]), 3)) for name, _, _ in cases]
        if device.type == "cuda":
            for row, (_, key, fused) in zip(rows, cases):
                replay, _ = cuda_graph(lambda: forward(key, fused), device)
                row["graph_ms"] = round(time_ms(replay, device, warmup=3, iters=20), 3)
    base = rows[0]
    for row in rows:
        row["eager_vs_e_pct"] = round(100 * (row["eager_ms"] / base["eager_ms"] - 1), 1)
        if "graph_ms" in row:
            row["graph_vs_e_pct"] = round(100 * (row["graph_ms"] / base["graph_ms"] - 1), 1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--forward_rounds", type=int, default=0,
                        help="also time whole eager forwards of variants (e), (f) and (f) without the kernel, "
                        "interleaved over this many rounds")
    parser.add_argument("--smoke", action="store_true", help="narrow widths, 16x16 latent, CPU float32")
    parser.add_argument("--stand_in_kernel", action="store_true",
                        help="whole forwards only: the kernel replaced by one empty_like op (timing only)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tag", default=None, help="suffix of the result files (e.g. the GPU)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.forward_rounds < 0:
        parser.error("--batch and --iters must be positive, --forward_rounds not negative")
    if args.stand_in_kernel and not args.forward_rounds:
        parser.error("--stand_in_kernel times whole forwards: give --forward_rounds")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    latent, tokens = (16, 8) if args.smoke else (128, 333)

    with torch.device(device):
        unet = SnapGenUNet2DModel(**(SNAPGEN_NARROW if args.smoke else PAPER))
    unet = unet.to(dtype=dtype, memory_format=torch.channels_last).eval()
    calls, examples = record_calls(unet, args.batch, latent, tokens, device, dtype)
    del unet
    fused_available = device.type == "cuda" and qk_norm_rope._triton_available()

    rows, totals = [], collections.defaultdict(float)
    for (shape, contiguous), count in sorted(calls.items(), key=lambda item: -item[0][0][1]):
        x, norm, rotary = examples[(shape, contiguous)]
        row = dict(shape="×".join(map(str, shape)), contiguous=contiguous, calls_per_forward=count)
        with torch.no_grad():
            for name, fused in (("plain", False), ("fused", True)):
                previous = qk_norm_rope.set_fused_qk_norm_rope(fused)
                try:
                    eager, kernels = per_call_us(lambda: qk_norm_rope.rms_norm_rotary(x, norm, rotary), device,
                                                 args.iters)
                finally:
                    qk_norm_rope.set_fused_qk_norm_rope(previous)
                row[f"{name}_eager_us"] = round(eager, 2)
                row[f"{name}_kernels_us"] = None if kernels is None else round(kernels, 2)
                totals[f"{name}_eager_ms"] += eager * count / 1e3
                totals[f"{name}_kernels_ms"] += (kernels or 0.0) * count / 1e3
        rows.append(row)
    totals = {k: round(v, 3) for k, v in totals.items()}
    summary = dict(device=device_name(device), torch=torch.__version__, dtype=str(dtype), batch=args.batch,
                   latent=latent, text_tokens=tokens, iters=args.iters, fused_kernel_available=fused_available,
                   calls_per_forward=sum(calls.values()), per_forward=totals, rows=rows)
    columns = ["shape", "contiguous", "calls_per_forward", "plain_eager_us", "fused_eager_us", "plain_kernels_us",
               "fused_kernels_us"]
    table = markdown_table(rows, columns)
    if args.forward_rounds:
        summary["forward_ab"] = forward_ab(args.forward_rounds, args.batch, latent, tokens, args.smoke, device, dtype,
                                           args.stand_in_kernel)
        summary["stand_in_kernel"] = args.stand_in_kernel
        stand_in = ", the kernel replaced by one empty_like op (timing only)" if args.stand_in_kernel else ""
        table += (f"\n\nWhole forwards, {args.forward_rounds} interleaved rounds (eager: median wall ms, synchronised; "
                  f"graph: the same forward replayed as one CUDA graph){stand_in}:\n\n" + markdown_table(
                      summary["forward_ab"], ["variant", "eager_ms", "eager_vs_e_pct", "graph_ms", "graph_vs_e_pct"]))
    print(table)
    print(f"\nper forward ({summary['calls_per_forward']} calls): {totals}; fused kernel available: {fused_available}")
    if args.out is not None:
        stem = "bench_qk_norm_rope" + (f"_{args.tag}" if args.tag else "")
        title = (f"# QK-norm + RoPE per call and per forward, {device_name(device)}, torch {torch.__version__}, "
                 f"{dtype}, batch {args.batch}\n\n")
        write_results(args.out, stem, summary, title + table + f"\n\nPer forward: {totals}\n")


if __name__ == "__main__":
    main()
