"""One function call of fixed input shapes, captured once as a CUDA graph and replayed (used by the fast sampler)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


class CapturedCall:
    r"""``fn(*inputs)`` captured as a CUDA graph for inputs shaped like ``example_inputs``.

    Capture warms ``fn`` up twice on a side stream (compilation, autotuning and cached tables happen there, outside the
    graph), then records one call. Each ``__call__`` copies its tensors into the graph's static inputs, replays every
    captured kernel and returns clones of the outputs (a tensor or a nested tuple/list/dict of tensors), so a later
    replay does not overwrite what an earlier call returned. ``fn`` must do device work only: no host sync, no
    host-to-device copies. Raises what capture raises; the caller decides how to fall back.
    """

    def __init__(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...], warmup: int = 2):
        device = example_inputs[0].device
        self.shapes = tuple((t.shape, t.dtype) for t in example_inputs)
        self.inputs = tuple(t.clone() for t in example_inputs)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def matches(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``inputs`` have the shapes and dtypes this graph was captured for."""
        return self.shapes == tuple((t.shape, t.dtype) for t in inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)
