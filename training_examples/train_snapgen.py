#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Flow-matching training of the SnapGen UNet (Hu et al., CVPR 2025, arXiv 2412.09619, §3.3), from scratch or from a
checkpoint.

    accelerate launch training_examples/train_snapgen.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --train_data_dir ./my_images --resolution 256 --train_batch_size 64 --mixed_precision bf16 \
      --learning_rate 1e-4 --max_train_steps 100000 --checkpointing_steps 2000 --use_ema \
      --validation_prompt "a red apple on a wooden table" --output_dir snapgen-256

Loss: ``mean((v_theta(x_t, t, c) - (eps - x0))^2)`` with ``x_t = (1 - t) x0 + t eps`` and logit-normal ``t``.
The output folder is a complete ``SnapGenPipeline`` (EMA weights with ``--use_ema``). All reusable logic lives in
``diffusers_snapgen.training``; see training_examples/README.md for the full recipe.
"""

import logging

from diffusers_snapgen.training import (
    load_student,
    parse_args,
    text_widths,
)
from diffusers_snapgen.training.loop import (
    build_data,
    finish_setup,
    flow_matching_task_loss,
    prepare_student_pipeline,
    save_final_pipeline,
    setup_base,
    train,
)

logger = logging.getLogger(__name__)


def main(args):
    # Frozen text encoders, VAE and scheduler from the base pipeline (SnapGen, or SD3/SD3.5).
    accelerator, components, latent_vae = setup_base(args)

    # The student: --unet_model_name_or_path, the base pipeline's unet, or a fresh paper-config UNet.
    student = load_student(
        args.pretrained_model_name_or_path, args.unet_model_name_or_path, args.unet_config, args.from_scratch,
        latent_channels=latent_vae.config.latent_channels, text_dims=text_widths(components), seed=args.seed,
        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
    )
    ctx = prepare_student_pipeline(args, accelerator, components, student, latent_vae)
    ctx.extra["stage"] = "pretrain"  # names the stage in the pushed model card
    build_data(ctx, args.max_sequence_length)

    params = [p for p in student.parameters() if p.requires_grad]
    trainable, clip = finish_setup(ctx, [], [{"params": params}])

    train(ctx, flow_matching_task_loss, trainable, clip)
    save_final_pipeline(ctx)


if __name__ == "__main__":
    main(parse_args())
