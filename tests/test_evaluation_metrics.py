"""FID, PSNR/SSIM, decoder round trips, top-k accuracy and the prompt-vs-seed ratio of diffusers_snapgen.evaluation
(no training here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_snapgen.evaluation import (
    EmojiClassifier,
    concept_of,
    decoder_psnr_ssim,
    fid,
    prompt_accuracy,
    prompt_seed_ratio,
    psnr_ssim,
)


def features(n=400, d=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / math.sqrt(d)
    return torch.randn(n, d, generator=generator) @ mixing + torch.randn(d, generator=generator)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = features().double()
    assert fid(a, a) < 1e-8
    shifts = [fid(a, a + s) for s in (0.1, 0.5, 1.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0
    assert shifts[1] == pytest.approx(a.shape[1] * 0.25, rel=1e-9)  # same covariance: only |mu_a - mu_b|^2 is left


def test_fid_covariance_term_matches_closed_form_and_scipy():
    from scipy import linalg

    a, b = features(seed=1).double(), features(seed=2).double()
    # b = 2a: S_b = 4 S_a, so the trace term is Tr(S + 4S - 2 * 2S) = Tr(S); the mean term |mu_a|^2.
    expected = (a.mean(0) ** 2).sum().item() + np.trace(np.cov(a.numpy(), rowvar=False))
    assert fid(a, 2 * a) == pytest.approx(expected, rel=1e-8)
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert fid(a, b.numpy()) == pytest.approx(reference, rel=1e-6)


def test_fid_validates_its_arguments():
    a = features(n=10, d=4)
    with pytest.raises(ValueError, match="widths differ"):
        fid(a, features(n=10, d=5))
    with pytest.raises(ValueError, match="N >= 2"):
        fid(a, a[:1])
    with pytest.raises(ValueError, match="NaN"):
        fid(a, torch.full((3, 4), float("nan")))
    with pytest.raises(TypeError, match="features_a"):
        fid([[0.0] * 4] * 3, a)


def test_psnr_ssim_identity_noise_and_shape_errors():
    generator = torch.Generator().manual_seed(0)
    clean = torch.full((2, 3, 32, 32), 0.5)
    same = psnr_ssim(clean, clean.clone())
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["count"] == 2
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=generator)
    result = psnr_ssim(clean, noisy)
    assert result["psnr"] == pytest.approx(-20 * math.log10(0.05), abs=0.3)  # ~26 dB
    assert result["ssim"] < 0.9
    assert psnr_ssim(clean, clean + 0.1 * torch.randn(clean.shape, generator=generator))["psnr"] < result["psnr"]
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_ssim(clean, clean[:, :, :16])


class _PoolEncoder(torch.nn.Module):
    """Latent = 8x average-pooled image (3 channels): a stand-in autoencoder with a known reconstruction."""

    def __init__(self, latent_channels=3):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(latent_channels=latent_channels, block_out_channels=(1, 1, 1, 1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: F.avg_pool2d(x, 8)))


class _UpsampleDecoder(torch.nn.Module):
    def __init__(self, latent_channels=3):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(latent_channels=latent_channels)

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(z, scale_factor=8, mode="nearest"))


def test_decoder_round_trip_maps_pixels_to_minus_one_one_and_back():
    blocks = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    piecewise = F.interpolate(blocks, scale_factor=8, mode="nearest")  # 8x8 constant blocks: reconstructed exactly
    exact = decoder_psnr_ssim(piecewise, _PoolEncoder(), _UpsampleDecoder(), batch_size=2)
    assert exact["psnr"] > 100 and exact["ssim"] == pytest.approx(1.0) and exact["count"] == 3  # float rounding only
    smooth = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = psnr_ssim(smooth, F.interpolate(F.avg_pool2d(smooth, 8), scale_factor=8, mode="nearest"))
    assert decoder_psnr_ssim(smooth, _PoolEncoder(), _UpsampleDecoder()) == pytest.approx(expected)


def test_decoder_round_trip_with_diffusers_autoencoders_and_errors():
    from diffusers_snapgen.testing import tiny_autoencoder_kl, tiny_decoder

    vae = tiny_autoencoder_kl()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for decoder in (vae, tiny_decoder()):
        result = decoder_psnr_ssim(images, vae, decoder)
        assert math.isfinite(result["psnr"]) and -1 <= result["ssim"] <= 1
    with pytest.raises(ValueError, match="latent"):
        decoder_psnr_ssim(images, vae, tiny_decoder(latent_channels=16))
    with pytest.raises(ValueError, match="multiples of 8"):
        decoder_psnr_ssim(images[..., :28, :28], vae, vae)
    with pytest.raises(TypeError, match="encoder"):
        decoder_psnr_ssim(images, tiny_decoder(), vae)


def test_prompt_accuracy_counts_top1_and_top5_from_the_logits():
    classes = [f"emoji {i}" for i in range(8)]
    classifier = EmojiClassifier(classes, image_size=8, widths=(4,))
    # true class "emoji 0" ranked 1st, 3rd and 7th in the three images
    fixed = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6, 7], [5.0, 1, 2, 3, 4, 9, 8, 0], [1.0, 2, 3, 4, 5, 6, 7, 0]])
    classifier.logits = lambda images, batch_size=128: fixed
    result = prompt_accuracy(torch.zeros(3, 3, 8, 8), ["emoji 0"] * 3, classifier)
    assert result == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3), "count": 3}
    with pytest.raises(ValueError, match="not a class"):
        prompt_accuracy(torch.zeros(1, 3, 8, 8), ["a red apple on a table"], classifier)
    with pytest.raises(ValueError, match="one each"):
        prompt_accuracy(torch.zeros(2, 3, 8, 8), ["emoji 0"], classifier)
    with pytest.raises(TypeError, match="EmojiClassifier"):
        prompt_accuracy(torch.zeros(1, 3, 8, 8), ["emoji 0"], object())


def test_classifier_constructor_validates():
    with pytest.raises(ValueError, match="at least two"):
        EmojiClassifier(["only one"])
    with pytest.raises(ValueError, match="distinct"):
        EmojiClassifier(["a", "a"])
    with pytest.raises(ValueError, match="image_size"):
        EmojiClassifier(["a", "b"], image_size=4)
    model = EmojiClassifier(["a", "b"], image_size=16, widths=(4, 8))
    assert model.embed(torch.rand(5, 3, 40, 40), batch_size=2).shape == (5, 8)
    assert model.logits([Image.new("RGB", (20, 20))]).shape == (1, 2)


def test_psnr_ssim_agrees_with_the_decoder_training_metrics():
    """The evaluation harness and the tiny-decoder training report the same PSNR/SSIM definitions."""
    from diffusers_snapgen.training.decoder_training import psnr, ssim

    generator = torch.Generator().manual_seed(1)
    reference = torch.rand(3, 3, 40, 48, generator=generator)
    noisy = (reference + 0.08 * torch.randn(reference.shape, generator=generator)).clamp(0, 1)
    result = psnr_ssim(reference, noisy)
    assert result["psnr"] == pytest.approx(psnr(noisy, reference).mean().item(), abs=1e-3)
    assert result["ssim"] == pytest.approx(ssim(noisy, reference).mean().item(), abs=1e-3)


def test_prompt_seed_ratio_on_synthetic_images():
    """Images = prompt colour + seed pattern: the ratio is the prompt part's size over the seed part's, exactly."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(5, 3, 1, 1, generator=generator)
    patterns = torch.rand(3, 3, 16, 16, generator=generator) - 0.5
    prompts = [f"p{i}" for i in range(5) for _ in range(3)]
    seeds = [s for _ in range(5) for s in range(3)]

    def make(prompt_weight, seed_weight):
        return torch.stack([0.5 + prompt_weight * (colours[int(p[1:])] - 0.5) + seed_weight * patterns[s]
                            for p, s in zip(prompts, seeds)])

    def rms(x):
        return float(x.pow(2).mean().sqrt())

    strong = prompt_seed_ratio(make(0.8, 0.1), prompts, seeds)
    expected_prompts = np.mean([rms(0.8 * (colours[a] - colours[b]).expand(3, 16, 16))
                                for a in range(5) for b in range(a + 1, 5)])
    expected_seeds = np.mean([rms(0.1 * (patterns[a] - patterns[b])) for a in range(3) for b in range(a + 1, 3)])
    assert strong["between_prompts"] == pytest.approx(expected_prompts, rel=1e-4)
    assert strong["between_seeds"] == pytest.approx(expected_seeds, rel=1e-4)
    assert strong["ratio"] == pytest.approx(expected_prompts / expected_seeds, rel=1e-4) and strong["ratio"] > 1
    weak = prompt_seed_ratio(make(0.05, 0.4), prompts, seeds)  # the noise decides the picture
    assert weak["ratio"] < 1
    assert prompt_seed_ratio(make(0.8, 0.0), prompts, seeds)["ratio"] == math.inf  # seeds change nothing
    one_seed = prompt_seed_ratio(make(0.8, 0.1)[::3], prompts[::3], seeds[::3])
    assert one_seed["ratio"] is None and one_seed["between_seeds"] is None and one_seed["between_prompts"] > 0
    uint8 = (make(0.8, 0.1).clamp(0, 1) * 255).round().to(torch.uint8)
    assert prompt_seed_ratio(uint8, prompts, seeds)["ratio"] == pytest.approx(strong["ratio"], rel=1e-2)
    with pytest.raises(ValueError, match="one prompt and one seed per image"):
        prompt_seed_ratio(make(0.8, 0.1), prompts[:-1], seeds)


def test_classifier_classes_are_concepts_whatever_the_style():
    model = EmojiClassifier(["red apple", "thumbs up"], image_size=16, widths=(4,))
    assert model.class_index("thumbs up") == 1
    assert model.class_index("thumbs up, noto style") == model.class_index("thumbs up, fluent emoji style") == 1
    assert concept_of("red apple, noto style") == "red apple" and concept_of("red apple") == "red apple"
    with pytest.raises(ValueError, match="not a class"):
        model.class_index("green apple, noto style")
