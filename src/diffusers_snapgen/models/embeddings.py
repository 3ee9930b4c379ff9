"""Positional embeddings of the SnapGen UNet (paper §3.1, Fig. 2 (f))."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn


class SnapGenRotaryPosEmbed2D(nn.Module):
    r"""2D rotary position embedding over the token grid of one UNet stage.

    Half of each head's channels rotate with the row index, the other half with the column index
    (paper §3.1: "we adapt RoPE from one dimension to two dimensions"). Positions are integer grid
    indices, so the table is computed for whatever ``(height, width)`` arrives: any resolution and
    aspect ratio works, and larger images extrapolate to positions never seen in training.

    Holds no parameters or buffers: nothing to save, nothing for weight compression to touch.

    Returns ``(cos, sin)``, each ``(height * width, head_dim)`` in float32, in the interleaved-pair
    layout that :func:`diffusers.models.embeddings.apply_rotary_emb` expects with ``use_real_unbind_dim=-1``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"`head_dim` must be divisible by 4 for 2D RoPE, got {head_dim}.")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, height: int, width: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        axis_dim = self.head_dim // 2
        rows = torch.arange(height, device=device, dtype=torch.float32)
        cols = torch.arange(width, device=device, dtype=torch.float32)
        cos_h, sin_h = get_1d_rotary_pos_embed(axis_dim, rows, theta=self.theta, use_real=True)
        cos_w, sin_w = get_1d_rotary_pos_embed(axis_dim, cols, theta=self.theta, use_real=True)
        # Token (i, j) of the row-major grid gets [row-i angles | column-j angles].
        cos = torch.cat(
            [cos_h[:, None, :].expand(height, width, axis_dim), cos_w[None, :, :].expand(height, width, axis_dim)],
            dim=-1,
        )
        sin = torch.cat(
            [sin_h[:, None, :].expand(height, width, axis_dim), sin_w[None, :, :].expand(height, width, axis_dim)],
            dim=-1,
        )
        return cos.reshape(height * width, self.head_dim), sin.reshape(height * width, self.head_dim)
