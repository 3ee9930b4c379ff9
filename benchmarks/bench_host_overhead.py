#!/usr/bin/env python
"""Host work of one eager forward, measured on any CPU: the dispatcher ops and module calls per forward.

At batch 1 the eager paper-size UNet on an H200 is bound by the host, which pays for every op it dispatches
(docs/performance.md): the GPU kernels are short, so fewer ops per forward is a faster eager step. This script
builds each model with its full structure (every block, layer and op of the paper-size config) at narrow widths and
a tiny latent, counts the ops of one forward (``TorchDispatchMode``), splits them into *compute* ops (a kernel each on
a GPU) and views / no-op casts (host work only), counts module calls, and times the forward on this CPU (best of
several interleaved rounds' medians, one thread, batch 1). SANA-1.6B's transformer, built the same way, is the anchor
of the same run. The UNet is also counted after ``fuse_qkv_projections()`` (one matmul for Q/K/V), and ablation
variant (e) (no QK-norm, no RoPE) shows what (f)'s QK-norm + RoPE add; the ``_text_kv`` rows are the steps a sampler
runs with the text's cross-attention keys and values precomputed once per prompt. Counts depend only on the code, not
on the machine; CPU times are a rough proxy for the GPU's host time, not a GPU measurement.

    python benchmarks/bench_host_overhead.py [--out benchmarks/results] [--iters 30] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402  (also puts src/ on the path)

#: Ops that only make views, check shapes or return their input: no kernel on a GPU.
VIEW_OPS = {"unsqueeze", "squeeze", "permute", "unflatten", "reshape", "flatten", "unbind", "chunk", "expand", "slice",
            "view", "split", "split_with_sizes", "transpose", "t", "select", "alias", "detach", "dropout",
            "_unsafe_view", "as_strided"}
#: Narrow widths with the paper config's heads per stage (256/64, 512/64, 896/64 -> 4, 8, 14).
SNAPGEN_NARROW = dict(block_out_channels=[32, 64, 112], attention_head_dim=8, norm_num_groups=16,
                      cross_attention_dim=64, joint_attention_dim=64, pooled_projection_dim=64)
#: SANA-1.6B with its 70 / 20 heads kept and every head 2 / 7 channels wide.
SANA_NARROW = dict(attention_head_dim=2, cross_attention_head_dim=7, cross_attention_dim=140, caption_channels=64)
TEXT_TOKENS = 16


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it; a ``.to`` that returns its input counts as a no-op."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("to", "_to_copy") and out is args[0]:
            name = "to(no-op)"
        self.ops[name] += 1
        return out


def snapgen(variant: str | None = None, fuse_qkv: bool = False, text_kv: bool = False):
    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.models.unet_variants import ablation_variants

    config = {**(ablation_variants()[variant]["config"] if variant else {}), **SNAPGEN_NARROW}
    model = SnapGenUNet2DModel(**config).eval()
    if fuse_qkv:
        model.fuse_qkv_projections()
    inputs = dict(sample=torch.randn(1, 16, 4, 4), timestep=torch.full((), 500.0).expand(1),
                  encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 64), pooled_projections=torch.randn(1, 64),
                  return_dict=False)
    if text_kv:  # the step a sampler runs: the text's keys and values precomputed once per prompt
        with torch.no_grad():
            inputs["cross_attention_kv"] = model.precompute_cross_attention_kv(inputs["encoder_hidden_states"])
    return model, inputs


def sana():
    import diffusers

    model = diffusers.SanaTransformer2DModel(**SANA_NARROW).eval()
    return model, dict(hidden_states=torch.randn(1, 32, 2, 2), timestep=torch.full((1,), 500.0),
                       encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 64), return_dict=False)


MODELS = {
    "snapgen_unet": ("SnapGen UNet (paper config, variant f)", lambda: snapgen()),
    "snapgen_unet_fused_qkv": ("SnapGen UNet after `fuse_qkv_projections()`", lambda: snapgen(fuse_qkv=True)),
    "snapgen_unet_variant_e": ("SnapGen UNet, variant (e): no QK-norm, no RoPE", lambda: snapgen("e")),
    "snapgen_unet_text_kv": ("SnapGen UNet, text keys/values precomputed (`cross_attention_kv`)",
                             lambda: snapgen(text_kv=True)),
    "snapgen_unet_fused_qkv_text_kv": ("... and fused QKV", lambda: snapgen(fuse_qkv=True, text_kv=True)),
    "snapgen_unet_variant_e_text_kv": ("variant (e), text keys/values precomputed", lambda: snapgen("e", text_kv=True)),
    "sana_1600m_transformer": ("SANA-1.6B transformer (anchor)", sana),
}


def cpu_ms(model, inputs, iters: int) -> float:
    """Median ms of ``iters`` forwards."""
    times = []
    with torch.inference_mode():
        for _ in range(iters):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def count(model, inputs) -> dict:
    calls = [0]

    def count_call(module, args):
        calls[0] += 1

    with torch.inference_mode():
        model(**inputs)
        handle = torch.nn.modules.module.register_module_forward_pre_hook(count_call)
        try:
            with OpCounter() as counter:
                model(**inputs)
        finally:
            handle.remove()
    ops = counter.ops
    host_only = sum(n for name, n in ops.items() if name in VIEW_OPS or name == "to(no-op)")
    return dict(ops=sum(ops.values()), compute_ops=sum(ops.values()) - host_only, view_or_noop_ops=host_only,
                module_calls=calls[0], top_ops=dict(ops.most_common(12)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Write bench_host_overhead.{json,md} here.")
    parser.add_argument("--iters", type=int, default=30, help="Timed forwards per model and round (median).")
    parser.add_argument("--rounds", type=int, default=5,
                        help="Rounds over all models, interleaved; the best round's median is reported (a shared "
                             "CPU's noise then hits every model alike).")
    args = parser.parse_args(argv)
    for flag in ("iters", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    built = {name: build() for name, (_, build) in MODELS.items()}
    rows = [{"model": name, "description": MODELS[name][0], **count(*built[name])} for name in MODELS]
    best = {name: float("inf") for name in MODELS}
    for _ in range(args.rounds):
        for name in MODELS:
            best[name] = min(best[name], cpu_ms(*built[name], args.iters))
    for row in rows:
        row["cpu_ms"] = round(best[row["model"]], 2)
    by_name = {row["model"]: row for row in rows}
    anchor, final, variant_e = by_name["sana_1600m_transformer"], by_name["snapgen_unet"], by_name[
        "snapgen_unet_variant_e"]
    summary = {
        "compute_ops_vs_sana": round(final["compute_ops"] / anchor["compute_ops"], 3),
        "cpu_ms_vs_sana": round(final["cpu_ms"] / anchor["cpu_ms"], 3),
        "fused_qkv_cpu_ms_vs_sana": round(by_name["snapgen_unet_fused_qkv"]["cpu_ms"] / anchor["cpu_ms"], 3),
        "variant_f_extra_compute_ops": final["compute_ops"] - variant_e["compute_ops"],
        "variant_f_extra_ops": final["ops"] - variant_e["ops"],
        "text_kv_cpu_ms_vs_sana": round(by_name["snapgen_unet_fused_qkv_text_kv"]["cpu_ms"] / anchor["cpu_ms"], 3),
        "text_kv_variant_f_extra_compute_ops": (by_name["snapgen_unet_text_kv"]["compute_ops"]
                                                - by_name["snapgen_unet_variant_e_text_kv"]["compute_ops"]),
    }
    meta = dict(torch=torch.__version__, machine=platform.platform(), processor=platform.machine(), threads=1,
                iters=args.iters, rounds=args.rounds,
                text_tokens=TEXT_TOKENS, snapgen_widths=SNAPGEN_NARROW, sana_widths=SANA_NARROW)
    columns = ["model", "ops", "compute_ops", "view_or_noop_ops", "module_calls", "cpu_ms"]
    table = "\n".join([
        f"# Host work of one eager forward (batch 1), CPU (`{meta['machine']}`), torch {torch.__version__}",
        "",
        "`python benchmarks/bench_host_overhead.py`: every model at its full structure, narrow widths, tiny latent. "
        "Counts depend only on the code; CPU ms is this machine's (one thread, best of the interleaved rounds' "
        "medians), a proxy for host time only.",
        "",
        markdown_table(rows, columns),
        "",
        " · ".join(f"{key}: {value}" for key, value in summary.items()),
    ])
    print(table)
    if args.out is not None:
        write_results(args.out, "bench_host_overhead", {"meta": meta, "summary": summary, "rows": rows}, table)


if __name__ == "__main__":
    main()
