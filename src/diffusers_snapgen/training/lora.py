"""LoRA fine-tuning pieces: the adapter on the SnapGen UNet, its state in diffusers' LoRA layout, and the few-step
timestep sampler (``train_snapgen_lora.py``; training_examples/README.md, "Fine-tuning with LoRA").

The adapter is a peft ``LoraConfig`` injected with ``unet.add_adapter`` (Hu et al., 2021, "LoRA", §4.2: low-rank
updates of the attention projections), as diffusers' ``train_dreambooth_lora_sd3.py`` does; separable convolutions are
adapted at their pointwise conv (:mod:`..models.lora_targets`). Saved adapters are
``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight`` and the ``LoraConfig`` as metadata,
written by :meth:`SnapGenPipeline.save_lora_weights`, so ``SnapGenPipeline.load_lora_weights(folder)`` loads them
(rank and alpha included).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

__all__ = [
    "LORA_LAYER_TARGETS",
    "LORA_WEIGHT_NAME",
    "TIMESTEP_SAMPLINGS",
    "parse_lora_layers",
    "lora_target_modules",
    "add_lora_adapter",
    "has_lora_adapter",
    "lora_parameters",
    "save_lora_adapter",
    "load_lora_adapter",
    "timestep_sampler",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: ``--lora_layers`` groups -> peft target names (a name matches a module path or its dotted suffix). ``attn``: the
#: q/k/v/out projections of every self- and cross-attention; ``ffn``: the GEGLU feed-forward's two linears; ``conv``:
#: the ResNet convolutions (separable ones at their pointwise 1x1 conv).
LORA_LAYER_TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "ffn": ("ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2", "conv_shortcut"),
}
#: ``--timestep_sampling``: ``density`` draws sigmas from ``--weighting_scheme``'s density over the 1000-step training
#: table (flow matching); ``few_step`` draws only the sigmas the pipeline visits with its own number of steps.
TIMESTEP_SAMPLINGS = ("density", "few_step")


def parse_lora_layers(value: str) -> tuple[str, ...]:
    """``"attn,ffn"`` -> ``("attn", "ffn")``; ValueError naming ``--lora_layers`` for an unknown or empty group."""
    if not isinstance(value, str):
        raise TypeError(f"--lora_layers must be a string such as 'attn' or 'attn,ffn', got {type(value).__name__}.")
    groups = tuple(dict.fromkeys(g.strip() for g in value.split(",") if g.strip()))
    unknown = [g for g in groups if g not in LORA_LAYER_TARGETS]
    if not groups or unknown:
        raise ValueError(f"--lora_layers {value!r}: use comma-separated groups of {tuple(LORA_LAYER_TARGETS)} "
                         "(e.g. 'attn' or 'attn,ffn,conv').")
    return groups


def lora_target_modules(layers="attn") -> list[str]:
    """The peft ``target_modules`` of ``--lora_layers`` groups (a string or a sequence of group names)."""
    groups = parse_lora_layers(layers) if isinstance(layers, str) else tuple(layers)
    if not groups or any(g not in LORA_LAYER_TARGETS for g in groups):
        raise ValueError(f"`layers` must name groups of {tuple(LORA_LAYER_TARGETS)}, got {layers!r}.")
    return [name for g in groups for name in LORA_LAYER_TARGETS[g]]


def add_lora_adapter(unet, rank: int = 4, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                     layers="attn", weight_dtype: torch.dtype | None = None):
    """Freezes ``unet`` (cast to ``weight_dtype`` when given) and adds a trainable LoRA adapter ``"default"`` on the
    ``layers`` groups: rank ``rank``, scale ``lora_alpha / rank`` (``lora_alpha`` defaults to ``rank``), Gaussian
    ``A`` and zero ``B`` (diffusers' LoRA scripts), so the adapted model starts as the base model. The LoRA
    parameters stay float32. Returns ``unet``."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"`unet` must be a diffusers model with peft support, got {type(unet).__name__}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` (--rank) must be a positive int, got {rank!r}.")
    lora_alpha = rank if lora_alpha is None else lora_alpha
    if not lora_alpha > 0:
        raise ValueError(f"`lora_alpha` (--lora_alpha) must be > 0, got {lora_alpha!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"`lora_dropout` (--lora_dropout) must be in [0, 1), got {lora_dropout!r}.")
    unet.requires_grad_(False)
    if weight_dtype is not None:
        unet.to(dtype=weight_dtype)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights="gaussian",
                        target_modules=lora_target_modules(layers))
    unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)  # the adapter only: the frozen weights keep weight_dtype
    return unet


def has_lora_adapter(model) -> bool:
    """Whether ``model`` carries a peft adapter (``add_adapter`` / ``load_lora_adapter``)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and bool(getattr(model, "peft_config", None))


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable parameters of the adapter (those with ``lora_`` in their name), in module order."""
    return [p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]


def save_lora_adapter(unet, folder, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Writes ``unet``'s adapter as ``<folder>/<weight_name>`` in diffusers' LoRA layout with its ``LoraConfig`` as
    metadata (:meth:`SnapGenPipeline.save_lora_weights`), through a temporary file renamed into place."""
    from peft.utils import get_peft_model_state_dict

    from ..pipelines import SnapGenPipeline

    if not has_lora_adapter(unet):
        raise ValueError("`unet` has no LoRA adapter to save: add one with add_lora_adapter() first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict() if "default" in unet.peft_config else None
    tmp = folder / f".tmp-lora-{uuid.uuid4().hex[:8]}"
    try:
        SnapGenPipeline.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=weight_name,
                                          unet_lora_adapter_metadata=metadata)
        os.chmod(tmp / weight_name, 0o644)
        os.replace(tmp / weight_name, folder / weight_name)
    finally:
        if tmp.exists():
            for leftover in tmp.iterdir():
                leftover.unlink()
            tmp.rmdir()
    return folder / weight_name


def load_lora_adapter(unet, folder, weight_name: str = LORA_WEIGHT_NAME):
    """Copies the adapter saved by :func:`save_lora_adapter` in ``folder`` into ``unet``'s ``"default"`` adapter
    (same targets and rank); raises ValueError when keys are missing or left over."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not has_lora_adapter(unet):
        raise ValueError("`unet` has no LoRA adapter to load into: add one with add_lora_adapter() first.")
    path = Path(folder) / weight_name
    if not path.is_file():
        raise ValueError(f"no {weight_name} in {folder}: not a LoRA checkpoint of train_snapgen_lora.py.")
    state = {k.split(".", 1)[1]: v for k, v in load_file(str(path)).items() if k.startswith("unet.")}
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not match the adapter (different --rank?): {str(e).splitlines()[-1]}") from e
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        example = (missing + unexpected)[0]
        raise ValueError(f"{path} does not match the adapter (different --rank or --lora_layers?): "
                         f"{len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {example}.")


def timestep_sampler(kind: str, scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, num_inference_steps: int | None = None):
    """The sampler of ``--timestep_sampling``: ``"density"`` -> :class:`~.flow_matching.FlowMatchingSampler`
    (logit-normal flow matching by default); ``"few_step"`` -> :class:`~.asd.FewStepSampler`, uniform over the
    ``num_inference_steps`` sigmas that ``scheduler`` visits (default: the pipeline's stored default steps), so a
    few-step model (paper §3.4) is only trained where it samples."""
    from .asd import FewStepSampler
    from .flow_matching import FlowMatchingSampler

    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"--timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {kind!r}.")
    if kind == "density":
        return FlowMatchingSampler(scheduler, weighting_scheme, logit_mean, logit_std, mode_scale)
    if num_inference_steps is None:
        from ..pipelines.pipeline_snapgen import DEFAULT_NUM_INFERENCE_STEPS, SAMPLING_DEFAULTS_KEY

        stored = getattr(scheduler, "config", {}).get(SAMPLING_DEFAULTS_KEY) or {}
        num_inference_steps = int(stored.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS))
    return FewStepSampler(scheduler, num_inference_steps, weighting_scheme)
