"""The benchmark scripts run end to end from a plain checkout and write their tables (numbers are checked for shape,
never for speed). ``--smoke`` runs tiny models on the CPU through every code path the GPU run takes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    # No PYTHONPATH: the scripts must find the package themselves (benchmarks/common.py puts src/ on sys.path).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600, check=True,
        env=env, cwd=str(BENCHMARKS.parent.parent),
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


def test_ablation_table_smoke_times_variants(tmp_path):
    _run("ablation_table.py", "--smoke", "--latency", "--variants", "e,f", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "ablation_table_cpu.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["e", "f"]
    assert all(isinstance(row["ms_eager"], float) and isinstance(row["ms_eager_graph"], float) for row in rows)
    assert rows[1]["d_ms_eager"].endswith("%")


def test_bench_models_smoke_on_cpu(tmp_path):
    _run("bench_models.py", "--smoke", "--modes", "eager,eager+graph", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench_models_cpu.json").read_text())
    rows = {(row["model"], row["mode"]): row for row in result["rows"]}
    assert {model for model, _ in rows} == {"snapgen_unet", "snapgen_tiny_decoder", "autoencoder_tiny_decoder"}
    assert all(row["ms"] > 0 and row["tflops"] > 0 and "error" not in row for row in rows.values())
    assert abs(rows["snapgen_tiny_decoder", "eager"]["params_m"] - 1.38) / 1.38 < 0.05
    assert rows["autoencoder_tiny_decoder", "eager"]["snapgen_speedup"] > 0
    assert result["matmul_peak_tflops"] > 0


def test_bench_models_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_models.py"), "--resolution", "100", "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--resolution" in result.stderr


def test_bench_pipeline_smoke_on_cpu(tmp_path):
    _run("bench_pipeline.py", "--smoke", "--pipelines", "snapgen", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_pipeline_cpu.json").read_text())["rows"]
    assert [(r["mode"], r["text"]) for r in rows] == [
        ("eager", "only"), ("eager", "excluded"), ("eager", "included"), ("graph", "excluded"), ("graph", "included"),
        ("fast", "excluded"), ("fast", "included"),
    ]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
    # Off CUDA the fast sampler runs the pipeline's arithmetic exactly.
    assert rows[3]["max_abs_diff"] == 0.0 and rows[5]["max_abs_diff"] == 0.0


def test_profile_unet_smoke_on_cpu(tmp_path):
    _run("profile_unet.py", "--smoke", "--out", str(tmp_path))
    _run("profile_unet.py", "--smoke", "--fuse_qkv", "--text_kv", "--cudnn_benchmark", "--tag", "fast", "--out",
         str(tmp_path), "--inductor_option", "triton.prefer_nd_tiling=True")
    payload = json.loads((tmp_path / "profile_unet_cpu.json").read_text())
    fast = json.loads((tmp_path / "profile_unet_cpu_fast.json").read_text())
    assert payload["step_ms"] > 0 and payload["kernels"] and payload["graph_ms"] is None  # CUDA graphs need CUDA
    assert fast["inductor_options"] == {"triton.prefer_nd_tiling": True} and payload["inductor_options"] == {}
    for bad in ("triton.prefer_nd_tiling", "x=not a literal"):
        with pytest.raises(subprocess.CalledProcessError) as error:
            _run("profile_unet.py", "--smoke", "--inductor_option", bad)
        assert "--inductor_option" in error.value.stderr
    assert fast["fuse_qkv"] and fast["text_kv"] and not payload["fuse_qkv"]
    assert fast["cudnn_benchmark"] and not payload["cudnn_benchmark"]
    assert "cuDNN benchmark mode" in (tmp_path / "profile_unet_cpu_fast.md").read_text()
    # Fused projections and precomputed text keys/values leave fewer matrix products in a forward.
    launches = {name: {row["family"]: row["launches"] for row in result["families"]} for name, result in
                (("default", payload), ("fast", fast))}
    assert launches["fast"]["matmul"] < launches["default"]["matmul"]


def test_inference_suite_smoke_runs_every_section(tmp_path):
    """The one GPU command, on tiny CPU models: every section runs, CUDA-only parts fail soft."""
    _run("run_inference_suite.py", "--smoke", "--fp8", "--out", str(tmp_path))
    result = json.loads((tmp_path / "inference_suite_cpu.json").read_text())
    steps = {(r["model"], r["batch"], r["mode"]): r for r in result["steps"]}
    for key in [("snapgen_unet", 1, "eager"), ("snapgen_unet", 2, "eager"), ("snapgen_unet", 1, "compiled"),
                ("snapgen_unet", 2, "compiled"), ("snapgen_unet_fused_qkv", 1, "eager"),
                ("snapgen_unet_fused_qkv", 1, "compiled"), ("snapgen_unet_fused_qkv_tuned", 1, "compiled"),
                ("snapgen_unet_text_kv", 1, "compiled"), ("snapgen_unet_fused_qkv_text_kv", 1, "compiled")]:
        assert steps[key]["ms"] > 0 and "error" not in steps[key], key
    assert steps["snapgen_unet_fp8", 1, "regional"]["error"].startswith("failed:")  # no torchao / no CUDA here
    assert ("snapgen_unet", 1, "regional") not in steps  # float8's bf16 reference is not timed without float8
    pipelines = {(r["pipeline"], r["mode"], r["text"]): r for r in result["pipelines"]}
    for name in ("snapgen", "sana_sprint", "sdxl"):
        for text in ("only", "excluded", "included"):
            assert pipelines[name, "eager", text]["ms"] > 0, (name, text)
    assert pipelines["snapgen", "fast", "excluded"]["max_abs_diff"] == 0.0
    assert pipelines["snapgen", "graph", "excluded"]["max_abs_diff"] == 0.0
    assert pipelines["snapgen", "fast", "included"]["ms"] > 0
    for text in ("excluded", "included"):  # the fast sampler around the fused-QKV UNet: the eager images again
        assert pipelines["snapgen", "fast-fused-qkv", text]["max_abs_diff"] < 1e-4, text
        assert pipelines["snapgen", "fast-fused-qkv", text]["psnr_db"] > 60, text
    ablation = {r["variant"]: r for r in result["ablation"]}
    assert all(isinstance(ablation[v][m], float) for v in "ef" for m in ("ms_eager", "ms_regional"))
    assert all(ablation[v]["ms_eager_graph"] is None for v in "ef")  # CUDA graphs need CUDA
    targets = {r["target"]: r for r in result["targets"]}
    assert len(targets) == 11 and all(r["status"] != "missed" for r in targets.values())
    assert targets["UNet step, batch 1, compiled + CUDA graph, text keys and values precomputed (ms)"]["value"] > 0


def test_inference_suite_runs_only_the_chosen_sections(tmp_path):
    _run("run_inference_suite.py", "--smoke", "--sections", "ablation", "--out", str(tmp_path))
    result = json.loads((tmp_path / "inference_suite_cpu.json").read_text())
    assert list(result["graphs_compiled"]) == ["section_peak", "section_ablation"]  # peak is always measured
    assert result["steps"] == [] and result["pipelines"] == []
    assert {r["variant"] for r in result["ablation"]} == {"e", "f"}  # no plain-ops (f) row without CUDA + Triton
    # The JSON's wall time is the whole run's, as in the markdown header.
    assert f"whole run {result['wall_s']:.0f} s" in (tmp_path / "inference_suite_cpu.md").read_text()
    # a compiled section brings the eager section that builds its pipeline
    _run("run_inference_suite.py", "--smoke", "--sections", "compiled_b1", "--out", str(tmp_path / "b1"))
    result = json.loads((tmp_path / "b1" / "inference_suite_cpu.json").read_text())
    assert list(result["graphs_compiled"]) == ["section_peak", "section_snapgen_eager", "section_compiled_b1"]
    assert any(r["mode"] == "compiled" and r.get("ms", 0) > 0 for r in result["steps"])
    # the larger batches recompile the batch-1 compiled UNet: asking for them alone brings its section along
    _run("run_inference_suite.py", "--smoke", "--sections", "compiled_batches", "--out", str(tmp_path / "batches"))
    result = json.loads((tmp_path / "batches" / "inference_suite_cpu.json").read_text())
    assert list(result["graphs_compiled"]) == ["section_peak", "section_snapgen_eager", "section_compiled_b1",
                                               "section_compiled_batches"]
    assert result["graphs_compiled"]["section_compiled_batches"] > 0  # compiled rows that really compiled
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "run_inference_suite.py"), "--smoke", "--sections",
                          "ablation,warp_speed"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sections must name some of" in bad.stderr
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "run_inference_suite.py"), "--smoke", "--fused-recipes",
                          "default,turbo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--fused-recipes must name some of" in bad.stderr
    report = (tmp_path / "inference_suite_cpu.md").read_text()
    assert "## Targets" in report and "## End to end" in report


def test_bench_default_encoder_measures_the_shipped_encoder(tmp_path):
    _run("bench_default_encoder.py", "--num-samples", "8", "--batch-size", "4", "--out", str(tmp_path))
    held = json.loads((tmp_path / "default_model_encoder_cpu.json").read_text())["held_out"]
    assert held["num_samples"] == 8 and "real_psnr" not in held  # no --data: no real renders
    assert held["roundtrip_psnr"] > held["constant_encoder_roundtrip_psnr"] + 3
    assert "not measured" in (tmp_path / "default_model_encoder_cpu.md").read_text()


def test_bench_lora_smoke_on_cpu(tmp_path):
    _run("bench_lora.py", "--unet", "tiny", "--resolution", "64", "--device", "cpu", "--batch_sizes", "1,2",
         "--steps", "2", "--warmup", "1", "--text_tokens", "8", "--lora_layers", "attn,ffn", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_lora_cpu.json").read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["images_per_s"] > 0 and row["peak_memory_gib"] is None for row in rows)  # no CUDA: not measured
    assert 0 < rows[0]["lora_params_m"] < rows[0]["unet_params_m"]
    assert "| tiny | 64 | 2 |" in (tmp_path / "bench_lora_cpu.md").read_text()


def test_bench_lora_rejects_bad_arguments():
    with pytest.raises(subprocess.CalledProcessError) as error:
        _run("bench_lora.py", "--device", "cpu", "--rank", "0")
    assert "--rank" in error.value.stderr


def _emoji_data(folder, subject="flamingo", trained=("red apple",)):
    """A two-style rendered set in prepare_emoji.py's layout: ``trained`` concepts in train/, ``subject`` in test/."""
    from PIL import Image, ImageDraw

    for split, concepts in (("train", trained), ("test", (subject,))):
        (folder / split).mkdir(parents=True)
        rows = []
        for concept in concepts:
            for style, colour in (("noto", "hotpink"), ("twemoji", "deeppink")):
                name = f"{style}-{concept.replace(' ', '-')}.png"
                image = Image.new("RGB", (64, 64), "white")
                ImageDraw.Draw(image).ellipse((12, 8, 44, 56), fill=colour)
                image.save(folder / split / name)
                rows.append({"file_name": name, "text": f"{concept}, {style} style", "concept": concept,
                             "style": style, "kind": "seen" if split == "train" else "heldout_concept"})
        (folder / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_bench_lora_default_model_smoke_on_cpu(tmp_path):
    """The real code path on the shipped model (2 LoRA steps at 64x64, an untrained classifier), from a data folder."""
    data = _emoji_data(tmp_path / "data")
    _run("bench_lora_default_model.py", "--smoke", "--data-dir", str(data), "--work-dir", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "lora_default_model_cpu.json").read_text())
    assert result["smoke"] and result["subject"] == "flamingo" and result["resolution"] == 64
    assert result["sampling"]["num_inference_steps"] >= 1 and "held-out" in result["subject_heldout"]
    (name, run), = result["runs"].items()  # --smoke: one run, with prior preservation, no ablation run
    assert name == "attn density" and run["train_wall_s"] > 0 and run["prior_preservation"]
    assert "--with_prior_preservation --class_data_dir WORK/class" in run["command"]
    assert len(list((tmp_path / "work" / "class").glob("*.png"))) == result["prior_preservation"]["num_class_images"]
    assert str(tmp_path) not in json.dumps(result)  # no machine paths in the record
    for part in (result["before"], run):
        assert 0 <= part["instance_classifier"]["top1"] <= part["instance_classifier"]["top5"] <= 1
        assert part["instance_classifier"]["count"] == 2 and part["others_classifier"]["count"] == 16
        assert 0 <= part["others_classifier"]["top1_is_subject"] <= 1
        assert all(map(math.isfinite, part["instance_to_nearest"].values()))
    assert math.isfinite(run["others_after_vs_before"]["mean_abs"]) and isinstance(run["criterion"]["met"], bool)
    assert result["references"]["instance_images_classifier"]["count"] == 8
    assert "SMOKE RUN" in (tmp_path / "out" / "lora_default_model_cpu.md").read_text()
    assert (tmp_path / "out" / "lora_default_model_cpu.jpg").stat().st_size > 0


def test_bench_lora_default_model_rejects_bad_arguments(tmp_path):
    data = _emoji_data(tmp_path / "data", trained=("red apple", "flamingo"))
    for args, flag in ((["--smoke", "--steps", "0"], "--steps"), (["--smoke", "--styles", "noto"], "--styles"),
                       (["--steps", "5"], "--classifier"), (["--smoke", "--other-seeds", "1"], "--other-seeds"),
                       (["--smoke", "--data-dir", str(tmp_path)], "--data-dir"),
                       (["--smoke", "--class-prompt", "sks emoji"], "--class-prompt"),
                       (["--smoke", "--data-dir", str(data)], "--subject")):  # flamingo is trained in this set
        with pytest.raises(subprocess.CalledProcessError) as error:
            _run("bench_lora_default_model.py", *args, "--out", str(tmp_path / "out"))
        assert flag in error.value.stderr, (args, error.value.stderr[-500:])
    assert not (tmp_path / "out").exists()


def test_bench_host_overhead_counts_ops_of_every_model(tmp_path):
    _run("bench_host_overhead.py", "--iters", "2", "--rounds", "2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench_host_overhead.json").read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"snapgen_unet", "snapgen_unet_fused_qkv", "snapgen_unet_variant_e", "sana_1600m_transformer",
                         "snapgen_unet_text_kv", "snapgen_unet_fused_qkv_text_kv", "snapgen_unet_variant_e_text_kv"}
    for row in rows.values():
        assert row["ops"] == row["compute_ops"] + row["view_or_noop_ops"] and row["module_calls"] > 0
        assert row["cpu_ms"] > 0
    # Variant (f) adds QK-norm and RoPE to (e): more compute ops, the difference reported in the summary.
    extra = rows["snapgen_unet"]["compute_ops"] - rows["snapgen_unet_variant_e"]["compute_ops"]
    assert extra > 0 and result["summary"]["variant_f_extra_compute_ops"] == extra
    assert rows["snapgen_unet"]["top_ops"]["rms_norm"] > 0
    assert "rms_norm" not in rows["snapgen_unet_variant_e"]["top_ops"]
    # Fused projections: fewer matmuls, same QK-norm and RoPE.
    assert rows["snapgen_unet_fused_qkv"]["top_ops"]["linear"] < rows["snapgen_unet"]["top_ops"]["linear"]
    assert rows["snapgen_unet_fused_qkv"]["top_ops"]["rms_norm"] == rows["snapgen_unet"]["top_ops"]["rms_norm"]
    # Precomputed text keys and values: no text projection or K-norm in the step (39 cross-attentions, 1 embedder).
    assert rows["snapgen_unet"]["top_ops"]["linear"] - rows["snapgen_unet_text_kv"]["top_ops"]["linear"] == 2 * 39 + 1
    assert rows["snapgen_unet"]["top_ops"]["rms_norm"] - rows["snapgen_unet_text_kv"]["top_ops"]["rms_norm"] == 39
    assert result["summary"]["text_kv_variant_f_extra_compute_ops"] < extra
    assert "| snapgen_unet |" in (tmp_path / "bench_host_overhead.md").read_text()


def test_bench_reconstruction_parts_smoke_runs_every_part_in_each_layout(tmp_path):
    _run("bench_reconstruction_parts.py", "--smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "reconstruction_parts_smoke.json").read_text())
    assert result["device"] == "cpu" and (result["batch"], result["resolution"]) == (2, 32)
    assert list(result["ms"]) == ["nchw", "channels_last"]  # no compiled layout on the CPU: it says nothing there
    for parts in result["ms"].values():  # timed only on CUDA
        assert parts == {"encoder_fwd_ms": None, "decoder_fwd_bwd_ms": None, "disc_3x_fwd_bwd_ms": None}
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "bench_reconstruction_parts.py"), "--resolution", "30"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--resolution" in bad.stderr


def test_blockwise_quant_emulation_ranks_widths_on_the_default_model(tmp_path):
    prompts = tmp_path / "eval_prompts.json"
    prompts.write_text(json.dumps({"seen": ["red apple"], "heldout_pair": ["red apple, noto style"]}))
    _run("blockwise_quant_emulation.py", "--eval-prompts", str(prompts), "--pairs", "1", "--settings", "2:32", "8:32",
         "--out", str(tmp_path))
    result = json.loads((tmp_path / "blockwise_quant_emulation_cpu.json").read_text())
    low, high = result["rows"]
    assert result["pairs"] == 2 and (low["bits"], high["bits"]) == (2, 8)
    # most UNet weights are quantized: their bits (b + 16/32) dominate the average, the rest count as fp16
    assert 2.5 <= low["bits_per_weight"] < 4 and 8.5 <= high["bits_per_weight"] < 10
    assert high["psnr_db"] > 35 > low["psnr_db"]  # more bits keep the image; 2 bits do not
    assert "| 8 | 32 |" in (tmp_path / "blockwise_quant_emulation_cpu.md").read_text()
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "blockwise_quant_emulation.py"), "--eval-prompts",
                          str(prompts), "--settings", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "BITS:BLOCK" in bad.stderr


def test_roofline_model_moves_each_tensor_of_a_fused_chain_once():
    """Linear -> GELU -> x2 -> Linear: the matmuls read their inputs and weights and write their outputs; the
    pointwise chain between them reads the first matmul's output and writes the second one's input, once each."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import roofline

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.second(torch.nn.functional.gelu(self.first(x)) * 2)

    with torch.device("meta"):
        model, x = TwoLayers().to(torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    ops, aten = roofline.record(lambda: model(x))
    assert [op["family"] for op in ops] == ["matmul", "fused chains", "fused chains", "matmul"]
    assert [op["flops"] for op in ops] == [2 * 2 * 8 * 16, 0, 0, 2 * 2 * 16 * 4]
    bf16 = 2
    first = (16 + 2 * 8 + 8 * 16 + 2 * 16) * bf16  # bias, input, weight, output
    second = (4 + 2 * 16 + 16 * 4 + 2 * 4) * bf16
    assert roofline.floor_bytes(ops, aten) == [first, 2 * 16 * bf16, 2 * 16 * bf16, second]


def test_roofline_records_attention_and_its_backward_as_one_kernel_each():
    """Forward: Q, K, V in, the output out; backward: those and the output's gradient in, three gradients out, at
    2.5x the forward's FLOPs. Without gradients there is no backward kernel."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import roofline

    with torch.device("meta"):
        q = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(2, 4, 32, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    forward_flops = 4 * (2 * 4) * 16 * 32 * 8
    ops, aten = roofline.record(  # square(): the output's gradient is a whole tensor, not a broadcast one
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).square().sum().backward())
    attention = [(op, moved) for op, moved in zip(ops, roofline.floor_bytes(ops, aten)) if op["family"] == "attention"]
    assert [op["flops"] for op, _ in attention] == [forward_flops, 5 * forward_flops // 2]
    q_bytes, kv_bytes = 2 * 4 * 16 * 8 * 2, 2 * 4 * 32 * 8 * 2
    forward_bytes = 2 * q_bytes + 2 * kv_bytes  # Q, K, V, output
    assert [moved for _, moved in attention] == [forward_bytes, 2 * forward_bytes]  # + output gradient, 3 gradients
    assert q.grad is not None and q.grad.shape == q.shape and k.grad.shape == k.shape

    def forward_only():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    ops, _ = roofline.record(forward_only)
    assert [op["flops"] for op in ops if op["family"] == "attention"] == [forward_flops]


def test_grouped_convolution_backward_costs_twice_its_forward():
    """torch's counter charges a depthwise convolution's backward as a dense one (groups times too much);
    benchmarks count it as input gradient + weight gradient, each the forward's cost."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from common import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    for groups, transposed in ((1, False), (64, False), (64, True), (8, True)):
        layer = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
        with torch.device("meta"):
            conv = layer(64, 64, 3, stride=2, padding=1, groups=groups)
            x = torch.randn(4, 64, 16, 16, requires_grad=True)
        costs = {}
        for name, counter in (("ours", flop_counter()), ("torch", FlopCounterMode(display=False))):
            with counter:
                y = conv(x)
                forward = counter.get_total_flops()
                y.sum().backward()
            costs[name] = (forward, counter.get_total_flops() - forward)
        assert costs["ours"][1] == 2 * costs["ours"][0] and costs["ours"][0] == costs["torch"][0]
        assert costs["torch"] == costs["ours"] if groups == 1 else costs["torch"][1] > 4 * costs["ours"][1]


def test_roofline_smoke_writes_floors_and_the_measured_comparison(tmp_path):
    _run("roofline.py", "unet", "--smoke", "--batch-sizes", "1,4", "--profile",
         str(BENCHMARKS / "results" / "profile_unet_h200.json"), "--out", str(tmp_path))
    results = json.loads((tmp_path / "roofline_unet_smoke.json").read_text())["results"]
    assert [(r["qkv"], r["batch"]) for r in results] == [("separate", 1), ("separate", 4), ("fused", 1), ("fused", 4)]
    for result in results:
        *families, total = result["families"]
        assert math.isclose(total["gflop"], sum(f["gflop"] for f in families))
        assert all(total[f"floor_ms_{gpu}"] > 0 for gpu in ("H100", "H200"))
        assert total["floor_ms_H200"] <= total["floor_ms_H100"]  # same peak, more bandwidth
    ops = {(r["qkv"], r["batch"]): {f["family"]: f for f in r["families"]} for r in results}
    assert ops["fused", 1]["matmul"]["ops"] < ops["separate", 1]["matmul"]["ops"]
    assert ops["separate", 4]["total"]["gflop"] > 3.9 * ops["separate", 1]["total"]["gflop"]
    assert "## Against `profile_unet_h200.json`" in (tmp_path / "roofline_unet_smoke.md").read_text()
    # a profile is set beside the floors of its own batch and projections
    b16 = BENCHMARKS / "results" / "profile_unet_h100_b16_fused_text_kv.json"
    _run("roofline.py", "unet", "--smoke", "--batch-sizes", "1,16", "--profile", str(b16), "--gpu", "H100",
         "--out", str(tmp_path))
    text = (tmp_path / "roofline_unet_smoke.md").read_text()
    assert "Batch 16, fused projections." in text and "| matmul | 29.2 |" in text
    missing = subprocess.run([sys.executable, str(BENCHMARKS / "roofline.py"), "unet", "--smoke", "--batch-sizes", "1",
                              "--profile", str(b16), "--out", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and "at batch 16: add it to --batch-sizes" in missing.stderr

    measured = BENCHMARKS / "results" / "reconstruction_parts_h100.json"
    _run("roofline.py", "reconstruction", "--smoke", "--measured", str(measured), "--gpu", "H100",
         "--out", str(tmp_path))
    parts = json.loads((tmp_path / "roofline_reconstruction_smoke.json").read_text())["results"]
    assert [p["part"] for p in parts] == ["encoder_fwd", "decoder_fwd_bwd", "disc_3x_fwd_bwd"]
    assert all(p["families"][-1]["gflop"] > 0 and p["families"][1]["ops"] > 0 for p in parts)  # convolutions
    assert "| decoder_fwd_bwd | 15.6 |" in (tmp_path / "roofline_reconstruction_smoke.md").read_text()
    _run("roofline.py", "autoencoder", "--smoke", "--out", str(tmp_path))
    (step,) = json.loads((tmp_path / "roofline_autoencoder_smoke.json").read_text())["results"]
    convolutions = step["families"][1]
    assert step["part"] == "autoencoder_fwd_bwd" and convolutions["family"] == "convolution"
    assert convolutions["gflop"] == step["families"][-1]["gflop"] > 0  # no matmuls or attention in this VAE
    _run("roofline.py", "student", "--smoke", "--measured", str(BENCHMARKS / "results" / "bench_train_loop_h200.json"),
         "--out", str(tmp_path))
    (step,) = json.loads((tmp_path / "roofline_student_smoke.json").read_text())["results"]
    families = {f["family"]: f for f in step["families"]}
    assert step["part"] == "student16_step" and all(families[f]["gflop"] > 0 for f in ("matmul", "convolution"))
    assert families["attention"]["ops"] % 2 == 0 and families["attention"]["ops"] > 0  # forward + backward kernels
    assert "| student16_step | 12.1 |" in (tmp_path / "roofline_student_smoke.md").read_text()
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "roofline.py"), "unet", "--measured", str(measured),
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--measured is not for the unet workload" in bad.stderr


def test_float8_emulation_converts_the_chosen_linears_of_the_default_model(tmp_path):
    prompts = tmp_path / "eval_prompts.json"
    prompts.write_text(json.dumps({"seen": ["red apple"], "heldout_pair": ["red apple, noto style"]}))
    _run("float8_emulation.py", "--eval-prompts", str(prompts), "--pairs", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "float8_emulation_cpu.json").read_text())
    bf16, every, large = result["rows"]
    assert result["pairs"] == 2 and bf16["against"] == "fp32" and every["against"] == large["against"] == "bf16"
    assert every["float8_linears"] == every["linears"] > large["float8_linears"] > 0
    # float8 changes the images more than bf16 rounding does, and converting fewer layers changes them less
    assert bf16["psnr_db"] > large["psnr_db"] > every["psnr_db"] > 15
    assert "| float8 (min256) | bf16 |" in (tmp_path / "float8_emulation_cpu.md").read_text()


def test_float8_rows_round_each_row_to_e4m3_with_its_own_scale():
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from float8_emulation import float8_rows

    x = torch.tensor([[448.0, 1.0, -0.5, 0.3], [4.48, 0.01, 0.0, -4.48]])
    q = float8_rows(x)
    assert torch.equal(q[0, :3], x[0, :3])  # e4m3 holds these exactly at scale 1
    assert torch.allclose(q[1], x[1], rtol=0.07, atol=0) and q[1, 2] == 0  # the second row scales by 100 first
    assert q[0, 3] != x[0, 3] and abs(q[0, 3] - x[0, 3]) / x[0, 3] < 0.07  # 3 mantissa bits: within 2^-4


def test_float8_rows_keep_an_all_zero_row_finite():
    """SD3-layout prompt embeddings hold all-zero rows: their float8 scale must not turn them into 0 / 0."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from float8_emulation import float8_rows

    q = float8_rows(torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]))
    assert torch.isfinite(q).all() and torch.equal(q[0], torch.zeros(3))


def test_pipeline_comparison_flags_images_that_are_not_finite():
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from bench_pipeline import compare

    reference = torch.full((1, 3, 4, 4), 0.5)
    assert "error" not in compare(reference + 0.01, reference)
    broken = reference.clone()
    broken[0, 0, 0, :2] = float("nan")
    assert compare(broken, reference)["error"] == "2 of 48 pixel values are NaN or inf"


def test_qk_norm_rope_bench_records_every_rotated_tensor_of_a_forward(tmp_path):
    _run("bench_qk_norm_rope.py", "--smoke", "--iters", "2", "--forward_rounds", "2", "--stand_in_kernel", "--out",
         str(tmp_path), "--tag", "cpu")
    result = json.loads((tmp_path / "bench_qk_norm_rope_cpu.json").read_text())
    rows = {r["shape"]: r for r in result["rows"]}
    # Narrow paper structure at a 16x16 latent: 5 / 10 / 24 cross-attention queries per stage (4 / 8 / 14 heads),
    # 24 self-attentions at the lowest resolution, each with its queries and its one rotated key head.
    assert {shape: r["calls_per_forward"] for shape, r in rows.items()} == {
        "1×256×4×8": 5, "1×64×8×8": 10, "1×16×14×8": 48, "1×16×1×8": 24}
    assert result["calls_per_forward"] == 87 and result["fused_kernel_available"] is False
    assert all(r["plain_eager_us"] > 0 and r["fused_eager_us"] > 0 for r in rows.values())
    assert result["per_forward"]["plain_eager_ms"] > 0
    assert "| 1×16×1×8 | True | 24 |" in (tmp_path / "bench_qk_norm_rope_cpu.md").read_text()
    forwards = {r["variant"]: r for r in result["forward_ab"]}
    assert list(forwards) == ["e", "f", "f_plain_ops"] and result["stand_in_kernel"] is True
    assert all(r["eager_ms"] > 0 and "graph_ms" not in r for r in forwards.values())  # no CUDA graphs on a CPU
    assert forwards["e"]["eager_vs_e_pct"] == 0
