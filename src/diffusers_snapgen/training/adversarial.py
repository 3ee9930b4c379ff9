"""GAN losses shared by adversarial step distillation (paper §3.4) and tiny-decoder training (paper §3.2).

* hinge (default; *reconstructed* for §3.4, the paper's text with the exact form is not available):
  ``L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]``, ``L_G = -E[D(fake)]``;
* non-saturating (Goodfellow et al. 2014): ``L_D = E[softplus(-D(real))] + E[softplus(D(fake))]``,
  ``L_G = E[softplus(-D(fake))]``;
* R1 (Mescheder et al. 2018): ``E[ ||grad_x D(x_real)||^2 ]``, added as ``gamma / 2 * R1`` to ``L_D``.

Logits may be ``(B,)`` or carry extra dimensions (patch / per-token logits, ``(B, ...)``): per-sample losses average
over them. ``reduction="none"`` returns the per-sample ``(B,)`` vector (for per-timestep statistics), ``"mean"`` the
scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "GAN_LOSSES",
    "discriminator_loss",
    "generator_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "non_saturating_discriminator_loss",
    "non_saturating_generator_loss",
    "r1_penalty",
    "set_requires_grad",
]

GAN_LOSSES = ("hinge", "non_saturating")
_REDUCTIONS = ("mean", "none")


def _check_logits(name: str, logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of discriminator logits, got {type(logits).__name__}.")
    if logits.ndim == 0:
        raise ValueError(f"`{name}` must have a batch dimension, shape (B,) or (B, ...); got a scalar.")
    return logits.float()


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    per_sample = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()


def hinge_discriminator_loss(real_logits, fake_logits, reduction: str = "mean") -> torch.Tensor:
    """``relu(1 - D(real)) + relu(1 + D(fake))``; real and fake may have different batch sizes only with ``"mean"``."""
    real, fake = _check_logits("real_logits", real_logits), _check_logits("fake_logits", fake_logits)
    if reduction == "none" and real.shape[0] != fake.shape[0]:
        raise ValueError("`reduction='none'` needs as many real as fake samples.")
    return _reduce(F.relu(1.0 - real), reduction) + _reduce(F.relu(1.0 + fake), reduction)


def hinge_generator_loss(fake_logits, reduction: str = "mean") -> torch.Tensor:
    """``-D(fake)``."""
    return _reduce(-_check_logits("fake_logits", fake_logits), reduction)


def non_saturating_discriminator_loss(real_logits, fake_logits, reduction: str = "mean") -> torch.Tensor:
    """``softplus(-D(real)) + softplus(D(fake))`` (binary cross-entropy on logits)."""
    real, fake = _check_logits("real_logits", real_logits), _check_logits("fake_logits", fake_logits)
    if reduction == "none" and real.shape[0] != fake.shape[0]:
        raise ValueError("`reduction='none'` needs as many real as fake samples.")
    return _reduce(F.softplus(-real), reduction) + _reduce(F.softplus(fake), reduction)


def non_saturating_generator_loss(fake_logits, reduction: str = "mean") -> torch.Tensor:
    """``softplus(-D(fake))``."""
    return _reduce(F.softplus(-_check_logits("fake_logits", fake_logits)), reduction)


def _check_kind(kind):
    if kind not in GAN_LOSSES:
        raise ValueError(f"`kind` (--gan_loss) must be one of {GAN_LOSSES}, got {kind!r}.")


def discriminator_loss(real_logits, fake_logits, kind: str = "hinge", reduction: str = "mean") -> torch.Tensor:
    """The discriminator loss of ``kind`` (``"hinge"`` or ``"non_saturating"``)."""
    _check_kind(kind)
    fn = hinge_discriminator_loss if kind == "hinge" else non_saturating_discriminator_loss
    return fn(real_logits, fake_logits, reduction)


def generator_loss(fake_logits, kind: str = "hinge", reduction: str = "mean") -> torch.Tensor:
    """The generator's adversarial loss of ``kind`` (``"hinge"`` or ``"non_saturating"``)."""
    _check_kind(kind)
    fn = hinge_generator_loss if kind == "hinge" else non_saturating_generator_loss
    return fn(fake_logits, reduction)


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """R1 gradient penalty ``||d sum(D(x)) / d x||^2`` per sample, differentiable (``create_graph=True``).

    ``real_inputs`` must have ``requires_grad=True`` *before* the discriminator forward that produced
    ``real_logits``. Multiply by ``gamma / 2`` and add it to the discriminator loss.
    """
    _check_logits("real_logits", real_logits)
    if not isinstance(real_inputs, torch.Tensor):
        raise TypeError(f"`real_inputs` must be a torch.Tensor, got {type(real_inputs).__name__}.")
    if not real_inputs.requires_grad:
        raise ValueError("`real_inputs` must require grad: call `real_inputs.requires_grad_(True)` before the "
                         "discriminator forward that produced `real_logits`.")
    if not real_logits.requires_grad:
        raise ValueError("`real_logits` do not depend on `real_inputs` through autograd (run the discriminator "
                         "with gradients enabled).")
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return _reduce(grad.float().pow(2).reshape(grad.shape[0], -1).sum(dim=1), reduction)


def set_requires_grad(module: torch.nn.Module, flag: bool) -> torch.nn.Module:
    """``module.requires_grad_(flag)`` with type checks; used to freeze a discriminator during generator updates
    so the generator's backward leaves no gradient in it."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
    if not isinstance(flag, bool):
        raise TypeError(f"`flag` must be a bool, got {type(flag).__name__}.")
    return module.requires_grad_(flag)
