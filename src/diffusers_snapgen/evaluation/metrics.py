"""Image-quality measures: prompt accuracy and FID on the emoji classifier, the prompt-vs-seed ratio, decoder
PSNR/SSIM."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .classifier import EmojiClassifier
from .data import to_tensor


def prompt_accuracy(images, prompts: Sequence[str], classifier: EmojiClassifier, batch_size: int = 128) -> dict:
    """Share of ``images`` whose prompt is the classifier's top-1 / among its top-5 classes.

    ``images``: PIL list or ``(N, 3, H, W)`` tensor in [0, 1]; ``prompts``: one caption per image.
    Returns ``{"top1": float, "top5": float, "count": N}``.
    """
    if not isinstance(classifier, EmojiClassifier):
        raise TypeError(f"`classifier` must be an EmojiClassifier, got {type(classifier).__name__}.")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("`prompts` must be a list of strings, one per image.")
    if len(prompts) != len(images):
        raise ValueError(f"`prompts` has {len(prompts)} entries but there are {len(images)} images: pass one each.")
    if len(prompts) == 0:
        raise ValueError("`images` is empty: pass at least one image.")
    targets = torch.tensor([classifier.class_index(p) for p in prompts])
    logits = classifier.logits(images, batch_size=batch_size)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": (top[:, 0] == targets).float().mean().item(),
        "top5": (top == targets[:, None]).any(dim=1).float().mean().item(),
        "count": len(prompts),
    }


def _pairwise_rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel distance between every two rows of ``x`` ``(N, D)``: ``torch.cdist`` (exact
    differences up to 25 rows, a matrix product of the centred rows beyond)."""
    x = x - x.mean(0, keepdim=True)
    return torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[1])


def prompt_seed_ratio(images, prompts: Sequence[str], seeds: Sequence[int]) -> dict:
    """How much the prompt, rather than the noise, decides the picture.

    ``between_prompts``: mean root-mean-square pixel distance (images in [0, 1]) between images of different prompts
    made from the same seed; ``between_seeds``: the same between images of one prompt made from different seeds;
    ``ratio`` = between_prompts / between_seeds (>= 1: the prompt drives the picture; ~1: the noise does as much;
    inf when the seeds make identical images). Values are None when no two prompts share a seed or no prompt has two
    seeds. ``images``: ``(N, 3, H, W)`` tensor (uint8 or [0, 1]) or PIL list; one prompt and seed per image.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or isinstance(seeds, str) or not isinstance(
            seeds, Sequence):
        raise TypeError("`prompts` and `seeds` must be lists, one entry per image.")
    if not len(prompts) == len(seeds) == len(images):
        raise ValueError(f"pass one prompt and one seed per image: {len(images)} images, {len(prompts)} prompts, "
                         f"{len(seeds)} seeds.")
    pixels = to_tensor(images).flatten(1)

    def mean_distance(groups: dict, different: list) -> float | None:
        total, count = 0.0, 0
        for index in groups.values():
            if len(index) < 2:
                continue
            distances = _pairwise_rms(pixels[index])
            labels = [different[i] for i in index]
            mask = torch.tensor([[a != b for b in labels] for a in labels]).triu(1)
            total += distances[mask].sum().item()
            count += int(mask.sum())
        return total / count if count else None

    by_seed, by_prompt = {}, {}
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        by_seed.setdefault(seed, []).append(i)
        by_prompt.setdefault(prompt, []).append(i)
    between_prompts = mean_distance(by_seed, list(prompts))
    between_seeds = mean_distance(by_prompt, list(seeds))
    ratio = None
    if between_prompts is not None and between_seeds is not None:
        ratio = between_prompts / between_seeds if between_seeds > 0 else float("inf")
    return {"ratio": ratio, "between_prompts": between_prompts, "between_seeds": between_seeds}


def _as_features(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    elif isinstance(value, np.ndarray):
        value = value.astype(np.float64)
    else:
        raise TypeError(f"`{name}` must be a (N, D) tensor or array, got {type(value).__name__}.")
    if value.ndim != 2 or value.shape[0] < 2:
        raise ValueError(f"`{name}` must be (N, D) with N >= 2 samples, got shape {value.shape}.")
    if not np.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return value


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def fid(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``:
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, computed in float64 with symmetric
    eigen-decompositions (exact for PSD covariances, also when they are singular)."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: `features_a` has {a.shape[1]}, `features_b` {b.shape[1]}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross)
    return max(value, 0.0)


def psnr_ssim(reference, reconstruction) -> dict:
    """Mean PSNR (dB) and SSIM over image pairs; tensors ``(N, 3, H, W)`` in [0, 1] or PIL lists of equal sizes.
    Returns ``{"psnr", "ssim", "count"}`` (PSNR of identical images is inf).

    SSIM is Wang et al. 2004 (11x11 Gaussian window, sigma 1.5, population covariances, data range 1, mean over
    colour channels): the definition the decoder-training evaluation uses
    (:func:`diffusers_snapgen.training.decoder_training.ssim`), so numbers from both are comparable."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, rec = to_tensor(reference), to_tensor(reconstruction)
    if ref.shape != rec.shape:
        raise ValueError(f"`reference` {tuple(ref.shape)} and `reconstruction` {tuple(rec.shape)} differ in shape.")
    ref_np = ref.permute(0, 2, 3, 1).double().numpy()
    rec_np = rec.permute(0, 2, 3, 1).double().numpy()
    psnrs, ssims = [], []
    for x, y in zip(ref_np, rec_np):
        psnrs.append(float("inf") if np.array_equal(x, y) else peak_signal_noise_ratio(x, y, data_range=1.0))
        ssims.append(structural_similarity(x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "count": len(psnrs)}


@torch.no_grad()
def decoder_psnr_ssim(images, encoder, decoder, batch_size: int = 8) -> dict:
    """PSNR/SSIM of ``decoder.decode(encoder.encode(x).latent_dist.mode())`` against ``x``.

    ``encoder``: an ``AutoencoderKL`` (its encoder is the frozen one of the latent space); ``decoder``: anything with
    ``decode(z)`` on the same unscaled latents (``TinyDecoder``, ``AutoencoderKL``). Image sides must be multiples of
    the autoencoder's factor. Runs on the encoder's device and dtype.
    """
    from ..models import TinyDecoder

    if isinstance(encoder, TinyDecoder) or not hasattr(encoder, "encode"):
        raise TypeError(f"`encoder` must be an AutoencoderKL (with .encode), got {type(encoder).__name__}.")
    if not hasattr(decoder, "decode"):
        raise TypeError(f"`decoder` must have .decode(z) (TinyDecoder, AutoencoderKL), got {type(decoder).__name__}.")
    channels = (getattr(encoder.config, "latent_channels", None), getattr(decoder.config, "latent_channels", None))
    if channels[0] != channels[1]:
        raise ValueError(f"`encoder` makes {channels[0]}-channel latents but `decoder` decodes {channels[1]}: pair "
                         "models of one latent space.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    reference = to_tensor(images)
    factor = 2 ** (len(encoder.config.block_out_channels) - 1)
    if reference.shape[-1] % factor or reference.shape[-2] % factor:
        raise ValueError(f"image sides must be multiples of {factor}, got {tuple(reference.shape[-2:])}.")
    return psnr_ssim(reference, round_trip(reference, encoder, decoder, batch_size))


@torch.no_grad()
def round_trip(reference: torch.Tensor, encoder, decoder, batch_size: int = 8) -> torch.Tensor:
    """``decoder.decode(encoder.encode(x).latent_dist.mode())`` of ``(N, 3, H, W)`` images in [0, 1], in [0, 1] on
    the CPU (the checks are :func:`decoder_psnr_ssim`'s)."""
    encode_param = next(encoder.parameters())
    decode_param = next(decoder.parameters())
    outputs = []
    for start in range(0, len(reference), batch_size):
        x = reference[start: start + batch_size].to(encode_param.device, encode_param.dtype) * 2 - 1
        z = encoder.encode(x).latent_dist.mode()
        y = decoder.decode(z.to(decode_param.device, decode_param.dtype)).sample
        outputs.append(((y.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(outputs)
