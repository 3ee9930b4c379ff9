#!/usr/bin/env python
"""Does fine-tuning a palettized UNet recover end-to-end image PSNR? (CPU)

Palettizes every UNet weight of the embedded default model to ``--bits`` with coremltools (k-means, 16 output
channels per table, iOS18) and fine-tunes it (fp32, Adam) so that the palettized UNet's CFG-guided velocity matches
the fp32 UNet's on inputs recorded from the fp32 model's own 4-step sampling of training captions:

- ``--train tables``: each weight keeps its index; only the table entries are trained;
- ``--train weights``: quantization-aware training. Each weight is a trained fp32 value that the forward replaces by
  its nearest entry of its group's table (straight-through: the gradient reaches the value and, through the entry it
  picked, the table), so both the indices and the tables move.

Every ``--eval-every`` steps it measures the end-to-end image PSNR (text -> UNet x 4 -> decoder, against fp32) on the
mixed-bit benchmark's search pairs, with fp16-rounded tables: the weights a package with those tables and indices
would hold. The package format does not change (one table of ``2**bits`` entries per 16 output channels).

    python benchmarks/coreml_lut_finetune.py --data DATA [--train weights]   # DATA: a rendered set (prepare_emoji.py)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from common import write_results  # also puts src/ on the path
from torch.func import functional_call


GROUP = 16  # output channels per look-up table (coremltools per_grouped_channel, as the mixed-bit benchmark uses)


def table_parametrisation(weights: dict, bits: int):
    """``{name: (table (G, 2**bits) Parameter, flat index, shape)}`` from palettized weights (GROUP-row groups)."""
    out = {}
    for name, w in weights.items():
        rows = w.float().reshape(w.shape[0], -1)
        groups = (rows.shape[0] + GROUP - 1) // GROUP
        table = torch.zeros(groups, 2**bits)
        index = torch.empty(rows.shape, dtype=torch.long)
        for g in range(groups):
            values, inverse = torch.unique(rows[g * GROUP:(g + 1) * GROUP], return_inverse=True)
            if len(values) > 2**bits:
                raise ValueError(f"{name}: group {g} holds {len(values)} values, not a {bits}-bit palettization")
            table[g, :len(values)] = values
            index[g * GROUP:(g + 1) * GROUP] = inverse + g * 2**bits
        out[name] = (torch.nn.Parameter(table), index, w.shape)
    return out


def default_model_setup(data: Path):
    """``(quality, specs, unet spec, unet ML program, prompts)`` for the embedded default model at 128²: the export's
    components, the end-to-end check on the mixed-bit benchmark's search pairs (the next 16 seen and 16 held-out-pair
    prompts of ``data``'s eval_prompts.json, seed 1) and the UNet converted for iOS18."""
    from diffusers_snapgen import load_default_pipeline
    from diffusers_snapgen.coreml.components import pipeline_components
    from diffusers_snapgen.coreml.convert import convert_module
    from diffusers_snapgen.coreml.quality import EndToEndQuality

    pipe = load_default_pipeline()
    sets = json.loads((data / "eval_prompts.json").read_text())
    prompts = sets["seen"][100:116] + sets["heldout_pair"][100:116]  # coreml_mixed_bit.py's search pairs (seed 1)
    specs = pipeline_components(pipe, 128, ["unet", "decoder", "text"])
    quality = EndToEndQuality(pipe, specs, 128, prompts, [1] * len(prompts))
    spec = next(s for s in specs if s.name == "unet")
    mlmodel, _, _ = convert_module(spec.module, spec.inputs, spec.output_names, target="iOS18")
    return quality, specs, spec, mlmodel, prompts


def record_reference_calls(quality, data: Path, captions: int) -> list:
    """``[(args, kwargs, output)]`` of every fp32 UNet call (uncond + cond halves) while the fp32 pipeline of
    ``quality`` samples ``captions`` training captions of the rendered set ``data`` (shuffled with seed 0), 16 a call,
    at 128²: the inputs the exported UNet meets in its own sampling."""
    texts = [json.loads(line)["text"] for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(texts)
    calls = []

    def record(module, inputs, kwargs, out):
        # the pipeline passes its precomputed text keys and values, which the export's attention does not take:
        # the recorded call lets the UNet project the text itself (same outputs)
        kwargs = {k: v for k, v in kwargs.items() if k != "cross_attention_kv"}
        calls.append((inputs, kwargs, out[0] if isinstance(out, tuple) else out.sample))

    hook = quality.reference_pipe.unet.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        for first in range(0, captions, 16):
            quality.reference_pipe(texts[first:first + 16], height=128, width=128, output_type="latent",
                                   generator=torch.Generator().manual_seed(1000 + first))
    hook.remove()
    return calls


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="Rendered emoji set (eval_prompts.json, train/metadata.jsonl).")
    p.add_argument("--bits", type=int, default=4, choices=(3, 4, 6))
    p.add_argument("--train", choices=("tables", "weights"), default="tables",
                   help="Train the table entries only, or the weights too (quantization-aware, straight-through).")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--captions", type=int, default=128, help="Training captions sampled by the fp32 model.")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    for name in ("eval_prompts.json", "train/metadata.jsonl"):
        if not (args.data / name).is_file():
            p.error(f"--data {args.data}: no {name}; render the set with training_examples/data/prepare_emoji.py")

    from diffusers_snapgen.coreml.mixed_bit import palettized_candidates

    start = time.perf_counter()
    quality, specs, spec, mlmodel, prompts = default_model_setup(args.data)
    candidates, _ = palettized_candidates(mlmodel, spec.module, (args.bits,), "iOS18", GROUP, 2048)
    fp16 = {s.name: {k: v.detach().half() for k, v in s.module.named_parameters()} for s in specs}
    tables = table_parametrisation({k: c[args.bits] for k, c in candidates.items()}, args.bits)

    model = spec.module.unet  # the converted form's fp32 UNet; the export's names carry a "unet." prefix
    fixed = {k: v.detach() for k, v in model.named_parameters()}
    latent = {k: torch.nn.Parameter(fixed[k[len("unet."):]].float().clone()) for k in tables} \
        if args.train == "weights" else {}

    def dense():
        if not latent:
            return {k: t.view(-1)[i].reshape(shape) for k, (t, i, shape) in tables.items()}
        out = {}
        for k, (table, _, shape) in tables.items():
            rows = latent[k].reshape(shape[0], -1)
            row_tables = table[torch.arange(shape[0]) // GROUP]  # (rows, 2**bits): each row's group table
            nearest = (rows.detach()[:, :, None] - row_tables.detach()[:, None, :]).abs().argmin(-1)
            out[k] = (row_tables.gather(1, nearest) + rows - rows.detach()).reshape(shape)
        return out

    def psnr() -> float:
        with torch.no_grad():
            unet = {**fp16["unet"], **{k: v.half() for k, v in dense().items()}}
        return round(quality.psnr({**fp16, "unet": unet}), 3)

    curve = [{"step": 0, "image_psnr_db": psnr()}]
    print(json.dumps(curve[-1]), flush=True)
    calls = record_reference_calls(quality, args.data, args.captions)
    guidance = quality.guidance_scale
    optimizer = torch.optim.Adam([t for t, _, _ in tables.values()] + list(latent.values()), lr=args.learning_rate)
    losses = []
    for step in range(1, args.steps + 1):
        inputs, kwargs, target = random.Random(step).choice(calls)
        weights = {k[len("unet."):]: v for k, v in dense().items()}
        out = functional_call(model, {**fixed, **weights}, inputs, kwargs)
        pred = (out[0] if isinstance(out, tuple) else out.sample).float()
        (pu, pc), (tu, tc) = pred.chunk(2), target.float().chunk(2)
        loss = ((pu + guidance * (pc - pu)) - (tu + guidance * (tc - tu))).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.eval_every == 0:
            curve.append({"step": step, "image_psnr_db": psnr(),
                          "loss": round(sum(losses[-args.eval_every:]) / args.eval_every, 5)})
            print(json.dumps(curve[-1]), flush=True)
    info = {"benchmark": "coreml_lut_finetune", "bits": args.bits, "train": args.train, "steps": args.steps,
            "learning_rate": args.learning_rate, "captions": args.captions, "recorded_calls": len(calls),
            "pairs": len(prompts), "torch_threads": torch.get_num_threads(), "curve": curve,
            "wall_seconds": round(time.perf_counter() - start, 1)}
    rows = "\n".join(f"| {c['step']} | {c['image_psnr_db']} dB | {c.get('loss', '—')} |" for c in curve)
    import platform

    import coremltools

    trained = ("indices kept, table entries trained" if args.train == "tables" else
               "weights and tables trained (quantization-aware: nearest table entry in the forward, straight-through "
               "gradients)")
    table = (f"# Fine-tuning the {args.bits}-bit {args.train} of the default model's palettized UNet (CPU)\n\n"
             f"The embedded default model (128², {quality.num_inference_steps} steps, CFG {quality.guidance_scale:g}); "
             f"every UNet weight palettized to {args.bits} bits "
             f"(k-means, {GROUP} output\nchannels per table, coremltools {coremltools.__version__}, iOS18), {trained}; "
             "text encoder and decoder fp16.\n"
             f"{platform.machine()}, {torch.get_num_threads()} torch threads, measured {time.strftime('%Y-%m-%d')}. "
             "Conclusions: docs/coreml_mixed_bit.md.\n\n"
             f"`python benchmarks/coreml_lut_finetune.py --bits {args.bits} --train {args.train} --steps {args.steps} "
             f"--learning-rate {args.learning_rate} --captions {args.captions}`: {len(prompts)} search pairs, "
             f"{len(calls)} recorded fp32 UNet calls from {args.captions} training captions, "
             f"{info['wall_seconds']:.0f} s.\n\n"
             "| step | end-to-end image PSNR | mean guided-velocity MSE |\n|---|---|---|\n" + rows)
    stem = f"coreml_lut_finetune_{args.bits}bit" + (f"_weights_lr{args.learning_rate:g}" if args.train == "weights"
                                                       else "")
    write_results(args.out, stem, info, table)
    print(table)


if __name__ == "__main__":
    main()
