"""Command lines of ``train_snapgen_asd.py``, ``train_sd3_teacher.py``, ``train_tiny_decoder.py``,
``train_autoencoder.py`` and ``train_tiny_encoder.py``, composed from the groups of :mod:`.args` plus each script's
own group; ``train_snapgen_lora.py``'s (:mod:`.lora_args`) is importable from here too."""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os

from .adversarial import GAN_LOSSES
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
    load_json_arg,
    validate_common,
    validate_denoiser,
    validate_kd,
)
from .lora_args import build_lora_parser, parse_lora_args, validate_lora_args  # defined there, imported here too

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "REAL_SOURCES",
    "RECONSTRUCTION_LOSSES",
    "build_asd_parser",
    "validate_asd_args",
    "parse_asd_args",
    "build_teacher_parser",
    "load_transformer_config",
    "parse_teacher_args",
    "build_decoder_parser",
    "validate_decoder_args",
    "parse_decoder_args",
    "build_autoencoder_parser",
    "validate_autoencoder_args",
    "parse_autoencoder_args",
    "build_encoder_parser",
    "validate_encoder_args",
    "parse_encoder_args",
    "build_lora_parser",
    "validate_lora_args",
    "parse_lora_args",
]

REAL_SOURCES = ("data", "teacher")
RECONSTRUCTION_LOSSES = ("mse", "l1")


# ---------------------------------------------------------------------------------------------- ASD (paper §3.4)


def build_asd_parser() -> argparse.ArgumentParser:
    """The KD script's groups plus the adversarial-step-distillation group."""
    from .args import build_parser

    p = build_parser(kd=True, description="SnapGen adversarial step distillation (few-step sampling)")
    g = p.add_argument_group("adversarial step distillation")
    a = g.add_argument
    a("--num_inference_steps", type=int, default=4,
      help="Steps the distilled student samples with (4 or 8 in the paper): it trains on this grid of the scheduler, "
           "and the saved pipeline defaults to it (with guidance 1, no CFG).")
    a("--teacher_num_inference_steps", type=int, default=4,
      help="The few-step teacher's own schedule (SD3.5-Large-Turbo: 4). KD targets come from the teacher run along it "
           "from the student's noise level down to 0; 1 = a single teacher forward (plain output KD).")
    a("--teacher_shift", type=float, default=None, help="Shift of the teacher's schedule (default: the scheduler's).")
    a("--teacher_guidance_scale", type=float, default=1.0,
      help="Classifier-free guidance of the teacher's KD targets against the empty prompt (1: none, as for a "
           "guidance-distilled teacher like SD3.5-Large-Turbo). A teacher trained with --proportion_empty_prompts "
           "and sampled with CFG needs it, or the no-CFG student loses the prompt.")
    a("--discriminator_layers", type=str, default=None,
      help='Teacher blocks carrying discriminator heads, "transformer_blocks.8,transformer_blocks.18,..." (default: '
           "--discriminator_num_heads blocks spread over the teacher's depth).")
    a("--discriminator_num_heads", type=int, default=4, help="Heads when --discriminator_layers is not given.")
    a("--discriminator_head_channels", type=int, default=256, help="Width of each discriminator head.")
    a("--discriminator_learning_rate", type=float, default=None, help="LR of the heads (default: --learning_rate).")
    a("--gan_loss", type=str, default="hinge", choices=GAN_LOSSES)
    a("--adversarial_weight", type=float, default=0.5,
      help="lambda_adv in L = S(L_task, L_out) + S(L_task, L_feat) + lambda_adv * L_adv (reconstructed default).")
    a("--r1_gamma", type=float, default=0.0,
      help="R1 penalty weight on real samples (0: off; costs a double backward through the teacher).")
    a("--adversarial_real_source", type=str, default="data", choices=REAL_SOURCES,
      help='"data": the training latents are the real samples; "teacher": the teacher\'s clean latents (LADD).')
    a("--adversarial_logit_mean", type=float, default=0.0, help="Logit-normal mean of the re-noising time t'.")
    a("--adversarial_logit_std", type=float, default=1.0, help="Logit-normal std of the re-noising time t'.")
    return p


def validate_asd_args(args: argparse.Namespace) -> argparse.Namespace:
    """The KD checks plus the ASD ones; fills few-step validation defaults."""
    if not isinstance(args, argparse.Namespace) or not hasattr(args, "num_inference_steps"):
        raise TypeError("`args` must come from build_asd_parser().parse_args().")
    args = validate_kd(validate_denoiser(args))
    if args.from_scratch or args.unet_config is not None:
        raise ValueError("ASD distils the steps of a trained SnapGen UNet: drop --from_scratch/--unet_config and pass "
                         "--unet_model_name_or_path (or a SnapGen pipeline as --pretrained_model_name_or_path).")
    for name in ("num_inference_steps", "teacher_num_inference_steps", "discriminator_num_heads",
                 "discriminator_head_channels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("adversarial_weight", "r1_gamma"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.teacher_guidance_scale < 1:
        raise ValueError(f"--teacher_guidance_scale must be >= 1 (1: no guidance), got {args.teacher_guidance_scale}.")
    if args.discriminator_learning_rate is not None and args.discriminator_learning_rate <= 0:
        raise ValueError(f"--discriminator_learning_rate must be > 0, got {args.discriminator_learning_rate}.")
    if args.adversarial_logit_std <= 0:
        raise ValueError(f"--adversarial_logit_std must be > 0, got {args.adversarial_logit_std}.")
    if args.teacher_shift is not None and args.teacher_shift <= 0:
        raise ValueError(f"--teacher_shift must be > 0, got {args.teacher_shift}.")
    if args.validation_num_inference_steps is None:
        args.validation_num_inference_steps = args.num_inference_steps
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = 1.0
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-asd"
    return args


def parse_asd_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_asd_args(build_asd_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------- SD3 teacher


def build_teacher_parser() -> argparse.ArgumentParser:
    """Flow matching of an ``SD3Transformer2DModel``: the denoiser groups without the SnapGen UNet group, plus the
    transformer group."""
    p = argparse.ArgumentParser(description="Flow-matching training of an SD3Transformer2DModel (the SnapGen KD/ASD "
                                            "teacher)")
    add_base_model_args(p, help_text=(
        "Pipeline folder or Hub id providing text encoders, tokenizers, VAE and scheduler (a SnapGen pipeline, or an "
        "SD3/SD3.5 one); its denoiser is not used."))
    g = p.add_argument_group("SD3 transformer")
    g.add_argument(
        "--transformer_config", type=str, default=None,
        help="A new SD3Transformer2DModel from this config: a JSON file (or JSON string) of its kwargs, e.g. "
             "runs/emoji/configs/teacher_transformer.json. joint_attention_dim / pooled_projection_dim default to the "
             "base pipeline's text widths, in_channels / out_channels to its latent channels.")
    g.add_argument(
        "--transformer_model_name_or_path", type=str, default=None,
        help="Continue from an existing SD3Transformer2DModel: a model folder or Hub id, or one with a `transformer` "
             "subfolder (an SD3 pipeline, or the --output_dir of an earlier run).")
    add_vae_encoder_arg(g)
    add_data_args(p)
    add_caption_data_args(p)
    add_optimization_args(p)
    add_flow_matching_args(p)
    add_speed_args(p)
    add_validation_args(p)
    add_output_args(p, default_output_dir="sd3-teacher")
    return p


def load_transformer_config(value, flag: str = "--transformer_config") -> dict:
    """The ``SD3Transformer2DModel`` kwargs in ``value`` (a JSON file path, a JSON string or a dict); raises
    ValueError naming ``flag`` for a missing file, invalid JSON or a key the model does not take."""
    from diffusers import SD3Transformer2DModel

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
    """Parses and validates ``argv``; ``args.transformer_config`` becomes a dict."""
    check_argv(argv)
    args = build_teacher_parser().parse_args(argv)
    if (args.transformer_config is None) == (args.transformer_model_name_or_path is None):
        raise ValueError("Pass exactly one of --transformer_config (a new SD3Transformer2DModel) and "
                         "--transformer_model_name_or_path (continue an existing one).")
    if args.transformer_config is not None:
        args.transformer_config = load_transformer_config(args.transformer_config)
    args = validate_denoiser(args)
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-teacher"
    return args


# ---------------------------------------------------------------------------------------------- reconstruction


def _add_reconstruction_args(p: argparse.ArgumentParser, title: str, gan_weight: float, lpips_fallback: str):
    """Losses, patch GAN and held-out evaluation: the tiny decoder's and the autoencoder's shared group."""
    g = p.add_argument_group(title)
    a = g.add_argument
    a("--lpips_weight", type=float, default=1.0,
      help=f"LPIPS weight (0: off). Needs `pip install lpips` and its backbone weights from the web; when missing, a "
           f"warning is logged and training continues with {lpips_fallback}.")
    a("--lpips_net", type=str, default="vgg", choices=["alex", "vgg", "squeeze"])
    a("--gan_weight", type=float, default=gan_weight, help="Weight of the patch-GAN generator loss (0: off).")
    a("--gan_loss", type=str, default="hinge", choices=GAN_LOSSES)
    a("--gan_start_step", type=int, default=0, help="Optimizer step from which the GAN terms are used.")
    a("--r1_gamma", type=float, default=0.0, help="R1 penalty weight of the patch discriminator (0: off).")
    a("--discriminator_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    a("--discriminator_channels", type=int, default=64, help="Width of the first patch-discriminator layer.")
    a("--discriminator_num_layers", type=int, default=3, help="Stride-2 layers of the patch discriminator.")
    _add_image_eval_args(g)
    return g


def _add_image_eval_args(g):
    """The device image cache and the held-out images: shared by the tiny decoder, the autoencoder and the tiny
    encoder."""
    a = g.add_argument
    a("--cache_images", action="store_true",
      help="Decode every training image once, resized and center-cropped to --cache_image_resolution, and keep them "
           "on the training device as uint8: random patches and flips are cut on the device, no data loader in the "
           "loop (needed for --cuda_graphs).")
    a("--cache_image_resolution", type=int, default=None,
      help="Side of the cached images (default: --resolution, i.e. whole images are the patches).")
    a("--validation_data_dir", type=str, default=None,
      help="Folder of held-out images (any layout datasets' imagefolder reads). Default: the last --num_eval_images "
           "images of the training data are held out.")
    a("--num_eval_images", type=int, default=16, help="Held-out images for PSNR/SSIM.")
    a("--eval_resolution", type=int, default=None, help="Held-out images are center-cropped to this size.")
    a("--eval_batch_size", type=int, default=4)
    a("--validation_steps", type=int, default=500, help="Evaluate on the held-out images every N steps.")


def _add_latent_cache_arg(g, use: str):
    """``--cache_latents`` of the tiny decoder and the tiny encoder (their frozen encoder runs once, not every step);
    ``use``: what a step does with the cached distributions."""
    g.add_argument("--cache_latents", action="store_true",
                   help="With --cache_images and whole-image patches (--cache_image_resolution = --resolution): "
                        "encode every cached image (and its mirror image with --random_flip) once with the frozen "
                        f"encoder and {use} on the device, instead of running the encoder every step.")


def _check_latent_cache_args(args):
    if getattr(args, "cache_latents", False):
        if not args.cache_images:
            raise ValueError("--cache_latents encodes the cached training images once: pass --cache_images too.")
        if args.cache_image_resolution != args.resolution:
            raise ValueError(f"--cache_latents needs whole images as patches, but --cache_image_resolution "
                             f"{args.cache_image_resolution} differs from --resolution {args.resolution}: drop "
                             "--cache_image_resolution or --cache_latents.")


def _reconstruction_parser(description, output_dir, gan_weight, lpips_fallback, group_title):
    p = argparse.ArgumentParser(description=description)
    return p, (lambda: (
        _add_patch_data_args(p),
        add_optimization_args(p, default_warmup=0),
        add_speed_args(p),
        _add_reconstruction_args(p, group_title, gan_weight, lpips_fallback),
        add_output_args(p, default_output_dir=output_dir),
    ))


def _add_patch_data_args(p):
    return add_data_args(p, default_resolution=256, resolution_help=(
        "Training patch size in pixels (random crops at native resolution; paper: 256)."))


def build_decoder_parser() -> argparse.ArgumentParser:
    """The tiny decoder's command line: the AutoencoderKL source, the decoder, data, optimization, speed, losses and
    evaluation, output."""
    p, add_rest = _reconstruction_parser("SnapGen tiny-decoder training (frozen AutoencoderKL encoder)",
                                         "snapgen-tiny-decoder", 0.1, "MSE + GAN", "losses, patch GAN and evaluation")
    add_base_model_args(p, help_text=(
        "AutoencoderKL whose frozen encoder gives the latents: a model folder/Hub id, or a pipeline (its `vae` "
        "subfolder), e.g. stabilityai/stable-diffusion-3.5-large."))
    g = p.add_argument_group("tiny decoder")
    a = g.add_argument
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help="Overrides --pretrained_model_name_or_path as the AutoencoderKL source.")
    a("--decoder_model_name_or_path", type=str, default=None,
      help="TinyDecoder to continue from (folder with config.json, or a pipeline with a `vae` subfolder).")
    a("--decoder_config", type=str, default=None,
      help="TinyDecoder config overrides (JSON file or string) for a new decoder; latent_channels, scaling_factor "
           "and shift_factor are taken from the AutoencoderKL.")
    a("--mse_weight", type=float, default=1.0)
    _add_latent_cache_arg(g, "sample each step's latents from these distributions")
    add_rest()
    return p


def validate_decoder_args(args: argparse.Namespace) -> argparse.Namespace:
    """The common checks plus the reconstruction ones (the autoencoder's too)."""
    if not isinstance(args, argparse.Namespace) or not hasattr(args, "lpips_weight"):
        raise TypeError("`args` must come from build_decoder_parser().parse_args().")
    args = _validate_image_eval_args(args, 512 if not hasattr(args, "kl_weight") else None)
    for name in ("mse_weight", "lpips_weight", "gan_weight", "r1_gamma", "gan_start_step"):
        if getattr(args, name, 0) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if getattr(args, "mse_weight", 1.0) == 0 and args.lpips_weight == 0:
        raise ValueError("--mse_weight and --lpips_weight are both 0: the decoder needs a reconstruction loss.")
    for name in ("discriminator_channels", "discriminator_num_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.discriminator_learning_rate is not None and args.discriminator_learning_rate <= 0:
        raise ValueError(f"--discriminator_learning_rate must be > 0, got {args.discriminator_learning_rate}.")
    min_side = 3 * 2**args.discriminator_num_layers
    if args.gan_weight > 0 and args.resolution < min_side:
        raise ValueError(f"--resolution {args.resolution} is too small for a {args.discriminator_num_layers}-layer patch "
                         f"discriminator (>= {min_side}): lower --discriminator_num_layers or raise --resolution.")
    _check_latent_cache_args(args)
    if hasattr(args, "decoder_config"):
        args.decoder_config = load_json_arg(args.decoder_config, "--decoder_config")
        if args.decoder_config is not None and args.decoder_model_name_or_path is not None:
            raise ValueError("pass either --decoder_model_name_or_path or --decoder_config, not both.")
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-tiny-decoder"
    return args


def _validate_image_eval_args(args, default_eval_resolution: int | None) -> argparse.Namespace:
    """The common checks plus those of :func:`_add_image_eval_args`; ``--eval_resolution`` defaults to
    ``default_eval_resolution`` (``None``: ``--resolution``), ``--cache_image_resolution`` to ``--resolution``."""
    args = validate_common(args)
    if args.eval_resolution is None:
        args.eval_resolution = default_eval_resolution or args.resolution
    if args.cache_image_resolution is None:
        args.cache_image_resolution = args.resolution
    for name in ("num_eval_images", "eval_resolution", "eval_batch_size", "validation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.cache_image_resolution < args.resolution:
        raise ValueError(f"--cache_image_resolution ({args.cache_image_resolution}) must be >= --resolution "
                         f"({args.resolution}): patches are cut from the cached images.")
    if args.eval_resolution % 8:
        raise ValueError(f"--eval_resolution must be a multiple of 8, got {args.eval_resolution}.")
    if args.validation_data_dir is not None and not os.path.isdir(args.validation_data_dir):
        raise ValueError(f"--validation_data_dir {args.validation_data_dir!r} is not a folder.")
    return args


def parse_decoder_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_decoder_args(build_decoder_parser().parse_args(argv))


def build_autoencoder_parser() -> argparse.ArgumentParser:
    """The autoencoder's command line: the model, data, optimization, speed, losses and evaluation, output."""
    p, add_rest = _reconstruction_parser(
        "SnapGen autoencoder training: a diffusers AutoencoderKL (16 latent channels, f = 8)", "snapgen-autoencoder",
        0.0, "the reconstruction loss + KL", "losses, patch GAN and evaluation")
    g = p.add_argument_group("autoencoder")
    a = g.add_argument
    a("--vae_config", type=str, default=None,
      help="A new AutoencoderKL from this config (JSON file or string of AutoencoderKL kwargs, e.g. the recipe's "
           "runs/emoji/configs/vae.json).")
    a("--vae_model_name_or_path", type=str, default=None,
      help="AutoencoderKL to continue from (folder/Hub id, or a pipeline with a `vae` subfolder).")
    a("--revision", type=str, default=None, help="Revision of --vae_model_name_or_path.")
    a("--variant", type=str, default=None, help="Weights variant of --vae_model_name_or_path, e.g. fp16.")
    a("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    a("--reconstruction_loss", type=str, default="l1", choices=RECONSTRUCTION_LOSSES,
      help="Per-pixel reconstruction loss (LDM/SD VAEs: l1).")
    a("--kl_weight", type=float, default=1e-6,
      help="Weight of KL(q(z|x) || N(0, I)), summed per image and divided by the pixel values per image (the SD-VAE "
           "meaning of 1e-6).")
    a("--num_scale_images", type=int, default=None,
      help="Training images encoded at the end to measure scaling_factor/shift_factor (default: all).")
    add_rest()
    return p


def validate_autoencoder_args(args: argparse.Namespace) -> argparse.Namespace:
    """The reconstruction checks plus the autoencoder ones; defaults ``--validation_data_dir`` to
    ``<train_data_dir>/test`` when the data has train/ and test/ splits, ``--eval_resolution`` to ``--resolution``."""
    if not isinstance(args, argparse.Namespace) or not hasattr(args, "kl_weight"):
        raise TypeError("`args` must come from build_autoencoder_parser().parse_args().")
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-autoencoder"
    data_dir = args.train_data_dir
    if (args.validation_data_dir is None and args.dataset_name is None and data_dir is not None
            and os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test"))):
        args.validation_data_dir = os.path.join(data_dir, "test")
        logger.info("held-out images: the test split %s", args.validation_data_dir)
    args = validate_decoder_args(args)
    if not math.isfinite(args.kl_weight) or args.kl_weight < 0:
        raise ValueError(f"--kl_weight must be a finite number >= 0 (SD VAEs: 1e-6), got {args.kl_weight}.")
    if args.num_scale_images is not None and args.num_scale_images < 1:
        raise ValueError(f"--num_scale_images must be >= 1 when given, got {args.num_scale_images}.")
    args.vae_config = load_json_arg(args.vae_config, "--vae_config")
    if (args.vae_config is None) == (args.vae_model_name_or_path is None):
        got = "both" if args.vae_config is not None else "neither"
        raise ValueError("pass exactly one of --vae_config (a new AutoencoderKL) and --vae_model_name_or_path "
                         f"(continue training one); got {got}.")
    if args.vae_config is not None:
        from diffusers import AutoencoderKL

        known = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
        unknown = sorted(k for k in args.vae_config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"--vae_config has keys AutoencoderKL does not take: {unknown}; valid keys: "
                             f"{sorted(known)}.")
    return args


def parse_autoencoder_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_autoencoder_args(build_autoencoder_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------- tiny encoder


#: What the tiny encoder learns: an autoencoder's posterior mean, or the inverse of a pipeline's decoder.
ENCODER_TARGETS = ("autoencoder", "pipeline_samples")


def build_encoder_parser() -> argparse.ArgumentParser:
    """The tiny encoder's command line: the AutoencoderKL it distils, the encoder, data, optimization, speed, the
    loss and the held-out evaluation, output. No GAN or LPIPS flags: its target is the autoencoder's latent."""
    p = argparse.ArgumentParser(description="TinyEncoder training: distils a frozen AutoencoderKL's posterior mean")
    add_base_model_args(p, help_text=(
        "AutoencoderKL whose encoder is distilled (its posterior mean is the target, its decoder measures PSNR): a "
        "model folder/Hub id, or a pipeline with an AutoencoderKL `vae` subfolder."))
    g = p.add_argument_group("tiny encoder")
    a = g.add_argument
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help="Overrides --pretrained_model_name_or_path as the AutoencoderKL source.")
    a("--encoder_model_name_or_path", type=str, default=None,
      help="TinyEncoder to continue from (folder with config.json, or a pipeline with a `vae_encoder` subfolder).")
    a("--encoder_config", type=str, default=None,
      help="TinyEncoder config overrides (JSON file or string) for a new encoder; latent_channels, scaling_factor "
           "and shift_factor are taken from the AutoencoderKL.")
    a("--pixel_loss_weight", type=float, default=0.0,
      help="Weight of the MSE between the image and the frozen autoencoder's decoding of the tiny latent (0: off; "
           "costs a decoder forward and backward per step). With --targets pipeline_samples: on real training "
           "images through the pipeline's decoder.")
    _add_latent_cache_arg(g, "take each step's targets from these posterior means")
    g = p.add_argument_group("targets")
    a = g.add_argument
    a("--targets", type=str, default="autoencoder", choices=ENCODER_TARGETS,
      help="autoencoder: distil the AutoencoderKL's posterior mean. pipeline_samples: for a pipeline with a decoder "
           "only (e.g. `default`, the embedded model), invert its frozen `vae` on latents the pipeline samples "
           "from the training captions (latent MSE of E(D(z)) vs z).")
    a("--num_pipeline_samples", type=int, default=2048,
      help="pipeline_samples: latent/image pairs sampled once before training (one caption and seed each).")
    a("--sample_batch_size", type=int, default=32, help="pipeline_samples: images per pipeline call.")
    a("--sample_num_inference_steps", type=int, default=None,
      help="pipeline_samples: sampling steps (default: the pipeline's own default, 4 for the default model).")
    a("--pixel_batch_size", type=int, default=None,
      help="pipeline_samples: real images per step for --pixel_loss_weight (default: --train_batch_size).")
    a("--caption_column", type=str, default="text", help="pipeline_samples: the captions that prompt the pipeline.")
    _add_patch_data_args(p)
    add_optimization_args(p, default_lr=1e-3, default_warmup=0)
    add_speed_args(p)
    _add_image_eval_args(p.add_argument_group("images and evaluation"))
    add_output_args(p, default_output_dir="snapgen-tiny-encoder")
    return p


def validate_encoder_args(args: argparse.Namespace) -> argparse.Namespace:
    """The common and image checks plus the encoder ones."""
    if not isinstance(args, argparse.Namespace) or not hasattr(args, "pixel_loss_weight"):
        raise TypeError("`args` must come from build_encoder_parser().parse_args().")
    args = _validate_image_eval_args(args, None)
    _check_latent_cache_args(args)
    if args.cache_latents and args.targets != "autoencoder":
        raise ValueError("--cache_latents caches the autoencoder's posterior means: it needs --targets autoencoder.")
    if not math.isfinite(args.pixel_loss_weight) or args.pixel_loss_weight < 0:
        raise ValueError(f"--pixel_loss_weight must be a finite number >= 0, got {args.pixel_loss_weight}.")
    for name in ("num_pipeline_samples", "sample_batch_size", "sample_num_inference_steps", "pixel_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    if args.targets == "pipeline_samples" and args.pretrained_vae_model_name_or_path is not None:
        raise ValueError("--targets pipeline_samples inverts the decoder of --pretrained_model_name_or_path: drop "
                         "--pretrained_vae_model_name_or_path (it is the AutoencoderKL of --targets autoencoder).")
    args.encoder_config = load_json_arg(args.encoder_config, "--encoder_config")
    if args.encoder_config is not None and args.encoder_model_name_or_path is not None:
        raise ValueError("pass either --encoder_model_name_or_path or --encoder_config, not both.")
    if args.tracker_project_name is None:
        args.tracker_project_name = "snapgen-tiny-encoder"
    return args


def parse_encoder_args(argv=None) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_encoder_args(build_encoder_parser().parse_args(argv))

