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
The output folder is a complete ``SnapGenPipeline`` (EMA weights with ``--use_ema``). With ``--cache_latents
--cache_text_embeddings --compile --cuda_graphs`` a step is one replayed CUDA graph. All reusable logic lives in
``diffusers_snapgen.training``; see training_examples/README.md for the full recipe and the fast path.
"""

import logging

from diffusers_snapgen.training import (
    finish,
    load_student,
    parse_args,
    parse_or_exit,
    prepare_run,
    setup_accelerator,
    train,
)
from diffusers_snapgen.training.tasks import FlowMatchingTask, load_denoiser_base

logger = logging.getLogger(__name__)


def main(args):
    accelerator = setup_accelerator(args)
    # Frozen text encoders, VAE and scheduler from the base pipeline (SnapGen, or SD3/SD3.5).
    base = load_denoiser_base(args, accelerator)

    # The student: --unet_model_name_or_path, the base pipeline's unet, or a fresh paper-config UNet.
    student = load_student(
        args.pretrained_model_name_or_path, args.unet_model_name_or_path, args.unet_config, args.from_scratch,
        latent_channels=base.latent_channels, text_dims=base.text_dims, seed=args.seed,
        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
    )
    task = FlowMatchingTask(args, accelerator, base, student)
    batches, dataloader = task.build_data()  # on-device caches with --cache_latents --cache_text_embeddings

    params = [p for p in student.parameters() if p.requires_grad]
    run = prepare_run(args, accelerator, task, student, [{"params": params}], batches, dataloader=dataloader)
    train(run)
    finish(run)  # the SnapGenPipeline (EMA weights with --use_ema) in --output_dir


if __name__ == "__main__":
    main(parse_or_exit(parse_args))
