"""End-to-end runs of training_examples/train_sd3_teacher.py (subprocesses, CPU, tiny models, offline).

A tiny SD3Transformer2DModel is trained for a few steps on a tiny SnapGen base pipeline (recipe-style config without
the text widths): ``<out>/transformer/`` loads with ``SD3Transformer2DModel.from_pretrained``, holds trained (EMA)
weights, is the teacher of ``train_snapgen_kd.py`` (``--teacher_subfolder transformer``) and samples through
``evaluation.models.load_model(out, base=...)``; a new process resuming the run's mid-way checkpoint ends bitwise
equal to the uninterrupted run; bad ``--transformer_config`` values are explained.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import max_weight_diff, read_metrics, run_once, run_script, session_folder, write_imagefolder

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "training_examples" / "train_sd3_teacher.py"
KD = ROOT / "training_examples" / "train_snapgen_kd.py"
STEPS = 6
# The smoke recipe's teacher config, smaller: no joint_attention_dim / pooled_projection_dim / in/out channels.
CONFIG = {"sample_size": 8, "patch_size": 2, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
          "caption_projection_dim": 16, "pos_embed_max_size": 16}
TEXT_DIMS = (28, 20)  # text_widths of tiny_pipeline("clip"): CLIP-L + CLIP-G hidden 16 + 12, projections 8 + 12
STUDENT = {"sample_size": 8, "block_out_channels": [16, 32, 32], "layers_per_block": 1,
           "transformer_layers_per_block": [1, 1, 1], "attention_head_dim": 8, "cross_attention_dim": 32,
           "norm_num_groups": 8}


def _script():
    spec = importlib.util.spec_from_file_location("train_sd3_teacher", TEACHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(root, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(root / "base"), "--train_data_dir", str(root / "data"),
            "--transformer_config", str(root / "teacher_transformer.json"), "--resolution", "32", "--center_crop",
            "--random_flip", "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
            "--use_ema", "--cache_latents", "--cache_text_embeddings", "--max_train_steps", str(steps),
            "--checkpointing_steps", "3", "--report_to", "none", "--logging_steps", "1", "--seed", "7", "--output_dir", str(out), *extra]


def _make_assets(root: Path):
    from diffusers_snapgen.testing import tiny_pipeline

    pipe = tiny_pipeline(text_encoder="clip", vae="kl")
    c = pipe.vae.config.latent_channels
    with torch.no_grad():  # a trained VAE's posterior is narrow: give the random one a tiny std (logvar -12)
        pipe.vae.quant_conv.weight[c:] = 0
        pipe.vae.quant_conv.bias[c:] = -12.0
    pipe.save_pretrained(root / "base")
    write_imagefolder(root / "data", n=8, size=40)
    (root / "teacher_transformer.json").write_text(json.dumps(CONFIG))


@pytest.fixture(scope="session")
def assets(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-teacher")
    run_once(root, "assets", lambda: _make_assets(root))
    return root


@pytest.fixture(scope="session")
def teacher_run(assets):
    """The reference run (built once per session even across xdist workers), validation images at the end."""
    run_once(assets, "reference", lambda: run_script(
        TEACHER, _args(assets, assets / "ref", STEPS, "--validation_prompt", "a red circle",
                       "--validation_num_inference_steps", "2", "--validation_guidance_scale", "1.0"), assets / "hf"))
    return assets / "ref"


def test_teacher_run_saves_a_trained_sd3_transformer(assets, teacher_run):
    from diffusers import SD3Transformer2DModel

    out = teacher_run
    # a bare transformer folder, no pipeline: load_model and load_teacher take the transformer path
    assert not (out / "model_index.json").exists()
    assert not any(p.name.startswith(".tmp") for p in [*out.iterdir(), *(out / "transformer").iterdir()])
    model = SD3Transformer2DModel.from_pretrained(str(out), subfolder="transformer")
    c = model.config
    assert (c.joint_attention_dim, c.pooled_projection_dim) == TEXT_DIMS  # the base pipeline's text widths
    assert c.in_channels == c.out_channels == 4 and c.num_layers == CONFIG["num_layers"]

    # checkpoints hold the transformer and its EMA; the final folder has the EMA weights
    ckpt = out / f"checkpoint-{STEPS}"
    assert json.loads((ckpt / "training_state.json").read_text())["global_step"] == STEPS
    assert (ckpt / "transformer" / "config.json").is_file() and (ckpt / "transformer_ema" / "config.json").is_file()
    assert max_weight_diff(out / "transformer", ckpt / "transformer_ema") == 0.0

    # the initial weights (the script's own loader, same config and seed) moved
    script = _script()
    args = script.parse_teacher_args(_args(assets, out, STEPS))
    initial = {k: v.detach() for k, v in script.load_transformer(args, 4, TEXT_DIMS).state_dict().items()}
    assert max_weight_diff(initial, out / "transformer") > 1e-4
    assert max_weight_diff(initial, ckpt / "transformer") > 1e-4

    # the validation pipeline sampled the transformer during training; the loss was logged every step
    assert (out / "validation" / f"step-{STEPS}" / "00-00.png").is_file()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) and all(m["loss"] > 0 for m in metrics)


def test_kd_script_takes_the_teacher_run(assets, teacher_run):
    out = assets / "kd"
    run_script(KD, ["--pretrained_model_name_or_path", str(assets / "base"), "--train_data_dir", str(assets / "data"),
                    "--teacher_model_name_or_path", str(teacher_run), "--teacher_subfolder", "transformer",
                    "--teacher_dtype", "fp32", "--unet_config", json.dumps(STUDENT), "--from_scratch",
                    "--kd_feature_layers", "mid_block=transformer_blocks.1:1", "--resolution", "32", "--center_crop",
                    "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none", "--logging_steps", "1",
                    "--output_dir", str(out)], assets / "hf")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "SnapGenPipeline"
    assert (pipe.unet.config.joint_attention_dim, pipe.unet.config.pooled_projection_dim) == TEXT_DIMS
    metrics = read_metrics(out)
    assert {"kd_out_mean", "kd_feat_mean"} <= metrics[0].keys()


def test_evaluation_load_model_samples_the_teacher(assets, teacher_run):
    from diffusers_snapgen.evaluation.models import SD3TransformerDenoiser, load_model

    pipe = load_model(teacher_run, base=assets / "base")
    assert isinstance(pipe.unet, SD3TransformerDenoiser)
    assert max_weight_diff(pipe.unet.transformer.state_dict(), teacher_run / "transformer") == 0.0
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(assets, teacher_run):
    out = assets / "resumed"  # a run stopped after its first checkpoint: only that checkpoint is left
    shutil.copytree(teacher_run / f"checkpoint-{STEPS // 2}", out / f"checkpoint-{STEPS // 2}")
    proc = run_script(TEACHER, _args(assets, out, STEPS, "--resume_from_checkpoint", "latest"), assets / "hf")
    assert "Resuming from checkpoint" in proc.stdout + proc.stderr
    for sub in ("transformer", f"checkpoint-{STEPS}/transformer", f"checkpoint-{STEPS}/transformer_ema"):
        assert max_weight_diff(teacher_run / sub, out / sub) == 0.0, sub


def test_continue_from_an_existing_transformer(assets, teacher_run):
    script = _script()
    argv = _args(assets, assets / "unused", STEPS)
    argv[argv.index("--transformer_config"):argv.index("--transformer_config") + 2] = [
        "--transformer_model_name_or_path", str(teacher_run)]
    args = script.parse_teacher_args(argv)
    model = script.load_transformer(args, 4, TEXT_DIMS)  # finds the `transformer` subfolder
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert max_weight_diff({k: v.detach() for k, v in model.state_dict().items()}, teacher_run / "transformer") == 0.0
    with pytest.raises(ValueError, match="--transformer_model_name_or_path: joint_attention_dim=28 is narrower"):
        script.load_transformer(args, 4, (64, 20))


def test_bad_transformer_config_is_explained(assets, tmp_path):
    script = _script()

    def parse(config, *extra):
        argv = _args(assets, tmp_path / "out", STEPS, *extra)
        argv[argv.index("--transformer_config") + 1] = config
        return script.parse_teacher_args(argv)

    with pytest.raises(ValueError, match=r"--transformer_config '.*missing\.json': no such file"):
        parse(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("sample_size: 8")
    with pytest.raises(ValueError, match="--transformer_config is neither a JSON file nor valid JSON"):
        parse(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--transformer_config must hold a JSON object"):
        parse(str(tmp_path / "list.json"))
    (tmp_path / "typo.json").write_text(json.dumps({**CONFIG, "num_layer": 4}))
    with pytest.raises(ValueError, match=r"--transformer_config: unknown SD3Transformer2DModel key\(s\) \['num_layer"):
        parse(str(tmp_path / "typo.json"))
    with pytest.raises(ValueError, match="--transformer_config describes a SnapGenUNet2DModel"):
        parse(json.dumps({"_class_name": "SnapGenUNet2DModel"}))
    # a saved config.json works (private keys dropped); the UNet flags do not apply; one model source only
    saved = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1", **CONFIG}
    assert parse(json.dumps(saved)).transformer_config == CONFIG
    with pytest.raises(SystemExit):  # the parser is composed without the SnapGen UNet group
        parse(json.dumps(CONFIG), "--unet_config", "{}")
    with pytest.raises(ValueError, match="exactly one of --transformer_config"):
        parse(json.dumps(CONFIG), "--transformer_model_name_or_path", str(tmp_path))
    # a config that the model rejects is reported with the flag
    args = parse(json.dumps({**CONFIG, "qk_norm": "nope"}))
    with pytest.raises(ValueError, match="--transformer_config does not build an SD3Transformer2DModel.*qk_norm"):
        script.load_transformer(args, 4, TEXT_DIMS)
    with pytest.raises(ValueError, match="`latent_channels`"):
        script.load_transformer(args, 0, TEXT_DIMS)
