"""Training throughput on several GPUs: DDP vs FSDP2, the frozen teacher replicated vs sharded (docs/distributed_training.md).

Every configuration runs the real engine (``prepare_run`` + the engine's step, as ``train_snapgen_kd.py`` /
``train_snapgen.py`` do) under ``accelerate launch --config_file training_examples/configs/<strategy>.yaml
--num_processes N``, on synthetic data held on the device (as with precomputed latents and text embeddings):

    kd1024   paper-size student (SnapGenUNet2DModel defaults, 379M, fp32 master weights, bf16 autocast, AdamW, EMA,
             --gradient_checkpointing) distilled from an SD3.5-Large-shaped teacher (random bf16 weights, 8.06B;
             output KD + the default feature-KD pairs) at 1024² (128² latents), --kd_batch images per GPU
    emoji    the emoji recipe's 14.75M student, flow matching at 128² (16² latents), --emoji_batch images per GPU

Strategies: ``single`` (1 GPU, no wrapper), ``ddp`` (teacher replicated), ``ddp+shard`` (teacher sharded with FSDP2),
``fsdp2`` (student sharded, teacher replicated), ``fsdp2+shard`` (both sharded). Each is timed over --steps steps after
--warmup steps; images/s = global batch x steps / the slowest process's time; scaling efficiency = images/s on N GPUs /
(N x images/s on 1 GPU). Results are written after every configuration (a cut-short run keeps what it measured).

    python benchmarks/bench_multi_gpu.py --gpus 1,2 --out benchmarks/results          # 2 GPUs, ~8 minutes
    python benchmarks/bench_multi_gpu.py --gpus 1,2,4,8 --out benchmarks/results      # 8 GPUs
    python benchmarks/bench_multi_gpu.py --smoke --out /tmp/bench                     # CPU, tiny models, 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

STRATEGIES = ("single", "ddp", "ddp+shard", "fsdp2", "fsdp2+shard")
WORKLOADS = ("kd1024", "emoji")
COLUMNS = ["workload", "strategy", "gpus", "batch_per_gpu", "global_batch", "step_s", "images_per_s",
           "scaling_efficiency", "peak_gib", "status"]


# ---------------------------------------------------------------------------------------------- worker (one launch)


def _worker_args(workload: str, batch: int, teacher_sharding: str, steps: int, data_dir: Path, smoke: bool):
    from diffusers_snapgen.training.args import build_parser, validate_args

    flags = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(data_dir), "--output_dir",
             str(data_dir / "run"), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
             "--checkpointing_steps", "1000000", "--logging_steps", "1000000", "--report_to", "none",
             "--learning_rate", "1e-5", "--lr_warmup_steps", "0", "--use_ema", "--seed", "0",
             "--teacher_model_name_or_path", "unused", "--teacher_sharding", teacher_sharding,
             "--resolution", "1024" if workload == "kd1024" else "128"]
    if not smoke:
        flags += ["--mixed_precision", "bf16"]
        if workload == "kd1024":
            flags.append("--gradient_checkpointing")
    args = validate_args(build_parser(kd=True).parse_args(flags), kd=True)
    args.validation_prompts = None
    return args


def _build_run(workload, args, accelerator, smoke):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from bench_train_loop import EMOJI_STUDENT, TINY_UNET, TINY_VAE  # noqa: E402
    from common import build_student_and_teacher  # noqa: E402

    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.training import feature_kd_from_args, prepare_run
    from diffusers_snapgen.training.batches import DeviceIndexBatches
    from diffusers_snapgen.training.data import LatentCache, TextEmbeddingCache
    from diffusers_snapgen.training.tasks import DenoiserBase, FlowMatchingTask, KDTask, kd_scaling_from_args

    device = accelerator.device
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    torch.manual_seed(0)
    if workload == "kd1024":
        student, teacher = build_student_and_teacher(smoke, device)
        latent, tokens = (8 if smoke else 128), (16 if smoke else 333)
    else:
        student, teacher = SnapGenUNet2DModel(**(TINY_UNET if smoke else EMOJI_STUDENT) | {"sample_size": 16}), None
        latent, tokens = (8 if smoke else 16), 16
    channels = student.config.in_channels
    vae = AutoencoderKL(**TINY_VAE | {"latent_channels": channels}).requires_grad_(False).eval()  # its statistics only
    base = DenoiserBase({"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae}, vae, dtype)
    if teacher is not None:
        kd = feature_kd_from_args(args, student, teacher)
        task = KDTask(args, accelerator, base, student, teacher, kd, kd_scaling_from_args(args))
    else:
        kd, task = None, FlowMatchingTask(args, accelerator, base, student)
    width, pooled_width = student.config.joint_attention_dim, student.config.pooled_projection_dim
    n = max(64, args.train_batch_size * accelerator.num_processes * 4)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, channels, latent, latent, generator=g)
    task.latent_cache = LatentCache(mean, torch.full_like(mean, 0.05)).to(device)
    task.text_cache = TextEmbeddingCache(torch.randn(n, tokens, width, generator=g).to(dtype),
                                         torch.randn(n, pooled_width, generator=g).to(dtype),
                                         torch.zeros(tokens, width, dtype=dtype),
                                         torch.zeros(pooled_width, dtype=dtype)).to(device)
    batches = DeviceIndexBatches(n, args.train_batch_size, 0, device, accelerator.process_index,
                                 accelerator.num_processes)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    extra = []
    if kd is not None:
        groups.append({"params": list(kd.parameters())})
        extra.append(kd)
    return prepare_run(args, accelerator, task, student, groups, batches, extra_modules=extra)


def worker(opts):
    """One configuration, on every process of an ``accelerate launch``: builds the run, warms up, times the steps;
    the main process writes ``opts.result``."""
    import torch

    from diffusers_snapgen.training import setup_accelerator
    from diffusers_snapgen.training.step import StepProgram

    data_dir = Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    batch = opts.kd_batch if opts.workload == "kd1024" else opts.emoji_batch
    teacher = "shard" if opts.strategy.endswith("+shard") else "replicate"
    args = _worker_args(opts.workload, batch, teacher, opts.warmup + opts.steps, data_dir, opts.smoke)
    acc = setup_accelerator(args)
    run = _build_run(opts.workload, args, acc, opts.smoke)
    run.program = StepProgram(run)
    for module in run.trainable:
        module.train()
    device = acc.device
    cuda = device.type == "cuda"
    it = run.batches.epoch(0)

    def step(k):
        group = [next(it) for _ in range(args.gradient_accumulation_steps)]
        run.program(k, group)
        for scheduler in run.schedulers:
            scheduler.step()

    for k in range(opts.warmup):
        step(k)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for k in range(opts.warmup, opts.warmup + opts.steps):
        step(k)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    slowest = acc.gather(torch.tensor([seconds], device=device)).max().item() if acc.num_processes > 1 else seconds
    peak_max = acc.gather(torch.tensor([peak], device=device)).max().item() if acc.num_processes > 1 else peak
    if acc.is_main_process:
        global_batch = batch * acc.num_processes * args.gradient_accumulation_steps
        Path(opts.result).write_text(json.dumps({
            "workload": opts.workload, "strategy": opts.strategy, "gpus": acc.num_processes, "batch_per_gpu": batch,
            "global_batch": global_batch, "step_s": round(slowest / opts.steps, 4),
            "images_per_s": round(global_batch * opts.steps / slowest, 2),
            "peak_gib": round(peak_max, 2) if cuda else None, "distributed_type": str(acc.distributed_type),
            "status": "ok"}))
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(opts, workload, strategy, gpus, result: Path) -> subprocess.CompletedProcess:
    worker_flags = ["--worker", "--workload", workload, "--strategy", strategy, "--result", str(result),
                    "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--kd_batch", str(opts.kd_batch),
                    "--emoji_batch", str(opts.emoji_batch)] + (["--smoke"] if opts.smoke else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if opts.smoke:
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if gpus == 1:
        cmd = [sys.executable, __file__, *worker_flags]
    else:
        config = "fsdp2.yaml" if strategy.startswith("fsdp2") else "ddp.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "training_examples" / "configs" / config), "--num_processes", str(gpus),
               "--main_process_port", str(_port()), "--mixed_precision", "no" if opts.smoke else "bf16", __file__,
               *worker_flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=opts.timeout_s, cwd=str(ROOT))


def _plan(opts) -> list[tuple[str, str, int]]:
    plan = []
    for workload in opts.workloads:
        for gpus in opts.gpus:
            for strategy in opts.strategies:
                if (gpus == 1) != (strategy == "single"):
                    continue
                if workload == "emoji" and strategy.endswith("+shard"):
                    continue  # no teacher
                if opts.smoke and strategy.startswith("fsdp2"):
                    continue  # accelerate turns FSDP on for GPUs only (on CPU the config runs as DDP)
                plan.append((workload, strategy, gpus))
    return plan


def _efficiency(rows: list[dict]):
    for row in rows:
        base = next((r for r in rows if r["workload"] == row["workload"] and r["gpus"] == 1 and r["status"] == "ok"),
                    None)
        if row["status"] == "ok" and base is not None:
            row["scaling_efficiency"] = round(row["images_per_s"] / (row["gpus"] * base["images_per_s"]), 3)


def _write(opts, rows, info):
    from common import markdown_table, write_results

    _efficiency(rows)
    table = markdown_table(rows, COLUMNS)
    payload = {**info, "rows": rows}
    md = (f"# Multi-GPU training throughput ({info['device']})\n\n{info['note']}\n\n{table}\n\n"
          f"Command: `{info['command']}`\n")
    write_results(Path(opts.out), f"bench_multi_gpu_{opts.tag}", payload, md)
    return table


def parent(opts):
    import torch

    from common import device_name

    device = torch.device("cuda" if torch.cuda.is_available() and not opts.smoke else "cpu")
    available = torch.cuda.device_count() if device.type == "cuda" else 2
    opts.gpus = [g for g in opts.gpus if g <= available]
    if device.type != "cuda" and not opts.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke (CPU, tiny models) or on a GPU machine.")
    info = {"device": f"{available} x {device_name(device)}", "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/bench_multi_gpu.py", *sys.argv[1:]]),
            "note": ("Random weights, synthetic latents/embeddings on the device; bf16 autocast, AdamW, EMA; KD with "
                     "gradient checkpointing. Smoke runs use tiny models on CPU processes: their numbers say nothing "
                     "about GPUs." if not opts.smoke else "SMOKE: tiny models on CPU processes (gloo); not a measurement.")}
    rows = []
    for workload, strategy, gpus in _plan(opts):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp, "result.json")
            try:
                proc = _launch(opts, workload, strategy, gpus, result)
                if result.is_file():
                    row = json.loads(result.read_text())
                else:
                    errors = [line for line in (proc.stderr + proc.stdout).splitlines() if "Error" in line]
                    why = "out of memory" if "OutOfMemory" in proc.stderr else \
                        f"failed: {(errors or ['no output'])[-1].strip()[:160]}"
                    row = {"workload": workload, "strategy": strategy, "gpus": gpus, "status": why}
                    (Path(opts.out) / f"bench_multi_gpu_{opts.tag}_{workload}_{strategy}_{gpus}.log").write_text(
                        proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
            except subprocess.TimeoutExpired:
                row = {"workload": workload, "strategy": strategy, "gpus": gpus, "status": "timed out"}
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{workload:7s} {strategy:12s} x{gpus}: {row.get('images_per_s', '-')} images/s "
              f"({row['status']}, {row['wall_s']} s)", flush=True)
        table = _write(opts, rows, info)
    print("\n" + table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="Process counts to run (those above the GPUs present are skipped).")
    p.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    p.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    p.add_argument("--kd_batch", type=int, default=4, help="KD images per GPU at 1024².")
    p.add_argument("--emoji_batch", type=int, default=128, help="Emoji-student images per GPU.")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout_s", type=int, default=420, help="Per configuration (launch, build, warm-up, timing).")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, 1 and 2 CPU processes.")
    p.add_argument("--out", type=str, default="benchmarks/results")
    p.add_argument("--tag", type=str, default=None,
                   help="Result file suffix (default: h200 on CUDA, smoke on CPU, + _<workload> when only one runs).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--strategy", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=str, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    for name, allowed in (("strategies", STRATEGIES), ("workloads", WORKLOADS)):
        bad = [v for v in getattr(opts, name) if v not in allowed]
        if bad:
            raise ValueError(f"--{name} {bad} unknown: choose from {list(allowed)}.")
    if any(g < 1 for g in opts.gpus) or opts.steps < 1 or opts.warmup < 0 or opts.kd_batch < 1 or opts.emoji_batch < 1:
        raise ValueError("--gpus, --steps, --kd_batch and --emoji_batch must be >= 1, --warmup >= 0.")
    if opts.worker:
        worker(opts)
        return
    if opts.tag is None:
        opts.tag = ("smoke" if opts.smoke else "h200") + ("" if len(opts.workloads) > 1 else f"_{opts.workloads[0]}")
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    if opts.smoke:
        opts.steps, opts.warmup = min(opts.steps, 2), min(opts.warmup, 1)
        opts.kd_batch, opts.emoji_batch = min(opts.kd_batch, 2), min(opts.emoji_batch, 4)
    parent(opts)


if __name__ == "__main__":
    main()
