"""Transformer blocks of the SnapGen UNet (paper §3.1, Fig. 2 (b), (d)-(f))."""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from .attention import SnapGenAttention


class SnapGenTransformerBlock(nn.Module):
    r"""``[LN -> self-attn] -> LN -> cross-attn -> LN -> GEGLU FFN``, each with a residual.

    Self-attention exists only where ``only_cross_attention=False`` (paper §3.1: kept in the lowest-resolution stage
    and the mid block). ``ff_mult=3`` is the trimmed FFN (paper §3.1, "Trim FFN Layers"; the gate doubles the hidden
    width to ``2 * 3 * dim``).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        kv_heads: int | None = 1,
        only_cross_attention: bool = False,
        qk_norm: str | None = "rms_norm",
        ff_mult: float = 3,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        attention_kwargs = dict(
            heads=num_attention_heads, dim_head=attention_head_dim, kv_heads=kv_heads, qk_norm=qk_norm
        )
        if only_cross_attention:
            self.norm1 = None
            self.attn1 = None
        else:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn1 = SnapGenAttention(dim, dropout=dropout, **attention_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = SnapGenAttention(dim, cross_attention_dim=cross_attention_dim, dropout=dropout, **attention_kwargs)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout, activation_fn="geglu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.attn1 is not None:
            hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), image_rotary_emb=image_rotary_emb)
        hidden_states = hidden_states + self.attn2(
            self.norm2(hidden_states),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            image_rotary_emb=image_rotary_emb,
            context_kv=context_kv,
        )
        return hidden_states + self.ff(self.norm3(hidden_states))


class SnapGenSpatialTransformer(nn.Module):
    r"""``GN -> proj_in -> N x SnapGenTransformerBlock -> proj_out``, added to the input feature map.

    Flattens the ``(B, C, H, W)`` map to ``H * W`` tokens (linear projections, as SDXL's ``use_linear_projection``).
    ``rotary_embs`` maps ``(H, W)`` to that grid's 2D RoPE table; the UNet builds one per stage resolution and
    forward pass, so the table is not rebuilt in every transformer. ``cross_attention_kv``, when given, holds the
    precomputed text keys and values of every cross-attention of the UNet; each block reads its own entry.
    """

    def __init__(
        self,
        channels: int,
        num_layers: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        kv_heads: int | None = 1,
        only_cross_attention: bool = False,
        qk_norm: str | None = "rms_norm",
        ff_mult: float = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        if channels % attention_head_dim != 0:
            raise ValueError(
                f"Stage channels ({channels}) must be a multiple of `attention_head_dim` ({attention_head_dim})."
            )
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            SnapGenTransformerBlock(
                channels,
                num_attention_heads=channels // attention_head_dim,
                attention_head_dim=attention_head_dim,
                cross_attention_dim=cross_attention_dim,
                kv_heads=kv_heads,
                only_cross_attention=only_cross_attention,
                qk_norm=qk_norm,
                ff_mult=ff_mult,
                dropout=dropout,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        rotary_embs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
        cross_attention_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        hidden_states = self.proj_in(hidden_states)
        rotary_emb = rotary_embs[(int(height), int(width))] if rotary_embs is not None else None

        for block in self.transformer_blocks:
            # Selected here, not in the block: regionally compiled blocks share one graph per shape.
            context_kv = None if cross_attention_kv is None else cross_attention_kv[block.attn2.cross_attention_index]
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, encoder_attention_mask, rotary_emb, context_kv
                )
            else:
                hidden_states = block(
                    hidden_states, encoder_hidden_states, encoder_attention_mask, rotary_emb, context_kv
                )

        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return hidden_states + residual
