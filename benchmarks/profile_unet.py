"""Where the SnapGen UNet step spends its GPU time: top kernels of one compiled forward (bf16, batch 1, 1024²).

Compiled with the default inductor mode (no CUDA graphs) so the profiler sees each kernel; kernels are also grouped
into coarse families (matmul, convolution, attention, normalisation, elementwise/fused) to show what a fusion effort
should target. The same compiled forward is then captured in one CUDA graph and timed as replays: the step once host
work is gone.

    python benchmarks/profile_unet.py --out benchmarks/results
    # as the fast sampler runs it: fused projections, text keys/values computed once per prompt
    python benchmarks/profile_unet.py --fuse_qkv --text_kv --tag fused_text_kv --out benchmarks/results
    # batch 16, the 80 busiest kernels, cuDNN choosing its convolution algorithms by timing them
    python benchmarks/profile_unet.py --batch 16 --fuse_qkv --text_kv --top 80 --cudnn_benchmark --tag b16 --out ...
    # an inductor option passed to torch.compile(options=...)
    python benchmarks/profile_unet.py --batch 16 --inductor_option triton.prefer_nd_tiling=True --tag nd --out ...
    python benchmarks/profile_unet.py --smoke --out smoke_out      # CPU ops of a tiny eager UNet, seconds
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_graph, device_name, markdown_table, time_ms, write_results  # noqa: E402

from diffusers_snapgen import SnapGenUNet2DModel  # noqa: E402

FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("convolution", ("conv", "depthwise", "implicit", "wgrad", "dgrad", "cudnn")),
    ("matmul", ("gemm", "matmul", "sm90_xmma", "cutlass", "nvjet", "cublas")),
    ("normalisation", ("norm", "welford", "reduction", "red_")),
    ("fused elementwise (triton)", ("triton",)),
]


def family(kernel_name: str) -> str:
    lowered = kernel_name.lower()
    for name, keys in FAMILIES:
        if any(key in lowered for key in keys):
            return name
    return "other"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--fuse_qkv", action="store_true", help="profile after `unet.fuse_qkv_projections()`")
    parser.add_argument(
        "--text_kv", action="store_true",
        help="pass the text keys and values precomputed (`cross_attention_kv`), as the pipeline and fast sampler do",
    )
    parser.add_argument(
        "--cudnn_benchmark", action="store_true",
        help="`torch.backends.cudnn.benchmark = True`: cuDNN times its algorithms per convolution shape and keeps the "
        "fastest (off by default in PyTorch)",
    )
    parser.add_argument(
        "--inductor_option", action="append", default=[], metavar="NAME=VALUE",
        help="an inductor config option for `torch.compile(options=...)`, VALUE a Python literal (repeatable)",
    )
    parser.add_argument("--tag", default=None, help="suffix of the result files' names")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, eager, CPU ops (tests the wiring)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.inductor_option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--inductor_option takes NAME=VALUE, got {item!r}")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--inductor_option {name}: VALUE must be a Python literal (True, 3, 'x'), got {value!r}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.smoke:
        from diffusers_snapgen.testing import tiny_unet

        device, dtype, latent = torch.device("cpu"), torch.float32, 16
        unet = tiny_unet(in_channels=16, out_channels=16, joint_attention_dim=64, pooled_projection_dim=32).eval()
        run, activity, kind = unet, torch.profiler.ProfilerActivity.CPU, torch.autograd.DeviceType.CPU
    else:
        device, dtype, latent = torch.device("cuda"), torch.bfloat16, args.resolution // 8
        unet = SnapGenUNet2DModel().to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        # Default inductor mode: no CUDA graphs, so the profiler sees every kernel.
        run = torch.compile(unet, options=options or None)
        activity, kind = torch.profiler.ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA
    if args.fuse_qkv:
        unet.fuse_qkv_projections()
    config = unet.config
    inputs = dict(
        sample=torch.randn(args.batch, 16, latent, latent, device=device, dtype=dtype),
        timestep=torch.full((args.batch,), 500.0, device=device),
        encoder_hidden_states=torch.randn(args.batch, 333, config.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(args.batch, config.pooled_projection_dim, device=device, dtype=dtype),
    )
    if args.text_kv:
        with torch.inference_mode():
            inputs["cross_attention_kv"] = unet.precompute_cross_attention_kv(inputs["encoder_hidden_states"])
    with torch.inference_mode():
        step_ms = time_ms(lambda: run(**inputs), device, warmup=1 if args.smoke else 3, iters=2 if args.smoke else 10)
        with torch.profiler.profile(activities=[activity]) as profiler:
            for _ in range(5):
                run(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
        # The same compiled forward captured in one CUDA graph and replayed, as the fast sampler runs it: the step's
        # time once host work is gone (no input copies, unlike mode="reduce-overhead").
        graph_ms = None
        if device.type == "cuda":
            replay, _ = cuda_graph(lambda: run(**inputs), device)
            graph_ms = time_ms(replay, device, warmup=3, iters=50)

    kernels = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if event.device_type == kind and (kind == torch.autograd.DeviceType.CUDA or event.name.startswith("aten::")):
            total = event.device_time_total if kind == torch.autograd.DeviceType.CUDA else event.self_cpu_time_total
            kernels[event.name][0] += total / 5 / 1e3  # ms per forward
            kernels[event.name][1] += 1
    total = sum(ms for ms, _ in kernels.values())
    families = defaultdict(lambda: [0.0, 0])
    for name, (ms, count) in kernels.items():
        families[family(name)][0] += ms
        families[family(name)][1] += count
    family_rows = [
        dict(family=name, ms=ms, launches=count // 5, share=f"{ms / total:.0%}")
        for name, (ms, count) in sorted(families.items(), key=lambda x: -x[1][0])
    ]
    graph_note = "" if graph_ms is None else f", {graph_ms:.2f} ms replayed as one CUDA graph"
    kernel_rows = [
        dict(kernel=name[:90], family=family(name), ms=ms, launches=count // 5, share=f"{ms / total:.1%}")
        for name, (ms, count) in sorted(kernels.items(), key=lambda x: -x[1][0])[: args.top]
    ]
    what = "tiny UNet, eager CPU ops" if args.smoke else "torch.compile (default mode, no CUDA graphs)"
    title = (
        f"# SnapGen UNet kernel profile — {device_name(device)}, {str(dtype).replace('torch.', '')}, batch "
        f"{args.batch}, {'smoke' if args.smoke else f'{args.resolution}²'}, {what}"
        f"{', fused QKV' if args.fuse_qkv else ''}{', text keys/values precomputed' if args.text_kv else ''}"
        f"{', cuDNN benchmark mode' if args.cudnn_benchmark else ''}"
        f"{''.join(f', {k}={v!r}' for k, v in options.items())}\n\n"
        f"Step {step_ms:.2f} ms wall{graph_note}; {total:.2f} ms of kernel time "
        f"in {sum(c for _, c in kernels.values()) // 5} launches per forward.\n"
    )
    table = (
        title
        + "\n"
        + markdown_table(family_rows, ["family", "ms", "launches", "share"])
        + "\n\n"
        + markdown_table(kernel_rows, ["kernel", "family", "ms", "launches", "share"])
    )
    print(table)
    if args.out is not None:
        payload = dict(
            step_ms=step_ms, graph_ms=graph_ms, kernel_ms=total, fuse_qkv=args.fuse_qkv, text_kv=args.text_kv,
            cudnn_benchmark=args.cudnn_benchmark, inductor_options=options, batch=args.batch, families=family_rows,
            kernels=kernel_rows,
        )
        stem = f"profile_unet_{device.type}" + (f"_{args.tag}" if args.tag else "")
        write_results(args.out, stem, payload, table)


if __name__ == "__main__":
    main()
