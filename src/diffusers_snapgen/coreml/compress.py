"""Weight compression variants of Core ML packages and their round trip back into PyTorch.

Variants follow Apple's ``ml-stable-diffusion`` / ``apple/coreml-stable-diffusion-*-palettized`` repos: ``fp16``
(no compression) and k-means palettization to 8, 6 or 4 bits with ``coremltools.optimize.coreml.palettize_weights``
(per-tensor look-up tables for iOS17; per-grouped-channel tables, ``group_size`` output channels per table, for
iOS18). Only constants that come from learned ``nn.Parameter``\\ s of matrix/conv weights are compressed: buffers
and folded constants such as the RoPE tables and norm scales stay fp16.

Coremltools names a parameter's constant after its module path (``unet.conv_in.weight`` ->
``unet_conv_in_weight_to_fp16``; ``p_unet_conv_in_weight_to_fp16`` on the torch.export route), which is how
decompressed weights are mapped back onto the PyTorch module.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ._deps import quiet_progress, require_coremltools, require_sklearn

__all__ = [
    "VARIANTS",
    "MIXED_PREFIX",
    "NBITS",
    "EIGHT_BIT_KINDS",
    "parse_variants",
    "variant_key",
    "variant_nbits",
    "palettizable_parameters",
    "parameter_constants",
    "program_constants",
    "palettize",
    "average_bits",
    "stored_bits",
    "average_stored_bits",
    "decompressed_state_dict",
    "swapped_parameters",
]

VARIANTS = ("fp16", "palettize8", "palettize6", "palettize4")
#: ``mixed:RECIPE.json`` selects a per-layer bit width recipe (:mod:`.mixed_bit`); its folder is ``packages/mixed``.
MIXED_PREFIX = "mixed:"
#: Bit widths of ``constexpr_lut_to_dense`` look-up tables.
NBITS = (1, 2, 3, 4, 6, 8)
#: How :func:`palettize` stores 8-bit weights: ``palette`` (8-bit look-up tables) or ``linear`` (int8, per-channel
#: scales).
EIGHT_BIT_KINDS = ("palette", "linear")
_SUFFIXES = re.compile(r"(_to_fp16|_palettized|_quantized|_to_fp32)+$")
_DTYPE_BITS = re.compile(r"(\d+)$")


def parse_variants(value) -> list[str]:
    """``"fp16,palettize6,mixed:recipe.json"`` or a sequence -> validated, de-duplicated list in the given order.

    ``mixed:PATH`` names a mixed-bit recipe file (written by :func:`~.mixed_bit.search_mixed_bit`); it is checked to
    exist here and parsed when the export applies it. At most one mixed variant per export."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"`variants` must be a comma-separated string or a list, got {type(value).__name__}.")
    if not items:
        raise ValueError(f"`variants` is empty: choose from {VARIANTS}.")
    if not all(isinstance(v, str) for v in items):
        raise TypeError(f"`variants` must be strings, got {items!r}.")
    mixed = [v for v in items if v.startswith(MIXED_PREFIX)]
    unknown = [v for v in items if v not in VARIANTS and v not in mixed]
    if unknown:
        raise ValueError(f"Unknown `variants` {unknown}: choose from {VARIANTS} or mixed:RECIPE.json.")
    if len(set(mixed)) > 1:
        raise ValueError(f"`variants` has {len(set(mixed))} mixed recipes {mixed}: export one mixed variant at a time.")
    for v in mixed:
        path = v[len(MIXED_PREFIX):]
        if not path or not Path(path).is_file():
            raise ValueError(f"`variants`: mixed-bit recipe {path!r} is not a file; write one with "
                             "`snapgen convert-coreml --search-mixed-bit RECIPE.json` and pass mixed:RECIPE.json.")
    return list(dict.fromkeys(items))


def variant_key(variant: str) -> str:
    """Folder and manifest name of a variant: ``mixed:recipe.json`` -> ``mixed``; others unchanged."""
    return "mixed" if variant.startswith(MIXED_PREFIX) else variant


def variant_nbits(variant: str) -> int | None:
    """Bits per weight of a palettized variant; ``None`` for ``fp16`` and mixed recipes (bits per layer)."""
    parse_variants([variant])
    if variant.startswith(MIXED_PREFIX):
        return None
    return None if variant == "fp16" else int(variant[len("palettize"):])


def _weights_metadata(mlmodel):
    """``get_weights_metadata`` of every constant. coremltools 9.0 raises ``AttributeError`` when a listed constant
    feeds an op with a list input (``concat``/``stack`` in text encoders); retry with larger size thresholds then,
    which keeps every weight big enough to be palettized."""
    ct = require_coremltools()
    error = None
    for threshold in (0, 16, 256):
        try:
            with quiet_progress():
                return ct.optimize.coreml.get_weights_metadata(mlmodel, weight_threshold=threshold)
        except AttributeError as err:
            error = err
    raise RuntimeError(f"coremltools could not list the weights of this model: {error}")


def program_constants(mlmodel, decompress: bool = True) -> dict[str, np.ndarray]:
    """``{constant name: value}`` of the model's weights, compressed ones decompressed to dense arrays.

    Models made in this process keep their MIL program, whose ``constexpr_*`` ops coremltools materialises one by
    one (``constexpr_lut_to_dense`` -> dense weight), as ``decompress_weights`` does internally. A model loaded from disk goes through the public
    ``decompress_weights`` + ``get_weights_metadata`` (slower: they re-run the conversion passes).
    """
    program = getattr(mlmodel, "_mil_program", None)
    if program is not None and "main" in program.functions:
        values = {}
        for op in program.functions["main"].operations:
            if op.op_type == "const":
                value = op.outputs[0].val
            elif decompress and op.op_type.startswith("constexpr_"):
                value = op.materialized_val_inference()  # what ``decompress_weights`` uses per op
                value = value[0] if isinstance(value, (list, tuple)) else value
            else:
                continue
            if value is not None:
                values[op.outputs[0].name] = np.asarray(value)
        return values
    if decompress:
        ct = require_coremltools()
        with quiet_progress():
            mlmodel = ct.optimize.coreml.decompress_weights(mlmodel)
    return {name: np.asarray(meta.val) for name, meta in _weights_metadata(mlmodel).items()}


def _map_parameters(sizes: dict[str, int], module: torch.nn.Module) -> dict[str, str]:
    """``{constant name: parameter name}`` for the constants in ``sizes`` (``{constant name: elements}``) whose name
    and size match one parameter of ``module``."""
    params = dict(module.named_parameters())
    by_key: dict[str, str | None] = {}
    for name in params:
        key = name.replace(".", "_")
        by_key[key] = None if key in by_key else name  # None marks an ambiguous name: never mapped
    mapping = {}
    for const_name, size in sizes.items():
        key = _SUFFIXES.sub("", const_name)
        pname = by_key.get(key)
        if pname is None and key.startswith("p_"):  # torch.export route: parameters are lifted as ``p_<path>``
            pname = by_key.get(key[2:])
        if pname is not None and size == params[pname].numel():
            mapping[const_name] = pname
    return mapping


def parameter_constants(mlmodel, module: torch.nn.Module) -> dict[str, str]:
    """``{constant name in the program: parameter name in module}`` for every parameter found by name and size.

    ``module`` must be the module that was traced (e.g. the :class:`UNetCoreMLWrapper`).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    return _map_parameters({k: v.size for k, v in program_constants(mlmodel).items()}, module)


def palettizable_parameters(mlmodel, module: torch.nn.Module, weight_threshold: int = 2048,
                            values: dict | None = None) -> dict[str, dict]:
    """``{parameter name: {"const", "shape", "numel"}}`` of the weights :func:`palettize` compresses: parameters
    of ``module`` found in the program with at least two dimensions and more than ``weight_threshold`` elements
    (at most ``2**nbits`` elements also keeps a weight in fp16)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    values = program_constants(mlmodel, decompress=False) if values is None else values
    found = {}
    for const_name, pname in _map_parameters({k: v.size for k, v in values.items()}, module).items():
        val = values[const_name]
        if val.ndim >= 2 and val.size > weight_threshold:
            found[pname] = {"const": const_name, "shape": list(val.shape), "numel": int(val.size)}
    return dict(sorted(found.items()))


def palettize(
    mlmodel,
    module: torch.nn.Module,
    nbits,
    target: str,
    group_size: int = 16,
    weight_threshold: int = 2048,
    mode: str = "kmeans",
    eight_bit: str = "palette",
):
    """k-means palettize the parameter weights of ``mlmodel`` to ``nbits``; returns ``(model, info)``.

    ``nbits`` is one width for every weight, or ``{parameter name: nbits}`` (a mixed-bit recipe): listed weights get
    their own width, unlisted ones stay fp16. Weights with at most ``max(weight_threshold, 2**nbits)`` elements,
    biases and other 1-D vectors, and every constant that is not a parameter (RoPE tables, buffers) are left in
    fp16. On iOS18 each look-up table covers ``group_size`` output channels (per-grouped-channel); a weight whose
    output channels ``group_size`` does not divide, and every weight on iOS17, gets one table (per-tensor).
    ``mode="uniform"`` (evenly spaced tables, no clustering) gives packages of exactly the same size much faster.
    coremltools clusters each weight on its own (scikit-learn k-means, ``random_state=0``), so a weight's table
    does not depend on which other weights are palettized in the same call.

    ``eight_bit="linear"`` stores the weights given 8 bits as int8 with one fp16 scale per output channel
    (``OpLinearQuantizerConfig``, symmetric) instead of 8-bit tables: 8 + 16/fan_in bits per weight against
    8 + 256/fan_in for 16-channel tables, and closer to fp16 (docs/coreml_mixed_bit.md).
    """
    ct = require_coremltools()
    require_sklearn()
    per_layer = isinstance(nbits, Mapping)
    widths = set(nbits.values()) if per_layer else {nbits}
    bad = sorted(str(b) for b in widths if isinstance(b, bool) or b not in NBITS)
    if bad:
        raise ValueError(f"`nbits` must be one of {NBITS} (or a mapping to them), got {', '.join(bad)}.")
    if target not in ("iOS17", "iOS18"):
        raise ValueError(f"`target` must be 'iOS17' or 'iOS18', got {target!r}.")
    if mode not in ("kmeans", "uniform"):
        raise ValueError(f"`mode` must be 'kmeans' or 'uniform', got {mode!r}.")
    if eight_bit not in EIGHT_BIT_KINDS:
        raise ValueError(f"`eight_bit` must be one of {EIGHT_BIT_KINDS}, got {eight_bit!r}.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    if not isinstance(weight_threshold, int) or weight_threshold < 0:
        raise ValueError(f"`weight_threshold` must be an int >= 0, got {weight_threshold!r}.")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    cto = ct.optimize.coreml
    values = program_constants(mlmodel, decompress=False)
    eligible = palettizable_parameters(mlmodel, module, weight_threshold, values)
    if per_layer:
        unknown = sorted(set(nbits) - set(eligible))
        if unknown:
            raise ValueError(f"`nbits` names weights that are not palettizable parameters of this model: "
                             f"{unknown[:5]}; use names from palettizable_parameters().")
    configs, linear, chosen, grouped = {}, {}, {}, 0
    for pname, meta in eligible.items():
        bits = nbits.get(pname) if per_layer else nbits
        if bits is None or meta["numel"] <= 2**bits:
            continue
        shape = meta["shape"]
        common = dict(mode=mode, nbits=bits, weight_threshold=max(weight_threshold, 2**bits))
        if bits == 8 and eight_bit == "linear":
            linear[meta["const"]] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=weight_threshold)
        elif target == "iOS18" and shape[0] % group_size == 0 and shape[0] > group_size:
            configs[meta["const"]] = cto.OpPalettizerConfig(granularity="per_grouped_channel", group_size=group_size,
                                                            channel_axis=0, **common)
            grouped += 1
        else:
            configs[meta["const"]] = cto.OpPalettizerConfig(granularity="per_tensor", **common)
        chosen[pname] = bits
    sizes = {p: eligible[p]["numel"] for p in eligible}
    info = {
        "nbits": "mixed" if per_layer else nbits,
        "mode": mode,
        "eight_bit": eight_bit,
        "granularity": "per_grouped_channel" if target == "iOS18" else "per_tensor",
        "group_size": group_size if target == "iOS18" else None,
        "weight_threshold": weight_threshold if per_layer else max(weight_threshold, 2**nbits),
        "palettized_tensors": len(chosen) - len(linear),
        "linear_quantized_tensors": len(linear),
        "per_grouped_channel_tensors": grouped,
        "average_bits_per_weight": average_bits(chosen, sizes),
        "palettized_parameters": sorted(chosen),
        "parameter_bits": dict(sorted(chosen.items())),
    }
    if not chosen:
        info["average_bits_per_weight_with_luts"] = info["average_bits_per_weight"]
        return mlmodel, info
    compressed = mlmodel
    with quiet_progress():
        if configs:
            compressed = cto.palettize_weights(compressed, cto.OptimizationConfig(op_name_configs=configs))
        if linear:  # after the tables: linear_quantize_weights only touches the remaining dense constants
            compressed = cto.linear_quantize_weights(compressed, cto.OptimizationConfig(op_name_configs=linear))
    stored = stored_bits(compressed, module)
    info["average_bits_per_weight_with_luts"] = average_stored_bits({p: stored[p] for p in chosen}, sizes)
    return compressed, info


def average_bits(bits: Mapping, sizes: Mapping) -> float | None:
    """Bits per weight over the weights in ``sizes`` (``{name: elements}``): ``bits[name]``, or 16 (fp16) for a
    weight ``bits`` does not list. Look-up tables are not counted (:func:`average_stored_bits` counts them).
    ``None`` when ``sizes`` is empty."""
    total = sum(sizes.values())
    if not total:
        return None
    return round(sum(n * bits.get(name, 16) for name, n in sizes.items()) / total, 4)


def _dtype_bits(var) -> int:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(var.dtype)
    found = _DTYPE_BITS.search(name)
    if found is None:
        raise ValueError(f"unexpected constant type {name} of {var.name}.")
    return int(found.group(1))


def stored_bits(mlmodel, module: torch.nn.Module) -> dict[str, int]:
    """``{parameter name: bits the program stores for it}``: a compressed weight counts its indices *and* its
    look-up tables (and any scales) at their stored widths (``uint4`` indices, fp16 tables); a dense weight counts
    its elements at their type (16 for fp16). Read from the program of a model made in this process.

    Per-grouped-channel tables cost ``2**nbits * 16`` bits per ``group_size`` output channels, i.e.
    ``2**nbits * 16 / (group_size * fan_in)`` bits per weight: small groups and 8-bit tables are not free."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    program = getattr(mlmodel, "_mil_program", None)
    if program is None or "main" not in program.functions:
        raise ValueError("`mlmodel` must be a model converted or compressed in this process (it has no MIL program).")
    operations = list(program.functions["main"].operations)
    producers = {op.outputs[0].name: op for op in operations}

    def cost(op) -> int:
        if op.op_type == "const":
            var = op.outputs[0]
            return int(np.prod(var.shape, dtype=np.int64)) * _dtype_bits(var)
        return sum(cost(producers[v.name]) for v in op.inputs.values()
                   if getattr(v, "name", None) in producers)

    consumed = {v.name for op in operations if op.op_type.startswith("constexpr_")
                for v in op.inputs.values() if getattr(v, "name", None) in producers}
    sizes = {op.outputs[0].name: int(np.prod(op.outputs[0].shape, dtype=np.int64)) for op in operations
             if (op.op_type == "const" or op.op_type.startswith("constexpr_")) and op.outputs[0].name not in consumed}
    return {pname: cost(producers[const]) for const, pname in _map_parameters(sizes, module).items()}


def average_stored_bits(stored: Mapping, sizes: Mapping) -> float | None:
    """Bits per weight over ``sizes`` (``{name: elements}``) counting look-up tables: ``stored[name]`` (total bits
    of a weight, :func:`stored_bits`), or 16 per element for a weight ``stored`` does not list."""
    total = sum(sizes.values())
    if not total:
        return None
    return round(sum(stored.get(name, 16 * n) for name, n in sizes.items()) / total, 4)


def decompressed_state_dict(mlmodel, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameter values stored in ``mlmodel`` (palettized ones decompressed), as fp32 tensors keyed like
    ``module.state_dict()``, ready for :func:`swapped_parameters`."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    values = program_constants(mlmodel)
    params = dict(module.named_parameters())
    return {
        pname: torch.from_numpy(values[const_name].astype(np.float32)).reshape(params[pname].shape)
        for const_name, pname in _map_parameters({k: v.size for k, v in values.items()}, module).items()
    }


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Temporarily copy ``state`` into ``module``'s parameters (restored on exit, also after an error)."""
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"`state` has names that are not parameters of `module`: {unknown[:5]}")
    saved = {name: params[name].detach().clone() for name in state}
    try:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))
        yield module
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
