"""The benchmark scripts run end to end and write their tables (numbers are checked for shape, never for speed)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600, check=True
    )


def test_ablation_table_writes_every_variant(tmp_path):
    _run("ablation_table.py", "--latent", "16", "--text-tokens", "8", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "ablation_table.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["a", "b", "c", "d", "e1", "e", "f"]
    assert abs(rows[-1]["params_m"] - 379) / 379 < 0.02
    # Each step that the paper says shrinks the model shrinks it here too.
    params = {row["variant"]: row["params_m"] for row in rows}
    assert params["a"] > params["b"] > params["c"] > params["d"] > params["e1"]
    assert "| e1 |" in (tmp_path / "ablation_table.md").read_text()


def test_bench_models_smoke_on_cpu(tmp_path):
    _run(
        "bench_models.py", "--device", "cpu", "--dtype", "float32", "--resolution", "64", "--batch-sizes", "1",
        "--no-compile", "--warmup", "0", "--iters", "1", "--models", "snapgen_tiny_decoder,autoencoder_tiny_decoder",
        "--out", str(tmp_path),
    )
    result = json.loads((tmp_path / "bench_models_cpu.json").read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"snapgen_tiny_decoder", "autoencoder_tiny_decoder"}
    assert all(row["ms"] > 0 and "error" not in row for row in rows.values())
    assert abs(rows["snapgen_tiny_decoder"]["params_m"] - 1.38) / 1.38 < 0.05
    assert rows["autoencoder_tiny_decoder"]["snapgen_speedup"] > 0


def test_bench_models_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_models.py"), "--resolution", "100", "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--resolution" in result.stderr
