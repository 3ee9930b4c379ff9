"""The data-sheet floor of a workload: the least time its kernels could take on a GPU, from the GPU's peak bf16
matrix rate and memory bandwidth alone (a roofline model; no GPU needed).

The workload runs op by op on the ``meta`` device (bf16). Each op gets its FLOPs (``torch.utils.flop_counter``,
multiply-add = 2) and the bytes it must move:

- matrix products, convolutions (forward and backward) and attention are library kernels that inductor does not
  fuse: each reads all of its inputs (weights included) and writes its outputs once; attention is one fused kernel
  (Q, K, V in, output out, no score matrix in memory);
- every other op (normalisations, activations, residual adds, RoPE, copies) is assumed fused with its neighbours
  into one kernel per chain, as inductor does: such a chain reads only the tensors it gets from a library kernel, a
  weight or the inputs, and writes only the tensors a library kernel reads or nothing reads (results, gradients).
  Views are free.

An op's floor is ``max(FLOPs / peak, bytes / bandwidth)``; a family's floor is the sum over its ops. The whole is a
lower bound for this graph on that GPU: no kernel runs faster than its data sheet, and real fusion stops short of
the model (two passes for a large GroupNorm, chains inductor splits). Data-sheet numbers (SXM parts, dense bf16):
H100 989 TFLOP/s and 3.35 TB/s, H200 989 TFLOP/s and 4.8 TB/s. Workloads:

- ``unet``: one forward of the paper-config UNet at 1024² (128² latents, 333 text tokens), separate and fused Q/K/V
  projections; ``--profile`` sets a ``profile_unet.py`` kernel profile beside the floors;
- ``reconstruction``: the parts of the tiny-decoder training step that ``bench_reconstruction_parts.py`` times
  (batch 64, 128²: frozen encoder forward, tiny decoder forward + backward, three discriminator passes + backward);
  ``--measured`` sets that script's JSON beside the floors;
- ``autoencoder``: one forward + backward of ``bench_train_loop.py``'s autoencoder128 step (batch 32, 128², MSE + KL);
- ``student``: one optimizer step of ``bench_train_loop.py``'s student16 config (the emoji student UNet, flow
  matching, batch 128 at 16x16 latents: forward, backward, clipping, AdamW, EMA); ``--measured`` sets a
  ``bench_train_loop.py`` JSON's fastest student16 step beside the floor.

    python benchmarks/roofline.py unet --profile benchmarks/results/profile_unet_h200.json --out benchmarks/results
    python benchmarks/roofline.py reconstruction --measured benchmarks/results/reconstruction_parts_h100.json \
        --out benchmarks/results
    python benchmarks/roofline.py unet --smoke --out smoke_out          # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (  # also puts the checkout's src/ on sys.path
    flop_counter,
    markdown_table,
    write_results,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: (name, dense bf16 TFLOP/s, memory TB/s) from NVIDIA's data sheets (SXM parts).
GPUS = [("H100", 989.0, 3.35), ("H200", 989.0, 4.8)]
LIBRARY = {"matmul": ("mm", "addmm", "bmm", "baddbmm"), "convolution": ("convolution", "convolution_backward")}
FAMILY_ORDER = ["matmul", "convolution", "attention", "fused chains"]
FLOPS = flop_counter().flop_registry  # torch's formulas, grouped convolution backwards counted right


def _library_family(func) -> str | None:
    name = func.overloadpacket.__name__
    for family, names in LIBRARY.items():
        if name in names:
            return family
    return None


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension, stride 0, counts once)."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


class OpRecorder(TorchFunctionMode):
    """Records every op of a workload: family, FLOPs, and input/output tensors (kept alive so ids stay unique).

    Attention is taken at ``F.scaled_dot_product_attention`` as one fused kernel, and its backward (when Q, K or V
    needs a gradient) as one more: Q, K, V, the output and its gradient in, the three gradients out, 2.5x the
    forward's FLOPs (a flash backward recomputes the scores: five matrix products to the forward's two). Everything
    else is recorded at the aten level through :class:`_AtenRecorder`, backward ops included.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []
        self.keep: list = []
        self.aten = _AtenRecorder(self)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]])[:3]
        batch_heads = query.numel() // (query.shape[-2] * query.shape[-1])
        flops = 4 * batch_heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
        with self.aten.pause():  # the output's allocation is part of the attention kernel
            if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
                out = _AttentionStandIn.apply(self, flops, query, key, value)
            else:
                out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        self.add("attention", flops, [query, key, value], [out])
        return out

    def add(self, family, flops, inputs, outputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        outs = [t for t in outputs if isinstance(t, torch.Tensor)]
        self.ops.append(dict(family=family, flops=flops, inputs=tensors, outputs=outs))


class _AttentionStandIn(torch.autograd.Function):
    """An attention output on ``meta`` whose backward records the fused attention backward kernel."""

    @staticmethod
    def forward(ctx, recorder, flops, query, key, value):
        ctx.recorder, ctx.flops = recorder, flops
        out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        with ctx.recorder.aten.pause():
            grads = [t.new_empty(t.shape) for t in (query, key, value)]
        ctx.recorder.add("attention", 5 * ctx.flops // 2, [query, key, value, out, grad_out], grads)
        return None, None, *grads


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, recorder: OpRecorder):
        super().__init__()
        self.recorder = recorder
        self.alias: dict[int, int] = {}  # id of a view -> id of the tensor it views
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.recorder.keep += inputs + outputs  # every tensor seen stays alive: ids are never reused
        if self.paused:
            return out
        if func.is_view and inputs:  # a view reads and writes nothing: it stands for the tensor it views
            for t in outputs:
                if t is not inputs[0]:  # aten.lift_fresh returns its input: no alias to itself
                    self.alias[id(t)] = self.base(inputs[0])
            return out
        family = _library_family(func)
        flops = 0
        if family is not None and func.overloadpacket in FLOPS:
            flops = FLOPS[func.overloadpacket](*args, **kwargs, out_val=out)
        self.recorder.add(family or "fused chains", flops, inputs, outputs)
        return out

    @contextlib.contextmanager
    def pause(self):
        """Ops inside are not recorded (allocations that belong to a fused kernel recorded as one op)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def base(self, t: torch.Tensor) -> int:
        key = id(t)
        while key in self.alias:
            key = self.alias[key]
        return key


def record(workload) -> tuple[list[dict], _AtenRecorder]:
    """Runs ``workload()`` with ``meta`` as the default device and returns its ops and the view map."""
    recorder = OpRecorder()
    with torch.device("meta"), recorder, recorder.aten:
        workload()
    return recorder.ops, recorder.aten


def floor_bytes(ops: list[dict], aten: _AtenRecorder) -> list[int]:
    """Bytes each op moves under the fusion model of the module docstring."""
    producer: dict[int, str] = {}
    consumers: dict[int, set] = defaultdict(set)
    for op in ops:
        for t in op["inputs"]:
            consumers[aten.base(t)].add(op["family"])
        for t in op["outputs"]:
            producer[aten.base(t)] = op["family"]
    moved = []
    for op in ops:
        if op["family"] != "fused chains":
            moved.append(sum(_nbytes(t) for t in op["inputs"]) + sum(_nbytes(t) for t in op["outputs"]))
            continue
        reads = sum(_nbytes(t) for t in op["inputs"] if producer.get(aten.base(t)) != "fused chains")
        writes = sum(_nbytes(t) for t in op["outputs"]
                     if not consumers[aten.base(t)] or consumers[aten.base(t)] - {"fused chains"})
        moved.append(reads + writes)
    return moved


def floors(workload, gpus=GPUS) -> list[dict]:
    """Per-family ops, GFLOP, MB moved and floor (ms per GPU) of ``workload()``, plus a ``total`` row."""
    ops, aten = record(workload)
    families = {name: dict(family=name, ops=0, gflop=0.0, mb=0.0, **{f"floor_ms_{g}": 0.0 for g, _, _ in gpus})
                for name in FAMILY_ORDER}
    for op, nbytes in zip(ops, floor_bytes(ops, aten)):
        row = families[op["family"]]
        row["ops"] += 1
        row["gflop"] += op["flops"] / 1e9
        row["mb"] += nbytes / 1e6
        for gpu, tflops, tbs in gpus:
            row[f"floor_ms_{gpu}"] += 1e3 * max(op["flops"] / (tflops * 1e12), nbytes / (tbs * 1e12))
    rows = list(families.values())
    return rows + [dict(family="total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "family"})]


def _table(rows: list[dict]) -> str:
    columns = ["family", "ops", "gflop", "mb"] + [f"floor_ms_{g}" for g, _, _ in GPUS]
    return markdown_table([dict(r, gflop=round(r["gflop"], 2), mb=round(r["mb"], 1),
                                **{f"floor_ms_{g}": round(r[f"floor_ms_{g}"], 3) for g, _, _ in GPUS})
                           for r in rows], columns)


def unet_workloads(smoke: bool, batch_sizes: list[int]) -> list[tuple[dict, object]]:
    """``({"qkv", "batch"}, workload)``: one forward of the paper UNet (a tiny one with ``smoke``) per batch size,
    with separate and with fused Q/K/V projections."""
    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.testing import tiny_unet

    latent, tokens = (8, 8) if smoke else (128, 333)
    workloads = []
    for fused in (False, True):
        with torch.device("meta"):
            model = (tiny_unet() if smoke else SnapGenUNet2DModel()).to(torch.bfloat16).eval()
        if fused:
            model.fuse_qkv_projections()
        for batch in batch_sizes:
            config = model.config
            with torch.device("meta"):  # the inputs exist before the forward, as on a GPU
                inputs = dict(
                    sample=torch.randn(batch, config.in_channels, latent, latent, dtype=torch.bfloat16),
                    timestep=torch.full((batch,), 500.0),
                    encoder_hidden_states=torch.randn(batch, tokens, config.joint_attention_dim, dtype=torch.bfloat16),
                    pooled_projections=torch.randn(batch, config.pooled_projection_dim, dtype=torch.bfloat16))

            def forward(model=model, inputs=inputs):
                with torch.no_grad():
                    model(**inputs)

            workloads.append(({"qkv": "fused" if fused else "separate", "batch": batch}, forward))
    return workloads


def reconstruction_workloads(smoke: bool) -> list[tuple[dict, object]]:
    """``({"part"}, workload)``: the parts ``bench_reconstruction_parts.py`` times, at its sizes, in bf16."""
    from bench_reconstruction_parts import build_parts

    batch, size = (2, 32) if smoke else (64, 128)
    with torch.device("meta"):
        parts = build_parts("nchw", batch, size, "meta", dtype=torch.bfloat16)
    return [({"part": name, "batch": batch, "resolution": size}, fn) for name, fn in parts.items()]


def autoencoder_workloads(smoke: bool) -> list[tuple[dict, object]]:
    """``({"part"}, workload)``: one step of ``bench_train_loop.py``'s autoencoder128 in bf16: the emoji
    AutoencoderKL's encoder, a posterior sample and decoder forward, then the backward of MSE + KL (batch 32, 128²)."""
    from bench_train_loop import EMOJI_VAE, TINY_VAE
    from diffusers import AutoencoderKL

    batch, size = (2, 32) if smoke else (32, 128)
    with torch.device("meta"):
        vae = AutoencoderKL(**(TINY_VAE if smoke else EMOJI_VAE)).to(torch.bfloat16)
        pixels = torch.randn(batch, 3, size, size, dtype=torch.bfloat16)

    def forward_backward():
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        ((reconstruction - pixels).float().square().mean() + 1e-6 * posterior.kl().mean()).backward()

    return [({"part": "autoencoder_fwd_bwd", "batch": batch, "resolution": size}, forward_backward)]


def student_workloads(smoke: bool) -> list[tuple[dict, object]]:
    """``({"part"}, workload)``: one optimizer step of ``bench_train_loop.py``'s student16 config (the emoji
    student, flow matching at 16x16 latents, batch 128, 20 text tokens): bf16 forward and backward, then what the
    engine's step does with fp32 master weights (gradient norm and clipping, AdamW, EMA update)."""
    from bench_train_loop import EMOJI_STUDENT, TEXT_TOKENS, TEXT_WIDTH, TINY_UNET

    from diffusers_snapgen import SnapGenUNet2DModel

    config, batch, size, tokens = (TINY_UNET, 4, 8, 8) if smoke else (EMOJI_STUDENT, 128, 16, TEXT_TOKENS)
    width = config["joint_attention_dim"] if smoke else TEXT_WIDTH
    with torch.device("meta"):
        model = SnapGenUNet2DModel(**config, sample_size=size).to(torch.bfloat16)
        master = [p.detach().float() for p in model.parameters()]
        ema = [p.clone() for p in master]
        optimizer = torch.optim.AdamW(master, lr=1e-4, foreach=False)  # no foreach kernels on meta
        inputs = dict(sample=torch.randn(batch, 16, size, size, dtype=torch.bfloat16),
                      timestep=torch.rand(batch) * 1000,
                      encoder_hidden_states=torch.randn(batch, tokens, width, dtype=torch.bfloat16),
                      pooled_projections=torch.randn(batch, config["pooled_projection_dim"], dtype=torch.bfloat16))
        target = torch.randn(batch, 16, size, size, dtype=torch.bfloat16)

    def step():
        prediction = model(**inputs).sample
        (prediction.float() - target.float()).square().mean().backward()
        for weight, p in zip(master, model.parameters()):
            weight.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        optimizer.step()
        for average, weight in zip(ema, master):
            average.lerp_(weight, 1e-4)

    return [({"part": "student16_step", "batch": batch, "resolution": size}, step)]


def compare(rows: list[dict], measured_ms: dict, gpu: str) -> list[dict]:
    """Measured time against the floor, one row per key of ``measured_ms`` (keys name rows of ``rows``)."""
    by_name = {r["name"]: r for r in rows}
    return [dict(name=name, measured_ms=round(ms, 3), floor_ms=round(by_name[name][f"floor_ms_{gpu}"], 3),
                 ratio=round(ms / by_name[name][f"floor_ms_{gpu}"], 2)) for name, ms in measured_ms.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["unet", "reconstruction", "autoencoder", "student"])
    parser.add_argument("--out", type=Path, required=True, help="folder for roofline_<workload>.{json,md}")
    parser.add_argument("--batch-sizes", default="1,16", help="unet: comma-separated batch sizes (default 1,16)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="unet: a profile_unet.py JSON to set beside the floors of its batch size and Q/K/V "
                             "projections (its batch must be in --batch-sizes)")
    parser.add_argument("--measured", type=Path, default=None,
                        help="reconstruction: a bench_reconstruction_parts.py JSON; student: a bench_train_loop.py "
                             "JSON (its fastest student16 step); set beside the floors")
    parser.add_argument("--gpu", default="H200", choices=[g for g, _, _ in GPUS],
                        help="the GPU that --profile / --measured was measured on (default H200)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the code path)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    given = {"unet": args.profile, "reconstruction": args.measured, "student": args.measured}.get(args.workload)
    for flag, value, workloads in (("--profile", args.profile, ("unet",)),
                                   ("--measured", args.measured, ("reconstruction", "student"))):
        if value is not None and args.workload not in workloads:
            parser.error(f"{flag} is not for the {args.workload} workload")
    if given is not None and not given.is_file():
        parser.error(f"no such file {given}")
    measured = None if given is None else json.loads(given.read_text())
    if args.workload == "unet" and measured is not None:
        profiled_qkv = "fused" if measured.get("fuse_qkv") else "separate"
        if measured.get("batch", 1) not in batch_sizes:
            parser.error(f"--profile {given.name} is at batch {measured.get('batch', 1)}: add it to --batch-sizes")

    workloads = {"unet": lambda: unet_workloads(args.smoke, batch_sizes),
                 "reconstruction": lambda: reconstruction_workloads(args.smoke),
                 "autoencoder": lambda: autoencoder_workloads(args.smoke),
                 "student": lambda: student_workloads(args.smoke)}[args.workload]()
    results = []
    for labels, workload in workloads:
        results.append(dict(labels, families=floors(workload)))
        print(json.dumps(labels | {"total": results[-1]["families"][-1]}), flush=True)

    sheets = ", ".join(f"{g} {t:g} TFLOP/s and {b:g} TB/s" for g, t, b in GPUS)
    lines = [f"# Data-sheet floor: {args.workload}{' (smoke: tiny sizes)' if args.smoke else ''}", "",
             f"Written by `benchmarks/roofline.py {args.workload}` (a model, not a measurement: see its docstring). "
             f"Data sheets: {sheets}.", ""]
    for result in results:
        title = (f"Batch {result['batch']}, {result['qkv']} Q/K/V projections" if args.workload == "unet"
                 else f"`{result['part']}`, batch {result['batch']}, {result['resolution']}²")
        lines += [f"## {title}", "", _table(result["families"]), ""]
    if measured is not None:
        if args.workload == "unet":  # the profile's kernel families against the floors of its batch and projections
            rows = next(r for r in results if r["batch"] == measured.get("batch", 1)
                        and r["qkv"] == profiled_qkv)["families"]
            kernel_ms = {r["family"]: r["ms"] for r in measured["families"]}
            kernel_ms["fused chains"] = sum(kernel_ms.pop(k, 0.0) for k in ("normalisation",
                                                                            "fused elementwise (triton)", "other"))
            kernel_ms["total"] = measured["kernel_ms"]
            named = [dict(r, name=r["family"]) for r in rows]
            note = (f"Batch {measured.get('batch', 1)}, {profiled_qkv} projections. The profile's attention family "
                    "includes inductor's fused QK-norm + RoPE kernels, which the model counts in fused chains."
                    + (" The profile passed the text keys and values precomputed; the floors include their "
                       "projections." if measured.get("text_kv") else ""))
        elif args.workload == "student":  # the fastest measured mode of the whole step against its floor
            rows = measured.get("rows") or measured.get("bench", {}).get("rows", [])
            timed = [r for r in rows if r.get("config") == "student16" and r.get("step_ms")]
            if not timed:
                parser.error(f"{given} has no timed student16 row")
            fastest = min(timed, key=lambda r: r["step_ms"])
            named = [dict(results[0]["families"][-1], name="student16_step")]
            kernel_ms = {"student16_step": fastest["step_ms"]}
            note = (f"The fastest student16 row of that run, `{fastest['mode']}` mode: the whole step's wall time "
                    "(kernels and the gaps between them).")
        else:  # every layout's time of each part against its floor
            named = [dict(r["families"][-1], name=r["part"]) for r in results]
            kernel_ms = {}
            note = "Each part's fastest layout (NCHW eager, channels_last eager or compiled) in that run:"
            for part in (r["part"] for r in results):
                layout, ms = min(((layout, row[f"{part}_ms"]) for layout, row in measured["ms"].items()
                                  if row.get(f"{part}_ms")), key=lambda item: item[1])
                kernel_ms[part] = ms
                note += f" {part} {layout}"
            named.append(dict(name="total", **{f"floor_ms_{g}": sum(r[f"floor_ms_{g}"] for r in named)
                                               for g, _, _ in GPUS}))
            kernel_ms["total"] = sum(kernel_ms.values())
        lines += [f"## Against `{given.name}` ({args.gpu})", "", note, "",
                  markdown_table(compare(named, kernel_ms, args.gpu), ["name", "measured_ms", "floor_ms", "ratio"])]
    write_results(args.out, f"roofline_{args.workload}" + ("_smoke" if args.smoke else ""),
                  dict(workload=args.workload, smoke=args.smoke, gpus=GPUS, results=results), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
