"""Argument checks shared by :class:`SnapGenPipeline` and its helpers: each raises TypeError/ValueError that
names the argument and says how to fix it."""

from __future__ import annotations

import math
import numbers

import torch


def check_positive_int(value, name: str) -> None:
    """An int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")


def check_guidance(value) -> None:
    """A finite number >= 0; classifier-free guidance is on above 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`guidance_scale` must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`guidance_scale` must be a finite number >= 0 (<= 1 turns CFG off), got {value}.")


def check_embeds(tensor, name: str, ndim: int, width: int) -> None:
    """None, or a tensor of ``ndim`` dimensions whose last one is ``width``."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != ndim or tensor.shape[-1] != width:
        layout = "(batch, tokens, {w})" if ndim == 3 else "(batch, {w})"
        raise ValueError(f"`{name}` must have shape {layout.format(w=width)}, got {tuple(tensor.shape)}.")


def check_sigmas(sigmas, num_inference_steps) -> None:
    """A non-empty, strictly decreasing sequence of noise levels in (0, 1], one per step (sampling goes from
    noise, sigma 1, towards the image, sigma 0)."""
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.tolist()
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
        raise TypeError(f"`sigmas` must be a list of floats, got {type(sigmas).__name__}.")
    if len(sigmas) == 0:
        raise ValueError("`sigmas` is empty: pass one noise level per step, e.g. [1.0, 0.75, 0.5, 0.25].")
    if num_inference_steps is not None and len(sigmas) != num_inference_steps:
        raise ValueError(
            f"`sigmas` has {len(sigmas)} values but `num_inference_steps` is {num_inference_steps}: pass one "
            "sigma per step, or leave `num_inference_steps` unset."
        )
    if not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 < s <= 1 for s in sigmas):
        raise ValueError(f"`sigmas` must be numbers in (0, 1] (noise levels before shifting), got {list(sigmas)}.")
    if any(later >= earlier for earlier, later in zip(sigmas, sigmas[1:])):
        raise ValueError(
            f"`sigmas` must decrease strictly (from noise towards the image), got {list(sigmas)}; e.g. "
            f"{sorted(set(sigmas), reverse=True)}."
        )


def check_finite(tensor, name: str) -> None:
    """None, or a tensor without NaN/inf (they would silently give a NaN image)."""
    if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN or infinite values: pass finite numbers.")
