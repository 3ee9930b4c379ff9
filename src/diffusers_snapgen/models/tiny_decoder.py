# Copyright 2025 The diffusers-snapgen authors. Licensed under the Apache License, Version 2.0.
"""SnapGen's tiny and fast latent decoder (Hu et al., CVPR 2025, arXiv 2412.09619, §3.2, Table 2, Fig. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .resnet import SeparableConv2d

_CONV_TYPES = ("separable", "regular")


def _per_stage(value, num_stages: int, name: str) -> tuple:
    """Broadcasts an int/bool config value to one entry per stage (listed highest resolution first)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * num_stages
    if len(values) != num_stages:
        raise ValueError(
            f"`{name}` has {len(values)} entries but `block_out_channels` has {num_stages} stages: "
            f"pass one value per stage (highest resolution first) or a single value for all."
        )
    return values


def _conv3x3(in_channels: int, out_channels: int, conv_type: str) -> nn.Module:
    if conv_type == "separable":
        return SeparableConv2d(in_channels, out_channels, depthwise_bias=False)
    if conv_type == "regular":
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    raise ValueError(f"conv type must be one of {_CONV_TYPES}, got {conv_type!r}.")


def _group_norm(channels: int, enabled: bool, num_groups: int, eps: float) -> nn.Module:
    if not enabled:
        return nn.Identity()
    if channels % num_groups:
        raise ValueError(
            f"`norm_num_groups`={num_groups} does not divide {channels} channels: pick a divisor of every "
            f"`block_out_channels` entry that has a GroupNorm."
        )
    return nn.GroupNorm(num_groups, channels, eps=eps)


class TinyDecoderResnetBlock2D(nn.Module):
    """Residual block with at most one GroupNorm, two separable convs and an identity shortcut.

    There is no conv shortcut: channel counts change only in the upsampling layers (paper §3.2, change 5).
    """

    def __init__(self, channels: int, conv_type: str, add_norm: bool, num_groups: int, eps: float, act_fn: str):
        super().__init__()
        self.norm1 = _group_norm(channels, add_norm, num_groups, eps)
        self.conv1 = _conv3x3(channels, channels, conv_type)
        self.conv2 = _conv3x3(channels, channels, conv_type)
        self.nonlinearity = get_activation(act_fn)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(self.nonlinearity(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.nonlinearity(hidden_states))
        return hidden_states + residual


class TinyDecoderUpsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv that also changes the channel count."""

    def __init__(self, in_channels: int, out_channels: int, conv_type: str):
        super().__init__()
        self.conv = _conv3x3(in_channels, out_channels, conv_type)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class TinyDecoderUpBlock2D(nn.Module):
    """One resolution stage: residual blocks, then (except in the last stage) the upsampler."""

    def __init__(
        self,
        channels: int,
        out_channels: int | None,
        num_layers: int,
        conv_type: str,
        upsample_conv_type: str,
        add_norm: bool,
        num_groups: int,
        eps: float,
        act_fn: str,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            TinyDecoderResnetBlock2D(channels, conv_type, add_norm, num_groups, eps, act_fn) for _ in range(num_layers)
        )
        self.upsampler = (
            TinyDecoderUpsample2D(channels, out_channels, upsample_conv_type) if out_channels is not None else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsampler is not None:
            hidden_states = self.upsampler(hidden_states)
        return hidden_states


class TinyDecoder(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    SnapGen's tiny decoder (paper §3.2, Fig. 4b, Table 2): SD3 latents (16 channels, f = 8) to RGB in [-1, 1].

    Changes vs the SD3 decoder: no attention; GroupNorm only in the low-resolution stages; half the width, with
    separable convs (depthwise 3x3 + pointwise 1x1) in the residual blocks; one residual block per high-resolution
    stage; no conv shortcut (the upsampling convs change the channel count). The exact layout is not public: the
    defaults are *(reconstructed)* to match the paper's size and cost, **1.42M parameters** (paper: 1.38M) and
    **227.5 GFLOPs** for a 128x128 latent -> 1024x1024 image (paper: 224; FLOPs counted as multiply-accumulates,
    as the paper's 4970 for SD3 implies; `torch.utils.flop_counter` reports twice that).

    It has **no encoder**: pair it with the frozen encoder of the [`AutoencoderKL`] whose latents it decodes (SD3's).
    Inputs are unscaled latents, `latents / scaling_factor + shift_factor`, exactly as `StableDiffusion3Pipeline`
    passes them, so it is a drop-in `vae` for that pipeline's decoding step.

    Per-stage values are listed like `block_out_channels`: highest resolution first (the decoder runs them reversed).

    Parameters:
        latent_channels (`int`, defaults to 16): Channels of the latent.
        out_channels (`int`, defaults to 3): Channels of the image.
        block_out_channels (`tuple[int]`, defaults to `(64, 128, 256, 256)`): Width of each stage; its length
            minus one is the number of 2x upsamplings (4 stages: f = 8, as diffusers pipelines compute it).
        layers_per_block (`int` or `tuple[int]`, defaults to `(1, 1, 1, 2)`): Residual blocks per stage.
        norm_per_block (`bool` or `tuple[bool]`, defaults to `(False, False, True, True)`): Whether the residual
            blocks of a stage start with a GroupNorm.
        norm_out (`bool`, defaults to `False`): GroupNorm before `conv_out`.
        conv_type (`str`, defaults to `"separable"`): `"separable"` or `"regular"` 3x3 convs in `conv_in` and the
            residual blocks.
        upsample_conv_type (`str`, defaults to `"regular"`): Conv type of the channel-changing upsampling layers.
        norm_num_groups (`int`, defaults to 32), norm_eps (`float`, defaults to 1e-6), act_fn (`str`, defaults to
            `"silu"`): GroupNorm groups and epsilon, activation.
        scaling_factor (`float`, defaults to 1.5305), shift_factor (`float`, defaults to 0.0609): SD3's latent
            statistics, read by pipelines to unscale latents before `decode`.
        force_upcast (`bool`, defaults to `False`): Whether pipelines should run decoding in float32.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TinyDecoderUpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 256),
        layers_per_block: int | tuple[int, ...] = (1, 1, 1, 2),
        norm_per_block: bool | tuple[bool, ...] = (False, False, True, True),
        norm_out: bool = False,
        conv_type: str = "separable",
        upsample_conv_type: str = "regular",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        act_fn: str = "silu",
        scaling_factor: float = 1.5305,
        shift_factor: float = 0.0609,
        force_upcast: bool = False,
    ):
        super().__init__()
        for name, value, example in (("latent_channels", latent_channels, "16 for SD3 latents"),
                                     ("out_channels", out_channels, "3 for RGB")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int ({example}), got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1 ({example}), got {value}.")
        if not block_out_channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in block_out_channels
        ):
            raise ValueError(f"`block_out_channels` must be positive ints, one per stage, got {block_out_channels!r}.")
        num_stages = len(block_out_channels)
        channels = list(reversed(block_out_channels))
        layers = list(reversed(_per_stage(layers_per_block, num_stages, "layers_per_block")))
        norms = list(reversed(_per_stage(norm_per_block, num_stages, "norm_per_block")))

        self.conv_in = _conv3x3(latent_channels, channels[0], conv_type)
        self.up_blocks = nn.ModuleList(
            TinyDecoderUpBlock2D(
                channels[i],
                channels[i + 1] if i + 1 < num_stages else None,
                layers[i],
                conv_type,
                upsample_conv_type,
                norms[i],
                norm_num_groups,
                norm_eps,
                act_fn,
            )
            for i in range(num_stages)
        )
        self.conv_norm_out = _group_norm(channels[-1], norm_out, norm_num_groups, norm_eps)
        self.conv_act = get_activation(act_fn)
        # three output channels: a full 3x3 conv costs little here
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)

        self.use_slicing = False
        self.gradient_checkpointing = False

    def _check_latents(self, z: torch.Tensor) -> None:
        expected = self.config.latent_channels
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != expected:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"`z` must be a latent tensor of shape (batch, {expected}, height, width), got {got}. Pass the "
                f"unscaled latents (`latents / scaling_factor + shift_factor`) of an autoencoder with {expected} "
                f"latent channels, with a batch dimension (use `z[None]` for a single latent)."
            )

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(z)
        for up_block in self.up_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(up_block, hidden_states)
            else:
                hidden_states = up_block(hidden_states)
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """
        Decodes unscaled latents `z` of shape (batch, latent_channels, h, w) to images (batch, 3, 8h, 8w) in [-1, 1].

        Returns a [`~models.autoencoders.vae.DecoderOutput`], or a one-element tuple when `return_dict=False`.
        """
        self._check_latents(z)
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode(z_slice) for z_slice in z.split(1)])
        else:
            sample = self._decode(z)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def encode(self, *args, **kwargs):
        """Not available: the tiny decoder is trained against a frozen encoder and has none of its own."""
        raise NotImplementedError(
            "TinyDecoder has no encoder (SnapGen trains it against the frozen SD3 encoder). Encode images with "
            "the `AutoencoderKL` whose latent space it decodes, e.g. `AutoencoderKL.from_pretrained(<sd3 repo>, "
            "subfolder='vae').encode(images).latent_dist`, and decode those latents with this model."
        )

    def forward(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Same as [`~TinyDecoder.decode`]."""
        return self.decode(z, return_dict=return_dict)
