"""The default-model recipe end to end (`PRESET=smoke`: tiny models, a tiny icon set, CPU): every step's output feeds
the next, the shipped folder loads as the default model, and the evaluation writes one table and one grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_emoji_data import write_iconify_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training_examples" / "recipes" / "emoji_demo.sh"
MODELS = ["teacher", "nokd", "kd", "kd4", "asd4", "shipped"]


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
    proc = subprocess.run(["bash", str(RECIPE)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [line for line in proc.stderr.splitlines() if line.startswith("=== ")]
    assert steps == [f"=== {s} ===" for s in
                     ("data", "classifier", "vae", "decoder", "base", "teacher", "kd", "nokd", "asd", "ship", "eval")]

    runs = tmp_path / "runs"
    vae_config = json.loads((runs / "vae" / "config.json").read_text())
    assert vae_config["latent_channels"] == 16 and vae_config["scaling_factor"] != 1.0  # measured, not the default
    assert (runs / "teacher" / "transformer" / "config.json").is_file()
    for student in ("student-kd", "student-nokd", "student-asd"):
        assert (runs / student / "model_index.json").is_file()
    asd_scheduler = json.loads((runs / "student-asd" / "scheduler" / "scheduler_config.json").read_text())
    # the base pipeline's text length (TEXT_TOKENS) travels with every model trained from it
    assert asd_scheduler["_snapgen_defaults"] == {"num_inference_steps": 4, "guidance_scale": 1.0,
                                                  "max_sequence_length": 16}

    # The shipped folder is the embedded-model layout: no text encoder, fp16 weights, the ASD sampling defaults.
    shipped = tmp_path / "shipped"
    index = json.loads((shipped / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["vae"] == ["diffusers_snapgen", "TinyDecoder"]
    assert not list(tmp_path.glob(".ship-*"))  # written through a temporary folder
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
