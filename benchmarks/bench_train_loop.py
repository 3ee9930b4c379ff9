"""Training-step throughput of the engine the training scripts run (diffusers_snapgen.training.engine), on synthetic
data held on the device (as with --cache_latents --cache_text_embeddings / --cache_images), in four step modes:

    eager            the step as Python issues it
    graph_eager      the eager step captured once in a CUDA graph and replayed (--cuda_graphs)
    compiled         torch.compile'd models (--compile)
    graph            compiled models, the whole step in one CUDA graph (--compile --cuda_graphs)

Configs (the emoji recipe's models, batch 128 unless noted): student8 / student16 (the 14.75M SnapGen student,
flow matching at 8x8 / 16x16 latents), teacher16 (the 12-block x 384 MMDiT teacher), kd16 (student + frozen teacher,
output + 4 feature pairs), asd16 (4-step grid, teacher rollout, teacher-feature discriminator), decoder128 and
autoencoder128 (128-pixel patches; the decoder's patch GAN on), decoder128_cached (the decoder step with
--cache_latents: the frozen encoder's latents computed once, not every step), decoder128_cached_cl and
autoencoder128_cl (the same with --channels_last), encoder128 and encoder128_cached (the tiny encoder distilled from
the frozen autoencoder, batch 64, without and with --cache_latents), paper1024 (the paper-size UNet at 1024², batch
8), paperkd1024 (the paper-size UNet distilled from an SD3.5-Large-shaped 8B teacher at 1024², batch 4: output + the
default 4 feature pairs, as benchmarks/bench_training.py times it outside the engine; the paper configs hold 64
synthetic samples on the device instead of 4096). Each config runs in its own process; every mode builds a fresh
run (prepare_run + train), warms up for --warmup steps (compilation and capture happen there) and is then timed over
--steps steps (metrics windows of the engine: the host waits for the device once per window). GPU busy time:
torch.profiler over the timed steps of one mode (union of kernel intervals / wall time); with --profile_tables also
the profiler's per-op GPU time table (profile_<config>_<mode>.txt). A config stopped by --deadline keeps the rows of
the modes it finished.

    python benchmarks/bench_train_loop.py --out benchmarks/results                    # CUDA
    python benchmarks/bench_train_loop.py --smoke --out /tmp/bench                    # CPU, tiny models, ~1 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODES = ("eager", "graph_eager", "compiled", "graph")
EMOJI_STUDENT = {"in_channels": 16, "out_channels": 16, "block_out_channels": [96, 192, 256], "layers_per_block": 1,
                 "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 32, "cross_attention_dim": 256,
                 "norm_num_groups": 32, "joint_attention_dim": 384, "pooled_projection_dim": 384}
EMOJI_TEACHER = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12, "attention_head_dim": 64,
                 "num_attention_heads": 6, "joint_attention_dim": 384, "caption_projection_dim": 384,
                 "pooled_projection_dim": 384, "pos_embed_max_size": 16}
EMOJI_KD_LAYERS = ("down_blocks.2.attentions.0=transformer_blocks.3:1,mid_block=transformer_blocks.6:1,"
                   "up_blocks.0.attentions.1=transformer_blocks.9:1,up_blocks.1.attentions.1=transformer_blocks.10:1")
EMOJI_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2,
             "norm_num_groups": 32, "sample_size": 128, "mid_block_add_attention": False}
TINY_UNET = {"in_channels": 16, "out_channels": 16, "block_out_channels": [16, 32, 32], "layers_per_block": 1,
             "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 8, "cross_attention_dim": 32,
             "norm_num_groups": 8, "joint_attention_dim": 24, "pooled_projection_dim": 24}
TINY_TEACHER = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12, "attention_head_dim": 8,
                "num_attention_heads": 2, "joint_attention_dim": 24, "caption_projection_dim": 16,
                "pooled_projection_dim": 24, "pos_embed_max_size": 16}
TINY_VAE = {**EMOJI_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 32}

# name: (kind, latent or pixel size, batch, [smoke size, smoke batch])
CONFIGS = {
    "student8": ("fm", 8, 128, 8, 4),
    "student16": ("fm", 16, 128, 8, 4),
    "teacher16": ("teacher", 16, 128, 8, 4),
    "kd16": ("kd", 16, 128, 8, 4),
    "asd16": ("asd", 16, 128, 8, 4),
    "decoder128": ("decoder", 128, 64, 32, 4),
    "decoder128_cached": ("decoder", 128, 64, 32, 4),
    "decoder128_cached_cl": ("decoder", 128, 64, 32, 4),
    "encoder128": ("encoder", 128, 64, 32, 4),
    "encoder128_cached": ("encoder", 128, 64, 32, 4),
    "autoencoder128": ("autoencoder", 128, 32, 32, 4),
    "autoencoder128_cl": ("autoencoder", 128, 32, 32, 4),
    "paper1024": ("paper", 128, 8, 8, 2),
    "paperkd1024": ("paperkd", 128, 4, 8, 2),
}
CONFIG_FLAGS = {"decoder128_cached": ["--cache_latents"],  # the frozen encoder's latents computed once, not every step
                "decoder128_cached_cl": ["--cache_latents", "--channels_last"],  # and the decoder's weights NHWC
                "encoder128_cached": ["--cache_latents"],
                "autoencoder128_cl": ["--channels_last"]}
RECONSTRUCTION = ("decoder", "encoder", "autoencoder")  # image models: device image caches, 128-pixel patches
PAPER = ("paper", "paperkd")  # the paper-size UNet: 333 x 4096 text (CLIP-L + CLIP-G + T5), 64 samples on the device
TEXT_TOKENS, TEXT_WIDTH = 20, 384  # MiniLM-L6 at the emoji recipe's 20 tokens
SAMPLES = 4096  # synthetic data set size (the device caches)


# ---------------------------------------------------------------------------------------------- one config


def _args(kind: str, batch: int, size: int, mode: str, out: Path, warmup: int, steps: int, extra=()):
    from diffusers_snapgen.training.args import validate_common
    from diffusers_snapgen.training.task_args import (build_asd_parser, build_autoencoder_parser,
                                                      build_decoder_parser, build_encoder_parser)

    flags = ["--train_data_dir", str(out), "--output_dir", str(out / mode), "--train_batch_size", str(batch),
             "--max_train_steps", str(warmup + steps), "--logging_steps", str(warmup), "--checkpointing_steps",
             "1000000", "--report_to", "none", "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--use_ema",
             "--seed", "0", *extra]
    import torch

    if torch.cuda.is_available():
        flags += ["--mixed_precision", "bf16"]
    if mode in ("compiled", "graph"):
        flags.append("--compile")
    if mode in ("graph_eager", "graph"):
        flags.append("--cuda_graphs")
    if kind == "encoder":  # the recipe's tiny encoder: latent MSE to the frozen autoencoder's posterior mean
        flags += ["--resolution", str(size), "--random_flip", "--cache_images", "--validation_steps", "1000000"]
        args = build_encoder_parser().parse_args(["--pretrained_model_name_or_path", "unused", *flags])
        args.eval_resolution, args.cache_image_resolution = size, size
    elif kind in RECONSTRUCTION:  # the recipe's losses: the decoder's patch GAN on, none for the autoencoder
        flags += ["--resolution", str(size), "--lpips_weight", "0", "--gan_weight",
                  "0.1" if kind == "decoder" else "0", "--random_flip",
                  "--cache_images", "--validation_steps", "1000000"]
        if kind == "decoder":
            args = build_decoder_parser().parse_args(["--pretrained_model_name_or_path", "unused", *flags])
        else:
            args = build_autoencoder_parser().parse_args(["--vae_config", "{}", *flags])
            args.vae_config, args.mse_weight = {}, 1.0
        args.eval_resolution, args.cache_image_resolution = size, size
    else:
        kd_flags = [] if kind == "paperkd" else [  # the emoji recipe's pairs and direction; the paper's: the defaults
            "--kd_projector_direction", "student_to_teacher", "--kd_feature_layers", EMOJI_KD_LAYERS]
        flags += ["--pretrained_model_name_or_path", "unused", "--resolution", str(size * 8), "--random_flip",
                  "--proportion_empty_prompts", "0.1", "--cache_latents", "--cache_text_embeddings",
                  "--teacher_model_name_or_path", "unused", *kd_flags, "--num_inference_steps", "4",
                  "--teacher_num_inference_steps", "1", "--discriminator_layers",
                  "transformer_blocks.3,transformer_blocks.7,transformer_blocks.10"]
        args = build_asd_parser().parse_args(flags)
        args.validation_prompts = None
    return validate_common(args)


def _denoiser_run(kind, size, batch, args, accelerator, tiny):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.training import feature_kd_from_args, prepare_run
    from diffusers_snapgen.training.batches import DeviceIndexBatches
    from diffusers_snapgen.training.data import LatentCache, TextEmbeddingCache
    from diffusers_snapgen.training.discriminator import TeacherFeatureDiscriminator
    from diffusers_snapgen.training.tasks import ASDTask, DenoiserBase, FlowMatchingTask, KDTask, kd_scaling_from_args

    device = accelerator.device
    torch.manual_seed(0)
    text_tokens, text_width = (TEXT_TOKENS, 24) if tiny else (333, 4096) if kind in PAPER else (TEXT_TOKENS, TEXT_WIDTH)
    vae = AutoencoderKL(**TINY_VAE).requires_grad_(False).eval()  # only its latent statistics are used
    base = DenoiserBase({"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae}, vae, torch.bfloat16
                        if accelerator.mixed_precision == "bf16" else torch.float32)
    if kind in PAPER:
        student = SnapGenUNet2DModel(**(TINY_UNET if tiny else {}))
        pooled_width = student.config.pooled_projection_dim
    elif kind == "teacher":
        student = SD3Transformer2DModel(**(TINY_TEACHER if tiny else EMOJI_TEACHER) | {"sample_size": size})
        pooled_width = text_width
    else:
        student = SnapGenUNet2DModel(**(TINY_UNET if tiny else EMOJI_STUDENT) | {"sample_size": size})
        pooled_width = text_width
    teacher = None
    if kind in ("kd", "asd") or (kind == "paperkd" and tiny):
        teacher = SD3Transformer2DModel(**(TINY_TEACHER if tiny else EMOJI_TEACHER) | {"sample_size": size})
        teacher = teacher.to(device, base.weight_dtype).requires_grad_(False).eval()
    elif kind == "paperkd":  # 8B parameters: built on the device in the weights' dtype
        from common import SD35_LARGE_TRANSFORMER, build_frozen_teacher

        teacher = build_frozen_teacher(SD35_LARGE_TRANSFORMER, device, base.weight_dtype)
    if kind == "fm" or kind == "paper":
        task = FlowMatchingTask(args, accelerator, base, student)
    elif kind == "teacher":
        task = FlowMatchingTask(args, accelerator, base, student, name="teacher", save_subfolder="transformer")
    else:
        kd = feature_kd_from_args(args, student, teacher)
        scaling = kd_scaling_from_args(args)
        if kind in ("kd", "paperkd"):
            task = KDTask(args, accelerator, base, student, teacher, kd, scaling)
        else:
            disc = TeacherFeatureDiscriminator.from_teacher(teacher, args.discriminator_layers, 3,
                                                            head_channels=args.discriminator_head_channels)
            task = ASDTask(args, accelerator, base, student, teacher, kd, scaling, disc)
    n = 64 if tiny or kind in PAPER else SAMPLES
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, 16, size, size, generator=g)
    task.latent_cache = LatentCache(mean, torch.full_like(mean, 0.05)).to(device)
    task.text_cache = TextEmbeddingCache(torch.randn(n, text_tokens, text_width, generator=g).to(base.weight_dtype),
                                         torch.randn(n, pooled_width, generator=g).to(base.weight_dtype),
                                         torch.zeros(text_tokens, text_width, dtype=base.weight_dtype),
                                         torch.zeros(pooled_width, dtype=base.weight_dtype)).to(device)
    batches = DeviceIndexBatches(n, batch, 0, device)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra = []
    if kind in ("kd", "paperkd", "asd") and task.feature_kd is not None:
        groups.append({"params": list(task.feature_kd.parameters())})
        extra.append(task.feature_kd)
    if kind == "asd":
        extra.append(task.discriminator)
    subfolder = "transformer" if kind == "teacher" else "unet"
    return prepare_run(args, accelerator, task, student, groups, batches, extra_modules=extra,
                       checkpoint_subfolder=subfolder), student


def _reconstruction_run(kind, size, batch, args, accelerator, tiny):
    import torch
    from diffusers import AutoencoderKL

    from diffusers_snapgen import TinyDecoder, TinyEncoder
    from diffusers_snapgen.training import prepare_run
    from diffusers_snapgen.training.batches import DeviceImageCache, DeviceIndexBatches
    from diffusers_snapgen.training.tasks import AutoencoderTask, TinyDecoderTask, TinyEncoderTask

    device = accelerator.device
    torch.manual_seed(0)
    n = 2048 if not tiny else 32
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    eval_images = images[:4].float() / 127.5 - 1
    cfg = TINY_VAE if tiny else EMOJI_VAE
    tiny_blocks = {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8} if tiny else {}
    if kind in ("decoder", "encoder"):
        vae = AutoencoderKL(**cfg).to(device).requires_grad_(False).eval()
        model_class, task_class = (TinyDecoder, TinyDecoderTask) if kind == "decoder" else (TinyEncoder, TinyEncoderTask)
        model = model_class(latent_channels=16, **tiny_blocks)
        task = task_class(args, accelerator, model, vae, data=(None, eval_images))
    else:
        model = AutoencoderKL(**cfg)
        task = AutoencoderTask(args, accelerator, model, data=(None, eval_images))
    task.image_cache = DeviceImageCache(images).to(device)
    task.build_latent_cache()
    batches = DeviceIndexBatches(n, batch, 0, device)
    run = prepare_run(args, accelerator, task, model, [{"params": list(model.parameters())}], batches,
                      extra_modules=[task.discriminator] if task.discriminator is not None else [],
                      checkpoint_subfolder={"decoder": "decoder", "encoder": "encoder"}.get(kind, "vae"))
    return run, model


def _step_flops(run) -> int:
    """FLOPs of one eager optimizer step (torch's FlopCounterMode with grouped convolution backwards counted right:
    matmuls, convolutions, attention)."""
    from common import flop_counter

    batches = run.batches.epoch(0, 0)
    micro_batches = [next(batches) for _ in range(run.args.gradient_accumulation_steps)]
    with flop_counter() as counter:
        run.program(run.state.global_step, micro_batches)
    return counter.get_total_flops()


def _gpu_busy(run, steps: int, table_path: Path | None = None) -> float | None:
    """Union of CUDA kernel intervals over the wall time of ``steps`` further steps (torch.profiler); with
    ``table_path``, the profiler's table of the ops with the most GPU time is written there."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    start_step = run.state.global_step
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        batches = run.batches.epoch(0, 0)
        for k in range(steps):
            run.program(start_step + k, [next(batches) for _ in range(run.args.gradient_accumulation_steps)])
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    if table_path is not None:
        table_path.write_text(f"{steps} steps\n" + prof.key_averages().table(sort_by="self_device_time_total",
                                                                           row_limit=40, max_name_column_width=70))
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not intervals:
        return None
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = intervals[-1][1] - intervals[0][0]
    return round(min(1.0, busy / max(span, wall_us * 0.5)), 3)


def run_config(name: str, modes, warmup: int, steps: int, tiny: bool, profile_mode: str | None,
               table_dir: Path | None = None, extra=()) -> list[dict]:
    import torch

    from diffusers_snapgen.training import setup_accelerator, train

    kind, size, batch, tiny_size, tiny_batch = CONFIGS[name]
    if tiny:
        size, batch = tiny_size, tiny_batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mode in modes:
            row = {"config": name, "mode": mode, "batch": batch, "size": size}
            try:
                args = _args(kind, batch, size, mode, out, warmup, steps, [*CONFIG_FLAGS.get(name, ()), *extra])
                accelerator = setup_accelerator(args)
                build = _reconstruction_run if kind in RECONSTRUCTION else _denoiser_run
                t0 = time.perf_counter()
                run, model = build(kind, size, batch, args, accelerator, tiny)
                row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
                train(run)
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                records = [json.loads(line) for line in (out / mode / "logs" / "metrics.jsonl").read_text().splitlines()]
                timed = [r for r in records if r["step"] > warmup]
                seconds = sum(r["step_time"] * warmup for r in timed)
                measured = len(timed) * warmup
                row.update(step_ms=round(1e3 * seconds / measured, 2), steps_per_s=round(measured / seconds, 2),
                           samples_per_s=round(measured * batch / seconds, 1),
                           warmup_s=round(records[0]["step_time"] * warmup, 1), step_mode=run.program.mode,
                           loss=round(timed[-1]["loss"], 4))
                if torch.cuda.is_available():
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if run.program.mode == "eager":  # one more step, dispatched op by op: its FLOPs are counted
                    row["tflop_per_step"] = float(f"{_step_flops(run) / 1e12:.4g}")
                if mode == profile_mode:
                    table = None if table_dir is None else table_dir / f"profile_{name}_{mode}.txt"
                    row["gpu_busy"] = _gpu_busy(run, min(steps, 20), table)
                del run, model
            except Exception as e:  # noqa: BLE001 - a failed mode is a row, not a failed benchmark
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def resume_check(name: str, half: int, window: int, tiny: bool, mode: str = "graph", extra=()) -> dict:
    """Trains ``2 * half`` steps in step mode ``mode``, then resumes a new run from the step-``half`` checkpoint: the largest
    relative difference of the windows' mean losses after ``half`` (bitwise on the CPU; kernels with atomics make
    CUDA runs differ in the last bits)."""
    import shutil

    from diffusers_snapgen.training import setup_accelerator, train

    kind, size, batch, tiny_size, tiny_batch = CONFIGS[name]
    if tiny:
        size, batch = tiny_size, tiny_batch
    rows, modes, fallbacks = {}, {}, _FallbackLog()
    with tempfile.TemporaryDirectory() as tmp, fallbacks:
        out = Path(tmp)
        for part in ("uninterrupted", "resumed"):
            flags = ["--checkpointing_steps", str(half), *CONFIG_FLAGS.get(name, ()), *extra] + (
                ["--resume_from_checkpoint", "latest"] if part == "resumed" else [])
            args = _args(kind, batch, size, mode, out, window, 2 * half - window, flags)
            args.output_dir = str(out / part)
            if part == "resumed":
                shutil.copytree(out / "uninterrupted" / f"checkpoint-{half}", out / part / f"checkpoint-{half}")
            accelerator = setup_accelerator(args)
            build = _reconstruction_run if kind in RECONSTRUCTION else _denoiser_run
            run, _ = build(kind, size, batch, args, accelerator, tiny)
            train(run)
            rows[part] = {r["step"]: r["loss"] for r in map(json.loads, (out / part / "logs" / "metrics.jsonl")
                                                            .read_text().splitlines()) if r["step"] > half}
            modes[part] = run.program.mode
            del run
    diffs = [abs(rows["resumed"][k] - v) / max(abs(v), 1e-12) for k, v in rows["uninterrupted"].items()]
    return {"config": name, "resumed_at": half, "steps": 2 * half, "windows": len(diffs), "step_mode": modes["resumed"],
            "step_modes": modes, "fallbacks": fallbacks.messages, "max_rel_loss_diff": max(diffs), "losses": rows}


class _FallbackLog(logging.Handler):
    """Collects the engine's "--cuda_graphs is off: <why>" lines while in use (a fallback is a result, not noise)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if "--cuda_graphs is off" in record.getMessage():
            self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("diffusers_snapgen").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers_snapgen").removeHandler(self)


# ---------------------------------------------------------------------------------------------- driver


def finished_rows(stdout: str) -> list[dict]:
    """The rows a config's process printed as each mode finished (``run_config``), from its output so far."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"config": ')]


def markdown(info: dict) -> str:
    from common import markdown_table

    cudnn = "cuDNN benchmark mode on (--cudnn_benchmark), " if info.get("cudnn_benchmark") else ""
    lines = [f"# Training-step throughput of the engine ({info['device']})", "",
             f"torch {info['torch']}, {'bf16 autocast, ' if info['cuda'] else ''}fp32 master weights, AdamW "
             f"(fused on CUDA), EMA on, {cudnn}synthetic data on the device; {info['steps']} timed steps after "
             f"{info['warmup']} warm-up steps per mode. Written by `benchmarks/bench_train_loop.py` in {info['wall_s']} s.", ""]
    rows = []
    by_config = {}
    for row in info["rows"]:
        by_config.setdefault(row["config"], {})[row["mode"]] = row
    for config, modes in by_config.items():
        eager = modes.get("eager", {}).get("steps_per_s")
        flops = next((row["tflop_per_step"] for row in modes.values() if row.get("tflop_per_step")), None)
        for mode, row in modes.items():
            r = dict(row)
            if eager and row.get("steps_per_s"):
                r["vs_eager"] = round(row["steps_per_s"] / eager, 1)
            if flops and row.get("steps_per_s"):  # the same step computes the same FLOPs in every mode
                r["tflop_per_step"], r["tflops"] = flops, float(f"{flops * row['steps_per_s']:.3g}")
            rows.append(r)
    lines.append(markdown_table(rows, ["config", "mode", "batch", "size", "params_m", "step_ms", "steps_per_s",
                                       "samples_per_s", "vs_eager", "tflop_per_step", "tflops", "gpu_busy",
                                       "warmup_s", "peak_gib", "step_mode", "error"]))
    resume = info.get("resume")
    if resume and "error" not in resume:
        modes = resume.get("step_modes", {})
        lines += ["", f"Resume: `{resume['config']}` trained {resume['steps']} steps "
                  f"({modes.get('uninterrupted', resume['step_mode'])}), and a new run resumed from the "
                  f"step-{resume['resumed_at']} checkpoint ({resume['step_mode']}): the mean losses of its "
                  f"{resume['windows']} logging windows differ from the uninterrupted run's by at most "
                  f"{resume['max_rel_loss_diff']:.2e} (relative)."]
        lines += [f"Fell back to eager steps: {message}" for message in resume.get("fallbacks", [])]
    elif resume:
        lines += ["", f"Resume check failed: {resume['error']}"]
    lines += ["", "`step_mode` is what ran (a mode whose CUDA graph could not be captured says `eager`); `warmup_s` "
              "includes compilation and capture; `gpu_busy` is the union of kernel intervals over wall time in "
              "torch.profiler; `tflop_per_step` counts one eager step's matmul, convolution and attention FLOPs (torch's "
              "FlopCounterMode, with the backward of grouped convolutions counted right) and `tflops` is that count "
              "times steps/s (set it beside the GPU's bf16 peak: the small models' steps run far below it, bound by "
              "something other than arithmetic)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Folder for bench_train_loop_<device>.{json,md}.")
    p.add_argument("--configs", type=str, default=",".join(CONFIGS), help=f"Comma-separated, of {list(CONFIGS)}.")
    p.add_argument("--modes", type=str, default=",".join(MODES), help=f"Comma-separated, of {list(MODES)}.")
    p.add_argument("--warmup", type=int, default=10, help="Warm-up steps per mode (also the timing window).")
    p.add_argument("--steps", type=int, default=50, help="Timed steps per mode (a multiple of --warmup).")
    p.add_argument("--profile_config", type=str, default="student16",
                   help="Comma-separated configs whose GPU busy time is profiled.")
    p.add_argument("--profile_tables", action="store_true",
                   help="Also write the profiler's per-op GPU time table of each profiled config to --out.")
    p.add_argument("--profile_mode", type=str, default="graph")
    p.add_argument("--smoke", action="store_true", help="Tiny models on the CPU (graph modes step eagerly).")
    p.add_argument("--tag", type=str, default=None, help="File stem suffix (default: the device, e.g. h200).")
    p.add_argument("--resume_check", type=str, default=None,
                   help="Also train this config 2 x --resume_steps steps and resume a new run half-way.")
    p.add_argument("--resume_steps", type=int, default=100)
    p.add_argument("--resume_mode", type=str, default="graph", help=f"Step mode of the resume check, of {list(MODES)}.")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which no config starts (a running one is stopped then): rows say 'skipped'.")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="Pass --cudnn_benchmark to every config (cuDNN times its convolution algorithms per shape).")
    p.add_argument("--_one", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in configs:
        if name not in CONFIGS:
            p.error(f"--configs: unknown config {name!r}; choose from {list(CONFIGS)}")
    for flag, mode in [("--modes", m) for m in modes] + [("--resume_mode", args.resume_mode)]:
        if mode not in MODES:
            p.error(f"{flag}: unknown mode {mode!r}; choose from {list(MODES)}")
    if args.warmup < 1 or args.steps < args.warmup or args.steps % args.warmup:
        p.error("--steps must be a positive multiple of --warmup (the timing windows)")
    extra = ["--cudnn_benchmark"] if args.cudnn_benchmark else []
    if args._one is not None:  # the child process of one config
        if args._one.startswith("resume:"):
            rows = [resume_check(args._one[7:], args.resume_steps, args.warmup, args.smoke, args.resume_mode, extra)]
        else:
            profiled = args._one in args.profile_config.split(",")
            rows = run_config(args._one, modes, args.warmup, args.steps, args.smoke,
                              args.profile_mode if profiled else None, args.out if args.profile_tables else None,
                              extra)
        print("ROWS " + json.dumps(rows), flush=True)
        return
    import torch

    if args.resume_check is not None and args.resume_check not in CONFIGS:
        p.error(f"--resume_check: unknown config {args.resume_check!r}")
    if args.resume_check is not None and (args.resume_steps < args.warmup or args.resume_steps % args.warmup):
        p.error("--resume_steps must be a positive multiple of --warmup")
    start = time.perf_counter()
    rows, resume = [], None
    jobs = configs + ([f"resume:{args.resume_check}"] if args.resume_check else [])
    for name in jobs:
        cmd = [sys.executable, __file__, "--out", str(args.out), "--_one", name, "--modes", ",".join(modes),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile_config", args.profile_config,
               "--profile_mode", args.profile_mode, "--resume_steps", str(args.resume_steps),
               "--resume_mode", args.resume_mode] + \
            (["--smoke"] if args.smoke else []) + (["--profile_tables"] if args.profile_tables else []) + extra
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        timeout = None if args.deadline is None else args.deadline - time.time()
        if timeout is not None and timeout < 5:
            skipped = {"config": name.split(":")[-1], "mode": "all", "error": "skipped: time budget"}
            resume, rows = (skipped, rows) if name.startswith("resume:") else (resume, rows + [skipped])
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(cmd, -9, (e.stdout or b"").decode() if isinstance(e.stdout, bytes)
                                               else (e.stdout or ""), "stopped: time budget")
        found = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
        if found and name.startswith("resume:"):
            resume = json.loads(found[-1][5:])[0]
        elif found:
            rows += json.loads(found[-1][5:])
        else:  # stopped or crashed: keep the modes it finished (each printed its row), then say what happened
            done = [] if name.startswith("resume:") else finished_rows(proc.stdout)
            failed = {"config": name, "mode": "rest" if done else "all", "error": (proc.stderr or proc.stdout)[-400:]}
            resume, rows = (failed, rows) if name.startswith("resume:") else (resume, rows + done + [failed])
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    info = {"device": device, "torch": torch.__version__, "cuda": cuda, "warmup": args.warmup, "steps": args.steps,
            "smoke": args.smoke, "cudnn_benchmark": args.cudnn_benchmark,
            "wall_s": round(time.perf_counter() - start, 1), "rows": rows, "resume": resume}
    from common import write_results

    tag = args.tag or ("smoke" if args.smoke else device.split()[-1].lower())
    table = markdown(info)
    write_results(args.out, f"bench_train_loop_{tag}", info, table)
    print(table)


if __name__ == "__main__":
    main()
