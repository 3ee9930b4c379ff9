"""Linux-side validation of Core ML packages: MIL structure, I/O spec, and output PSNR (no Core ML runtime needed).

Core ML prediction needs macOS, so the checks read the package's ML-program spec (op types, I/O) and compare
PyTorch outputs: the Neural-Engine form against the original model (fp32, PSNR >= 60 dB) and the weights pulled back
out of each compressed package against the original (PSNR >= 35 dB, the bar Apple's ``ml-stable-diffusion`` uses).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

__all__ = [
    "ANE_OPS",
    "TEXT_ENCODER_EXTRA_OPS",
    "FORBIDDEN_OPS",
    "ANE_FORM_MIN_PSNR",
    "COMPRESSED_MIN_PSNR",
    "program_ops",
    "op_counts",
    "package_lut_bits",
    "io_spec",
    "check_structure",
    "psnr",
]

ANE_FORM_MIN_PSNR = 60.0
COMPRESSED_MIN_PSNR = 35.0

#: Ops the Neural Engine executes, as emitted by coremltools 9.0 for the SnapGen UNet and decoder (documented
#: allow-list; anything else in a UNet/decoder package fails the structure check). Fixed-shape layout ops,
#: elementwise maths, reductions, normalisations, conv/linear/matmul, softmax and the fused iOS18 attention, plus
#: the constant and weight-decompression ops (``constexpr_*``) that are resolved at load time.
ANE_OPS = frozenset(
    {
        # constants and compressed weights (decompressed when the model loads)
        "const", "constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
        # linear algebra and attention
        "conv", "linear", "matmul", "softmax", "scaled_dot_product_attention",
        # elementwise
        "add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "sqrt", "rsqrt", "inverse", "square", "abs",
        "exp", "sin", "cos", "clip", "tanh", "sigmoid", "silu", "gelu", "relu", "erf",
        # reductions and normalisations
        "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "layer_norm", "instance_norm", "batch_norm",
        # fixed-shape layout
        "reshape", "transpose", "concat", "split", "slice_by_index", "slice_by_size", "expand_dims", "squeeze",
        "upsample_nearest_neighbor", "pad",
    }
)

#: Extra ops allowed in text encoders only: token-embedding lookup, the causal/padding mask and CLIP's EOS-token
#: pooling (they run once per prompt; Apple's exported CLIP text encoders contain the same ops).
TEXT_ENCODER_EXTRA_OPS = frozenset(
    {
        "gather", "gather_nd", "gather_along_axis", "reduce_argmax", "cast", "select", "greater", "greater_equal",
        "less", "less_equal", "equal", "not_equal", "logical_and", "logical_or", "logical_not", "stack", "band_part",
        "fill", "range_1d",
    }
)

#: Never allowed: ``tile`` copies K/V per head (what multi-query attention must avoid) and control flow.
FORBIDDEN_OPS = frozenset({"tile", "while_loop", "cond"})


def _load_spec(model):
    spec = model.get_spec() if hasattr(model, "get_spec") else model
    if not hasattr(spec, "mlProgram") or not spec.HasField("mlProgram"):
        raise ValueError("`model` must be an ML-program Core ML model (convert_to='mlprogram').")
    return spec


def _block_ops(block):
    for op in block.operations:
        yield op.type
        for inner in op.blocks:
            yield from _block_ops(inner)


def program_ops(model, function: str = "main") -> list[str]:
    """Op types of the ML program's ``function`` (nested blocks included), in program order."""
    spec = _load_spec(model)
    if function not in spec.mlProgram.functions:
        raise ValueError(f"`function` {function!r} is not in the program ({list(spec.mlProgram.functions)}).")
    fn = spec.mlProgram.functions[function]
    return list(_block_ops(fn.block_specializations[fn.opset]))


def op_counts(model, include_const: bool = False) -> dict[str, int]:
    """``{op type: count}``, sorted by count; constants are left out unless ``include_const``."""
    counts = Counter(t for t in program_ops(model) if include_const or t != "const")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def package_lut_bits(package) -> dict[str, int]:
    """``{constant name: nbits}`` of every ``constexpr_lut_to_dense`` op in a saved ``.mlpackage`` (or loaded
    model), read from the index type of the op (``UINT4`` -> 4); constant names lose their ``_palettized`` suffix."""
    from ._deps import require_coremltools

    ct = require_coremltools()
    model = ct.models.MLModel(str(package), skip_model_load=True) if isinstance(package, (str, os.PathLike)) \
        else package
    spec = _load_spec(model)
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    types = {}
    for op in block.operations:  # index arrays may be const ops of their own
        if op.type == "const":
            types[op.outputs[0].name] = op.attributes["val"].type.tensorType.dataType
    found = {}
    for op in block.operations:
        if op.type != "constexpr_lut_to_dense":
            continue
        argument = op.inputs["indices"].arguments[0]
        dtype = types[argument.name] if argument.name else argument.value.type.tensorType.dataType
        type_name = _proto_dtype_name(dtype)
        if not type_name.startswith("UINT"):
            raise ValueError(f"unexpected look-up-table index type {type_name} in {op.outputs[0].name}.")
        name = op.outputs[0].name
        found[name[: -len("_palettized")] if name.endswith("_palettized") else name] = int(type_name[4:])
    return found


def _proto_dtype_name(value: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value)


def _dtype_name(value: int) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(value).lower()


def _feature(feature) -> dict:
    array = feature.type.multiArrayType
    return {
        "name": feature.name,
        "shape": [int(d) for d in array.shape],
        "dtype": _dtype_name(array.dataType),
    }


def io_spec(model) -> dict:
    """``{"inputs": [...], "outputs": [...]}``, each ``{"name", "shape", "dtype"}`` from the model description."""
    spec = _load_spec(model)
    return {
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
    }


def check_structure(model, target: str, expect_sdpa: bool = False, extra_ops=(), expected_io: dict | None = None):
    """Structure report of one package: ``{"passed", "problems", "op_counts", "io", "opset"}``.

    Checks: no forbidden op (``tile``, control flow); every op in :data:`ANE_OPS` (plus ``extra_ops``); the fused
    ``scaled_dot_product_attention`` present when ``expect_sdpa`` and the target is iOS18 (and decomposed
    ``softmax`` absent); I/O names, shapes and dtypes equal to ``expected_io`` when given.
    """
    if target not in ("iOS17", "iOS18"):
        raise ValueError(f"`target` must be 'iOS17' or 'iOS18', got {target!r}.")
    counts = Counter(program_ops(model))
    problems = []
    forbidden = sorted(set(counts) & FORBIDDEN_OPS)
    if forbidden:
        problems.append(f"forbidden ops present: {forbidden}")
    allowed = ANE_OPS | frozenset(extra_ops)
    outside = sorted(set(counts) - allowed - FORBIDDEN_OPS)
    if outside:
        problems.append(f"ops outside the Neural-Engine allow-list: {outside}")
    if expect_sdpa:
        if target == "iOS18":
            if not counts.get("scaled_dot_product_attention"):
                problems.append("iOS18 target but no fused scaled_dot_product_attention op")
            if counts.get("softmax"):
                problems.append("iOS18 target but attention was decomposed (softmax present)")
        elif counts.get("scaled_dot_product_attention"):
            problems.append("iOS17 target cannot contain scaled_dot_product_attention")
    io = io_spec(model)
    if expected_io is not None:
        for kind in ("inputs", "outputs"):
            want = [(f["name"], list(f["shape"]), f["dtype"]) for f in expected_io.get(kind, [])]
            got = [(f["name"], f["shape"], f["dtype"]) for f in io[kind]]
            if want and want != got:
                problems.append(f"{kind} are {got}, expected {want}")
    spec = _load_spec(model)
    return {
        "passed": not problems,
        "problems": problems,
        "op_counts": dict(sorted(((k, v) for k, v in counts.items() if k != "const"), key=lambda kv: (-kv[1], kv[0]))),
        "io": io,
        "opset": spec.mlProgram.functions["main"].opset,
        "specification_version": int(spec.specificationVersion),
    }


def psnr(reference, test) -> float:
    """Peak signal-to-noise ratio in dB with the reference's max magnitude as the peak (the definition Apple's
    ``ml-stable-diffusion`` uses for its 35 dB bar); ``inf`` for identical inputs."""
    ref = _as_numpy(reference, "reference")
    out = _as_numpy(test, "test")
    if ref.shape != out.shape:
        raise ValueError(f"`reference` {ref.shape} and `test` {out.shape} must have the same shape.")
    rmse = float(np.sqrt(np.mean((ref - out) ** 2)))
    if rmse == 0.0:
        return float("inf")
    peak = float(np.abs(ref).max())
    return float(20.0 * np.log10(max(peak, 1e-12) / rmse))


def _as_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got {type(value).__name__}.")
