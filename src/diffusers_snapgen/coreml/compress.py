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
from collections.abc import Iterable

import numpy as np
import torch

from ._deps import quiet_progress, require_coremltools, require_sklearn

__all__ = [
    "VARIANTS",
    "parse_variants",
    "variant_nbits",
    "parameter_constants",
    "program_constants",
    "palettize",
    "decompressed_state_dict",
    "swapped_parameters",
]

VARIANTS = ("fp16", "palettize8", "palettize6", "palettize4")
_SUFFIXES = re.compile(r"(_to_fp16|_palettized|_to_fp32)+$")


def parse_variants(value) -> list[str]:
    """``"fp16,palettize6"`` or a sequence -> validated, de-duplicated list in the given order."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"`variants` must be a comma-separated string or a list, got {type(value).__name__}.")
    if not items:
        raise ValueError(f"`variants` is empty: choose from {VARIANTS}.")
    unknown = [v for v in items if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown `variants` {unknown}: choose from {VARIANTS}.")
    return list(dict.fromkeys(items))


def variant_nbits(variant: str) -> int | None:
    """Bits per weight of a palettized variant; ``None`` for ``fp16``."""
    parse_variants([variant])
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


def _map_parameters(values: dict, module: torch.nn.Module) -> dict[str, str]:
    params = dict(module.named_parameters())
    by_key: dict[str, str | None] = {}
    for name in params:
        key = name.replace(".", "_")
        by_key[key] = None if key in by_key else name  # None marks an ambiguous name: never mapped
    mapping = {}
    for const_name, value in values.items():
        key = _SUFFIXES.sub("", const_name)
        pname = by_key.get(key)
        if pname is None and key.startswith("p_"):  # torch.export route: parameters are lifted as ``p_<path>``
            pname = by_key.get(key[2:])
        if pname is not None and value.size == params[pname].numel():
            mapping[const_name] = pname
    return mapping


def parameter_constants(mlmodel, module: torch.nn.Module) -> dict[str, str]:
    """``{constant name in the program: parameter name in module}`` for every parameter found by name and size.

    ``module`` must be the module that was traced (e.g. the :class:`UNetCoreMLWrapper`).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    return _map_parameters(program_constants(mlmodel), module)


def palettize(
    mlmodel,
    module: torch.nn.Module,
    nbits: int,
    target: str,
    group_size: int = 16,
    weight_threshold: int = 2048,
    mode: str = "kmeans",
):
    """k-means palettize the parameter weights of ``mlmodel`` to ``nbits``; returns ``(model, info)``.

    Weights with at most ``max(weight_threshold, 2**nbits)`` elements, biases and other 1-D vectors, and every
    constant that is not a parameter (RoPE tables, buffers) are left in fp16. On iOS18 each look-up table covers
    ``group_size`` output channels (per-grouped-channel); a weight whose output channels ``group_size`` does not
    divide, and every weight on iOS17, gets one table (per-tensor). ``mode="uniform"`` (evenly spaced tables, no
    clustering) gives packages of exactly the same size much faster: the paper-size benchmark uses it for sizes.
    """
    ct = require_coremltools()
    require_sklearn()
    if nbits not in (1, 2, 3, 4, 6, 8):
        raise ValueError(f"`nbits` must be one of 1, 2, 3, 4, 6, 8, got {nbits!r}.")
    if target not in ("iOS17", "iOS18"):
        raise ValueError(f"`target` must be 'iOS17' or 'iOS18', got {target!r}.")
    if mode not in ("kmeans", "uniform"):
        raise ValueError(f"`mode` must be 'kmeans' or 'uniform', got {mode!r}.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    if not isinstance(weight_threshold, int) or weight_threshold < 0:
        raise ValueError(f"`weight_threshold` must be an int >= 0, got {weight_threshold!r}.")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    cto = ct.optimize.coreml
    values = program_constants(mlmodel, decompress=False)
    mapping = _map_parameters(values, module)
    min_size = max(weight_threshold, 2**nbits)
    configs, chosen, grouped = {}, [], 0
    for const_name, pname in mapping.items():
        val = values[const_name]
        if val.ndim < 2 or val.size <= min_size:
            continue
        if target == "iOS18" and val.shape[0] % group_size == 0 and val.shape[0] > group_size:
            cfg = cto.OpPalettizerConfig(
                mode=mode,
                nbits=nbits,
                granularity="per_grouped_channel",
                group_size=group_size,
                channel_axis=0,
                weight_threshold=min_size,
            )
            grouped += 1
        else:
            cfg = cto.OpPalettizerConfig(
                mode=mode, nbits=nbits, granularity="per_tensor", weight_threshold=min_size
            )
        configs[const_name] = cfg
        chosen.append(pname)
    info = {
        "nbits": nbits,
        "mode": mode,
        "granularity": "per_grouped_channel" if target == "iOS18" else "per_tensor",
        "group_size": group_size if target == "iOS18" else None,
        "weight_threshold": min_size,
        "palettized_tensors": len(chosen),
        "per_grouped_channel_tensors": grouped,
        "palettized_parameters": sorted(chosen),
    }
    if not configs:
        return mlmodel, info
    config = cto.OptimizationConfig(op_name_configs=configs)
    with quiet_progress():
        compressed = cto.palettize_weights(mlmodel, config)
    return compressed, info


def decompressed_state_dict(mlmodel, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameter values stored in ``mlmodel`` (palettized ones decompressed), as fp32 tensors keyed like
    ``module.state_dict()``, ready for :func:`swapped_parameters`."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be the traced torch.nn.Module, got {type(module).__name__}.")
    values = program_constants(mlmodel)
    params = dict(module.named_parameters())
    return {
        pname: torch.from_numpy(values[const_name].astype(np.float32)).reshape(params[pname].shape)
        for const_name, pname in _map_parameters(values, module).items()
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
