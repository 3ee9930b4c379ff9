"""Attention of the SnapGen UNet: multi-query attention with RMSNorm QK-norm and 2D RoPE (paper §3.1, Fig. 2 (e)-(f))."""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from .qk_norm_rope import rms_norm_rotary


class SnapGenAttnProcessor:
    r"""Computes :class:`SnapGenAttention` through ``dispatch_attention_fn``, so ``set_attention_backend`` applies.

    Order (paper Fig. 2 (f)): project, RMSNorm on Q and K, RoPE on Q (self- and cross-attention) and on K
    (self-attention only: text tokens have no 2D position), attention, output projection. After
    ``fuse_qkv_projections()`` the projections are one ``to_qkv`` (self-attention) or ``to_q`` + ``to_kv``
    (cross-attention) matmul. A cross-attention takes its keys and values from ``context_kv`` when given (computed
    once per prompt by :meth:`SnapGenAttention.project_context`), else projects ``encoder_hidden_states``.

    With one K/V head (multi-query attention) the query heads are folded into the query sequence,
    ``(B, S, heads, D) -> (B, S * heads, 1, D)``: single-head attention against the one K/V head, the same maths
    with nothing repeated, for every backend, and the output needs no transpose copy. With ``1 < kv_heads < heads``
    the K/V heads are repeated to match the query heads.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "SnapGenAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.is_cross_attention:
            query = attn.to_q(hidden_states)
            key, value = context_kv if context_kv is not None else attn.project_context(encoder_hidden_states)
        else:
            kv_dim = attn.kv_heads * attn.head_dim
            if attn.fused_projections:
                query, key, value = attn.to_qkv(hidden_states).split([attn.inner_dim, kv_dim, kv_dim], dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            key, value = attn.split_kv_heads(key, value, image_rotary_emb)
        query = rms_norm_rotary(query.unflatten(-1, (attn.heads, attn.head_dim)), attn.norm_q, image_rotary_emb)

        batch, seq = query.shape[:2]
        fold_heads = attn.kv_heads == 1 and attn.heads > 1 and self._parallel_config is None
        if fold_heads:
            query = query.reshape(batch, seq * attn.heads, 1, attn.head_dim)
        elif attn.kv_heads != attn.heads:
            groups = attn.heads // attn.kv_heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.reshape(batch, seq, attn.inner_dim)
        if hidden_states.dtype != query.dtype:
            hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        dropout = attn.to_out[1]
        if dropout.training:  # inference skips the no-op call
            hidden_states = dropout(hidden_states)
        return hidden_states


class SnapGenAttention(nn.Module, AttentionModuleMixin):
    r"""Self- or cross-attention with ``kv_heads`` shared key/value heads.

    Args:
        query_dim: channels of the image tokens.
        cross_attention_dim: channels of the context tokens; ``None`` for self-attention.
        heads: number of query heads.
        dim_head: channels per head.
        kv_heads: number of key/value heads; ``1`` is multi-query attention (paper §3.1, "Replace MHSA with MQA"),
            ``None`` means one per query head (multi-head attention).
        qk_norm: ``"rms_norm"`` to normalise Q and K per head after projection (paper §3.1), or ``None``.
    """

    _default_processor_cls = SnapGenAttnProcessor
    _available_processors = [SnapGenAttnProcessor]
    # Set by SnapGenUNet2DModel on its cross-attentions: this one's entry in ``cross_attention_kv``.
    cross_attention_index: int | None = None

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        qk_norm: str | None = "rms_norm",
        eps: float = 1e-6,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        processor: SnapGenAttnProcessor | None = None,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads != 0:
            raise ValueError(f"`kv_heads` ({kv_heads}) must be >= 1 and divide `heads` ({heads}).")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"`qk_norm` must be None or 'rms_norm', got {qk_norm!r}.")
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim_head
        self.inner_dim = heads * dim_head
        self.use_bias = bias  # read by diffusers' fuse_projections
        self.is_cross_attention = cross_attention_dim is not None
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim

        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        self.to_v = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        # torch's RMSNorm: a fused kernel where the backend has one (fewer launches than a hand-written norm).
        self.norm_q = nn.RMSNorm(dim_head, eps=eps) if qk_norm == "rms_norm" else None
        self.norm_k = nn.RMSNorm(dim_head, eps=eps) if qk_norm == "rms_norm" else None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    @torch.no_grad()
    def fuse_projections(self):
        """Copies ``to_q``/``to_k``/``to_v`` into one ``to_qkv`` (self-attention) or ``to_kv`` (cross-attention)
        matmul, for inference (``model.fuse_qkv_projections()`` calls this; ``unfuse_qkv_projections()`` undoes it).

        The fused copy does not follow later changes of the separate weights, so LoRA adapters must be merged
        (``fuse_lora()``) before fusing: unmerged ones are refused rather than silently left out.
        """
        for name in ("to_q", "to_k", "to_v"):
            layer = getattr(self, name)
            active_lora = hasattr(layer, "base_layer") and layer.active_adapters and not layer.disable_adapters
            if active_lora and not layer.merged:
                raise ValueError(
                    f"`fuse_qkv_projections()` would leave out the unmerged LoRA adapter on `{name}`: call "
                    "`fuse_lora()` first (or `unload_lora()` / `disable_adapters()` to drop it)."
                )
        super().fuse_projections()

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (QK-normed) and values of this cross-attention for ``context`` tokens, ``(B, L, kv_heads, dim_head)``
        each. They depend on the text alone, so a sampler computes them once per prompt and passes them to every
        step (``SnapGenUNet2DModel.precompute_cross_attention_kv``)."""
        if self.fused_projections:
            key, value = self.to_kv(context).split(self.kv_heads * self.head_dim, dim=-1)
        else:
            key, value = self.to_k(context), self.to_v(context)
        return self.split_kv_heads(key, value)

    def split_kv_heads(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values ``(B, L, kv_heads * dim_head)`` as ``(B, L, kv_heads, dim_head)``, the keys
        RMS-normed (QK-norm) when the attention has ``norm_k``, then rotated by ``image_rotary_emb`` when given
        (self-attention: image tokens have 2D positions)."""
        key = key.unflatten(-1, (self.kv_heads, self.head_dim))
        value = value.unflatten(-1, (self.kv_heads, self.head_dim))
        return rms_norm_rotary(key, self.norm_k, image_rotary_emb), value

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # ``context_kv`` only when given, so processors written for the older signature keep working.
        extra = {} if context_kv is None else {"context_kv": context_kv}
        return self.processor(
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
            **extra,
        )
