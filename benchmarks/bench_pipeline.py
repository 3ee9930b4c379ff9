"""End-to-end text-to-image time at 1024²: SnapGen beside SANA-Sprint 1.6B and SDXL, in one run.

Each pipeline is built with random weights from its published config (``pipeline_builders.py``) and timed as
``pipe(...)`` returning a tensor, with text encoding included (``pipe(prompt)``) and excluded (precomputed
embeddings), plus text encoding alone. SnapGen is also timed through its fast sampler (``pipe.fast_sampler``:
compiled UNet and decoder, the 4 steps and the decoder replayed as one CUDA graph), whose images are compared with
the eager pipeline's from the same noise (``max_abs_diff`` and ``psnr_db``, images in [0, 1]).

    python benchmarks/bench_pipeline.py --out benchmarks/results                      # GPU, full run
    python benchmarks/bench_pipeline.py --smoke --out smoke_out                      # CPU, tiny pipelines
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attempt, device_name, markdown_table, time_ms, write_results  # noqa: E402
from pipeline_builders import BUILDERS, PROMPT, STEPS, call_kwargs, encode_text, text_embeddings  # noqa: E402

PIPELINES = tuple(BUILDERS)
COLUMNS = ["pipeline", "steps", "mode", "text", "ms", "compile_s", "max_abs_diff", "psnr_db", "note", "error"]


def compare(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """Largest pixel difference and mean PSNR (images in [0, 1], peak 1) of ``images`` against ``reference``; an
    ``error`` where the images hold NaN or inf (a broken numeric path, e.g. float8 scales of all-zero rows)."""
    from diffusers_snapgen.training.reconstruction import psnr

    out = {"max_abs_diff": (images.float() - reference).abs().max().item(),
           "psnr_db": psnr(images.float(), reference).mean().item()}
    nonfinite = (~torch.isfinite(images)).sum().item()
    if nonfinite:
        out["error"] = f"{nonfinite} of {images.numel()} pixel values are NaN or inf"
    return out


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def eager_rows(name, pipe, device, resolution, smoke=False, warmup=1, iters=3, reference_latents=None) -> tuple:
    """Rows for text encoding alone and ``pipe(...)`` with text excluded/included; also returns the images
    ``pipe`` makes from ``reference_latents`` (for comparing a fast path), or None."""
    base = call_kwargs(name, pipe, resolution, smoke)
    embeds = text_embeddings(name, pipe, device)
    rows = []

    def row(mode, text):
        return dict(pipeline=name, steps=STEPS[name], mode=mode, text=text)

    rows.append(attempt(row("eager", "only"), lambda: {
        "ms": time_ms(lambda: encode_text(name, pipe, device), device, warmup=warmup, iters=iters)}))
    with torch.no_grad():
        rows.append(attempt(row("eager", "excluded"), lambda: {
            "ms": time_ms(lambda: pipe(**embeds, **base), device, warmup=warmup, iters=iters)}))
        rows.append(attempt(row("eager", "included"), lambda: {
            "ms": time_ms(lambda: pipe(PROMPT, **base), device, warmup=warmup, iters=iters)}))
        reference = None
        if reference_latents is not None:
            reference = pipe(**embeds, **base, latents=reference_latents).images.float()
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows, reference


def reference_latents(pipe, resolution, device, seed=0):
    """Fixed initial noise for comparing two ways of sampling the same SnapGen pipeline."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator).to(device=device, dtype=pipe.unet.dtype)


def _sampler_note(sampler) -> str:
    return (f"compile={sampler.compile_mode}, cuda_graph={sampler.use_cuda_graph}"
            + (f" ({sampler.cuda_graph_error})" if sampler.cuda_graph_error else ""))


def fast_rows(pipe, device, resolution, warmup=2, iters=5, latents=None, reference=None, mode="fast",
              **sampler_kwargs) -> list:
    """SnapGen through ``pipe.fast_sampler(...)``: compile + capture time, then text excluded/included. Rows are
    labelled ``mode`` (e.g. ``"graph"`` for a sampler with ``compile=None``: eager kernels in one CUDA graph)."""
    rows = []
    embeds = text_embeddings("snapgen", pipe, device)
    state = {}

    def build():
        sampler = pipe.fast_sampler(height=resolution, width=resolution, num_inference_steps=STEPS["snapgen"],
                                    guidance_scale=1.0, **sampler_kwargs)
        start = _sync_time(device)
        images = sampler(**embeds, latents=latents, output_type="pt").images  # compiles and captures
        out = {"compile_s": _sync_time(device) - start}
        if reference is not None:
            out.update(compare(images, reference))
        out["note"] = _sampler_note(sampler)
        state["sampler"] = sampler
        return out

    first = attempt(dict(pipeline="snapgen", steps=STEPS["snapgen"], mode=mode, text="excluded"), build)
    sampler = state.get("sampler")
    if sampler is None:
        return [first, dict(first, text="included")]

    first.update(attempt({}, lambda: {
        "ms": time_ms(lambda: sampler(**embeds, output_type="pt"), device, warmup=warmup, iters=iters)}))
    def with_text():
        out = {}
        if reference is not None:  # the graphed text encoders give the eager pipeline's images
            out.update(compare(sampler(PROMPT, latents=latents, output_type="pt").images, reference))
        out["ms"] = time_ms(lambda: sampler(PROMPT, output_type="pt"), device, warmup=warmup, iters=iters)
        out["note"] = _sampler_note(sampler)  # again: the text graph is captured on the first text call
        return out

    second = attempt(dict(pipeline="snapgen", steps=STEPS["snapgen"], mode=mode, text="included"), with_text)
    rows += [first, second]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def release(*objects, device=None):
    del objects
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def table(meta, rows) -> str:
    header = (
        f"# End-to-end text-to-image — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
        f"{meta['resolution']}², batch 1, random weights\n\n`text`: `excluded` = precomputed embeddings, `included` = "
        "`pipe(prompt)`, `only` = text encoding alone. `fast` = SnapGen's fast sampler (compiled UNet and decoder, "
        "steps + decoder in one CUDA graph); `graph` = the same sampler without compilation (eager kernels in one CUDA "
        "graph); `max_abs_diff` and `psnr_db` = the largest pixel difference from the eager pipeline on the same "
        "noise and the PSNR against it (images in [0, 1]): `graph` replays the eager kernels, so it should be ~0; "
        "compiled bf16 kernels round differently and random weights amplify that over the steps.\n"
    )
    return header + "\n" + markdown_table(rows, COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_pipeline_<device>.{json,md}")
    parser.add_argument("--smoke", action="store_true", help="tiny pipelines on CPU in float32 (tests the wiring)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {PIPELINES}")
    parser.add_argument("--no-fast", action="store_true", help="skip SnapGen's fast sampler")
    parser.add_argument("--compile", default="auto", choices=["auto", "full", "regional", "none"],
                        help="fast sampler compilation (auto: full on CUDA, none elsewhere)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if smoke else "bfloat16"))
    resolution = args.resolution or (64 if smoke else 1024)
    if resolution <= 0 or resolution % 32:
        parser.error(f"--resolution must be a positive multiple of 32, got {resolution}")
    names = args.pipelines.split(",")
    if set(names) - set(PIPELINES):
        parser.error(f"--pipelines must be a subset of {PIPELINES}, got {names}")
    iters = args.iters or (1 if smoke else 3)
    warmup = 0 if smoke else 1

    meta = dict(device=device_name(device), torch=torch.__version__, dtype=str(dtype).replace("torch.", ""),
                resolution=resolution, prompt=PROMPT)
    rows = []
    for name in names:
        built = attempt({}, lambda: {"pipe": BUILDERS[name](device, dtype, smoke=smoke)})
        if "pipe" not in built:
            rows.append(dict(pipeline=name, steps=STEPS[name], mode="eager", error=built["error"]))
            continue
        pipe = built.pop("pipe")
        latents = reference_latents(pipe, resolution, device) if name == "snapgen" and not args.no_fast else None
        new_rows, reference = eager_rows(name, pipe, device, resolution, smoke, warmup=warmup, iters=iters,
                                         reference_latents=latents)
        rows += new_rows
        if latents is not None:
            rows += fast_rows(pipe, device, resolution, warmup=warmup, iters=iters, latents=latents,
                              reference=reference, mode="graph", compile=None)
            compile_mode = None if args.compile == "none" else args.compile
            rows += fast_rows(pipe, device, resolution, warmup=warmup, iters=iters, latents=latents,
                              reference=reference, compile=compile_mode)
        release(pipe, device=device)
        if args.out is not None:
            write_results(args.out, f"bench_pipeline_{device.type}", dict(meta, rows=rows), table(meta, rows))
    print(table(meta, rows))
    if args.out is not None:
        write_results(args.out, f"bench_pipeline_{device.type}", dict(meta, rows=rows), table(meta, rows))
    return rows


if __name__ == "__main__":
    main()
