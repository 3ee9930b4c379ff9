"""Timestep-aware scaling of task and distillation losses (paper §3.3; docs/design.md, *reconstructed*).

The paper's observation: the magnitudes of the flow-matching task loss and of the KD losses diverge near
t = 0 and t = 1, so a fixed linear mix over-weights one of them at the ends. The scaling implemented here is

    S(L_task, L_kd) = E_t[ alpha_t * L_task + (1 - alpha_t) * sg(|L_task| / |L_kd|) * L_kd ]

(``sg`` = stop-gradient) and the KD objective is ``S(L_task, L_out) + S(L_task, L_feat)``. The ratio rescales
the KD term to the task loss's magnitude at each timestep; ``alpha_t`` then decides the mix. The exact
``alpha_t`` is not in the paper text we have, so it is selectable (:class:`AlphaSchedule`):

* ``"logit_normal"`` (default): ``alpha_t = alpha_min + (alpha_max - alpha_min) * p(t) / max p``, with ``p`` the
  logit-normal density that also samples ``t``. The task loss dominates where training samples most
  (mid ``t``); the teacher dominates at the ends, where the task target ``eps - x0`` is least predictable.
* ``"linear"``: ``alpha_t = alpha_max - (alpha_max - alpha_min) * t``.
* ``"constant"``: ``alpha_t = alpha``.

``TimestepAwareScaling.constant(alpha)`` is the baseline to compare against: the fixed linear mix
``alpha * L_task + (1 - alpha) * L_kd`` with no magnitude normalisation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALPHA_SCHEDULES", "AlphaSchedule", "TimestepAwareScaling", "TimestepBucketStats"]

ALPHA_SCHEDULES = ("logit_normal", "linear", "constant")


def _check_unit(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_t(t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`t` must be a torch.Tensor of flow-matching times (sigmas) in [0, 1], got {type(t).__name__}.")
    return t.float()


class AlphaSchedule:
    """The task-loss weight ``alpha_t`` as a function of the flow-matching time ``t`` (= sigma, in [0, 1])."""

    def __init__(
        self,
        kind: str = "logit_normal",
        alpha_min: float = 0.0,
        alpha_max: float = 0.5,
        alpha: float = 0.5,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if kind not in ALPHA_SCHEDULES:
            raise ValueError(f"`kind` must be one of {ALPHA_SCHEDULES}, got {kind!r}.")
        self.kind = kind
        self.alpha_min = _check_unit("alpha_min", alpha_min)
        self.alpha_max = _check_unit("alpha_max", alpha_max)
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"`alpha_min` ({alpha_min}) must be <= `alpha_max` ({alpha_max}).")
        self.alpha = _check_unit("alpha", alpha)
        if not (isinstance(logit_std, (int, float)) and logit_std > 0):
            raise ValueError(f"`logit_std` must be > 0, got {logit_std!r}.")
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        if kind == "logit_normal":
            grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
            self._peak = float(self._density(grid).max())

    def _density(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).clamp(1e-6, 1 - 1e-6)
        z = (torch.log(t) - torch.log1p(-t) - self.logit_mean) / self.logit_std
        return torch.exp(-0.5 * z**2) / (self.logit_std * math.sqrt(2 * math.pi) * t * (1 - t))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = _check_t(t)
        if self.kind == "constant":
            return torch.full_like(t, self.alpha)
        if self.kind == "linear":
            return self.alpha_max - (self.alpha_max - self.alpha_min) * t.clamp(0, 1)
        shape = (self._density(t) / self._peak).clamp(0, 1).to(t.dtype)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * shape

    def __repr__(self):
        if self.kind == "constant":
            return f"AlphaSchedule(kind='constant', alpha={self.alpha})"
        return f"AlphaSchedule(kind={self.kind!r}, alpha_min={self.alpha_min}, alpha_max={self.alpha_max})"


class TimestepAwareScaling:
    """``S(L_task, L_kd)`` of the module docstring, from per-sample losses ``(B,)`` and times ``t`` ``(B,)``.

    Args:
        schedule: an :class:`AlphaSchedule` (default: logit-normal based).
        normalize: rescale the KD term by ``sg(|L_task| / |L_kd|)`` (True: timestep-aware scaling;
            False: a plain ``alpha_t`` mix).
        ratio: ``"sample"`` (each sample's own ratio, default) or ``"batch"`` (ratio of batch means).
        eps: floor of ``|L_kd|`` in the ratio.
    """

    def __init__(self, schedule: AlphaSchedule | None = None, normalize: bool = True, ratio: str = "sample", eps=1e-8):
        if schedule is None:
            schedule = AlphaSchedule()
        if not isinstance(schedule, AlphaSchedule):
            raise TypeError(f"`schedule` must be an AlphaSchedule, got {type(schedule).__name__}.")
        if ratio not in ("sample", "batch"):
            raise ValueError(f"`ratio` must be 'sample' or 'batch', got {ratio!r}.")
        if not isinstance(normalize, bool):
            raise TypeError(f"`normalize` must be a bool, got {type(normalize).__name__}.")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps!r}.")
        self.schedule, self.normalize, self.ratio, self.eps = schedule, normalize, ratio, float(eps)

    @classmethod
    def constant(cls, alpha: float = 0.5) -> "TimestepAwareScaling":
        """The fixed linear mix ``alpha * L_task + (1 - alpha) * L_kd`` (the baseline the paper argues against)."""
        return cls(AlphaSchedule("constant", alpha=alpha), normalize=False)

    def weights(self, task_loss: torch.Tensor, kd_loss: torch.Tensor, t: torch.Tensor):
        """Per-sample ``(alpha_t, kd_factor)``, both detached: ``S = mean(alpha_t * L_task + kd_factor * L_kd)``."""
        for name, v in (("task_loss", task_loss), ("kd_loss", kd_loss), ("t", t)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}.")
            if v.ndim != 1:
                raise ValueError(f"`{name}` must be per-sample, shape (B,), got {tuple(v.shape)}.")
        if not task_loss.shape == kd_loss.shape == t.shape:
            raise ValueError(
                f"`task_loss` {tuple(task_loss.shape)}, `kd_loss` {tuple(kd_loss.shape)} and `t` {tuple(t.shape)} "
                "must have the same shape (B,)."
            )
        alpha = self.schedule(t.detach()).to(task_loss.device)
        if not self.normalize:
            return alpha, 1.0 - alpha
        task, kd = task_loss.detach().float().abs(), kd_loss.detach().float().abs()
        if self.ratio == "batch":
            ratio = (task.mean() / kd.mean().clamp_min(self.eps)).expand_as(task)
        else:
            ratio = task / kd.clamp_min(self.eps)
        return alpha, (1.0 - alpha) * ratio

    def __call__(self, task_loss: torch.Tensor, kd_loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, kd_factor = self.weights(task_loss, kd_loss, t)
        return (alpha * task_loss.float() + kd_factor * kd_loss.float()).mean()

    def __repr__(self):
        return f"TimestepAwareScaling({self.schedule!r}, normalize={self.normalize}, ratio={self.ratio!r})"


class TimestepBucketStats:
    """Running per-timestep-bucket means of per-sample losses, for logging.

    ``update(t, task=..., kd_out=...)`` with per-sample tensors; ``compute()`` returns
    ``{"task/t0.0-0.1": mean, ...}`` for buckets that saw samples; ``reset()`` starts a new window.
    Gather across processes before ``update`` for global statistics.
    """

    def __init__(self, num_buckets: int = 10):
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"`num_buckets` must be a positive int, got {num_buckets!r}.")
        self.num_buckets = num_buckets
        self.reset()

    def reset(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = torch.zeros(self.num_buckets, dtype=torch.float64)
        self._counts_by_name: dict[str, torch.Tensor] = {}

    def bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        t = _check_t(t).detach().cpu()
        return (t.clamp(0, 1) * self.num_buckets).long().clamp_(0, self.num_buckets - 1)

    def update(self, t: torch.Tensor, **losses: torch.Tensor):
        if not losses:
            raise ValueError("`update` needs at least one per-sample loss, e.g. update(t, task=loss_task).")
        idx = self.bucket_of(t)
        for name, values in losses.items():
            if not isinstance(values, torch.Tensor) or values.shape != idx.shape:
                raise ValueError(f"loss `{name}` must be a tensor of shape {tuple(idx.shape)} (one value per sample).")
            values = values.detach().cpu().to(torch.float64)
            sums = self._sums.setdefault(name, torch.zeros(self.num_buckets, dtype=torch.float64))
            counts = self._counts_by_name.setdefault(name, torch.zeros(self.num_buckets, dtype=torch.float64))
            sums.index_add_(0, idx, values)
            counts.index_add_(0, idx, torch.ones_like(values))

    def means(self) -> dict[str, list[float | None]]:
        """``{name: [mean of bucket 0, ..., None for empty buckets]}``."""
        out = {}
        for name, sums in self._sums.items():
            counts = self._counts_by_name[name]
            out[name] = [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]
        return out

    def compute(self, prefix: str = "") -> dict[str, float]:
        width = 1.0 / self.num_buckets
        digits = 1 if 10 % self.num_buckets == 0 else 2 if 100 % self.num_buckets == 0 else 3
        logs = {}
        for name, means in self.means().items():
            for b, m in enumerate(means):
                if m is not None:
                    logs[f"{prefix}{name}/t{b * width:.{digits}f}-{(b + 1) * width:.{digits}f}"] = m
        return logs
