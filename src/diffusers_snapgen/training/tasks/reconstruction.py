"""Reconstruction training tasks: SnapGen's tiny decoder against a frozen ``AutoencoderKL`` encoder
(``train_tiny_decoder.py``, paper §3.2) and the 16-channel, f = 8 ``AutoencoderKL`` itself (``train_autoencoder.py``).

Both learn on random patches (cut on the device from ``--cache_images``, or decoded by a data loader) with a
reconstruction loss, optional LPIPS and a patch-GAN loss whose discriminator updates once per optimizer step
(simultaneously with the model), and are measured by PSNR/SSIM on held-out images every ``--validation_steps``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..adversarial import set_requires_grad
from ..autoencoder import SNAPGEN_FACTOR, SNAPGEN_LATENT_CHANNELS, PosteriorCapture, kl_divergence, latent_statistics
from ..batches import DeviceImageCache
from ..data import cache_fingerprint, load_image_caption_dataset, preprocess_image
from ..engine import (
    StepOutput,
    TrainingTask,
    build_lr_scheduler,
    build_optimizer,
    compile_module,
    finish,
    loader_or_device_batches,
    prepare_run,
    setup_accelerator,
    train,
)
from ..reconstruction import DecoderLosses, ImagePatchDataset, encode_for_decoder, evaluate_decoder, load_lpips
from ..reconstruction import save_model_atomically

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["ReconstructionTask", "TinyDecoderTask", "AutoencoderTask", "load_reconstruction_data", "build_decoder",
           "build_autoencoder", "train_tiny_decoder", "train_autoencoder", "EVAL_FILE"]

EVAL_FILE = "eval_results.json"


def load_reconstruction_data(args):
    """``(train HF dataset, eval_images)``: the training images and held-out images ``(N, 3, R, R)`` in [-1, 1]
    (center crops at ``--eval_resolution``) from ``--validation_data_dir``, else the last ``--num_eval_images`` images
    of the training data (which are then left out of training)."""

    def load(name, data_dir):  # no captions needed: the image column stands in for the caption column's check
        return load_image_caption_dataset(name, args.dataset_config_name if name else None, data_dir, args.cache_dir,
                                          args.image_column, args.image_column)

    train_ds = load(args.dataset_name, args.train_data_dir)
    if args.validation_data_dir is not None:
        held = load(None, args.validation_data_dir)
        held = held.select(range(min(args.num_eval_images, len(held))))
    else:
        if len(train_ds) <= args.num_eval_images:
            raise ValueError(f"the training data has {len(train_ds)} images: hold out fewer (--num_eval_images "
                             f"{args.num_eval_images}) or pass --validation_data_dir.")
        n = len(train_ds)
        held = train_ds.select(range(n - args.num_eval_images, n))
        train_ds = train_ds.select(range(n - args.num_eval_images))
    if args.max_train_samples is not None:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
    images = torch.stack([preprocess_image(row[args.image_column], args.eval_resolution, center_crop=True)
                          for row in held])
    return train_ds, images


class ReconstructionTask(TrainingTask):
    """The loop-side of the tiny decoder and the autoencoder: patches, ``DecoderLosses`` (+ the subclass's extra
    term), the patch discriminator and its optimizer, held-out PSNR/SSIM, the saved model and ``eval_results.json``.

    ``image_losses = False`` (the tiny encoder, :mod:`.encoder`) drops ``DecoderLosses`` and the discriminator: the
    subclass then implements :meth:`compute_loss` itself. ``eval_metrics`` lists ``(key, format, card label)`` of the
    held-out metrics that :meth:`measure` returns."""

    name = "reconstruction"
    card_kind = "tiny_decoder"
    image_losses = True
    eval_metrics = (("psnr", ".2f", "held-out PSNR (dB)"), ("ssim", ".4f", "held-out SSIM"))

    def __init__(self, args, accelerator, model, vae, reconstruction_loss: str = "mse", lpips_fallback: str = "MSE + GAN",
                 data=None):
        """``data``: ``(train HF dataset, eval_images)``; default :func:`load_reconstruction_data`."""
        from ..discriminator import PatchDiscriminator

        self.args, self.accelerator, self.vae = args, accelerator, vae
        self.model = model
        self.discriminator = self.losses = None
        if self.image_losses:
            self.discriminator = PatchDiscriminator(3, args.discriminator_channels, args.discriminator_num_layers,
                                                    norm_num_groups=math.gcd(32, args.discriminator_channels))
            lpips_model = load_lpips(args.lpips_net, accelerator.device, fallback=lpips_fallback) \
                if args.lpips_weight > 0 else None
            self.losses = DecoderLosses(getattr(args, "mse_weight", 1.0), args.lpips_weight, args.gan_weight,
                                        args.gan_loss, args.r1_gamma, lpips_model,
                                        reconstruction_loss=reconstruction_loss)
        self.train_dataset, self.eval_images = data if data is not None else load_reconstruction_data(args)
        self.image_cache: DeviceImageCache | None = None
        self.latent_cache = None  # with --cache_latents: the frozen encoder's LatentCache of the cached images
        self.initial = None
        self.step_model = model
        self.d_optimizer = self.d_lr_scheduler = None

    def build_data(self):
        """Returns ``(batches, dataloader or None)`` for :func:`~..engine.prepare_run`. With ``--cache_latents``
        (the tiny decoder and encoder), also the frozen encoder's latent distributions of the cached images."""
        args, acc = self.args, self.accelerator
        if args.cache_images:
            self.image_cache = self.build_image_cache()
            self.build_latent_cache()
            return loader_or_device_batches(args, acc, len(self.image_cache), True)
        dataset = ImagePatchDataset(self.train_dataset, args.image_column, args.resolution, args.random_flip, args.seed)
        return loader_or_device_batches(args, acc, len(dataset), False, dataset,
                                        "the images come from a DataLoader: pass --cache_images")

    def build_image_cache(self) -> DeviceImageCache:
        """The training images at ``--cache_image_resolution`` as uint8 on the device (built once, then read from
        ``<output_dir or precompute_dir>/cache/``)."""
        args, acc = self.args, self.accelerator
        fp = cache_fingerprint(data=getattr(self.train_dataset, "_fingerprint", None) or len(self.train_dataset),
                               res=args.cache_image_resolution, n=len(self.train_dataset))
        path = Path(args.output_dir if not getattr(args, "precompute_dir", None) else args.precompute_dir,
                    "cache", f"images-{fp}.safetensors")
        with acc.main_process_first():
            return DeviceImageCache.build(self.train_dataset, args.image_column, args.cache_image_resolution, path,
                                          args.dataloader_num_workers, acc.is_local_main_process).to(acc.device)

    def build_latent_cache(self):
        """With ``--cache_latents``: the frozen encoder's latent distributions of every image of :attr:`image_cache`
        (and of its mirror image with ``--random_flip``), computed once."""
        args = self.args
        if getattr(args, "cache_latents", False):  # args built before the flag existed have none
            self.latent_cache = self.image_cache.encode(self.vae, args.train_batch_size, args.random_flip)

    def on_prepare(self, run):
        super().on_prepare(run)
        args, acc = self.args, self.accelerator
        self.step_model = compile_module(run.model, args)
        if self.discriminator is None:
            return
        self.discriminator = run.trainable[1]
        params = [p for p in acc.unwrap_model(self.discriminator).parameters()]
        d_lr = args.discriminator_learning_rate or args.learning_rate
        optimizer = build_optimizer(args, [{"params": params, "lr": d_lr}], acc.device)
        scheduler = build_lr_scheduler(args, optimizer, run.max_train_steps, acc.num_processes)
        self.d_optimizer, self.d_lr_scheduler = acc.prepare(optimizer, scheduler)

    def auxiliary_optimizers(self):
        return [self.d_optimizer] if self.d_optimizer is not None else []

    def auxiliary_schedulers(self):
        return [self.d_lr_scheduler] if self.d_lr_scheduler is not None else []

    def step_variant(self, step: int) -> str:
        """``"gan"`` once the GAN terms are on (``--gan_weight`` > 0, from ``--gan_start_step``), else ``"no_gan"``."""
        gan_on = self.discriminator is not None and self.args.gan_weight > 0 and step >= self.args.gan_start_step
        return "gan" if gan_on else "no_gan"

    # ------------------------------------------------------------------------------------------ the loss

    def pixels(self, batch, generator):
        if self.image_cache is not None:
            return self.image_cache.patches(batch["index"], self.args.resolution, generator, self.args.random_flip)
        return batch["pixel_values"].to(self.accelerator.device)

    def whole_images(self, batch, generator):
        """``(pixels, index, flips or None)``: the batch's cached images, whole, half of them mirrored with
        ``--random_flip`` (``flips`` selects the matching rows of :attr:`latent_cache`)."""
        index, flips = batch["index"], None
        if self.args.random_flip:
            flips = torch.rand(index.shape, generator=generator, device=self.image_cache.images.device) < 0.5
        return self.image_cache.patches(index, self.args.resolution, flips=flips), index, flips

    def inputs(self, batch, generator):
        """``(target pixels, what the model reconstructs them from)``: here the pixels themselves."""
        pixels = self.pixels(batch, generator)
        return pixels, pixels

    def reconstruct(self, source, generator):
        """``(reconstruction, extra loss or None, metrics)`` of ``source`` (the second item of :meth:`inputs`)."""
        raise NotImplementedError

    def compute_loss(self, batch, generator) -> StepOutput:
        pixels, source = self.inputs(batch, generator)
        recon, extra_loss, metrics = self.reconstruct(source, generator)
        disc = self.accelerator.unwrap_model(self.discriminator)
        use_gan = self.variant == "gan"
        if use_gan:  # the discriminator's backward on the detached reconstruction; its step comes after the model's
            set_requires_grad(disc, True)
            d_loss, d_metrics = self.losses.discriminator(pixels, recon, self.discriminator)
            self.accelerator.backward(d_loss)
            metrics.update(d_metrics)
        set_requires_grad(disc, False)  # no discriminator gradients from the model's loss
        loss, g_metrics = self.losses.generator(recon, pixels, disc if use_gan else None)
        if extra_loss is not None:
            loss = loss + extra_loss
        return StepOutput(loss, {**g_metrics, **metrics})

    def auxiliary_step(self):
        if self.variant != "gan":
            return
        args = self.args
        if args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.discriminator.parameters(), args.max_grad_norm)
        self.d_optimizer.step()

    # ------------------------------------------------------------------------------------------ evaluation, saving

    def measure(self, model) -> dict:
        """The held-out metrics of ``model`` (every key of ``eval_metrics``): PSNR/SSIM of its decoding of the
        frozen encoder's latents."""
        return evaluate_decoder(model, self.vae, self.eval_images, self.args.eval_batch_size)

    def evaluate(self, step: int, use_ema: bool = True) -> dict:
        run, args = self.run, self.args
        model = run.unwrapped_model
        swap = run.ema is not None and use_ema
        if swap:
            run.ema.store(model.parameters())
            run.ema.copy_to(model.parameters())
        try:
            metrics = self.measure(model)
        finally:
            if swap:
                run.ema.restore(model.parameters())
        keys = [key for key, _, _ in self.eval_metrics]
        record = {"step": step, **{k: metrics[k] for k in keys}}
        self.accelerator.log({f"eval/{k}": metrics[k] for k in keys}, step=step)
        path = Path(args.output_dir, args.logging_dir, "eval.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("step %d: %s on %d held-out images", step,
                    ", ".join(f"{label.removeprefix('held-out ')} {format(metrics[k], fmt)}"
                              for k, fmt, label in self.eval_metrics), len(self.eval_images))
        return metrics

    def on_train_start(self, resumed: bool):
        if not resumed and self.accelerator.is_main_process:
            self.initial = self.evaluate(0, use_ema=False)

    def validate(self, step: int, final: bool = False):
        if self.accelerator.is_main_process:
            self.evaluate(step)

    def before_save(self, model) -> dict:
        """Extra entries of ``eval_results.json`` (e.g. measured config values), computed before saving."""
        return {}

    def save_model(self, model, output_dir):
        save_model_atomically(model, output_dir)

    def save_final(self, model):
        args = self.args
        extra = self.before_save(model)
        final = self.evaluate(self.run.state.global_step, use_ema=False)
        self.save_model(model, args.output_dir)
        keys = [key for key, _, _ in self.eval_metrics]
        results = {"final": {k: final[k] for k in keys}, "step": self.run.state.global_step,
                   "num_eval_images": len(self.eval_images), "eval_resolution": args.eval_resolution}
        if self.losses is not None:
            results["lpips"] = self.losses.lpips_model is not None
        results.update(extra)
        if self.initial is not None:
            results["initial"] = {k: self.initial[k] for k in keys}
        tmp = Path(args.output_dir, f".tmp-{EVAL_FILE}")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(Path(args.output_dir, EVAL_FILE))
        self.final = final
        if args.push_to_hub:
            self._push(results)

    def card_rows(self, results) -> dict:
        args = self.args
        rows = {"steps": results["step"], "patch size": args.resolution, "learning rate": args.learning_rate,
                "batch size (per device)": args.train_batch_size}
        initial = results.get("initial")
        for metric, fmt, label in self.eval_metrics:
            final = format(results["final"][metric], fmt)
            rows[label] = f"{format(initial[metric], fmt)} -> {final}" if initial else final
        return rows

    def card_source_and_notes(self):
        source = self.args.pretrained_vae_model_name_or_path or self.args.pretrained_model_name_or_path
        data = self.args.dataset_name or self.args.train_data_dir
        return source, f"Trained against the frozen encoder of `{source}` on `{data}`."

    def _push(self, results):
        from ..hub import push_to_hub

        source, notes = self.card_source_and_notes()
        push_to_hub(self.args, self.card_kind, self.card_kind, self.card_rows(results), source=source, notes=notes)


class TinyDecoderTask(ReconstructionTask):
    """SnapGen's tiny decoder on the sampled latents of a frozen ``AutoencoderKL`` encoder (paper §3.2).

    With ``--cache_latents`` the encoder's latent distribution of every cached image (and mirror image) is computed
    once; a step then samples the latents from it on the device instead of running the encoder on the batch."""

    name = "tiny_decoder"

    def inputs(self, batch, generator):
        if self.latent_cache is None:
            pixels = self.pixels(batch, generator)
            return pixels, encode_for_decoder(self.vae, pixels, generator=generator)
        pixels, index, flips = self.whole_images(batch, generator)
        return pixels, self.latent_cache.sample(index, flips, generator)

    def reconstruct(self, latents, generator):
        return self.step_model(latents, return_dict=False)[0], None, {}


class AutoencoderTask(ReconstructionTask):
    """The ``AutoencoderKL`` itself: reconstruction of a posterior sample + ``--kl_weight`` x KL per pixel value; at
    the end the latent statistics of the training images go into its config."""

    name = "autoencoder"
    card_kind = "autoencoder"

    def __init__(self, args, accelerator, model, data=None):
        fallback = f"{args.reconstruction_loss.upper()} + KL" + (" + GAN" if args.gan_weight > 0 else "")
        super().__init__(args, accelerator, model, model, args.reconstruction_loss, fallback, data)
        self.capture = PosteriorCapture(model)

    def reconstruct(self, pixels, generator):
        recon = self.step_model(pixels, sample_posterior=True, generator=generator, return_dict=False)[0]
        kl = kl_divergence(self.capture.pop()).mean()
        return recon, self.args.kl_weight * kl / pixels[0].numel(), {"kl": kl.detach()}

    def before_save(self, model) -> dict:
        args = self.args
        stats = latent_statistics(model, self.train_dataset, args.image_column, args.resolution, args.eval_batch_size,
                                  args.num_scale_images)
        model.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
        logger.info("latent statistics of %d training images: mean %.5f, std %.5f -> scaling_factor %.5f, "
                    "shift_factor %.5f", stats["num_images"], stats["mean"], stats["std"], stats["scaling_factor"],
                    stats["shift_factor"])
        self.stats = stats
        return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"],
                "latent_statistics": stats}

    def card_rows(self, results) -> dict:
        args = self.args
        return {**super().card_rows(results), "reconstruction loss": args.reconstruction_loss,
                "KL weight": args.kl_weight, "scaling_factor": f"{results['scaling_factor']:.5f}",
                "shift_factor": f"{results['shift_factor']:.5f}"}

    def card_source_and_notes(self):
        source = self.args.vae_model_name_or_path
        data = self.args.dataset_name or self.args.train_data_dir
        return source, (f"Continued from `{source}` on `{data}`." if source else f"Trained from scratch on `{data}`.")


# ---------------------------------------------------------------------------------------------- setup


def build_decoder(args, vae):
    """``--decoder_model_name_or_path``, or a new ``TinyDecoder`` (paper defaults + ``--decoder_config``) whose
    latent channels and latent statistics are the VAE's; checked against the VAE."""
    from ...models import TinyDecoder

    if args.decoder_model_name_or_path is not None:
        source = Path(args.decoder_model_name_or_path)
        sub = "vae" if (source / "vae" / "config.json").is_file() else None
        decoder = TinyDecoder.from_pretrained(args.decoder_model_name_or_path, subfolder=sub, revision=args.revision,
                                              cache_dir=args.cache_dir)
    else:
        cfg = vae.config
        config = dict(latent_channels=cfg.latent_channels, scaling_factor=float(cfg.scaling_factor),
                      shift_factor=float(cfg.get("shift_factor") or 0.0))
        config.update(args.decoder_config or {})
        torch.manual_seed(args.seed)
        decoder = TinyDecoder(**config)
    if decoder.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"the TinyDecoder takes {decoder.config.latent_channels} latent channels but the AutoencoderKL "
                         f"gives {vae.config.latent_channels}: they must match.")
    return decoder.float().train()


def build_autoencoder(args):
    """``--vae_model_name_or_path`` (``vae`` subfolder of a pipeline if present), or a new ``AutoencoderKL`` from
    ``--vae_config`` initialised from ``--seed``; fp32, trainable. Checks that ``--resolution`` and
    ``--eval_resolution`` are multiples of the model's downsampling factor and warns when the latent layout is not
    SnapGen's (16 channels, f = 8)."""
    from diffusers import AutoencoderKL

    from ..components import load_vae_encoder

    for name in ("vae_config", "vae_model_name_or_path", "seed", "resolution", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_autoencoder_args() (no `{name}`).")
    if args.vae_model_name_or_path is not None:
        vae = load_vae_encoder({}, args.vae_model_name_or_path, torch.float32, args.revision, args.variant,
                               args.cache_dir)
    elif isinstance(args.vae_config, dict):
        torch.manual_seed(args.seed)
        vae = AutoencoderKL.from_config(args.vae_config)
    else:
        raise ValueError("pass --vae_config (a JSON file of AutoencoderKL kwargs) or --vae_model_name_or_path.")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for flag in ("resolution", "eval_resolution", "cache_image_resolution"):
        value = getattr(args, flag, None)
        if value is not None and value % factor:
            raise ValueError(f"--{flag} {value} must be a multiple of the autoencoder's downsampling factor {factor}.")
    if (vae.config.latent_channels, factor) != (SNAPGEN_LATENT_CHANNELS, SNAPGEN_FACTOR):
        logger.warning("this AutoencoderKL has %d latent channels and f = %d; SnapGen's UNet and TinyDecoder take %d "
                       "channels with f = %d.", vae.config.latent_channels, factor, SNAPGEN_LATENT_CHANNELS,
                       SNAPGEN_FACTOR)
    return vae.float().requires_grad_(True).train()


def _run(args, task, model, subfolder):
    batches, loader = task.build_data()
    params = [p for p in model.parameters() if p.requires_grad]
    extra = [task.discriminator] if task.discriminator is not None else []
    run = prepare_run(args, task.accelerator, task, model, [{"params": params}], batches,
                      extra_modules=extra, checkpoint_subfolder=subfolder, dataloader=loader)
    train(run)
    finish(run)
    return getattr(task, "final", None)


def train_tiny_decoder(args) -> dict | None:
    """``train_tiny_decoder.py``: sets up and runs tiny-decoder training; returns the final evaluation (main
    process)."""
    from ...models import TinyDecoder  # noqa: F401  (checkpoint class)
    from ..components import load_vae_encoder, weight_dtype_for

    for name in ("output_dir", "seed", "lpips_weight", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_decoder_args() (no `{name}`).")
    acc = setup_accelerator(args)
    vae = load_vae_encoder({}, args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path,
                           weight_dtype_for(acc.mixed_precision), args.revision, args.variant,
                           args.cache_dir).to(acc.device)
    decoder = build_decoder(args, vae)
    return _run(args, TinyDecoderTask(args, acc, decoder, vae), decoder, "decoder")


def train_autoencoder(args) -> dict | None:
    """``train_autoencoder.py``: trains the ``AutoencoderKL`` and writes it with its measured ``scaling_factor`` /
    ``shift_factor`` and ``eval_results.json``; returns the final evaluation (main process)."""
    for name in ("output_dir", "seed", "kl_weight", "reconstruction_loss", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_autoencoder_args() (no `{name}`).")
    acc = setup_accelerator(args)
    model = build_autoencoder(args)
    task = AutoencoderTask(args, acc, model)
    try:
        return _run(args, task, model, "vae")
    finally:
        task.capture.remove()
