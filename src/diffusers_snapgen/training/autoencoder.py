"""The autoencoder's objective pieces (recipe step ``vae`` of ``training_examples/recipes/emoji_demo.sh``): a diffusers
``AutoencoderKL`` (16 latent channels, f = 8: SD3's latent layout, which SnapGen's UNet and TinyDecoder take; paper
§3.1-3.2 use SD3's own VAE).

The objective is the latent-diffusion one (Rombach et al. 2022): an L1 (or MSE) reconstruction loss, ``--kl_weight``
x KL(q(z|x) || N(0, I)), optional LPIPS and an optional patch-GAN loss. The KL is summed over the latent elements of
an image and divided by the image's number of pixel values, so with the per-pixel mean reconstruction loss
``--kl_weight`` has its usual meaning (1e-6, as for SD's VAEs, whose losses are sums per image). At the end the latent
statistics of the training images are written into the config: ``scaling_factor = 1 / std(z)``,
``shift_factor = mean(z)`` (SD3 convention: ``(z - shift_factor) * scaling_factor``; :func:`latent_statistics`).
The task is :class:`~.tasks.reconstruction.AutoencoderTask`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SNAPGEN_LATENT_CHANNELS", "SNAPGEN_FACTOR", "kl_divergence", "PosteriorCapture", "latent_statistics"]

SNAPGEN_LATENT_CHANNELS, SNAPGEN_FACTOR = 16, 8


def kl_divergence(moments: torch.Tensor) -> torch.Tensor:
    """Per-image ``KL(N(mean, exp(logvar)) || N(0, I))``, ``(B,)``, summed over latent elements, from the encoder's
    moments ``(B, 2C, h, w)`` (mean and log-variance halves; diffusers' ``DiagonalGaussianDistribution(...).kl()``)."""
    if not isinstance(moments, torch.Tensor) or moments.ndim != 4 or moments.shape[1] % 2:
        raise ValueError(f"`moments` must be a (B, 2C, h, w) tensor, got {getattr(moments, 'shape', moments)!r}.")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments.float()).kl()


class PosteriorCapture:
    """Keeps the posterior moments of an ``AutoencoderKL``'s last encode (a forward hook on ``quant_conv``, or on the
    encoder when the model has none). The training step calls the prepared (possibly DDP-wrapped) model's forward,
    which returns only the reconstruction, and reads the KL's moments here."""

    def __init__(self, vae):
        if not hasattr(vae, "encoder") or not hasattr(vae, "quant_conv"):
            raise TypeError(f"`vae` must be a diffusers AutoencoderKL, got {type(vae).__name__}.")
        if getattr(vae, "use_tiling", False):
            raise ValueError("`vae` has tiling enabled (tiles would each overwrite the moments): call "
                             "vae.disable_tiling() before training.")
        module = vae.quant_conv if vae.quant_conv is not None else vae.encoder
        self.moments = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.moments = output

    def pop(self) -> torch.Tensor:
        """The moments of the last forward (then forgotten)."""
        if self.moments is None:
            raise RuntimeError("no encoder forward since the last pop(): run the autoencoder first.")
        moments, self.moments = self.moments, None
        return moments

    def remove(self):
        self._handle.remove()
        self.moments = None


@torch.no_grad()
def latent_statistics(vae, dataset, image_column: str = "image", resolution: int = 256, batch_size: int = 8,
                      max_images: int | None = None) -> dict:
    """Mean and standard deviation over all elements of ``vae.encode(x).latent_dist.sample()`` for the first
    ``max_images`` images of ``dataset`` (all when ``None``), each resized and center-cropped to ``resolution``
    (``data.preprocess_image``, what the SnapGen training scripts encode). Computed in closed form from the posterior
    (``E[z]`` = mean of the means, ``Var[z]`` = variance of the means + mean of the variances), so no sampling noise
    enters. Returns ``mean``, ``std``, ``scaling_factor = 1 / std``, ``shift_factor = mean``, ``num_images``."""
    from .data import preprocess_image

    if not hasattr(vae, "encode"):
        raise TypeError(f"`vae` must be an AutoencoderKL (it needs `encode`), got {type(vae).__name__}.")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"`dataset` must be an indexable dataset of rows, got {type(dataset).__name__}.")
    for name, value in (("resolution", resolution), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"`max_images` (--num_scale_images) must be a positive int or None, got {max_images!r}.")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("`dataset` is empty: no latents to measure.")
    was_training = vae.training
    vae.eval()
    total = {"mean": 0.0, "mean_sq": 0.0, "var": 0.0, "count": 0}
    try:
        for start in range(0, n, batch_size):
            pixels = torch.stack([preprocess_image(dataset[i][image_column], resolution, center_crop=True)
                                  for i in range(start, min(start + batch_size, n))])
            dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
            mean, var = dist.mean.double(), dist.var.double()
            total["mean"] += mean.sum().item()
            total["mean_sq"] += mean.pow(2).sum().item()
            total["var"] += var.sum().item()
            total["count"] += mean.numel()
    finally:
        vae.train(was_training)
    mu = total["mean"] / total["count"]
    variance = total["mean_sq"] / total["count"] - mu**2 + total["var"] / total["count"]
    std = math.sqrt(max(variance, 0.0))
    if not std > 0:
        raise ValueError("the latents have zero variance: the autoencoder collapsed, no scaling_factor can be set.")
    return {"mean": mu, "std": std, "scaling_factor": 1.0 / std, "shift_factor": mu, "num_images": n}
