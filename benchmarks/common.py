"""Timing and reporting helpers shared by the benchmark scripts (not part of the installed package).

Importing it puts the checkout's ``src/`` first on ``sys.path``, so every script runs from a plain checkout
(``python benchmarks/<script>.py``) without installing the package.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds; CUDA work is timed with events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_results(out_dir: Path, stem: str, payload: dict, table: str) -> None:
    write_atomically(out_dir / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    write_atomically(out_dir / f"{stem}.md", table + "\n")


# The SD3.5-Large transformer's published config (random weights; the KD teacher of docs/design.md, "Training objectives").
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
)


def build_frozen_teacher(config: dict, device, dtype: torch.dtype = torch.bfloat16):
    """A frozen ``SD3Transformer2DModel`` built directly in ``dtype`` on ``device``: an 8B teacher never exists in fp32
    on the host."""
    from diffusers import SD3Transformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            teacher = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return teacher.requires_grad_(False).eval()


def build_student_and_teacher(tiny: bool, device):
    """A fp32 SnapGen student and a frozen bf16 SD3-style teacher: paper size (8B SD3.5-Large-shaped teacher) or tiny."""
    from diffusers_snapgen import SnapGenUNet2DModel

    if tiny:
        from diffusers_snapgen.testing import tiny_unet

        student = tiny_unet(joint_attention_dim=32, pooled_projection_dim=20)
        teacher_cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                           attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                           caption_projection_dim=32, pooled_projection_dim=20, pos_embed_max_size=32)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            student = SnapGenUNet2DModel()
        teacher_cfg = SD35_LARGE_TRANSFORMER
    torch.manual_seed(1)
    teacher = build_frozen_teacher(teacher_cfg, device)
    student = student.to(device=device, dtype=torch.float32).train()
    return student, teacher


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks (between out-of-memory probes)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- peak, FLOPs, CUDA graphs, budget


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                       iters: int = 20) -> float:
    """Dense matmul throughput of this device in TFLOP/s (``size``³ GEMMs in ``dtype``): the "% of peak" reference."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, warmup=3, iters=iters)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def conv_backward_flops(grad_output_shape, input_shape, weight_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, **_) -> int:
    """FLOPs of ``aten.convolution_backward`` (from shapes) for any ``groups``: the input gradient and the weight
    gradient each cost what the forward convolution costs, ``2 * batch * positions * weight elements``. torch's own
    formula (``torch.utils.flop_counter``, torch 2.11-2.13) leaves ``groups`` out and counts the backward of a
    depthwise convolution as if it were dense: ``groups`` times too much."""
    shape = input_shape if transposed else grad_output_shape  # the positions each weight element visits
    forward = 2 * shape[0] * math.prod(shape[2:]) * math.prod(weight_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def float8_config():
    """torchao's dynamic float8 recipe of docs/performance.md: e4m3 weights and activations, one scale per row.

    ``activation_value_lb`` keeps an all-zero activation row finite: its scale would be 0 and the row 0 / 0 = NaN.
    SD3-layout prompt embeddings hold such rows (CLIP's channels padded to 4096, the absent T5 tokens zero), and
    without the bound the whole image turned NaN (one H100 run)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=1e-12)


def is_large_linear(module: torch.nn.Module, _name: str = "") -> bool:
    """The ``nn.Linear`` layers the float8 recipe converts (``filter_fn`` of torchao's ``quantize_``): both sides at
    least 256 features, where a float8 matmul can beat its scaling overhead."""
    return isinstance(module, torch.nn.Linear) and min(module.in_features, module.out_features) >= 256


def flop_counter():
    """torch's ``FlopCounterMode`` (multiply-add = 2) with :func:`conv_backward_flops` for convolution backwards."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def count_flops(build: Callable[[], torch.nn.Module], make_inputs: Callable[..., dict], call=None) -> int:
    """FLOPs of one forward (``torch.utils.flop_counter``, multiply-add = 2) on the ``meta`` device: no memory used.

    ``build()`` makes the model and ``make_inputs(model, device, dtype)`` its keyword inputs;
    ``call(model, **inputs)`` runs it (default: ``model(**inputs)``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        inputs = make_inputs(model, torch.device("meta"), torch.float32)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            (call or (lambda m, **kw: m(**kw)))(model, **inputs)
    return counter.get_total_flops()


def cuda_graph(fn: Callable[[], object], device: torch.device, warmup: int = 2) -> tuple[Callable[[], None], object]:
    """Capture ``fn()`` (whose inputs are fixed tensors) in a CUDA graph after ``warmup`` calls on a side stream.

    Returns ``(replay, output)``: ``replay()`` re-runs every captured kernel and refreshes ``output`` in place.
    """
    from diffusers_snapgen.pipelines.cuda_graphs import capture_graph

    graph, output = capture_graph(fn, device, warmup)
    return graph.replay, output


class Budget:
    """Wall-clock budget of a benchmark run: optional measurements are skipped once too little time is left."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.seconds is None or self.elapsed() + estimate_s <= self.seconds


def attempt(row: dict, fn: Callable[[], dict | None]) -> dict:
    """Run ``fn()`` and merge the dict it returns into ``row``; on any error record ``error = "failed: ..."`` instead
    (one failing measurement must not lose the others)."""
    try:
        row.update(fn() or {})
    except Exception as error:  # noqa: BLE001 - recorded in the table, the run goes on
        traceback.print_exc()
        row["error"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:240]
    return row
