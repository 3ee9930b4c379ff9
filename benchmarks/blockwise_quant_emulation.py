"""Per-block linear weight quantization of the embedded default model's UNet, emulated in PyTorch: end-to-end image
PSNR against fp32 (CPU).

Every UNet weight of at least 4,096 elements whose input channels divide by the block is quantized symmetrically per
block of ``block`` input channels (integers in [-(2^(b-1) - 1), 2^(b-1) - 1], one fp16 scale per block: ``b + 16 /
block`` bits per weight); every other weight is rounded to fp16. The 4-step pipeline (its default CFG) then samples
the first ``--pairs`` prompts of the `seen` and `heldout_pair` sets of the emoji data's eval prompts, seed = pair
index, and each image is compared with the fp32 model's. This is the arithmetic of coremltools' per-block
``OpLinearQuantizerConfig``, not a Core ML package: it says what the format can keep, before any export
(docs/coreml_mixed_bit.md).

    python benchmarks/blockwise_quant_emulation.py --eval-prompts data/emoji128/eval_prompts.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import markdown_table, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MIN_ELEMENTS = 4096


def quantize_per_block(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``weight`` (out, in, ...) quantized symmetrically per block of ``block`` input channels, fp16 scales."""
    qmax = 2 ** (bits - 1) - 1
    out_channels, in_channels = weight.shape[:2]
    blocks = weight.reshape(out_channels, in_channels // block, block, *weight.shape[2:])
    scale = (blocks.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / qmax).half().float()
    return (torch.round(blocks / scale).clamp(-qmax, qmax) * scale).reshape(weight.shape)


def quantized_state(unet, bits: int, block: int) -> tuple[dict, float]:
    """``(state dict, bits per weight)`` of ``unet`` with the quantizable weights per-block quantized."""
    state, stored, total = {}, 0.0, 0
    for name, weight in unet.state_dict().items():
        quantizable = weight.dim() >= 2 and weight.shape[1] % block == 0 and weight.numel() >= MIN_ELEMENTS
        state[name] = quantize_per_block(weight, bits, block) if quantizable else weight.half().float()
        stored += weight.numel() * ((bits + 16 / block) if quantizable else 16)
        total += weight.numel()
    return state, stored / total


def add_pair_args(p: argparse.ArgumentParser) -> None:
    """The prompt-pair and run flags shared by the emulation scripts."""
    p.add_argument("--eval-prompts", type=Path, required=True, help="eval_prompts.json of the emoji data")
    p.add_argument("--pairs", type=int, default=8, help="prompts per set (seen, heldout_pair); default 8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)


def check_pair_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if not args.eval_prompts.is_file():
        p.error(f"--eval-prompts: {args.eval_prompts} is not a file (training_examples/data/prepare_emoji.py)")


def default_pipeline(dtype=None):
    """The embedded default model's pipeline (``dtype``: default fp32), without progress bars."""
    from diffusers_snapgen import load_default_pipeline

    pipe = load_default_pipeline(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_payload(args: argparse.Namespace, pipe, pairs: list, start: float, rows: list[dict]) -> dict:
    """The JSON of an emulation run: machine, sampling settings, wall time and ``rows``."""
    return {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "pairs": len(pairs),
            "steps": pipe.sampling_defaults["num_inference_steps"],
            "guidance_scale": pipe.sampling_defaults["guidance_scale"],
            "wall_s": round(time.perf_counter() - start, 1), "rows": rows}


def eval_pairs(eval_prompts: Path, pairs: int) -> list[tuple[str, int]]:
    """``(prompt, seed)``: the first ``pairs`` prompts of the `seen` and `heldout_pair` sets, seed = pair index."""
    prompts = json.loads(eval_prompts.read_text())
    return [(prompt, seed) for seed, prompt in enumerate(prompts["seen"][:pairs] + prompts["heldout_pair"][:pairs])]


def sample(pipe, pairs: list[tuple[str, int]]) -> torch.Tensor:
    """The pipeline's images (its default steps and CFG) of every pair, float in [0, 1]."""
    return torch.cat([pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt").images
                      for prompt, seed in pairs]).float()


def quality_columns(reference: torch.Tensor, images: torch.Tensor) -> dict:
    """The result columns of ``images`` against ``reference``: mean image PSNR (dB) and SSIM, rounded."""
    from diffusers_snapgen.evaluation import psnr_ssim

    quality = psnr_ssim(reference, images)
    return {"psnr_db": round(quality["psnr"], 2), "ssim": round(quality["ssim"], 4)}


def _setting(text: str) -> tuple[int, int]:
    try:
        bits, block = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be BITS:BLOCK, e.g. 4:32, got {text!r}") from None
    if not 2 <= bits <= 8 or block < 1:
        raise argparse.ArgumentTypeError(f"BITS must be 2-8 and BLOCK positive, got {text!r}")
    return bits, block


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(p)
    p.add_argument("--settings", type=_setting, nargs="+", default=[(4, 32), (4, 16), (6, 32), (8, 32)],
                   metavar="BITS:BLOCK", help="default: 4:32 4:16 6:32 8:32")
    args = p.parse_args(argv)
    check_pair_args(p, args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pairs = eval_pairs(args.eval_prompts, args.pairs)
    pipe = default_pipeline()
    reference, fp32 = sample(pipe, pairs), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rows = []
    for bits, block in args.settings:
        state, bits_per_weight = quantized_state(pipe.unet, bits, block)
        pipe.unet.load_state_dict(state)
        quality = quality_columns(reference, sample(pipe, pairs))
        pipe.unet.load_state_dict(fp32)
        rows.append({"bits": bits, "block": block, "bits_per_weight": round(bits_per_weight, 3), **quality})
        print(rows[-1], flush=True)
    payload = run_payload(args, pipe, pairs, start, rows)
    table = ("# Per-block linear quantization of the embedded model's UNet, emulated in PyTorch (CPU)\n\n"
             f"`benchmarks/blockwise_quant_emulation.py`: {len(pairs)} prompt/seed pairs, {payload['steps']} steps, CFG "
             f"{payload['guidance_scale']:g}, image PSNR/SSIM against fp32; torch {torch.__version__}, "
             f"{args.threads} threads, {payload['wall_s']} s. Not a Core ML export (docs/coreml_mixed_bit.md).\n\n"
             + markdown_table(rows, ["bits", "block", "bits_per_weight", "psnr_db", "ssim"]))
    write_results(args.out, "blockwise_quant_emulation_cpu", payload, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
