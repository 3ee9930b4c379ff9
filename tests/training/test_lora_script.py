"""training_examples/train_snapgen_lora.py end to end (subprocesses, CPU, a tiny pipeline) and its pieces.

A reference DreamBooth run (prior preservation, few-step sigmas) is built once per session; it is loaded into a
pipeline with ``load_lora_weights`` (the latents change, ``unload_lora_weights`` restores the base's exactly), and a
run SIGKILLed after its first checkpoint and resumed must end with bitwise the same adapter. Prior preservation
generates the missing class images; the few-step sampler draws only the pipeline's sigmas; bad flags end with one line
and exit code 2 (through the scripts' parse_or_exit, in-process).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, assert_same_weights, make_denoiser_assets, run_once, run_script, script_env, \
    session_folder, write_imagefolder
from safetensors import safe_open

SCRIPT = ROOT / "training_examples" / "train_snapgen_lora.py"
STEPS = 12
WEIGHTS = "pytorch_lora_weights.safetensors"
# the reference run: DreamBooth with prior preservation (2 of 3 class images generated), few-step sigmas
PRIOR = ["--with_prior_preservation", "--class_prompt", "a shape", "--num_class_images", "3", "--prior_loss_weight",
         "0.5", "--timestep_sampling", "few_step"]


def _args(root, out, *extra):
    return ["--pretrained_model_name_or_path", str(root / "base"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", "a photo of sks shape", "--resolution", "32", "--center_crop", "--random_flip",
            "--train_batch_size", "2", "--learning_rate", "1e-2", "--rank", "4", "--lora_alpha", "8",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "4", "--report_to", "none", "--logging_steps",
            "1", "--seed", "3", "--output_dir", str(out), *extra]


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id, testrun_uid):
    """The tiny base pipeline, 4 instance images, 1 class image and the reference run, built once per test session."""
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-lora")
    run_once(root, "assets", lambda: (make_denoiser_assets(root), write_imagefolder(root / "instance", n=4, size=40),
                                      write_imagefolder(root / "class", n=1, size=40)))
    run_once(root, "reference", lambda: run_script(SCRIPT, _args(root, root / "ref", *_prior(root)), root / "hf"))
    return root


def _prior(root):
    return [*PRIOR, "--class_data_dir", str(root / "class")]


def _latents(pipe):
    return pipe("a photo of sks shape", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_the_adapter_loads_changes_the_output_and_unloads_exactly(shared):
    from diffusers_snapgen import SnapGenPipeline

    ref = shared / "ref"
    with safe_open(str(ref / WEIGHTS), "pt") as f:
        keys, metadata = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    # diffusers' layout: unet.<module>.lora_A/B.weight on the attention projections only (--lora_layers attn)
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    # checkpoints hold the adapter (loadable the same way), not the frozen UNet
    ckpt = ref / f"checkpoint-{STEPS}"
    assert (ckpt / WEIGHTS).is_file() and not (ckpt / "unet").exists() and not (ckpt / "model.safetensors").exists()
    assert_same_weights(ckpt / WEIGHTS, ref / WEIGHTS, "final adapter vs last checkpoint")
    assert not any(p.name.startswith(".tmp") for p in [*ref.iterdir(), *ckpt.iterdir()])
    card = (ref / "README.md").read_text()
    assert "train_snapgen_lora.py" in card and "load_lora_weights" in card and "a photo of sks shape" in card

    pipe = SnapGenPipeline.from_pretrained(str(shared / "base"))
    pipe.set_progress_bar_config(disable=True)
    base = _latents(pipe)
    pipe.load_lora_weights(str(ref))
    adapted = _latents(pipe)
    assert (adapted - base).abs().max() > 1e-4
    pipe.unload_lora_weights()
    assert torch.equal(_latents(pipe), base)


def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_adapter(shared):
    out = shared / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(shared, out, *_prior(shared))],
                            env=script_env(shared / "hf"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
    try:
        deadline = time.time() + 240
        saved = out / "checkpoint-4" / "training_state.json"  # written last: the checkpoint is complete
        while time.time() < deadline and proc.poll() is None and not saved.exists():
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and not (out / WEIGHTS).exists()
    result = run_script(SCRIPT, _args(shared, out, *_prior(shared), "--resume_from_checkpoint", "latest"),
                        shared / "hf")
    assert "Resuming from checkpoint" in result.stdout + result.stderr
    assert_same_weights(shared / "ref" / WEIGHTS, out / WEIGHTS, "resumed adapter")


def test_prior_preservation_generated_the_missing_class_images_and_weights_them(shared):
    from diffusers_snapgen.training.dreambooth import dreambooth_dataset

    class_dir = shared / "class"  # one image was there; the reference run sampled two with the base pipeline
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["000.png", "class-00001-3.png", "class-00002-3.png"]
    ds, weights = dreambooth_dataset(shared / "instance", "a photo of sks shape", class_dir, "a shape", 0.5,
                                     num_class_images=3)
    # 4 instance and 3 class images balanced 1:1; the weighted mean is diffusers' L_inst + 0.5 L_prior
    assert ds["text"] == ["a photo of sks shape"] * 4 + ["a shape"] * 4
    assert weights.tolist() == [2.0] * 4 + [1.0] * 4
    assert "prior preservation with `a shape`" in (shared / "ref" / "README.md").read_text()


def test_few_step_sampling_draws_only_the_pipeline_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_snapgen.training.lora import timestep_sampler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.register_to_config(_snapgen_defaults={"num_inference_steps": 4, "guidance_scale": 1.0})
    inference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    inference.set_timesteps(4)
    grid = inference.sigmas[:4]  # what the 4-step pipeline visits
    sampler = timestep_sampler("few_step", scheduler)
    sigmas, timesteps = sampler(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.unique(sigmas), torch.unique(grid))
    assert torch.allclose(timesteps, sigmas * 1000)
    inference.set_timesteps(2)
    two_step, _ = timestep_sampler("few_step", scheduler, num_inference_steps=2)(256)
    assert torch.equal(torch.unique(two_step), torch.unique(inference.sigmas[:2]))
    dense, _ = timestep_sampler("density", scheduler)(4096, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(dense)) > 100
    with pytest.raises(ValueError, match="--timestep_sampling"):
        timestep_sampler("uniform", scheduler)


def test_the_adapter_starts_as_the_base_model_and_is_all_that_trains(tmp_path):
    from diffusers_snapgen.testing import tiny_unet
    from diffusers_snapgen.training.lora import add_lora_adapter, load_lora_adapter, lora_parameters, \
        save_lora_adapter

    unet = tiny_unet().eval()
    cfg, g = unet.config, torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g))
    with torch.no_grad():
        base = unet(**inputs).sample
        add_lora_adapter(unet, rank=2, layers="attn,ffn,conv")
        assert torch.equal(unet(**inputs).sample, base)  # B = 0: the adapter starts as the identity
    # mixed precision: frozen weights in the weight dtype, the adapter in float32
    half = add_lora_adapter(tiny_unet(), rank=2, weight_dtype=torch.bfloat16)
    assert {p.dtype for n, p in half.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in lora_parameters(half)} == {torch.float32}
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(lora_parameters(unet))
    assert any(".pointwise.lora_A" in n for n in trainable)  # conv: separable convs at their pointwise conv
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.normal_()
    save_lora_adapter(unet, tmp_path)
    other = add_lora_adapter(tiny_unet(), rank=2, layers="attn,ffn,conv")
    load_lora_adapter(other, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(other), lora_parameters(unet)))
    for rank, layers in ((2, "attn"), (3, "attn,ffn,conv")):  # other layers, other rank
        with pytest.raises(ValueError, match="--rank"):
            load_lora_adapter(add_lora_adapter(tiny_unet(), rank=rank, layers=layers), tmp_path)


BAD_FLAGS = [
    (["--rank", "0"], "--rank"),
    (["--instance_data_dir", "{tmp}/missing"], "--instance_data_dir"),
    (["--instance_data_dir", "{tmp}"], "--instance_data_dir"),  # no images in it
    (["--lora_layers", "attn,mlp"], "--lora_layers"),
    (["--with_prior_preservation", "--class_data_dir", "{tmp}"], "--class_prompt"),
    (["--with_prior_preservation", "--class_prompt", "a shape"], "--class_data_dir"),
    (["--use_ema"], "--use_ema"),
]


@pytest.mark.parametrize("extra, flag", BAD_FLAGS, ids=[" ".join(extra) for extra, _ in BAD_FLAGS])
def test_bad_flags_end_with_one_line_naming_the_flag(shared, tmp_path, capsys, extra, flag):
    from diffusers_snapgen.training import parse_or_exit
    from diffusers_snapgen.training.task_args import parse_lora_args

    with pytest.raises(SystemExit) as exit_info:
        parse_or_exit(parse_lora_args, _args(shared, tmp_path / "out", *[a.format(tmp=tmp_path) for a in extra]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err

