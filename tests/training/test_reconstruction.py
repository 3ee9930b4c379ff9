"""Tiny-decoder training pieces: patches, PSNR/SSIM, LPIPS fallback, losses, atomic saving and the flags."""

import logging
import random
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_snapgen.testing import tiny_decoder
from diffusers_snapgen.training.decoder_training import (
    DecoderLosses,
    ImagePatchDataset,
    build_decoder_parser,
    load_lpips,
    parse_decoder_args,
    psnr,
    random_patch,
    save_model_atomically,
    ssim,
)
from diffusers_snapgen.training.discriminator import PatchDiscriminator


def _image(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_psnr_and_ssim_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    assert psnr(x, x).min() > 100
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim(x, noisy)
    assert (s < 0.9).all() and (s > 0).all()
    torch.testing.assert_close(ssim(noisy, x), s)  # symmetric
    assert (ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)) > s).all()  # less noise, higher SSIM
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="differ"):
        psnr(x, x[:1])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed (test dependency)")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 40, 48, generator=g)
    y = (x * 0.8 + 0.1 + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-5)
    assert psnr(x, y).item() == pytest.approx(metrics.peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=1.0),
                                              abs=1e-4)


def test_random_patches_are_native_resolution_crops_and_reproducible():
    image = _image(size=(48, 40))
    p = random_patch(image, 32, random.Random(0))
    assert p.shape == (3, 32, 32) and p.min() >= -1 and p.max() <= 1
    torch.testing.assert_close(p, random_patch(image, 32, random.Random(0)))
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert any(torch.equal(p, arr[:, t:t + 32, x:x + 32]) for t in range(9) for x in range(17))  # no resizing
    assert random_patch(_image(size=(20, 16)), 32, random.Random(0)).shape == (3, 32, 32)  # small: resized up
    flipped = random_patch(image, 32, random.Random(0), flip=True)
    torch.testing.assert_close(flipped, p.flip(-1))
    ds = ImagePatchDataset([{"image": _image(i)} for i in range(3)], resolution=16, random_flip=True, seed=5)
    first = ds[1]["pixel_values"]
    torch.testing.assert_close(first, ds[1]["pixel_values"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[1]["pixel_values"]) and ds[1]["index"] == 1
    with pytest.raises(ValueError, match="--resolution"):
        random_patch(image, 0, random.Random(0))


def test_lpips_missing_package_warns_once_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="diffusers_snapgen.training"):
        assert load_lpips("vgg") is None
    assert len(caplog.records) == 1 and "LPIPS is OFF" in caplog.text and "pip install lpips" in caplog.text


def test_lpips_missing_weights_warns_once(monkeypatch, caplog):
    def no_weights(**kw):
        raise OSError("cannot download vgg16 weights")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=no_weights))
    with caplog.at_level(logging.WARNING, logger="diffusers_snapgen.training"):
        assert load_lpips("alex") is None
    assert len(caplog.records) == 1 and "weights" in caplog.text and "MSE + GAN" in caplog.text
    with pytest.raises(ValueError, match="--lpips_net"):
        load_lpips("resnet")


def test_decoder_losses():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    recon = (target + 0.1 * torch.randn(target.shape, generator=g)).requires_grad_(True)
    disc = PatchDiscriminator(3, 8, num_layers=2, norm_num_groups=4)
    fake_lpips = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    losses = DecoderLosses(mse_weight=1.0, lpips_weight=0.5, gan_weight=0.1, lpips_model=fake_lpips)
    loss, logs = losses.generator(recon, target)
    assert set(logs) == {"mse", "lpips"} and all(v.ndim == 0 for v in logs.values())  # device scalars, no sync
    assert loss.item() == pytest.approx((logs["mse"] + 0.5 * logs["lpips"]).item(), rel=1e-5)
    loss, logs = losses.generator(recon, target, disc)
    assert set(logs) == {"mse", "lpips", "g_adv"}
    d_loss, d_logs = DecoderLosses(r1_gamma=1.0).discriminator(target, recon, disc)
    assert {"d_loss", "d_real", "d_fake", "r1"} <= set(d_logs)
    d_loss.backward()
    assert recon.grad is None and all(p.grad is not None for p in disc.parameters())  # fake is detached
    with pytest.raises(ValueError, match="--gan_loss"):
        DecoderLosses(gan_loss="wgan")
    with pytest.raises(ValueError, match="--mse_weight"):
        DecoderLosses(mse_weight=-1)


def test_save_model_atomically_writes_a_loadable_diffusers_model(tmp_path):
    from diffusers_snapgen import TinyDecoder

    (tmp_path / "keep.txt").write_text("other content stays")
    save_model_atomically(tiny_decoder(seed=0, latent_channels=16), tmp_path)
    save_model_atomically(tiny_decoder(seed=1, latent_channels=16), tmp_path)  # replaces the first
    loaded = TinyDecoder.from_pretrained(str(tmp_path))
    ref = tiny_decoder(seed=1, latent_channels=16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref.state_dict().values(), strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "keep.txt"]
    with pytest.raises(TypeError, match="diffusers model"):
        save_model_atomically(object(), tmp_path)


def test_decoder_flags(tmp_path):
    base = ["--pretrained_model_name_or_path", "vae", "--train_data_dir", str(tmp_path), "--report_to", "none"]
    args = parse_decoder_args(base)
    assert (args.resolution, args.lpips_weight, args.gan_loss, args.num_eval_images) == (256, 1.0, "hinge", 16)
    assert args.tracker_project_name == "snapgen-tiny-decoder"
    help_text = build_decoder_parser().format_help()
    for flag in ("--lpips_weight", "--gan_weight", "--validation_data_dir", "--use_ema", "--resume_from_checkpoint",
                 "--push_to_hub", "--mixed_precision"):
        assert flag in help_text
    for absent in ("--caption_column", "--unet_config", "--kd_", "--validation_prompt", "==SUPPRESS=="):
        assert absent not in help_text  # composed from argument groups: nothing added and then hidden
    args = parse_decoder_args([*base, "--decoder_config", '{"block_out_channels": [8, 8, 8, 16]}'])
    assert args.decoder_config == {"block_out_channels": [8, 8, 8, 16]}
    for extra, match in ((["--mse_weight", "0", "--lpips_weight", "0"], "reconstruction loss"),
                         (["--resolution", "16"], "too small"), (["--gan_weight", "-1"], "--gan_weight"),
                         (["--validation_data_dir", str(tmp_path / "nope")], "not a folder"),
                         (["--decoder_config", "[1]"], "--decoder_config"),
                         (["--cache_latents"], "pass --cache_images"),
                         (["--cache_latents", "--cache_images", "--cache_image_resolution", "512"], "whole images")):
        with pytest.raises(ValueError, match=match):
            parse_decoder_args([*base, *extra])


def test_decoder_with_cached_latents_samples_them_instead_of_encoding(tmp_path, monkeypatch):
    """``--cache_latents``: the frozen encoder's distributions of every cached image and mirror image are computed
    once; a step's latents are ``mean + std * eps`` of its images (mirrored as its target pixels are), with no encoder
    call."""
    from datasets import Dataset

    from diffusers_snapgen.testing import tiny_autoencoder_kl
    from diffusers_snapgen.training import setup_accelerator
    from diffusers_snapgen.training.tasks import TinyDecoderTask, build_decoder

    images = [_image(i, (32, 32)) for i in range(6)]
    args = parse_decoder_args(["--pretrained_model_name_or_path", "vae", "--train_data_dir", str(tmp_path),
                               "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
                               "--cache_images", "--cache_latents", "--random_flip", "--train_batch_size", "4",
                               "--decoder_config", '{"block_out_channels": [8, 8, 8, 16], "norm_num_groups": 4}'])
    vae = tiny_autoencoder_kl(latent_channels=16).eval()
    task = TinyDecoderTask(args, setup_accelerator(args), build_decoder(args, vae), vae,
                           data=(Dataset.from_dict({"image": images}), torch.zeros(1, 3, 32, 32)))
    task.build_data()
    cached = task.image_cache.images.float() / 127.5 - 1
    with torch.no_grad():
        for slot, views in enumerate((cached, cached.flip(-1))):
            dist = vae.encode(views).latent_dist
            torch.testing.assert_close(task.latent_cache.mean[:, slot], dist.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(task.latent_cache.std[:, slot], dist.std, rtol=1e-5, atol=1e-5)

    calls = []
    monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.append(1))
    index = torch.tensor([5, 0, 3, 3])
    pixels, latents = task.inputs({"index": index}, torch.Generator().manual_seed(7))
    assert not calls and latents.shape == (4, 16, 4, 4) and latents.dtype == torch.float32
    g = torch.Generator().manual_seed(7)  # the same draws: flips, then the latents' noise
    flips = torch.rand(4, generator=g) < 0.5
    eps = torch.randn(latents.shape, generator=g)
    assert 0 < int(flips.sum()) < 4  # both orientations in this batch
    for k, (i, f) in enumerate(zip(index.tolist(), flips.tolist())):
        torch.testing.assert_close(pixels[k], cached[i].flip(-1) if f else cached[i])
        mean, std = task.latent_cache.mean[i, int(f)], task.latent_cache.std[i, int(f)]
        torch.testing.assert_close(latents[k], mean + std * eps[k])


def test_encoder_with_cached_latents_gathers_its_targets_instead_of_encoding(tmp_path, monkeypatch):
    """The tiny encoder's ``--cache_latents``: a step's targets are the frozen autoencoder's posterior means of its
    images (mirrored as its input pixels are), gathered from the cache with no encoder call; the loss is the same MSE
    as with an encoder call per step."""
    from datasets import Dataset

    from diffusers_snapgen.testing import tiny_autoencoder_kl
    from diffusers_snapgen.training import setup_accelerator
    from diffusers_snapgen.training.task_args import parse_encoder_args
    from diffusers_snapgen.training.tasks import TinyEncoderTask, build_encoder

    base = ["--pretrained_model_name_or_path", "vae", "--train_data_dir", str(tmp_path), "--report_to", "none",
            "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--cache_images", "--random_flip",
            "--train_batch_size", "4", "--encoder_config",
            '{"block_out_channels": [8, 8, 8, 16], "layers_per_block": 1, "norm_num_groups": 4}']
    for extra, match in ((["--cache_latents"], "pass --cache_images"),
                         (["--cache_latents", "--cache_image_resolution", "64"], "whole images"),
                         (["--cache_latents", "--targets", "pipeline_samples"], "--targets autoencoder")):
        flags = [f for f in base if f != "--cache_images"] if match == "pass --cache_images" else base
        with pytest.raises(ValueError, match=match):
            parse_encoder_args([*flags, *extra])
    args = parse_encoder_args([*base, "--cache_latents"])
    vae = tiny_autoencoder_kl(latent_channels=16).eval()
    data = (Dataset.from_dict({"image": [_image(i, (32, 32)) for i in range(6)]}), torch.zeros(1, 3, 32, 32))
    task = TinyEncoderTask(args, setup_accelerator(args), build_encoder(args, vae), vae, data=data)
    task.build_data()
    cached = task.image_cache.images.float() / 127.5 - 1

    index = torch.tensor([5, 0, 3, 3])
    g = torch.Generator().manual_seed(7)  # the step's draws: the flips
    flips = torch.rand(4, generator=g) < 0.5
    assert 0 < int(flips.sum()) < 4  # both orientations in this batch
    pixels = torch.stack([cached[i].flip(-1) if f else cached[i] for i, f in zip(index.tolist(), flips.tolist())])
    with torch.no_grad():
        target = vae.encode(pixels).latent_dist.mean
        expected = torch.nn.functional.mse_loss(task.model(pixels, return_dict=False)[0], target) * task.scale**2
    calls = []
    monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.append(1))
    out = task.compute_loss({"index": index}, torch.Generator().manual_seed(7))
    assert not calls
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(task.latent_cache.mode(index, flips), target, rtol=1e-5, atol=1e-5)
