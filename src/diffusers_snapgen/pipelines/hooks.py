"""Modules whose forward runs hooks: accelerate's (CPU offloading, device maps) and diffusers' (group offloading,
layerwise casting, caches). Their Python code runs in every forward call, so a CUDA graph's replay would skip it
(``SnapGenFastSampler``), and text keys and values computed outside the forward would bypass a hook on a module
above the projections (``projects_text_once``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def modules_with_forward_hooks(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for each module of ``model`` that carries an accelerate hook (``_hf_hook``) or a diffusers
    hook registry holding hooks (``_diffusers_hook``; diffusers leaves empty registries behind when it removes
    hooks)."""
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if getattr(module, "_hf_hook", None) is not None or (registry is not None and registry.hooks):
            yield name, module
