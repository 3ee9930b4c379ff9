"""The tiny-decoder training loop (paper §3.2), in the shape of diffusers' example scripts: accelerate (mixed
precision, accumulation, multi-GPU), AdamW + LR schedule for the decoder and for the patch discriminator, EMA, atomic
checkpoints with exact resume (decoder, EMA, discriminator, both optimizers and schedulers, data position), PSNR/SSIM
evaluation on held-out images, the decoder saved in diffusers format, and the Hub upload.

Each optimizer step: encode a batch of patches with the frozen ``AutoencoderKL`` (``latent_dist.sample()``), decode
with the ``TinyDecoder``, update the decoder on ``MSE + LPIPS + gan_weight * L_adv`` (discriminator frozen), then the
discriminator on ``hinge(D(real), D(sg(recon)))``.

The pieces after the model is built (:func:`prepare_run`, :func:`run_training_loop`, :func:`finish_training`) take
any diffusers model that maps images to reconstructions; ``autoencoder_training`` trains an ``AutoencoderKL`` with
them (its own ``reconstruct`` adds the KL term).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adversarial import set_requires_grad
from .checkpointing import TrainingState, register_checkpoint_hooks, resolve_resume_checkpoint, save_checkpoint
from .decoder_training import (
    DecoderLosses,
    ImagePatchDataset,
    encode_for_decoder,
    evaluate_decoder,
    load_lpips,
    save_model_atomically,
)
from .flow_matching import step_generator

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["DecoderRun", "load_decoder_data", "build_decoder", "prepare_run", "run_training_loop", "finish_training",
           "push_model_to_hub", "train_tiny_decoder"]

EVAL_FILE = "eval_results.json"


@dataclass
class DecoderRun:
    """What the loop holds (prepared objects after :func:`train_tiny_decoder` set it up)."""

    args: object
    accelerator: object
    vae: object
    decoder: torch.nn.Module
    discriminator: torch.nn.Module
    losses: DecoderLosses
    dataset: ImagePatchDataset
    eval_images: torch.Tensor
    dataloader: object = None
    optimizer: object = None
    lr_scheduler: object = None
    d_optimizer: object = None
    d_lr_scheduler: object = None
    ema: object = None
    state: TrainingState = None


def load_decoder_data(args):
    """``(ImagePatchDataset, eval_images)``: training patches and held-out images ``(N, 3, R, R)`` in [-1, 1]
    (center crops at ``--eval_resolution``) from ``--validation_data_dir``, else the last ``--num_eval_images``
    images of the training data (which are then left out of training)."""
    from .data import load_image_caption_dataset, preprocess_image

    def load(name, data_dir):
        # the decoder needs no captions: the image column stands in for the caption column's check
        return load_image_caption_dataset(name, args.dataset_config_name if name else None, data_dir, args.cache_dir,
                                          args.image_column, args.image_column)

    train = load(args.dataset_name, args.train_data_dir)
    if args.validation_data_dir is not None:
        held = load(None, args.validation_data_dir)
        held = held.select(range(min(args.num_eval_images, len(held))))
    else:
        if len(train) <= args.num_eval_images:
            raise ValueError(f"the training data has {len(train)} images: hold out fewer (--num_eval_images "
                             f"{args.num_eval_images}) or pass --validation_data_dir.")
        n = len(train)
        held = train.select(range(n - args.num_eval_images, n))
        train = train.select(range(n - args.num_eval_images))
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    images = torch.stack([preprocess_image(row[args.image_column], args.eval_resolution, center_crop=True)
                          for row in held])
    return ImagePatchDataset(train, args.image_column, args.resolution, args.random_flip, args.seed), images


def build_decoder(args, vae):
    """``--decoder_model_name_or_path``, or a new ``TinyDecoder`` (paper defaults + ``--decoder_config``) whose
    latent channels and latent statistics are the VAE's; checked against the VAE."""
    from ..models import TinyDecoder

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


def _log(args, record):
    path = Path(args.output_dir, args.logging_dir, "metrics.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _evaluate(run: DecoderRun, step: int, use_ema: bool = True) -> dict:
    acc, decoder = run.accelerator, run.accelerator.unwrap_model(run.decoder)
    if run.ema is not None and use_ema:
        run.ema.store(decoder.parameters())
        run.ema.copy_to(decoder.parameters())
    try:
        metrics = evaluate_decoder(decoder, run.vae, run.eval_images, run.args.eval_batch_size)
    finally:
        if run.ema is not None and use_ema:
            run.ema.restore(decoder.parameters())
    record = {"step": step, "psnr": metrics["psnr"], "ssim": metrics["ssim"]}
    acc.log({"eval/psnr": metrics["psnr"], "eval/ssim": metrics["ssim"]}, step=step)
    path = Path(run.args.output_dir, run.args.logging_dir, "eval.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info("step %d: PSNR %.2f dB, SSIM %.4f on %d held-out images", step, metrics["psnr"], metrics["ssim"],
                len(run.eval_images))
    return metrics


def _setup(args) -> DecoderRun:
    from ..models import TinyDecoder
    from .components import load_vae_encoder, weight_dtype_for
    from .loop import setup_accelerator

    acc = setup_accelerator(args)
    weight_dtype = weight_dtype_for(acc.mixed_precision)
    vae = load_vae_encoder({}, args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path,
                           weight_dtype, args.revision, args.variant, args.cache_dir).to(acc.device)
    decoder = build_decoder(args, vae)
    return prepare_run(args, acc, vae, decoder, TinyDecoder, "decoder")


def prepare_run(args, accelerator, vae, decoder, model_cls, subfolder: str = "decoder",
                reconstruction_loss: str = "mse", lpips_fallback: str = "MSE + GAN") -> DecoderRun:
    """Everything after the model is built: patch discriminator, losses (:class:`DecoderLosses` with
    ``reconstruction_loss``), data, optimizers and schedules of both networks, EMA, checkpoint hooks (the model of
    class ``model_cls`` saved in ``<checkpoint>/<subfolder>``), ``accelerator.prepare``. ``vae`` is the encoder
    :func:`run_training_loop` evaluates with (``None``: set ``run.vae`` afterwards)."""
    from diffusers.optimization import get_scheduler

    from .discriminator import PatchDiscriminator
    from .loop import build_ema, build_optimizer

    if not isinstance(decoder, torch.nn.Module) or not hasattr(decoder, "save_pretrained"):
        raise TypeError(f"`decoder` must be a diffusers model, got {type(decoder).__name__}.")
    if not isinstance(model_cls, type) or not isinstance(decoder, model_cls):
        raise TypeError(f"`model_cls` must be the model's class ({type(decoder).__name__}), got {model_cls!r}.")
    if not isinstance(subfolder, str) or not subfolder:
        raise ValueError(f"`subfolder` must be a non-empty folder name, got {subfolder!r}.")
    acc = accelerator
    disc = PatchDiscriminator(3, args.discriminator_channels, args.discriminator_num_layers,
                              norm_num_groups=math.gcd(32, args.discriminator_channels))
    lpips_model = load_lpips(args.lpips_net, acc.device, fallback=lpips_fallback) if args.lpips_weight > 0 else None
    losses = DecoderLosses(args.mse_weight, args.lpips_weight, args.gan_weight, args.gan_loss, args.r1_gamma,
                           lpips_model, reconstruction_loss=reconstruction_loss)
    dataset, eval_images = load_decoder_data(args)
    from .data import EpochShuffleSampler

    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         num_workers=args.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    run = DecoderRun(args, acc, vae, decoder, disc, losses, dataset, eval_images, state=TrainingState(seed=args.seed))
    if args.gradient_checkpointing:
        decoder.enable_gradient_checkpointing()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
    d_lr = args.discriminator_learning_rate or args.learning_rate
    run.optimizer = build_optimizer(args, [{"params": list(decoder.parameters())}])
    run.d_optimizer = build_optimizer(args, [{"params": list(disc.parameters()), "lr": d_lr}])
    max_steps = args.max_train_steps or args.num_train_epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
    args.max_train_steps = max_steps
    sched = dict(num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
                 num_training_steps=max_steps * acc.num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power)
    run.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=run.optimizer, **sched)
    run.d_lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=run.d_optimizer, **sched)
    run.ema = build_ema(args, decoder)
    if run.ema is not None:
        run.ema.to(acc.device)
    register_checkpoint_hooks(acc, model_cls, ema=run.ema, state=run.state, student_subfolder=subfolder)
    (run.decoder, run.discriminator, run.optimizer, run.d_optimizer, run.dataloader, run.lr_scheduler,
     run.d_lr_scheduler) = acc.prepare(decoder, disc, run.optimizer, run.d_optimizer, loader, run.lr_scheduler,
                                       run.d_lr_scheduler)
    return run


def _decoder_reconstruct(run: DecoderRun, pixels, generator):
    """The tiny decoder's reconstruction of ``pixels`` from the frozen encoder's sampled latents; no extra loss."""
    z = encode_for_decoder(run.vae, pixels, generator=generator)
    return run.decoder(z, return_dict=False)[0], None, {}


def _train_step(run: DecoderRun, batch, generator, reconstruct=None) -> dict:
    """One micro-batch: ``reconstruct(run, pixels, generator) -> (recon, extra_loss or None, extra_logs)`` (default:
    the tiny decoder's), the model's update on the :class:`DecoderLosses` generator loss (+ ``extra_loss``), then the
    discriminator's."""
    args, acc = run.args, run.accelerator
    disc = acc.unwrap_model(run.discriminator)
    pixels = batch["pixel_values"].to(acc.device)
    use_gan = args.gan_weight > 0 and run.state.global_step >= args.gan_start_step
    with acc.accumulate(run.decoder, run.discriminator):
        recon, extra_loss, extra_logs = (reconstruct or _decoder_reconstruct)(run, pixels, generator)
        set_requires_grad(disc, False)  # no discriminator gradients from the decoder's loss
        loss, logs = run.losses.generator(recon, pixels, disc if use_gan else None)
        if extra_loss is not None:
            loss = loss + extra_loss
        logs.update(extra_logs)
        acc.backward(loss)
        if acc.sync_gradients and args.max_grad_norm > 0:
            acc.clip_grad_norm_(run.decoder.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if use_gan:
            set_requires_grad(disc, True)
            d_loss, d_logs = run.losses.discriminator(pixels, recon, run.discriminator)
            acc.backward(d_loss)
            if acc.sync_gradients and args.max_grad_norm > 0:
                acc.clip_grad_norm_(run.discriminator.parameters(), args.max_grad_norm)
            run.d_optimizer.step()
            run.d_lr_scheduler.step()
            run.d_optimizer.zero_grad(set_to_none=True)
            logs.update(d_logs)
    logs["loss"] = loss.item()
    return logs


def train_tiny_decoder(args) -> dict:
    """Sets up and runs decoder training (see the module docstring); returns the final evaluation."""
    for name in ("output_dir", "seed", "lpips_weight", "eval_resolution"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_decoder_args() (no `{name}`).")
    run = _setup(args)
    initial = run_training_loop(run)
    return finish_training(run, initial, push=_push_to_hub)


def run_training_loop(run: DecoderRun, reconstruct=None, label: str = "tiny decoder"):
    """Resume (``--resume_from_checkpoint``) or evaluate the untrained model, then the epoch loop: :func:`_train_step`
    with ``reconstruct``, EMA, logs, checkpoints every ``--checkpointing_steps``, evaluations every
    ``--validation_steps``. Returns the initial evaluation (``None`` when resumed or not the main process)."""
    from tqdm.auto import tqdm

    if not isinstance(run, DecoderRun) or run.dataloader is None:
        raise TypeError("`run` must be a DecoderRun from prepare_run().")
    if reconstruct is not None and not callable(reconstruct):
        raise TypeError(f"`reconstruct` must be callable (run, pixels, generator) or None, got {reconstruct!r}.")
    args = run.args
    acc, state = run.accelerator, run.state
    n_batches = len(run.dataloader)
    steps_per_epoch = math.ceil(n_batches / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    if acc.is_main_process:
        acc.init_trackers(args.tracker_project_name,
                          config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    resume = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        acc.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    initial = None
    if resume is not None:
        acc.print(f"Resuming from checkpoint {resume}")
        acc.load_state(str(resume))
        if state.batches_in_epoch >= n_batches:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    elif acc.is_main_process:
        initial = _evaluate(run, 0, use_ema=False)
    logger.info("***** Training the %s: %d images, %d held out, %d steps, batch %d per device *****",
                label, len(run.dataset), len(run.eval_images), max_steps, args.train_batch_size)
    progress = tqdm(range(max_steps), initial=state.global_step, desc="Steps", disable=not acc.is_local_main_process)
    start, accum, done = time.perf_counter(), {}, state.global_step >= max_steps
    for epoch in range(state.epoch, num_epochs):
        if done:
            break
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        state.epoch, state.batches_in_epoch = epoch, skip
        run.dataset.set_epoch(epoch)
        loader = acc.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        loader.set_epoch(epoch)
        run.decoder.train()
        run.discriminator.train()
        for batch in loader:
            generator = step_generator(args.seed, epoch * n_batches + state.batches_in_epoch, acc.process_index)
            logs = _train_step(run, batch, generator, reconstruct)
            state.batches_in_epoch += 1
            for k, v in logs.items():
                accum[k] = accum.get(k, 0.0) + v / args.gradient_accumulation_steps
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            if run.ema is not None:
                run.ema.step(acc.unwrap_model(run.decoder).parameters())
            now = time.perf_counter()
            record = {**{k: round(v, 6) for k, v in accum.items()}, "lr": run.lr_scheduler.get_last_lr()[0],
                      "step_time": round(now - start, 4),
                      "images_per_s": round(args.train_batch_size * args.gradient_accumulation_steps / (now - start), 3)}
            accum = {}
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            acc.log(record, step=state.global_step)
            if acc.is_main_process:
                _log(args, {"step": state.global_step, **record})
            if state.global_step % args.checkpointing_steps == 0:
                logger.info("Saved state to %s", save_checkpoint(acc, args.output_dir, state, args.checkpoints_total_limit))
            if state.global_step % args.validation_steps == 0 and state.global_step < max_steps and acc.is_main_process:
                _evaluate(run, state.global_step)
            start = time.perf_counter()
            if state.global_step >= max_steps:
                done = True
                break
    progress.close()
    return initial


def finish_training(run: DecoderRun, initial=None, before_save=None, push=None):
    """Main process: EMA weights into the model, ``before_save(run, model) -> dict`` (extra entries of the results,
    e.g. measured config values), the final evaluation, ``save_pretrained`` into ``--output_dir`` (atomic),
    ``eval_results.json`` (``initial`` and final PSNR/SSIM) and, with ``--push_to_hub``, ``push(args, results)``.
    Returns the final evaluation (``None`` on other processes)."""
    if not isinstance(run, DecoderRun):
        raise TypeError("`run` must be a DecoderRun from prepare_run().")
    for name, fn in (("before_save", before_save), ("push", push)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable or None, got {fn!r}.")
    args, acc, state = run.args, run.accelerator, run.state
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        decoder = acc.unwrap_model(run.decoder)
        if run.ema is not None:
            run.ema.copy_to(decoder.parameters())
        extra = before_save(run, decoder) if before_save is not None else {}
        final = _evaluate(run, state.global_step, use_ema=False)
        save_model_atomically(decoder.eval(), args.output_dir)
        results = {"final": {k: final[k] for k in ("psnr", "ssim")}, "step": state.global_step,
                   "num_eval_images": len(run.eval_images), "eval_resolution": args.eval_resolution,
                   "lpips": run.losses.lpips_model is not None, **(extra or {})}
        if initial is not None:
            results["initial"] = {k: initial[k] for k in ("psnr", "ssim")}
        tmp = Path(args.output_dir, f".tmp-{EVAL_FILE}")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(Path(args.output_dir, EVAL_FILE))
        if args.push_to_hub and push is not None:
            push(args, results)
    acc.end_training()
    return final


def _push_to_hub(args, results):
    """Renders the tiny-decoder model card (``hub_cards/pytorch_model_card.md``) and uploads ``--output_dir``."""
    source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    data = args.dataset_name or args.train_data_dir
    push_model_to_hub(args, results, "tiny_decoder", source,
                      f"Trained against the frozen encoder of `{source}` on `{data}`.")


def push_model_to_hub(args, results: dict, kind: str, source=None, notes: str | None = None,
                      extra_rows: dict | None = None):
    """Writes the ``kind`` model card (``cards.render_pytorch_card``, stage ``kind``; training table: steps, patch
    size, LR, batch, held-out PSNR/SSIM initial -> final, ``extra_rows``) into ``--output_dir`` and uploads it to
    ``args.hub_repo_id``. ``source``: the model trained from / against (a Hub id becomes the card's base model)."""
    from huggingface_hub import upload_folder

    from ..cards import render_pytorch_card
    from .loop import _hub_base_model

    if not isinstance(results, dict) or "final" not in results or "step" not in results:
        raise TypeError("`results` must be the eval_results dict of finish_training (with 'final' and 'step').")
    if extra_rows is not None and not isinstance(extra_rows, dict):
        raise TypeError(f"`extra_rows` must be a dict of card rows or None, got {type(extra_rows).__name__}.")
    training = {
        "steps": results["step"],
        "patch size": args.resolution,
        "learning rate": args.learning_rate,
        "batch size (per device)": args.train_batch_size,
    }
    initial = results.get("initial")
    for metric, fmt, label in (("psnr", ".2f", "held-out PSNR (dB)"), ("ssim", ".4f", "held-out SSIM")):
        final = format(results["final"][metric], fmt)
        training[label] = f"{format(initial[metric], fmt)} -> {final}" if initial else final
    training.update(extra_rows or {})
    card = render_pytorch_card(
        kind, kind, args.hub_repo_id, base_model=_hub_base_model(source), training=training,
        datasets=[args.dataset_name] if args.dataset_name else None, notes=notes,
    )
    card.save(str(Path(args.output_dir, "README.md")))
    upload_folder(repo_id=args.hub_repo_id, folder_path=args.output_dir, commit_message="End of training",
                  ignore_patterns=["checkpoint-*", ".tmp-*", "logs/*"], token=args.hub_token)
