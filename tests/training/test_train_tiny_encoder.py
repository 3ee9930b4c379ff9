"""End-to-end runs of training_examples/train_tiny_encoder.py (subprocesses, CPU, tiny models, offline).

The distilled encoder is a tiny 16-channel AutoencoderKL briefly trained here on generated landscapes. A short run
from the device image cache lowers the held-out latent MSE and raises the PSNR of the decoded tiny latents, writes a
loadable TinyEncoder with the autoencoder's latent statistics, and a run resumed from a mid-run checkpoint in a new
process ends bitwise identical (encoder, EMA, optimizer state).
"""

import json
import shutil

import torch
from helpers import (assert_same_weights, landscape, read_metrics, run_once, run_script, session_folder,
                     trained_tiny_autoencoder)

STEPS = 30


def _args(vae, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(vae), "--train_data_dir", str(data), "--resolution", "32",
            "--cache_images", "--cache_image_resolution", "64", "--eval_resolution", "64", "--random_flip",
            "--train_batch_size", "4", "--learning_rate", "3e-3", "--max_train_steps", str(steps),
            "--checkpointing_steps", "10", "--validation_steps", "10", "--num_eval_images", "4", "--report_to", "none",
            "--logging_steps", "1", "--seed", "5", "--use_ema", "--ema_decay", "0.9", "--output_dir", str(out),
            "--encoder_config", json.dumps({"block_out_channels": [8, 16, 16, 32], "layers_per_block": 1,
                                            "norm_num_groups": 8}), *extra]


def _make_assets(root):
    images = [landscape(i) for i in range(16)]
    (root / "data").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(root / "data" / f"{i:03d}.png")
    trained_tiny_autoencoder(images[:12], root / "vae", steps=60)  # the last 4 are held out


def _fixture_root(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-encoder")
    run_once(root, "assets", lambda: _make_assets(root))
    args = _args(root / "vae", root / "data", root / "ref", STEPS)
    run_once(root, "reference", lambda: run_script("train_tiny_encoder.py", args, root / "hf"))
    return root


def test_encoder_run_learns_the_autoencoder_latents(tmp_path_factory, worker_id, testrun_uid):
    from diffusers import AutoencoderKL

    from diffusers_snapgen import TinyEncoder

    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    ref = root / "ref"
    results = json.loads((ref / "eval_results.json").read_text())
    initial, final = results["initial"], results["final"]
    print(f"held-out latent MSE {initial['latent_mse']:.4f} -> {final['latent_mse']:.4f}, decoded PSNR "
          f"{initial['psnr']:.2f} -> {final['psnr']:.2f} dB (autoencoder itself: {results['autoencoder']['psnr']:.2f})")
    assert final["latent_mse"] < 0.5 * initial["latent_mse"], results
    assert final["psnr"] > initial["psnr"] + 1.0, results
    assert "lpips" not in results and results["num_eval_images"] == 4
    assert [e["step"] for e in read_metrics(ref, "eval.jsonl")] == [0, 10, 20, 30]
    metrics = read_metrics(ref)
    assert len(metrics) == STEPS and "latent_mse" in metrics[0] and "pixel_mse" not in metrics[0]
    assert metrics[-1]["latent_mse"] < metrics[0]["latent_mse"]
    ckpt = ref / f"checkpoint-{STEPS}"
    for name in ("encoder", "encoder_ema", "optimizer.bin"):
        assert (ckpt / name).exists(), name
    assert not (ckpt / "optimizer_1.bin").exists()  # no discriminator: one optimizer

    encoder = TinyEncoder.from_pretrained(str(ref))  # diffusers format, EMA weights
    vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    assert results["parameters"] == sum(p.numel() for p in encoder.parameters())
    assert (encoder.config.scaling_factor, encoder.config.shift_factor) == (vae.config.scaling_factor,
                                                                            vae.config.shift_factor)
    with torch.no_grad():
        assert encoder.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode().shape == (1, 16, 4, 4)


def test_encoder_resume_from_a_mid_run_checkpoint_is_identical(tmp_path_factory, worker_id, testrun_uid):
    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    out = root / "resume"
    out.mkdir()
    shutil.copytree(root / "ref" / "checkpoint-20", out / "checkpoint-20")
    proc = run_script("train_tiny_encoder.py", _args(root / "vae", root / "data", out, STEPS,
                                                     "--resume_from_checkpoint", "latest"), root / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    weights = "diffusion_pytorch_model.safetensors"
    for sub in (weights, f"checkpoint-{STEPS}/encoder/{weights}", f"checkpoint-{STEPS}/encoder_ema/{weights}"):
        assert_same_weights(root / "ref" / sub, out / sub, sub)
    assert "initial" not in json.loads((out / "eval_results.json").read_text())


def test_encoder_pixel_loss_from_a_data_loader(tmp_path_factory, worker_id, testrun_uid):
    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    out = root / "pixel"
    args = _args(root / "vae", root / "data", out, 2, "--pixel_loss_weight", "0.5", "--gradient_accumulation_steps",
                 "2", "--encoder_model_name_or_path", str(root / "ref"))
    args.remove("--cache_images")
    i = args.index("--encoder_config")
    del args[i:i + 2]  # the architecture comes from the encoder being continued
    run_script("train_tiny_encoder.py", args, root / "hf")
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all({"latent_mse", "pixel_mse"} <= m.keys() for m in metrics)
    results = json.loads((out / "eval_results.json").read_text())
    ref = json.loads((root / "ref" / "eval_results.json").read_text())
    assert results["initial"]["latent_mse"] == ref["final"]["latent_mse"]  # it continued the trained encoder


def test_encoder_run_on_cached_latents_learns(tmp_path_factory, worker_id, testrun_uid):
    """``--cache_images --cache_latents``: whole images on the device, the autoencoder's posterior means computed once
    before training and gathered as each step's targets."""
    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    out = root / "cached"
    args = _args(root / "vae", root / "data", out, STEPS, "--cache_latents")
    args[args.index("--cache_image_resolution") + 1] = "32"  # whole images are the patches
    run_script("train_tiny_encoder.py", args, root / "hf")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["final"]["latent_mse"] < 0.5 * results["initial"]["latent_mse"], results
    assert results["final"]["psnr"] > results["initial"]["psnr"] + 1.0, results
    assert len(read_metrics(out)) == STEPS and list((out / "cache").glob("images-*.safetensors"))
