"""Denoiser training tasks: flow matching (``train_snapgen.py``, ``train_sd3_teacher.py``) and multi-level knowledge
distillation (``train_snapgen_kd.py``), paper §3.3.

:func:`load_denoiser_base` loads the frozen parts every denoiser script shares (text encoders, VAE, scheduler, the
latent encoder); :class:`FlowMatchingTask` builds the data (on-device caches of latents and text embeddings with
``--cache_latents --cache_text_embeddings``), computes the flow-matching loss, samples validation images and saves a
``SnapGenPipeline`` (or, for an ``SD3Transformer2DModel``, ``<output_dir>/transformer/``); :class:`KDTask` adds the
frozen teacher, output KD and feature KD with timestep-aware scaling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import free_memory

from ..checkpointing import atomic_save_pipeline
from ..components import (
    build_pipeline,
    encode_captions,
    encode_latents,
    load_base_components,
    load_teacher,
    load_vae_encoder,
    scale_latents,
    text_widths,
    weight_dtype_for,
)
from ..data import ImageCaptionDataset, LatentCache, TextEmbeddingCache, cache_fingerprint, load_image_caption_dataset
from ..batches import DeviceIndexBatches, StreamBatches
from ..distributed import shard_frozen_module
from ..engine import StepOutput, TrainingTask, compile_module, loader_or_device_batches
from ..flow_matching import FlowMatchingSampler, denoiser_forward, flow_matching_loss, prepare_flow_matching_batch
from ..kd import output_kd_loss
from ..precompute import check_settings, fit_text_width, is_precomputed, load_precomputed, precompute_settings
from ..streaming import StreamExamples, load_stream

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["DenoiserBase", "load_denoiser_base", "FlowMatchingTask", "KDTask", "kd_scaling_from_args"]


@dataclass
class DenoiserBase:
    """The frozen parts of a denoiser run: the base pipeline's components (text encoders, tokenizers, decoder,
    scheduler) in the run's weight dtype, the latent encoder, and that dtype."""

    components: dict
    vae_encoder: object
    weight_dtype: torch.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae_encoder.config.latent_channels)

    @property
    def text_dims(self):
        return text_widths(self.components)


def load_denoiser_base(args, accelerator) -> DenoiserBase:
    """``--pretrained_model_name_or_path``'s frozen components and the latent encoder
    (``--pretrained_vae_model_name_or_path`` when given)."""
    dtype = weight_dtype_for(accelerator.mixed_precision)
    components = load_base_components(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir,
                                      dtype=dtype)
    vae = load_vae_encoder(components, args.pretrained_vae_model_name_or_path, dtype, args.revision, args.variant,
                           args.cache_dir)
    return DenoiserBase(components, vae, dtype)


def kd_scaling_from_args(args):
    """The :class:`~..scaling.TimestepAwareScaling` the KD flags ask for (``--kd_scaling``, ``--kd_alpha*``)."""
    from ..scaling import AlphaSchedule, TimestepAwareScaling

    if args.kd_scaling == "constant":
        return TimestepAwareScaling.constant(args.kd_alpha)
    schedule = AlphaSchedule(args.kd_alpha_schedule, alpha_min=args.kd_alpha_min, alpha_max=args.kd_alpha_max,
                             alpha=args.kd_alpha, logit_mean=args.logit_mean, logit_std=args.logit_std)
    return TimestepAwareScaling(schedule, ratio=args.kd_ratio)


class FlowMatchingTask(TrainingTask):
    """Flow matching of ``student`` (a SnapGen UNet, or an ``SD3Transformer2DModel`` that the validation pipeline
    samples through ``SD3TransformerDenoiser``): ``mean((v(x_t, t, c) - (eps - x0))^2)``, weighted by
    ``--weighting_scheme``. ``save_subfolder="transformer"`` saves only the model there instead of a pipeline."""

    name = "pretrain"

    def __init__(self, args, accelerator, base: DenoiserBase, student: torch.nn.Module, name: str | None = None,
                 save_subfolder: str | None = None, card_kind: str = "pipeline"):
        self.args, self.accelerator, self.base = args, accelerator, base
        self.name = name or self.name
        self.save_subfolder, self.card_kind = save_subfolder, card_kind
        device = accelerator.device
        self.pipeline = build_pipeline(base.components, student)
        for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipeline, part, None)
            if module is not None:
                module.to(device, dtype=base.weight_dtype)
        base.vae_encoder.to(device, dtype=base.weight_dtype)
        student.to(device)
        self.sampler = FlowMatchingSampler(self.pipeline.scheduler, args.weighting_scheme, args.logit_mean,
                                           args.logit_std, args.mode_scale)
        self.latent_cache: LatentCache | None = None
        self.text_cache: TextEmbeddingCache | None = None
        self.validation_embeds = None
        self.dataset: ImageCaptionDataset | None = None
        self.step_model = student

    # ------------------------------------------------------------------------------------------ data

    def build_data(self):
        """Dataset and caches; returns ``(batches, dataloader or None)`` for :func:`~..engine.prepare_run`: a stream
        (``--train_shards``, ``--streaming``), a precomputed folder (``--precompute_dir`` with an ``index.json``), or
        a data set with optional device caches."""
        args, acc, vae = self.args, self.accelerator, self.base.vae_encoder
        if getattr(args, "train_shards", None) is not None or getattr(args, "streaming", False):
            return self._stream_data(), None
        if is_precomputed(args.precompute_dir):
            return self._precomputed_data(), None
        hf = self.load_dataset()
        ds = ImageCaptionDataset(hf, args.image_column, args.caption_column, args.resolution, args.center_crop,
                                 args.random_flip, seed=args.seed)
        cache_dir = Path(args.precompute_dir or Path(args.output_dir, "cache"))
        data_id = getattr(hf, "_fingerprint", None) or len(hf)
        if args.cache_latents:
            fp = cache_fingerprint(data=data_id, res=args.resolution, crop=args.center_crop, flip=args.random_flip,
                                   seed=args.seed, vae=str(getattr(vae, "name_or_path", "")), vae_cfg=dict(vae.config))
            with acc.main_process_first():
                self.latent_cache = LatentCache.build(
                    ds, vae, batch_size=max(args.train_batch_size, 32), device=acc.device,
                    dtype=self.base.weight_dtype, path=cache_dir / f"latents-{fp}.safetensors",
                    progress=acc.is_local_main_process, num_workers=args.dataloader_num_workers).to(acc.device)
            ds.load_images = False
        if args.cache_text_embeddings:
            captions = ds.all_captions()
            pipe = self.pipeline
            fp = cache_fingerprint(captions=captions, enc=str(pipe.config.get("_name_or_path", "")),
                                   msl=args.max_sequence_length, text=[type(getattr(pipe, n, None)).__name__ for n in
                                                                        ("text_encoder", "text_encoder_2",
                                                                         "text_encoder_3")])
            with acc.main_process_first():
                self.text_cache = TextEmbeddingCache.build(
                    captions, self._encode, batch_size=64, dtype=self.base.weight_dtype,
                    path=cache_dir / f"text-{fp}.safetensors", progress=acc.is_local_main_process).to(acc.device)
            if args.validation_prompts:
                self.validation_embeds = {p: self._encode([p]) for p in [*args.validation_prompts, ""]}
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # no longer needed on the GPU
                if getattr(self.pipeline, name, None) is not None:
                    getattr(self.pipeline, name).to("cpu")
        if args.cache_latents and vae is not self.pipeline.vae:
            vae.to("cpu")  # only its config (scaling/shift factors) is used from now on
        if args.cache_latents or args.cache_text_embeddings:
            free_memory()
        self.dataset = ds
        on_device = self.latent_cache is not None and self.text_cache is not None
        why = "the data comes from a DataLoader: pass --cache_latents and --cache_text_embeddings"
        return loader_or_device_batches(args, acc, len(ds), on_device, ds, why)

    def load_dataset(self):
        """The HF dataset of images and captions (``--dataset_name`` or ``--train_data_dir``); a task may build its
        own (DreamBooth instance and class images)."""
        args = self.args
        return load_image_caption_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                                          args.cache_dir, args.image_column, args.caption_column, args.max_train_samples)

    def _stream_data(self) -> StreamBatches:
        args, acc = self.args, self.accelerator
        stream, image_column, caption_column = load_stream(
            args.dataset_name, args.dataset_config_name, args.train_shards, args.cache_dir, args.image_column,
            args.caption_column, args.stream_shuffle_buffer, args.seed)
        examples = StreamExamples(image_column, caption_column, args.resolution, args.center_crop, args.random_flip,
                                  args.seed)
        return StreamBatches(stream, examples, args.train_batch_size, acc.device, acc.process_index,
                             acc.num_processes, args.dataloader_num_workers,
                             why="the data streams: precompute it (training_examples/precompute_latents.py)")

    def _precomputed_data(self) -> DeviceIndexBatches:
        """The sharded caches of ``training_examples/precompute_latents.py``, checked against this run's flags."""
        args, acc = self.args, self.accelerator
        latents, text, index = load_precomputed(args.precompute_dir, args.max_train_samples)
        check_settings(index, precompute_settings(args, self.base.vae_encoder, self.pipeline))
        logger.info("training on %d precomputed samples of %s", len(latents), args.precompute_dir)
        self.latent_cache = latents.to(acc.device)
        widths = self.pipeline._conditioning_widths()
        self.text_cache = fit_text_width(text, widths, self.base.weight_dtype).to(acc.device)
        if args.validation_prompts:
            self.validation_embeds = {p: self._encode([p]) for p in [*args.validation_prompts, ""]}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # no longer needed on the GPU
            if getattr(self.pipeline, name, None) is not None:
                getattr(self.pipeline, name).to("cpu")
        if self.base.vae_encoder is not self.pipeline.vae:
            self.base.vae_encoder.to("cpu")
        free_memory()
        return DeviceIndexBatches(len(latents), args.train_batch_size, args.seed, acc.device, acc.process_index,
                                  acc.num_processes)

    def _encode(self, captions):
        return encode_captions(self.pipeline, captions, self.accelerator.device, self.args.max_sequence_length)

    def on_prepare(self, run):
        super().on_prepare(run)
        self.step_model = compile_module(run.model, self.args)

    # ------------------------------------------------------------------------------------------ the loss

    def conditioning(self, batch: dict, generator: torch.Generator):
        """``(latents, prompt_embeds, pooled_prompt_embeds)`` of a micro-batch, float32 on the device: gathered from
        the device caches (flips, latent samples, caption choice and dropout drawn from ``generator``), or encoded."""
        args, device = self.args, self.accelerator.device
        index = batch["index"]
        if self.latent_cache is not None:
            latents = scale_latents(self.base.vae_encoder, self.latent_cache.sample(index, None, generator))
        else:
            latents = encode_latents(self.base.vae_encoder, batch["pixel_values"], generator=generator)
        if self.text_cache is not None:
            embeds, pooled = self.text_cache.draw(index, generator, args.proportion_empty_prompts)
        else:  # the slow path: encoders in the loop, caption dropout decided on the host
            empty = torch.rand(len(batch["caption"]), generator=generator, device=generator.device)
            captions = ["" if e else c for c, e in zip(batch["caption"], (empty < args.proportion_empty_prompts).tolist())]
            embeds, pooled = encode_captions(self.pipeline, captions, device, args.max_sequence_length)
        return latents.to(device, torch.float32), embeds.to(device, torch.float32), pooled.to(device, torch.float32)

    def student_step(self, batch: dict, generator: torch.Generator):
        """Conditioning, noise and timesteps, the student's forward: ``(fm_batch, prediction, embeds, pooled)``."""
        latents, embeds, pooled = self.conditioning(batch, generator)
        fm = prepare_flow_matching_batch(latents, self.sampler, generator)
        pred = denoiser_forward(self.step_model, fm.noisy_latents, fm.timesteps, embeds, pooled)
        return fm, pred, embeds, pooled

    def compute_loss(self, batch, generator) -> StepOutput:
        fm, pred, _, _ = self.student_step(batch, generator)
        task = flow_matching_loss(pred, fm.target, fm.sigmas, self.args.weighting_scheme)
        return StepOutput(task.mean(), per_sample={"task": task}, timesteps=fm.sigmas)

    # ------------------------------------------------------------------------------------------ validation, saving

    @torch.no_grad()
    def validate(self, step: int, final: bool = False):
        """Samples ``--validation_prompts`` with the current (EMA when on) model into
        ``<output_dir>/validation/step-<N>`` and the trackers (main process). Returns the images."""
        args, acc = self.args, self.accelerator
        if not args.validation_prompts or not acc.is_main_process:
            return []
        run = self.run
        model = run.unwrapped_model
        swap = run.ema is not None and not final
        if swap:
            run.ema.store(model.parameters())
            run.ema.copy_to(model.parameters())
        was_training = model.training
        model.eval()
        out_dir = Path(args.output_dir, "validation", f"step-{step}")
        out_dir.mkdir(parents=True, exist_ok=True)
        images = []
        try:
            for i, prompt in enumerate(args.validation_prompts):
                kwargs = dict(height=args.resolution, width=args.resolution,
                              generator=torch.Generator().manual_seed(args.seed),
                              num_images_per_prompt=args.num_validation_images,
                              num_inference_steps=args.validation_num_inference_steps,
                              guidance_scale=args.validation_guidance_scale)
                if self.validation_embeds is not None:
                    (e, p), (ne, np_) = self.validation_embeds[prompt], self.validation_embeds[""]
                    kwargs.update(prompt_embeds=e, pooled_prompt_embeds=p, negative_prompt_embeds=ne,
                                  negative_pooled_prompt_embeds=np_)
                else:
                    kwargs.update(prompt=prompt)
                with acc.autocast():
                    result = self.pipeline(**kwargs).images
                for j, image in enumerate(result):
                    image.save(out_dir / f"{i:02d}-{j:02d}.png")
                images.append((prompt, result))
        finally:
            if swap:
                run.ema.restore(model.parameters())
            model.train(was_training)
        _log_images(acc, images, step)
        return images

    def save_final(self, model):
        if model is not self.run.unwrapped_model:  # the gathered copy of an FSDP2-sharded model
            self.pipeline = build_pipeline(self.base.components, model)
        self.save_model(model, self.args.output_dir)
        images = self.validate(self.run.state.global_step, final=True)
        if self.args.push_to_hub:
            self._push(images)

    def save_model(self, model, output_dir):
        """The pipeline around ``model`` (or ``model`` alone in ``save_subfolder``) in ``output_dir``."""
        if self.save_subfolder is not None:
            from ..reconstruction import save_model_atomically

            save_model_atomically(model, Path(output_dir, self.save_subfolder))
            return
        pipeline = self.pipeline if model is self.run.unwrapped_model else build_pipeline(self.base.components, model)
        # unless --validation_* say otherwise, the result samples like its base (a 4-step CFG-3 base stays 4-step;
        # a base that stores no defaults gives the pipeline's 28 steps and CFG 3.5)
        base = pipeline.sampling_defaults
        pipeline.set_sampling_defaults(
            num_inference_steps=self.final_num_inference_steps() or base["num_inference_steps"],
            guidance_scale=self.final_guidance_scale(base["guidance_scale"]))
        atomic_save_pipeline(pipeline, output_dir)
        self._save_image_encoder(output_dir)

    def _save_image_encoder(self, output_dir):
        """A base pipeline's ``vae_encoder/`` TinyEncoder travels with the saved pipeline, so the result is a training
        base too (docs/finetuning.md)."""
        from ...models import TinyEncoder
        from ..components import ENCODER_SUBFOLDER, save_model_in_subfolder

        encoder = self.base.vae_encoder
        if isinstance(encoder, TinyEncoder) and encoder is self.base.components.get(ENCODER_SUBFOLDER):
            save_model_in_subfolder(encoder, output_dir, ENCODER_SUBFOLDER)

    def final_num_inference_steps(self):
        return self.args.validation_num_inference_steps

    def final_guidance_scale(self, default):
        g = self.args.validation_guidance_scale
        return default if g is None else g

    def card_rows(self) -> dict:
        args = self.args
        return {"steps": self.run.state.global_step, "resolution": args.resolution,
                "learning rate": args.learning_rate, "batch size (per device)": args.train_batch_size,
                "mixed precision": args.mixed_precision, "EMA": bool(args.use_ema)}

    def _push(self, images):
        from ..hub import push_to_hub

        args = self.args
        defaults = getattr(self.pipeline, "sampling_defaults", None) or {}
        dataset = args.dataset_name or args.train_data_dir
        push_to_hub(args, self.card_kind, self.name, self.card_rows(), source=args.pretrained_model_name_or_path,
                    subfolder=self.save_subfolder, num_inference_steps=defaults.get("num_inference_steps"),
                    guidance_scale=defaults.get("guidance_scale"),
                    notes=f"Trained on `{dataset}`; {len(images or [])} validation images were logged at the end.")


def _log_images(accelerator, images, step):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            arr = np.stack([np.asarray(im) for _, ims in images for im in ims])
            tracker.writer.add_images("validation", arr, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{k}: {p}") for k, (p, ims) in enumerate(images)
                                        for im in ims]}, step=step)


class KDTask(FlowMatchingTask):
    """Multi-level KD (paper §3.3, Fig. 5): ``L = S(L_task, L_out) + S(L_task, L_feat)`` with the frozen ``teacher``
    (an ``SD3Transformer2DModel``), ``feature_kd`` (an attached :class:`~..kd.MultiLevelKD`, or ``None``) and
    ``scaling`` (:class:`~..scaling.TimestepAwareScaling`)."""

    name = "kd"

    def __init__(self, args, accelerator, base: DenoiserBase, student, teacher, feature_kd, scaling,
                 teacher_weights_later: bool = False):
        super().__init__(args, accelerator, base, student)
        self.teacher = teacher.to(accelerator.device)
        self.step_teacher = teacher
        self.feature_kd, self.scaling = feature_kd, scaling
        self.output_kd = not args.disable_output_kd
        self.teacher_weights_later = teacher_weights_later

    def on_start_after(self):
        """``--teacher_config``: the trained teacher's weights replace the placeholders in place, so the captured
        step, the compiled teacher and the feature hooks keep reading the same tensors."""
        if not self.teacher_weights_later:
            return
        a = self.args
        trained = load_teacher(a.teacher_model_name_or_path, a.teacher_subfolder, self.teacher.dtype,
                               a.teacher_revision, a.teacher_variant, a.cache_dir)
        self.teacher.load_state_dict(trained.state_dict())
        self.teacher_weights_later = False
        logger.info("teacher weights loaded from %s", a.teacher_model_name_or_path)

    def on_prepare(self, run):
        super().on_prepare(run)
        if getattr(self.args, "teacher_sharding", "replicate") == "shard":
            shard_frozen_module(self.teacher, self.accelerator)
        self.step_teacher = compile_module(self.teacher, self.args)
        if self.feature_kd is not None:
            self.feature_kd = run.trainable[1]  # the prepared projectors

    def teacher_forward(self, fm, embeds, pooled):
        dtype = self.teacher.dtype
        with torch.no_grad():
            return denoiser_forward(self.step_teacher, fm.noisy_latents.to(dtype), fm.timesteps, embeds.to(dtype),
                                    pooled.to(dtype))

    def kd_terms(self, fm, pred, teacher_pred, task) -> tuple[torch.Tensor, dict]:
        """``S(L_task, L_out) + S(L_task, L_feat)`` and the per-sample KD losses."""
        loss = torch.zeros((), device=task.device)
        per_sample = {}
        if self.output_kd:
            l_out = output_kd_loss(pred, teacher_pred)
            loss = loss + self.scaling(task, l_out, fm.sigmas)
            per_sample["kd_out"] = l_out
        if self.feature_kd is not None:
            l_feat = self.feature_kd()
            loss = loss + self.scaling(task, l_feat, fm.sigmas)
            per_sample["kd_feat"] = l_feat
        return loss, per_sample

    def compute_loss(self, batch, generator) -> StepOutput:
        if self.feature_kd is not None:
            self.accelerator.unwrap_model(self.feature_kd).clear()  # drop the previous micro-batch's features
        fm, pred, embeds, pooled = self.student_step(batch, generator)
        teacher_pred = self.teacher_forward(fm, embeds, pooled)
        task = flow_matching_loss(pred, fm.target, fm.sigmas, self.args.weighting_scheme)
        loss, per_sample = self.kd_terms(fm, pred, teacher_pred, task)
        per_sample = {"task": task, **per_sample}
        metrics = {f"{k}_mean": v.detach().mean() for k, v in per_sample.items()}
        return StepOutput(loss, metrics, per_sample, fm.sigmas)

    def card_rows(self) -> dict:
        return {**super().card_rows(), "teacher": self.args.teacher_model_name_or_path}
