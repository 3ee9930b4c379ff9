"""Every inference-speed number of the SnapGen UNet and pipeline on one GPU, in one run, checked against targets.

Measured in this order (most important first; optional parts are skipped when ``--budget-s`` would run out):

1. bf16 matmul peak (8192³ GEMMs): the reference for "% of peak".
2. SnapGen UNet step (paper config, bf16, 1024²) eager at batch 1/8/16 (channels-last; batch 1 also NCHW, as
   one CUDA graph of the eager kernels, and after ``unet.fuse_qkv_projections()``).
3. ``pipe(...)`` end to end (4 steps, tiny decoder, CLIP-L + CLIP-G), eager, text excluded/included/alone; and
   the fast sampler without compilation (eager kernels in one CUDA graph, compared with the eager images).
4. Ablation variants (e) and (f) (QK-norm + RoPE), eager in interleaved rounds and eager replayed as a CUDA graph;
   where the fused QK-norm + RoPE kernel runs (CUDA + Triton), (f) again with it switched off (``f_plain_ops``).
5. Anchors, eager: SANA-1.6B and SDXL steps at batch 1, SANA-Sprint (2 steps) and SDXL (4 steps) end to end.
6. The UNet compiled (``unet.compile(fullgraph=True)``, default inductor mode) + CUDA graph at batch 1, and the
   same step reading the text's keys and values precomputed once per prompt (as the fast sampler runs it).
7. The fast sampler (``pipe.fast_sampler``: the compiled UNet, compiled decoder, steps + decoder in one CUDA graph,
   text encoders in a second graph), text excluded/included, and its largest pixel difference from the eager
   pipeline.
8. The compiled UNet at batch 8 and 16: one more whole-model compile (dynamic batch) if the batch-1 compile time
   says it fits the budget, else regional compilation of a fresh UNet + CUDA graph.
9. Optional: the batch-1 compiled step after ``fuse_qkv_projections()``, once per compile recipe of
   ``--fused-recipes`` (inductor's defaults, the community recipes' inductor options, freezing, max-autotune), with
   the fast sampler around the fastest; variants (e)/(f) with regional compilation; the pipeline's UNet in float8
   (torchao) at batch 1 and 16 with regional compilation, beside bf16 compiled the same way, and the fast sampler's
   images with it against the eager bf16 ones (``--fp8``; ``--fp8-mode eager+graph`` replays eager kernels
   instead of compiling).

Every part fails soft: a failure is recorded as ``failed: <reason>`` and the run goes on. Results go to
``<out>/inference_suite_<device>.{json,md}``; a compact table is printed at the end.

    python benchmarks/run_inference_suite.py --out benchmarks/results           # one H200: about 7 minutes
    python benchmarks/run_inference_suite.py --smoke --out smoke_out           # CPU, tiny models, every code path
    python benchmarks/run_inference_suite.py --sections compiled_b1,fused_compiled --out ...   # a subset
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_table  # noqa: E402
import bench_models  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_qk_norm_rope  # noqa: E402
from common import (  # noqa: E402
    Budget,
    attempt,
    device_name,
    float8_config,
    is_large_linear,
    markdown_table,
    matmul_peak_tflops,
    write_results,
)
from pipeline_builders import BUILDERS  # noqa: E402

from diffusers_snapgen.models import qk_norm_rope  # noqa: E402

#: (key, what, target, comparison) for the summary; values are filled in from the rows.
TARGETS = [
    ("unet_b1_compiled_ms", "UNet step, batch 1, compiled + CUDA graph, best recipe (ms)", 5.0, "<="),
    ("unet_b1_text_kv_ms", "UNet step, batch 1, compiled + CUDA graph, text keys and values precomputed (ms)", None,
     None),
    ("unet_b16_compiled_pct_peak", "UNet step, batch 16, compiled (else regional): % of bf16 matmul peak", 45.0,
     ">="),
    ("unet_b1_eager_vs_sana", "UNet step, batch 1, eager (best layout or fused QKV) / SANA-1.6B eager", 1.0, "<="),
    ("fast_image_ms", "4-step 1024² image + tiny decoder, text excluded (ms)", 30.0, "<="),
    ("fast_image_text_ms", "... with CLIP-L + CLIP-G encoding (ms)", 40.0, "<="),
    ("variant_f_eager_cost_pct", "variant (f) vs (e) latency, eager (%)", 10.0, "<="),
    ("variant_f_plain_eager_cost_pct", "variant (f), QK-norm + RoPE as plain ops (no fused kernel), vs (e), eager (%)",
     None, None),
    ("variant_f_graph_cost_pct", "variant (f) vs (e) latency, eager CUDA graph (%)", None, None),
    ("variant_f_plain_graph_cost_pct", "variant (f), QK-norm + RoPE as plain ops, vs (e), eager CUDA graph (%)", None,
     None),
    ("variant_f_regional_cost_pct", "variant (f) vs (e) latency, regional compile + graph (%)", None, None),
]
#: Rows of the UNet after ``fuse_qkv_projections()``.
FUSED = "snapgen_unet_fused_qkv"
#: Suffix of rows whose step reads the text's cross-attention keys and values precomputed once per prompt
#: (``unet.precompute_cross_attention_kv``), as the fast sampler runs it; the batch-1 target counts whole steps.
TEXT_KV = "_text_kv"
#: Ablation row of variant (f) with QK-norm + RoPE as plain PyTorch ops (the fused kernel switched off).
PLAIN_F = bench_qk_norm_rope.PLAIN_F
#: Interleaved rounds of the eager ablation forwards (one forward of each variant per round).
ABLATION_ROUNDS = 30
#: Inductor options of the community's diffusers speed recipes (1x1 convolutions as matmuls, coordinate-descent
#: tuning of the generated kernels, no epilogue fusion into matmuls).
TUNED_OPTIONS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}
#: ``torch.compile`` keyword arguments of the fused step's recipes (``--fused-recipes``): inductor's defaults; the
#: community options above; ``freezing`` (weights folded into the graph as constants, inference only); inductor's
#: autotuning of matmul/convolution templates and kernel configs (CUDA graphs are added by the suite, not the mode).
FUSED_RECIPES = {
    "default": {},
    "tuned": {"options": TUNED_OPTIONS},
    "freezing": {"options": {"freezing": True}},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
}


def with_text_kv(unet):
    """``unet(**inputs)`` reading the text's cross-attention keys and values, computed once per distinct
    ``encoder_hidden_states`` outside the timed (and graphed) step, as the fast sampler does once per image."""
    cache = {}

    def call(**inputs):
        text = inputs["encoder_hidden_states"]
        if cache.get("text") is not text:
            cache.update(text=text, kv=unet.precompute_cross_attention_kv(text))
        return unet(**inputs, cross_attention_kv=cache["kv"])

    return call


def is_fast_mode(mode) -> bool:
    """The fast sampler's lossless rows (separate or fused QKV projections, any compile recipe), not float8."""
    return mode == "fast" or str(mode).startswith("fast-fused-qkv")


class Suite:
    """Holds the run's settings, rows and budget; each ``section_*`` adds rows and never raises."""

    def __init__(self, args):
        self.smoke = args.smoke
        self.device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.resolution = 64 if self.smoke else 1024
        self.batch_sizes = [1, 2] if self.smoke else [1, 8, 16]
        self.backend = "eager" if self.smoke else "inductor"  # smoke: dynamo only, no C++/Triton compilation
        self.warmup, self.iters = (0, 1) if self.smoke else (2, 10)
        self.pipe_warmup, self.pipe_iters = (0, 1) if self.smoke else (1, 3)
        self.budget = Budget(args.budget_s)
        self.fp8 = args.fp8
        self.fp8_mode = args.fp8_mode
        self.fused_recipes = args.fused_recipes
        self.skip_anchors = args.skip_anchors
        self.out = args.out
        self.meta = dict(device=device_name(self.device), torch=torch.__version__,
                         dtype=str(self.dtype).replace("torch.", ""), resolution=self.resolution, smoke=self.smoke,
                         cudnn_benchmark=args.cudnn_benchmark)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        self.steps: list[dict] = []
        self.pipelines: list[dict] = []
        self.ablation: list[dict] = []
        self.notes: list[str] = []
        self.peak = None
        self.flops: dict = {}
        self.pipe = None
        self.latents = None
        self.reference = None
        self.specs = bench_models.build_specs(self.resolution, smoke=self.smoke)

    # ------------------------------------------------------------------ helpers

    def log(self, message: str):
        line = f"[{self.budget.elapsed():6.1f}s] {message}"
        print(line, flush=True)

    def skip(self, what: str, estimate_s: float) -> bool:
        if self.budget.allows(estimate_s):
            return False
        self.notes.append(f"{what}: skipped (time budget: {self.budget.elapsed():.0f}s used)")
        self.log(self.notes[-1])
        return True

    def unet_rows(self, model, batch_sizes, mode, name="snapgen_unet", call=None, spec_name=None):
        spec_name = spec_name or name
        rows = bench_models.step_rows(
            name, model, self.specs[spec_name], batch_sizes, mode, self.device, self.dtype, warmup=self.warmup,
            iters=self.iters, flops_per_sample=self.flops.get(spec_name), peak_tflops=self.peak,
            compile_kwargs={"backend": self.backend, "fullgraph": True}, budget=self.budget, call=call,
        )
        self.steps += rows
        return rows

    def text_kv_row(self, name: str):
        """The compiled batch-1 step of ``pipe.unet`` reading precomputed text keys and values, as row ``name`` +
        :data:`TEXT_KV`: the graph the fast sampler replays (one more compile, which the sampler then reuses)."""
        self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "compiled", name=name + TEXT_KV,
                       call=with_text_kv(self.pipe.unet), spec_name="snapgen_unet")

    def fresh_unet(self, purpose: str):
        """A new paper-config UNet with random weights on the device (the pipeline's stays as it is), or ``None``
        with a note naming ``purpose`` when it cannot be built."""
        built = attempt({}, lambda: {"m": bench_models.build_model(self.specs["snapgen_unet"], self.device,
                                                                   self.dtype)})
        if "m" not in built:
            self.notes.append(f"{purpose}: {built['error']}")
        return built.get("m")

    def recompile_estimate(self) -> float:
        """Seconds one more whole-UNet compile is expected to take, from the batch-1 compile of this run."""
        first = next((r for r in self.steps if r["model"] == "snapgen_unet" and r["mode"] == "compiled"
                      and r.get("compile_s")), None)
        return 1.3 * first["compile_s"] + 20 if first else 120.0

    # ------------------------------------------------------------------ sections

    def section_peak(self):
        self.log("bf16 matmul peak")
        row = attempt({}, lambda: {"tflops": matmul_peak_tflops(
            self.device, self.dtype, size=8192 if self.device.type == "cuda" else 256)})
        self.peak = row.get("tflops")
        self.meta["matmul_peak_tflops"] = self.peak if self.peak else row.get("error")
        for name in ("snapgen_unet", "sana_1600m_transformer"):
            if name in self.specs:
                self.flops[name] = attempt({}, lambda: {"f": bench_models.spec_flops(self.specs[name])}).get("f")
        self.meta["gflops_per_image"] = {k: v / 1e9 for k, v in self.flops.items() if v}

    def section_snapgen_eager(self):
        self.log("SnapGen pipeline: build, UNet eager steps, eager pipeline")
        built = attempt({}, lambda: {"pipe": BUILDERS["snapgen"](self.device, self.dtype, smoke=self.smoke)})
        if "pipe" not in built:
            self.notes.append(f"SnapGen pipeline: {built['error']}")
            return
        self.pipe = built["pipe"]
        self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "eager-nchw")  # the layout of the earlier anchors
        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)
        self.unet_rows(self.pipe.unet, self.batch_sizes, "eager")
        self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "eager+graph")  # eager kernels without launch cost
        self.latents = bench_pipeline.reference_latents(self.pipe, self.resolution, self.device)
        rows, self.reference = bench_pipeline.eager_rows(
            "snapgen", self.pipe, self.device, self.resolution, self.smoke, warmup=self.pipe_warmup,
            iters=self.pipe_iters, reference_latents=self.latents,
        )
        self.pipelines += rows
        # The fast sampler without compilation: eager kernels in one CUDA graph (checks capture, shows launch cost).
        self.pipelines += bench_pipeline.fast_rows(
            self.pipe, self.device, self.resolution, warmup=self.pipe_warmup, iters=self.pipe_iters,
            latents=self.latents, reference=self.reference, mode="graph", compile=None,
        )
        # diffusers' fuse_qkv_projections(): one matmul for Q/K/V (self-attention) and one for K/V (cross-attention).
        self.pipe.unet.fuse_qkv_projections()
        try:
            self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "eager", name=FUSED, spec_name="snapgen_unet")
        finally:  # later sections time the separate projections
            self.pipe.unet.unfuse_qkv_projections()

    def section_ablation(self):
        """Variants (e), (f) and, where the fused QK-norm + RoPE kernel runs (CUDA with Triton), (f) with the plain
        ops (``PLAIN_F``): eager forwards in interleaved rounds, since single eager timings of this host-bound step
        drift by tens of percent between runs, and each forward replayed as a CUDA graph
        (``bench_qk_norm_rope.forward_ab``)."""
        self.log("ablation e / f / f with plain QK-norm + RoPE ops: eager in interleaved rounds, eager CUDA graph")
        latent, tokens = self.resolution // 8, 8 if self.smoke else 333
        rounds = 2 if self.smoke else ABLATION_ROUNDS
        result = attempt({}, lambda: {"rows": bench_qk_norm_rope.forward_ab(
            rounds, 1, latent, tokens, self.smoke, self.device, self.dtype)})
        kernel_runs = self.device.type == "cuda" and qk_norm_rope._triton_available()
        for measured in result.get("rows", [dict(variant=key, eager_ms=result.get("error")) for key in ("e", "f")]):
            if measured["variant"] == PLAIN_F and not kernel_runs:
                continue
            row = self.ablation_row(measured["variant"])
            row["ms_eager"], row["ms_eager_graph"] = measured["eager_ms"], measured.get("graph_ms")
        bench_models.release(self.device)

    def ablation_row(self, key: str) -> dict:
        row = next((r for r in self.ablation if r["variant"] == key), None)
        if row is None:
            variant = "f" if key == PLAIN_F else key
            step = ablation_table.ablation_variants()[variant]["description"]
            row = dict(variant=key, step=step + (", QK-norm + RoPE as plain ops" if key == PLAIN_F else ""))
            self.ablation.append(row)
        return row

    def section_compiled_b1(self):
        if self.pipe is None:
            return
        self.log("SnapGen UNet: compile (fullgraph, default inductor mode) + CUDA graph, batch 1")
        compiled = attempt({}, lambda: {"ok": self.pipe.unet.compile(fullgraph=True, backend=self.backend)})
        if "error" in compiled:
            self.notes.append(f"UNet compile: {compiled['error']}")
            return
        self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "compiled", call=self.pipe.unet)
        self.text_kv_row("snapgen_unet")

    def section_fast_pipeline(self):
        if self.pipe is None:
            return
        self.log("SnapGen fast sampler (compiled decoder, one CUDA graph)")
        self.pipelines += bench_pipeline.fast_rows(
            self.pipe, self.device, self.resolution, warmup=self.pipe_warmup + 1, iters=self.pipe_iters + 2,
            latents=self.latents, reference=self.reference, compile="full",
            compile_kwargs={"backend": self.backend},
        )

    def section_compiled_batches(self):
        """Batch 8 and 16 compiled: a whole-model recompile (dynamic batch) when the batch-1 compile time says it
        fits in the budget, else regional compilation of a fresh UNet (three small graphs per batch size). The
        whole-model rows need the UNet that ``section_compiled_b1`` compiled: without it they would time eager calls."""
        if self.pipe is None:
            return
        full_estimate = self.recompile_estimate()
        larger = self.batch_sizes[1:]
        whole = getattr(self.pipe.unet, "_compiled_call_impl", None) is not None  # nn.Module.compile() succeeded
        if not whole:
            self.notes.append("compiled batches: the batch-1 UNet is not compiled, so only regional rows are timed")
        elif self.smoke or self.budget.allows(full_estimate):
            self.log(f"SnapGen UNet compiled, batch {larger} (dynamic-batch recompile, ~{full_estimate:.0f}s)")
            self.unet_rows(self.pipe.unet, larger, "compiled", call=self.pipe.unet)
        if self.smoke or not whole or not self.budget.allows(full_estimate):
            if not self.smoke and self.skip("regional-compiled UNet at larger batches", 50):
                return
            sizes = larger if self.smoke or self.budget.allows(80) else larger[-1:]
            self.log(f"SnapGen UNet regional compile + CUDA graph, batch {sizes} (fresh UNet)")
            model = self.fresh_unet("regional UNet")
            if model is None:
                return
            compiled = attempt({}, lambda: {"ok": model.compile_repeated_blocks(fullgraph=True, backend=self.backend)})
            if "error" in compiled:
                self.notes.append(f"regional compile: {compiled['error']}")
                return
            self.unet_rows(model, sizes, "regional", call=model)
            bench_models.release(self.device)

    def section_fused_compiled(self):
        """The batch-1 compiled step after ``fuse_qkv_projections()``, one fresh static compile per recipe of
        ``--fused-recipes`` (:data:`FUSED_RECIPES`); the fast sampler around every recipe that is the fastest so far."""
        if self.pipe is None:
            return
        estimate = self.recompile_estimate()
        self.pipe.unet.fuse_qkv_projections()
        best = None
        try:
            for recipe in self.fused_recipes:
                extra = FUSED_RECIPES[recipe] if self.backend == "inductor" else {}  # smoke: dynamo only
                name = FUSED if recipe == "default" else f"{FUSED}_{recipe}"
                if self.skip(f"compiled UNet {name}", estimate * (3 if "mode" in extra else 1)):
                    break
                self.log(f"SnapGen UNet {name}: compile {extra or ''} + CUDA graph, batch 1")
                torch._dynamo.reset()
                self.pipe.unet.compile(fullgraph=True, backend=self.backend, **extra)
                ms = self.unet_rows(self.pipe.unet, self.batch_sizes[:1], "compiled", name=name, call=self.pipe.unet,
                                    spec_name="snapgen_unet")[0].get("ms")
                if ms is None or (best is not None and ms >= best):
                    continue
                best = ms  # the fast sampler around the fastest step so far (the decoder's graph is cached)
                self.text_kv_row(name)
                self.log(f"SnapGen fast sampler with the fused UNet ({recipe})")
                self.pipelines += bench_pipeline.fast_rows(
                    self.pipe, self.device, self.resolution, warmup=self.pipe_warmup + 1, iters=self.pipe_iters + 2,
                    latents=self.latents, reference=self.reference,
                    mode="fast-fused-qkv" + ("" if recipe == "default" else f"-{recipe}"), compile="full",
                    compile_kwargs={"backend": self.backend})
        finally:
            self.pipe.unet.unfuse_qkv_projections()

    def section_anchor_steps(self):
        if self.skip_anchors:
            return
        for name in ("sana_1600m_transformer", "sdxl_unet"):
            if name not in self.specs or self.skip(f"{name} eager step", 15):
                continue
            self.log(f"anchor {name}: eager step, batch 1")
            model = attempt({}, lambda: {"m": bench_models.build_model(self.specs[name], self.device, self.dtype)})
            if "m" in model:
                self.unet_rows(model.pop("m"), [1], "eager", name=name)
            else:
                self.steps.append(dict(model=name, batch=1, mode="eager", error=model["error"]))
            bench_models.release(self.device)

    def section_anchors(self):
        if self.skip_anchors:
            self.notes.append("anchors: skipped (--skip-anchors)")
            return
        for name in ("sana_sprint", "sdxl"):
            if self.skip(f"{name} pipeline", 25):
                continue
            self.log(f"anchor {name} pipeline: eager")
            built = attempt({}, lambda: {"pipe": BUILDERS[name](self.device, self.dtype, smoke=self.smoke)})
            if "pipe" not in built:
                self.pipelines.append(dict(pipeline=name, mode="eager", error=built["error"]))
                continue
            rows, _ = bench_pipeline.eager_rows(name, built.pop("pipe"), self.device, self.resolution, self.smoke,
                                                warmup=self.pipe_warmup, iters=self.pipe_iters)
            self.pipelines += rows
            bench_models.release(self.device)

    def section_regional_ablation(self):
        """Variants (e) and (f) regionally compiled + CUDA graph (compiled, (f) runs the plain ops either way)."""
        if self.skip("ablation e/f with regional compilation", 60 if not self.smoke else 0):
            return
        self.log("ablation e / f: regional compile + CUDA graph")
        widths = ablation_table.SMOKE_WIDTHS if self.smoke else {}
        latent, tokens = self.resolution // 8, 8 if self.smoke else 333
        for key in ("e", "f"):
            config = {**ablation_table.ablation_variants()[key]["config"], **widths}
            timing = attempt({}, lambda: {"ms": ablation_table.latency(
                config, latent, tokens, self.device, "regional", self.dtype, iters=self.iters,
                compile_backend=self.backend)})
            self.ablation_row(key)["ms_regional"] = timing.get("ms", timing.get("error"))
            bench_models.release(self.device)

    def section_fp8(self):
        """The pipeline's UNet with its large linear layers in float8 (torchao, dynamic per-row scales), with regional
        compilation + CUDA graph at batch 1 and the largest batch, each beside a fresh bf16 UNet compiled the same
        way, then the fast sampler around it: its images against the eager bf16 pipeline's (PSNR). Both batch sizes
        come before the sampler: at batch 1 float8 only adds scaling kernels, so the larger batch is where it can
        pay. Regional, not whole-model: the whole float8 UNet's first compiled call ran past 850 s on an H200, and the
        repeated blocks compile once each. ``--fp8-mode eager+graph`` replays eager kernels instead (no compile, so
        the estimates that decide what fits the budget are smaller). Runs last: the pipeline's UNet stays
        quantized."""
        mode = self.fp8_mode
        # seconds each part is expected to take (compiles measured on an H100: 114 s per shape, 144 s for the sampler)
        estimate = {"start": 90, "batch": 120, "sampler": 150} if mode == "regional" else dict.fromkeys(
            ("start", "batch", "sampler"), 20)
        if self.smoke:
            estimate = dict.fromkeys(estimate, 0)
        if self.pipe is None or not self.fp8 or self.skip("float8 UNet", estimate["start"]):
            return
        self.log(f"float8 (torchao) UNet, {mode}, batch 1 and the largest batch; fast sampler")

        def quantize():
            from torchao.quantization import quantize_

            quantize_(self.pipe.unet, float8_config(), filter_fn=is_large_linear)
            return {}

        quantized = attempt({}, quantize)
        if "error" in quantized:
            self.steps.append(dict(model="snapgen_unet_fp8", batch=1, mode=mode, error=quantized["error"]))
            return
        self.pipe.unet._compiled_call_impl = None  # drop an earlier section's whole-model compile (nn.Module.compile)
        for index, batches in enumerate((self.batch_sizes[:1], self.batch_sizes[-1:])):
            if index and self.skip("float8 UNet at the largest batch", estimate["batch"]):
                break
            # Regional graphs count per stage and shape against torch's limit of 8 per code object: start anew.
            torch._dynamo.reset()
            # the bf16 reference (after quantizing, so a missing torchao costs nothing): a fresh UNet, same compile
            self.log(f"float8: the bf16 reference at batch {batches[0]}, a fresh UNet, {mode}")
            reference = self.fresh_unet("float8 bf16 reference UNet")
            if reference is not None:
                self.unet_rows(reference, batches, mode)
                del reference
                bench_models.release(self.device)
            # Progress lines: a float8 compile once ran past 525 s with nothing printed to show which phase it was in.
            self.log(f"float8: the batch-{batches[0]} step, {mode} (first call)")
            # regional: the first pass applies compile_repeated_blocks; the second calls the compiled blocks again
            rows = self.unet_rows(self.pipe.unet, batches, mode, name="snapgen_unet_fp8",
                                  call=self.pipe.unet if index and mode == "regional" else None,
                                  spec_name="snapgen_unet")
            first_call = f" after a {rows[0]['compile_s']:.0f} s first call" if rows[0].get("compile_s") else ""
            self.log(f"float8: batch-{batches[0]} step: {rows[0].get('ms', rows[0].get('error'))} ms{first_call}")
            if "ms" not in rows[0]:
                return
        if self.skip("float8 fast sampler", estimate["sampler"]):
            return
        torch._dynamo.reset()
        regional = mode == "regional"
        how = "its compiled blocks, the decoder compiled" if regional else "eager kernels in one CUDA graph"
        self.log(f"SnapGen fast sampler with the float8 UNet ({how})")
        self.pipelines += bench_pipeline.fast_rows(
            self.pipe, self.device, self.resolution, warmup=self.pipe_warmup + 1, iters=self.pipe_iters + 2,
            latents=self.latents, reference=self.reference, mode="fp8-fast" if regional else "fp8-graph",
            compile="full" if regional else None, compile_kwargs={"backend": self.backend})

    # ------------------------------------------------------------------ summary

    def target_values(self) -> dict:
        def step(model, batch, mode, key="ms"):
            row = next((r for r in self.steps if r["model"] == model and r["batch"] == batch and r["mode"] == mode
                        and key in r), None)
            return row.get(key) if row else None

        def pipeline(text):
            return min((r["ms"] for r in self.pipelines if r.get("pipeline") == "snapgen"
                        and is_fast_mode(r.get("mode")) and r.get("text") == text and "ms" in r), default=None)

        def cost(column, variant="f"):
            rows = {r["variant"]: r.get(column) for r in self.ablation}
            e, f = rows.get("e"), rows.get(variant)
            return 100 * (f / e - 1) if isinstance(e, float) and isinstance(f, float) else None

        eager = min(filter(None, [step("snapgen_unet", 1, "eager"), step("snapgen_unet", 1, "eager-nchw"),
                                  step(FUSED, 1, "eager")]), default=None)
        compiled_names = ["snapgen_unet", FUSED] + [f"{FUSED}_{recipe}" for recipe in FUSED_RECIPES]
        compiled = min(filter(None, [step(name, 1, "compiled") for name in compiled_names]), default=None)
        text_kv = min(filter(None, [step(name + TEXT_KV, 1, "compiled") for name in compiled_names]), default=None)
        sana = step("sana_1600m_transformer", 1, "eager")
        largest = self.batch_sizes[-1]
        return {
            "unet_b1_compiled_ms": compiled,
            "unet_b1_text_kv_ms": text_kv,
            "unet_b16_compiled_pct_peak": (step("snapgen_unet", largest, "compiled", "pct_peak")
                                           or step("snapgen_unet", largest, "regional", "pct_peak")),
            "unet_b1_eager_vs_sana": eager / sana if eager and sana else None,
            "fast_image_ms": pipeline("excluded"),
            "fast_image_text_ms": pipeline("included"),
            "variant_f_eager_cost_pct": cost("ms_eager"),
            "variant_f_plain_eager_cost_pct": cost("ms_eager", PLAIN_F),
            "variant_f_graph_cost_pct": cost("ms_eager_graph"),
            "variant_f_plain_graph_cost_pct": cost("ms_eager_graph", PLAIN_F),
            "variant_f_regional_cost_pct": cost("ms_regional"),
        }

    def summary_rows(self) -> list[dict]:
        values = self.target_values()
        rows = []
        for key, what, target, comparison in TARGETS:
            value = values.get(key)
            if value is None:
                status = "not measured"
            elif target is None:
                status = "reported"
            elif self.smoke:
                status = "smoke run: not a measurement"
            else:
                status = "met" if (value <= target if comparison == "<=" else value >= target) else "missed"
            rows.append(dict(target=what, goal=f"{comparison} {target:g}" if target is not None else "—",
                             value=value, status=status))
        return rows

    def report(self) -> str:
        self.meta["wall_s"] = self.budget.elapsed()
        header = (
            f"# SnapGen inference suite — {self.meta['device']}, torch {self.meta['torch']}, {self.meta['dtype']}, "
            f"{self.resolution}² images, random weights{' (smoke: tiny models, CPU)' if self.smoke else ''}"
            f"{', cuDNN benchmark mode on' if self.meta['cudnn_benchmark'] else ''}\n\n"
            f"{self.meta['dtype']} matmul peak measured in this run: {_fmt(self.meta.get('matmul_peak_tflops'))} "
            "TFLOP/s; "
            f"whole run {self.meta['wall_s']:.0f} s. Graphs compiled per section (the fast sampler should reuse the "
            f"UNet graph of the batch-1 step): {self.meta.get('graphs_compiled')}. Methods: docs/performance.md.\n"
        )
        step_columns = ["model", "batch", "mode", "ms", "tflops", "pct_peak", "compile_s", "peak_gib", "note",
                        "error"]
        ablation_columns = ["variant", "step", "ms_eager", "ms_eager_graph", "ms_regional"]
        parts = [
            header,
            "## Targets\n\n" + markdown_table(self.summary_rows(), ["target", "goal", "value", "status"]),
            "## UNet / transformer step\n\n" + markdown_table(self.steps, step_columns),
            "## End to end\n\n" + markdown_table(self.pipelines, bench_pipeline.COLUMNS),
            "## Ablation (e) -> (f): QK-norm + RoPE\n\n" + markdown_table(self.ablation, ablation_columns),
        ]
        if self.notes:
            parts.append("## Notes\n\n" + "\n".join(f"- {note}" for note in self.notes))
        return "\n\n".join(parts) + "\n"

    def save(self):
        report = self.report()  # sets meta["wall_s"] before the JSON copies meta
        payload = dict(self.meta, targets=self.summary_rows(), steps=self.steps, pipelines=self.pipelines,
                       ablation=self.ablation, notes=self.notes)
        if self.out is not None:
            write_results(self.out, f"inference_suite_{self.device.type}", json.loads(json.dumps(payload, default=str)),
                          report)


#: Every section, in the order they run (most important first).
SECTIONS = ["peak", "snapgen_eager", "ablation", "anchor_steps", "anchors", "compiled_b1", "fast_pipeline",
            "compiled_batches", "fused_compiled", "regional_ablation", "fp8"]
NEEDS_PIPELINE = {"compiled_b1", "fast_pipeline", "compiled_batches", "fused_compiled", "fp8"}  # after snapgen_eager
NEEDS_SECTION = {"compiled_batches": "compiled_b1"}  # recompiles the batch-1 compiled UNet for the larger batches


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for inference_suite_<device>.{json,md}")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU (every code path, no GPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip optional parts past this many seconds (default 600; smoke: none)")
    parser.add_argument("--fp8", action="store_true",
                        help="also time the UNet in float8 (torchao) at batch 1 and the largest batch, and its images")
    parser.add_argument("--fp8-mode", default="regional", choices=["regional", "eager+graph"],
                        help="how the float8 and bf16 rows run: regional compilation + CUDA graph (default), or eager "
                             "kernels in a CUDA graph (no compilation: a minute, not several)")
    parser.add_argument("--fused-recipes", default="default,tuned",
                        help=f"compile recipes of the fused batch-1 step, in order, of: {', '.join(FUSED_RECIPES)}")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True: cuDNN times its convolution algorithms per shape")
    parser.add_argument("--skip-anchors", action="store_true", help="no SANA/SDXL (saves ~30 s)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of the sections, run in the suite's order (default: all; peak, "
                             f"snapgen_eager for the compiled ones and compiled_b1 for compiled_batches are "
                             f"added): {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.budget_s is None and not args.smoke:
        args.budget_s = 600.0
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    fused_recipes = [name.strip() for name in args.fused_recipes.split(",") if name.strip()]
    if not fused_recipes or set(fused_recipes) - set(FUSED_RECIPES):
        parser.error(f"--fused-recipes must name some of {', '.join(FUSED_RECIPES)}; got {args.fused_recipes!r}")
    args.fused_recipes = fused_recipes
    if args.smoke and args.device not in (None, "cpu"):
        parser.error("--smoke runs on the CPU: leave --device out")

    chosen = SECTIONS if args.sections is None else [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        parser.error(f"--sections must name some of {', '.join(SECTIONS)}; got {args.sections!r}")
    chosen = {"peak", *chosen}  # "% of peak" needs it (a few seconds)
    chosen |= {NEEDS_SECTION[name] for name in chosen if name in NEEDS_SECTION}
    if chosen & NEEDS_PIPELINE:
        chosen.add("snapgen_eager")  # builds the pipeline those sections time

    suite = Suite(args)
    sections = [getattr(suite, f"section_{name}") for name in SECTIONS if name in chosen]
    from torch._dynamo.utils import counters

    suite.meta["graphs_compiled"] = {}
    for section in sections:
        before = counters["stats"]["unique_graphs"]
        outcome = attempt({}, section)  # a section that raises is recorded and the run goes on
        if "error" in outcome:
            suite.notes.append(f"{section.__name__}: {outcome['error']}")
        suite.meta["graphs_compiled"][section.__name__] = counters["stats"]["unique_graphs"] - before
        suite.save()
    print(suite.report())
    print(markdown_table(suite.summary_rows(), ["target", "goal", "value", "status"]))
    return suite


if __name__ == "__main__":
    main()
