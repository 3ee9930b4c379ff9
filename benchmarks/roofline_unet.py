"""The data-sheet floor of one SnapGen UNet step: the least time its kernels could take on a GPU, from the GPU's
peak bf16 matrix rate and memory bandwidth alone (a roofline model; no GPU needed).

One forward of the paper-config UNet (bf16, 1024² images: 128² latents, 333 text tokens) is recorded op by op on the
``meta`` device. Each op gets its FLOPs (``torch.utils.flop_counter``, multiply-add = 2) and the bytes it must move:

- matrix products, convolutions and attention are library kernels that inductor does not fuse: each reads all of its
  inputs (weights included) and writes its output once; attention is one fused kernel (Q, K, V in, output out, no
  score matrix in memory);
- every other op (normalisations, activations, residual adds, RoPE, copies) is assumed fused with its neighbours
  into one kernel per chain, as inductor does: such a chain reads only the tensors it gets from a library kernel,
  a weight or the inputs, and writes only the tensors a library kernel reads or the forward returns. Views are free.

An op's floor is ``max(FLOPs / peak, bytes / bandwidth)``; a family's floor is the sum over its ops. The whole is a
lower bound for this graph on that GPU: no kernel runs faster than its data sheet, and real fusion stops short of
the model (two passes for a large GroupNorm, chains inductor splits). Compare it with a measured profile
(``profile_unet.py``) to see how far each family is from its floor. Data-sheet numbers (SXM parts, dense bf16):
H100 989 TFLOP/s and 3.35 TB/s, H200 989 TFLOP/s and 4.8 TB/s.

    python benchmarks/roofline_unet.py --out benchmarks/results
    python benchmarks/roofline_unet.py --smoke --out smoke_out          # a tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

from diffusers_snapgen import SnapGenUNet2DModel  # noqa: E402
from diffusers_snapgen.testing import tiny_unet  # noqa: E402

#: (name, dense bf16 TFLOP/s, memory TB/s) from NVIDIA's data sheets (SXM parts).
GPUS = [("H100", 989.0, 3.35), ("H200", 989.0, 4.8)]
LIBRARY = {"matmul": ("mm", "addmm", "bmm", "baddbmm"), "convolution": ("convolution",)}
FAMILY_ORDER = ["matmul", "convolution", "attention", "fused chains"]


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
    """Records every op of a forward: family, FLOPs, and input/output tensors (kept alive so ids stay unique).

    Attention is taken at ``F.scaled_dot_product_attention`` (one fused kernel); everything else at the aten level
    through :class:`_AtenRecorder`.
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
        self.aten.paused = True  # the output's allocation is part of the attention kernel
        out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        self.aten.paused = False
        batch_heads = query.numel() // (query.shape[-2] * query.shape[-1])
        flops = 4 * batch_heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
        self.add("attention", flops, [query, key, value], [out])
        return out

    def add(self, family, flops, inputs, outputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        outs = [t for t in outputs if isinstance(t, torch.Tensor)]
        self.keep += tensors + outs
        self.ops.append(dict(family=family, flops=flops, inputs=tensors, outputs=outs))


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, recorder: OpRecorder):
        super().__init__()
        self.recorder = recorder
        self.alias: dict[int, int] = {}  # id of a view -> id of the tensor it views
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.is_view:
            for t in outputs:
                self.alias[id(t)] = self.base(inputs[0]) if inputs else id(t)
            self.recorder.keep += outputs
            return out
        family = _library_family(func)
        flops = 0
        if family is not None and func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        self.recorder.add(family or "fused chains", flops, inputs, outputs)
        return out

    def base(self, t: torch.Tensor) -> int:
        key = id(t)
        while key in self.alias:
            key = self.alias[key]
        return key


def record_forward(model: torch.nn.Module, inputs: dict) -> tuple[list[dict], _AtenRecorder, set]:
    recorder = OpRecorder()
    with torch.no_grad(), recorder, recorder.aten:
        out = model(**inputs)
    returned = {recorder.aten.base(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
    return recorder.ops, recorder.aten, returned


def floor_bytes(ops: list[dict], aten: _AtenRecorder, returned: set) -> list[int]:
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
                     if aten.base(t) in returned or consumers[aten.base(t)] - {"fused chains"})
        moved.append(reads + writes)
    return moved


def unet_inputs(config, batch: int, latent: int, tokens: int, dtype) -> dict:
    return dict(
        sample=torch.randn(batch, config.in_channels, latent, latent, dtype=dtype),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, tokens, config.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, dtype=dtype),
    )


def roofline(model, batch: int, latent: int, tokens: int, gpus=GPUS) -> dict:
    """Per-family FLOPs, bytes and floors (ms per GPU) of one forward of ``model`` (built on ``meta``)."""
    with torch.device("meta"):
        inputs = unet_inputs(model.config, batch, latent, tokens, next(model.parameters()).dtype)
        ops, aten, returned = record_forward(model, inputs)
    moved = floor_bytes(ops, aten, returned)
    families = {name: dict(family=name, ops=0, gflop=0.0, mb=0.0, **{f"floor_ms_{g}": 0.0 for g, _, _ in gpus})
                for name in FAMILY_ORDER}
    for op, nbytes in zip(ops, moved):
        row = families[op["family"]]
        row["ops"] += 1
        row["gflop"] += op["flops"] / 1e9
        row["mb"] += nbytes / 1e6
        for gpu, tflops, tbs in gpus:
            row[f"floor_ms_{gpu}"] += 1e3 * max(op["flops"] / (tflops * 1e12), nbytes / (tbs * 1e12))
    rows = list(families.values())
    total = dict(family="total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "family"})
    return dict(batch=batch, families=rows + [total])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for roofline_unet.{json,md}")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a profile_unet.py JSON (batch 1, same model) to set beside the floors")
    parser.add_argument("--profile-gpu", default="H200", choices=[g for g, _, _ in GPUS],
                        help="the GPU that --profile was measured on (default H200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny UNet at 64² (checks the code path)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    if args.profile is not None and not args.profile.is_file():
        parser.error(f"--profile: no such file {args.profile}")

    latent, tokens = (8, 8) if args.smoke else (128, 333)
    results = []
    for fused in (False, True):
        with torch.device("meta"):
            model = (tiny_unet() if args.smoke else SnapGenUNet2DModel()).to(torch.bfloat16).eval()
        if fused:
            model.fuse_qkv_projections()
        for batch in batch_sizes:
            result = roofline(model, batch, latent, tokens)
            result["qkv"] = "fused" if fused else "separate"
            results.append(result)
            print(json.dumps({k: result[k] for k in ("qkv", "batch")} | {"total": result["families"][-1]}), flush=True)

    profile = json.loads(args.profile.read_text()) if args.profile else None
    lines = [f"# Data-sheet floor of one SnapGen UNet step ({'tiny smoke UNet, 64²' if args.smoke else '1024², bf16'})",
             "", "Written by `benchmarks/roofline_unet.py` (a model, not a measurement: see its docstring). Data "
             "sheets: " + ", ".join(f"{g} {t:g} TFLOP/s and {b:g} TB/s" for g, t, b in GPUS) + ".", ""]
    columns = ["family", "ops", "gflop", "mb"] + [f"floor_ms_{g}" for g, _, _ in GPUS]
    for result in results:
        rows = [dict(r, gflop=round(r["gflop"], 2), mb=round(r["mb"], 1),
                     **{f"floor_ms_{g}": round(r[f"floor_ms_{g}"], 3) for g, _, _ in GPUS})
                for r in result["families"]]
        lines += [f"## Batch {result['batch']}, {result['qkv']} Q/K/V projections", "", markdown_table(rows, columns), ""]
    if profile:
        floor = next(r for r in results if r["batch"] == 1 and r["qkv"] == "separate")
        by_family = {r["family"]: r for r in floor["families"]}
        measured = {r["family"]: r["ms"] for r in profile["families"]}
        measured["fused chains"] = sum(measured.get(k, 0.0) for k in ("normalisation", "fused elementwise (triton)",
                                                                      "other"))
        measured["total"] = profile["kernel_ms"]
        floor_key = f"floor_ms_{args.profile_gpu}"
        rows = [dict(family=name, profiled_ms=round(measured.get(name, 0.0), 3),
                     floor_ms=round(by_family[name][floor_key], 3),
                     ratio=round(measured.get(name, 0.0) / by_family[name][floor_key], 2))
                for name in FAMILY_ORDER + ["total"]]
        lines += [f"## Against the kernel profile `{args.profile.name}` ({args.profile_gpu}, batch 1, separate "
                  "projections)", "",
                  "The profile's attention family includes inductor's fused QK-norm + RoPE kernels, which the model "
                  "counts in fused chains.", "",
                  markdown_table(rows, ["family", "profiled_ms", "floor_ms", "ratio"])]
    write_results(args.out, "roofline_unet" + ("_smoke" if args.smoke else ""),
                  dict(smoke=args.smoke, gpus=GPUS, results=results), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
