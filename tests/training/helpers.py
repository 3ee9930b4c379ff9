"""Tiny offline teacher/student/data builders and the script runner shared by the tests of tests/training/ (no tests
here; the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import subprocess
import sys
import torch
from PIL import Image, ImageDraw, ImageFilter

TINY_JOINT_DIM = 24
TINY_POOLED_DIM = 20

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle")


def tiny_teacher(seed: int = 0, in_channels: int = 4, joint_attention_dim: int = TINY_JOINT_DIM,
                 pooled_projection_dim: int = TINY_POOLED_DIM, num_layers: int = 4):
    """A tiny SD3Transformer2DModel (random weights), patch 2, whose text dims match ``testing.tiny_unet``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32, pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=32,
    ).eval()


def draw_image(color: str, shape: str, size: int = 40, offset: int = 0) -> Image.Image:
    arr = np.full((size, size, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2 + offset
    if shape == "square":
        mask = (abs(yy - c) < size // 4) & (abs(xx - c) < size // 4)
    else:
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size // 4) ** 2
    arr[mask] = COLORS[color]
    return Image.fromarray(arr)


def write_imagefolder(root: os.PathLike, n: int = 8, size: int = 40) -> Path:
    """``n`` PNGs of coloured shapes with ``metadata.jsonl`` captions ("a red circle"), datasets' imagefolder layout."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n):
        color, shape = combos[i % len(combos)]
        name = f"{i:03d}.png"
        draw_image(color, shape, size, offset=(i // len(combos)) % 3 - 1).save(root / name)
        rows.append({"file_name": name, "text": f"a {color} {shape}"})
    with open(root / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return root


def landscape(seed: int, size: int = 64) -> Image.Image:
    """A photo-like test image: sky and ground gradients, a sun, a few objects, sensor noise, slight blur."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, size)[:, None, None]
    horizon = rng.uniform(0.45, 0.7)
    sky = np.array([90, 150, 230]) + rng.normal(0, 12, 3)
    ground = np.array([70, 130, 50]) + rng.normal(0, 12, 3)
    arr = np.where(y < horizon, sky * (0.75 + 0.35 * y), ground * (1.1 - 0.4 * (y - horizon))) * np.ones((1, size, 1))
    image = Image.fromarray((arr + rng.normal(0, 6, arr.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    sx, sy = int(rng.integers(4, size - 16)), int(rng.integers(2, int(size * horizon * 0.6) + 3))
    draw.ellipse([sx, sy, sx + 10, sy + 10], fill=(250, 230, 120))
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size - 12)), int(size * horizon) + int(rng.integers(-6, 6)) - 10
        draw.rectangle([x0, y0, x0 + int(rng.integers(6, 14)), y0 + int(rng.integers(8, 16))],
                       fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
    return image.filter(ImageFilter.SMOOTH)


def trained_tiny_autoencoder(images: list[Image.Image], out: Path, steps: int = 120):
    """A tiny 16-channel AutoencoderKL trained briefly (MSE on random 32² patches), posterior narrowed, saved."""
    from diffusers_snapgen.testing import tiny_autoencoder_kl

    tensors = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images]
    vae = tiny_autoencoder_kl(seed=0, latent_channels=16).train()
    opt = torch.optim.Adam(vae.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = []
        for i in torch.randint(0, len(tensors), (8,), generator=g).tolist():
            t = tensors[i]
            top, left = (int(torch.randint(0, s - 31, (1,), generator=g)) for s in t.shape[1:])
            batch.append(t[:, top:top + 32, left:left + 32])
        x = torch.stack(batch)
        loss = (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # a trained VAE's posterior is narrow
        vae.quant_conv.weight[16:] = 0
        vae.quant_conv.bias[16:] = -12.0
    vae.eval().save_pretrained(out)
    return out


def make_denoiser_assets(root: os.PathLike):
    """The denoiser scripts' tiny offline assets under ``root``: a base pipeline (CLIP-L + CLIP-G: joint 32, pooled
    20; a VAE with a narrow posterior), an SD3 teacher (``teacher/transformer``) and 8 captioned images (``data``)."""
    from diffusers_snapgen.testing import tiny_pipeline

    root = Path(root)
    pipe = tiny_pipeline(text_encoder="clip", vae="kl")
    c = pipe.vae.config.latent_channels
    with torch.no_grad():  # a trained VAE's posterior is narrow: give the random one a tiny std (logvar -12)
        pipe.vae.quant_conv.weight[c:] = 0
        pipe.vae.quant_conv.bias[c:] = -12.0
    pipe.save_pretrained(root / "base")
    tiny_teacher(seed=3, joint_attention_dim=32, pooled_projection_dim=20).save_pretrained(root / "teacher" / "transformer")
    write_imagefolder(root / "data", n=8, size=40)


def session_folder(tmp_path_factory, worker_id: str, testrun_uid: str, name: str) -> Path:
    """A folder shared by every pytest-xdist worker of this test session (``name-<testrun_uid>``)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / f"{name}-{testrun_uid}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_once(root: Path, name: str, build):
    """Runs ``build()`` once per test session, whichever xdist worker gets there first; the others wait."""
    from filelock import FileLock

    with FileLock(str(root / ".lock")):
        if not (root / f"{name}.done").exists():
            build()
            (root / f"{name}.done").touch()


def load_weights(source) -> dict:
    """A state dict from a dict, a safetensors file, or a model folder (its ``diffusion_pytorch_model.safetensors``)."""
    if isinstance(source, dict):
        return source
    from safetensors.torch import load_file

    path = Path(source)
    return load_file(str(path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path))


def max_weight_diff(a, b) -> float:
    """Largest absolute difference between two state dicts with the same keys (see :func:`load_weights`)."""
    a, b = load_weights(a), load_weights(b)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_weights(a, b, what: str = ""):
    """Same keys, bitwise equal tensors (``torch.equal``); the message names the first differing tensor."""
    x, y = load_weights(a), load_weights(b)
    assert x.keys() == y.keys(), what
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, (f"{what or a}: {len(differ)} tensors differ, e.g. {differ[0]} by up to "
                        f"{(x[differ[0]].float() - y[differ[0]].float()).abs().max().item()}")


ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "training_examples"


def script_env(home) -> dict:
    """The environment of a training-script subprocess: CPU, offline, one thread, a private HF home."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(home), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_script(script, args, home, timeout=300, expect_success: bool = True):
    """Runs a training script (a path, or a file name under training_examples/) in a subprocess; returns it."""
    script = Path(script) if Path(script).is_absolute() else EXAMPLES / script
    proc = subprocess.run([sys.executable, str(script), *args], env=script_env(home), capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    if expect_success:
        assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(output_dir, name: str = "metrics.jsonl") -> list[dict]:
    """The rows of ``<output_dir>/logs/<name>``."""
    return [json.loads(line) for line in (Path(output_dir) / "logs" / name).read_text().splitlines()]


CONFIGS = EXAMPLES / "configs"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_script(script, args, home, num_processes: int = 2, config: str = "ddp.yaml", timeout=300):
    """``accelerate launch --config_file training_examples/configs/<config> --num_processes N`` of a training script
    on CPU processes (gloo: ACCELERATE_USE_CPU, see docs/distributed_training.md); returns the finished process."""
    script = Path(script) if Path(script).is_absolute() else EXAMPLES / script
    env = {**script_env(home), "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(num_processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"{script.name} x{num_processes} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def write_tar_shards(image_folder, out, per_shard: int = 3) -> str:
    """The images and captions of an imagefolder (``write_imagefolder``) as WebDataset tar shards
    ``out/train-00000.tar ...`` (``<key>.png`` + ``<key>.txt``); returns the brace pattern naming them."""
    import io
    import tarfile

    image_folder, out = Path(image_folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    shards = [rows[i: i + per_shard] for i in range(0, len(rows), per_shard)]
    for s, shard in enumerate(shards):
        with tarfile.open(out / f"train-{s:05d}.tar", "w") as tar:
            for row in shard:
                key = Path(row["file_name"]).stem
                for ext, data in (("png", (image_folder / row["file_name"]).read_bytes()), ("txt", row["text"].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"train-{{00000..{len(shards) - 1:05d}}}.tar")
