"""PyTorch -> Core ML ML-program conversion with fixed shapes (coremltools 9.0; docs/design.md, "Core ML").

Two routes reach coremltools' torch frontend: ``"trace"`` (``torch.jit.trace``, the default, as in Apple's
``ml-stable-diffusion``) and ``"export"`` (``torch.export.export(...).run_decompositions({})``), which also works
with numpy 2.4 where the trace route breaks. Both give the same MIL ops (the export route adds input ``cast``\\ s).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._deps import quiet_progress, require_coremltools

__all__ = ["TARGETS", "ROUTES", "parse_target", "convert_module"]

TARGETS = ("iOS17", "iOS18")
ROUTES = ("auto", "trace", "export")


def parse_target(target):
    """``"iOS17"``/``"iOS18"`` (any case) or a ``ct.target`` member -> the ``ct.target`` member."""
    ct = require_coremltools()
    if isinstance(target, str):
        for name in TARGETS:
            if target.lower() == name.lower():
                return getattr(ct.target, name)
    elif target in (ct.target.iOS17, ct.target.iOS18):
        return target
    raise ValueError(f"`target` must be one of {TARGETS} (deployment target), got {target!r}.")


def _register_missing_torch_ops() -> None:
    """Teach coremltools' torch frontend ``new_ones`` (emitted by transformers' BERT mask helpers; coremltools 9.0
    has only ``new_zeros``), through its public ``register_torch_op`` hook. Idempotent."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE

    if _TORCH_OPS_REGISTRY.get_func("new_ones") is not None:
        return

    def new_ones(context, node):
        inputs = _get_inputs(context, node)
        shape = inputs[1]
        dtype = inputs[2].val if len(inputs) > 2 and inputs[2] is not None else None
        np_dtype = NUM_TO_NUMPY_DTYPE.get(dtype, np.float32) if dtype is not None else np.float32
        if np.issubdtype(np_dtype, np.integer):
            np_dtype = np.int32
        elif np_dtype in (bool, np.bool_):
            np_dtype = np.bool_
        else:
            np_dtype = np.float32
        if isinstance(shape, list):
            shape = mb.concat(values=shape, axis=0)
        if shape.val is not None:  # static shape (the usual case): a constant
            dims = tuple(int(d) for d in np.asarray(shape.val).reshape(-1))
            context.add(mb.const(val=np.ones(dims, dtype=np_dtype), name=node.name))
            return
        ones = mb.fill(shape=mb.cast(x=shape, dtype="int32"), value=1.0)
        dtype_str = {np.int32: "int32", np.bool_: "bool"}.get(np_dtype, "fp32")
        context.add(mb.cast(x=ones, dtype=dtype_str, name=node.name) if dtype_str != "fp32" else ones, node.name)

    register_torch_op(new_ones)


def _numpy_dtype(tensor: torch.Tensor):
    if tensor.dtype in (torch.int32, torch.int64):
        return np.int32
    if tensor.is_floating_point():
        return np.float16
    raise TypeError(f"Core ML inputs must be float or integer tensors, got {tensor.dtype}.")


def convert_module(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    target="iOS18",
    route: str = "auto",
    warmup: bool = True,
):
    """Convert ``module`` (positional inputs in ``example_inputs`` order) to an fp16 ML program.

    Inputs keep the shapes of ``example_inputs`` (fixed shapes, as the ANE wants them); float inputs/outputs are
    fp16, integer inputs int32. ``route="auto"`` traces and falls back to torch.export when tracing fails (e.g. a
    model that keys a dict by tensor sizes). Returns ``(mlmodel, seconds, route_used)``. The model is not loaded
    (no Core ML runtime on Linux). ``warmup=False`` when the caller already ran ``module`` once on these inputs.
    """
    ct = require_coremltools()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ValueError("`example_inputs` must be a non-empty mapping of input name -> example tensor.")
    if not output_names or any(not isinstance(n, str) or not n for n in output_names):
        raise ValueError(f"`output_names` must be a non-empty sequence of names, got {output_names!r}.")
    if route not in ROUTES:
        raise ValueError(f"`route` must be one of {ROUTES}, got {route!r}.")
    deployment = parse_target(target)
    _register_missing_torch_ops()

    names = list(example_inputs)
    tensors = tuple(example_inputs[n] for n in names)
    inputs = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=_numpy_dtype(t)) for n, t in zip(names, tensors)]
    outputs = [ct.TensorType(name=n, dtype=np.float16) for n in output_names]
    start = time.perf_counter()
    module = module.eval()
    with torch.no_grad():
        if warmup:  # one eager pass fills caches (e.g. RoPE tables), which then trace as constants
            module(*tensors)
        source, used = None, route
        if route in ("auto", "trace"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings about python control flow on fixed shapes
                    source, used = torch.jit.trace(module, tensors, check_trace=False, strict=False), "trace"
            except Exception:
                if route == "trace":
                    raise
        if source is None:
            source, used = torch.export.export(module, tensors).run_decompositions({}), "export"
    with quiet_progress():
        mlmodel = ct.convert(
            source,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=deployment,
            skip_model_load=True,
        )
    return mlmodel, time.perf_counter() - start, used
