"""Autoencoder training: training_examples/train_autoencoder.py end to end (subprocesses, CPU, a tiny 16-channel f = 8
AutoencoderKL, offline) and the pieces of diffusers_snapgen.training.autoencoder_training.

The image folder has the recipe's layout (``train/`` + ``test/``); its ``test`` split repeats four training images,
so that a 60-step run from scratch measurably improves held-out PSNR (an autoencoder this small needs far longer to
generalise). A run resumed from a mid-run checkpoint in a new process ends bitwise identical to the uninterrupted one.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from helpers import assert_same_weights, read_metrics, run_once, run_script, session_folder

from diffusers_snapgen.testing import tiny_autoencoder_kl
from diffusers_snapgen.training.autoencoder_training import (
    PosteriorCapture,
    build_autoencoder,
    build_autoencoder_parser,
    kl_divergence,
    latent_statistics,
    parse_autoencoder_args,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training_examples" / "train_autoencoder.py"
STEPS = 60
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32,
              "mid_block_add_attention": False}


def shapes(seed: int, size: int = 48) -> Image.Image:
    """A flat background with a few coloured rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for k in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(10, 24, 2))
        (draw.ellipse if k % 2 else draw.rectangle)([x0, y0, x0 + w, y0 + h],
                                                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _run(args, home, timeout=300):
    return run_script(SCRIPT, args, home, timeout)


def _args(root, out, steps, *extra):
    return ["--train_data_dir", str(root / "data"), "--vae_config", str(root / "vae.json"), "--resolution", "32",
            "--eval_resolution", "48", "--random_flip", "--train_batch_size", "4", "--learning_rate", "3e-3",
            "--max_train_steps", str(steps), "--checkpointing_steps", "20", "--validation_steps", "20",
            "--report_to", "none", "--logging_steps", "1", "--seed", "0", "--use_ema", "--output_dir", str(out),
            "--discriminator_channels", "8", "--discriminator_num_layers", "2", "--gan_weight", "0.002",
            "--gan_start_step", "30", *extra]


def _make_assets(root: Path):
    for i in range(8):
        (root / "data" / "train").mkdir(parents=True, exist_ok=True)
        shapes(i).save(root / "data" / "train" / f"{i:03d}.png")  # no captions: a plain image folder
    (root / "data" / "test").mkdir()
    for i in range(4):
        shutil.copy(root / "data" / "train" / f"{i:03d}.png", root / "data" / "test" / f"{i:03d}.png")
    (root / "vae.json").write_text(json.dumps(VAE_CONFIG))



@pytest.fixture(scope="session")
def ae(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-autoencoder")
    run_once(root, "assets", lambda: _make_assets(root))
    run_once(root, "reference", lambda: (root / "ref-log.txt").write_text(
        _run(_args(root, root / "ref", STEPS), root / "hf").stderr))
    return root


def _pixels(images, size=32):
    """Square images (PIL or paths) resized to ``size`` (what preprocess_image does to them), ``(N, 3, s, s)``."""
    images = [im if isinstance(im, Image.Image) else Image.open(im) for im in images]
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------- pieces


def test_kl_divergence_and_posterior_capture_match_diffusers():
    from diffusers import AutoencoderKL

    vae = tiny_autoencoder_kl(seed=0, latent_channels=16)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    capture = PosteriorCapture(vae)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    moments = capture.pop()
    torch.testing.assert_close(kl_divergence(moments), dist.kl())
    assert kl_divergence(moments).shape == (2,)
    with pytest.raises(RuntimeError, match="no encoder forward"):
        capture.pop()
    capture.remove()
    with torch.no_grad():
        vae.encode(x)
    assert capture.moments is None  # the hook is gone
    with pytest.raises(ValueError, match="`moments`"):
        kl_divergence(torch.zeros(2, 3, 4, 4))

    no_quant = AutoencoderKL(**{**VAE_CONFIG, "use_quant_conv": False})  # the hook goes on the encoder
    capture = PosteriorCapture(no_quant)
    with torch.no_grad():
        dist = no_quant.encode(x).latent_dist
    torch.testing.assert_close(kl_divergence(capture.pop()), dist.kl())
    no_quant.enable_tiling()
    with pytest.raises(ValueError, match="tiling"):
        PosteriorCapture(no_quant)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        PosteriorCapture(torch.nn.Linear(2, 2))


def test_latent_statistics_are_those_of_posterior_samples():
    vae = tiny_autoencoder_kl(seed=1, latent_channels=16)
    rows = [{"image": shapes(i)} for i in range(5)]
    stats = latent_statistics(vae, rows, resolution=32, batch_size=2)
    assert stats["num_images"] == 5 and stats["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert stats["shift_factor"] == stats["mean"]
    with torch.no_grad():
        dist = vae.encode(_pixels([r["image"] for r in rows])).latent_dist
        g = torch.Generator().manual_seed(0)
        z = torch.stack([dist.sample(generator=g) for _ in range(200)])
    assert stats["mean"] == pytest.approx(z.mean().item(), abs=0.01 * stats["std"])
    assert stats["std"] == pytest.approx(z.std().item(), rel=0.01)
    assert latent_statistics(vae, rows, resolution=32, max_images=2)["num_images"] == 2
    with pytest.raises(ValueError, match="max_images"):
        latent_statistics(vae, rows, resolution=32, max_images=0)
    with pytest.raises(ValueError, match="`resolution`"):
        latent_statistics(vae, rows, resolution=0)
    with pytest.raises(TypeError, match="`vae`"):
        latent_statistics(object(), rows)


def test_generalised_decoder_pieces_keep_their_defaults(caplog):
    """The reused tiny-decoder pieces: L1 reconstruction in DecoderLosses and the LPIPS warning's fallback text."""
    import logging

    import torch.nn.functional as F

    from diffusers_snapgen.training.reconstruction import DecoderLosses, load_lpips

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    loss, logs = DecoderLosses(mse_weight=2.0, lpips_weight=0, gan_weight=0).generator(a, b)
    assert logs.keys() == {"mse"} and loss.item() == pytest.approx(2 * F.mse_loss(a, b).item())
    loss, logs = DecoderLosses(mse_weight=2.0, lpips_weight=0, gan_weight=0, reconstruction_loss="l1").generator(a, b)
    assert logs.keys() == {"l1"} and loss.item() == pytest.approx(2 * F.l1_loss(a, b).item())
    with pytest.raises(ValueError, match="--reconstruction_loss"):
        DecoderLosses(reconstruction_loss="l2")
    if importlib.util.find_spec("lpips") is None:
        with caplog.at_level(logging.WARNING, logger="diffusers_snapgen.training"):
            assert load_lpips("vgg", fallback="L1 + KL") is None
        assert "continues with L1 + KL only" in caplog.text
    with pytest.raises(ValueError, match="`fallback`"):
        load_lpips("vgg", fallback="")


def _base(tmp_path, *extra):
    (tmp_path / "data" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "test").mkdir(exist_ok=True)
    return ["--train_data_dir", str(tmp_path / "data"), "--report_to", "none", "--logging_steps", "1", *extra]


def test_flags_defaults_and_errors(tmp_path, capsys):
    config = json.dumps(VAE_CONFIG)
    args = parse_autoencoder_args(_base(tmp_path, "--vae_config", config))
    assert args.vae_config == VAE_CONFIG and args.reconstruction_loss == "l1" and args.kl_weight == 1e-6
    assert args.gan_weight == 0 and args.lpips_weight == 1.0 and args.resolution == 256 and args.eval_resolution == 256
    assert parse_autoencoder_args(_base(tmp_path, "--vae_config", config, "--resolution", "64")).eval_resolution == 64
    assert args.validation_data_dir == str(tmp_path / "data" / "test")  # the recipe's test split
    assert args.tracker_project_name == "snapgen-autoencoder" and args.output_dir == "snapgen-autoencoder"
    help_text = build_autoencoder_parser().format_help()
    assert "--kl_weight" in help_text and "--decoder_config" not in help_text
    assert "--pretrained_model_name_or_path" not in help_text

    errors = [
        (["--vae_config", config, "--kl_weight", "-1"], "--kl_weight"),
        ([], "--vae_config"),
        (["--vae_config", config, "--vae_model_name_or_path", str(tmp_path)], "exactly one"),
        (["--vae_config", json.dumps({"latent_channel": 16})], "latent_channel"),
        (["--vae_config", "[1, 2]"], "--vae_config"),
        (["--vae_config", config, "--num_scale_images", "0"], "--num_scale_images"),
        (["--vae_config", config, "--resolution", "36"], "--resolution"),
        (["--vae_config", config, "--gan_weight", "0.1", "--resolution", "16"], "--discriminator_num_layers"),
    ]
    for extra, match in errors:
        with pytest.raises(ValueError, match=match):
            parse_autoencoder_args(_base(tmp_path, *extra))
    for extra in (["--reconstruction_loss", "l3"], ["--pretrained_model_name_or_path", "x"]):  # not its flags
        with pytest.raises(SystemExit) as e:
            parse_autoencoder_args(_base(tmp_path, "--vae_config", config, *extra))
        assert e.value.code == 2

    # the script turns a bad flag into argparse's error: exit status 2, the flag named
    spec = importlib.util.spec_from_file_location("train_autoencoder", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        script.main(_base(tmp_path, "--vae_config", config, "--kl_weight", "-1"))
    assert e.value.code == 2 and "--kl_weight must be a finite number >= 0" in capsys.readouterr().err

    deep = parse_autoencoder_args(_base(tmp_path, "--resolution", "40", "--eval_resolution", "48", "--vae_config",
                                        json.dumps({**VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * 5,
                                                    "up_block_types": ["UpDecoderBlock2D"] * 5,
                                                    "block_out_channels": [8, 8, 8, 16, 16]})))
    with pytest.raises(ValueError, match="--resolution 40 must be a multiple of the autoencoder's downsampling factor"):
        build_autoencoder(deep)


# ---------------------------------------------------------------------- the script


def test_autoencoder_run_learns_and_writes_a_diffusers_autoencoder(ae):
    from diffusers import AutoencoderKL

    ref = ae / "ref"
    results = json.loads((ref / "eval_results.json").read_text())
    print(f"held-out PSNR {results['initial']['psnr']:.2f} -> {results['final']['psnr']:.2f} dB, SSIM "
          f"{results['initial']['ssim']:.4f} -> {results['final']['ssim']:.4f}; scaling_factor "
          f"{results['scaling_factor']:.4f}, shift_factor {results['shift_factor']:.4f}")
    assert results["num_eval_images"] == 4 and results["lpips"] is False  # the test split, found by default
    assert results["final"]["psnr"] > results["initial"]["psnr"] + 1.0, results
    assert results["final"]["ssim"] > results["initial"]["ssim"], results
    log = (ae / "ref-log.txt").read_text()
    assert log.count("LPIPS is OFF") == 1 and "L1 + KL + GAN only" in log  # one clear warning, then L1 + KL + GAN
    evals = read_metrics(ref, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    metrics = read_metrics(ref)
    assert len(metrics) == STEPS and {"l1", "kl", "loss"} <= metrics[0].keys() and "g_adv" not in metrics[0]
    assert {"g_adv", "d_loss"} <= metrics[-1].keys() and "mse" not in metrics[-1]
    ckpt = ref / f"checkpoint-{STEPS}"
    for name in ("vae", "vae_ema", "model.safetensors", "optimizer.bin", "optimizer_1.bin", "scheduler_1.bin"):
        assert (ckpt / name).exists(), name
    assert not any(p.name.startswith(".tmp") for p in ref.iterdir())

    vae = AutoencoderKL.from_pretrained(str(ref)).eval()  # diffusers format, EMA weights
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4  # f = 8
    assert vae.config.scaling_factor == pytest.approx(results["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(results["shift_factor"])
    # recompute the latent statistics of the training images: closed form and from samples
    x = _pixels(sorted((ae / "data" / "train").glob("*.png")))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        g = torch.Generator().manual_seed(0)
        z = torch.stack([dist.sample(generator=g) for _ in range(100)]).double()
    mean = dist.mean.double().mean()
    std = ((dist.mean.double() - mean).pow(2).mean() + dist.var.double().mean()).sqrt()
    assert vae.config.shift_factor == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)
    assert vae.config.scaling_factor == pytest.approx(1 / std.item(), rel=1e-4)
    assert vae.config.shift_factor == pytest.approx(z.mean().item(), abs=0.01 * z.std().item())
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.01)
    assert x.shape[-1] // 8 == dist.mean.shape[-1] and dist.mean.shape[1] == 16


def test_autoencoder_resume_from_a_mid_run_checkpoint_is_identical(ae):
    """A new process resumes the reference run's step-40 checkpoint (GAN on since step 30) and ends where it ended."""
    out = ae / "resume"
    out.mkdir()
    shutil.copytree(ae / "ref" / "checkpoint-40", out / "checkpoint-40")
    proc = _run(_args(ae, out, STEPS, "--resume_from_checkpoint", "latest"), ae / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    for sub in ("diffusion_pytorch_model.safetensors", f"checkpoint-{STEPS}/vae/diffusion_pytorch_model.safetensors",
                f"checkpoint-{STEPS}/vae_ema/diffusion_pytorch_model.safetensors",
                f"checkpoint-{STEPS}/model.safetensors"):
        assert_same_weights(ae / "ref" / sub, out / sub, sub)
    ref_config = json.loads((ae / "ref" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (ref_config["scaling_factor"],
                                                                  ref_config["shift_factor"])
    # a resumed run does not re-evaluate the untrained model
    assert "initial" not in json.loads((out / "eval_results.json").read_text())


def test_autoencoder_options_continue_mse_accumulation_bf16_checkpointing(ae):
    out = ae / "options"
    args = _args(ae, out, 2, "--vae_model_name_or_path", str(ae / "ref"), "--reconstruction_loss", "mse",
                 "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--gradient_checkpointing",
                 "--num_scale_images", "3", "--lpips_weight", "0", "--gan_start_step", "0", "--r1_gamma", "1.0",
                 "--lr_scheduler", "cosine", "--lr_warmup_steps", "1")
    i = args.index("--vae_config")
    del args[i:i + 2]  # the architecture comes from the autoencoder being continued
    proc = _run(args, ae / "hf")
    assert "LPIPS is OFF" not in proc.stderr
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all({"mse", "kl", "g_adv", "d_loss", "r1"} <= m.keys() for m in metrics)
    results = json.loads((out / "eval_results.json").read_text())
    ref = json.loads((ae / "ref" / "eval_results.json").read_text())
    assert results["initial"]["psnr"] == pytest.approx(ref["final"]["psnr"], abs=1e-3)  # started from the trained one
    assert results["latent_statistics"]["num_images"] == 3
