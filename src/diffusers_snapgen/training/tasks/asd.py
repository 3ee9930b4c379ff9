"""The adversarial-step-distillation task of ``train_snapgen_asd.py`` (paper §3.4): the KD task on the student's
few-step grid, plus the teacher-feature discriminator (objective: :class:`~..asd.AdversarialStepDistillation`)."""

from __future__ import annotations

import logging

import torch

from ..asd import AdversarialStepDistillation, FewStepSampler, few_step_sigmas
from ..engine import StepOutput, build_lr_scheduler, build_optimizer
from ..flow_matching import FlowMatchingSampler
from .denoising import DenoiserBase, KDTask

__all__ = ["ASDTask"]

logger = logging.getLogger("diffusers_snapgen.training")


class ASDTask(KDTask):
    """Trains a SnapGen UNet to sample in ``--num_inference_steps`` steps against the frozen ``teacher``.

    ``discriminator``: a :class:`~..discriminator.TeacherFeatureDiscriminator` on the teacher, prepared with the
    student (it is the last of :func:`~..engine.prepare_run`'s ``extra_modules``); its optimizer and LR schedule are
    built here and stepped once per optimizer step, after the student's.
    """

    name = "asd"

    def __init__(self, args, accelerator, base: DenoiserBase, student, teacher, feature_kd, scaling, discriminator):
        super().__init__(args, accelerator, base, student, teacher, feature_kd, scaling)
        self.sampler = FewStepSampler(self.pipeline.scheduler, args.num_inference_steps, args.weighting_scheme)
        self.discriminator = discriminator.to(accelerator.device)
        self.objective = None
        self.d_optimizer = self.d_lr_scheduler = None

    def on_prepare(self, run):
        super().on_prepare(run)
        args, acc = self.args, self.accelerator
        disc = run.trainable[-1]
        lr = args.discriminator_learning_rate or args.learning_rate
        if args.scale_lr and args.discriminator_learning_rate is not None:
            lr *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        params = [p for p in acc.unwrap_model(disc).parameters() if p.requires_grad]
        optimizer = build_optimizer(args, [{"params": params, "lr": lr}], acc.device)
        scheduler = build_lr_scheduler(args, optimizer, run.max_train_steps, acc.num_processes)
        self.d_optimizer, self.d_lr_scheduler = acc.prepare(optimizer, scheduler)
        scheduler_config = self.pipeline.scheduler
        self.objective = AdversarialStepDistillation(
            self.step_teacher, disc, self.d_optimizer, None, scaling=self.scaling, feature_kd=self.feature_kd,
            output_kd=self.output_kd, adversarial_weight=args.adversarial_weight, gan_loss=args.gan_loss,
            r1_gamma=args.r1_gamma,
            adversarial_sampler=FlowMatchingSampler(scheduler_config, "logit_normal", args.adversarial_logit_mean,
                                                    args.adversarial_logit_std),
            teacher_sigmas=few_step_sigmas(scheduler_config, args.teacher_num_inference_steps, args.teacher_shift),
            student_sigmas=self.sampler.grid, real_source=args.adversarial_real_source,
            weighting_scheme=args.weighting_scheme, max_grad_norm=args.max_grad_norm, accelerator=acc,
            teacher_guidance_scale=args.teacher_guidance_scale,
            negative_conditioning=self.empty_prompt_conditioning() if args.teacher_guidance_scale != 1 else None)
        if args.teacher_guidance_scale != 1:
            logger.info("teacher targets guided with CFG %g against the empty prompt", args.teacher_guidance_scale)

    def empty_prompt_conditioning(self):
        """``(encoder_hidden_states, pooled_projections)`` of the empty prompt, one row, float32 on the device: the
        text cache's (what caption dropout trains on), or encoded."""
        if self.text_cache is not None:
            embeds, pooled = self.text_cache.empty_embeds, self.text_cache.empty_pooled
        else:
            embeds, pooled = self._encode([""])
        device = self.accelerator.device
        embeds = embeds.reshape(1, *embeds.shape[-2:]).to(device, torch.float32)
        pooled = None if pooled is None else pooled.reshape(1, pooled.shape[-1]).to(device, torch.float32)
        return embeds, pooled

    def auxiliary_optimizers(self):
        return [self.d_optimizer]

    def auxiliary_schedulers(self):
        return [self.d_lr_scheduler]

    def compute_loss(self, batch, generator) -> StepOutput:
        if self.feature_kd is not None:
            self.accelerator.unwrap_model(self.feature_kd).clear()
        fm, pred, embeds, pooled = self.student_step(batch, generator)
        loss, metrics, per_sample = self.objective.losses(fm, pred, embeds, pooled, generator)
        return StepOutput(loss, metrics, per_sample, fm.sigmas)

    def auxiliary_step(self):
        self.objective.discriminator_step()

    def final_num_inference_steps(self):
        return self.args.num_inference_steps

    def final_guidance_scale(self, default):
        return 1.0
