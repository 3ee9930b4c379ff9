# Copyright 2025 The diffusers-snapgen authors. Licensed under the Apache License, Version 2.0.
"""A tiny image encoder for SnapGen's latent space: the counterpart of the tiny decoder (paper §3.2), in the spirit of
TAESD's encoder, so that a pipeline shipped with only a :class:`~.tiny_decoder.TinyDecoder` can encode training images
(fine-tuning, docs/finetuning.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .resnet import SeparableConv2d
from .tiny_decoder import TinyDecoderResnetBlock2D, _group_norm, _per_stage

_CONV_TYPES = ("separable", "regular")


@dataclass
class TinyEncoderOutput(BaseOutput):
    """``latents``: the unscaled latents ``(batch, latent_channels, h, w)`` (what ``AutoencoderKL`` gives as
    ``latent_dist.mean``)."""

    latents: torch.Tensor


def _conv3x3(in_channels: int, out_channels: int, conv_type: str, stride: int = 1) -> nn.Module:
    if conv_type == "separable":
        return SeparableConv2d(in_channels, out_channels, stride=stride, depthwise_bias=False)
    if conv_type == "regular":
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
    raise ValueError(f"conv type must be one of {_CONV_TYPES}, got {conv_type!r}.")


class TinyEncoderDownBlock2D(nn.Module):
    """One resolution stage: residual blocks, then (except in the last stage) a stride-2 3x3 conv that also changes
    the channel count."""

    def __init__(self, channels: int, out_channels: int | None, num_layers: int, conv_type: str,
                 downsample_conv_type: str, add_norm: bool, num_groups: int, eps: float, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            TinyDecoderResnetBlock2D(channels, conv_type, add_norm, num_groups, eps, act_fn) for _ in range(num_layers)
        )
        self.downsampler = (
            _conv3x3(channels, out_channels, downsample_conv_type, stride=2) if out_channels is not None else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsampler is not None:
            hidden_states = self.downsampler(hidden_states)
        return hidden_states


class TinyEncoder(ModelMixin, ConfigMixin):
    r"""
    A tiny image encoder: RGB in [-1, 1] to the **unscaled** latents of an autoencoder (16 channels, f = 8 by default),
    trained by distilling that autoencoder's posterior mean (``training_examples/train_tiny_encoder.py``).

    It mirrors SnapGen's tiny decoder (paper §3.2): the same residual blocks (separable convs, GroupNorm only in the
    low-resolution stages, no attention, identity shortcuts), with stride-2 3x3 convs where the decoder upsamples.
    With the defaults it has about 1.4M parameters. Like the decoder, it stores the latent statistics of its
    autoencoder, so scaled latents are ``(z - shift_factor) * scaling_factor`` exactly as for ``AutoencoderKL``.

    [`~TinyEncoder.encode`] returns an ``AutoencoderKLOutput`` whose ``latent_dist`` is a deterministic
    ``DiagonalGaussianDistribution`` (zero variance): ``.mean``, ``.mode()`` and ``.sample()`` are the latents, so code
    written for ``AutoencoderKL.encode(x).latent_dist`` works unchanged. ``forward`` returns the latents themselves
    ([`TinyEncoderOutput`]).

    Per-stage values are listed like `block_out_channels`: highest resolution first.

    Parameters:
        in_channels (`int`, defaults to 3): Channels of the image.
        latent_channels (`int`, defaults to 16): Channels of the latent.
        block_out_channels (`tuple[int]`, defaults to `(64, 128, 256, 256)`): Width of each stage; its length minus
            one is the number of 2x downsamplings (4 stages: f = 8).
        layers_per_block (`int` or `tuple[int]`, defaults to `(1, 1, 1, 2)`): Residual blocks per stage.
        norm_per_block (`bool` or `tuple[bool]`, defaults to `(False, False, True, True)`): Whether the residual
            blocks of a stage start with a GroupNorm.
        norm_out (`bool`, defaults to `False`): GroupNorm before `conv_out`.
        conv_type (`str`, defaults to `"separable"`): `"separable"` or `"regular"` 3x3 convs in the residual blocks.
        downsample_conv_type (`str`, defaults to `"regular"`): Conv type of the channel-changing stride-2 layers.
        norm_num_groups (`int`, defaults to 32), norm_eps (`float`, defaults to 1e-6), act_fn (`str`, defaults to
            `"silu"`): GroupNorm groups and epsilon, activation.
        scaling_factor (`float`, defaults to 1.5305), shift_factor (`float`, defaults to 0.0609): the autoencoder's
            latent statistics (SD3's by default; training copies them from the distilled autoencoder).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TinyEncoderDownBlock2D"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 256),
        layers_per_block: int | tuple[int, ...] = (1, 1, 1, 2),
        norm_per_block: bool | tuple[bool, ...] = (False, False, True, True),
        norm_out: bool = False,
        conv_type: str = "separable",
        downsample_conv_type: str = "regular",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        act_fn: str = "silu",
        scaling_factor: float = 1.5305,
        shift_factor: float = 0.0609,
    ):
        super().__init__()
        for name, value, example in (("in_channels", in_channels, "3 for RGB"),
                                     ("latent_channels", latent_channels, "16 for SD3 latents")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int ({example}), got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1 ({example}), got {value}.")
        if not block_out_channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in block_out_channels
        ):
            raise ValueError(f"`block_out_channels` must be positive ints, one per stage, got {block_out_channels!r}.")
        for name, value in (("conv_type", conv_type), ("downsample_conv_type", downsample_conv_type)):
            if value not in _CONV_TYPES:
                raise ValueError(f"`{name}` must be one of {_CONV_TYPES}, got {value!r}.")
        num_stages = len(block_out_channels)
        channels = list(block_out_channels)
        layers = _per_stage(layers_per_block, num_stages, "layers_per_block")
        norms = _per_stage(norm_per_block, num_stages, "norm_per_block")

        # three input channels: a full 3x3 conv costs little here
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            TinyEncoderDownBlock2D(channels[i], channels[i + 1] if i + 1 < num_stages else None, layers[i], conv_type,
                                   downsample_conv_type, norms[i], norm_num_groups, norm_eps, act_fn)
            for i in range(num_stages)
        )
        self.conv_norm_out = _group_norm(channels[-1], norm_out, norm_num_groups, norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(channels[-1], latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def _check_images(self, sample: torch.Tensor) -> None:
        expected = self.config.in_channels
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or sample.shape[1] != expected:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`sample` must be images of shape (batch, {expected}, height, width) in [-1, 1], got "
                             f"{got}. Add a batch dimension with `x[None]` for a single image.")

    def _encode(self, sample: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(sample)
        for down_block in self.down_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(down_block, hidden_states)
            else:
                hidden_states = down_block(hidden_states)
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encodes images ``x`` (batch, 3, H, W) in [-1, 1] to unscaled latents (batch, latent_channels, H/8, W/8).

        Returns an ``AutoencoderKLOutput`` whose ``latent_dist`` has zero variance (``.mean == .mode() ==
        .sample()``), or a one-element tuple of it when ``return_dict=False``, like ``AutoencoderKL.encode``.
        """
        self._check_images(x)
        latents = self._encode(x)
        dist = DiagonalGaussianDistribution(torch.cat([latents, torch.zeros_like(latents)], dim=1), deterministic=True)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> TinyEncoderOutput | tuple[torch.Tensor]:
        """The unscaled latents of ``sample`` as a [`TinyEncoderOutput`] (or a one-element tuple)."""
        self._check_images(sample)
        latents = self._encode(sample)
        if not return_dict:
            return (latents,)
        return TinyEncoderOutput(latents=latents)
