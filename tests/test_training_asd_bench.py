"""Smoke test of benchmarks/bench_asd.py (the GPU ASD / tiny-decoder training benchmark) with tiny models on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_asd_tiny_writes_json_and_tables(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_asd.py"), "--tiny", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "bench_asd.json").read_text())
    assert info["tiny"] and info["teacher_params_m"] > 0 and len(info["discriminator_layers"]) == 4
    rows = info["asd_rows"]
    assert [(r["gradient_checkpointing"], r["batch"]) for r in rows] == [(False, 1), (True, 1), (True, 2)]
    assert rows[-1]["largest_batch"] and rows[-1]["limited_by"] == "max_batch"  # CPU never runs out of memory
    for r in rows:
        assert r["iteration_s"] > 0 and r["teacher_forwards_per_grid_point"] == [4, 3, 2, 1]
    (dec,) = info["decoder_rows"]
    assert dec["patch"] == 32 and dec["images_per_s"] > 0 and dec["encoder_ms"] > 0
    table = (tmp_path / "bench_asd.md").read_text()
    assert "| 32² | True | 2 (largest), capped: max_batch |" in table and "| 32² | 2 |" in table
