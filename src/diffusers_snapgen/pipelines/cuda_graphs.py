"""One function call of fixed input shapes, captured once as a CUDA graph and replayed (used by the fast sampler)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


def capture_graph(fn: Callable[[], object], device, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """``(graph, output)``: ``fn()`` (reading fixed input tensors) run ``warmup`` times on a side stream, so that
    compilation, autotuning and cached tables happen outside the graph, then captured once. ``graph.replay()`` re-runs
    every captured kernel and refreshes ``output`` in place."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


class CapturedCall:
    r"""``fn(*inputs)`` captured as a CUDA graph for inputs shaped like ``example_inputs``.

    Capture is :func:`capture_graph` (two warm-up calls on a side stream, then one recorded call). Each ``__call__``
    copies its tensors into the graph's static inputs, replays every captured kernel and returns clones of the outputs
    (a tensor or a nested tuple/list/dict of tensors), so a later replay does not overwrite what an earlier call
    returned. ``fn`` must do device work only: no host sync, no
    host-to-device copies. Raises what capture raises; the caller decides how to fall back.
    """

    def __init__(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...], warmup: int = 2):
        self.shapes = tuple((t.shape, t.dtype) for t in example_inputs)
        self.inputs = tuple(t.clone() for t in example_inputs)
        self.graph, self.outputs = capture_graph(lambda: fn(*self.inputs), example_inputs[0].device, warmup)

    def matches(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``inputs`` have the shapes and dtypes this graph was captured for."""
        return self.shapes == tuple((t.shape, t.dtype) for t in inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)
