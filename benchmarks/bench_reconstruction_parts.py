"""GPU time of the parts of the tiny-decoder training step, in three layouts: NCHW eager, channels_last eager
(``--channels_last``), NCHW under ``torch.compile``.

Parts, at the emoji recipe's sizes (batch 64, 128² images, 16×16×16 latents): the frozen emoji autoencoder's encoder
forward (bf16), the TinyDecoder's forward + backward (bf16 autocast, fp32 weights) and three patch-discriminator passes
with their backward (the GAN step's real, fake and generator passes). Each part is timed with CUDA events over
``--iters`` calls after 3 warm-up calls; cuDNN benchmark mode is on. Prints one line per layout and the JSON.

    python benchmarks/bench_reconstruction_parts.py --out benchmarks/results    # CUDA
    python benchmarks/bench_reconstruction_parts.py --smoke                     # CPU, tiny sizes, no timings
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from bench_train_loop import EMOJI_VAE
from common import write_atomically  # also puts the checkout's src/ on sys.path
from diffusers import AutoencoderKL

from diffusers_snapgen import TinyDecoder
from diffusers_snapgen.training.discriminator import PatchDiscriminator

LAYOUTS = ("nchw", "channels_last", "compiled")


def _time_ms(fn, iters: int, cuda: bool) -> float | None:
    for _ in range(3):
        fn()
    if not cuda:
        return None
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 2)


def build_parts(layout: str, batch: int, size: int, device: str, dtype: torch.dtype | None = None) -> dict:
    """The three parts as callables. ``dtype`` None: as in training (fp32 weights under bf16 autocast, the encoder in
    bf16); a dtype: every model and input in it, no autocast (e.g. bf16 on the ``meta`` device for the roofline)."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    vae = AutoencoderKL(**EMOJI_VAE).to(device, dtype or torch.bfloat16).eval().requires_grad_(False)
    vae = vae.to(memory_format=memory_format)
    decoder = TinyDecoder(latent_channels=16).to(device, dtype).to(memory_format=memory_format)
    disc = PatchDiscriminator(3, 64, 3, norm_num_groups=32).to(device, dtype).to(memory_format=memory_format)
    if layout == "compiled":
        vae.encoder.compile()
        decoder.compile()
        disc.compile()
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    latents = torch.randn(batch, 16, size // 8, size // 8, device=device, dtype=dtype)
    latents = latents.contiguous(memory_format=memory_format)

    def mixed_precision():
        return torch.autocast(device, torch.bfloat16) if dtype is None else contextlib.nullcontext()

    def encoder_forward():
        with torch.no_grad():
            vae.encode(pixels.to(vae.dtype)).latent_dist.sample()

    def decoder_forward_backward():
        with mixed_precision():
            out = decoder(latents).sample
        out.float().square().mean().backward()

    def discriminator_passes():
        x = pixels.detach().requires_grad_()
        with mixed_precision():
            loss = disc(pixels).mean() + disc(pixels.detach()).mean() + disc(x).mean()
        loss.backward()

    return {"encoder_fwd": encoder_forward, "decoder_fwd_bwd": decoder_forward_backward,
            "disc_3x_fwd_bwd": discriminator_passes}


def measure(layout: str, batch: int, size: int, iters: int, device: str) -> dict:
    parts = build_parts(layout, batch, size, device)
    return {f"{name}_ms": _time_ms(fn, iters, device == "cuda") for name, fn in parts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="timed calls per part")
    p.add_argument("--smoke", action="store_true", help="CPU, batch 2 at 32²: checks that every part runs")
    p.add_argument("--out", type=Path, default=None, help="folder for reconstruction_parts_<gpu>.json")
    args = p.parse_args(argv)
    if args.batch < 1 or args.resolution < 8 or args.resolution % 8 or args.iters < 1:
        p.error("--batch and --iters must be positive, --resolution a multiple of 8 (at least 8)")
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    batch, size = (args.batch, args.resolution) if cuda else (2, 32)
    if cuda:
        torch.backends.cudnn.benchmark = True
    layouts = LAYOUTS if cuda else LAYOUTS[:2]  # compiling on the CPU says nothing about the GPU
    rows = {}
    for layout in layouts:
        rows[layout] = measure(layout, batch, size, args.iters, device)
        print(layout, rows[layout], flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "batch": batch,
              "resolution": size, "iters": args.iters, "ms": rows}
    print(json.dumps(result))
    if args.out is not None:
        tag = result["device"].split()[1].lower() if cuda else "smoke"
        path = args.out / f"reconstruction_parts_{tag}.json"
        write_atomically(path, json.dumps(result, indent=2) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
