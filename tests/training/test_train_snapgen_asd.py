"""End-to-end runs of training_examples/train_snapgen_asd.py (subprocesses, CPU, tiny models, offline).

A student that starts from a SnapGen checkpoint is step-distilled from a fixed tiny SD3 teacher for a few steps:
the saved pipeline samples in 4 steps without CFG by default, its 4-step samples are closer to the teacher's 28-step
samples (same noise, same prompts) than the starting checkpoint's, and resuming a mid-run checkpoint in a new process
ends with bitwise the same student, EMA, discriminator heads and discriminator optimizer.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    read_metrics,
    run_script,
    assert_same_weights,
    load_weights,
    run_once,
    session_folder,
    tiny_teacher,
    write_imagefolder,
)

ROOT = Path(__file__).resolve().parents[2]
ASD = ROOT / "training_examples" / "train_snapgen_asd.py"
STEPS = 12


def _run(args, home, timeout=300):
    return run_script(ASD, args, home, timeout)


def _args(root, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(root / "base"), "--teacher_model_name_or_path", str(root / "teacher"),
            "--train_data_dir", str(root / "data"), "--resolution", "32", "--center_crop", "--train_batch_size", "4",
            "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--max_train_steps", str(steps),
            "--checkpointing_steps", "6", "--report_to", "none", "--logging_steps", "1", "--seed", "7", "--output_dir", str(out),
            "--cache_latents", "--cache_text_embeddings", "--use_ema", "--discriminator_head_channels", "16", *extra]



def _make_assets(root: Path):
    from diffusers_snapgen.testing import tiny_pipeline

    pipe = tiny_pipeline(text_encoder="clip", vae="kl")  # the "SnapGen checkpoint": CLIP-L + CLIP-G, joint 32, pooled 20
    c = pipe.vae.config.latent_channels
    with torch.no_grad():  # a trained VAE's posterior is narrow
        pipe.vae.quant_conv.weight[c:] = 0
        pipe.vae.quant_conv.bias[c:] = -12.0
    pipe.save_pretrained(root / "base")
    tiny_teacher(seed=3, joint_attention_dim=32, pooled_projection_dim=20).save_pretrained(root / "teacher" / "transformer")
    write_imagefolder(root / "data", n=8, size=40)


@pytest.fixture(scope="session")
def asd(tmp_path_factory, worker_id, testrun_uid):
    """Assets and the reference ASD run, built once per session even across xdist workers."""
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-asd")
    run_once(root, "assets", lambda: _make_assets(root))
    run_once(root, "reference", lambda: _run(_args(root, root / "ref", STEPS, "--validation_prompt", "a red circle",
                                                 "--validation_steps", "6"), root / "hf"))
    return root


def _heads_file(ckpt: Path) -> Path:
    found = [p for p in ckpt.glob("model*.safetensors") if any(k.startswith("heads.") for k in load_weights(p))]
    assert len(found) == 1, [p.name for p in ckpt.glob("model*.safetensors")]
    return found[0]


def test_asd_run_saves_a_four_step_pipeline_closer_to_the_teacher(asd):
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    from diffusers_snapgen.training import encode_captions
    from diffusers_snapgen.training.asd import few_step_sigmas, teacher_rollout

    ref = asd / "ref"
    ckpt = ref / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in ref.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    for name in ("unet", "unet_ema", "optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"):
        assert (ckpt / name).exists(), name  # both optimizers and LR schedules are checkpointed
    assert len([k for k in load_weights(_heads_file(ckpt)) if k.startswith("heads.")]) > 0
    metrics = read_metrics(ref)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert {"task_mean", "kd_out_mean", "kd_feat_mean", "adv_mean", "d_loss", "d_real", "d_fake"} <= metrics[0].keys()
    assert any(k.startswith("buckets/adv/t") for k in metrics[9])
    assert sorted(p.name for p in (ref / "validation").iterdir()) == ["step-12", "step-6"]
    assert not any(p.name.startswith(".tmp") for p in ref.iterdir())

    after = DiffusionPipeline.from_pretrained(str(ref))
    before = DiffusionPipeline.from_pretrained(str(asd / "base"))
    assert type(after).__name__ == "SnapGenPipeline"
    assert after.sampling_defaults == {"num_inference_steps": 4, "guidance_scale": 1.0}
    captions = [json.loads(line)["text"] for line in (asd / "data" / "metadata.jsonl").read_text().splitlines()]
    teacher = SD3Transformer2DModel.from_pretrained(str(asd / "teacher"), subfolder="transformer").eval()
    with torch.no_grad():
        embeds, pooled = encode_captions(before, captions * 2, "cpu")
        noise = torch.randn(len(embeds), 4, 4, 4, generator=torch.Generator().manual_seed(123))
        target = teacher_rollout(teacher, noise, torch.ones(len(noise)), embeds, pooled,
                                 few_step_sigmas(before.scheduler, 28)).sample  # the teacher's 28-step samples
    steps = []

    def sample(pipe, **kw):
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=noise.clone(), height=32, width=32,
                    output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(i) or {}, **kw).images

    dist_before = (sample(before, num_inference_steps=4, guidance_scale=1.0) - target).pow(2).mean().item()
    steps.clear()
    dist_after = (sample(after) - target).pow(2).mean().item()  # pipeline defaults: 4 steps, no CFG
    assert steps == [0, 1, 2, 3]
    print(f"4-step MSE to the teacher's 28-step samples: before ASD {dist_before:.4f}, after {dist_after:.4f}")
    assert dist_after < 0.8 * dist_before, (dist_before, dist_after)


def test_asd_resume_restores_student_ema_discriminator_and_both_optimizers(asd):
    """A new process resumes the reference run's step-6 checkpoint and ends bitwise where the reference ended."""
    import shutil

    out = asd / "resume"
    out.mkdir()
    shutil.copytree(asd / "ref" / "checkpoint-6", out / "checkpoint-6")
    proc = _run(_args(asd, out, STEPS, "--resume_from_checkpoint", "latest", "--validation_prompt", "a red circle",
                      "--validation_steps", "6"), asd / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    ref, new = asd / "ref" / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}"
    for sub in ("unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        assert_same_weights(ref / sub, new / sub)
    assert_same_weights(_heads_file(ref), _heads_file(new))
    assert_same_weights(asd / "ref" / "unet" / "diffusion_pytorch_model.safetensors",
                 out / "unet" / "diffusion_pytorch_model.safetensors")
    a, b = (torch.load(str(p / "optimizer_1.bin"), weights_only=False) for p in (ref, new))
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for k in a["state"]:
        assert torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"])


def test_asd_options_eight_steps_r1_checkpointing_accumulation_bf16(asd):
    """The less common paths run end to end: 8-step grid, one-step teacher guided with CFG against the cached empty
    prompt, R1 (math attention, double backward through the checkpointed teacher), teacher samples as "real",
    non-saturating loss, accumulation, bf16."""
    out = asd / "options"
    _run(["--pretrained_model_name_or_path", str(asd / "base"), "--unet_model_name_or_path", str(asd / "base" / "unet"),
          "--teacher_model_name_or_path", str(asd / "teacher"), "--train_data_dir", str(asd / "data"),
          "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", "2",
          "--report_to", "none", "--logging_steps", "1", "--output_dir", str(out), "--discriminator_head_channels", "16",
          "--discriminator_layers", "transformer_blocks.1", "--gradient_checkpointing", "--r1_gamma", "1.0",
          "--adversarial_real_source", "teacher", "--gan_loss", "non_saturating", "--disable_feature_kd",
          "--num_inference_steps", "8", "--teacher_num_inference_steps", "1", "--mixed_precision", "bf16",
          "--cache_text_embeddings", "--teacher_guidance_scale", "3"], asd / "hf")
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(m["r1"] >= 0 for m in metrics)
    assert "kd_feat_mean" not in metrics[0]
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_snapgen_defaults"] == {"num_inference_steps": 8, "guidance_scale": 1.0}
