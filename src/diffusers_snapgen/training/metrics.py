"""Training metrics that never stop the device: sums kept on the device while training (inside a CUDA graph, too),
read once every ``--logging_steps`` steps, and written to ``<output_dir>/<logging_dir>/metrics.jsonl`` and the
accelerate trackers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["StepOutput", "StepMetrics", "MetricsLog"]


@dataclass
class StepOutput:
    """What a task's ``compute_loss`` returns for one micro-batch.

    ``loss``: the scalar to backpropagate. ``metrics``: scalars (0-dim tensors or floats) averaged over the logging
    window. ``per_sample``: ``(B,)`` losses whose means per timestep bucket are logged; ``timesteps`` ``(B,)`` in
    [0, 1] places each sample in a bucket (``None``: no bucket statistics).
    """

    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)
    timesteps: torch.Tensor | None = None


class StepMetrics:
    """Running sums of a logging window on ``device``.

    :meth:`add` only launches device kernels (no host sync, no new persistent tensors after the first call with the
    same names), so it can run inside a captured CUDA graph. :meth:`read` synchronises once, averages (across
    processes when ``reduce`` is given) and resets the sums.
    """

    def __init__(self, device, num_buckets: int = 10):
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"`num_buckets` must be a positive int, got {num_buckets!r}.")
        self.device = torch.device(device)
        self.num_buckets = num_buckets
        self.sums: dict[str, torch.Tensor] = {}
        self.bucket_sums: dict[str, torch.Tensor] = {}
        self.bucket_counts: dict[str, torch.Tensor] = {}
        self.step_sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), dtype=torch.float32, device=self.device)
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.device)

    def _slot(self, table, name, shape=()):
        slot = table.get(name)
        if slot is None:
            slot = table[name] = torch.zeros(shape, dtype=torch.float32, device=self.device)
        return slot

    @torch.no_grad()
    def add(self, output: StepOutput, extra: dict | None = None):
        """Adds one micro-batch's ``output`` (and ``extra`` scalars, e.g. the gradient norm) to the window."""
        self.count.add_(1.0)
        scalars = {"loss": output.loss, **output.metrics, **(extra or {})}
        for name, value in scalars.items():  # a (sum, count) pair each: a metric may appear in some steps only
            slot = self._slot(self.sums, name, (2,))
            slot[0].add_(value.detach().float() if isinstance(value, torch.Tensor) else float(value))
            slot[1].add_(1.0)
        if output.timesteps is None or not output.per_sample:
            return
        t = output.timesteps.detach().float().reshape(-1)
        index = (t.clamp(0, 1) * self.num_buckets).long().clamp_(0, self.num_buckets - 1)
        ones = torch.ones_like(t)
        for name, values in output.per_sample.items():
            self._slot(self.bucket_sums, name, (self.num_buckets,)).index_add_(0, index, values.detach().float())
            self._slot(self.bucket_counts, name, (self.num_buckets,)).index_add_(0, index, ones)

    @torch.no_grad()
    def add_step(self, values: dict):
        """Adds per-optimizer-step scalars (e.g. the gradient norm), averaged over the steps of the window."""
        self.step_count.add_(1.0)
        for name, value in values.items():
            self._slot(self.step_sums, name).add_(value.detach().float() if isinstance(value, torch.Tensor)
                                                  else float(value))

    def reset(self):
        for table in (self.sums, self.step_sums, self.bucket_sums, self.bucket_counts):
            for value in table.values():
                value.zero_()
        self.count.zero_()
        self.step_count.zero_()

    def read(self, reduce=None) -> dict[str, float]:
        """The window's means (``loss``, task metrics, ``buckets/<name>/t0.0-0.1``...) as floats, then resets.
        ``reduce(tensor) -> tensor`` sums a tensor over processes (``accelerator.reduce``)."""
        names, step_names, buckets = list(self.sums), list(self.step_sums), list(self.bucket_sums)
        flat = torch.cat([self.count.reshape(1), self.step_count.reshape(1)]
                         + [self.sums[n] for n in names] + [self.step_sums[n].reshape(1) for n in step_names]
                         + [self.bucket_sums[n] for n in buckets] + [self.bucket_counts[n] for n in buckets])
        if reduce is not None:
            flat = reduce(flat)
        values = flat.double().cpu().tolist()
        self.reset()
        step_count = max(values[1], 1.0)
        out = {n: values[2 + 2 * i] / max(values[3 + 2 * i], 1.0) for i, n in enumerate(names)}
        out.update({n: values[2 + 2 * len(names) + i] / step_count for i, n in enumerate(step_names)})
        offset, nb = 2 + 2 * len(names) + len(step_names), self.num_buckets
        width = 1.0 / nb
        digits = 1 if 10 % nb == 0 else 2 if 100 % nb == 0 else 3
        for i, name in enumerate(buckets):
            sums = values[offset + i * nb: offset + (i + 1) * nb]
            counts = values[offset + (len(buckets) + i) * nb: offset + (len(buckets) + i + 1) * nb]
            for b, (s, c) in enumerate(zip(sums, counts)):
                if c > 0:
                    out[f"buckets/{name}/t{b * width:.{digits}f}-{(b + 1) * width:.{digits}f}"] = s / c
        return out


class MetricsLog:
    """Appends records to ``<output_dir>/<logging_dir>/metrics.jsonl`` (main process) and to the trackers."""

    def __init__(self, accelerator, output_dir, logging_dir="logs", filename: str = "metrics.jsonl"):
        self.accelerator = accelerator
        self.path = Path(output_dir, logging_dir, filename)

    def write(self, step: int, record: dict):
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
