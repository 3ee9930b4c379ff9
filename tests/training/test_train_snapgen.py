"""End-to-end runs of training_examples/train_snapgen.py and train_snapgen_kd.py (subprocesses, CPU, tiny models).

A reference pretraining run and a KD run (each built once per session, shared by the xdist workers through a file
lock) are compared with: the initial weights (the task loss falls: it learns); a pretraining run SIGKILLed at a
random moment, in training or while saving, and resumed (completes, bitwise identical to the reference); a KD run
stopped half-way and resumed (bitwise identical student, EMA and projectors); each other (with KD the student's
velocity error to the fixed teacher falls below the reference's).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ROOT,
    assert_same_weights,
    load_weights,
    make_denoiser_assets,
    read_metrics,
    run_once,
    run_script,
    script_env,
    session_folder,
)

PRETRAIN = ROOT / "training_examples" / "train_snapgen.py"
KD = ROOT / "training_examples" / "train_snapgen_kd.py"
STEPS = 20


def _args(assets, out, steps=STEPS, *extra):
    return [
        "--pretrained_model_name_or_path", str(assets / "base"), "--train_data_dir", str(assets / "data"),
        "--resolution", "32", "--center_crop", "--random_flip", "--train_batch_size", "4",
        "--learning_rate", "1e-2", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
        "--use_ema", "--max_train_steps", str(steps), "--checkpointing_steps", "5", "--checkpoints_total_limit", "2",
        "--report_to", "none", "--logging_steps", "1", "--seed", "7", "--logging_steps", "1", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id, testrun_uid):
    """Assets and the reference pretraining run, built once per test session even across xdist workers."""
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-train")
    run_once(root, "assets", lambda: make_denoiser_assets(root))
    run_once(root, "reference", lambda: run_script(
        PRETRAIN, _args(root, root / "ref", STEPS, "--validation_prompt", "a red circle", "--validation_steps", "10",
                        "--validation_num_inference_steps", "2", "--validation_guidance_scale", "1.0"), root / "hf"))
    return root


def _kd_args(shared, out, steps, *extra):
    # the reference run's arguments plus the teacher (bf16 by default) and precomputed latents / text embeddings
    return _args(shared, out, steps, "--teacher_model_name_or_path", str(shared / "teacher"), "--cache_latents",
                 "--cache_text_embeddings", "--gradient_accumulation_steps", "2", *extra)


@pytest.fixture(scope="session")
def kd_run(shared):
    run_once(shared, "kd", lambda: run_script(KD, _kd_args(shared, shared / "kd", STEPS // 2), shared / "hf"))
    return shared / "kd"


@pytest.fixture(scope="session")
def evaluator(shared):
    """Task loss and velocity error to the teacher of a UNet on a fixed batch (all 8 images, 4 noise draws)."""
    from diffusers import SD3Transformer2DModel

    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.training import (
        FlowMatchingSampler, ImageCaptionDataset, build_pipeline, denoiser_forward, encode_captions,
        flow_matching_loss, load_base_components, load_image_caption_dataset, output_kd_loss,
        prepare_flow_matching_batch, scale_latents, step_generator,
    )

    comps = load_base_components(str(shared / "base"))
    pipe = build_pipeline(comps, SnapGenUNet2DModel.from_pretrained(str(shared / "base"), subfolder="unet"))
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=str(shared / "data"),
                                                        cache_dir=str(shared / "hf-eval")), resolution=32, center_crop=True)
    with torch.no_grad():
        pixels = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
        latents = scale_latents(comps["vae"], comps["vae"].encode(pixels).latent_dist.mean)
        embeds, pooled = encode_captions(pipe, [ds[i]["caption"] for i in range(len(ds))], "cpu")
    sampler = FlowMatchingSampler(comps["scheduler"])
    batches = [prepare_flow_matching_batch(latents, sampler, step_generator(999, k)) for k in range(4)]
    teacher = SD3Transformer2DModel.from_pretrained(str(shared / "teacher"), subfolder="transformer").eval()

    @torch.no_grad()
    def evaluate(unet_folder):
        unet = SnapGenUNet2DModel.from_pretrained(str(unet_folder)).eval()
        task, vel = [], []
        for fm in batches:
            pred = denoiser_forward(unet, fm.noisy_latents, fm.timesteps, embeds, pooled)
            task.append(flow_matching_loss(pred, fm.target, fm.sigmas).mean())
            vel.append(output_kd_loss(pred, denoiser_forward(teacher, fm.noisy_latents, fm.timesteps, embeds, pooled)).mean())
        return torch.stack(task).mean().item(), torch.stack(vel).mean().item()

    return evaluate


def test_pretraining_writes_a_loadable_pipeline_and_learns(shared, evaluator):
    from diffusers import DiffusionPipeline

    ref = shared / "ref"
    # checkpoints: total limit 2 keeps the newest; the final folder carries the EMA weights
    assert sorted(p.name for p in ref.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    ckpt = ref / "checkpoint-20"
    assert json.loads((ckpt / "training_state.json").read_text())["global_step"] == STEPS
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "unet", "unet_ema"):
        assert (ckpt / name).exists(), name
    assert_same_weights(ref / "unet", ckpt / "unet_ema", "final pipeline vs EMA")
    metrics = read_metrics(ref)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["step_time"] > 0 and m["loss"] > 0 for m in metrics)
    assert any(k.startswith("buckets/task/t") for k in metrics[9])  # per-timestep-bucket statistics
    assert sorted(p.name for p in (ref / "validation").iterdir()) == ["step-10", "step-20"]
    assert not any(p.name.startswith(".tmp") for p in ref.iterdir())

    pipe = DiffusionPipeline.from_pretrained(str(ref))
    assert type(pipe).__name__ == "SnapGenPipeline"
    assert pipe.sampling_defaults == {"num_inference_steps": 2, "guidance_scale": 1.0}
    image = pipe("a red circle", height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    before, _ = evaluator(shared / "base" / "unet")
    after, _ = evaluator(ckpt / "unet")
    print(f"task loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_sigkill_at_a_random_moment_then_resume_completes(shared):
    seed = int(time.time() * 1000) % 100_000
    rng = random.Random(seed)
    mode = rng.choice(["training", "saving"])
    target = rng.randint(3, STEPS - 3)
    out = shared / f"killed-{seed}"
    print(f"kill test: seed {seed}, mode {mode}, target step {target}")
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *_args(shared, out)], env=script_env(shared / "hf"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
    metrics = out / "logs" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if mode == "training" and steps >= target:
                time.sleep(rng.uniform(0, 0.3))
                break
            if mode == "saving" and steps >= 5 and any(p.name.startswith(".tmp-checkpoint") for p in out.iterdir()):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the kill (seed {seed}, mode {mode})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_index.json").exists()
    run_script(PRETRAIN, _args(shared, out, STEPS, "--resume_from_checkpoint", "latest"), shared / "hf")
    assert (out / "model_index.json").is_file()
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    # resume is exact, so wherever the kill landed the result is the uninterrupted run's
    for sub in ("unet", "checkpoint-20/unet", "checkpoint-20/unet_ema"):
        assert_same_weights(shared / "ref" / sub, out / sub, f"{sub} (seed {seed}, mode {mode})")


def test_model_saved_mid_run_is_the_ema_model_of_that_step_and_training_goes_on(shared):
    """--save_model_at_steps writes the model folder of that step (EMA weights) and restores the training weights."""
    out = shared / "snapshots"
    proc = run_script(PRETRAIN, _args(shared, out, STEPS, "--save_model_at_steps", "15", str(STEPS)), shared / "hf")
    assert "Saved the model at step 15" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("step-*")) == ["step-15"]  # the last step is the final folder itself
    assert (out / "step-15" / "model_index.json").is_file()
    assert not any(p.name.startswith(".tmp") for p in (out / "step-15").iterdir())
    assert_same_weights(shared / "ref" / "checkpoint-15" / "unet_ema", out / "step-15" / "unet", "step-15 vs EMA")
    for sub in ("unet", "checkpoint-20/unet", "checkpoint-20/unet_ema"):  # the run itself is the reference's
        assert_same_weights(shared / "ref" / sub, out / sub, sub)
    bad = run_script(PRETRAIN, _args(shared, shared / "bad-snapshot", 1, "--save_model_at_steps", "0"), shared / "hf",
                     expect_success=False)
    assert "--save_model_at_steps must list optimizer steps >= 1" in bad.stderr
    late = run_script(PRETRAIN, _args(shared, shared / "late-snapshot", 2, "--save_model_at_steps", "3"),
                      shared / "hf", expect_success=False)
    assert "--save_model_at_steps [3] lies past the run's 2 optimizer steps" in late.stderr


def test_kd_script_distils_the_teacher(shared, kd_run, evaluator):
    from diffusers import DiffusionPipeline

    ckpt = kd_run / "checkpoint-10"
    projectors = load_weights(ckpt / "model.safetensors")  # the projectors are saved with the student
    assert {k.split(".")[0] for k in projectors} == {"projectors"} and len(projectors) == 8
    assert len(list((kd_run / "cache").glob("latents-*.safetensors"))) == 1
    assert len(list((kd_run / "cache").glob("text-*.safetensors"))) == 1
    metrics = read_metrics(kd_run)
    assert {"task_mean", "kd_out_mean", "kd_feat_mean"} <= metrics[0].keys()
    assert any(k.startswith("buckets/kd_feat/t") for k in metrics[9])
    # the output KD term falls steadily; the feature term (its target, the projected teacher features, moves with the
    # projectors) swings by 2x from step to step, too much to rank two single steps
    assert metrics[-1]["kd_out_mean"] < 0.8 * metrics[0]["kd_out_mean"]
    assert type(DiffusionPipeline.from_pretrained(str(kd_run))).__name__ == "SnapGenPipeline"

    # same data, seed, optimiser and number of samples seen (10 steps x 2 micro-batches = the reference's 20)
    _, vel_init = evaluator(shared / "base" / "unet")
    _, vel_plain = evaluator(shared / "ref" / "checkpoint-20" / "unet")
    _, vel_kd = evaluator(ckpt / "unet")
    print(f"velocity error to teacher: init {vel_init:.4f}, no KD {vel_plain:.4f}, KD {vel_kd:.4f}")
    assert vel_kd < 0.8 * vel_plain and vel_kd < vel_init, (vel_init, vel_plain, vel_kd)


def test_kd_with_the_teacher_written_later_gives_the_same_run(shared, kd_run, tmp_path):
    """--teacher_config + --start_after: KD sets up on a placeholder teacher built from its config, waits, then loads
    the teacher's weights in place; the run equals the one whose teacher existed from the start."""
    import shutil
    import threading

    late, marker = tmp_path / "teacher-late", tmp_path / "teacher.done"
    config = shared / "teacher" / "transformer" / "config.json"

    def teacher_finishes():
        shutil.copytree(shared / "teacher", late)
        marker.touch()

    timer = threading.Timer(2.0, teacher_finishes)  # the script may be waiting by then, or not yet: same run
    timer.start()
    args = _kd_args(shared, tmp_path / "kd", STEPS // 2, "--teacher_config", str(config), "--start_after",
                    str(marker))
    args[args.index(str(shared / "teacher"))] = str(late)
    proc = run_script(KD, args, shared / "hf")
    timer.join()
    log = proc.stdout + proc.stderr
    assert "teacher: placeholder weights from --teacher_config" in log
    assert f"teacher weights loaded from {late}" in log
    assert_same_weights(kd_run / "unet", tmp_path / "kd" / "unet", "unet")
    assert_same_weights(kd_run / "checkpoint-10" / "model.safetensors",
                        tmp_path / "kd" / "checkpoint-10" / "model.safetensors", "projectors")
    bad = run_script(KD, _kd_args(shared, tmp_path / "bad", 1, "--teacher_config", str(config)), shared / "hf",
                     expect_success=False)
    assert bad.returncode == 2 and "--teacher_config" in bad.stderr and "--start_after" in bad.stderr


def test_kd_stop_halfway_and_resume_gives_identical_weights_and_projectors(shared, kd_run):
    out = shared / "kd-resume"
    run_script(KD, _kd_args(shared, out, STEPS // 4), shared / "hf")  # run N/2 and stop
    assert (out / "checkpoint-5").is_dir() and (out / "model_index.json").is_file()
    proc = run_script(KD, _kd_args(shared, out, STEPS // 2, "--resume_from_checkpoint", "latest"), shared / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    for sub in ("unet", "checkpoint-10/unet", "checkpoint-10/unet_ema"):
        assert_same_weights(kd_run / sub, out / sub, sub)
    assert_same_weights(kd_run / "checkpoint-10" / "model.safetensors", out / "checkpoint-10" / "model.safetensors",
                        "projectors")
