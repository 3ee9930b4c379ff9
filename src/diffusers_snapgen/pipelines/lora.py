"""LoRA loading for the SnapGen UNet through peft, on diffusers' :class:`~diffusers.loaders.LoraBaseMixin`.

LoRA checkpoints use diffusers' peft layout: keys ``unet.<module path>.lora_A.weight`` / ``lora_B.weight``
(what ``get_peft_model_state_dict(unet)`` gives, prefixed ``unet.`` by :meth:`save_lora_weights`).
``fuse_lora``, ``unfuse_lora``, ``unload_lora_weights``, ``set_adapters``, ``disable_lora`` etc. come from the
base mixin and act on the components in ``_lora_loadable_modules`` (the UNet only).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args

UNET_NAME = "unet"


class SnapGenLoraLoaderMixin(LoraBaseMixin):
    """Load, save, fuse and unload LoRA adapters of :class:`SnapGenUNet2DModel` in :class:`SnapGenPipeline`."""

    _lora_loadable_modules = [UNET_NAME]
    unet_name = UNET_NAME

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, **kwargs):
        """Read a LoRA state dict from a folder, file, Hub repo or dict. Safetensors only by default;
        ``use_safetensors=None`` also accepts pickle files, ``False`` reads pickle files only.
        Returns ``(state_dict, metadata)`` with ``return_lora_metadata=True``."""
        if not isinstance(pretrained_model_name_or_path_or_dict, (str, os.PathLike, dict)):
            raise TypeError(
                "`pretrained_model_name_or_path_or_dict` must be a folder, a .safetensors file, a Hub repo id or a "
                f"state dict, got {type(pretrained_model_name_or_path_or_dict).__name__}."
            )
        return_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", True)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=use_safetensors is not False,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=not use_safetensors,
        )
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError(
                "`pretrained_model_name_or_path_or_dict` is not a LoRA checkpoint: every key must contain 'lora' "
                "(peft layout, e.g. 'unet.<module>.lora_A.weight')."
            )
        return (state_dict, metadata) if return_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Load a LoRA into ``self.unet`` as peft adapter ``adapter_name`` (``default_0``, ... when None)."""
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise TypeError(f"`adapter_name` must be a string, got {type(adapter_name).__name__}.")
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not any(key.startswith(f"{self.unet_name}.") for key in state_dict):
            raise ValueError(
                f"`pretrained_model_name_or_path_or_dict` holds no UNet LoRA: no key starts with '{self.unet_name}.'. "
                "Save adapters with `SnapGenPipeline.save_lora_weights(dir, unet_lora_layers=...)`."
            )
        self._check_lora_targets(state_dict)
        self.unet.load_lora_adapter(
            state_dict,
            prefix=self.unet_name,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    def _check_lora_targets(self, state_dict: dict) -> None:
        """peft cannot adapt a separable convolution as one layer: name its pointwise conv instead."""
        from ..models.resnet import SeparableConv2d

        modules = dict(self.unet.named_modules())
        prefix = f"{self.unet_name}."
        for key in state_dict:
            path = key[len(prefix):].split(".lora_")[0] if key.startswith(prefix) else None
            if path is not None and isinstance(modules.get(path), SeparableConv2d):
                raise ValueError(
                    f"`pretrained_model_name_or_path_or_dict` has LoRA weights for `{path}`, a separable convolution "
                    f"(depthwise 3x3 + pointwise 1x1) that peft cannot adapt as one layer. LoRA adapts its pointwise "
                    f"conv: train and save the adapter on `{path}.pointwise` (what "
                    "`unet.add_adapter(LoraConfig(target_modules=[...]))` does for such names)."
                )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: dict | None = None,
    ):
        """Save UNet LoRA layers (e.g. ``get_peft_model_state_dict(unet)``) as ``pytorch_lora_weights.safetensors``."""
        if not unet_lora_layers:
            raise ValueError("`unet_lora_layers` is empty: pass the UNet's LoRA state dict to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.unet_name: unet_lora_layers},
            lora_metadata={cls.unet_name: unet_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] = [UNET_NAME],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merge the active (or named) adapters into the UNet weights, scaled by ``lora_scale``."""
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] = [UNET_NAME], **kwargs):
        """Undo :meth:`fuse_lora`."""
        super().unfuse_lora(components=components, **kwargs)
