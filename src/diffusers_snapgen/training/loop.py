"""The training loop shared by ``train_snapgen.py``, ``train_snapgen_kd.py``, ``train_snapgen_asd.py`` and
``train_sd3_teacher.py``.

The scripts build their models and a ``compute_loss(ctx, batch, generator)`` function; everything else - accelerator
and tracker setup, data and caches, optimizer, LR schedule, EMA, gradient accumulation and clipping, atomic
checkpoints with exact resume, validation images, per-timestep-bucket statistics, the final ``SnapGenPipeline`` and
the Hub upload - lives here, in the shape of diffusers' example scripts. The student is a SnapGen UNet or (the
teacher script) an ``SD3Transformer2DModel``, which the pipeline samples through ``SD3TransformerDenoiser``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers.training_utils import free_memory

from .checkpointing import (
    TrainingState,
    atomic_save_pipeline,
    register_checkpoint_hooks,
    remove_incomplete,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .components import encode_captions, encode_latents, scale_latents
from .data import (
    ImageCaptionDataset,
    LatentCache,
    TextEmbeddingCache,
    build_train_dataloader,
    cache_fingerprint,
    load_image_caption_dataset,
)
from .flow_matching import (
    FlowMatchingSampler,
    denoiser_forward,
    flow_matching_loss,
    prepare_flow_matching_batch,
    step_generator,
)
from .scaling import TimestepBucketStats

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "TrainContext",
    "setup_accelerator",
    "build_data",
    "build_optimizer",
    "build_ema",
    "setup_base",
    "batch_conditioning",
    "student_flow_matching_step",
    "flow_matching_task_loss",
    "log_validation",
    "train",
    "save_final_pipeline",
]


@dataclass
class TrainContext:
    """What ``compute_loss`` and the loop share. ``extra`` holds script-specific objects (teacher, KD module)."""

    args: object
    accelerator: object
    pipeline: object
    student: torch.nn.Module
    vae_encoder: object
    weight_dtype: torch.dtype
    sampler: FlowMatchingSampler
    dataset: ImageCaptionDataset | None = None
    dataloader: object = None
    optimizer: object = None
    lr_scheduler: object = None
    ema: object = None
    state: TrainingState = field(default_factory=TrainingState)
    latent_cache: LatentCache | None = None
    text_cache: TextEmbeddingCache | None = None
    validation_embeds: dict | None = None
    extra: dict = field(default_factory=dict)


def _check_ctx(ctx, *needs):
    if not isinstance(ctx, TrainContext):
        raise TypeError(f"`ctx` must be a TrainContext, got {type(ctx).__name__}.")
    missing = [n for n in needs if getattr(ctx, n) is None]
    if missing:
        raise ValueError(f"`ctx` is not set up yet: {missing} missing (run build_data / finish_setup first).")


def _check_args(args):
    for name in ("output_dir", "seed", "train_batch_size", "gradient_accumulation_steps"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from diffusers_snapgen.training.parse_args (no `{name}`).")


def setup_accelerator(args):
    """``Accelerator`` with the run's precision, accumulation, trackers and project folders; seeds everything;
    creates ``output_dir`` (main process), removes leftovers of interrupted saves, creates the Hub repo."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed

    _check_args(args)
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    get_logger(__name__).info(accelerator.state, main_process_only=False)
    import diffusers
    import transformers

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    args.hub_repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for leftover in remove_incomplete(args.output_dir):
            logger.info("removed the leftover of an interrupted save: %s", leftover)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            args.hub_repo_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id
    return accelerator


def setup_base(args):
    """The start of every UNet/teacher script: :func:`setup_accelerator`, then the frozen parts of the base pipeline
    ``--pretrained_model_name_or_path`` (text encoders, VAE, scheduler) in the run's weight dtype and the latent
    encoder (``--pretrained_vae_model_name_or_path`` when given). Returns ``(accelerator, components, latent_vae)``."""
    from .components import load_base_components, load_vae_encoder, weight_dtype_for

    accelerator = setup_accelerator(args)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    components = load_base_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                                      args.cache_dir, dtype=weight_dtype)
    latent_vae = load_vae_encoder(components, args.pretrained_vae_model_name_or_path, weight_dtype,
                                  args.revision, args.variant, args.cache_dir)
    return accelerator, components, latent_vae


def build_data(ctx: TrainContext, max_sequence_length=None):
    """Dataset, data loader and (optionally) the latent / text-embedding caches; stores them in ``ctx``."""
    _check_ctx(ctx, "pipeline", "vae_encoder")
    args, acc = ctx.args, ctx.accelerator
    hf = load_image_caption_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                                    args.image_column, args.caption_column, args.max_train_samples)
    ds = ImageCaptionDataset(hf, args.image_column, args.caption_column, args.resolution, args.center_crop,
                             args.random_flip, seed=args.seed)
    cache_dir = Path(args.precompute_dir or Path(args.output_dir, "cache"))
    data_id = getattr(hf, "_fingerprint", None) or len(hf)
    if args.cache_latents:
        fp = cache_fingerprint(data=data_id, res=args.resolution, crop=args.center_crop, flip=args.random_flip,
                               seed=args.seed, vae=str(getattr(ctx.vae_encoder, "name_or_path", "")),
                               vae_cfg=dict(ctx.vae_encoder.config))
        with acc.main_process_first():
            ctx.latent_cache = LatentCache.build(ds, ctx.vae_encoder, batch_size=args.train_batch_size,
                                                 device=acc.device, dtype=ctx.weight_dtype,
                                                 path=cache_dir / f"latents-{fp}.safetensors",
                                                 progress=acc.is_local_main_process)
        ds.load_images = False
    if args.cache_text_embeddings:
        captions = ds.first_captions()
        fp = cache_fingerprint(captions=captions, enc=str(ctx.pipeline.config.get("_name_or_path", "")),
                               msl=max_sequence_length, text=[str(getattr(ctx.pipeline, n, None).__class__.__name__)
                                                              for n in ("text_encoder", "text_encoder_2", "text_encoder_3")])

        def encode(caps):
            return encode_captions(ctx.pipeline, caps, acc.device, max_sequence_length)

        with acc.main_process_first():
            ctx.text_cache = TextEmbeddingCache.build(captions, encode, batch_size=16, dtype=ctx.weight_dtype,
                                                      path=cache_dir / f"text-{fp}.safetensors",
                                                      progress=acc.is_local_main_process)
        if args.validation_prompts:
            ctx.validation_embeds = {p: encode_captions(ctx.pipeline, [p], acc.device, max_sequence_length)
                                     for p in [*args.validation_prompts, ""]}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # no longer needed on the GPU
            if getattr(ctx.pipeline, name, None) is not None:
                getattr(ctx.pipeline, name).to("cpu")
    if args.cache_latents and ctx.vae_encoder is not ctx.pipeline.vae:
        ctx.vae_encoder.to("cpu")  # only its config (scaling/shift factors) is used from now on
    if args.cache_latents or args.cache_text_embeddings:
        free_memory()
    ctx.dataset = ds
    ctx.dataloader, _ = build_train_dataloader(ds, args.train_batch_size, seed=args.seed,
                                               num_workers=args.dataloader_num_workers)
    return ctx


def build_optimizer(args, param_groups: list[dict]):
    """AdamW (torch, or bitsandbytes' 8-bit with ``--use_8bit_adam``) over ``param_groups``."""
    if not isinstance(param_groups, list) or not all(isinstance(g, dict) and "params" in g for g in param_groups):
        raise TypeError("`param_groups` must be a list of dicts with 'params' (torch optimizer param groups).")
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def build_ema(args, student):
    """diffusers' ``EMAModel`` of the student (``None`` without ``--use_ema``; ``--foreach_ema`` for its foreach
    update)."""
    _check_args(args)
    if not isinstance(student, torch.nn.Module) or not hasattr(student, "config"):
        raise TypeError(f"`student` must be a diffusers model, got {type(student).__name__}.")
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(student.parameters(), decay=args.ema_decay, model_cls=type(student), model_config=student.config,
                    foreach=bool(getattr(args, "foreach_ema", False)))


def batch_conditioning(ctx: TrainContext, batch: dict, generator: torch.Generator):
    """``(latents, prompt_embeds, pooled_prompt_embeds)`` of a batch: cached or freshly encoded, with caption
    dropout (``--proportion_empty_prompts``) drawn from ``generator``."""
    _check_ctx(ctx, "pipeline", "vae_encoder")
    if not isinstance(batch, dict) or "caption" not in batch or "index" not in batch:
        raise TypeError("`batch` must be a collated dict with 'caption' and 'index' (see collate_examples).")
    args, device = ctx.args, ctx.accelerator.device
    n = len(batch["caption"])
    empty = torch.rand(n, generator=generator) < args.proportion_empty_prompts
    if ctx.latent_cache is not None:
        latents = scale_latents(ctx.vae_encoder, ctx.latent_cache.sample(batch["index"], batch["flip"], generator))
    else:
        latents = encode_latents(ctx.vae_encoder, batch["pixel_values"], generator=generator)
    if ctx.text_cache is not None:
        embeds, pooled = ctx.text_cache.get(batch["index"], empty)
    else:
        captions = ["" if e else c for c, e in zip(batch["caption"], empty.tolist())]
        embeds, pooled = encode_captions(ctx.pipeline, captions, device, ctx.extra.get("max_sequence_length"))
    return latents.to(device, torch.float32), embeds.to(device, torch.float32), pooled.to(device, torch.float32)


def student_flow_matching_step(ctx: TrainContext, batch: dict, generator: torch.Generator):
    """Conditioning + noise + student forward: returns ``(fm_batch, model_pred, prompt_embeds, pooled)``."""
    latents, embeds, pooled = batch_conditioning(ctx, batch, generator)
    fm = prepare_flow_matching_batch(latents, ctx.sampler, generator)
    pred = denoiser_forward(ctx.student, fm.noisy_latents, fm.timesteps, embeds, pooled)
    return fm, pred, embeds, pooled


def flow_matching_task_loss(ctx: TrainContext, batch: dict, generator: torch.Generator):
    """The ``compute_loss`` of plain flow-matching training (``--weighting_scheme`` weighted); the per-sample values
    feed the per-timestep-bucket statistics. Returns ``(loss, {}, {"t": sigmas, "task": per_sample})``."""
    fm, model_pred, _, _ = student_flow_matching_step(ctx, batch, generator)
    task = flow_matching_loss(model_pred, fm.target, fm.sigmas, ctx.args.weighting_scheme)
    return task.mean(), {}, {"t": fm.sigmas, "task": task}


@torch.no_grad()
def log_validation(ctx: TrainContext, step: int, final: bool = False):
    """Samples ``--validation_prompts`` with the current (EMA when on) student; saves PNGs under
    ``<output_dir>/validation/step-<N>`` and logs them to the trackers. Returns the images."""
    _check_ctx(ctx, "pipeline")
    args, acc = ctx.args, ctx.accelerator
    if not args.validation_prompts or not acc.is_main_process:
        return []
    student = acc.unwrap_model(ctx.student)
    if ctx.ema is not None and not final:
        ctx.ema.store(student.parameters())
        ctx.ema.copy_to(student.parameters())
    was_training = student.training
    student.eval()
    pipe = ctx.pipeline
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.output_dir, "validation", f"step-{step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    try:
        for i, prompt in enumerate(args.validation_prompts):
            generator = torch.Generator().manual_seed(args.seed)
            kwargs = dict(height=args.resolution, width=args.resolution, generator=generator,
                          num_images_per_prompt=args.num_validation_images,
                          num_inference_steps=args.validation_num_inference_steps,
                          guidance_scale=args.validation_guidance_scale)
            if ctx.validation_embeds is not None:
                e, p = ctx.validation_embeds[prompt]
                ne, np_ = ctx.validation_embeds[""]
                kwargs.update(prompt_embeds=e, pooled_prompt_embeds=p, negative_prompt_embeds=ne,
                              negative_pooled_prompt_embeds=np_)
            else:
                kwargs.update(prompt=prompt)
            with acc.autocast():
                result = pipe(**kwargs).images
            for j, image in enumerate(result):
                image.save(out_dir / f"{i:02d}-{j:02d}.png")
            images.append((prompt, result))
    finally:
        if ctx.ema is not None and not final:
            ctx.ema.restore(student.parameters())
        student.train(was_training)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            arr = np.stack([np.asarray(im) for _, ims in images for im in ims])
            tracker.writer.add_images("validation", arr, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{k}: {p}") for k, (p, ims) in enumerate(images)
                                        for im in ims]}, step=step)
    return images


def _write_metrics(args, record: dict):
    path = Path(args.output_dir, args.logging_dir, "metrics.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(ctx: TrainContext, compute_loss: Callable, trainable: list[torch.nn.Module], params: list):
    """Runs the optimisation. ``compute_loss(ctx, batch, generator) -> (loss, logs, per_sample)`` where ``logs`` are
    floats for the progress bar/trackers and ``per_sample`` maps names to ``(B,)`` losses for the timestep buckets
    (``per_sample["t"]`` holds the sigmas). ``trainable`` are the prepared modules (for gradient accumulation),
    ``params`` the parameters to clip."""
    from tqdm.auto import tqdm

    _check_ctx(ctx, "dataloader", "optimizer", "lr_scheduler", "dataset")
    if not callable(compute_loss):
        raise TypeError("`compute_loss` must be callable: (ctx, batch, generator) -> (loss, logs, per_sample).")
    if not trainable or not all(isinstance(m, torch.nn.Module) for m in trainable):
        raise TypeError("`trainable` must be a non-empty list of the prepared nn.Modules.")

    args, acc, state = ctx.args, ctx.accelerator, ctx.state
    n_batches = len(ctx.dataloader)
    steps_per_epoch = math.ceil(n_batches / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    if acc.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers(args.tracker_project_name or ("snapgen-kd" if "teacher" in ctx.extra else "snapgen"),
                          config=tracker_config)
    resume = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        acc.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    if resume is not None:
        acc.print(f"Resuming from checkpoint {resume}")
        acc.load_state(str(resume))
        if state.batches_in_epoch >= n_batches:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    total_batch = args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training: %d examples, %d epochs, batch %d per device (%d total with accumulation), "
                "%d optimization steps *****", len(ctx.dataset), num_epochs, args.train_batch_size, total_batch, max_steps)
    buckets = TimestepBucketStats(args.timestep_buckets)
    progress = tqdm(range(max_steps), initial=state.global_step, desc="Steps", disable=not acc.is_local_main_process)
    step_start, accum = time.perf_counter(), {}
    done = state.global_step >= max_steps
    for epoch in range(state.epoch, num_epochs):
        if done:
            break
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        state.epoch, state.batches_in_epoch = epoch, skip
        ctx.dataset.set_epoch(epoch)
        loader = acc.skip_first_batches(ctx.dataloader, skip) if skip else ctx.dataloader
        loader.set_epoch(epoch)
        for student in trainable:
            student.train()
        for batch in loader:
            micro_step = epoch * n_batches + state.batches_in_epoch
            generator = step_generator(args.seed, micro_step, acc.process_index)
            with acc.accumulate(*trainable):
                loss, logs, per_sample = compute_loss(ctx, batch, generator)
                acc.backward(loss)
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, args.max_grad_norm)
                ctx.optimizer.step()
                ctx.lr_scheduler.step()
                ctx.optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            gathered = {k: acc.gather(v.detach().float()) for k, v in per_sample.items()}
            t = gathered.pop("t")
            buckets.update(t, **gathered)
            for k, v in {"loss": loss.detach().item(), **logs}.items():
                accum[k] = accum.get(k, 0.0) + float(v) / args.gradient_accumulation_steps
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            if ctx.ema is not None:
                ctx.ema.step(acc.unwrap_model(ctx.student).parameters())
            now = time.perf_counter()
            step_time, step_start = now - step_start, now
            record = {**{k: round(v, 6) for k, v in accum.items()}, "lr": ctx.lr_scheduler.get_last_lr()[0],
                      "step_time": round(step_time, 4)}
            accum = {}
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", step_s=f"{step_time:.2f}")
            bucket_logs = buckets.compute(prefix="buckets/") if state.global_step % 10 == 0 or state.global_step == max_steps else {}
            if bucket_logs:
                buckets.reset()
            acc.log({**record, **bucket_logs}, step=state.global_step)
            if acc.is_main_process:
                _write_metrics(args, {"step": state.global_step, **record, **bucket_logs})
            if state.global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(acc, args.output_dir, state, args.checkpoints_total_limit)
                logger.info("Saved state to %s", path)
            if (args.validation_prompts and state.global_step % args.validation_steps == 0
                    and state.global_step < max_steps):  # the final validation covers the last step
                log_validation(ctx, state.global_step)
            step_start = time.perf_counter()  # saving and sampling do not count as step time
            if state.global_step >= max_steps:
                done = True
                break
    progress.close()
    acc.wait_for_everyone()
    return state


def save_final_pipeline(ctx: TrainContext, num_inference_steps=None, guidance_scale=None,
                        save_model: Callable | None = None):
    """Writes the complete ``SnapGenPipeline`` (EMA weights when on) to ``--output_dir`` atomically, with the sampling
    defaults in the scheduler config, runs the final validation and pushes to the Hub when asked.

    ``save_model(student, output_dir)``, when given, writes the (unwrapped, EMA when on) student instead of the
    pipeline, e.g. ``train_sd3_teacher.py`` saves only ``<output_dir>/transformer/``."""
    from ..pipelines import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

    _check_ctx(ctx, "pipeline")
    if save_model is not None and not callable(save_model):
        raise TypeError(f"`save_model` must be callable as save_model(student, output_dir) or None, got "
                        f"{type(save_model).__name__}.")
    args, acc = ctx.args, ctx.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        student = acc.unwrap_model(ctx.student)
        if ctx.ema is not None:
            ctx.ema.copy_to(student.parameters())
        student.eval()
        pipe = ctx.pipeline
        pipe.set_sampling_defaults(
            num_inference_steps=num_inference_steps or args.validation_num_inference_steps or DEFAULT_NUM_INFERENCE_STEPS,
            guidance_scale=guidance_scale if guidance_scale is not None else (
                args.validation_guidance_scale if args.validation_guidance_scale is not None else DEFAULT_GUIDANCE_SCALE),
        )
        if save_model is None:
            atomic_save_pipeline(pipe, args.output_dir)
        else:
            save_model(student, args.output_dir)
        images = log_validation(ctx, ctx.state.global_step, final=True)
        if args.push_to_hub:
            _push_to_hub(ctx, images)
    acc.end_training()


def _push_to_hub(ctx, images):
    """Renders the PyTorch model card (``hub_cards/pytorch_model_card.md``; ``ctx.extra``'s ``card_kind``, default
    ``"pipeline"``, and ``card_subfolder``) into ``--output_dir`` and uploads it."""
    from huggingface_hub import upload_folder

    from ..cards import render_pytorch_card

    args = ctx.args
    stage = ctx.extra.get("stage", "kd" if "teacher" in ctx.extra else "pretrain")
    defaults = getattr(ctx.pipeline, "sampling_defaults", None) or {}
    training = {
        "steps": ctx.state.global_step,
        "resolution": args.resolution,
        "learning rate": args.learning_rate,
        "batch size (per device)": args.train_batch_size,
        "mixed precision": args.mixed_precision,
        "EMA": bool(args.use_ema),
    }
    if "teacher" in ctx.extra:
        training["teacher"] = args.teacher_model_name_or_path
    dataset = args.dataset_name or args.train_data_dir
    card = render_pytorch_card(
        ctx.extra.get("card_kind", "pipeline"), stage, args.hub_repo_id, subfolder=ctx.extra.get("card_subfolder"),
        base_model=_hub_base_model(args.pretrained_model_name_or_path),
        training=training, datasets=[args.dataset_name] if args.dataset_name else None,
        num_inference_steps=defaults.get("num_inference_steps"), guidance_scale=defaults.get("guidance_scale"),
        notes=f"Trained on `{dataset}`; {len(images or [])} validation images were logged at the end.",
    )
    card.save(os.path.join(args.output_dir, "README.md"))
    upload_folder(repo_id=args.hub_repo_id, folder_path=args.output_dir, commit_message="End of training",
                  ignore_patterns=["checkpoint-*", ".tmp-*", "cache/*", "logs/*", "validation/*"], token=args.hub_token)


def _hub_base_model(name_or_path):
    """``name_or_path`` when it is a Hub repo id (the card's ``base_model``), else ``None`` (a local folder)."""
    if isinstance(name_or_path, str) and name_or_path.count("/") == 1 and not os.path.exists(name_or_path):
        return name_or_path
    return None


def prepare_student_pipeline(args, accelerator, components, student, latent_vae):
    """Moves frozen parts to the device, enables gradient checkpointing and builds the pipeline; returns the context."""
    from .components import build_pipeline, weight_dtype_for

    _check_args(args)
    if not isinstance(student, torch.nn.Module):
        raise TypeError(f"`student` must be an nn.Module, got {type(student).__name__}.")
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    pipe = build_pipeline(components, student)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(accelerator.device, dtype=weight_dtype)
    latent_vae.to(accelerator.device, dtype=weight_dtype)
    student.to(accelerator.device)
    sampler = FlowMatchingSampler(pipe.scheduler, args.weighting_scheme, args.logit_mean, args.logit_std,
                                  args.mode_scale)
    ctx = TrainContext(args=args, accelerator=accelerator, pipeline=pipe, student=student, vae_encoder=latent_vae,
                       weight_dtype=weight_dtype, sampler=sampler)
    ctx.extra["max_sequence_length"] = args.max_sequence_length
    return ctx


def finish_setup(ctx: TrainContext, extra_models: list[torch.nn.Module], param_groups: list[dict],
                 student_subfolder: str = "unet"):
    """Optimizer, LR scheduler, EMA and checkpoint hooks; ``accelerator.prepare`` of student, extra models,
    optimizer, data loader and scheduler. Checkpoints hold the student in ``<ckpt>/<student_subfolder>`` (and its
    EMA in ``<student_subfolder>_ema``). Returns the prepared ``(trainable_modules, params_to_clip)``."""
    from diffusers.optimization import get_scheduler

    _check_ctx(ctx, "dataloader")
    if not all(isinstance(m, torch.nn.Module) for m in extra_models):
        raise TypeError("`extra_models` must be a list of nn.Modules (e.g. the KD projectors).")
    if not isinstance(student_subfolder, str) or not student_subfolder or "/" in student_subfolder:
        raise ValueError(f"`student_subfolder` must be a folder name such as 'unet' or 'transformer', got "
                         f"{student_subfolder!r}.")
    args, acc = ctx.args, ctx.accelerator
    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        for g in param_groups:
            g["lr"] = g.get("lr", args.learning_rate) * scale
        args.learning_rate *= scale
    ctx.optimizer = build_optimizer(args, param_groups)
    steps_per_epoch = math.ceil(len(ctx.dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    ctx.lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=ctx.optimizer, num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
        num_training_steps=max_steps * acc.num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    ctx.ema = build_ema(args, acc.unwrap_model(ctx.student))
    if ctx.ema is not None:
        ctx.ema.to(acc.device)
    register_checkpoint_hooks(acc, type(acc.unwrap_model(ctx.student)), ema=ctx.ema, state=ctx.state,
                              student_subfolder=student_subfolder)
    prepared = acc.prepare(ctx.student, *extra_models, ctx.optimizer, ctx.dataloader, ctx.lr_scheduler)
    ctx.student = prepared[0]
    extra = list(prepared[1 : 1 + len(extra_models)])
    ctx.optimizer, ctx.dataloader, ctx.lr_scheduler = prepared[-3:]
    params = [p for g in param_groups for p in g["params"]]
    return [ctx.student, *extra], params
