"""Float8 inference of the embedded default model's UNet, emulated in PyTorch: end-to-end image PSNR against the bf16
pipeline (CPU).

The arithmetic of torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
activation_value_lb=1e-12)``, the float8 recipe of docs/performance.md: each selected ``nn.Linear`` keeps its weight
as float8 e4m3 with one scale per output channel, and casts every input row (token) to e4m3 with its own scale at run
time (a row's largest magnitude bounded below by 1e-12, so an all-zero row stays zero); the product accumulates in fp32
and returns bf16, plus the bf16 bias. Here the e4m3 values are decoded back to fp32 for the product (a CPU has no
float8 matmul), so only the rounding of ``torch._scaled_mm``'s accumulation can differ from the GPU. The pipeline runs
in bf16 as on the GPU and samples the first ``--pairs`` prompts of the `seen` and `heldout_pair` sets (seed = pair
index, the model's default steps and CFG); each image is compared with the bf16 pipeline's, and bf16 with fp32.

    python benchmarks/float8_emulation.py --eval-prompts data/emoji128/eval_prompts.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from blockwise_quant_emulation import (
    add_pair_args,
    check_pair_args,
    default_pipeline,
    eval_pairs,
    quality_columns,
    run_payload,
    sample,
)
from common import is_large_linear, markdown_table, write_results
from torch import nn

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
#: Which ``nn.Linear`` layers are converted: every one, or those the inference suite converts on the paper UNet.
FILTERS = {"all": lambda layer: True, "min256": is_large_linear}


def float8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 with one fp32 scale per row (its last dimension), decoded back to fp32."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = E4M3_MAX / amax
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / scale


class Float8LinearEmulation(nn.Module):
    """``nn.Linear`` with float8 e4m3 per-row weights and per-row dynamic activations (fp32 product, the input's
    dtype out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", float8_rows(linear.weight.detach()))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (float8_rows(x) @ self.weight.t()).to(x.dtype)
        return out if self.bias is None else out + self.bias


def convert(model: nn.Module, keep) -> int:
    """Replaces every ``nn.Linear`` of ``model`` for which ``keep(layer)`` holds; returns how many."""
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and keep(module)]
    for name, layer in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Float8LinearEmulation(layer))
    return len(chosen)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(p)
    p.add_argument("--filters", nargs="+", choices=list(FILTERS), default=list(FILTERS),
                   help="which Linear layers become float8: all, or min(in, out) >= 256 (default: both)")
    args = p.parse_args(argv)
    check_pair_args(p, args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pairs = eval_pairs(args.eval_prompts, args.pairs)
    fp32 = sample(default_pipeline(), pairs)
    pipe = default_pipeline(torch.bfloat16)
    bf16 = sample(pipe, pairs)
    linears = sum(isinstance(m, nn.Linear) for m in pipe.unet.modules())
    rows = [{"unet": "bf16", "against": "fp32", "float8_linears": 0, "linears": linears,
             **quality_columns(fp32, bf16)}]
    original = pipe.unet
    for name in args.filters:
        pipe.unet = copy.deepcopy(original)
        converted = convert(pipe.unet, FILTERS[name])
        rows.append({"unet": f"float8 ({name})", "against": "bf16", "float8_linears": converted, "linears": linears,
                     **quality_columns(bf16, sample(pipe, pairs))})
        print(rows[-1], flush=True)
    payload = run_payload(args, pipe, pairs, start, rows)
    table = ("# Float8 (e4m3, per-row weights and activations) in the embedded model's UNet, emulated (CPU)\n\n"
             f"`benchmarks/float8_emulation.py`: {len(pairs)} prompt/seed pairs (the first {args.pairs} prompts of the "
             f"emoji eval sets `seen` and `heldout_pair`, seed = pair index), {payload['steps']} steps, CFG "
             f"{payload['guidance_scale']:g}, the pipeline in bf16; image PSNR/SSIM of the float8 UNet against bf16 "
             f"and of bf16 against fp32; torch {torch.__version__}, {args.threads} threads, {payload['wall_s']} s. The "
             "arithmetic of torchao's Float8DynamicActivationFloat8WeightConfig(PerRow), not a GPU run "
             "(docs/performance.md).\n\n"
             + markdown_table(rows, ["unet", "against", "float8_linears", "linears", "psnr_db", "ssim"]))
    write_results(args.out, "float8_emulation_cpu", payload, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
