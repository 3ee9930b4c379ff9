"""The tiny encoder's training task (``train_tiny_encoder.py``): a :class:`~diffusers_snapgen.TinyEncoder` learns the
posterior mean of a frozen ``AutoencoderKL``'s encoder, so that a pipeline shipped with only SnapGen's tiny decoder
(paper §3.2) can encode training images for fine-tuning (docs/finetuning.md).

Loss: ``MSE(TinyEncoder(x), AE.encode(x).mean)`` in the diffusion model's units (scaled latents,
``(z - shift_factor) * scaling_factor``, so 1.0 is about the variance of the latents), plus optionally
``--pixel_loss_weight`` x ``MSE(AE.decode(TinyEncoder(x)), x)``. Data, device caches, held-out evaluation, EMA and the
final save come from :class:`~.reconstruction.ReconstructionTask` (without its patch GAN); with ``--cache_latents``
the posterior means of the cached images (and mirror images) are computed once and a step gathers its targets instead
of running the autoencoder's encoder. Held out: the latent MSE and the PSNR/SSIM of the autoencoder's decoding of the
tiny latents.

A pipeline with a decoder only (no autoencoder to distil) uses ``--targets pipeline_samples`` instead:
:mod:`.decoder_inversion`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..components import ENCODER_SUBFOLDER, load_vae_encoder, weight_dtype_for
from ..engine import StepOutput, setup_accelerator
from ..reconstruction import encode_for_decoder, evaluate_decoder
from .reconstruction import ReconstructionTask, _run

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["TinyEncoderTask", "build_encoder", "train_tiny_encoder", "ENCODER_SUBFOLDER"]


class TinyEncoderTask(ReconstructionTask):
    """Distils ``vae``'s (a frozen ``AutoencoderKL``) posterior mean into ``model`` (a ``TinyEncoder``)."""

    name = "tiny_encoder"
    card_kind = "tiny_encoder"
    image_losses = False
    eval_metrics = (("latent_mse", ".5f", "held-out latent MSE (scaled latents)"),
                    ("psnr", ".2f", "held-out PSNR of the decoded tiny latents (dB)"),
                    ("ssim", ".4f", "held-out SSIM of the decoded tiny latents"))

    def __init__(self, args, accelerator, model, vae, data=None):
        super().__init__(args, accelerator, model, vae, data=data)
        self.scale = float(vae.config.scaling_factor)

    def compute_loss(self, batch, generator) -> StepOutput:
        args, vae = self.args, self.vae
        if self.latent_cache is None:
            pixels = self.pixels(batch, generator)
            with torch.no_grad():
                target = vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float()
        else:  # --cache_latents: the posterior means of the cached images, computed once
            pixels, index, flips = self.whole_images(batch, generator)
            target = self.latent_cache.mode(index, flips)
        latents = self.step_model(pixels, return_dict=False)[0].float()
        latent_mse = F.mse_loss(latents, target) * self.scale**2
        loss, metrics = latent_mse, {"latent_mse": latent_mse.detach()}
        if args.pixel_loss_weight > 0:
            decoded = vae.decode(latents.to(vae.dtype)).sample.float()
            pixel_mse = F.mse_loss(decoded, pixels.float())
            loss = loss + args.pixel_loss_weight * pixel_mse
            metrics["pixel_mse"] = pixel_mse.detach()
        return StepOutput(loss, metrics)

    @torch.no_grad()
    def measure(self, model) -> dict:
        """Latent MSE (scaled units) against the autoencoder's posterior mean, and PSNR/SSIM of the autoencoder's
        decoding of the tiny latents, on the held-out images."""
        was_training = model.training
        model.eval()
        try:
            squared, count = 0.0, 0
            for chunk in self.eval_images.split(self.args.eval_batch_size):
                target = encode_for_decoder(self.vae, chunk, sample=False)
                latents = encode_for_decoder(model, chunk, sample=False).to(target.device)
                squared += (latents - target).double().pow(2).sum().item()
                count += target.numel()
            metrics = evaluate_decoder(self.vae, model, self.eval_images, self.args.eval_batch_size)
        finally:
            model.train(was_training)
        return {**metrics, "latent_mse": squared / count * self.scale**2}

    def before_save(self, model) -> dict:
        """The autoencoder's own PSNR/SSIM on the held-out images (the ceiling) and the encoder's size."""
        reference = evaluate_decoder(self.vae, self.vae, self.eval_images, self.args.eval_batch_size)
        return {"autoencoder": {k: reference[k] for k in ("psnr", "ssim")},
                "parameters": sum(p.numel() for p in model.parameters())}

    def card_rows(self, results) -> dict:
        rows = super().card_rows(results)
        ceiling = results.get("autoencoder")
        if ceiling:
            rows["autoencoder's own held-out PSNR (dB)"] = f"{ceiling['psnr']:.2f}"
        rows["pixel loss weight"] = self.args.pixel_loss_weight
        return rows

    def card_source_and_notes(self):
        source = self.args.pretrained_vae_model_name_or_path or self.args.pretrained_model_name_or_path
        data = self.args.dataset_name or self.args.train_data_dir
        return source, f"Distilled from the posterior mean of the frozen encoder of `{source}` on `{data}`."


def build_encoder(args, vae):
    """``--encoder_model_name_or_path`` (its ``vae_encoder`` subfolder when it is a pipeline), or a new
    ``TinyEncoder`` (defaults + ``--encoder_config``) with the autoencoder's latent channels and statistics; checked
    against the autoencoder."""
    from ...models import TinyEncoder

    if args.encoder_model_name_or_path is not None:
        source = Path(args.encoder_model_name_or_path)
        sub = ENCODER_SUBFOLDER if (source / ENCODER_SUBFOLDER / "config.json").is_file() else None
        encoder = TinyEncoder.from_pretrained(args.encoder_model_name_or_path, subfolder=sub, revision=args.revision,
                                              cache_dir=args.cache_dir)
    else:
        cfg = vae.config
        config = dict(latent_channels=cfg.latent_channels, scaling_factor=float(cfg.scaling_factor),
                      shift_factor=float(cfg.get("shift_factor") or 0.0))
        config.update(args.encoder_config or {})
        torch.manual_seed(args.seed)
        try:
            encoder = TinyEncoder(**config)
        except TypeError as e:
            raise ValueError(f"--encoder_config does not build a TinyEncoder ({e}).") from e
    if encoder.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"the TinyEncoder gives {encoder.config.latent_channels} latent channels but the "
                         f"{type(vae).__name__} has {vae.config.latent_channels}: they must match.")
    ours, theirs = 2 ** (len(encoder.config.block_out_channels) - 1), 2 ** (len(vae.config.block_out_channels) - 1)
    if ours != theirs:
        raise ValueError(f"the TinyEncoder downsamples by {ours} but the {type(vae).__name__} by {theirs}: give the encoder "
                         f"{len(vae.config.block_out_channels)} stages (block_out_channels in --encoder_config).")
    return encoder.float().train()


def train_tiny_encoder(args) -> dict | None:
    """``train_tiny_encoder.py``: sets up and runs tiny-encoder distillation (``--targets autoencoder``) or decoder
    inversion on the pipeline's own samples (``--targets pipeline_samples``); returns the final evaluation (main
    process)."""
    from diffusers import AutoencoderKL

    for name in ("output_dir", "seed", "pixel_loss_weight", "eval_resolution", "targets"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_encoder_args() (no `{name}`).")
    if args.targets == "pipeline_samples":
        from .decoder_inversion import train_decoder_inversion

        return train_decoder_inversion(args)
    acc = setup_accelerator(args)
    source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    vae = load_vae_encoder({}, source, weight_dtype_for(acc.mixed_precision), args.revision, args.variant,
                           args.cache_dir)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{source!r} holds a {type(vae).__name__}; the tiny encoder distils an AutoencoderKL (it "
                         "needs its posterior and its decoder): pass one with --pretrained_vae_model_name_or_path.")
    vae.to(acc.device)
    encoder = build_encoder(args, vae)
    return _run(args, TinyEncoderTask(args, acc, encoder, vae), encoder, "encoder")
