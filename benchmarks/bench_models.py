"""Speed of the SnapGen UNet and TinyDecoder beside the models they replace, in one run.

Every model is built with random weights from its published config (nothing is downloaded), cast to bf16 and
timed at 1024x1024 output for each batch size, in each mode:

- ``eager``: plain PyTorch, channels-last weights (``eager-nchw``: contiguous weights);
- ``eager+graph``: the eager forward replayed as one CUDA graph (no compiler: what launch overhead costs);
- ``compiled``: ``torch.compile`` (default inductor mode) of the whole model, replayed as one CUDA graph per batch
  size (one compile is shared by the batch sizes: the second size compiles a dynamic-batch graph);
- ``regional``: ``compile_repeated_blocks`` (models that define ``_repeated_blocks``), then one CUDA graph.

Throughput is reported as TFLOP/s (FLOPs counted on the ``meta`` device) and as % of the bf16 matmul peak measured
in the same run. Ratios are taken against anchors measured in the same run. CUDA-only parts fail soft: the row
records ``failed: <reason>`` and the run goes on.

    python benchmarks/bench_models.py --out benchmarks/results                      # GPU, full run
    python benchmarks/bench_models.py --smoke --out smoke_out                      # CPU, tiny models, seconds
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
from common import (  # noqa: E402
    attempt,
    count_flops,
    cuda_graph,
    device_name,
    markdown_table,
    matmul_peak_tflops,
    peak_memory_gib,
    reset_peak_memory,
    time_ms,
    write_results,
)

# Anchors measured earlier on one H200 (docs/performance.md): bf16, batch 1, 1024² output, random weights.
# (eager ms, compiled ms)
DESIGN_ANCHORS = {
    "sdxl_unet": (58.8, 23.6),
    "sd3_medium_transformer": (28.0, 22.0),
    "sana_1600m_transformer": (19.9, 7.9),
    "sd3_vae_decoder": (85.1, None),
    "autoencoder_tiny_decoder": (5.9, 2.3),
}
MODES = ("eager", "eager-nchw", "eager+graph", "compiled", "regional")
GRAPH_MODES = ("eager+graph", "compiled", "regional")

SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD3_MEDIUM_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
SD3_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)
#: Text tokens of the SnapGen / SD3 conditioning: CLIP 77 + T5 256.
TEXT_TOKENS = 333


def snapgen_unet_inputs(config, batch: int, latent: int, device, dtype, text_tokens: int = TEXT_TOKENS) -> dict:
    """Keyword inputs of a SnapGen UNet forward (random text conditioning of the config's widths), laid out exactly as
    ``SnapGenPipeline`` and its fast sampler pass them (NCHW latents, an expanded scalar timestep,
    ``return_dict=False``), so a UNet compiled here is reused by the pipeline without recompiling."""
    return dict(
        sample=torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        timestep=torch.full((), 500.0, device=device).expand(batch),
        encoder_hidden_states=torch.randn(batch, text_tokens, config.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype),
        return_dict=False,
    )


def build_specs(resolution: int, smoke: bool = False):
    """name -> (builder, inputs(model, batch, device, dtype) -> kwargs, call wrapper, role, parameter counter)."""
    import diffusers

    from diffusers_snapgen import SnapGenUNet2DModel, TinyDecoder
    from diffusers_snapgen.testing import tiny_unet

    latent = resolution // 8

    def randn(*shape, device, dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    def snapgen_inputs(model, b, device, dtype):
        return snapgen_unet_inputs(model.config, b, latent, device, dtype)

    def sdxl_inputs(model, b, device, dtype):
        return dict(
            sample=randn(b, 4, latent, latent, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 77, 2048, device=device, dtype=dtype),
            added_cond_kwargs=dict(
                text_embeds=randn(b, 1280, device=device, dtype=dtype),
                time_ids=torch.tensor(
                    [[resolution, resolution, 0, 0, resolution, resolution]] * b, device=device, dtype=dtype
                ),
            ),
        )

    def sd3_inputs(model, b, device, dtype):
        return dict(
            hidden_states=randn(b, 16, latent, latent, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 333, 4096, device=device, dtype=dtype),
            pooled_projections=randn(b, 2048, device=device, dtype=dtype),
        )

    def sana_inputs(model, b, device, dtype):  # DC-AE f32: 1024² -> 32x32x32 latent, Gemma-2 text (300 tokens x 2304)
        return dict(
            hidden_states=randn(b, 32, resolution // 32, resolution // 32, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 300, 2304, device=device, dtype=dtype),
        )

    def decoder_inputs(channels):
        return lambda model, b, device, dtype: dict(z=randn(b, channels, latent, latent, device=device, dtype=dtype))

    def decode(model):
        return lambda **kwargs: model.decode(kwargs["z"]).sample

    def decoder_params(model):  # autoencoders also hold an encoder that decoding never runs
        parts = [getattr(model, name, None) for name in ("decoder", "post_quant_conv")]
        parts = [part for part in parts if part is not None] or [model]
        return sum(p.numel() for part in parts for p in part.parameters())

    if smoke:
        return {
            "snapgen_unet": (
                lambda: tiny_unet(in_channels=16, out_channels=16, joint_attention_dim=32, pooled_projection_dim=20),
                snapgen_inputs, None, "denoiser", None,
            ),
            "snapgen_tiny_decoder": (TinyDecoder, decoder_inputs(16), decode, "decoder", decoder_params),
            "autoencoder_tiny_decoder": (
                diffusers.AutoencoderTiny, decoder_inputs(4), decode, "decoder", decoder_params
            ),
        }
    return {
        "snapgen_unet": (SnapGenUNet2DModel, snapgen_inputs, None, "denoiser", None),
        "sdxl_unet": (lambda: diffusers.UNet2DConditionModel(**SDXL_UNET_CONFIG), sdxl_inputs, None, "denoiser", None),
        "sd3_medium_transformer": (
            lambda: diffusers.SD3Transformer2DModel(**SD3_MEDIUM_CONFIG),
            sd3_inputs,
            None,
            "denoiser",
            None,
        ),
        "sana_1600m_transformer": (diffusers.SanaTransformer2DModel, sana_inputs, None, "denoiser", None),
        "snapgen_tiny_decoder": (TinyDecoder, decoder_inputs(16), decode, "decoder", decoder_params),
        "sd3_vae_decoder": (
            lambda: diffusers.AutoencoderKL(**SD3_VAE_CONFIG),
            decoder_inputs(16),
            decode,
            "decoder",
            decoder_params,
        ),
        "autoencoder_tiny_decoder": (diffusers.AutoencoderTiny, decoder_inputs(4), decode, "decoder", decoder_params),
    }


def spec_flops(spec) -> int:
    """FLOPs of one batch-1 call of a spec's model, counted on the ``meta`` device."""
    builder, make_inputs, wrap, _, _ = spec
    return count_flops(
        builder,
        lambda model, device, dtype: make_inputs(model, 1, device, dtype),
        call=lambda model, **kwargs: (wrap(model) if wrap else model)(**kwargs),
    )


def step_rows(
    name: str,
    model: torch.nn.Module,
    spec,
    batch_sizes,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 2,
    iters: int = 10,
    flops_per_sample: int | None = None,
    peak_tflops: float | None = None,
    compile_kwargs: dict | None = None,
    channels_last: bool = True,
    budget=None,
    call=None,
) -> list[dict]:
    """Time ``model`` (already on ``device``/``dtype``, eval) in ``mode`` at each batch size; one row per size.

    ``compiled``/``regional`` compile once, before the first batch size (unless ``call``, an already compiled
    callable, is given); each row's ``compile_s`` is the time of its first call (compilation included).
    ``*graph``/compiled modes replay one CUDA graph per batch size on CUDA.
    """
    _, make_inputs, wrap, role, count_params = spec
    if mode == "eager-nchw" or name == "sana_1600m_transformer":
        channels_last = False
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    params = count_params(model) if count_params else sum(p.numel() for p in model.parameters())
    compile_kwargs = dict(compile_kwargs or {})
    if call is None:
        call = wrap(model) if wrap is not None else model
        if mode == "compiled":
            call = torch.compile(call, **compile_kwargs)
        elif mode == "regional":
            model.compile_repeated_blocks(**{"fullgraph": True, **compile_kwargs})
    rows = []
    for batch in batch_sizes:
        row = dict(model=name, role=role, batch=batch, mode=mode, params_m=params / 1e6)
        if budget is not None and not budget.allows(20.0):
            row["error"] = "skipped: time budget"
            rows.append(row)
            continue

        def run(batch=batch):
            inputs = make_inputs(model, batch, device, dtype)  # NCHW inputs: convolutions follow the weights' layout
            reset_peak_memory(device)
            out = {}
            with torch.no_grad():
                start = _now(device)
                call(**inputs)
                out["compile_s"] = _now(device) - start if mode in ("compiled", "regional") else None
                fn = lambda: call(**inputs)  # noqa: E731
                if mode in GRAPH_MODES and device.type == "cuda":
                    fn, _ = cuda_graph(fn, device)
                out["ms"] = time_ms(fn, device, warmup=warmup, iters=iters)
            out["peak_gib"] = peak_memory_gib(device)
            if mode in GRAPH_MODES and device.type != "cuda":
                out["note"] = "no CUDA graph off CUDA"
            if flops_per_sample:
                out["tflops"] = flops_per_sample * batch / (out["ms"] * 1e-3) / 1e12
                if peak_tflops:
                    out["pct_peak"] = 100 * out["tflops"] / peak_tflops
            return out

        rows.append(attempt(row, run))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def build_model(spec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A spec's model with random weights, initialised directly on ``device`` (fast for the billion-parameter
    anchors), in ``dtype`` and eval mode."""
    with torch.device(device):
        model = spec[0]()
    return model.to(device=device, dtype=dtype).eval()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows):
    """Speed-up of each SnapGen component over each same-role model measured in this run (same batch and mode)."""
    index = {(r["model"], r["batch"], r["mode"]): r for r in rows if "ms" in r}
    for row in rows:
        if "ms" not in row:
            continue
        anchor = DESIGN_ANCHORS.get(row["model"])
        if anchor and row["batch"] == 1 and row["mode"] in ("eager", "compiled"):
            design_ms = anchor[0] if row["mode"] == "eager" else anchor[1]
            row["vs_design_anchor"] = row["ms"] / design_ms if design_ms else None
        ours = {"denoiser": "snapgen_unet", "decoder": "snapgen_tiny_decoder"}.get(row.get("role"))
        if ours and row["model"] != ours and (ours, row["batch"], row["mode"]) in index:
            row["snapgen_speedup"] = row["ms"] / index[(ours, row["batch"], row["mode"])]["ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_models_<device>.{json,md}")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU in float32 (tests the wiring)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--resolution", type=int, default=None, help="output image size in pixels (multiple of 32)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, default 1,8,16 (smoke: 1)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES} (default eager,compiled)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: eager)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if smoke else "bfloat16"))
    resolution = args.resolution or (64 if smoke else 1024)
    if resolution <= 0 or resolution % 32:
        parser.error(f"--resolution must be a positive multiple of 32, got {resolution}")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1" if smoke else "1,8,16")).split(",")]
    specs = build_specs(resolution, smoke=smoke)
    names = args.models.split(",") if args.models else list(specs)
    unknown = set(names) - set(specs)
    if unknown:
        parser.error(f"--models has unknown names {sorted(unknown)}; choose from {list(specs)}")
    modes = ["eager"] if args.no_compile else (args.modes or "eager,compiled").split(",")
    if set(modes) - set(MODES):
        parser.error(f"--modes must be a subset of {MODES}, got {modes}")
    backend = "eager" if smoke and args.compile_backend == "inductor" else args.compile_backend
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 3)
    iters = args.iters if args.iters is not None else (1 if smoke else 10)

    size = 8192 if device.type == "cuda" else 256
    peak = attempt({}, lambda: {"tflops": matmul_peak_tflops(device, dtype, size=size)})
    meta = dict(
        device=device_name(device), torch=torch.__version__, dtype=str(dtype).replace("torch.", ""),
        resolution=resolution, matmul_peak_tflops=peak.get("tflops"), design_anchors=DESIGN_ANCHORS,
    )
    rows = []
    for name in names:
        spec = specs[name]
        flops = attempt({}, lambda: {"flops": spec_flops(spec)}).get("flops")
        for mode in modes:
            if mode == "regional" and spec[3] != "denoiser":
                continue
            torch._dynamo.reset()
            model_row = attempt({}, lambda: {"model": build_model(spec, device, dtype)})
            if "model" not in model_row:
                rows += [dict(model=name, batch=b, mode=mode, error=model_row["error"]) for b in batch_sizes]
                continue
            rows += step_rows(
                name, model_row.pop("model"), spec, batch_sizes, mode, device, dtype, warmup=warmup, iters=iters,
                flops_per_sample=flops, peak_tflops=meta["matmul_peak_tflops"],
                compile_kwargs={"backend": backend, "fullgraph": name.startswith("snapgen")},
            )
            release(device)
            add_ratios(rows)
            if args.out is not None:
                write_results(args.out, f"bench_models_{device.type}", dict(meta, rows=rows), _table(meta, rows))
    add_ratios(rows)
    print(_table(meta, rows))
    if args.out is not None:
        write_results(args.out, f"bench_models_{device.type}", dict(meta, rows=rows), _table(meta, rows))
    return rows


def _table(meta, rows):
    peak = meta.get("matmul_peak_tflops")
    header = (
        f"# Model speed — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
        f"{meta['resolution']}² output, random weights\n\n{meta['dtype']} matmul peak measured in this run: "
        f"{f'{peak:.4g} TFLOP/s' if peak else 'not measured'}. `snapgen_speedup` = this row's ms / the SnapGen "
        "component's ms (same role, batch, mode, this run). `vs_design_anchor` = this run / the H200 anchor "
        "(batch 1, docs/performance.md).\n"
    )
    columns = ["model", "batch", "mode", "ms", "tflops", "pct_peak", "compile_s", "params_m", "peak_gib",
               "snapgen_speedup", "vs_design_anchor", "error"]
    return header + "\n" + markdown_table(rows, columns)


if __name__ == "__main__":
    main()
