"""Speed of the SnapGen UNet and TinyDecoder beside the models they replace, in one run (docs/design.md, "Measured anchors").

Every model is built with random weights from its published config (nothing is downloaded), cast to bf16 and
timed at 1024x1024 output for batch 1 and 8, eager and with ``torch.compile``. Ratios are taken against anchors
measured in the same run; reference timings of an earlier H200 run (``DESIGN_ANCHORS``) are printed beside them
to show how this machine compares.

    python benchmarks/bench_models.py --out benchmarks/results            # GPU, full run
    python benchmarks/bench_models.py --device cpu --resolution 64 --batch-sizes 1 --no-compile  # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, markdown_table, peak_memory_gib, reset_peak_memory, time_ms, write_results  # noqa: E402

# Reference timings of an earlier H200 run, not made by this script: bf16, batch 1, 1024² output, random weights.
# (eager ms, compiled ms); the `vs_design_anchor` column is this run / these.
DESIGN_ANCHORS = {
    "sdxl_unet": (58.8, 23.6),
    "sd3_medium_transformer": (28.0, 22.0),
    "sana_1600m_transformer": (19.9, 7.9),
    "sd3_vae_decoder": (85.1, None),
    "autoencoder_tiny_decoder": (5.9, 2.3),
}

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


def build_specs(resolution: int):
    """name -> (builder, inputs(batch, device, dtype) -> kwargs, call wrapper, role, parameter counter)."""
    import diffusers

    from diffusers_snapgen import SnapGenUNet2DModel, TinyDecoder

    latent = resolution // 8

    def randn(*shape, device, dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    def snapgen_inputs(b, device, dtype):
        return dict(
            sample=randn(b, 16, latent, latent, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 333, 4096, device=device, dtype=dtype),
            pooled_projections=randn(b, 2048, device=device, dtype=dtype),
        )

    def sdxl_inputs(b, device, dtype):
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

    def sd3_inputs(b, device, dtype):
        return dict(
            hidden_states=randn(b, 16, latent, latent, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 333, 4096, device=device, dtype=dtype),
            pooled_projections=randn(b, 2048, device=device, dtype=dtype),
        )

    def sana_inputs(b, device, dtype):  # DC-AE f32: 1024² -> 32x32x32 latent, Gemma-2 text (300 tokens x 2304)
        return dict(
            hidden_states=randn(b, 32, resolution // 32, resolution // 32, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            encoder_hidden_states=randn(b, 300, 2304, device=device, dtype=dtype),
        )

    def decoder_inputs(channels):
        return lambda b, device, dtype: dict(z=randn(b, channels, latent, latent, device=device, dtype=dtype))

    def decode(model):
        return lambda **kwargs: model.decode(kwargs["z"]).sample

    def decoder_params(model):  # autoencoders also hold an encoder that decoding never runs
        parts = [getattr(model, name, None) for name in ("decoder", "post_quant_conv")]
        parts = [part for part in parts if part is not None] or [model]
        return sum(p.numel() for part in parts for p in part.parameters())

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


def measure(name, spec, batch, compile_mode, device, dtype, warmup, iters):
    builder, make_inputs, wrap, _, count_params = spec
    model = builder().to(device=device, dtype=dtype).eval()
    params = count_params(model) if count_params else sum(p.numel() for p in model.parameters())
    call = wrap(model) if wrap is not None else model
    if compile_mode is not None:
        if name != "sana_1600m_transformer":
            model.to(memory_format=torch.channels_last)
        torch._dynamo.reset()
        call = torch.compile(call, mode=compile_mode, fullgraph=False)
    inputs = make_inputs(batch, device, dtype)
    reset_peak_memory(device)
    with torch.inference_mode():
        ms = time_ms(lambda: call(**inputs), device, warmup=warmup, iters=iters)
    row = dict(
        model=name,
        batch=batch,
        mode=compile_mode or "eager",
        ms=ms,
        params_m=params / 1e6,
        peak_gib=peak_memory_gib(device),
    )
    model = call = inputs = None  # free the GPU memory before the next model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows):
    """Speed-up of each SnapGen component over each same-role model measured in this run (same batch and mode)."""
    index = {(r["model"], r["batch"], r["mode"]): r for r in rows}
    for row in rows:
        anchor = DESIGN_ANCHORS.get(row["model"])
        if anchor and row["batch"] == 1:
            design_ms = anchor[0] if row["mode"] == "eager" else anchor[1]
            row["vs_design_anchor"] = row["ms"] / design_ms if design_ms else None
        ours = {"denoiser": "snapgen_unet", "decoder": "snapgen_tiny_decoder"}.get(row.get("role"))
        if ours and row["model"] != ours and (ours, row["batch"], row["mode"]) in index:
            row["snapgen_speedup"] = row["ms"] / index[(ours, row["batch"], row["mode"])]["ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_models_<device>.{json,md}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--resolution", type=int, default=1024, help="output image size in pixels (multiple of 32)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help="torch.compile mode for the compiled rows (reduce-overhead = CUDA graphs)",
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 32:
        parser.error(f"--resolution must be a positive multiple of 32, got {args.resolution}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    specs = build_specs(args.resolution)
    names = args.models.split(",") if args.models else list(specs)
    unknown = set(names) - set(specs)
    if unknown:
        parser.error(f"--models has unknown names {sorted(unknown)}; choose from {list(specs)}")
    modes = [None] if args.no_compile else [None, args.compile_mode]

    rows = []
    meta = dict(
        device=device_name(device),
        torch=torch.__version__,
        dtype=args.dtype,
        resolution=args.resolution,
        compile_mode=None if args.no_compile else args.compile_mode,
        design_anchors=DESIGN_ANCHORS,
    )
    for name in names:
        for mode in modes:
            for batch in batch_sizes:
                try:
                    row = measure(name, specs[name], batch, mode, device, dtype, args.warmup, args.iters)
                except Exception as error:  # one failing model must not lose the others' numbers
                    traceback.print_exc()
                    row = dict(model=name, batch=batch, mode=mode or "eager", error=f"{type(error).__name__}: {error}")
                row["role"] = specs[name][3]
                rows.append(row)
                print(json.dumps(row), flush=True)
                add_ratios(rows)
                if args.out is not None:
                    write_results(args.out, f"bench_models_{device.type}", dict(meta, rows=rows), _table(meta, rows))
    add_ratios(rows)
    print(_table(meta, rows))
    if args.out is not None:
        write_results(args.out, f"bench_models_{device.type}", dict(meta, rows=rows), _table(meta, rows))
    return rows


def _table(meta, rows):
    header = (
        f"# Model speed — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
        f"{meta['resolution']}² output, random weights\n\n`snapgen_speedup` = this row's ms / the SnapGen "
        "component's ms (same role, batch, mode, this run). `vs_design_anchor` = this run / "
        "reference timings of an earlier H200 run (batch 1; docs/design.md, Measured anchors).\n"
    )
    columns = ["model", "batch", "mode", "ms", "params_m", "peak_gib", "snapgen_speedup", "vs_design_anchor", "error"]
    return header + "\n" + markdown_table(rows, columns)


if __name__ == "__main__":
    main()
