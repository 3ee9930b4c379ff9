"""Training-step cost of SnapGen multi-level KD on one GPU.

The paper-size student (``SnapGenUNet2DModel()`` defaults, ~379M parameters, fp32 master weights, bf16 autocast,
AdamW) is distilled from an SD3.5-Large-shaped ``SD3Transformer2DModel`` (random weights, bf16, frozen; config of
``stabilityai/stable-diffusion-3.5-large/transformer/config.json``: 38 layers, 38 heads x 64 = 2432 wide,
joint_attention_dim 4096, pooled 2048, patch 2, pos_embed_max_size 192, qk_norm rms_norm; 8.06B parameters).
One step = teacher forward + student forward/backward + feature-KD projectors (default SD3 -> SnapGen layer pairs)
+ timestep-aware-scaled losses + AdamW step + EMA update, exactly the loss of ``train_snapgen_kd.py``; text embeddings
(333 x 4096 tokens, as SD3.5's CLIP-L + CLIP-G + T5) and latents are random (precomputed, as with
``--cache_text_embeddings --cache_latents``), so text encoders and VAE are not timed.

For each resolution (512², 1024²) and gradient checkpointing off/on it finds the largest batch per GPU (peak memory
at batch 1 and 2 extrapolated linearly, then verified with one real step), then times steps (step time, images/s,
peak memory) at the largest batch whose step takes about --step_time_s, and at batch 4.

    python benchmarks/bench_training.py --out benchmarks/results            # CUDA, ~4-6 minutes
    python benchmarks/bench_training.py --tiny --out /tmp/bench             # CPU smoke test, tiny models
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_student_and_teacher, release_memory, synchronize  # noqa: E402

from diffusers_snapgen.training import (
    AlphaSchedule,
    FlowMatchingSampler,
    MultiLevelKD,
    TimestepAwareScaling,
    default_sd3_snapgen_layer_pairs,
    denoiser_forward,
    flow_matching_loss,
    output_kd_loss,
    prepare_flow_matching_batch,
    step_generator,
)

TEXT_TOKENS = 333  # 77 CLIP + 256 T5


class KDStep:
    """One KD optimisation step on random latents/embeddings, built from diffusers_snapgen.training."""

    def __init__(self, student, teacher, device, vae_factor=8):
        self.student, self.teacher, self.device, self.vae_factor = student, teacher, device, vae_factor
        pairs = default_sd3_snapgen_layer_pairs(teacher.config.num_layers, student)
        self.kd = MultiLevelKD.from_models(student, teacher, pairs).to(device)
        self.kd.attach(student, teacher)
        self.scaling = TimestepAwareScaling(AlphaSchedule("logit_normal"))
        self.sampler = FlowMatchingSampler(shift=3.0)
        params = [p for p in student.parameters()] + list(self.kd.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(student.parameters(), decay=0.9999, foreach=True)  # --use_ema, as in the recipe
        self.autocast = device.type == "cuda"
        self.step_index = 0

    def __call__(self, batch: int, resolution: int):
        cfg = self.student.config
        latent = resolution // self.vae_factor
        g = step_generator(0, self.step_index)  # noise and timesteps: CPU generator, as in the training loop
        dev_g = torch.Generator(self.device).manual_seed(self.step_index)
        self.step_index += 1
        # stand-ins for cached latents and text embeddings (bf16, as --cache_text_embeddings stores them)
        kw = dict(generator=dev_g, device=self.device)
        latents = torch.randn(batch, cfg.in_channels, latent, latent, **kw)
        embeds = torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, dtype=torch.bfloat16, **kw)
        pooled = torch.randn(batch, cfg.pooled_projection_dim, dtype=torch.bfloat16, **kw)
        self.kd.clear()
        fm = prepare_flow_matching_batch(latents, self.sampler, g)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = denoiser_forward(self.student, fm.noisy_latents, fm.timesteps, embeds.float(), pooled.float())
            with torch.no_grad():
                bf = torch.bfloat16
                t_pred = denoiser_forward(self.teacher, fm.noisy_latents.to(bf), fm.timesteps, embeds.to(bf),
                                          pooled.to(bf))
            task = flow_matching_loss(pred, fm.target, fm.sigmas)
            loss = self.scaling(task, output_kd_loss(pred, t_pred), fm.sigmas) + self.scaling(task, self.kd(), fm.sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.student.parameters())
        self.kd.clear()
        return loss.detach()


def try_step(step: KDStep, batch: int, resolution: int) -> bool:
    """True if one step at ``batch`` fits in memory."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    fits = True
    try:
        step(batch, resolution)
        synchronize(step.device)
    except oom:
        fits = False
    if not fits:  # outside the except block, so the traceback no longer pins the step's tensors
        step.optimizer.zero_grad(set_to_none=True)
        step.kd.clear()
        release_memory(step.device)
    return fits


def _peak_step(step: KDStep, batch: int, resolution: int) -> tuple[float, float]:
    """(seconds, peak allocated bytes) of one step."""
    device = step.device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step(batch, resolution)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - t0, float(peak)


def largest_batch(step: KDStep, resolution: int, args) -> dict:
    """Largest batch per GPU: peak memory is linear in the batch (measured at 1 and 2), the predicted largest batch
    is verified with a real step (shrinking by 15% on out-of-memory). Probes are capped by ``--max_batch`` and by
    ``--probe_time_s`` (estimated from the small steps), in which case the result is a lower bound."""
    device = step.device
    _peak_step(step, 1, resolution)  # warm-up at this resolution
    t1, m1 = _peak_step(step, 1, resolution)
    t2, m2 = _peak_step(step, 2, resolution)
    per_image_s = max(t2 - t1, t2 / 2, 1e-4)
    out = {"per_image_s_small_batch": round(per_image_s, 4)}
    predicted = args.max_batch
    if device.type == "cuda":
        per_sample = max(m2 - m1, 1.0)
        base = m1 - per_sample
        capacity = torch.cuda.mem_get_info(device)[1] * args.memory_fraction
        predicted = max(1, int((capacity - base) // per_sample))
        out.update(base_gib=round(base / 2**30, 2), per_sample_gib=round(per_sample / 2**30, 3),
                   predicted_max_batch=predicted)
    by_time = max(2, int(args.probe_time_s / per_image_s))
    candidate = min(predicted, args.max_batch, by_time)
    if device.type == "cuda" and candidate == predicted:
        out["limited_by"] = None
    else:  # without a memory model (CPU) the cap always decides
        out["limited_by"] = "max_batch" if candidate == args.max_batch else "time"
    good = 0
    for _ in range(6):
        if candidate < 1:
            break
        if try_step(step, candidate, resolution):
            good = candidate
            break
        out["limited_by"] = None  # memory decides
        candidate = int(candidate * 0.85)
    out["largest_batch"] = good
    out["search_limited"] = out["limited_by"] is not None
    return out


def time_steps(step: KDStep, batch: int, resolution: int, iters: int, warmup: int = 1) -> dict:
    device = step.device
    for _ in range(warmup):
        step(batch, resolution)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(batch, resolution)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    out = {"batch": batch, "step_s": round(median, 4), "images_per_s": round(batch / median, 2)}
    if device.type == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    start = time.perf_counter()
    deadline = start + args.time_budget_s
    student, teacher = build_student_and_teacher(args.tiny, device)
    step = KDStep(student, teacher, device)
    step(1, args.resolutions[0])  # creates optimizer state before any measurement
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpu_memory_gib": round(torch.cuda.mem_get_info(device)[1] / 2**30, 1) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
        "teacher_params_m": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
        "projector_params_m": round(sum(p.numel() for p in step.kd.parameters()) / 1e6, 2),
        "kd_pairs": [f"{p.student}<-{p.teacher}" for p in step.kd.pairs],
        "text_tokens": TEXT_TOKENS,
        "text_width": student.config.joint_attention_dim,
        "tiny": args.tiny,
        "setup_s": round(time.perf_counter() - start, 1),
        "rows": [],
    }
    for resolution in args.resolutions:
        for checkpointing in (False, True):
            if checkpointing:
                student.enable_gradient_checkpointing()
            else:
                student.disable_gradient_checkpointing()
            row = {"resolution": resolution, "gradient_checkpointing": checkpointing}
            if time.perf_counter() > deadline:
                row["skipped"] = "time budget"
                info["rows"].append(row)
                continue
            row.update(largest_batch(step, resolution, args))
            best = row["largest_batch"]
            if best:
                timing_batch = min(best, max(1, int(args.step_time_s / row["per_image_s_small_batch"])))
                row.update(time_steps(step, timing_batch, resolution, args.iters))
                if args.ref_batch and args.ref_batch < timing_batch:
                    row["ref"] = time_steps(step, args.ref_batch, resolution, args.iters)
            info["rows"].append(row)
            release_memory(device)
            print(json.dumps(row), flush=True)
    info["wall_s"] = round(time.perf_counter() - start, 1)
    return info


def markdown(info: dict) -> str:
    lines = [
        f"KD training step on {info['device']} ({info.get('gpu_memory_gib')} GiB), torch {info['torch']}: student "
        f"{info['student_params_m']}M (fp32 weights, bf16 autocast, AdamW, EMA), teacher {info['teacher_params_m']}M (bf16, "
        f"frozen), projectors {info['projector_params_m']}M; text embeddings {info['text_tokens']} x {info['text_width']} and latents "
        "precomputed (text encoders and VAE not timed).",
        "",
        "| resolution | grad. ckpt | largest batch/GPU | timed batch | step s | images/s | peak alloc GiB | batch 4: step s, images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['resolution']}² | {r['gradient_checkpointing']} | skipped ({r['skipped']}) | | | | | |")
            continue
        lb = f"{r['largest_batch']}" + (f"+ ({r['limited_by']}; memory model: {r.get('predicted_max_batch', '?')})"
                                          if r.get("search_limited") else "")
        ref = r.get("ref")
        ref_s = f"{ref['step_s']}, {ref['images_per_s']}" if ref else "-"
        lines.append(f"| {r['resolution']}² | {r['gradient_checkpointing']} | {lb} | {r.get('batch', '-')} | "
                     f"{r.get('step_s', '-')} | {r.get('images_per_s', '-')} | {r.get('peak_allocated_gib', '-')} | {ref_s} |")
    lines += [
        "",
        "Largest batch: peak memory measured at batch 1 and 2, extrapolated linearly to the GPU's memory "
        "(x --memory_fraction) and verified with one real step (-15% per out-of-memory). `+`: a lower bound, the probe "
        "was capped by --max_batch or by --probe_time_s. The timed batch is the largest batch whose step is expected to "
        "take <= --step_time_s.",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_training.json / .md")
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 512 1024 (tiny: 32 64)")
    p.add_argument("--max_batch", type=int, default=None, help="cap of the batch search (default 1024; tiny 4)")
    p.add_argument("--ref_batch", type=int, default=None, help="also time this batch (default 4; tiny 0 = off)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per row (default 3; tiny 1)")
    p.add_argument("--memory_fraction", type=float, default=0.95, help="usable fraction of GPU memory")
    p.add_argument("--probe_time_s", type=float, default=40.0, help="longest allowed probe step (estimated)")
    p.add_argument("--step_time_s", type=float, default=6.0, help="target duration of the timed steps")
    p.add_argument("--time_budget_s", type=float, default=300.0, help="skip the remaining rows after this many seconds")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and args.device == "cpu":
        p.error("the paper-size benchmark needs a CUDA GPU; use --tiny for a CPU smoke test")
    args.resolutions = args.resolutions or ([32, 64] if args.tiny else [512, 1024])
    if any(r <= 0 or r % 32 for r in args.resolutions):
        p.error(f"--resolutions must be positive multiples of 32, got {args.resolutions}")
    args.max_batch = args.max_batch or (4 if args.tiny else 1024)
    args.ref_batch = (0 if args.tiny else 4) if args.ref_batch is None else args.ref_batch
    args.iters = args.iters or (1 if args.tiny else 3)
    info = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_training.json").write_text(json.dumps(info, indent=2) + "\n")
    table = markdown(info)
    (args.out / "bench_training.md").write_text(table + "\n")
    print(table)
    return info


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
