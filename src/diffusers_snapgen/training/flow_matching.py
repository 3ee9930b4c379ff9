"""Rectified-flow (flow-matching) training objective, as SnapGen trains its UNet (paper §3.3, docs/design.md).

    x_t = (1 - t) * x_0 + t * eps,      target v = eps - x_0,      t ~ logit-normal

Timestep densities and loss weightings are diffusers' own (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``); sigmas come from the ``FlowMatchEulerDiscreteScheduler`` table of the
model being trained, exactly like diffusers' SD3 training examples, so the scheduler's ``shift`` applies.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")

__all__ = [
    "WEIGHTING_SCHEMES",
    "FlowMatchingSampler",
    "FlowMatchingBatch",
    "step_generator",
    "add_flow_noise",
    "flow_matching_target",
    "flow_matching_loss",
    "denoiser_forward",
    "prepare_flow_matching_batch",
]


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")


def step_generator(seed: int, step: int, process_index: int = 0, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` whose state is a pure function of ``(seed, process_index, step)``.

    Drawing a step's noise and timesteps from it makes a resumed run draw exactly what the uninterrupted run drew,
    whatever the data loader or other code did to the global RNG in between (the training engine re-seeds one such
    generator per step: :class:`~.step.StepRandom`).
    """
    from .step import step_seed

    for name, value in (("seed", seed), ("step", step), ("process_index", process_index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, process_index))


class FlowMatchingSampler:
    """Draws ``(sigmas, timesteps)`` for a batch, SD3-style.

    ``u ~ density(weighting_scheme)`` in [0, 1), ``index = floor(u * num_train_timesteps)``, and the sigma is the
    training table of ``FlowMatchEulerDiscreteScheduler`` (built from ``scheduler``'s config, so a later
    ``set_timesteps`` on the inference scheduler does not change training). Timesteps are ``sigma * 1000``,
    the scale both SD3 and SnapGen denoisers take.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (or its config). ``None`` builds the default one with
            ``shift`` (SnapGen samples with shift 3).
        weighting_scheme: one of ``WEIGHTING_SCHEMES`` (diffusers' names); decides the density.
        logit_mean, logit_std: logit-normal parameters. ``mode_scale``: for ``"mode"``.
        shift: only used when ``scheduler`` is None.
    """

    def __init__(
        self,
        scheduler=None,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 3.0,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}.")
        if not logit_std > 0:
            raise ValueError(f"`logit_std` must be > 0, got {logit_std!r}.")
        if scheduler is None:
            if not shift > 0:
                raise ValueError(f"`shift` must be > 0, got {shift!r}.")
            table = FlowMatchEulerDiscreteScheduler(shift=shift)
        elif hasattr(scheduler, "config") or isinstance(scheduler, dict):
            config = scheduler.config if hasattr(scheduler, "config") else scheduler
            table = FlowMatchEulerDiscreteScheduler.from_config(copy.deepcopy(dict(config)))
        else:
            raise TypeError(
                "`scheduler` must be a FlowMatchEulerDiscreteScheduler, its config dict, or None; "
                f"got {type(scheduler).__name__}."
            )
        self.num_train_timesteps = int(table.config.num_train_timesteps)
        self.sigmas = table.sigmas.detach().to(torch.float32).clone()  # descending, length num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.mode_scale = float(mode_scale)

    def _table(self, table: torch.Tensor, device) -> torch.Tensor:
        """``table`` on ``device`` (copied once per device)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), str(device))
        if key not in cache:
            cache[key] = table.to(device)
        return cache[key]

    def __call__(self, batch_size: int, generator: torch.Generator | None = None, device="cpu"):
        """``(sigmas, timesteps)`` of ``batch_size`` samples on ``device``, drawn on ``generator``'s device."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        draw_device = generator.device if generator is not None else torch.device(device)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=draw_device,
            generator=generator,
        )
        indices = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        sigmas = self._table(self.sigmas, draw_device)[indices]
        timesteps = sigmas * self.num_train_timesteps
        return sigmas.to(device), timesteps.to(device)


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"`sigmas` must have shape ({like.shape[0]},), got {tuple(sigmas.shape)}.")
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def add_flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x_0 + sigma * noise`` (the scheduler's ``scale_noise`` for a batch of sigmas)."""
    _check_tensor("latents", latents)
    _check_tensor("noise", noise)
    _check_tensor("sigmas", sigmas)
    if latents.shape != noise.shape:
        raise ValueError(f"`noise` shape {tuple(noise.shape)} must equal `latents` shape {tuple(latents.shape)}.")
    s = _expand(sigmas, latents)
    return (1.0 - s) * latents + s * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target ``v = noise - x_0``."""
    _check_tensor("latents", latents)
    _check_tensor("noise", noise)
    if latents.shape != noise.shape:
        raise ValueError(f"`noise` shape {tuple(noise.shape)} must equal `latents` shape {tuple(latents.shape)}.")
    return noise - latents


def flow_matching_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
) -> torch.Tensor:
    """Per-sample weighted MSE, shape ``(B,)``, computed in float32.

    The weight is diffusers' ``compute_loss_weighting_for_sd3(weighting_scheme, sigmas)`` (ones for
    ``logit_normal``/``mode``/``none``). Take ``.mean()`` for the scalar loss; the per-sample vector feeds
    timestep-aware scaling and per-timestep-bucket statistics.
    """
    _check_tensor("model_pred", model_pred)
    _check_tensor("target", target)
    _check_tensor("sigmas", sigmas)
    if model_pred.shape != target.shape:
        raise ValueError(
            f"`model_pred` shape {tuple(model_pred.shape)} must equal `target` shape {tuple(target.shape)}."
        )
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}.")
    pred = model_pred.float()
    weighting = _expand(compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()), pred)
    err = weighting * (pred - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


_FORWARD_STYLE: dict[type, str] = {}


def denoiser_forward(model, latents, timesteps, encoder_hidden_states, pooled_projections=None) -> torch.Tensor:
    """Calls a SnapGen UNet (``forward(sample, timestep, ...)``) or an SD3/MMDiT transformer
    (``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)``) the same way and returns
    the predicted velocity tensor. Accepts accelerate/DDP/compile wrappers."""
    if not callable(model):
        raise TypeError(f"`model` must be a callable nn.Module, got {type(model).__name__}.")
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)
    style = _FORWARD_STYLE.get(type(inner))
    if style is None:
        params = inspect.signature(inner.forward).parameters
        if "sample" in params:
            style = "unet"
        elif "hidden_states" in params:
            style = "transformer"
        else:
            raise TypeError(
                f"{type(inner).__name__}.forward takes neither `sample` (UNet) nor `hidden_states` (transformer)."
            )
        _FORWARD_STYLE[type(inner)] = style
    if style == "unet":
        out = model(
            sample=latents,
            timestep=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )
    else:
        out = model(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


@dataclass
class FlowMatchingBatch:
    """Everything one flow-matching step needs and produces (``model_pred`` is filled by the caller)."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def prepare_flow_matching_batch(
    latents: torch.Tensor, sampler: FlowMatchingSampler, generator: torch.Generator | None = None
) -> FlowMatchingBatch:
    """Draws timesteps and noise from ``generator`` (on its device) and builds ``x_t`` and the velocity target."""
    from diffusers.utils.torch_utils import randn_tensor

    _check_tensor("latents", latents)
    if not isinstance(sampler, FlowMatchingSampler):
        raise TypeError(f"`sampler` must be a FlowMatchingSampler, got {type(sampler).__name__}.")
    sigmas, timesteps = sampler(latents.shape[0], generator=generator, device=latents.device)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return FlowMatchingBatch(
        latents=latents,
        noise=noise,
        noisy_latents=add_flow_noise(latents, noise, sigmas),
        target=flow_matching_target(latents, noise),
        sigmas=sigmas,
        timesteps=timesteps,
    )
