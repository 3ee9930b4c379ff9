"""LoRA on the embedded default model, on a CPU: does it learn a new subject from 8 images, and do other prompts stay?

    python benchmarks/bench_lora_default_model.py      # writes benchmarks/results/lora_default_model_cpu.{json,md,jpg}

The subject is an emoji the default model never saw: ``orca`` exists in the Noto and Twemoji sets but not in Fluent
Emoji Flat, whose names are the model's training captions. Eight instance images are rendered offline from the npm
packages ``prepare_emoji.py`` uses (``~/.cache/diffusers-snapgen``; ``--cache-dir``): each set's icon at two scales,
mirrored with saturation and contrast jitter. ``train_snapgen_lora.py --pretrained_model_name_or_path default
--instance_prompt "sks emoji"`` trains ``--steps`` steps per ``--timestep-sampling`` mode (a subprocess each, timed).

Measured with the default pipeline's 4-step sampler, the same seeds before and after (64x64, pixels in [0, 1]):

- the instance prompt: the mean absolute distance (and PSNR) of each sample to its nearest instance image;
- eight other prompts (two seeds each): the distance of the after-sample to the before-sample of the same seed,
  next to the distance between the two seeds of a prompt before training (the scale of "moved a lot").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT = "orca"
SETS = ("noto-1.2.9", "twemoji-1.2.5")
INSTANCE_PROMPT = "sks emoji"
OTHER_PROMPTS = ("red apple", "snowman", "blue heart", "cat face", "pizza", "rocket", "sun with face", "green apple")
SAMPLINGS = ("density", "few_step")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="LoRA training steps per run (default 200)")
    parser.add_argument("--timestep-sampling", nargs="+", choices=SAMPLINGS, default=list(SAMPLINGS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-layers", nargs="+", default=["attn", "attn,ffn,conv"],
                        help="train_snapgen_lora.py --lora_layers values, one run each (default: attn, attn,ffn,conv)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8, help="samples of the instance prompt (default 8)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the npm packages (default: prepare_emoji's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="instance images and adapters (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if min(args.steps, args.rank, args.batch_size, args.seeds) < 1 or args.learning_rate <= 0:
        parser.error("--steps, --rank, --batch-size and --seeds must be >= 1, --learning-rate > 0")
    return args


def render_instances(cache_dir: Path, folder: Path) -> list[Path]:
    """Eight 64x64 variants of the subject: two sets x (large, small) x (as drawn, mirrored + colour jitter), on
    white like the default model's training images."""
    sys.path.insert(0, str(ROOT / "training_examples" / "data"))
    from emoji_render import available_renderer, render
    from emoji_sets import read_icon_set

    renderer = available_renderer()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for set_name in SETS:
        icons = {icon.name: icon for icon in read_icon_set(cache_dir / set_name).icons}
        if SUBJECT not in icons:
            raise SystemExit(f"{cache_dir / set_name} has no {SUBJECT!r} icon")
        for margin in (0.04, 0.16):
            image = render(icons[SUBJECT], 64, margin=margin, renderer=renderer)
            jittered = ImageEnhance.Color(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).enhance(1.5)
            jittered = ImageEnhance.Contrast(jittered).enhance(1.15)  # the white background stays white
            for variant, picture in (("plain", image), ("jitter", jittered)):
                path = folder / f"{set_name.split('-')[0]}-{margin:.2f}-{variant}.png"
                picture.save(path)
                paths.append(path)
    return paths


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-10)))


def sample(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return as_array(pipe(prompts, height=64, width=64, generator=generators).images)


def samples(pipe, seeds: int) -> dict:
    instance = sample(pipe, [INSTANCE_PROMPT] * seeds, list(range(seeds)))
    others = sample(pipe, [p for p in OTHER_PROMPTS for _ in range(2)], [s for _ in OTHER_PROMPTS for s in (0, 1)])
    return {"instance": instance, "others": others}


def to_instances(images: np.ndarray, instances: np.ndarray) -> dict:
    """Mean over samples of the distance to the nearest instance image."""
    mad = np.abs(images[:, None] - instances[None]).mean(axis=(2, 3, 4))  # (samples, instances)
    nearest = mad.argmin(1)
    return {"mean_abs": float(mad.min(1).mean()),
            "psnr": float(np.mean([psnr(img, instances[j]) for img, j in zip(images, nearest)]))}


def pairwise(a: np.ndarray, b: np.ndarray) -> dict:
    return {"mean_abs": float(np.abs(a - b).mean()), "psnr": float(np.mean([psnr(x, y) for x, y in zip(a, b)]))}


def train_lora(args, instance_dir: Path, out: Path, layers: str, sampling: str) -> tuple[float, str]:
    command = [sys.executable, str(ROOT / "training_examples" / "train_snapgen_lora.py"),
               "--pretrained_model_name_or_path", "default", "--instance_data_dir", str(instance_dir),
               "--instance_prompt", INSTANCE_PROMPT, "--resolution", "64", "--train_batch_size", str(args.batch_size),
               "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate), "--rank",
               str(args.rank), "--lora_layers", layers, "--timestep_sampling", sampling, "--seed", "0",
               "--report_to", "none",
               "--checkpointing_steps", str(args.steps * 10), "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SNAPGEN_DEFAULT_MODEL", None)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train_snapgen_lora.py ({layers}, {sampling}) failed:\n{proc.stderr[-3000:]}")
    shown = [Path(c).name if c.startswith(str(ROOT)) else c.replace(str(instance_dir.parent), "WORK")
             for c in command[1:]]  # no machine paths in the record
    return wall, " ".join(shown)


def grid(rows: list[np.ndarray]) -> Image.Image:
    width = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * 64, width * 64, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64] = image
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def main(argv=None):
    from diffusers_snapgen import load_default_pipeline

    args = parse_args(argv)
    cache_dir = args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers-snapgen"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lora-default-"))
    instance_paths = render_instances(cache_dir, work / "instance")
    instances = as_array([Image.open(p) for p in instance_paths])

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = samples(pipe, args.seeds)
    result = {"hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "subject": SUBJECT,
              "instance_prompt": INSTANCE_PROMPT, "other_prompts": list(OTHER_PROMPTS), "steps": args.steps,
              "rank": args.rank, "lora_layers": args.lora_layers, "learning_rate": args.learning_rate,
              "batch_size": args.batch_size,
              "before": {"instance_to_nearest": to_instances(before["instance"], instances),
                         "others_seed0_vs_seed1": pairwise(before["others"][::2], before["others"][1::2])},
              "runs": {}}
    rows = [{"model": "default model (no LoRA)", "train wall (s)": "—",
             "sks emoji → nearest instance, mean abs": result["before"]["instance_to_nearest"]["mean_abs"],
             "sks emoji → nearest instance, PSNR (dB)": result["before"]["instance_to_nearest"]["psnr"],
             "8 other prompts: after vs before, mean abs": "—", "8 other prompts: after vs before, PSNR (dB)": "—"}]
    scale = result["before"]["others_seed0_vs_seed1"]  # how far apart two seeds of one prompt are: the scale
    rows.append({"model": "reference: other prompts, seed 0 vs seed 1 (no LoRA)", "train wall (s)": "—",
                 "sks emoji → nearest instance, mean abs": "—", "sks emoji → nearest instance, PSNR (dB)": "—",
                 "8 other prompts: after vs before, mean abs": scale["mean_abs"],
                 "8 other prompts: after vs before, PSNR (dB)": scale["psnr"]})
    pictures = [list(instances), list(before["instance"]), list(before["others"][::2])]
    for layers, sampling in [(layers, sampling) for layers in args.lora_layers for sampling in args.timestep_sampling]:
        out = work / f"lora-{layers.replace(',', '-')}-{sampling}"
        wall, command = train_lora(args, work / "instance", out, layers, sampling)
        pipe.load_lora_weights(str(out))
        after = samples(pipe, args.seeds)
        pipe.unload_lora_weights()
        run = {"train_wall_s": wall, "command": command,
               "instance_to_nearest": to_instances(after["instance"], instances),
               "others_after_vs_before": pairwise(after["others"], before["others"])}
        result["runs"][f"{layers} {sampling}"] = run
        rows.append({"model": f"+ LoRA on {layers}, --timestep_sampling {sampling}", "train wall (s)": f"{wall:.0f}",
                     "sks emoji → nearest instance, mean abs": run["instance_to_nearest"]["mean_abs"],
                     "sks emoji → nearest instance, PSNR (dB)": run["instance_to_nearest"]["psnr"],
                     "8 other prompts: after vs before, mean abs": run["others_after_vs_before"]["mean_abs"],
                     "8 other prompts: after vs before, PSNR (dB)": run["others_after_vs_before"]["psnr"]})
        pictures += [list(after["instance"]), list(after["others"][::2])]
    title = (f"LoRA on the default model, {args.steps} steps on 8 images of a new subject ({SUBJECT}, Noto + Twemoji; "
             f"rank {args.rank}, learning rate {args.learning_rate:g}, batch {args.batch_size}), {result['hardware']}, "
             "64x64, 4-step sampling, pixels in [0, 1]")
    table = title + "\n\n" + markdown_table(rows, list(rows[0]))
    table += ("\n\nRows of lora_default_model_cpu.jpg: the instance images; before: 'sks emoji' (seeds 0-7) and the "
              "other prompts (seed 0); then, per run in table order, the same two rows after training.")
    write_results(args.out, "lora_default_model_cpu", result, table)
    tmp = args.out / ".tmp-lora_default_model_cpu.jpg"
    grid(pictures).save(tmp, format="JPEG", quality=90)
    tmp.replace(args.out / "lora_default_model_cpu.jpg")
    print(table)


if __name__ == "__main__":
    main()
