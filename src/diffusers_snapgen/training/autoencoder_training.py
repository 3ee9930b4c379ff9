"""Autoencoder training (recipe step ``vae`` of ``training_examples/recipes/emoji_demo.sh``, issue 7): a diffusers
``AutoencoderKL`` (16 latent channels, f = 8: SD3's latent layout, which SnapGen's UNet and TinyDecoder take; paper
§3.1-3.2 use SD3's own VAE) trained from a config or continued from a checkpoint.

The objective is the latent-diffusion one (Rombach et al. 2022): an L1 (or MSE) reconstruction loss, ``--kl_weight``
x KL(q(z|x) || N(0, I)), optional LPIPS and an optional patch-GAN loss. The KL is summed over the latent elements of
an image and divided by the image's number of pixel values, so with the per-pixel mean reconstruction loss
``--kl_weight`` has its usual meaning (1e-6, as for SD's VAEs, whose losses are sums per image).

Everything but the model and the KL term is the tiny-decoder machinery (:mod:`.decoder_training`,
:mod:`.decoder_loop`): random patches, PSNR/SSIM on held-out images, LPIPS fallback, patch discriminator, EMA,
accelerate checkpoints with exact resume, atomic saving. At the end the latent statistics of the training images are
written into the config: ``scaling_factor = 1 / std(z)``, ``shift_factor = mean(z)`` (SD3 convention:
``(z - shift_factor) * scaling_factor``; :func:`latent_statistics`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
from functools import partial

import torch

from .decoder_training import RECONSTRUCTION_LOSSES, build_decoder_parser, validate_decoder_args

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "kl_divergence",
    "PosteriorCapture",
    "latent_statistics",
    "build_autoencoder",
    "build_autoencoder_parser",
    "validate_autoencoder_args",
    "parse_autoencoder_args",
    "train_autoencoder",
]

SNAPGEN_LATENT_CHANNELS, SNAPGEN_FACTOR = 16, 8
# tiny-decoder flags that mean nothing here (the model comes from --vae_config / --vae_model_name_or_path)
_DECODER_ONLY = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "decoder_model_name_or_path",
                 "decoder_config")


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


def _check_vae_config(config: dict):
    from diffusers import AutoencoderKL

    known = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"--vae_config has keys AutoencoderKL does not take: {unknown}; valid keys: {sorted(known)}.")


def build_autoencoder(args):
    """``--vae_model_name_or_path`` (``vae`` subfolder of a pipeline if present), or a new ``AutoencoderKL`` from
    ``--vae_config`` initialised from ``--seed``; fp32, trainable. Checks that ``--resolution`` and
    ``--eval_resolution`` are multiples of the model's downsampling factor and warns when the latent layout is not
    SnapGen's (16 channels, f = 8)."""
    from diffusers import AutoencoderKL

    from .components import load_vae_encoder

    for name in ("vae_config", "vae_model_name_or_path", "seed", "resolution", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_autoencoder_args() (no `{name}`).")
    if args.vae_model_name_or_path is not None:
        vae = load_vae_encoder({}, args.vae_model_name_or_path, torch.float32, args.revision, args.variant,
                               args.cache_dir)
    elif isinstance(args.vae_config, dict):
        _check_vae_config(args.vae_config)
        torch.manual_seed(args.seed)
        vae = AutoencoderKL.from_config(args.vae_config)
    else:
        raise ValueError("pass --vae_config (a JSON file of AutoencoderKL kwargs) or --vae_model_name_or_path.")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for flag in ("resolution", "eval_resolution"):
        if getattr(args, flag) % factor:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be a multiple of the autoencoder's downsampling "
                             f"factor {factor}.")
    if (vae.config.latent_channels, factor) != (SNAPGEN_LATENT_CHANNELS, SNAPGEN_FACTOR):
        logger.warning("this AutoencoderKL has %d latent channels and f = %d; SnapGen's UNet and TinyDecoder take %d "
                       "channels with f = %d.", vae.config.latent_channels, factor, SNAPGEN_LATENT_CHANNELS,
                       SNAPGEN_FACTOR)
    return vae.float().requires_grad_(True).train()


# ---------------------------------------------------------------------- command line


def build_autoencoder_parser() -> argparse.ArgumentParser:
    """The tiny-decoder parser (:func:`~.decoder_training.build_decoder_parser`: data, patches, LPIPS, patch GAN,
    evaluation, optimiser, EMA, checkpoints, Hub) with its model flags hidden, plus the autoencoder flags."""
    p = build_decoder_parser()
    p.description = "SnapGen autoencoder training: a diffusers AutoencoderKL (16 latent channels, f = 8)"
    helps = {
        "resolution": "Training patch size in pixels (random crops at native resolution; recipe: 256).",
        "validation_data_dir": "Folder of held-out images (imagefolder). Default: <train_data_dir>/test when "
                               "--train_data_dir has train/ and test/ splits, else the last --num_eval_images "
                               "training images are held out.",
        "eval_resolution": "Held-out images are resized and center-cropped to this size (default: --resolution).",
        "lpips_weight": "LPIPS weight (0: off). Needs `pip install lpips` and its backbone weights from the web; when "
                        "missing, one warning is logged and training continues without it.",
        "gan_weight": "Weight of the patch-GAN generator loss (0: off).",
        "use_ema": "Keep an EMA of the autoencoder; the saved model gets the EMA weights.",
        "mixed_precision": "Overrides accelerate's config; the autoencoder stays fp32 (autocast).",
        "validation_steps": "Evaluate PSNR/SSIM on the held-out images every N steps.",
        "eval_batch_size": "Batch size of the evaluation and of the final latent-statistics encoding.",
        "revision": "Revision of --vae_model_name_or_path.",
        "variant": "Weights variant of --vae_model_name_or_path, e.g. fp16.",
    }
    for group in p._action_groups:
        if group.title == "tiny decoder":
            group.title = "losses, patch GAN and evaluation"
    for action in p._actions:
        if action.dest in _DECODER_ONLY or action.dest == "mse_weight":
            action.help, action.required = argparse.SUPPRESS, False
        elif action.dest in helps:
            action.help = helps[action.dest]
    p.set_defaults(output_dir="snapgen-autoencoder", gan_weight=0.0, eval_resolution=None)
    g = p.add_argument_group("autoencoder")
    a = g.add_argument
    a("--vae_config", type=str, default=None,
      help="A new AutoencoderKL from this config (JSON file or string of AutoencoderKL kwargs, e.g. the recipe's "
           "runs/emoji/configs/vae.json).")
    a("--vae_model_name_or_path", type=str, default=None,
      help="AutoencoderKL to continue from (folder/Hub id, or a pipeline with a `vae` subfolder).")
    a("--reconstruction_loss", type=str, default="l1", choices=RECONSTRUCTION_LOSSES,
      help="Per-pixel reconstruction loss (LDM/SD VAEs: l1).")
    a("--kl_weight", type=float, default=1e-6,
      help="Weight of KL(q(z|x) || N(0, I)), summed per image and divided by the pixel values per image (the "
           "SD-VAE meaning of 1e-6).")
    a("--num_scale_images", type=int, default=None,
      help="Training images encoded at the end to measure scaling_factor/shift_factor (default: all).")
    return p


def validate_autoencoder_args(args: argparse.Namespace) -> argparse.Namespace:
    """The tiny-decoder checks (:func:`~.decoder_training.validate_decoder_args`) plus the autoencoder ones; raises
    ValueError naming the flag and the fix. Defaults ``--validation_data_dir`` to ``<train_data_dir>/test`` and
    ``--eval_resolution`` to ``--resolution``."""
    from .args import load_json_arg

    if not isinstance(args, argparse.Namespace) or not hasattr(args, "kl_weight"):
        raise TypeError("`args` must come from build_autoencoder_parser().parse_args().")
    for name in _DECODER_ONLY:
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} is a tiny-decoder flag: continue from an AutoencoderKL with "
                             "--vae_model_name_or_path, or build a new one with --vae_config.")
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-autoencoder"
    data_dir = args.train_data_dir
    if (args.validation_data_dir is None and args.dataset_name is None and data_dir is not None
            and os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test"))):
        args.validation_data_dir = os.path.join(data_dir, "test")
        logger.info("held-out images: the test split %s", args.validation_data_dir)
    if args.eval_resolution is None:
        args.eval_resolution = args.resolution
    args = validate_decoder_args(args)
    if not math.isfinite(args.kl_weight) or args.kl_weight < 0:
        raise ValueError(f"--kl_weight must be a finite number >= 0 (SD VAEs: 1e-6), got {args.kl_weight}.")
    if args.num_scale_images is not None and args.num_scale_images < 1:
        raise ValueError(f"--num_scale_images must be >= 1 when given, got {args.num_scale_images}.")
    args.vae_config = load_json_arg(args.vae_config, "--vae_config")
    if (args.vae_config is None) == (args.vae_model_name_or_path is None):
        got = "both" if args.vae_config is not None else "neither"
        raise ValueError("pass exactly one of --vae_config (a new AutoencoderKL) and --vae_model_name_or_path "
                         f"(continue training one); got {got}.")
    if args.vae_config is not None:
        _check_vae_config(args.vae_config)
    return args


def parse_autoencoder_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    if argv is not None and not isinstance(argv, (list, tuple)):
        raise TypeError(f"`argv` must be a list of strings or None, got {type(argv).__name__}.")
    return validate_autoencoder_args(build_autoencoder_parser().parse_args(argv))


# ---------------------------------------------------------------------- training


def _reconstruct(run, pixels, generator, capture: PosteriorCapture):
    """The prepared model's forward with a posterior sample (noise from the step's seed), and the weighted KL term."""
    args = run.args
    noise = torch.Generator(device=pixels.device).manual_seed(generator.initial_seed())
    recon = run.decoder(pixels, sample_posterior=True, generator=noise, return_dict=False)[0]
    kl = kl_divergence(capture.pop()).mean()
    return recon, args.kl_weight * kl / pixels[0].numel(), {"kl": kl.item()}


def _measure_latents(run, model) -> dict:
    """``before_save`` of :func:`~.decoder_loop.finish_training`: latent statistics into the model's config."""
    args = run.args
    stats = latent_statistics(model, run.dataset.dataset, args.image_column, args.resolution, args.eval_batch_size,
                              args.num_scale_images)
    model.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    logger.info("latent statistics of %d training images: mean %.5f, std %.5f -> scaling_factor %.5f, "
                "shift_factor %.5f", stats["num_images"], stats["mean"], stats["std"], stats["scaling_factor"],
                stats["shift_factor"])
    return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"],
            "latent_statistics": stats}


def _push_to_hub(args, results):
    """The autoencoder model card (``hub_cards/pytorch_model_card.md``, kind ``autoencoder``) and the upload."""
    from .decoder_loop import push_model_to_hub

    source = args.vae_model_name_or_path
    data = args.dataset_name or args.train_data_dir
    notes = (f"Continued from `{source}` on `{data}`." if source else f"Trained from scratch on `{data}`.")
    rows = {"reconstruction loss": args.reconstruction_loss, "KL weight": args.kl_weight,
            "scaling_factor": f"{results['scaling_factor']:.5f}", "shift_factor": f"{results['shift_factor']:.5f}"}
    push_model_to_hub(args, results, "autoencoder", source, notes, extra_rows=rows)


def train_autoencoder(args) -> dict:
    """Sets up and runs autoencoder training (module docstring); writes the model with its measured
    ``scaling_factor``/``shift_factor`` and ``eval_results.json`` into ``--output_dir``; returns the final
    evaluation (PSNR/SSIM of ``decode(encode(x).mode())`` on the held-out images)."""
    from diffusers import AutoencoderKL

    from .decoder_loop import finish_training, prepare_run, run_training_loop
    from .loop import setup_accelerator

    for name in ("output_dir", "seed", "kl_weight", "reconstruction_loss", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_autoencoder_args() (no `{name}`).")
    acc = setup_accelerator(args)
    model = build_autoencoder(args)
    fallback = f"{args.reconstruction_loss.upper()} + KL" + (" + GAN" if args.gan_weight > 0 else "")
    run = prepare_run(args, acc, None, model, AutoencoderKL, "vae", reconstruction_loss=args.reconstruction_loss,
                      lpips_fallback=fallback)
    run.vae = acc.unwrap_model(run.decoder)  # the model encodes its own evaluation images
    capture = PosteriorCapture(run.vae)
    try:
        initial = run_training_loop(run, partial(_reconstruct, capture=capture), label="autoencoder")
    finally:
        capture.remove()
    return finish_training(run, initial, before_save=_measure_latents, push=_push_to_hub)
