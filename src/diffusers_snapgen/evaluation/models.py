"""Which models an evaluation compares and how they are loaded: ``name=path:steps[:guidance]`` specs, saved pipelines,
and an ``SD3Transformer2DModel`` teacher sampled through :class:`SnapGenPipeline` with a base pipeline's text
encoder, decoder and scheduler."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

_TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_.+-]+)=(?P<path>.+?):(?P<steps>[0-9]+)(?::(?P<guidance>[0-9]*\.?[0-9]+))?")


@dataclass(frozen=True)
class ModelSpec:
    """One column of the comparison: a display name, a model folder, sampling steps and optional CFG scale."""

    name: str
    path: str
    steps: int
    guidance_scale: float | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """``"kd4=runs/kd-asd:4"`` or ``"teacher=runs/teacher:28:4.5"`` (guidance scale last) -> :class:`ModelSpec`."""
    if not isinstance(text, str):
        raise TypeError(f"a model spec must be a string like 'name=path:steps', got {type(text).__name__}.")
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--models: {text!r} is not NAME=PATH:STEPS[:GUIDANCE], e.g. 'asd=runs/asd:4' or "
                         "'teacher=runs/teacher:28:4.5' (NAME: letters, digits, _ . + -).")
    steps = int(match["steps"])
    if steps < 1:
        raise ValueError(f"--models: {text!r} asks for {steps} steps; use 1 or more.")
    guidance = float(match["guidance"]) if match["guidance"] is not None else None
    return ModelSpec(match["name"], match["path"], steps, guidance)


class SD3TransformerDenoiser(ModelMixin, ConfigMixin):
    """Gives an ``SD3Transformer2DModel`` the call and config of a SnapGen UNet, so :class:`SnapGenPipeline` can
    sample it (same scheduler, text encoding and decoder). ``block_out_channels`` only encodes the patch size
    (``2 ** (len - 1) == patch_size``), which is what the pipeline reads it for (image size multiples)."""

    @register_to_config
    def __init__(self, sample_size: int, in_channels: int, out_channels: int, block_out_channels: tuple,
                 joint_attention_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.transformer = None

    @classmethod
    def wrap(cls, transformer) -> SD3TransformerDenoiser:
        from diffusers import SD3Transformer2DModel

        if not isinstance(transformer, SD3Transformer2DModel):
            raise TypeError(f"`transformer` must be an SD3Transformer2DModel, got {type(transformer).__name__}.")
        c = transformer.config
        levels = max(1, int(c.patch_size).bit_length())  # 2 ** (levels - 1) == patch_size for powers of two
        denoiser = cls(sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
                       block_out_channels=(c.num_attention_heads * c.attention_head_dim,) * levels,
                       joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim)
        denoiser.transformer = transformer
        return denoiser

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections=None, encoder_attention_mask=None,
                attention_kwargs=None, return_dict=True):
        if pooled_projections is None:
            pooled_projections = sample.new_zeros(sample.shape[0], self.config.pooled_projection_dim)
        out = self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=pooled_projections, joint_attention_kwargs=attention_kwargs,
                               return_dict=False)[0]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def _transformer_folder(path: Path) -> Path | None:
    for folder in (path, path / "transformer"):
        config = folder / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "SD3Transformer2DModel":
                    return folder
            except (OSError, json.JSONDecodeError):
                return None
    return None


def check_model_folder(path, base=None) -> Path:
    """``path`` as a folder :func:`load_model` reads (a saved pipeline, or an ``SD3Transformer2DModel`` with
    ``base``), checked without loading any weights, so that a wrong path fails before an evaluation starts."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder path, got {type(path).__name__}.")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model {str(path)!r} is not a folder.")
    if (folder / "model_index.json").is_file():
        return folder
    if _transformer_folder(folder) is None:
        raise ValueError(f"model {str(path)!r} is neither a pipeline folder (model_index.json) nor an "
                         "SD3Transformer2DModel folder.")
    if base is None:
        raise ValueError(f"model {str(path)!r} is a bare SD3Transformer2DModel: pass --base with a SnapGen "
                         "pipeline folder whose text encoder, vae and scheduler it was trained with.")
    return folder


def load_model(path, base=None, device=None, dtype: torch.dtype | None = None):
    """A pipeline to sample from ``path``.

    - a saved pipeline folder (``model_index.json``): ``DiffusionPipeline.from_pretrained`` (SnapGen or diffusers);
    - an ``SD3Transformer2DModel`` folder (or one with ``transformer/``): wrapped by :class:`SD3TransformerDenoiser`
      into a :class:`SnapGenPipeline` with the text encoder, tokenizer, vae and scheduler of the pipeline ``base``.
    """
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    import diffusers_snapgen  # noqa: F401  (registers SnapGen classes with diffusers)

    from ..pipelines import SnapGenPipeline

    folder = check_model_folder(path, base)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if (folder / "model_index.json").is_file():
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
        if isinstance(pipe, SnapGenPipeline) and pipe.text_encoder_mode is None:
            # Shipped without text encoder (the embedded default model): borrow the base pipeline's.
            if base is None:
                raise ValueError(f"model {str(path)!r} has no text encoder: pass --base with the SnapGen pipeline "
                                 "whose text encoder it was trained with.")
            base_pipe = base if isinstance(base, SnapGenPipeline) else SnapGenPipeline.from_pretrained(str(base),
                                                                                                       **kwargs)
            pipe.register_modules(**{name: getattr(base_pipe, name) for name in _TEXT_COMPONENTS})
    else:
        transformer_folder = _transformer_folder(folder)
        base_pipe = base if isinstance(base, SnapGenPipeline) else SnapGenPipeline.from_pretrained(str(base), **kwargs)
        transformer = SD3Transformer2DModel.from_pretrained(str(transformer_folder), **kwargs)
        components = {k: v for k, v in base_pipe.components.items() if k != "unet"}
        pipe = SnapGenPipeline(unet=SD3TransformerDenoiser.wrap(transformer), **components)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
