"""LoRA target names for models built from :class:`SeparableConv2d` (paper §3.1, "SepConv").

peft adapts ``nn.Linear``/``nn.Conv2d`` layers, not the depthwise + pointwise pair that SnapGen uses wherever SDXL has a
3x3 convolution, so ``LoraConfig(target_modules=["conv1", "conv2"])`` would stop at the pair. These helpers turn a
target that names a :class:`SeparableConv2d` into its ``pointwise`` 1x1 convolution, which holds nearly all of the
pair's weights and which peft can fuse, unfuse and hot-swap. The depthwise 3x3 (nine weights per channel) is a grouped
convolution: peft adapts it only at ranks divisible by its channel count and cannot fuse it; name it explicitly
(``"conv1.depthwise"``) to adapt it anyway. See ``docs/performance.md`` ("LoRA on convolutions").
"""

from __future__ import annotations

import copy
import re

from torch import nn

from .resnet import SeparableConv2d

_ADAPTED_CHILD = "pointwise"


def _matches(target: str, name: str) -> bool:
    """peft's rule for one entry of a list of target names: the module name or a dotted suffix of it."""
    return name == target or name.endswith(f".{target}")


def resolve_lora_target_modules(model: nn.Module, target_modules):
    """``target_modules`` for a peft ``LoraConfig`` on ``model``, with every :class:`SeparableConv2d` it names
    replaced by that module's ``pointwise`` convolution.

    Accepts what ``LoraConfig`` accepts: a list/set of names (each the module name or a dotted suffix of it, e.g.
    ``"conv1"``, ``"to_q"``) or a regular expression string (full match). Names that reach only separable
    convolutions become ``"<name>.pointwise"``; a regular expression, or a name that reaches both separable and other
    modules, becomes the explicit list of module names. Anything that reaches no separable convolution (including
    ``None`` and ``"all-linear"``) is returned unchanged.

    Use it when building a peft model yourself: ``LoraConfig(target_modules=resolve_lora_target_modules(unet,
    ["to_q", "conv1"]))``; :meth:`SnapGenUNet2DModel.add_adapter` applies it for you.
    """
    if target_modules is None or target_modules == "all-linear":
        return target_modules
    modules = {name: module for name, module in model.named_modules() if name}
    separable = {name for name, module in modules.items() if isinstance(module, SeparableConv2d)}
    if isinstance(target_modules, str):
        hits = [name for name in modules if re.fullmatch(target_modules, name)]
        if not separable.intersection(hits):
            return target_modules
        return sorted({f"{name}.{_ADAPTED_CHILD}" if name in separable else name for name in hits})
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or not all(
        isinstance(t, str) for t in target_modules
    ):
        raise TypeError(
            f"`target_modules` must be a list of module names or a regular expression string, got {target_modules!r}."
        )
    resolved = []
    for target in target_modules:
        hits = [name for name in modules if _matches(target, name)]
        separable_hits = separable.intersection(hits)
        if not separable_hits:
            resolved.append(target)
        elif len(separable_hits) == len(hits):
            resolved.append(f"{target}.{_ADAPTED_CHILD}")
        else:
            resolved += [f"{name}.{_ADAPTED_CHILD}" if name in separable else name for name in hits]
    return list(dict.fromkeys(resolved))


def resolve_lora_config(model: nn.Module, config):
    """A copy of peft ``config`` whose ``target_modules`` (and ``rank_pattern``/``alpha_pattern`` keys) reach the
    pointwise convolution of every :class:`SeparableConv2d` they name; ``config`` itself when nothing changes."""
    target_modules = getattr(config, "target_modules", None)
    resolved = resolve_lora_target_modules(model, target_modules)
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field, None)
        if pattern:
            patterns[field] = {
                new_key: value
                for key, value in pattern.items()
                for new_key in _resolve_pattern_key(model, key)
            }
    if resolved == target_modules and all(patterns[f] == getattr(config, f) for f in patterns):
        return config
    config = copy.copy(config)
    config.target_modules = resolved
    for field, pattern in patterns.items():
        setattr(config, field, pattern)
    return config


def _resolve_pattern_key(model: nn.Module, key: str) -> list[str]:
    resolved = resolve_lora_target_modules(model, [key])
    return resolved if resolved else [key]
