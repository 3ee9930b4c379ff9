"""Training cost of adversarial step distillation and of tiny-decoder training on one GPU.

ASD: the paper-size student (``SnapGenUNet2DModel()`` defaults, fp32 weights, bf16 autocast, AdamW) with feature-KD
projectors, an SD3.5-Large-shaped ``SD3Transformer2DModel`` teacher (random bf16 weights, frozen; 38 layers, 38 heads
x 64, joint_attention_dim 4096, pooled 2048, patch 2, qk_norm rms_norm) and the LADD-style discriminator heads on 4 of
its blocks. One ASD iteration = the teacher run along its 4-step schedule from the student's noise level (KD target)
+ student forward/backward + discriminator step (teacher features of real and fake, heads' backward, AdamW) + the
generator's adversarial loss backpropagated through the frozen teacher - exactly ``AdversarialStepDistillation`` as
``train_snapgen_asd.py`` runs it. The student's 4 grid points cost 4, 3, 2 and 1 teacher forwards: each timing covers
one iteration at every grid point and reports the mean. Text embeddings (333 x 4096) and latents are random
(precomputed, as with ``--cache_text_embeddings --cache_latents``). Rows: batch 1 with and without gradient
checkpointing (student and teacher), then the largest batch that fits (doubling, checkpointing on).

Tiny decoder: frozen encoder of an SD3-config ``AutoencoderKL`` (bf16) + ``TinyDecoder()`` (paper config, fp32, bf16
autocast) + patch discriminator, MSE + hinge GAN (LPIPS needs weights from the web: not timed), on 256² patches.

    python benchmarks/bench_asd.py --out benchmarks/results      # CUDA, about 5 minutes
    python benchmarks/bench_asd.py --tiny --out /tmp/bench       # CPU smoke test, tiny models
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
from common import (
    build_student_and_teacher,
    device_name,
    markdown_table,
    peak_memory_gib,
    release_memory,
    reset_peak_memory,
    synchronize,
    time_ms,
    write_results,
)

from diffusers_snapgen.training import (
    FlowMatchingBatch,
    MultiLevelKD,
    TimestepAwareScaling,
    add_flow_noise,
    default_sd3_snapgen_layer_pairs,
    denoiser_forward,
    flow_matching_target,
    step_generator,
)
from diffusers_snapgen.training.adversarial import set_requires_grad
from diffusers_snapgen.training.asd import AdversarialStepDistillation, few_step_sigmas, rollout_steps
from diffusers_snapgen.training.reconstruction import (
    DecoderLosses,
    encode_for_decoder,
)
from diffusers_snapgen.training.discriminator import (
    PatchDiscriminator,
    TeacherFeatureDiscriminator,
)

SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
               shift_factor=0.0609)
TEXT_TOKENS = 333  # 77 CLIP + 256 T5
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _params_m(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


class ASDIteration:
    """One ASD iteration (discriminator step + generator step) on random latents/embeddings at a given grid point."""

    def __init__(self, student, teacher, device, head_channels: int):
        self.student, self.teacher, self.device = student, teacher, device
        self.kd = MultiLevelKD.from_models(student, teacher, default_sd3_snapgen_layer_pairs(
            teacher.config.num_layers, student)).to(device)
        self.kd.attach(student, teacher)
        self.disc = TeacherFeatureDiscriminator.from_teacher(teacher, head_channels=head_channels).to(device)
        self.g_opt = torch.optim.AdamW([*student.parameters(), *self.kd.parameters()], lr=1e-5)
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=1e-5, betas=(0.0, 0.99))
        self.grid = few_step_sigmas(None, 4)
        self.objective = AdversarialStepDistillation(teacher, self.disc, self.d_opt, scaling=TimestepAwareScaling(),
                                                     feature_kd=self.kd, teacher_sigmas=self.grid)
        self.autocast = device.type == "cuda"
        self.calls = 0

    def set_checkpointing(self, on: bool):
        for model in (self.student, self.teacher):
            model.enable_gradient_checkpointing() if on else model.disable_gradient_checkpointing()

    def __call__(self, batch: int, resolution: int, grid_index: int = 0) -> int:
        cfg, dev = self.student.config, self.device
        g = step_generator(0, self.calls)
        self.calls += 1
        side = resolution // 8
        latents = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(dev)
        embeds = torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dev)
        pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dev)
        noise = torch.randn(latents.shape, generator=g).to(dev)
        sigmas = torch.full((batch,), float(self.grid[grid_index]), device=dev)
        fm = FlowMatchingBatch(latents, noise, add_flow_noise(latents, noise, sigmas),
                               flow_matching_target(latents, noise), sigmas, sigmas * 1000)
        self.kd.clear()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = denoiser_forward(self.student, fm.noisy_latents, fm.timesteps, embeds, pooled)
            loss, _, _ = self.objective.losses(fm, pred, embeds, pooled, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.g_opt.step()
        self.objective.discriminator_step()
        self.g_opt.zero_grad(set_to_none=True)
        self.kd.clear()
        return rollout_steps(self.grid[grid_index:grid_index + 1], self.grid)

    def reset(self):
        self.g_opt.zero_grad(set_to_none=True)
        self.d_opt.zero_grad(set_to_none=True)
        self.kd.clear()
        release_memory(self.device)


def _fits(step: ASDIteration, batch: int, resolution: int) -> bool:
    try:
        step(batch, resolution, 0)
        synchronize(step.device)
        ok = True
    except OOM:
        ok = False
    if not ok:  # outside the except block, so the traceback no longer pins the step's tensors
        step.reset()
    return ok


def time_cycle(step: ASDIteration, batch: int, resolution: int, iters: int, warmup: int) -> dict:
    """Mean time of one iteration over the 4 grid points (one iteration each), median of ``iters`` cycles."""
    forwards = []

    def cycle():
        forwards.clear()
        for i in range(len(step.grid)):
            forwards.append(step(batch, resolution, i))

    reset_peak_memory(step.device)
    ms = time_ms(cycle, step.device, warmup=warmup, iters=iters) / len(step.grid)
    return {"batch": batch, "iteration_s": round(ms / 1e3, 3), "images_per_s": round(batch / (ms / 1e3), 3),
            "peak_gib": peak_memory_gib(step.device), "teacher_forwards_per_grid_point": list(forwards)}


def run_asd(args, device, info, deadline) -> list[dict]:
    student, teacher = build_student_and_teacher(args.tiny, device)
    step = ASDIteration(student, teacher, device, head_channels=16 if args.tiny else 256)
    info.update(student_params_m=_params_m(student), teacher_params_m=_params_m(teacher),
                discriminator_params_m=_params_m(step.disc), projector_params_m=_params_m(step.kd),
                discriminator_layers=step.disc.layers, kd_pairs=[f"{p.student}<-{p.teacher}" for p in step.kd.pairs],
                grid_sigmas=[round(float(s), 4) for s in step.grid])
    res, rows = args.resolution, []
    for checkpointing in (False, True):
        step.set_checkpointing(checkpointing)
        row = {"resolution": res, "gradient_checkpointing": checkpointing}
        if time.perf_counter() > deadline:
            rows.append({**row, "skipped": "time budget"})
            continue
        if not _fits(step, 1, res):
            rows.append({**row, "batch": 1, "oom": True})
            continue
        row.update(time_cycle(step, 1, res, args.iters, warmup=0))  # _fits was the warm-up
        rows.append(row)
        print(json.dumps(row), flush=True)
    # largest batch (checkpointing on): double while it fits, within the cap and the time budget
    step.set_checkpointing(True)
    largest, batch, limited = 1, 2, None
    while True:
        if batch > args.max_batch:
            limited = "max_batch"
            break
        if time.perf_counter() > deadline - 60:
            limited = "time"
            break
        if not _fits(step, batch, res):
            break
        largest, batch = batch, batch * 2
    if largest > 1 and time.perf_counter() < deadline - 30:
        row = {"resolution": res, "gradient_checkpointing": True, "largest_batch": True, "limited_by": limited}
        row.update(time_cycle(step, largest, res, 1, warmup=0))
        rows.append(row)
        print(json.dumps(row), flush=True)
    else:
        rows.append({"resolution": res, "gradient_checkpointing": True, "largest_batch": True, "batch": largest,
                     "limited_by": limited, "skipped": "not timed (time budget or batch 1 is the largest)"})
    del step, student, teacher
    release_memory(device)
    return rows


def run_decoder(args, device, info) -> list[dict]:
    from diffusers import AutoencoderKL

    from diffusers_snapgen import TinyDecoder

    torch.manual_seed(0)
    if args.tiny:
        from diffusers_snapgen.testing import tiny_autoencoder_kl, tiny_decoder

        vae, decoder = tiny_autoencoder_kl(latent_channels=16), tiny_decoder(latent_channels=16)
        disc = PatchDiscriminator(3, 8, 2, norm_num_groups=4)
    else:
        vae, decoder, disc = AutoencoderKL(**SD3_VAE), TinyDecoder(), PatchDiscriminator()
    vae = vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False).eval()
    decoder, disc = decoder.to(device).train(), disc.to(device).train()
    info.update(decoder_params_m=_params_m(decoder), patch_discriminator_params_m=_params_m(disc),
                vae_encoder_params_m=_params_m(vae.encoder))
    losses = DecoderLosses(mse_weight=1.0, lpips_weight=0.0, gan_weight=0.1)
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    autocast = device.type == "cuda"
    rows = []
    for batch in args.decoder_batches:
        x = (torch.rand(batch, 3, args.patch, args.patch, generator=torch.Generator().manual_seed(batch)) * 2 - 1).to(device)

        def train_step(x=x):
            z = encode_for_decoder(vae, x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                recon = decoder(z).sample
                set_requires_grad(disc, False)
                loss, _ = losses.generator(recon, x, disc)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                set_requires_grad(disc, True)
                d_loss, _ = losses.discriminator(x, recon, disc)
                d_loss.backward()
                d_opt.step()
                d_opt.zero_grad(set_to_none=True)

        row = {"patch": args.patch, "batch": batch}
        try:
            reset_peak_memory(device)
            ms = time_ms(train_step, device, warmup=2, iters=args.decoder_iters)
            encode_ms = time_ms(lambda x=x: encode_for_decoder(vae, x), device, warmup=1, iters=args.decoder_iters)
            row.update(step_ms=round(ms, 2), images_per_s=round(batch / (ms / 1e3), 1), encoder_ms=round(encode_ms, 2),
                       peak_gib=peak_memory_gib(device))
        except OOM:
            row["oom"] = True
        opt.zero_grad(set_to_none=True)
        d_opt.zero_grad(set_to_none=True)
        release_memory(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(info: dict) -> str:
    forwards = info["asd_rows"][0].get("teacher_forwards_per_grid_point", "-")
    asd_rows = []
    for r in info["asd_rows"]:
        batch = f"{r.get('batch', '-')}" + (" (largest)" if r.get("largest_batch") else "")
        if r.get("limited_by"):
            batch += f", capped: {r['limited_by']}"
        note = r.get("skipped") or ("out of memory" if r.get("oom") else "")
        asd_rows.append({"resolution": f"{r['resolution']}²", "grad. ckpt": r["gradient_checkpointing"], "batch": batch,
                         "s / iteration": r.get("iteration_s"), "images/s": r.get("images_per_s"),
                         "peak GiB": r.get("peak_gib"), "note": note})
    dec_rows = [{"patch": f"{r['patch']}²", "batch": r["batch"], "step ms": r.get("step_ms"),
                 "images/s": r.get("images_per_s"), "encoder ms": r.get("encoder_ms"), "peak GiB": r.get("peak_gib"),
                 "note": "out of memory" if r.get("oom") else ""} for r in info["decoder_rows"]]
    return "\n".join([
        f"# ASD and tiny-decoder training on {info['device']} (torch {info['torch']}"
        f"{', TINY models' if info['tiny'] else ''})",
        "",
        f"ASD iteration (discriminator step + generator step): student {info['student_params_m']}M (fp32, bf16 autocast, "
        f"AdamW), projectors {info['projector_params_m']}M, teacher {info['teacher_params_m']}M (bf16, frozen; run along "
        f"its 4-step schedule, forwards per student grid point {forwards}), "
        f"discriminator heads {info['discriminator_params_m']}M on {', '.join(info['discriminator_layers'])}. "
        f"Mean over the student's 4 grid points {info['grid_sigmas']}.",
        "",
        markdown_table(asd_rows, ["resolution", "grad. ckpt", "batch", "s / iteration", "images/s", "peak GiB", "note"]),
        "",
        f"Tiny-decoder training step: frozen AutoencoderKL encoder {info['vae_encoder_params_m']}M (bf16 on GPU), "
        f"TinyDecoder {info['decoder_params_m']}M, patch discriminator {info['patch_discriminator_params_m']}M; "
        "MSE + hinge GAN, both updates (LPIPS not timed: its weights are not available offline).",
        "",
        markdown_table(dec_rows, ["patch", "batch", "step ms", "images/s", "encoder ms", "peak GiB", "note"]),
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_asd.json / bench_asd.md")
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="ASD image size (default 1024; tiny 32)")
    p.add_argument("--max_batch", type=int, default=None, help="cap of the batch doubling (default 64; tiny 2)")
    p.add_argument("--iters", type=int, default=None, help="timed cycles of 4 iterations per row (default 2; tiny 1)")
    p.add_argument("--patch", type=int, default=None, help="decoder training patch (default 256; tiny 32)")
    p.add_argument("--decoder_batches", type=int, nargs="+", default=None, help="default 32 64 (tiny 2)")
    p.add_argument("--decoder_iters", type=int, default=None, help="timed decoder steps (default 10; tiny 1)")
    p.add_argument("--time_budget_s", type=float, default=240.0, help="ASD rows after this are skipped")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and args.device == "cpu":
        p.error("the paper-size benchmark needs a CUDA GPU; use --tiny for a CPU smoke test")
    args.resolution = args.resolution or (32 if args.tiny else 1024)
    if args.resolution % 32:
        p.error(f"--resolution must be a multiple of 32, got {args.resolution}")
    args.max_batch = args.max_batch or (2 if args.tiny else 64)
    args.iters = args.iters or (1 if args.tiny else 2)
    args.patch = args.patch or (32 if args.tiny else 256)
    args.decoder_batches = args.decoder_batches or ([2] if args.tiny else [32, 64])
    args.decoder_iters = args.decoder_iters or (1 if args.tiny else 10)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    info = {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
            "platform": platform.platform()}
    info["asd_rows"] = run_asd(args, device, info, start + args.time_budget_s)
    info["decoder_rows"] = run_decoder(args, device, info)
    info["wall_s"] = round(time.perf_counter() - start, 1)
    table = markdown(info)
    write_results(args.out, "bench_asd", info, table)
    print(table)


if __name__ == "__main__":
    main()
