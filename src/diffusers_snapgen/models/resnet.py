"""Convolutional blocks of the SnapGen UNet (paper §3.1, Fig. 2 (c)): expanded separable residual blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES = ("separable", "regular")


class SeparableConv2d(nn.Module):
    r"""Depthwise ``kernel_size`` convolution followed by a pointwise 1x1 convolution (paper §3.1, "SepConv").

    ``bias`` applies to the pointwise conv, ``depthwise_bias`` to the depthwise one (the tiny decoder drops it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        depthwise_bias: bool = True,
    ):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=in_channels,
            bias=depthwise_bias,
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(hidden_states))


def make_conv(conv_type: str, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A 3x3 convolution of the requested type: ``"separable"`` (DW 3x3 + PW 1x1) or ``"regular"``."""
    if conv_type == "separable":
        return SeparableConv2d(in_channels, out_channels, 3, stride=stride)
    if conv_type == "regular":
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    raise ValueError(f"`conv_type` must be one of {CONV_TYPES}, got {conv_type!r}.")


class SnapGenResnetBlock2D(nn.Module):
    r"""Residual block with time conditioning.

    ``GN -> SiLU -> conv(C_in -> C_mid) -> + time -> GN -> SiLU -> dropout -> conv(C_mid -> C_out) -> + shortcut``.
    With ``conv_type="separable"`` each conv is DW 3x3 + PW 1x1 and ``C_mid = expansion_ratio * C_out``, which makes
    the block a Universal Inverted Bottleneck (paper §3.1, "Replace Conv with Expanded Separable Conv"); with
    ``"regular"`` it is SDXL's block (``C_mid = C_out``). The shortcut is a 1x1 conv only when ``C_in != C_out``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        conv_type: str = "separable",
        expansion_ratio: int = 2,
        norm_num_groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        if expansion_ratio < 1:
            raise ValueError(f"`conv_expansion_ratio` must be >= 1, got {expansion_ratio}.")
        mid_channels = out_channels * expansion_ratio if conv_type == "separable" else out_channels
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=eps)
        self.conv1 = make_conv(conv_type, in_channels, mid_channels)
        self.time_emb_proj = nn.Linear(temb_channels, mid_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, mid_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = make_conv(conv_type, mid_channels, out_channels)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = hidden_states + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        hidden_states = F.silu(self.norm2(hidden_states))
        if self.dropout.training:  # inference skips the no-op call
            hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            residual = self.conv_shortcut(residual)
        return hidden_states + residual


class SnapGenDownsample2D(nn.Module):
    """Stride-2 convolution that halves the resolution and keeps the channels."""

    def __init__(self, channels: int, conv_type: str = "separable"):
        super().__init__()
        self.conv = make_conv(conv_type, channels, channels, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class SnapGenUpsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a convolution."""

    def __init__(self, channels: int, conv_type: str = "separable"):
        super().__init__()
        self.conv = make_conv(conv_type, channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))
