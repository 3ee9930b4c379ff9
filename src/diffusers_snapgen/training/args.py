"""Command-line arguments of the training scripts, composed from argument groups.

Every script builds its parser from the groups it needs (:func:`add_base_model_args`, :func:`add_data_args`,
:func:`add_optimization_args`, :func:`add_speed_args`, :func:`add_output_args`, ...); nothing is added and then hidden.
Flag names and defaults follow diffusers' ``examples/`` scripts (``train_text_to_image.py``,
``train_dreambooth_sd3.py``) so users recognise them. :func:`build_parser` / :func:`parse_args` are the
flow-matching and KD scripts' command line; the other scripts' parsers are in :mod:`.task_args`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .flow_matching import WEIGHTING_SCHEMES
from .kd import PROJECTOR_DIRECTIONS
from .scaling import ALPHA_SCHEDULES

__all__ = [
    "build_parser",
    "parse_args",
    "validate_args",
    "load_json_arg",
    "parse_or_exit",
    "add_base_model_args",
    "add_unet_args",
    "add_data_args",
    "add_caption_data_args",
    "add_optimization_args",
    "add_speed_args",
    "add_output_args",
    "add_validation_args",
    "add_flow_matching_args",
    "add_kd_args",
    "validate_common",
    "validate_denoiser",
    "validate_kd",
]

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------- groups


def add_base_model_args(p: argparse.ArgumentParser, help_text: str | None = None, required: bool = True):
    """``--pretrained_model_name_or_path`` (+ ``--revision``, ``--variant``, ``--cache_dir``)."""
    g = p.add_argument_group("base model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=required, default=None, help=help_text or (
        "Pipeline folder or Hub id providing text encoders, tokenizers, VAE and scheduler: a SnapGen pipeline, or an "
        "SD3/SD3.5 one (its transformer is not loaded). Its `unet` is the starting point when present."))
    g.add_argument("--revision", type=str, default=None, help="Revision of the model(s) loaded from the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    return g


def add_unet_args(p: argparse.ArgumentParser):
    """Where the SnapGen UNet being trained comes from, and the latent encoder."""
    g = p.add_argument_group("SnapGen UNet")
    a = g.add_argument
    a("--unet_model_name_or_path", type=str, default=None,
      help="SnapGen UNet to start from (folder with config.json, or a pipeline folder/repo with a `unet` subfolder).")
    a("--unet_config", type=str, default=None,
      help="Train from scratch with this SnapGenUNet2DModel config (JSON file or JSON string; keys override the "
           "paper defaults). joint_attention_dim/pooled_projection_dim default to the text encoders' widths.")
    a("--from_scratch", action="store_true", help="Ignore pretrained UNet weights; initialise from --unet_config.")
    add_vae_encoder_arg(g)
    return g


def add_vae_encoder_arg(g):
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="AutoencoderKL that encodes the training images (its `vae` subfolder if it has one), e.g. the "
                        "SD3.5 repo. Needed when the base pipeline decodes with SnapGen's TinyDecoder, which cannot "
                        "encode.")


def add_data_args(p: argparse.ArgumentParser, resolution_help: str | None = None, default_resolution: int = 512):
    """Images: dataset source, resolution, flips, data-loader workers, ``--max_train_samples``."""
    g = p.add_argument_group("data")
    a = g.add_argument
    a("--dataset_name", type=str, default=None, help="HF Hub dataset name (or a local dataset script/folder).")
    a("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    a("--train_data_dir", type=str, default=None,
      help="Local image folder loaded with datasets' `imagefolder` (captions in metadata.jsonl: "
           '{"file_name": "0.png", "text": "a red apple"}).')
    a("--image_column", type=str, default="image", help="Dataset column with images.")
    a("--max_train_samples", type=int, default=None, help="Truncate the dataset to this many samples (debugging).")
    a("--resolution", type=int, default=default_resolution,
      help=resolution_help or "Training resolution in pixels (a multiple of 32 for the SD3 VAE).")
    a("--random_flip", action="store_true", help="Horizontally flip half of the images.")
    a("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes (0: main process).")
    return g


def add_caption_data_args(p: argparse.ArgumentParser):
    """Captions, crops, caption dropout and the latent / text-embedding caches of the denoiser scripts."""
    g = p.add_argument_group("captions and caches")
    a = g.add_argument
    a("--caption_column", type=str, default="text",
      help="Dataset column with captions (a string, or a list of strings: one is drawn per sample and step).")
    a("--center_crop", action="store_true", help="Center crop to --resolution (default: random crop).")
    a("--proportion_empty_prompts", type=float, default=0.0,
      help="Fraction of captions replaced by the empty prompt (enables classifier-free guidance).")
    a("--max_sequence_length", type=int, default=None,
      help="Text tokens (T5 tokens with SD3.5 encoders; the pipeline's default when unset).")
    a("--cache_latents", action="store_true",
      help="Encode every image with the VAE once before training (both flips with --random_flip; random crops are "
           "then fixed) and train from the cached latent distributions, held on the training device.")
    a("--cache_text_embeddings", action="store_true",
      help="Encode every caption (all captions of a list) once before training and keep the embeddings on the "
           "training device. With --cache_latents a batch is an on-device gather: no data loader in the loop.")
    a("--precompute_dir", type=str, default=None,
      help="Where cached latents/embeddings are stored and reused (default: <output_dir>/cache); also the folder "
           "training_examples/precompute_latents.py writes sharded caches to.")
    a("--streaming", action="store_true",
      help="Stream --dataset_name (datasets' IterableDataset, split across processes) instead of downloading it; "
           "needs --max_train_steps.")
    a("--train_shards", type=str, default=None,
      help='WebDataset-style tar shards streamed from disk, e.g. "data/{00000..00099}.tar" (brace expansion; join '
           'patterns with "::"); an image (jpg/png/webp) and a caption (txt) per sample key. Needs --max_train_steps.')
    a("--stream_shuffle_buffer", type=int, default=0,
      help="Shuffle a streamed data set through a buffer of this many samples (seeded; 0: stream order).")
    return g


def add_optimization_args(p: argparse.ArgumentParser, default_lr: float = 1e-4, default_warmup: int = 500):
    """Batch, steps, accumulation, AdamW, LR schedule, clipping, EMA, precision, seed."""
    g = p.add_argument_group("optimization")
    a = g.add_argument
    a("--train_batch_size", type=int, default=4, help="Batch size per device.")
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    a("--learning_rate", type=float, default=default_lr)
    a("--scale_lr", action="store_true", help="Multiply the LR by batch size x accumulation x processes.")
    a("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    a("--lr_warmup_steps", type=int, default=default_warmup)
    a("--lr_num_cycles", type=int, default=1, help="Hard resets for cosine_with_restarts.")
    a("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes`).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_ema", action="store_true", help="Keep an EMA of the trained model; the saved model gets the EMA weights.")
    a("--ema_decay", type=float, default=0.9999)
    a("--foreach_ema", action="store_true",
      help="Accepted for compatibility: the EMA update always runs as a few foreach kernels on the device.")
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
      help="Overrides accelerate's config. Frozen encoders/VAE run in this dtype; trained weights stay fp32 "
           "(autocast).")
    a("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    a("--seed", type=int, default=None,
      help="Seed for initialisation, data order, augmentation, noise and timesteps (0 when unset: runs are "
           "reproducible).")
    return g


def add_speed_args(p: argparse.ArgumentParser):
    """``--compile``, ``--cuda_graphs``, ``--channels_last`` and ``--cudnn_benchmark``: the fast training step
    (docs/training_speed.md)."""
    g = p.add_argument_group("speed")
    a = g.add_argument
    a("--compile", action="store_true",
      help="torch.compile the trained model (and a frozen teacher) for the training step; validation and saving use "
           "the plain modules.")
    a("--compile_mode", type=str, default="default", choices=COMPILE_MODES, help="torch.compile mode of --compile.")
    a("--cuda_graphs", action="store_true",
      help="Capture the whole optimizer step (forward, backward, clipping, AdamW, EMA, metrics) in one CUDA graph and "
           "replay it. Needs one CUDA process, bf16 or fp32, torch AdamW and the device caches; otherwise the run "
           "says why in one log line and steps eagerly.")
    a("--channels_last", action="store_true",
      help="Keep the trained model's 4-D weights in channels_last memory format, so its convolutions run NHWC "
           "(faster for convolution-bound models such as the tiny decoder; docs/training_speed.md). Frozen models "
           "and discriminators keep their format; checkpoints and saved models are the same files.")
    a("--cudnn_benchmark", action="store_true",
      help="Let cuDNN time its convolution algorithms for each new shape and keep the fastest "
           "(torch.backends.cudnn.benchmark): the first steps are slower, later ones can be faster for "
           "convolution-bound models at a fixed --resolution; results may differ in the last bits between runs.")
    a("--start_after", type=str, default=None, metavar="PATH",
      help="Set everything up (with --cuda_graphs: compile and capture the first step, leaving no trace), then wait "
           "until PATH exists before the first optimizer step: a stage compiles while an earlier one still trains "
           "on the GPU (the emoji recipe's EARLY_START=1).")
    return g


def add_output_args(p: argparse.ArgumentParser, default_output_dir: str = "snapgen-model"):
    """Output folder, checkpoints, logging, trackers and the Hub."""
    g = p.add_argument_group("checkpoints, logging and Hub")
    a = g.add_argument
    a("--output_dir", type=str, default=default_output_dir, help="Where checkpoints and the final model go.")
    a("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    a("--report_to", type=str, default=None,
      help='"tensorboard", "wandb", "comet_ml", "all" or "none" (default: tensorboard when installed, else none; '
           "<output_dir>/<logging_dir>/metrics.jsonl is always written).")
    a("--tracker_project_name", type=str, default=None)
    a("--logging_steps", type=int, default=20,
      help="Average losses, gradient norms and timestep-bucket statistics over this many steps, then log them (the "
           "only moment the training step waits for the device).")
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    a("--save_model_at_steps", type=int, nargs="+", default=None, metavar="STEP",
      help="Also write the model folder that --output_dir gets at the end (EMA weights with --use_ema; no "
           "evaluation or upload) into <output_dir>/step-<STEP> at these optimizer steps, and train on: e.g. an "
           "equal-steps comparison and a longer run from one process.")
    a("--resume_from_checkpoint", type=str, default=None,
      help='"latest" or a checkpoint folder. With "latest" and none present, training starts fresh.')
    a("--push_to_hub", action="store_true")
    a("--hub_token", type=str, default=None)
    a("--hub_model_id", type=str, default=None, help="Repo to push to (default: the --output_dir name).")
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return g


def add_validation_args(p: argparse.ArgumentParser):
    """Validation images of the denoiser scripts."""
    g = p.add_argument_group("validation")
    a = g.add_argument
    a("--validation_prompt", type=str, default=None, help="A prompt sampled every --validation_steps.")
    a("--validation_prompts", type=str, nargs="+", default=None, help="Several validation prompts.")
    a("--num_validation_images", type=int, default=1, help="Images per validation prompt.")
    a("--validation_steps", type=int, default=500)
    a("--validation_num_inference_steps", type=int, default=None, help="Sampling steps (pipeline default if unset).")
    a("--validation_guidance_scale", type=float, default=None, help="CFG scale (pipeline default if unset).")
    return g


def add_flow_matching_args(p: argparse.ArgumentParser):
    """Timestep density / loss weighting (diffusers' SD3 names) and the timestep-bucket statistics."""
    g = p.add_argument_group("flow matching")
    a = g.add_argument
    a("--weighting_scheme", type=str, default="logit_normal", choices=WEIGHTING_SCHEMES,
      help="Timestep density and loss weighting, as in diffusers' SD3 examples.")
    a("--logit_mean", type=float, default=0.0)
    a("--logit_std", type=float, default=1.0)
    a("--mode_scale", type=float, default=1.29)
    a("--timestep_buckets", type=int, default=10, help="Timestep buckets for per-bucket loss logging.")
    return g


def add_kd_args(p: argparse.ArgumentParser):
    """Teacher and multi-level KD (paper §3.3)."""
    g = p.add_argument_group("knowledge distillation")
    k = g.add_argument
    k("--teacher_model_name_or_path", type=str, required=True,
      help="Any diffusers SD3Transformer2DModel (e.g. stabilityai/stable-diffusion-3.5-large); frozen.")
    k("--teacher_subfolder", type=str, default="transformer",
      help='Subfolder holding the teacher (use "" for a bare model folder).')
    k("--teacher_revision", type=str, default=None)
    k("--teacher_variant", type=str, default=None)
    k("--teacher_dtype", type=str, default="bf16", choices=["fp32", "fp16", "bf16"])
    k("--teacher_sharding", type=str, default="replicate", choices=["replicate", "shard"],
      help="With several processes: replicate keeps a full teacher on every GPU; shard splits it across them with "
           "FSDP2 (1/N of its memory each, its blocks all-gathered in every forward). docs/distributed_training.md.")
    k("--kd_feature_layers", type=str, default=None,
      help='Feature pairs "student_module=teacher_module[:index],..." or a JSON list; default: SD3 -> SnapGen pairs '
           "(mid block, deepest down/up transformers).")
    k("--disable_output_kd", action="store_true", help="Drop the output (velocity) KD term.")
    k("--disable_feature_kd", action="store_true", help="Drop the feature KD term.")
    k("--kd_projector_type", type=str, default="linear", choices=["linear", "mlp"])
    k("--kd_projector_direction", type=str, default="teacher_to_student", choices=PROJECTOR_DIRECTIONS,
      help="teacher_to_student: the projector maps teacher features onto the student's (the paper's description; "
           "target and projector both learn); student_to_teacher: it maps student features onto the fixed teacher "
           "features (FitNets), which the projector cannot shrink.")
    k("--projector_learning_rate", type=float, default=None, help="LR of the projectors (default: --learning_rate).")
    k("--kd_scaling", type=str, default="timestep_aware", choices=["timestep_aware", "constant"],
      help="timestep_aware: alpha_t*L_task + (1-alpha_t)*sg(L_task/L_kd)*L_kd; constant: alpha*L_task + "
           "(1-alpha)*L_kd.")
    k("--kd_alpha_schedule", type=str, default="logit_normal", choices=ALPHA_SCHEDULES)
    k("--kd_alpha_min", type=float, default=0.0)
    k("--kd_alpha_max", type=float, default=0.5)
    k("--kd_alpha", type=float, default=0.5, help="alpha of the constant schedule / constant scaling.")
    k("--kd_ratio", type=str, default="sample", choices=["sample", "batch"])
    return g


# ---------------------------------------------------------------------------------------------- parsers


def build_parser(kd: bool = False, description: str | None = None) -> argparse.ArgumentParser:
    """``train_snapgen.py``'s parser; ``kd=True`` adds the teacher and distillation flags (``train_snapgen_kd.py``)."""
    if not isinstance(kd, bool):
        raise TypeError(f"`kd` must be a bool, got {type(kd).__name__}.")
    p = argparse.ArgumentParser(description=description or (
        "SnapGen multi-level KD training" if kd else "SnapGen flow-matching training"))
    add_base_model_args(p)
    add_unet_args(p)
    add_data_args(p)
    add_caption_data_args(p)
    add_optimization_args(p)
    add_flow_matching_args(p)
    add_speed_args(p)
    add_validation_args(p)
    add_output_args(p)
    if kd:
        add_kd_args(p).add_argument(
            "--teacher_config", type=str, default=None, metavar="JSON",
            help="With --start_after: build the teacher now from the --transformer_config it is trained with (a JSON "
                 "file or string; a saved config.json works too), with placeholder weights so the step compiles and "
                 "captures, and load its weights from --teacher_model_name_or_path once --start_after's file exists "
                 "(KD starts while the teacher still trains: the emoji recipe's EARLY_START=1).")
    return p


def load_json_arg(value, flag: str):
    """A JSON object given inline or as a file path; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{flag} must be a JSON string or a path to a JSON file, got {type(value).__name__}.")
    text = value
    if os.path.isfile(value):
        with open(value) as f:
            text = f.read()
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is neither a JSON file nor valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise ValueError(f"{flag} must hold a JSON object (a dict of config keys), got {type(out).__name__}.")
    return out


# ---------------------------------------------------------------------------------------------- validation


def _positive(args, names):
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")


def validate_common(args: argparse.Namespace) -> argparse.Namespace:
    """Checks of the groups every script has (data, optimization, speed, output); raises ValueError naming the flag
    and the fix."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    precomputed = _precomputed(args)
    instance = getattr(args, "instance_data_dir", None)
    if args.dataset_name is None and args.train_data_dir is None and getattr(args, "train_shards", None) is None \
            and not precomputed and instance is None:
        raise ValueError("Need a dataset: pass --dataset_name (HF datasets), --train_data_dir (image folder), "
                         "--train_shards (tar shards) or --precompute_dir (precompute_latents.py's output)"
                         + (", or DreamBooth images with --instance_data_dir." if hasattr(args, "instance_data_dir")
                            else "."))
    if precomputed and (args.dataset_name is not None or args.train_data_dir is not None):
        raise ValueError(f"--precompute_dir {args.precompute_dir} holds a precomputed data set (index.json): it is the "
                         "training data, drop --dataset_name / --train_data_dir (or pass another --precompute_dir).")
    if args.train_data_dir is not None and args.dataset_name is None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
    _positive(args, ["resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "checkpointing_steps", "logging_steps"])
    if any(step < 1 for step in getattr(args, "save_model_at_steps", None) or ()):
        raise ValueError(f"--save_model_at_steps must list optimizer steps >= 1, got {args.save_model_at_steps}.")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1 when given, got {v}.")
    if args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's factor; 32 for SnapGen), got "
                         f"{args.resolution}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0 or args.dataloader_num_workers < 0:
        raise ValueError("--lr_warmup_steps and --dataloader_num_workers must be >= 0.")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0: no clipping), got {args.max_grad_norm}.")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--report_to=wandb with --hub_token would expose the token: run `hf auth login` instead.")
    args.report_to = _resolve_report_to(args.report_to)
    if args.seed is None:
        args.seed = 0
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}.")
    if args.cuda_graphs and args.use_8bit_adam:
        raise ValueError("--cuda_graphs needs torch's AdamW (fused, capturable): drop --use_8bit_adam.")
    if args.cuda_graphs and args.compile and args.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"--compile_mode {args.compile_mode} captures its own CUDA graphs inside the step that "
                         "--cuda_graphs captures: use --compile_mode default or max-autotune-no-cudagraphs.")
    return args


def _precomputed(args) -> bool:
    from .precompute import is_precomputed

    return is_precomputed(getattr(args, "precompute_dir", None))


def _resolve_report_to(report_to):
    from accelerate.utils import is_comet_ml_available, is_tensorboard_available, is_wandb_available

    if report_to is None:  # the default: what diffusers' examples use, when it is installed
        return "tensorboard" if is_tensorboard_available() else "none"
    checks = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "comet_ml": is_comet_ml_available}
    for tracker in report_to.split(","):
        tracker = tracker.strip()
        if tracker in checks and not checks[tracker]():
            raise ValueError(f"--report_to {tracker} needs `pip install {tracker}`, or pass --report_to none.")
    return report_to


def validate_denoiser(args: argparse.Namespace) -> argparse.Namespace:
    """The common checks plus those of the caption, flow-matching and validation groups."""
    args = validate_common(args)
    _positive(args, ["validation_steps", "num_validation_images", "timestep_buckets"])
    for name in ("validation_num_inference_steps", "max_sequence_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1 when given, got {v}.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}.")
    if args.logit_std <= 0:
        raise ValueError(f"--logit_std must be > 0, got {args.logit_std}.")
    if getattr(args, "unet_config", None) is not None:
        args.unet_config = load_json_arg(args.unet_config, "--unet_config")
    if getattr(args, "from_scratch", False) and getattr(args, "unet_model_name_or_path", None) is not None:
        raise ValueError("--from_scratch ignores --unet_model_name_or_path: pass only one of them.")
    _validate_streaming(args)
    prompts = list(args.validation_prompts or [])
    if args.validation_prompt is not None:
        prompts.insert(0, args.validation_prompt)
    args.validation_prompts = prompts or None
    return args


def _validate_streaming(args):
    streams = args.streaming or args.train_shards is not None
    if streams and _precomputed(args):
        raise ValueError("--precompute_dir holds a precomputed data set: drop --streaming / --train_shards.")
    if args.train_shards is not None and (args.dataset_name is not None or args.train_data_dir is not None):
        raise ValueError("--train_shards is the data set: drop --dataset_name / --train_data_dir.")
    if args.streaming and args.dataset_name is None:
        raise ValueError("--streaming streams --dataset_name: pass it (or --train_shards for local tar shards).")
    if args.stream_shuffle_buffer < 0:
        raise ValueError(f"--stream_shuffle_buffer must be >= 0, got {args.stream_shuffle_buffer}.")
    if not streams:
        return
    if args.max_train_steps is None:
        raise ValueError("a stream has no epochs: pass --max_train_steps.")
    if args.cache_latents or args.cache_text_embeddings or args.max_train_samples is not None:
        raise ValueError("--cache_latents/--cache_text_embeddings/--max_train_samples need the whole data set: with "
                         "a stream, precompute sharded caches with training_examples/precompute_latents.py and train "
                         "from --precompute_dir without --streaming/--train_shards.")


def validate_kd(args: argparse.Namespace) -> argparse.Namespace:
    """Checks of the KD group."""
    if args.disable_output_kd and args.disable_feature_kd:
        raise ValueError("--disable_output_kd and --disable_feature_kd together leave no KD: use train_snapgen.py.")
    for name in ("kd_alpha_min", "kd_alpha_max", "kd_alpha"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    if args.kd_alpha_min > args.kd_alpha_max:
        raise ValueError(f"--kd_alpha_min ({args.kd_alpha_min}) must be <= --kd_alpha_max ({args.kd_alpha_max}).")
    if args.projector_learning_rate is not None and args.projector_learning_rate <= 0:
        raise ValueError(f"--projector_learning_rate must be > 0, got {args.projector_learning_rate}.")
    if args.teacher_subfolder == "":
        args.teacher_subfolder = None
    config = getattr(args, "teacher_config", None)
    if config is not None:
        args.teacher_config = load_json_arg(config, "--teacher_config")
        if not getattr(args, "start_after", None):
            raise ValueError("--teacher_config builds a placeholder teacher whose weights load when --start_after's "
                             "file appears: pass --start_after too, or drop --teacher_config.")
        if args.teacher_sharding == "shard":
            raise ValueError("--teacher_config loads the teacher's weights after setup, which a sharded teacher "
                             "cannot take: use --teacher_sharding replicate.")
    return args


def validate_args(args: argparse.Namespace, kd: bool = False) -> argparse.Namespace:
    """Cross-flag checks of :func:`build_parser`'s arguments; raises ValueError naming the flag and the fix."""
    args = validate_denoiser(args)
    return validate_kd(args) if kd else args


def check_argv(argv):
    """``argv`` of a ``parse_*_args`` function: a list of strings, or ``None`` (``sys.argv[1:]``)."""
    if argv is not None and not isinstance(argv, (list, tuple)):
        raise TypeError(f"`argv` must be a list of strings or None, got {type(argv).__name__}.")


def parse_args(argv=None, kd: bool = False) -> argparse.Namespace:
    """Parses and validates ``argv`` (``sys.argv[1:]`` when None)."""
    check_argv(argv)
    return validate_args(build_parser(kd=kd).parse_args(argv), kd=kd)


def parse_or_exit(parse, *args, **kwargs):
    """``parse(*args, **kwargs)``, but a bad argument ends the program with ONE line on stderr and exit code 2
    (argparse's convention, also under ``accelerate launch``) instead of a traceback. The training scripts call their
    parser through it; library code calls the parser directly and gets the ``ValueError``."""
    try:
        return parse(*args, **kwargs)
    except (ValueError, TypeError) as e:
        prog = os.path.basename(sys.argv[0]) or "train"
        if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)) or 0) == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
