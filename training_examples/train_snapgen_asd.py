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
targets, and its block features carry the discriminator heads (LADD-style diffusion GAN). Per step (both updated
once, after the micro-batches; the student's loss sees the heads before their update):

    discriminator: hinge(D(real_t'), D(sg(x0_student)_t'))  [+ gamma/2 * R1]       (its own optimizer)
    student:       S(L_task, L_out) + S(L_task, L_feat) + lambda_adv * -D(x0_student_t')

All flags of train_snapgen_kd.py apply (data, caching, EMA, checkpoints with exact resume - discriminator heads and
both optimizers included -, validation, Hub upload). The saved pipeline samples with ``--num_inference_steps`` and
no CFG by default: ``pipe(prompt)``.
"""

import logging

from diffusers_snapgen.training import (
    check_teacher_student,
    feature_kd_from_args,
    finish,
    load_student,
    load_teacher,
    parse_or_exit,
    prepare_run,
    setup_accelerator,
    train,
)
from diffusers_snapgen.training.asd import parse_asd_args, require_student_checkpoint
from diffusers_snapgen.training.components import DTYPES
from diffusers_snapgen.training.discriminator import TeacherFeatureDiscriminator
from diffusers_snapgen.training.tasks import ASDTask, kd_scaling_from_args, load_denoiser_base

logger = logging.getLogger(__name__)


def main(args):
    accelerator = setup_accelerator(args)
    base = load_denoiser_base(args, accelerator)

    # The frozen few-step teacher: KD targets and the discriminator's feature network.
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
    discriminator = TeacherFeatureDiscriminator.from_teacher(
        teacher, args.discriminator_layers, args.discriminator_num_heads, head_channels=args.discriminator_head_channels,
    )
    logger.info("discriminator heads on %s", discriminator.layers)

    task = ASDTask(args, accelerator, base, student, teacher, feature_kd, kd_scaling_from_args(args), discriminator)
    logger.info("student grid (sigmas): %s", task.sampler.grid.tolist())
    batches, dataloader = task.build_data()

    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra_modules = []
    if feature_kd is not None:
        groups.append({"params": list(feature_kd.parameters()),
                       "lr": args.projector_learning_rate or args.learning_rate})
        extra_modules.append(feature_kd)
    extra_modules.append(discriminator)  # prepared with the student: checkpointed with it (the last extra module)
    run = prepare_run(args, accelerator, task, student, groups, batches, extra_modules=extra_modules,
                      dataloader=dataloader)
    train(run)
    finish(run)  # the pipeline samples with --num_inference_steps and guidance 1 by default


if __name__ == "__main__":
    main(parse_or_exit(parse_asd_args))
