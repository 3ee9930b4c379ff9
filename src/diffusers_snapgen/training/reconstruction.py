"""Reconstruction training pieces (paper §3.2; docs/design.md): the tiny decoder's, and the autoencoder's.

For the tiny decoder, the frozen encoder of an ``AutoencoderKL`` (SD3's in real use) gives latents, SnapGen's
:class:`~diffusers_snapgen.TinyDecoder` learns to decode them with MSE + LPIPS + patch-GAN hinge loss (no KL: the
encoder is fixed), on random 256² patches; PSNR and SSIM on held-out images measure it.

* :class:`ImagePatchDataset` - random patches (no resizing unless an image is smaller than the patch), flips, drawn
  from ``(seed, epoch, index)`` so resumed runs see the same patches.
* :func:`psnr`, :func:`ssim` - per-image metrics on [0, 1] images; SSIM is Wang et al. 2004 (11x11 Gaussian window,
  sigma 1.5, K1 0.01, K2 0.03, mean over channels), the same numbers as ``skimage.metrics.structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
* :func:`load_lpips` - the ``lpips`` package's metric, or ``None`` with one warning when the package or its backbone
  weights (downloaded from the web on first use) are unavailable.
* :class:`DecoderLosses` - generator and discriminator objectives.
* :func:`evaluate_decoder`, :func:`save_model_atomically`.

The tasks that train with them are in :mod:`.tasks.reconstruction`; the command lines in :mod:`.task_args`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .adversarial import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty
from .task_args import RECONSTRUCTION_LOSSES

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "ImagePatchDataset",
    "random_patch",
    "psnr",
    "ssim",
    "load_lpips",
    "DecoderLosses",
    "RECONSTRUCTION_LOSSES",
    "encode_for_decoder",
    "evaluate_decoder",
    "save_model_atomically",
]


def _patch_rng(seed: int, epoch: int, index: int) -> random.Random:
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), 7]).generate_state(1)[0]
    return random.Random(int(state))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def random_patch(image: Image.Image, size: int, rng: random.Random, flip: bool = False) -> torch.Tensor:
    """A ``size`` x ``size`` crop at a ``rng`` offset (the short side is first resized up to ``size`` if smaller),
    optionally flipped; ``(3, size, size)`` in [-1, 1]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` (--resolution) must be a positive int, got {size!r}.")
    w, h = image.size
    if min(w, h) < size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.BICUBIC)
    left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(image)


class ImagePatchDataset(torch.utils.data.Dataset):
    """Random ``resolution``² patches of the images of an HF dataset; items ``{"pixel_values", "index"}``.
    Offsets and flips are a function of ``(seed, epoch, index)``: call :meth:`set_epoch` each epoch."""

    def __init__(self, dataset, image_column: str = "image", resolution: int = 256, random_flip: bool = False,
                 seed: int = 0):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"`dataset` must be an indexable dataset, got {type(dataset).__name__}.")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
        self.dataset, self.image_column, self.resolution = dataset, image_column, resolution
        self.random_flip, self.seed, self.epoch = bool(random_flip), int(seed), 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        rng = _patch_rng(self.seed, self.epoch, index)
        flip = self.random_flip and rng.random() < 0.5
        image = self.dataset[index][self.image_column]
        return {"pixel_values": random_patch(image, self.resolution, rng, flip), "index": int(index)}


def _check_images(name, x):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"`{name}` must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}.")


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``(B,)``, of images in ``[0, data_range]``."""
    _check_images("prediction", prediction)
    _check_images("target", target)
    if prediction.shape != target.shape:
        raise ValueError(f"`prediction` {tuple(prediction.shape)} and `target` {tuple(target.shape)} differ.")
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))).float()


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM, ``(B,)`` (Wang et al. 2004; see the module docstring). Images must be at least 11x11."""
    _check_images("prediction", prediction)
    _check_images("target", target)
    if prediction.shape != target.shape:
        raise ValueError(f"`prediction` {tuple(prediction.shape)} and `target` {tuple(target.shape)} differ.")
    radius = int(3.5 * sigma + 0.5)
    size = 2 * radius + 1
    if min(prediction.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size}x{size} for SSIM, got {tuple(prediction.shape[-2:])}.")
    x, y = prediction.double(), target.double()
    c = x.shape[1]
    coords = torch.arange(size, dtype=torch.float64, device=x.device) - radius
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1).float()


def load_lpips(net: str = "vgg", device="cpu", fallback: str = "MSE + GAN"):
    """The ``lpips`` package's LPIPS metric (frozen, eval) on ``net``, or ``None`` after ONE warning when the package
    is not installed or its backbone weights cannot be loaded (they are downloaded from the web on first use and no
    offline copy exists: docs/design.md, offline assets). ``fallback`` names the losses training continues with, for the warning."""
    if net not in ("alex", "vgg", "squeeze"):
        raise ValueError(f"`net` (--lpips_net) must be 'alex', 'vgg' or 'squeeze', got {net!r}.")
    if not isinstance(fallback, str) or not fallback:
        raise ValueError(f"`fallback` must name the remaining losses (e.g. 'MSE + GAN'), got {fallback!r}.")
    try:
        import lpips
    except ImportError:
        logger.warning("LPIPS is OFF: the `lpips` package is not installed (`pip install lpips`; it also downloads "
                       "its %s backbone weights on first use). Training continues with %s only.", net, fallback)
        return None
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # offline: torchvision cannot download the backbone
        logger.warning("LPIPS is OFF: the %s backbone weights of `lpips` could not be loaded (%s: %s); they come from "
                       "the web on first use. Training continues with %s only.", net, type(e).__name__, e, fallback)
        return None
    return model.requires_grad_(False).eval().to(device)


class DecoderLosses:
    """``L_G = w_mse * MSE + w_lpips * LPIPS + w_gan * L_adv(D(recon))`` and ``L_D = gan(D(real), D(recon))
    [+ gamma/2 * R1]``, images in [-1, 1]. ``lpips_model`` ``None`` drops the LPIPS term. ``reconstruction_loss="l1"``
    makes the first term the mean absolute error (still weighted by ``mse_weight``; logged as ``"l1"``)."""

    def __init__(self, mse_weight: float = 1.0, lpips_weight: float = 1.0, gan_weight: float = 0.1,
                 gan_loss: str = "hinge", r1_gamma: float = 0.0, lpips_model=None, reconstruction_loss: str = "mse"):
        for name, v in (("mse_weight", mse_weight), ("lpips_weight", lpips_weight), ("gan_weight", gan_weight),
                        ("r1_gamma", r1_gamma)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"`{name}` (--{name}) must be a number >= 0, got {v!r}.")
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"`gan_loss` (--gan_loss) must be one of {GAN_LOSSES}, got {gan_loss!r}.")
        if lpips_model is not None and not callable(lpips_model):
            raise TypeError("`lpips_model` must be callable (an lpips.LPIPS module) or None.")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"`reconstruction_loss` (--reconstruction_loss) must be one of {RECONSTRUCTION_LOSSES}, "
                             f"got {reconstruction_loss!r}.")
        self.reconstruction_loss = reconstruction_loss
        self.mse_weight, self.lpips_weight, self.gan_weight = float(mse_weight), float(lpips_weight), float(gan_weight)
        self.gan_loss, self.r1_gamma, self.lpips_model = gan_loss, float(r1_gamma), lpips_model

    def generator(self, recon: torch.Tensor, target: torch.Tensor, discriminator=None):
        """``(loss, metrics)`` (0-dim tensors); the GAN term only when ``discriminator`` is given (freeze it first)."""
        _check_images("recon", recon)
        _check_images("target", target)
        if recon.shape != target.shape:
            raise ValueError(f"`recon` {tuple(recon.shape)} and `target` {tuple(target.shape)} differ.")
        loss_fn = F.l1_loss if self.reconstruction_loss == "l1" else F.mse_loss
        rec = loss_fn(recon.float(), target.float())
        loss, logs = self.mse_weight * rec, {self.reconstruction_loss: rec.detach()}
        if self.lpips_model is not None and self.lpips_weight > 0:
            lp = self.lpips_model(recon.float(), target.float()).mean()
            loss = loss + self.lpips_weight * lp
            logs["lpips"] = lp.detach()
        if discriminator is not None and self.gan_weight > 0:
            adv = generator_loss(discriminator(recon), self.gan_loss)
            loss = loss + self.gan_weight * adv
            logs["g_adv"] = adv.detach()
        return loss, logs

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor, discriminator):
        """``(loss, logs)`` of the patch discriminator on ``real`` and detached ``fake`` images."""
        _check_images("real", real)
        _check_images("fake", fake)
        if not callable(discriminator):
            raise TypeError("`discriminator` must be a callable module.")
        real = real.detach().float()
        if self.r1_gamma > 0:
            real.requires_grad_(True)
        real_logits, fake_logits = discriminator(real), discriminator(fake.detach().float())
        loss = discriminator_loss(real_logits, fake_logits, self.gan_loss)
        logs = {"d_real": real_logits.detach().float().mean(), "d_fake": fake_logits.detach().float().mean()}
        if self.r1_gamma > 0:
            r1 = r1_penalty(real_logits, real)
            loss = loss + 0.5 * self.r1_gamma * r1
            logs["r1"] = r1.detach()
        logs["d_loss"] = loss.detach()
        return loss, logs


def encode_for_decoder(vae, pixel_values: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """Unscaled latents of ``pixel_values`` (what a decoder's ``decode`` takes): ``latent_dist.sample()`` (or the
    mode), float32."""
    if not hasattr(vae, "encode"):
        raise TypeError(f"{type(vae).__name__} cannot encode: pass an AutoencoderKL.")
    _check_images("pixel_values", pixel_values)
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
    return z.float()


@torch.no_grad()
def evaluate_decoder(decoder, vae, images: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean PSNR (dB) and SSIM of ``decoder(vae.encode(images).mode())`` against ``images`` ([-1, 1],
    ``(N, 3, H, W)``), compared in [0, 1]; also the per-image lists."""
    _check_images("images", images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    was_training = decoder.training
    decoder.eval()
    p, s = [], []
    try:
        for chunk in images.split(batch_size):
            z = encode_for_decoder(vae, chunk, sample=False)
            param = next(decoder.parameters())
            recon = decoder.decode(z.to(param.device, param.dtype)).sample.float().clamp(-1, 1).cpu()
            a, b = (recon + 1) / 2, (chunk.float().cpu().clamp(-1, 1) + 1) / 2
            p.append(psnr(a, b))
            s.append(ssim(a, b))
    finally:
        decoder.train(was_training)
    p, s = torch.cat(p), torch.cat(s)
    return {"psnr": p.mean().item(), "ssim": s.mean().item(), "psnr_per_image": p.tolist(), "ssim_per_image": s.tolist()}


def save_model_atomically(model, output_dir, **save_kwargs) -> Path:
    """``model.save_pretrained`` into a temporary folder, then moves the files into ``output_dir``; ``config.json``
    is removed first and moved in last, so ``from_pretrained(output_dir)`` never pairs a new config with old weights."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"`model` must be a diffusers model, got {type(model).__name__}.")
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a path, got {type(output_dir).__name__}.")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-model-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(str(tmp), **save_kwargs)
    (root / "config.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir()):
        if entry.name != "config.json":
            os.replace(entry, root / entry.name)
    os.replace(tmp / "config.json", root / "config.json")
    shutil.rmtree(tmp, ignore_errors=True)
    return root
