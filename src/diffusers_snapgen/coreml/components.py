"""What each Core ML package holds: wrapped module, fixed-shape inputs, output names, checks to apply.

Package names follow Apple's ``ml-stable-diffusion`` Swift pipeline: ``Unet`` (``UnetChunk1``/``UnetChunk2`` when
chunked), ``VAEDecoder`` (``z`` -> ``image``), ``TextEncoder`` / ``TextEncoder2`` (CLIP-L / CLIP-G) and
``TextEncoderT5``. Inputs double as validation inputs: real prompt encodings where the pipeline has text encoders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .ane import DecoderCoreMLWrapper, TextEncoderCoreMLWrapper, UNetCoreMLWrapper, to_ane_unet
from .validate import TEXT_ENCODER_EXTRA_OPS

__all__ = [
    "COMPONENT_GROUPS",
    "VALIDATION_PROMPT",
    "CoreMLComponent",
    "parse_components",
    "unet_component",
    "decoder_component",
    "text_encoder_component",
    "pipeline_components",
]

COMPONENT_GROUPS = ("unet", "decoder", "text")
VALIDATION_PROMPT = "a red apple on a wooden table"
DEFAULT_SEQUENCE_LENGTH = 77 + 256  # SD3: CLIP tokens + T5 tokens (zeros when T5 is absent)


@dataclass
class CoreMLComponent:
    """One package to export. ``reference`` is the original fp32 model, ``module`` the (ANE) form that is traced;
    both take ``inputs`` positionally."""

    name: str
    group: str
    package: str
    reference: nn.Module
    module: nn.Module
    inputs: dict
    output_names: list
    extra_ops: frozenset = frozenset()
    expect_sdpa: bool = False
    compressible: bool = True
    notes: dict = field(default_factory=dict)


def parse_components(value) -> list[str]:
    """``"unet,decoder,text"`` or a sequence -> validated list of groups."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        raise TypeError(f"`components` must be a comma-separated string or a list, got {type(value).__name__}.")
    unknown = [v for v in items if v not in COMPONENT_GROUPS]
    if unknown or not items:
        raise ValueError(f"`components` must be a non-empty subset of {COMPONENT_GROUPS}, got {items!r}.")
    return [g for g in COMPONENT_GROUPS if g in items]


def _fp32_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().eval()


def unet_component(
    unet: nn.Module,
    latent_size: int,
    batch_size: int = 1,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    timestep: float = 1000.0,
    encoder_hidden_states: torch.Tensor | None = None,
    pooled_projections: torch.Tensor | None = None,
    seed: int = 0,
) -> CoreMLComponent:
    """The UNet at a fixed ``(batch_size, in_channels, latent_size, latent_size)`` sample, in its ANE form."""
    from ..models import SnapGenUNet2DModel

    if not isinstance(unet, SnapGenUNet2DModel):
        raise TypeError(f"`unet` must be a SnapGenUNet2DModel, got {type(unet).__name__}: unsupported model.")
    if batch_size not in (1, 2):
        raise ValueError(f"`batch_size` must be 1 (few-step, CFG-free) or 2 (CFG), got {batch_size!r}.")
    multiple = unet.latent_size_multiple
    if not isinstance(latent_size, int) or latent_size < multiple or latent_size % multiple:
        raise ValueError(f"`latent_size` must be a positive multiple of {multiple}, got {latent_size!r}.")
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    if encoder_hidden_states is None:
        encoder_hidden_states = torch.randn(1, sequence_length, config.joint_attention_dim, generator=generator)
    if pooled_projections is None:
        pooled_projections = torch.randn(1, config.pooled_projection_dim, generator=generator)
    inputs = {
        "sample": torch.randn(batch_size, config.in_channels, latent_size, latent_size, generator=generator),
        "timestep": torch.full((batch_size,), float(timestep)),
        "encoder_hidden_states": encoder_hidden_states.float()[:1].expand(batch_size, -1, -1).contiguous(),
        "pooled_projections": pooled_projections.float()[:1].expand(batch_size, -1).contiguous(),
    }
    return CoreMLComponent(
        name="unet",
        group="unet",
        package="Unet",
        reference=UNetCoreMLWrapper(_fp32_copy(unet)),
        module=UNetCoreMLWrapper(to_ane_unet(unet)),
        inputs=inputs,
        output_names=["noise_pred"],
        expect_sdpa=any(type(m).__name__ == "SnapGenAttention" for m in unet.modules()),
        notes={"output": "flow-matching velocity (noise - x0), named noise_pred as in Apple's Swift pipeline"},
    )


def decoder_component(vae: nn.Module, latent_size: int, seed: int = 0) -> CoreMLComponent:
    """The decoder (``TinyDecoder`` or an ``AutoencoderKL``'s decoder): ``z`` -> ``image`` in [-1, 1]."""
    if not isinstance(vae, nn.Module) or not hasattr(vae, "decode") or "latent_channels" not in vae.config:
        raise TypeError(f"`vae` must be a TinyDecoder or AutoencoderKL, got {type(vae).__name__}: unsupported model.")
    if not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"`latent_size` must be a positive int, got {latent_size!r}.")
    generator = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(1, vae.config.latent_channels, latent_size, latent_size, generator=generator)
    wrapper = DecoderCoreMLWrapper(_fp32_copy(vae))
    return CoreMLComponent(
        name="decoder",
        group="decoder",
        package="VAEDecoder",
        reference=wrapper,
        module=wrapper,
        inputs={"z": z},
        output_names=["image"],
        compressible=False,
        notes={
            "input": "z = latents / scaling_factor + shift_factor",
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(vae.config.get("shift_factor") or 0.0),
        },
    )


def text_encoder_component(
    name: str, encoder: nn.Module, tokenizer, mode: str, sequence_length: int, prompt: str = VALIDATION_PROMPT
) -> CoreMLComponent:
    """A text encoder at a fixed token length; validated on ``prompt`` tokenised as the pipeline does."""
    packages = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "text_encoder_3": "TextEncoderT5"}
    if name not in packages:
        raise ValueError(f"`name` must be one of {tuple(packages)}, got {name!r}.")
    if not isinstance(sequence_length, int) or sequence_length < 1:
        raise ValueError(f"`sequence_length` must be a positive int, got {sequence_length!r}.")
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=sequence_length, truncation=True, return_tensors="pt"
    )
    inputs = {"input_ids": tokens.input_ids.to(torch.int32)}
    outputs = ["hidden_embeds", "pooled_outputs"]
    if mode == "generic":
        mask = tokens.get("attention_mask")
        inputs["attention_mask"] = (mask if mask is not None else torch.ones_like(tokens.input_ids)).to(torch.int32)
    elif mode == "t5":
        outputs = ["hidden_embeds"]
    wrapper = TextEncoderCoreMLWrapper(_fp32_copy(encoder), mode=mode, hidden_state_index=-2)
    return CoreMLComponent(
        name=name,
        group="text",
        package=packages[name],
        reference=wrapper,
        module=wrapper,
        inputs=inputs,
        output_names=outputs,
        extra_ops=TEXT_ENCODER_EXTRA_OPS,
        notes={"mode": mode, "hidden_state": "penultimate" if mode == "clip" else "last"},
    )


def _text_specs(pipe) -> list[tuple[str, str, int]]:
    """``(component name, wrapper mode, token length)`` of each text encoder, as the pipeline encodes prompts."""
    mode = getattr(pipe, "text_encoder_mode", None)
    if mode is None:
        return []
    if mode == "generic":
        return [("text_encoder", "generic", pipe._resolve_max_sequence_length(None))]
    clip_length = min(pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length)
    specs = [("text_encoder", "clip", clip_length), ("text_encoder_2", "clip", clip_length)]
    if getattr(pipe, "text_encoder_3", None) is not None:
        specs.append(("text_encoder_3", "t5", pipe._resolve_max_sequence_length(None)))
    return specs


def pipeline_components(
    pipe,
    resolution: int,
    groups=COMPONENT_GROUPS,
    batch_size: int = 1,
    prompt: str = VALIDATION_PROMPT,
    seed: int = 0,
) -> list[CoreMLComponent]:
    """The packages of a :class:`SnapGenPipeline` at ``resolution`` (square, pixels)."""
    from ..pipelines import SnapGenPipeline

    if not isinstance(pipe, SnapGenPipeline):
        raise TypeError(
            f"`pipe` must be a SnapGenPipeline, got {type(pipe).__name__}: unsupported model (the Core ML export "
            "handles SnapGen pipelines: SnapGenUNet2DModel + TinyDecoder/AutoencoderKL + optional text encoders)."
        )
    groups = parse_components(groups)
    multiple = pipe.vae_scale_factor * pipe.unet.latent_size_multiple
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < multiple or resolution % multiple:
        raise ValueError(f"`resolution` must be a positive multiple of {multiple} pixels, got {resolution!r}.")
    latent_size = resolution // pipe.vae_scale_factor
    components = []
    text_specs = _text_specs(pipe)
    if "text" in groups:
        if not text_specs:
            raise ValueError("`components` includes 'text' but the pipeline has no text encoder: drop 'text'.")
        for name, mode, length in text_specs:
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
            components.append(text_encoder_component(name, getattr(pipe, name), tokenizer, mode, length, prompt))
    if "unet" in groups:
        hidden = pooled = None
        if text_specs:
            with torch.no_grad():
                hidden, _, pooled, _ = pipe.encode_prompt(
                    prompt=prompt, device=torch.device("cpu"), do_classifier_free_guidance=False
                )
        timestep = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        components.append(
            unet_component(pipe.unet, latent_size, batch_size, timestep=timestep,
                           encoder_hidden_states=hidden, pooled_projections=pooled, seed=seed)
        )
    if "decoder" in groups:
        components.append(decoder_component(pipe.vae, latent_size, seed=seed))
    return components
