#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Adversarial step distillation of a SnapGen UNet to 4 or 8 steps (Hu et al., CVPR 2025, arXiv 2412.09619, §3.4).

    accelerate launch training_examples/train_snapgen_asd.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --unet_model_name_or_path snapgen-kd-1024 \
      --teacher_model_name_or_path stabilityai/stable-diffusion-3.5-large-turbo \
      --num_inference_steps 4 --teacher_num_inference_steps 4 \
      --train_data_dir ./my_images --resolution 1024 --cache_latents --cache_text_embeddings \
      --train_batch_size 4 --mixed_precision bf16 --gradient_checkpointing --use_ema \
      --learning_rate 1e-5 --max_train_steps 20000 --output_dir snapgen-asd-4step

The student starts from a SnapGen checkpoint and trains on the scheduler's 4- (or 8-) step grid. A frozen few-step
teacher (any diffusers ``SD3Transformer2DModel``, e.g. SD3.5-Large-Turbo) run along its own schedule gives the KD
targets, and its block features carry the discriminator heads (LADD-style diffusion GAN). Per step:

    discriminator: hinge(D(real_t'), D(sg(x0_student)_t'))  [+ gamma/2 * R1]       (its own optimizer)
    student:       S(L_task, L_out) + S(L_task, L_feat) + lambda_adv * -D(x0_student_t')

All flags of train_snapgen_kd.py apply (data, caching, EMA, checkpoints with exact resume - discriminator heads and
both optimizers included -, validation, Hub upload). The saved pipeline samples with ``--num_inference_steps`` and
no CFG by default: ``pipe(prompt)``.
"""

import logging
import math

from diffusers_snapgen.training import (
    FlowMatchingSampler,
    check_teacher_student,
    load_student,
    load_teacher,
)
from diffusers_snapgen.training.asd import (
    AdversarialStepDistillation,
    FewStepSampler,
    build_discriminator_optimizer,
    feature_kd_from_args,
    few_step_sigmas,
    kd_scaling_from_args,
    parse_asd_args,
    require_student_checkpoint,
)
from diffusers_snapgen.training.components import DTYPES
from diffusers_snapgen.training.discriminator import TeacherFeatureDiscriminator
from diffusers_snapgen.training.loop import (
    build_data,
    finish_setup,
    prepare_student_pipeline,
    save_final_pipeline,
    setup_base,
    train,
)

logger = logging.getLogger(__name__)


def main(args):
    accelerator, components, latent_vae = setup_base(args)

    # Frozen few-step teacher: KD targets and the discriminator's feature network.
    teacher = load_teacher(args.teacher_model_name_or_path, args.teacher_subfolder, DTYPES[args.teacher_dtype],
                           args.teacher_revision, args.teacher_variant, args.cache_dir)
    # The student: a trained SnapGen UNet (never from scratch).
    require_student_checkpoint(args)
    student = load_student(args.pretrained_model_name_or_path, args.unet_model_name_or_path,
                           revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    check_teacher_student(teacher, student)
    teacher.to(accelerator.device)
    if args.gradient_checkpointing:  # the generator's adversarial loss backpropagates through the teacher
        teacher.enable_gradient_checkpointing()
    feature_kd = feature_kd_from_args(args, student, teacher)
    if feature_kd is not None:
        logger.info("feature KD pairs (%s projectors): %s", feature_kd.projector_direction, feature_kd.pairs)

    ctx = prepare_student_pipeline(args, accelerator, components, student, latent_vae)
    ctx.extra["stage"] = "asd"  # names the stage in the pushed model card
    ctx.sampler = FewStepSampler(ctx.pipeline.scheduler, args.num_inference_steps, args.weighting_scheme)
    ctx.extra["teacher"] = teacher
    logger.info("student grid (sigmas): %s", ctx.sampler.grid.tolist())
    build_data(ctx, args.max_sequence_length)

    discriminator = TeacherFeatureDiscriminator.from_teacher(
        teacher, args.discriminator_layers, args.discriminator_num_heads,
        head_channels=args.discriminator_head_channels,
    ).to(accelerator.device)
    logger.info("discriminator heads on %s", discriminator.layers)

    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra_models = []
    if feature_kd is not None:
        groups.append({"params": list(feature_kd.parameters()), "lr": args.projector_learning_rate or args.learning_rate})
        extra_models.append(feature_kd)
    extra_models.append(discriminator)  # prepared with the student: checkpointed, and in accelerate.accumulate
    steps_per_epoch = math.ceil(len(ctx.dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    trainable, clip = finish_setup(ctx, extra_models, groups)
    d_optimizer, d_lr_scheduler = build_discriminator_optimizer(args, accelerator, trainable[-1], max_steps)

    objective = AdversarialStepDistillation(
        teacher, trainable[-1], d_optimizer, d_lr_scheduler,
        scaling=kd_scaling_from_args(args),
        feature_kd=trainable[1] if feature_kd is not None else None,
        output_kd=not args.disable_output_kd,
        adversarial_weight=args.adversarial_weight, gan_loss=args.gan_loss, r1_gamma=args.r1_gamma,
        adversarial_sampler=FlowMatchingSampler(ctx.pipeline.scheduler, "logit_normal", args.adversarial_logit_mean,
                                                args.adversarial_logit_std),
        teacher_sigmas=few_step_sigmas(ctx.pipeline.scheduler, args.teacher_num_inference_steps, args.teacher_shift),
        real_source=args.adversarial_real_source, weighting_scheme=args.weighting_scheme,
        max_grad_norm=args.max_grad_norm, accelerator=accelerator,
    )
    train(ctx, objective, trainable, clip)
    save_final_pipeline(ctx, num_inference_steps=args.num_inference_steps, guidance_scale=1.0)


if __name__ == "__main__":
    main(parse_asd_args())
