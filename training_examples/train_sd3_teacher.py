#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Flow-matching training of an SD3-style MMDiT (diffusers' ``SD3Transformer2DModel``): the teacher that SnapGen's
knowledge distillation and adversarial step distillation learn from (Hu et al., CVPR 2025, arXiv 2412.09619, §3.3).

    accelerate launch training_examples/train_sd3_teacher.py \
      --pretrained_model_name_or_path runs/emoji/base \
      --transformer_config runs/emoji/configs/teacher_transformer.json \
      --train_data_dir data/emoji --resolution 256 --cache_latents --cache_text_embeddings \
      --train_batch_size 64 --mixed_precision bf16 --learning_rate 2e-4 --use_ema \
      --max_train_steps 30000 --checkpointing_steps 2000 --resume_from_checkpoint latest \
      --validation_prompts "red apple" "snowman" --output_dir runs/emoji/teacher

It is ``train_snapgen.py`` with a transformer as the denoiser: the same loss
``mean((v_theta(x_t, t, c) - (eps - x0))^2)``, base pipeline (text encoders, VAE, scheduler), caches, EMA,
checkpoints with exact resume and validation images (the transformer sampled through ``SnapGenPipeline``). The model
is a fresh one from ``--transformer_config`` (``joint_attention_dim`` / ``pooled_projection_dim`` default to the base
pipeline's text widths, ``in_channels`` / ``out_channels`` to its latent channels) or an existing one
(``--transformer_model_name_or_path``).

The output is ``<output_dir>/transformer/`` (EMA weights with ``--use_ema``; no pipeline), which the other steps use:

    train_snapgen_kd.py  --teacher_model_name_or_path <output_dir> --teacher_subfolder transformer ...
    snapgen eval --base <pretrained_model_name_or_path> --models "teacher=<output_dir>:28:3" ...
"""

import logging

from diffusers_snapgen.training import finish, parse_or_exit, prepare_run, setup_accelerator, train
from diffusers_snapgen.training.components import load_sd3_transformer, save_model_in_subfolder
from diffusers_snapgen.training.task_args import build_teacher_parser, load_transformer_config, parse_teacher_args
from diffusers_snapgen.training.tasks import FlowMatchingTask, load_denoiser_base

logger = logging.getLogger(__name__)

#: Where the model goes in ``--output_dir`` and in checkpoints (``transformer/``, ``transformer_ema/``).
SUBFOLDER = "transformer"

__all__ = ["build_teacher_parser", "load_transformer_config", "parse_teacher_args", "load_transformer",
           "save_transformer", "main"]


def load_transformer(args, latent_channels: int, text_dims=None):
    """The trainable ``SD3Transformer2DModel`` (``--transformer_model_name_or_path`` or ``--transformer_config``)."""
    return load_sd3_transformer(args.transformer_model_name_or_path, args.transformer_config, latent_channels,
                                text_dims, seed=args.seed, revision=args.revision, variant=args.variant,
                                cache_dir=args.cache_dir)


def save_transformer(transformer, output_dir):
    """``<output_dir>/transformer/`` with ``save_pretrained``, atomically (its ``config.json`` is written last)."""
    return save_model_in_subfolder(transformer, output_dir, SUBFOLDER)


def main(args):
    accelerator = setup_accelerator(args)
    # Frozen text encoders, VAE and scheduler from the base pipeline (its unet, if any, is not used).
    base = load_denoiser_base(args, accelerator)

    # The denoiser being trained; the validation pipeline samples it through SD3TransformerDenoiser.
    transformer = load_transformer(args, base.latent_channels, base.text_dims)
    task = FlowMatchingTask(args, accelerator, base, transformer, name="teacher", save_subfolder=SUBFOLDER,
                            card_kind="transformer")
    batches, dataloader = task.build_data()

    params = [p for p in transformer.parameters() if p.requires_grad]
    run = prepare_run(args, accelerator, task, transformer, [{"params": params}], batches,
                      checkpoint_subfolder=SUBFOLDER, dataloader=dataloader)
    train(run)
    finish(run)  # <output_dir>/transformer/ (EMA weights with --use_ema)


if __name__ == "__main__":
    main(parse_or_exit(parse_teacher_args))
