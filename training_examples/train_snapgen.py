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
    flow_matching_loss,
    load_base_components,
    load_student,
    load_vae_encoder,
    parse_args,
    student_flow_matching_step,
    text_widths,
    weight_dtype_for,
)
from diffusers_snapgen.training.loop import (
    build_data,
    finish_setup,
    prepare_student_pipeline,
    save_final_pipeline,
    setup_accelerator,
    train,
)

logger = logging.getLogger(__name__)


def compute_loss(ctx, batch, generator):
    """The flow-matching task loss; per-sample values feed the per-timestep-bucket statistics."""
    fm, model_pred, _, _ = student_flow_matching_step(ctx, batch, generator)
    task = flow_matching_loss(model_pred, fm.target, fm.sigmas, ctx.args.weighting_scheme)
    loss = task.mean()
    return loss, {}, {"t": fm.sigmas, "task": task}


def main(args):
    accelerator = setup_accelerator(args)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)

    # Frozen text encoders, VAE and scheduler from the base pipeline (SnapGen, or SD3/SD3.5).
    components = load_base_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                                      args.cache_dir, dtype=weight_dtype)
    latent_vae = load_vae_encoder(components, args.pretrained_vae_model_name_or_path, weight_dtype,
                                  args.revision, args.variant, args.cache_dir)

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

    train(ctx, compute_loss, trainable, clip)
    save_final_pipeline(ctx)


if __name__ == "__main__":
    main(parse_args())
