"""How well the embedded default model's ``vae_encoder/`` inverts its decoder, on samples it never trained on.

    python benchmarks/bench_default_encoder.py --data data/emoji64 \\
        --train-results runs/default-encoder/eval_results.json --train-wall-s 1234
    # writes benchmarks/results/default_model_encoder_cpu.{json,md}

The default pipeline (4 steps, no CFG) samples ``--num-samples`` latents ``z`` from held-out captions (the ``test``
split of ``prepare_emoji.py``'s output, else a fixed prompt list) with seeds that neither training nor its held-out
evaluation used; the shipped fp16 encoder ``E`` is evaluated in float32:

- latent MSE of ``E(D(z))`` against ``z`` in scaled units (1.0: the variance of the latents);
- round-trip PSNR of ``D(E(D(z)))`` against ``D(z)``, and the same for a constant encoder (the mean latent of the
  samples): the floor;
- with ``--data``: PSNR of ``D(E(x))`` against the held-out real renders ``x`` (what fine-tuning encodes).

``--train-results`` / ``--train-wall-s`` copy the training run's record (``train_tiny_encoder.py`` writes
``eval_results.json``) into the result files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Seeds of the benchmark's samples: above the training (seed * 1_000_003 + i) and held-out (2**40 + ...) seeds.
SEED_BASE = 2**41
PROMPTS = ("red apple", "blue car", "smiling face", "green tree", "yellow star", "cat face", "pizza", "rocket")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="prepare_emoji.py output: captions and images of its test split (held out)")
    parser.add_argument("--num-samples", type=int, default=128, help="sampled latents (default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-results", type=Path, default=None, help="the training run's eval_results.json")
    parser.add_argument("--train-wall-s", type=float, default=None, help="the training run's wall time (s)")
    parser.add_argument("--train-command", type=str, default=None, help="the training command, for the record")
    parser.add_argument("--train-note", type=str, default=None, help="how the training ran (threads, load)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be >= 1")
    if args.data is not None and not (args.data / "test" / "metadata.jsonl").is_file():
        parser.error(f"--data {args.data} has no test/metadata.jsonl (run prepare_emoji.py)")
    return args


def held_out(data: Path | None) -> tuple[list[str], torch.Tensor | None]:
    """Captions and images ``(N, 3, 64, 64)`` in [-1, 1] of the test split, or the fixed prompts and no images."""
    if data is None:
        return list(PROMPTS), None
    rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines() if line]
    images = [np.asarray(Image.open(data / "test" / row["file_name"]).convert("RGB").resize((64, 64)), np.float32)
              for row in rows]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return [row["text"] for row in rows], pixels


@torch.no_grad()
def measure(pipe, encoder, prompts, images, num_samples, batch_size) -> dict:
    from diffusers_snapgen.training.reconstruction import psnr
    from diffusers_snapgen.training.tasks import sample_decoder_pairs

    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    z, x = sample_decoder_pairs(pipe, chosen, [SEED_BASE + i for i in range(num_samples)], 64, None, batch_size)
    decoder, scale = pipe.vae, pipe.vae.config.scaling_factor
    encoded = torch.cat([encoder(chunk, return_dict=False)[0] for chunk in x.split(batch_size)])

    def roundtrip(latents, targets):
        out = torch.cat([decoder.decode(c).sample.clamp(-1, 1) for c in latents.split(batch_size)])
        return psnr((out + 1) / 2, (targets + 1) / 2)

    mean_latent = z.mean(0, keepdim=True).expand_as(z)
    result = {"num_samples": num_samples, "latent_mse": ((encoded - z) * scale).pow(2).mean().item(),
              "roundtrip_psnr": roundtrip(encoded, x).mean().item(),
              "constant_encoder_latent_mse": ((mean_latent - z) * scale).pow(2).mean().item(),
              "constant_encoder_roundtrip_psnr": roundtrip(mean_latent, x).mean().item()}
    if images is not None:
        real = torch.cat([encoder(chunk, return_dict=False)[0] for chunk in images.split(batch_size)])
        result.update(num_real_images=len(images), real_psnr=roundtrip(real, images).mean().item())
    return result


def main(argv=None):
    from diffusers_snapgen import TinyEncoder, load_default_pipeline
    from diffusers_snapgen.default_model import DEFAULT_MODEL_DIR

    args = parse_args(argv)
    folder = DEFAULT_MODEL_DIR / "vae_encoder"
    pipe = load_default_pipeline(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    encoder = TinyEncoder.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    prompts, images = held_out(args.data)
    result = measure(pipe, encoder, prompts, images, args.num_samples, args.batch_size)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    threads = torch.get_num_threads()
    payload = {"hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} torch threads)",
               "encoder": {"parameters": sum(p.numel() for p in encoder.parameters()), "bytes_fp16": size,
                           "config": {k: v for k, v in encoder.config.items() if not k.startswith("_")}},
               "held_out": result, "prompts": "test split of --data" if args.data else list(PROMPTS)}
    if args.train_results is not None:
        payload["training"] = json.loads(args.train_results.read_text())
    if args.train_wall_s is not None:
        payload.setdefault("training", {})["wall_s"] = args.train_wall_s
    if args.train_command:
        payload.setdefault("training", {})["command"] = args.train_command
    if args.train_note:
        payload.setdefault("training", {})["note"] = args.train_note
    rows = [{"encoder": "shipped vae_encoder (fp16 weights, run in fp32)", "latent MSE": f"{result['latent_mse']:.4f}",
             "round-trip PSNR (dB)": f"{result['roundtrip_psnr']:.2f}",
             "real renders PSNR (dB)": f"{result['real_psnr']:.2f}" if "real_psnr" in result else "not measured"},
            {"encoder": "constant (mean latent of the samples)",
             "latent MSE": f"{result['constant_encoder_latent_mse']:.4f}",
             "round-trip PSNR (dB)": f"{result['constant_encoder_roundtrip_psnr']:.2f}",
             "real renders PSNR (dB)": "—"}]
    title = (f"Default model's vae_encoder on {result['num_samples']} held-out 64x64 samples of the default pipeline "
             f"(4 steps), {payload['hardware']}")
    table = title + "\n\n" + markdown_table(rows, list(rows[0]))
    training = payload.get("training")
    if training:
        steps = training.get("step", "not measured")
        wall = f"{training['wall_s']:.0f} s" if "wall_s" in training else "not measured"
        table += f"\n\nTraining: {steps} steps, {wall} wall on the same CPU"
        if "note" in training:
            table += f" ({training['note']})"
        if "command" in training:
            table += f":\n\n```\n{training['command']}\n```"
    write_results(args.out, "default_model_encoder_cpu", payload, table)
    print(table)


if __name__ == "__main__":
    main()
