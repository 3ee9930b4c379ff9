#!/usr/bin/env python
"""Does sensitivity-weighted k-means (coremltools' ``SKMPalettizer``) keep more end-to-end image PSNR? (CPU)

Palettizes every UNet weight of the embedded default model to ``--bits`` (16 output channels per table, the layers
the Core ML export palettizes) three ways and measures the end-to-end image PSNR of each (text -> UNet x 4 ->
decoder against fp32, fp16 tables, on the mixed-bit benchmark's search pairs):

- ``coreml kmeans``: the export's own palettization (``OpPalettizerConfig(mode="kmeans")`` on the converted program,
  read back from it);
- ``torch kmeans``: ``coremltools.optimize.torch``'s k-means with every weight equally important (``SKMPalettizer``
  given uniform sensitivities), the control for the next row;
- ``torch sensitive kmeans``: ``SKMPalettizer`` with each weight weighted by its Fisher information (SqueezeLLM).
  The loss whose squared gradients give it is a random projection ``<v, r>``, ``r ~ N(0, I)``, of the CFG-guided
  velocity ``v`` on UNet calls recorded from the fp32 model's own 4-step sampling of training captions: in
  expectation, the diagonal of ``J^T J`` of the output the sampler integrates.

With ``--recipe`` (a mixed-bit recipe of this model, ``snapgen convert-coreml --search-mixed-bit``) it also
measures the recipe's per-layer widths the same three ways; its 8-bit layers are the export's own in every row
(int8 or 8-bit tables, as the recipe says).

Every variant holds at most ``2**bits`` values per table (checked), so a package stores it exactly: the same bits
per weight as the export's palettization of those layers.

    python benchmarks/coreml_skm_palettization.py --data DATA --bits 4,6   # DATA: a rendered set (prepare_emoji.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
from common import write_results  # also puts src/ on the path
from coreml_lut_finetune import GROUP, default_model_setup, record_reference_calls, table_parametrisation


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="Rendered emoji set (eval_prompts.json, train/metadata.jsonl).")
    p.add_argument("--bits", default="4,6", help="Comma-separated widths for every layer (from 2, 3, 4, 6, 8).")
    p.add_argument("--captions", type=int, default=128, help="Training captions sampled by the fp32 model.")
    p.add_argument("--projections", type=int, default=4,
                   help="Random projections per recorded call (each one backward pass of the sensitivity).")
    p.add_argument("--recipe", type=Path, default=None, help="Also measure this mixed-bit recipe's widths.")
    p.add_argument("--tag", default="", help="Suffix of the result files' names.")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    bits = tuple(int(b) for b in args.bits.split(",") if b.strip())
    if any(b not in (2, 3, 4, 6, 8) for b in bits) or not (bits or args.recipe):
        p.error(f"--bits {args.bits!r}: widths must be among 2, 3, 4, 6, 8 (may be empty with --recipe)")
    if args.captions < 16 or args.projections < 1:
        p.error("--captions must be at least 16 and --projections at least 1")
    for name in ("eval_prompts.json", "train/metadata.jsonl"):
        if not (args.data / name).is_file():
            p.error(f"--data {args.data}: no {name}; render the set with training_examples/data/prepare_emoji.py")

    import coremltools
    from coremltools.optimize.torch.palettization import (
        ModuleSKMPalettizerConfig,
        SKMPalettizer,
        SKMPalettizerConfig,
    )

    from diffusers_snapgen.coreml.mixed_bit import load_recipe, palettized_candidates

    start = time.perf_counter()
    quality, specs, spec, mlmodel, prompts = default_model_setup(args.data)
    recipe, eight_bit = None, "palette"
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        eight_bit = recipe.metadata.get("eight_bit", "palette")
        if recipe.metadata.get("group_size", GROUP) != GROUP or set(recipe.layers) != {"unet"}:
            p.error(f"--recipe {args.recipe}: needs a UNet-only recipe with {GROUP} output channels per table")
    widths = tuple(sorted(set(bits) | (set(recipe.layers["unet"].values()) if recipe else set())))
    costs = {}
    candidates, sizes = palettized_candidates(mlmodel, spec.module, widths, "iOS18", GROUP, 2048, costs=costs,
                                              eight_bit=eight_bit)
    if recipe is not None:
        recipe.check_component("unet", candidates)
    fp16 = {s.name: {k: v.detach().half() for k, v in s.module.named_parameters()} for s in specs}
    prefix = "unet."  # the export's parameter names; the converted form's fp32 UNet is spec.module.unet
    model = spec.module.unet
    timings = {"setup_s": round(time.perf_counter() - start, 1)}

    def psnr(weights: dict, layer_bits: dict) -> float:
        for name, w in weights.items():  # raises unless every table holds at most 2**b values
            if layer_bits[name] != 8:  # (int8 layers are linear quantization, no tables)
                table_parametrisation({name: w}, layer_bits[name])
        unet = {**fp16["unet"], **{k: v.half() for k, v in weights.items()}}
        return round(quality.psnr({**fp16, "unet": unet}), 3)

    # sensitivities: squared gradients of random projections of the guided velocity, on recorded fp32 calls
    tic = time.perf_counter()
    calls = record_reference_calls(quality, args.data, args.captions)
    guidance = quality.guidance_scale
    generator = torch.Generator().manual_seed(0)
    dataset = [(a, kw, torch.randn(out.shape, generator=generator)) for a, kw, out in calls
               for _ in range(args.projections)]

    def projected_guided_velocity(unet, data):
        inputs, kwargs, direction = data
        out = unet(*inputs, **kwargs)
        uncond, cond = (out[0] if isinstance(out, tuple) else out.sample).float().chunk(2)
        guided = uncond + guidance * (cond - uncond)
        return (guided * direction[: len(guided)]).sum()

    module_names = sorted({name[len(prefix):].rsplit(".", 1)[0] for name in candidates})

    def skm_config(layer_bits: dict) -> SKMPalettizerConfig:
        """Palettize each module ``{name: bits}`` names (``None``: leave it)."""
        configs = {re.escape(n): ModuleSKMPalettizerConfig(n_bits=b, granularity="per_grouped_channel",
                                                           group_size=GROUP)
                   for n, b in layer_bits.items() if b is not None}
        return SKMPalettizerConfig(module_name_configs=configs, calibration_nsamples=len(dataset))

    def measure(label: str, layer_bits: dict) -> dict:
        """Image PSNR of the export's palettization, torch k-means and sensitive k-means at ``layer_bits``
        (``{parameter: bits}``); 8-bit layers keep the export's weights in every variant."""
        stored = sum(costs[n][b] for n, b in layer_bits.items()) + 16 * sum(
            n for name, n in sizes.items() if name not in layer_bits)
        index_bits = sum(layer_bits.get(n, 16) * size for n, size in sizes.items())  # others stay fp16
        row = {"variant": label, "bits": round(index_bits / sum(sizes.values()), 3),
               "bits_with_tables": round(stored / sum(sizes.values()), 3), "layers": len(layer_bits)}
        export = {n: candidates[n][b] for n, b in layer_bits.items()}
        row["coreml_kmeans_db"] = psnr(export, layer_bits)
        palettized = {n[len(prefix):].rsplit(".", 1)[0]: (b if b != 8 else None) for n, b in layer_bits.items()}
        for key, path in (("torch_kmeans_db", uniform_path), ("torch_sensitive_kmeans_db", fisher_path)):
            tic = time.perf_counter()
            compressed = SKMPalettizer(model, skm_config(palettized)).compress(sensitivity_path=str(path))
            state = dict(compressed.named_parameters())
            weights = {n: export[n] if b == 8 else state[n[len(prefix):]].detach() for n, b in layer_bits.items()}
            row[key] = psnr(weights, layer_bits)
            row[key.replace("_db", "_s")] = round(time.perf_counter() - tic, 1)
        row["gain_db"] = round(row["torch_sensitive_kmeans_db"] - row["torch_kmeans_db"], 3)
        print(json.dumps(row), flush=True)
        return row

    workdir = tempfile.TemporaryDirectory(prefix="skm_")  # the two sensitivity files, removed at the end
    fisher_path, uniform_path = Path(workdir.name) / "fisher.pt", Path(workdir.name) / "uniform.pt"
    for param in model.parameters():
        param.requires_grad_(True)
    fisher = SKMPalettizer(model, skm_config(dict.fromkeys(module_names, 4))).compute_sensitivity(
        dataset, projected_guided_velocity, sensitivity_path=str(fisher_path))
    model.zero_grad(set_to_none=True)
    torch.save({k: torch.ones_like(v) for k, v in fisher.items()}, uniform_path)
    timings["sensitivity_s"] = round(time.perf_counter() - tic, 1)

    rows = [measure(f"every layer {b}-bit", dict.fromkeys(candidates, b)) for b in bits]
    if recipe is not None:
        rows.append(measure(f"recipe {args.recipe.name}", recipe.layers["unet"]))
    workdir.cleanup()

    info = {"benchmark": "coreml_skm_palettization", "bits": list(bits), "captions": args.captions,
            "recorded_calls": len(calls), "projections": args.projections, "sensitivity_samples": len(dataset),
            "pairs": len(prompts), "guidance_scale": guidance, "num_inference_steps": quality.num_inference_steps,
            "recipe": None if recipe is None else args.recipe.name, "group_size": GROUP,
            "coremltools": coremltools.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "rows": rows, **timings,
            "wall_seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d")}
    lines = "\n".join(
        f"| {r['variant']} | {r['bits']} ({r['bits_with_tables']}) | {r['coreml_kmeans_db']} dB "
        f"| {r['torch_kmeans_db']} dB | **{r['torch_sensitive_kmeans_db']} dB** | {r['gain_db']:+.2f} dB |"
        for r in rows)
    table = (f"# Sensitivity-weighted k-means (coremltools `SKMPalettizer`) on the default model's UNet (CPU)\n\n"
             f"The embedded default model (128², {quality.num_inference_steps} steps, CFG {guidance:g}); every "
             f"palettizable UNet weight at one width or at a recipe's widths, {GROUP} output channels per table, fp16 "
             f"tables; text encoder and decoder fp16. coremltools {coremltools.__version__}, "
             f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"measured {info['date']}. "
             "Conclusions: docs/coreml_mixed_bit.md.\n\n"
             f"`python benchmarks/coreml_skm_palettization.py --bits {args.bits} --captions {args.captions} "
             f"--projections {args.projections}" + (f" --recipe {args.recipe.name}" if recipe else "")
             + f"`: end-to-end image PSNR against fp32 on {len(prompts)} search pairs; "
             f"sensitivities from {len(dataset)} backward passes ({len(calls)} recorded fp32 UNet calls from "
             f"{args.captions} training captions, {args.projections} random projections each, "
             f"{timings['sensitivity_s']:.0f} s); whole run {info['wall_seconds']:.0f} s.\n\n"
             "| UNet layers | bits per UNet weight (with tables) | Core ML k-means (the export) "
             "| torch k-means, uniform weights | torch sensitive k-means | sensitive vs uniform |\n"
             "|---|---|---|---|---|---|\n" + lines)
    write_results(args.out, "coreml_skm_palettization" + (f"_{args.tag}" if args.tag else ""), info, table)
    print(table)


if __name__ == "__main__":
    main()
