#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Multi-level knowledge distillation into the SnapGen UNet (Hu et al., CVPR 2025, arXiv 2412.09619, §3.3, Fig. 5).

    accelerate launch training_examples/train_snapgen_kd.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --teacher_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --unet_model_name_or_path snapgen-256 --train_data_dir ./my_images --resolution 512 \
      --train_batch_size 16 --mixed_precision bf16 --gradient_checkpointing --use_ema \
      --max_train_steps 50000 --output_dir snapgen-kd-512

Teacher: any diffusers ``SD3Transformer2DModel`` (e.g. SD3.5-Large), frozen, in ``--teacher_dtype`` (bf16), never in
the optimizer. One text encoding (the SD3.5 encoders of the base pipeline) feeds teacher and student. Loss:

    L = S(L_task, L_out) + S(L_task, L_feat)
    S(L_task, L_kd) = E_t[ alpha_t * L_task + (1 - alpha_t) * sg(|L_task| / |L_kd|) * L_kd ]

with L_out = ||v_s - v_T||^2 and L_feat the MSE between student features and projected teacher features
(``--kd_feature_layers``). ``--kd_scaling constant`` gives the fixed linear mix to compare against.
"""

import logging

from diffusers_snapgen.training import (
    check_teacher_student,
    feature_kd_from_args,
    finish,
    load_student,
    load_teacher,
    parse_args,
    parse_or_exit,
    prepare_run,
    setup_accelerator,
    train,
)
from diffusers_snapgen.training.components import DTYPES, teacher_from_config
from diffusers_snapgen.training.tasks import KDTask, kd_scaling_from_args, load_denoiser_base

logger = logging.getLogger(__name__)


def main(args):
    accelerator = setup_accelerator(args)
    base = load_denoiser_base(args, accelerator)

    # Frozen teacher, kept out of the optimizer and of accelerator.prepare. With --teacher_config its weights load
    # only once --start_after's file exists (the step compiles and captures on placeholder weights meanwhile).
    weights_later = args.teacher_config is not None
    if weights_later:
        teacher = teacher_from_config(args.teacher_config, base.latent_channels, base.text_dims,
                                      DTYPES[args.teacher_dtype])
        logger.info("teacher: placeholder weights from --teacher_config; the weights load from %s once %s exists",
                    args.teacher_model_name_or_path, args.start_after)
    else:
        teacher = load_teacher(args.teacher_model_name_or_path, args.teacher_subfolder, DTYPES[args.teacher_dtype],
                               args.teacher_revision, args.teacher_variant, args.cache_dir)
    # A fresh student takes the teacher's conditioning widths, so one text encoding feeds both models.
    student = load_student(
        args.pretrained_model_name_or_path, args.unet_model_name_or_path, args.unet_config, args.from_scratch,
        latent_channels=teacher.config.in_channels,
        text_dims=(teacher.config.joint_attention_dim, teacher.config.pooled_projection_dim),
        seed=args.seed, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
    )
    check_teacher_student(teacher, student)

    # Feature KD: hooks on named modules, learned projectors between teacher and student features.
    if not args.disable_feature_kd:
        teacher.to(accelerator.device)
    kd = feature_kd_from_args(args, student, teacher)
    if kd is not None:
        logger.info("feature KD pairs (%s projectors): %s", kd.projector_direction, kd.pairs)

    task = KDTask(args, accelerator, base, student, teacher, kd, kd_scaling_from_args(args),
                  teacher_weights_later=weights_later)
    batches, dataloader = task.build_data()

    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra_modules = []
    if kd is not None:
        groups.append({"params": list(kd.parameters()), "lr": args.projector_learning_rate or args.learning_rate})
        extra_modules.append(kd)
    run = prepare_run(args, accelerator, task, student, groups, batches, extra_modules=extra_modules,
                      dataloader=dataloader)
    train(run)
    finish(run)


if __name__ == "__main__":
    main(parse_or_exit(parse_args, kd=True))
