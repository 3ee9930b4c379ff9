"""End-to-end runs of training_examples/train_tiny_decoder.py (subprocesses, CPU, tiny models, offline).

The frozen encoder is a tiny AutoencoderKL with 16 latent channels, briefly trained here as an autoencoder (a random
encoder's GroupNorms erase most colour information, a trained one - like SD3's - keeps it). A short run of the
script improves PSNR on held-out images over the untrained decoder (generated landscapes; scikit-image's bundled
photos when scikit-image is installed), writes a loadable TinyDecoder in diffusers format, and a run stopped
from a mid-run checkpoint in a new process ends bitwise identical (decoder, EMA, patch discriminator).
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from helpers import (assert_same_weights, landscape, read_metrics, run_once, run_script, session_folder,
                     trained_tiny_autoencoder)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training_examples" / "train_tiny_decoder.py"
STEPS = 60
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _run(args, home, timeout=300):
    return run_script(SCRIPT, args, home, timeout)


def _args(vae, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(vae), "--train_data_dir", str(data), "--resolution", "32",
            "--eval_resolution", "64", "--random_flip", "--train_batch_size", "4", "--learning_rate", "3e-3",
            "--max_train_steps", str(steps), "--checkpointing_steps", "20", "--validation_steps", "20",
            "--report_to", "none", "--logging_steps", "1", "--seed", "3", "--use_ema", "--output_dir", str(out), "--discriminator_channels", "8",
            "--discriminator_num_layers", "2", "--gan_weight", "0.05", "--gan_start_step", "30",
            "--decoder_config", json.dumps({"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1,
                                            "norm_num_groups": 8}), *extra]


def _make_assets(root: Path):
    images = [landscape(i) for i in range(20)]
    (root / "data").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(root / "data" / f"{i:03d}.png")  # no captions: a plain image folder
    trained_tiny_autoencoder(images[:16], root / "vae")  # the last 4 are held out for evaluation


@pytest.fixture(scope="session")
def dec(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-decoder")
    run_once(root, "assets", lambda: _make_assets(root))
    run_once(root, "reference", lambda: (root / "ref-log.txt").write_text(
        _run(_args(root / "vae", root / "data", root / "ref", STEPS, "--num_eval_images", "4"), root / "hf").stderr))
    return root


def test_decoder_run_learns_and_writes_a_diffusers_tiny_decoder(dec):
    from diffusers import AutoencoderKL

    from diffusers_snapgen import TinyDecoder

    ref = dec / "ref"
    results = json.loads((ref / "eval_results.json").read_text())
    print(f"held-out PSNR {results['initial']['psnr']:.2f} -> {results['final']['psnr']:.2f} dB, SSIM "
          f"{results['initial']['ssim']:.4f} -> {results['final']['ssim']:.4f}")
    assert results["num_eval_images"] == 4 and results["lpips"] is False
    assert results["final"]["psnr"] > results["initial"]["psnr"] + 2.0, results
    log = (dec / "ref-log.txt").read_text()
    assert log.count("LPIPS is OFF") == 1  # one clear warning, then MSE + GAN
    evals = read_metrics(ref, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    metrics = read_metrics(ref)
    assert len(metrics) == STEPS and "g_adv" not in metrics[0] and {"g_adv", "d_loss"} <= metrics[-1].keys()
    ckpt = ref / f"checkpoint-{STEPS}"
    for name in ("decoder", "decoder_ema", "model.safetensors", "optimizer.bin", "optimizer_1.bin", "scheduler_1.bin"):
        assert (ckpt / name).exists(), name
    assert not any(p.name.startswith(".tmp") for p in ref.iterdir())

    decoder = TinyDecoder.from_pretrained(str(ref))  # diffusers format, EMA weights
    vae = AutoencoderKL.from_pretrained(str(dec / "vae"))
    assert decoder.config.latent_channels == 16 and decoder.config.scaling_factor == vae.config.scaling_factor
    with torch.no_grad():
        image = decoder.decode(torch.randn(1, 16, 4, 4)).sample
    assert image.shape == (1, 3, 32, 32)


def test_decoder_resume_from_a_mid_run_checkpoint_is_identical(dec):
    """A new process resumes the reference run's step-40 checkpoint and ends where the reference ended."""
    import shutil

    out = dec / "resume"
    out.mkdir()
    shutil.copytree(dec / "ref" / "checkpoint-40", out / "checkpoint-40")
    args = _args(dec / "vae", dec / "data", out, STEPS, "--num_eval_images", "4", "--resume_from_checkpoint", "latest")
    proc = _run(args, dec / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    for sub in ("diffusion_pytorch_model.safetensors", f"checkpoint-{STEPS}/decoder/diffusion_pytorch_model.safetensors",
                f"checkpoint-{STEPS}/decoder_ema/diffusion_pytorch_model.safetensors",
                f"checkpoint-{STEPS}/model.safetensors"):
        assert_same_weights(dec / "ref" / sub, out / sub, sub)
    # a resumed run does not re-evaluate the untrained decoder
    assert "initial" not in json.loads((out / "eval_results.json").read_text())


def test_decoder_run_improves_psnr_on_scikit_image_photos(dec):
    data = pytest.importorskip("skimage.data", reason="scikit-image (a test dependency) provides the bundled photos")
    root = dec / "photos"
    images = [ImageOps.fit(Image.fromarray(getattr(data, name)()), (128, 128), Image.BICUBIC) for name in PHOTOS]
    (root / "images").mkdir(parents=True)
    for name, image in zip(PHOTOS, images, strict=True):
        image.save(root / "images" / f"{name}.png")
    trained_tiny_autoencoder(images, root / "vae")
    _run(_args(root / "vae", root / "images", root / "out", STEPS, "--validation_data_dir", str(root / "images")),
         dec / "hf")
    results = json.loads((root / "out" / "eval_results.json").read_text())
    print(f"PSNR on {', '.join(PHOTOS)}: untrained {results['initial']['psnr']:.2f} dB -> "
          f"{results['final']['psnr']:.2f} dB (SSIM {results['initial']['ssim']:.4f} -> {results['final']['ssim']:.4f})")
    assert results["num_eval_images"] == 4
    assert results["final"]["psnr"] > results["initial"]["psnr"] + 2.0, results


def test_decoder_run_on_cached_images_and_latents_learns(dec):
    """``--cache_images --cache_latents``: whole images on the device and the encoder run once, before training."""
    out = dec / "cached"
    _run(_args(dec / "vae", dec / "data", out, 40, "--num_eval_images", "4", "--cache_images", "--cache_latents"),
         dec / "hf")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["final"]["psnr"] > results["initial"]["psnr"] + 2.0, results
    assert len(read_metrics(out)) == 40 and list((out / "cache").glob("images-*.safetensors"))


def test_decoder_options_continue_from_a_decoder_with_r1_accumulation_bf16(dec):
    out = dec / "options"
    args = _args(dec / "vae", dec / "data", out, 2, "--num_eval_images", "4", "--decoder_model_name_or_path",
                 str(dec / "ref"), "--r1_gamma", "1.0", "--gan_loss", "non_saturating", "--gan_start_step", "0",
                 "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--gradient_checkpointing")
    i = args.index("--decoder_config")
    del args[i:i + 2]  # the architecture comes from the decoder being continued
    _run(args, dec / "hf")
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all({"r1", "g_adv", "d_loss"} <= m.keys() for m in metrics)
    results = json.loads((out / "eval_results.json").read_text())
    ref = json.loads((dec / "ref" / "eval_results.json").read_text())
    # it started from the trained decoder (an untrained one is dB lower); bf16 evaluation moves PSNR by ~1e-3 dB
    assert results["initial"]["psnr"] == pytest.approx(ref["final"]["psnr"], abs=0.02)
