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

import argparse
import inspect
import logging
import os
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from diffusers_snapgen.training import (
    build_parser,
    load_teacher,
    text_widths,
    validate_args,
)
from diffusers_snapgen.training.args import load_json_arg
from diffusers_snapgen.training.decoder_training import save_model_atomically
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

#: Where the model goes in ``--output_dir`` and in checkpoints (``transformer/``, ``transformer_ema/``).
SUBFOLDER = "transformer"
#: Flags of the SnapGen scripts that choose the UNet; they do not apply here.
UNET_FLAGS = {"unet_model_name_or_path": "--unet_model_name_or_path", "unet_config": "--unet_config",
              "from_scratch": "--from_scratch"}


def build_teacher_parser() -> argparse.ArgumentParser:
    """``train_snapgen.py``'s parser with the UNet flags hidden, plus the transformer flags."""
    parser = build_parser(description="Flow-matching training of an SD3Transformer2DModel (the SnapGen KD/ASD teacher)")
    for action in parser._actions:
        if action.dest in UNET_FLAGS:
            action.help = argparse.SUPPRESS
        elif action.dest == "use_ema":
            action.help = "Keep an EMA of the transformer; <output_dir>/transformer gets the EMA weights."
        elif action.dest == "pretrained_model_name_or_path":
            action.help = ("Pipeline folder or Hub id providing text encoders, tokenizers, VAE and scheduler (a SnapGen "
                           "pipeline, or an SD3/SD3.5 one); its denoiser is not used.")
    group = parser.add_argument_group("SD3 transformer")
    group.add_argument(
        "--transformer_config", type=str, default=None,
        help="A new SD3Transformer2DModel from this config: a JSON file (or JSON string) of its kwargs, e.g. "
             "runs/emoji/configs/teacher_transformer.json. joint_attention_dim / pooled_projection_dim default to "
             "the base pipeline's text widths, in_channels / out_channels to its latent channels.",
    )
    group.add_argument(
        "--transformer_model_name_or_path", type=str, default=None,
        help="Continue from an existing SD3Transformer2DModel: a model folder or Hub id, or one with a `transformer` "
             "subfolder (an SD3 pipeline, or the --output_dir of an earlier run).",
    )
    return parser


def load_transformer_config(value, flag: str = "--transformer_config") -> dict:
    """The ``SD3Transformer2DModel`` kwargs in ``value`` (a JSON file path, a JSON string or a dict); raises
    ValueError naming ``flag`` for a missing file, invalid JSON or a key the model does not take."""
    if not isinstance(flag, str) or not flag:
        raise TypeError(f"`flag` must name the command-line flag, e.g. '--transformer_config', got {flag!r}.")
    if isinstance(value, str) and not os.path.isfile(value) and not value.lstrip().startswith("{"):
        raise ValueError(f"{flag} {value!r}: no such file. Pass a JSON file of SD3Transformer2DModel kwargs (e.g. "
                         "runs/emoji/configs/teacher_transformer.json) or an inline JSON object.")
    config = load_json_arg(value, flag)
    if config is None:
        raise ValueError(f"{flag} is required for a new model (or pass --transformer_model_name_or_path).")
    class_name = config.get("_class_name", "SD3Transformer2DModel")
    if class_name != "SD3Transformer2DModel":
        raise ValueError(f"{flag} describes a {class_name}, not an SD3Transformer2DModel.")
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # a saved config.json works too
    allowed = set(inspect.signature(SD3Transformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{flag}: unknown SD3Transformer2DModel key(s) {unknown}; valid keys: {sorted(allowed)}.")
    return config


def parse_teacher_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None); ``args.transformer_config`` becomes a dict."""
    if argv is not None and not isinstance(argv, (list, tuple)):
        raise TypeError(f"`argv` must be a list of strings or None, got {type(argv).__name__}.")
    args = build_teacher_parser().parse_args(argv)
    for dest, flag in UNET_FLAGS.items():
        if getattr(args, dest):
            raise ValueError(f"{flag} chooses a SnapGen UNet and does not apply to train_sd3_teacher.py: use "
                             "--transformer_config or --transformer_model_name_or_path.")
    if (args.transformer_config is None) == (args.transformer_model_name_or_path is None):
        raise ValueError("Pass exactly one of --transformer_config (a new SD3Transformer2DModel) and "
                         "--transformer_model_name_or_path (continue an existing one).")
    if args.transformer_config is not None:
        args.transformer_config = load_transformer_config(args.transformer_config)
    args = validate_args(args)
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-teacher"
    return args


def load_transformer(args, latent_channels: int, text_dims=None) -> SD3Transformer2DModel:
    """The trainable ``SD3Transformer2DModel`` in fp32: ``--transformer_model_name_or_path`` (its ``transformer``
    subfolder if it has one), or a new one from ``--transformer_config`` over the latent channels and the text widths
    ``text_dims = (joint_attention_dim, pooled_projection_dim)``, initialised under ``torch.manual_seed(--seed)``.
    Raises ValueError when the model cannot take the base pipeline's latents or text embeddings."""
    for name in ("transformer_config", "transformer_model_name_or_path", "seed"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from parse_teacher_args (no `{name}`).")
    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"`latent_channels` must be a positive int (the VAE's latent_channels), got "
                         f"{latent_channels!r}.")
    if text_dims is not None and (len(text_dims) != 2 or not all(isinstance(d, int) and d > 0 for d in text_dims)):
        raise ValueError(f"`text_dims` must be (joint_attention_dim, pooled_projection_dim) ints or None, got "
                         f"{text_dims!r}.")
    if args.transformer_model_name_or_path is not None:
        flag = "--transformer_model_name_or_path"
        model = load_teacher(args.transformer_model_name_or_path, SUBFOLDER, torch.float32, args.revision,
                             args.variant, args.cache_dir).requires_grad_(True).train()
        logger.info("transformer: SD3Transformer2DModel from %s", args.transformer_model_name_or_path)
    else:
        flag = "--transformer_config"
        config = {"in_channels": latent_channels, "out_channels": latent_channels}
        if text_dims is not None:
            config.update(joint_attention_dim=text_dims[0], pooled_projection_dim=text_dims[1])
        config.update(args.transformer_config)
        torch.manual_seed(args.seed)
        try:
            model = SD3Transformer2DModel(**config)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise ValueError(f"{flag} does not build an SD3Transformer2DModel ({type(e).__name__}: {e}); "
                             f"the full config was {config}.") from e
        logger.info("transformer: a new SD3Transformer2DModel %s", config)
    c = model.config
    for key in ("in_channels", "out_channels"):
        if c[key] != latent_channels:
            raise ValueError(f"{flag}: {key}={c[key]} but the VAE has {latent_channels} latent channels; use "
                             f"{key}={latent_channels}.")
    if text_dims is not None:
        for key, width in zip(("joint_attention_dim", "pooled_projection_dim"), text_dims):
            if c[key] < width:
                raise ValueError(f"{flag}: {key}={c[key]} is narrower than the base pipeline's text embeddings "
                                 f"({width}); use {key}={width} (or leave it out of --transformer_config).")
    logger.info("transformer: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def save_transformer(transformer, output_dir) -> Path:
    """``<output_dir>/transformer/`` with ``save_pretrained``, atomically (its ``config.json`` is written last)."""
    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"`transformer` must be an SD3Transformer2DModel, got {type(transformer).__name__}.")
    return save_model_atomically(transformer, Path(output_dir, SUBFOLDER))


def main(args):
    # Frozen text encoders, VAE and scheduler from the base pipeline (its unet, if any, is not used).
    accelerator, components, latent_vae = setup_base(args)

    # The denoiser being trained; the validation pipeline samples it through SD3TransformerDenoiser.
    transformer = load_transformer(args, latent_vae.config.latent_channels, text_widths(components))
    ctx = prepare_student_pipeline(args, accelerator, components, transformer, latent_vae)
    ctx.extra.update(stage="teacher", card_kind="transformer", card_subfolder=SUBFOLDER)  # the pushed model card
    build_data(ctx, args.max_sequence_length)

    params = [p for p in transformer.parameters() if p.requires_grad]
    trainable, clip = finish_setup(ctx, [], [{"params": params}], student_subfolder=SUBFOLDER)

    train(ctx, flow_matching_task_loss, trainable, clip)
    save_final_pipeline(ctx, save_model=save_transformer)


if __name__ == "__main__":
    main(parse_teacher_args())
