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

import torch

from diffusers_snapgen.training import (
    AlphaSchedule,
    TimestepAwareScaling,
    check_teacher_student,
    denoiser_forward,
    feature_kd_from_args,
    flow_matching_loss,
    load_student,
    load_teacher,
    output_kd_loss,
    parse_args,
    student_flow_matching_step,
)
from diffusers_snapgen.training.components import DTYPES
from diffusers_snapgen.training.loop import (
    build_data,
    finish_setup,
    prepare_student_pipeline,
    save_final_pipeline,
    setup_base,
    train,
)

logger = logging.getLogger(__name__)


def compute_loss(ctx, batch, generator):
    """Task loss + timestep-aware-scaled output KD and feature KD."""
    args, teacher, kd, scaling = ctx.args, ctx.extra["teacher"], ctx.extra["kd"], ctx.extra["scaling"]
    if kd is not None:
        ctx.accelerator.unwrap_model(kd).clear()  # drop the previous step's hooked features
    fm, model_pred, embeds, pooled = student_flow_matching_step(ctx, batch, generator)
    with torch.no_grad():
        t_dtype = teacher.dtype
        teacher_pred = denoiser_forward(teacher, fm.noisy_latents.to(t_dtype), fm.timesteps,
                                        embeds.to(t_dtype), pooled.to(t_dtype))
    task = flow_matching_loss(model_pred, fm.target, fm.sigmas, args.weighting_scheme)
    loss = torch.zeros((), device=task.device)
    per_sample = {"t": fm.sigmas, "task": task}
    if not args.disable_output_kd:
        l_out = output_kd_loss(model_pred, teacher_pred)
        loss = loss + scaling(task, l_out, fm.sigmas)
        per_sample["kd_out"] = l_out
    if kd is not None:
        l_feat = kd()
        loss = loss + scaling(task, l_feat, fm.sigmas)
        per_sample["kd_feat"] = l_feat
    logs = {f"{k}_mean": v.detach().mean().item() for k, v in per_sample.items() if k != "t"}
    return loss, logs, per_sample


def main(args):
    accelerator, components, latent_vae = setup_base(args)

    # Frozen teacher, kept out of the optimizer and of accelerator.prepare.
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

    if args.kd_scaling == "constant":
        scaling = TimestepAwareScaling.constant(args.kd_alpha)
    else:
        scaling = TimestepAwareScaling(
            AlphaSchedule(args.kd_alpha_schedule, alpha_min=args.kd_alpha_min, alpha_max=args.kd_alpha_max,
                          alpha=args.kd_alpha, logit_mean=args.logit_mean, logit_std=args.logit_std),
            ratio=args.kd_ratio,
        )

    ctx = prepare_student_pipeline(args, accelerator, components, student, latent_vae)
    ctx.extra["stage"] = "kd"  # names the stage in the pushed model card
    teacher.to(accelerator.device)
    ctx.extra.update(teacher=teacher, scaling=scaling)
    build_data(ctx, args.max_sequence_length)

    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra_models = []
    if kd is not None:
        groups.append({"params": list(kd.parameters()), "lr": args.projector_learning_rate or args.learning_rate})
        extra_models.append(kd)
    trainable, clip = finish_setup(ctx, extra_models, groups)
    ctx.extra["kd"] = trainable[1] if kd is not None else None

    train(ctx, compute_loss, trainable, clip)
    save_final_pipeline(ctx)


if __name__ == "__main__":
    main(parse_args(kd=True))
