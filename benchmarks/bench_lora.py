"""Training-step cost of LoRA fine-tuning a SnapGen UNet (``train_snapgen_lora.py``'s step).

One step = flow-matching forward of the frozen UNet (``--mixed_precision`` weights, autocast) with a float32 LoRA
adapter (``--rank`` on ``--lora_layers``), backward into the adapter only, gradient clipping and AdamW, exactly
the loss of ``train_snapgen_lora.py``; latents and text embeddings are random (as with ``--cache_latents
--cache_text_embeddings``), so text encoders and VAE are not timed. For each batch size it reports the median step
time, images/s and peak device memory (CUDA only; "—" elsewhere), with the adapter's share of the parameters.

    python benchmarks/bench_lora.py --out benchmarks/results                          # CUDA: paper UNet at 1024²
    python benchmarks/bench_lora.py --unet tiny --resolution 64 --device cpu --out /tmp/bench   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, markdown_table, peak_memory_gib, reset_peak_memory, time_ms, write_results  # noqa: E402

from diffusers_snapgen.training import FlowMatchingSampler, denoiser_forward, flow_matching_loss  # noqa: E402
from diffusers_snapgen.training import prepare_flow_matching_batch, step_generator  # noqa: E402
from diffusers_snapgen.training.lora import LORA_LAYER_TARGETS, add_lora_adapter, lora_parameters  # noqa: E402

TEXT_TOKENS = 333  # 77 CLIP + 256 T5, as SD3.5's encoders
COLUMNS = ["unet", "resolution", "batch", "rank", "lora_layers", "precision", "grad_ckpt", "step_ms",
           "images_per_s", "peak_memory_gib", "lora_params_m", "unet_params_m"]


def build_unet(kind: str, device):
    from diffusers_snapgen import SnapGenUNet2DModel

    torch.manual_seed(0)
    if kind == "tiny":
        from diffusers_snapgen.testing import tiny_unet

        return tiny_unet().to(device)
    with torch.device(device):
        return SnapGenUNet2DModel()


class LoRAStep:
    """One LoRA optimisation step on fixed random latents and embeddings."""

    def __init__(self, unet, batch: int, resolution: int, device, dtype, text_tokens: int, lr: float = 1e-4):
        cfg = unet.config
        side = resolution // 8
        g = torch.Generator(device="cpu").manual_seed(0)
        self.latents = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device)
        self.embeds = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(device)
        self.pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device)
        self.unet, self.device, self.dtype = unet, torch.device(device), dtype
        self.params = lora_parameters(unet)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, **fused)
        self.sampler = FlowMatchingSampler(shift=3.0)
        self.step_index = 0

    def __call__(self):
        generator = step_generator(0, self.step_index, device=self.device)
        self.step_index += 1
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            fm = prepare_flow_matching_batch(self.latents, self.sampler, generator)
            pred = denoiser_forward(self.unet, fm.noisy_latents, fm.timesteps, self.embeds, self.pooled)
            loss = flow_matching_loss(pred, fm.target, fm.sigmas).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure(args, batch: int) -> dict:
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    unet = build_unet(args.unet, device)
    total = sum(p.numel() for p in unet.parameters())
    add_lora_adapter(unet, rank=args.rank, layers=args.lora_layers, weight_dtype=dtype)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    step = LoRAStep(unet, batch, args.resolution, device, dtype, args.text_tokens)
    reset_peak_memory(device)
    ms = time_ms(step, device, warmup=args.warmup, iters=args.steps)
    row = dict(unet=args.unet, resolution=args.resolution, batch=batch, rank=args.rank, lora_layers=args.lora_layers,
               precision=args.mixed_precision, grad_ckpt=args.gradient_checkpointing, step_ms=round(ms, 3),
               images_per_s=round(batch * 1000.0 / ms, 3), peak_memory_gib=peak_memory_gib(device),
               lora_params_m=round(sum(p.numel() for p in step.params) / 1e6, 4), unet_params_m=round(total / 1e6, 2))
    del step, unet
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", choices=["paper", "tiny"], default="paper", help="paper-size UNet (379M) or the tiny one")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents are 1/8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", type=str, default="1,2,4", help="comma-separated batch sizes")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_layers", type=str, default="attn", help=f"groups of {tuple(LORA_LAYER_TARGETS)}")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="frozen-weight dtype and autocast (default: bf16 on CUDA, no elsewhere)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--text_tokens", type=int, default=TEXT_TOKENS)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_lora_<device>.{json,md}")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch_sizes must be comma-separated whole numbers, got {args.batch_sizes!r}")
    for name in ("resolution", "rank", "text_tokens", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1 or args.warmup < 0 or args.resolution % 32:
        p.error("--batch_sizes must be >= 1, --warmup >= 0 and --resolution a multiple of 32")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available; use --device cpu")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.device(args.device).type == "cuda" else "no"
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = [measure(args, batch) for batch in args.batch_sizes]
    device = torch.device(args.device)
    payload = {"device": device_name(device), "torch": torch.__version__, "rows": rows}
    table = markdown_table(rows, COLUMNS)
    print(json.dumps(payload, indent=2))
    print(table)
    if args.out is not None:
        write_results(args.out, f"bench_lora_{device.type}", payload, f"LoRA training steps on {payload['device']}\n\n"
                      + table)
    return payload


if __name__ == "__main__":
    main()
