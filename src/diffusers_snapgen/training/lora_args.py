"""Command line of ``train_snapgen_lora.py``: the denoiser groups of :mod:`.args` (no from-scratch or KD flags) plus
the LoRA and DreamBooth groups. Also importable from :mod:`.task_args`, where it was first defined."""

from __future__ import annotations

import argparse
import logging
import os

from .args import (
    add_base_model_args,
    add_caption_data_args,
    add_data_args,
    add_flow_matching_args,
    add_optimization_args,
    add_output_args,
    add_speed_args,
    add_validation_args,
    add_vae_encoder_arg,
    check_argv,
    validate_denoiser,
)

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["build_lora_parser", "validate_lora_args", "parse_lora_args"]


def build_lora_parser() -> argparse.ArgumentParser:
    """``train_snapgen_lora.py``: the denoiser groups (no from-scratch or KD flags) plus the LoRA and DreamBooth
    groups."""
    from .lora import LORA_LAYER_TARGETS, TIMESTEP_SAMPLINGS

    p = argparse.ArgumentParser(description="LoRA / DreamBooth fine-tuning of a SnapGen UNet")
    add_base_model_args(p, help_text=(
        "The SnapGen pipeline to fine-tune (folder or Hub id): its UNet gets the adapter; its text encoders, VAE and "
        "scheduler are frozen. Class images are sampled with it."))
    g = p.add_argument_group("SnapGen UNet")
    g.add_argument("--unet_model_name_or_path", type=str, default=None,
                   help="A SnapGen UNet to adapt instead of the pipeline's (folder, or a pipeline with `unet/`).")
    add_vae_encoder_arg(g)
    g = p.add_argument_group("LoRA")
    a = g.add_argument
    a("--rank", type=int, default=4, help="LoRA rank (dimension of the low-rank update).")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha: the update is scaled by alpha / rank (default: "
                                                     "the rank, scale 1).")
    a("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch's input.")
    a("--lora_layers", type=str, default="attn",
      help="Comma-separated groups of layers to adapt: " + "; ".join(
          f"{k}: {', '.join(v)}" for k, v in LORA_LAYER_TARGETS.items()) + " (separable convs at their pointwise "
      "conv). E.g. attn (default), attn,ffn or attn,ffn,conv.")
    a("--timestep_sampling", type=str, default="density", choices=TIMESTEP_SAMPLINGS,
      help="density: sigmas from --weighting_scheme's density (logit-normal flow matching), for a many-step model; "
           "few_step: only the sigmas the pipeline visits with --num_inference_steps steps, for a few-step (ASD) "
           "model such as the 4-step default, which is never sampled elsewhere.")
    a("--num_inference_steps", type=int, default=None,
      help="Steps of the few_step grid (default: the pipeline's own default steps).")
    g = p.add_argument_group("DreamBooth")
    a = g.add_argument
    a("--instance_data_dir", type=str, default=None,
      help="Folder of images of the subject (instead of --train_data_dir / --dataset_name captions).")
    a("--instance_prompt", type=str, default=None, help='Prompt of every instance image, e.g. "a photo of sks dog".')
    a("--with_prior_preservation", action="store_true",
      help="Also train on class images with --class_prompt (prior-preservation loss, DreamBooth §3.3).")
    a("--class_data_dir", type=str, default=None,
      help="Folder of class images; filled with samples of the base pipeline up to --num_class_images.")
    a("--class_prompt", type=str, default=None, help='Prompt of the class images, e.g. "a photo of a dog".')
    a("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    a("--num_class_images", type=int, default=100, help="Class images used (generated when fewer exist).")
    a("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    add_data_args(p)
    add_caption_data_args(p)
    add_optimization_args(p, default_lr=1e-4, default_warmup=0)
    add_flow_matching_args(p)
    add_speed_args(p)
    add_validation_args(p)
    add_output_args(p, default_output_dir="snapgen-lora")
    return p


def validate_lora_args(args: argparse.Namespace) -> argparse.Namespace:
    """The denoiser checks plus the LoRA and DreamBooth ones; raises ValueError naming the flag and the fix."""
    from .dreambooth import list_images
    from .lora import parse_lora_layers

    if not isinstance(args, argparse.Namespace) or not hasattr(args, "lora_layers"):
        raise TypeError("`args` must come from build_lora_parser().parse_args().")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}.")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    parse_lora_layers(args.lora_layers)
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}.")
    if args.use_ema:
        raise ValueError("--use_ema is not supported for LoRA (the adapter is small and trains briefly): drop it.")
    if args.instance_data_dir is not None:
        if not os.path.isdir(args.instance_data_dir):
            raise ValueError(f"--instance_data_dir {args.instance_data_dir!r} is not a folder.")
        if not list_images(args.instance_data_dir):
            raise ValueError(f"--instance_data_dir {args.instance_data_dir!r} holds no images (png, jpg, webp, ...).")
        if not (args.instance_prompt or "").strip():
            raise ValueError("--instance_data_dir needs --instance_prompt (e.g. 'a photo of sks dog').")
        others = [f for f in ("dataset_name", "train_data_dir", "train_shards", "precompute_dir", "max_train_samples")
                  if getattr(args, f) is not None] + (["streaming"] if args.streaming else [])
        if others:
            raise ValueError(f"--instance_data_dir is the training data: drop --{others[0]}.")
    elif args.instance_prompt is not None:
        raise ValueError("--instance_prompt is the prompt of --instance_data_dir's images: pass --instance_data_dir.")
    if args.with_prior_preservation:
        if args.instance_data_dir is None:
            raise ValueError("--with_prior_preservation needs DreamBooth data: pass --instance_data_dir.")
        if args.class_data_dir is None:
            raise ValueError("--with_prior_preservation needs --class_data_dir (a folder; filled with generated "
                             "class images when it holds fewer than --num_class_images).")
        if not (args.class_prompt or "").strip():
            raise ValueError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog').")
        if args.num_class_images < 1 or args.sample_batch_size < 1:
            raise ValueError("--num_class_images and --sample_batch_size must be >= 1.")
        if not args.prior_loss_weight >= 0:
            raise ValueError(f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}.")
    elif args.class_data_dir is not None or args.class_prompt is not None:
        logger.warning("--class_data_dir/--class_prompt are used only with --with_prior_preservation.")
    args = validate_denoiser(args)
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-lora"
    return args


def parse_lora_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_lora_args(build_lora_parser().parse_args(argv))
