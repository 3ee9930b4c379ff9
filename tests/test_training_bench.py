"""Smoke test of benchmarks/bench_training.py (the GPU KD-step benchmark) with tiny models on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_training_tiny_writes_json_and_table(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--tiny", "--out", str(tmp_path),
         "--resolutions", "32", "--max_batch", "2"],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "bench_training.json").read_text())
    assert info["tiny"] and info["teacher_params_m"] > 0 and len(info["kd_pairs"]) == 4
    rows = info["rows"]
    assert [(r["resolution"], r["gradient_checkpointing"]) for r in rows] == [(32, False), (32, True)]
    for r in rows:
        assert r["largest_batch"] == 2 and r["search_limited"]  # CPU never runs out of memory: the cap stops it
        assert r["step_s"] > 0 and r["images_per_s"] > 0
    table = (tmp_path / "bench_training.md").read_text()
    assert "| 32² | True | 2+ (max_batch" in table


def test_bench_train_loop_runs_the_engine_in_each_mode(tmp_path):
    """benchmarks/bench_train_loop.py on the CPU (tiny models): every requested config x mode gives a timed row from
    the real engine; graph modes fall back to eager steps off CUDA and say so in `step_mode`."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_loop.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--configs",
                           "student16,decoder128", "--modes", "eager,graph_eager", "--warmup", "1", "--steps", "2",
                           "--resume_check", "student16", "--resume_mode", "graph_eager", "--resume_steps", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "bench_train_loop_smoke.json").read_text())
    rows = {(r["config"], r["mode"]): r for r in info["rows"]}
    assert set(rows) == {(c, m) for c in ("student16", "decoder128") for m in ("eager", "graph_eager")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps_per_s"] > 0 and row["step_mode"] == "eager" and row["params_m"] > 0
    for config in ("student16", "decoder128"):  # eager steps are counted; the same step, the same FLOPs
        assert rows[(config, "eager")]["tflop_per_step"] == rows[(config, "graph_eager")]["tflop_per_step"] > 0
    assert rows[("decoder128", "eager")]["tflop_per_step"] != rows[("student16", "eager")]["tflop_per_step"]
    table = (tmp_path / "bench_train_loop_smoke.md").read_text()
    assert "| student16 | graph_eager |" in table and "| tflops |" in table
    # the resume check: a run resumed at step 2 logs the uninterrupted run's losses (bitwise on the CPU)
    resume = info["resume"]
    assert "error" not in resume, resume
    assert resume["resumed_at"] == 2 and resume["windows"] == 2 and resume["max_rel_loss_diff"] == 0.0
    assert set(resume["losses"]["resumed"]) == set(resume["losses"]["uninterrupted"])
    # off CUDA both runs fall back to eager steps, and the result says why
    assert resume["step_modes"] == {"uninterrupted": "eager", "resumed": "eager"}
    assert len(resume["fallbacks"]) == 2 and all("not a CUDA GPU" in m for m in resume["fallbacks"])
    # the paper-size KD step (the teacher built in bf16) at tiny size; --resume_steps is only checked with
    # --resume_check (its default, 100, is no multiple of --warmup 3)
    kd = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "kd"), "--configs",
                         "paperkd1024", "--modes", "eager", "--warmup", "3", "--steps", "3",
                         "--profile_config", "none"],
                        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert kd.returncode == 0, kd.stderr[-3000:]
    (kd_row,) = json.loads((tmp_path / "kd" / "bench_train_loop_smoke.json").read_text())["rows"]
    assert "error" not in kd_row and kd_row["steps_per_s"] > 0 and kd_row["tflop_per_step"] > 0, kd_row
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--configs", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--configs" in bad.stderr
    bad_mode = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--resume_check", "student16",
                               "--resume_mode", "fast"], capture_output=True, text=True)
    assert bad_mode.returncode == 2 and "--resume_mode: unknown mode 'fast'" in bad_mode.stderr
    bad_resume = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--resume_check", "student16",
                                 "--warmup", "3", "--steps", "3"], capture_output=True, text=True)
    assert bad_resume.returncode == 2 and "--resume_steps must be a positive multiple" in bad_resume.stderr


def test_bench_train_loop_keeps_the_modes_a_stopped_config_finished():
    """A config stopped by --deadline (or crashing) keeps the rows its process printed as each mode finished."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train_loop as bench

    row = {"config": "paper1024", "mode": "eager", "step_ms": 384.0}
    output = "warming up\n" + json.dumps(row) + "\nSome log line {\"config\": x}\n"
    assert bench.finished_rows(output) == [row]
    assert bench.finished_rows("compiling...\n") == []
