"""A TinyEncoder for a pipeline that ships only a decoder (``train_tiny_encoder.py --targets pipeline_samples``).

Such a pipeline (the package's default model: a SnapGen UNet and a tiny decoder, paper §3.2) has no autoencoder to
distil, so the encoder is trained to **invert the frozen decoder on the latents the pipeline itself samples**:

* the pipeline samples latents ``z`` from the training captions (its own few-step, no-CFG defaults, fixed seeds) and
  decodes them, ``x = D(z)``; the pairs are made once and kept on the device;
* the encoder learns ``MSE(E(x), z)`` in scaled latent units (as the autoencoder-distillation task does). These
  latents are exactly the distribution the UNet was trained to produce, so a fine-tuning run sees latents of the
  statistics its UNet knows, and ``D(E(x)) = x`` holds on the decoder's image manifold;
* optionally ``--pixel_loss_weight`` x ``MSE(D(E(x_real)), x_real)`` on real training images through the frozen
  decoder: the pairs only cover images the decoder can make; the pixel term teaches the encoder to map the sharper
  real images (what fine-tuning encodes) to latents that decode back to them.

Held out: the latent MSE and the round-trip PSNR ``D(E(D(z)))`` vs ``D(z)`` on samples of other seeds (and the
held-out captions when ``--validation_data_dir`` has some), and PSNR/SSIM of ``D(E(x))`` vs ``x`` on held-out real
images. Everything else (device caches, EMA, resume, the saved model, ``eval_results.json``) is the tiny encoder's.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import cache_fingerprint, load_image_caption_dataset
from ..engine import StepOutput, loader_or_device_batches, setup_accelerator
from ..reconstruction import evaluate_decoder, psnr
from .encoder import TinyEncoderTask, build_encoder
from .reconstruction import ReconstructionTask, _run

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["DecoderInversionTask", "sample_decoder_pairs", "load_sampling_pipeline", "train_decoder_inversion"]

#: Seeds of the held-out samples start here (training samples use ``seed * 1_000_003 + i``, far below it).
HELD_OUT_SEED = 2**40


def load_sampling_pipeline(source, device=None, dtype=torch.float32):
    """The :class:`~diffusers_snapgen.SnapGenPipeline` ``source`` (a folder, Hub id or ``"default"``) with its text
    encoder (the packaged one the scheduler names, if any), frozen, progress bar off."""
    from ...pipelines import SnapGenPipeline
    from ..components import DEFAULT_MODEL_NAME, resolve_model_path

    if source == DEFAULT_MODEL_NAME and not Path(source).is_dir():
        from ...default_model import load_default_pipeline

        pipe = load_default_pipeline(dtype=dtype)
    else:
        pipe = SnapGenPipeline.from_pretrained(resolve_model_path(source), torch_dtype=dtype)
    if pipe.unet is None or pipe.vae is None or pipe.text_encoder is None:
        raise ValueError(f"--pretrained_model_name_or_path {source!r} must be a SnapGen pipeline with a unet, a vae "
                         "and a text encoder (or a packaged one named in its scheduler config) to sample latents from.")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def sample_decoder_pairs(pipeline, prompts: list[str], seeds: list[int], resolution: int,
                         num_inference_steps: int | None = None, batch_size: int = 32):
    """``(latents, images)``: the pipeline's **unscaled** latents ``z`` for ``prompts`` (one generator per image,
    seeded by ``seeds``) with its sampling defaults, and their decodings ``D(z)`` clamped to [-1, 1], float32 on the
    CPU, shapes ``(N, C, R/8, R/8)`` and ``(N, 3, R, R)``."""
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must be a non-empty list of strings.")
    if len(seeds) != len(prompts):
        raise ValueError(f"`seeds` must give one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` (--sample_batch_size) must be a positive int, got {batch_size!r}.")
    device, config = pipeline.unet.device, pipeline.vae.config
    shift = config.get("shift_factor") or 0.0
    latents, images = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        z = pipeline(chunk, height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                     generator=generators, output_type="latent").images
        images.append(pipeline.decode_latents(z).float().clamp(-1, 1).cpu())
        latents.append((z.float() / config.scaling_factor + shift).cpu())
    return torch.cat(latents), torch.cat(images)


def _captions(dataset, column: str, where: str) -> list[str]:
    if column not in dataset.column_names:
        raise ValueError(f"{where} has no caption column {column!r} (columns: {dataset.column_names}): the "
                         "pipeline samples latents from captions; pass --caption_column.")
    captions = [c if isinstance(c, str) else c[0] for c in dataset[column] if c]
    if not captions:
        raise ValueError(f"{where} has no captions in column {column!r}.")
    return captions


class DecoderInversionTask(TinyEncoderTask):
    """Trains ``model`` (a ``TinyEncoder``) to invert ``pipeline.vae`` on the pipeline's own samples (module
    docstring); ``vae`` of the parent tasks is the frozen decoder."""

    name = "tiny_encoder_inversion"
    eval_metrics = (("latent_mse", ".5f", "held-out latent MSE on samples (scaled latents)"),
                    ("roundtrip_psnr", ".2f", "held-out round-trip PSNR D(E(D(z))) vs D(z) (dB)"),
                    ("psnr", ".2f", "held-out PSNR D(E(x)) vs real images x (dB)"),
                    ("ssim", ".4f", "held-out SSIM D(E(x)) vs real images x"))

    def __init__(self, args, accelerator, model, pipeline, data=None):
        super().__init__(args, accelerator, model, pipeline.vae, data=data)
        self.pipeline = pipeline
        self.sample_latents = self.sample_images = self.eval_latents = self.eval_sample_images = None

    # ------------------------------------------------------------------------------------------ data

    def _prompts(self):
        """``(training prompts, held-out prompts)``: ``--num_pipeline_samples`` and ``--num_eval_images`` captions
        drawn (seeded) from the training data and from ``--validation_data_dir`` (else the training data)."""
        args = self.args
        rng = random.Random(args.seed)
        train = _captions(self.train_dataset, args.caption_column, "the training data")
        held = train
        if args.validation_data_dir is not None:
            val = load_image_caption_dataset(None, None, args.validation_data_dir, args.cache_dir, args.image_column,
                                             args.image_column)
            if args.caption_column in val.column_names:
                held = _captions(val, args.caption_column, "--validation_data_dir")
        return ([rng.choice(train) for _ in range(args.num_pipeline_samples)],
                [rng.choice(held) for _ in range(args.num_eval_images)])

    def build_sample_bank(self):
        """Samples the training and held-out pairs once (cached in ``<output_dir>/cache/``) and moves them to the
        device (images as fp16)."""
        from safetensors.torch import load_file, save_file

        args, acc = self.args, self.accelerator
        prompts, held_prompts = self._prompts()
        seeds = [args.seed * 1_000_003 + i for i in range(len(prompts))]
        held_seeds = [HELD_OUT_SEED + args.seed * 1_000_003 + i for i in range(len(held_prompts))]
        fp = cache_fingerprint(source=str(args.pretrained_model_name_or_path), prompts=prompts, held=held_prompts,
                               seeds=[seeds[0], held_seeds[0]], res=args.resolution,
                               steps=args.sample_num_inference_steps, unet=dict(self.pipeline.unet.config))
        path = Path(args.output_dir, "cache", f"pipeline-samples-{fp}.safetensors")
        with acc.main_process_first():
            if not path.is_file():
                logger.info("sampling %d + %d latent/image pairs from the pipeline", len(prompts), len(held_prompts))
                steps, bs = args.sample_num_inference_steps, args.sample_batch_size
                z, x = sample_decoder_pairs(self.pipeline, prompts, seeds, args.resolution, steps, bs)
                hz, hx = sample_decoder_pairs(self.pipeline, held_prompts, held_seeds, args.resolution, steps, bs)
                if acc.is_main_process:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".tmp-{path.name}")
                    save_file({"latents": z, "images": x.half(), "eval_latents": hz, "eval_images": hx.half()},
                              str(tmp))
                    tmp.replace(path)
            bank = load_file(str(path))
        device = acc.device
        self.sample_latents, self.sample_images = bank["latents"].to(device), bank["images"].to(device)
        self.eval_latents, self.eval_sample_images = bank["eval_latents"], bank["eval_images"].float()

    def build_data(self):
        """Index batches over the sampled pairs (no flips: a flipped ``D(z)`` is not the decoding of a flipped ``z``);
        the real training images go on the device for the pixel term (flipped with ``--random_flip``)."""
        args, acc = self.args, self.accelerator
        self.build_sample_bank()
        if args.pixel_loss_weight > 0:
            self.image_cache = self.build_image_cache()
        return loader_or_device_batches(args, acc, len(self.sample_latents), True)

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, batch, generator) -> StepOutput:
        args, decoder = self.args, self.vae
        index = batch["index"]
        images, target = self.sample_images[index].float(), self.sample_latents[index].float()
        latents = self.step_model(images, return_dict=False)[0].float()
        latent_mse = F.mse_loss(latents, target) * self.scale**2
        loss, metrics = latent_mse, {"latent_mse": latent_mse.detach()}
        if args.pixel_loss_weight > 0:
            count = args.pixel_batch_size or args.train_batch_size
            pick = (torch.rand(count, generator=generator, device=generator.device) * len(self.image_cache)).long()
            real = self.image_cache.patches(pick.to(self.accelerator.device), args.resolution, generator,
                                            args.random_flip)
            decoded = decoder.decode(self.step_model(real, return_dict=False)[0].to(decoder.dtype)).sample.float()
            pixel_mse = F.mse_loss(decoded, real.float())
            loss = loss + args.pixel_loss_weight * pixel_mse
            metrics["pixel_mse"] = pixel_mse.detach()
        return StepOutput(loss, metrics)

    # ------------------------------------------------------------------------------------------ evaluation, saving

    @torch.no_grad()
    def measure(self, model) -> dict:
        """Latent MSE (scaled) and round-trip PSNR on the held-out samples; PSNR/SSIM of ``D(E(x))`` on the held-out
        real images."""
        was_training = model.training
        model.eval()
        decoder, bs = self.vae, self.args.eval_batch_size
        param = next(model.parameters())
        squared, count, psnrs = 0.0, 0, []
        try:
            for z, x in zip(self.eval_latents.split(bs), self.eval_sample_images.split(bs)):
                latents = model(x.to(param.device, param.dtype), return_dict=False)[0].float().cpu()
                squared += (latents - z).double().pow(2).sum().item()
                count += z.numel()
                recon = decoder.decode(latents.to(decoder.device, decoder.dtype)).sample.float().clamp(-1, 1).cpu()
                psnrs.append(psnr((recon + 1) / 2, (x + 1) / 2))
            real = evaluate_decoder(decoder, model, self.eval_images, bs)
        finally:
            model.train(was_training)
        return {**real, "latent_mse": squared / count * self.scale**2, "roundtrip_psnr": torch.cat(psnrs).mean().item()}

    def before_save(self, model) -> dict:
        return {"targets": "pipeline_samples", "num_pipeline_samples": len(self.sample_latents),
                "num_eval_samples": len(self.eval_latents), "parameters": sum(p.numel() for p in model.parameters())}

    def card_rows(self, results) -> dict:
        rows = ReconstructionTask.card_rows(self, results)
        rows["pipeline samples (pairs)"] = results.get("num_pipeline_samples")
        rows["pixel loss weight (real images)"] = self.args.pixel_loss_weight
        return rows

    def card_source_and_notes(self):
        source = self.args.pretrained_model_name_or_path
        return source, (f"Trained to invert the frozen decoder of `{source}` on latents the pipeline sampled from the "
                        f"captions of `{self.args.dataset_name or self.args.train_data_dir}`.")


def train_decoder_inversion(args) -> dict | None:
    """``train_tiny_encoder.py --targets pipeline_samples``: sets up and runs the decoder inversion; returns the
    final evaluation (main process)."""
    acc = setup_accelerator(args)
    pipeline = load_sampling_pipeline(args.pretrained_model_name_or_path, acc.device)
    encoder = build_encoder(args, pipeline.vae)
    return _run(args, DecoderInversionTask(args, acc, encoder, pipeline), encoder, "encoder")
