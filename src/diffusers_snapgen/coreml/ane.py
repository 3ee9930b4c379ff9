"""Neural-Engine-friendly PyTorch forms of the SnapGen components, built for Core ML conversion.

The forms are re-implemented forwards over the *same* weights (copies; the source model is never modified), so
that coremltools emits a graph the Apple Neural Engine (ANE) runs well, following the practices of Apple's
``ml-stable-diffusion`` (fixed shapes, no dynamic ops, fp16-safe normalisations):

* attention (paper §3.1, Fig. 2 (e)-(f)): the query heads are folded into the sequence dimension, so the single
  shared K/V head of multi-query attention broadcasts without a ``tile``; ``F.scaled_dot_product_attention`` is
  called *without* an explicit ``scale`` (any non-default softmax scale is folded into the query), which is what
  makes coremltools emit the fused iOS18 ``scaled_dot_product_attention`` op;
* RMSNorm on Q/K is hand-written and fp16 safe (divides by the row max before squaring) instead of the ``rms_norm``
  op, whose conversion inflates ``eps`` (coremltools issue 2821);
* 2D RoPE uses the half-split ("rotate half") layout: head channels of Q and K are permuted once in the weights,
  which leaves every dot product unchanged and avoids rank-5 reshapes; the tables are constants of the traced graph.

Wrappers give each component the positional I/O of its Core ML package (Apple's names: ``sample``, ``timestep``,
``encoder_hidden_states`` -> ``noise_pred``; ``z`` -> ``image``; ``input_ids`` -> ``hidden_embeds``, ``pooled_outputs``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.embeddings import rotary_tables_for_attention

__all__ = [
    "FP16SafeRMSNorm",
    "ANESnapGenAttention",
    "ANERotaryPosEmbed",
    "to_ane_unet",
    "UNetCoreMLWrapper",
    "DecoderCoreMLWrapper",
    "TextEncoderCoreMLWrapper",
]


class FP16SafeRMSNorm(nn.Module):
    r"""RMSNorm over the last dimension that never squares a large fp16 value.

    ``y = x / m`` with ``m = max|x|`` (clamped to ``min_scale``) keeps ``y**2 <= 1``; then
    ``x / sqrt(mean(x**2) + eps) == y / sqrt(mean(y**2) + eps / m**2)`` exactly, so the result equals diffusers'
    ``RMSNorm`` in fp32 while staying inside fp16 range on the ANE.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weight: torch.Tensor | None = None, min_scale: float = 1e-4):
        super().__init__()
        self.eps = float(eps)
        self.min_scale = float(min_scale)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.dim = dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # upper bound = fp16 max: a one-sided clamp would put float32 max (inf in fp16) in the graph
        scale = hidden_states.abs().amax(dim=-1, keepdim=True).clamp(min=self.min_scale, max=65504.0)
        scaled = hidden_states / scale
        variance = (scaled * scaled).mean(dim=-1, keepdim=True) + self.eps / (scale * scale)
        hidden_states = scaled * torch.rsqrt(variance)
        if self.weight is not None:
            hidden_states = hidden_states * self.weight
        return hidden_states


def _half_split_permutation(head_dim: int) -> torch.Tensor:
    """Channel order that turns interleaved RoPE pairs ``(x0, x1), (x2, x3)...`` into ``[x0 x2 ... | x1 x3 ...]``."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_head_rows(linear: nn.Linear, heads: int, head_dim: int, perm: torch.Tensor, factor: float = 1.0):
    """A copy of ``linear`` whose output channels are permuted within each head (and optionally scaled)."""
    out = copy.deepcopy(linear)
    index = (torch.arange(heads)[:, None] * head_dim + perm[None, :]).reshape(-1)
    with torch.no_grad():
        out.weight.copy_(linear.weight[index] * factor)
        if linear.bias is not None:
            out.bias.copy_(linear.bias[index] * factor)
    return out


class ANESnapGenAttention(nn.Module):
    r"""ANE form of :class:`~diffusers_snapgen.models.attention.SnapGenAttention` (same maths, same weights).

    Layout: ``q (B, 1, heads * S, D)`` against ``k, v (B, 1, S_kv, D)`` when there is one K/V head (multi-query
    attention): the query heads become extra query rows, so nothing is tiled. With ``kv_heads > 1`` the query
    heads are grouped per K/V head: ``q (B, kv_heads, groups * S, D)``. No attention mask (the Core ML UNet
    attends to every text token, as SD3's CLIP path does).
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.groups = self.heads // self.kv_heads
        perm = _half_split_permutation(self.head_dim)
        self.register_buffer("_perm", perm, persistent=False)
        # Softmax scale: fused SDPA always uses 1/sqrt(D); fold any other scale into q.
        scale = getattr(attn, "scale", None)
        q_factor = 1.0 if scale is None else float(scale) * math.sqrt(self.head_dim)
        norm_q, norm_k = attn.norm_q, attn.norm_k
        self.to_q = _permute_head_rows(attn.to_q, self.heads, self.head_dim, perm, q_factor if norm_q is None else 1.0)
        self.to_k = _permute_head_rows(attn.to_k, self.kv_heads, self.head_dim, perm)
        self.to_v = copy.deepcopy(attn.to_v)
        self.norm_q = self._ane_norm(norm_q, perm, q_factor)
        self.norm_k = self._ane_norm(norm_k, perm, 1.0)
        self.to_out = copy.deepcopy(attn.to_out)

    def _ane_norm(self, norm: nn.Module | None, perm: torch.Tensor, factor: float) -> FP16SafeRMSNorm | None:
        if norm is None:
            return None
        weight = getattr(norm, "weight", None)
        if weight is None:
            weight = torch.ones(self.head_dim)
            if factor == 1.0:
                return FP16SafeRMSNorm(self.head_dim, eps=norm.eps)
        return FP16SafeRMSNorm(self.head_dim, eps=norm.eps, weight=weight.detach()[perm] * factor)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2  # channels in half-split order: the sign sits in the table's first half
        return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                context_kv=None):
        if context_kv is not None:
            raise ValueError("The Core ML attention projects the text itself: pass no `cross_attention_kv`.")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        batch, seq, _ = hidden_states.shape
        kv_seq = context.shape[1]
        query = self.to_q(hidden_states).reshape(batch, seq, self.heads, self.head_dim)
        key = self.to_k(context).reshape(batch, kv_seq, self.kv_heads, self.head_dim)
        value = self.to_v(context).reshape(batch, kv_seq, self.kv_heads, self.head_dim)
        if self.norm_q is not None:
            query = self.norm_q(query)
        if self.norm_k is not None:
            key = self.norm_k(key)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # the UNet's prepared (1, S, 1, D) tables, interleaved layout
            cos, sin = (t.to(query.dtype)[..., self._perm] for t in (cos, sin))
            query = self._rope(query, cos, sin)
            if not is_cross:
                key = self._rope(key, cos, sin)
        # (B, S, H, D) -> (B, kv_heads, groups * S, D): query heads folded into the sequence dim.
        query = query.permute(0, 2, 1, 3).reshape(batch, self.kv_heads, self.groups * seq, self.head_dim)
        key = key.permute(0, 2, 1, 3)
        value = value.permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.reshape(batch, self.heads, seq, self.head_dim).permute(0, 2, 1, 3)
        out = out.reshape(batch, seq, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class ANERotaryPosEmbed(nn.Module):
    """Caches the 2D RoPE ``(cos, sin)`` tables per ``(height, width)`` as plain tensors.

    After one eager forward, tracing sees the tables as constants (no ``range``/``outer`` ops with int dtypes in
    the graph); they are not parameters, so weight palettization never touches them.
    """

    def __init__(self, pos_embed: nn.Module):
        super().__init__()
        self.pos_embed = pos_embed
        self._tables: dict = {}

    def forward(self, height: int, width: int, device=None):
        key = (int(height), int(width))
        if key not in self._tables:
            with torch.no_grad():
                self._tables[key] = tuple(t.detach().float() for t in self.pos_embed(*key, device=device))
        return self._tables[key]

    def attention_tables(self, height: int, width: int, device=None, dtype=torch.float32):
        """The cached tables in the form :class:`ANESnapGenAttention` applies them (constants once traced)."""
        return rotary_tables_for_attention(*self(height, width, device=device), dtype)


def to_ane_unet(unet: nn.Module) -> nn.Module:
    """A deep copy of a :class:`SnapGenUNet2DModel` in eval mode with every attention in its ANE form.

    The argument is left untouched; a UNet without transformer blocks is returned as a plain copy.
    """
    from ..models.attention import SnapGenAttention
    from ..models.embeddings import SnapGenRotaryPosEmbed2D

    if not isinstance(unet, nn.Module):
        raise TypeError(f"`unet` must be a torch.nn.Module (a SnapGenUNet2DModel), got {type(unet).__name__}.")
    ane = copy.deepcopy(unet).float().eval()
    for module in list(ane.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SnapGenAttention):
                setattr(module, child_name, ANESnapGenAttention(child))
            elif isinstance(child, SnapGenRotaryPosEmbed2D):
                setattr(module, child_name, ANERotaryPosEmbed(child))
    return ane


class UNetCoreMLWrapper(nn.Module):
    """Positional I/O for the Core ML UNet: ``(sample, timestep, encoder_hidden_states, pooled_projections)``
    -> ``noise_pred`` (Apple's output name; for SnapGen it is the flow-matching velocity ``noise - x0``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.unet(
            sample, timestep, encoder_hidden_states, pooled_projections=pooled_projections, return_dict=False
        )[0]


class DecoderCoreMLWrapper(nn.Module):
    """``z`` (already unscaled: ``latents / scaling_factor + shift_factor``) -> ``image`` in [-1, 1]."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        out = self.decoder.decode(z, return_dict=False) if hasattr(self.decoder, "decode") else self.decoder(z)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


class TextEncoderCoreMLWrapper(nn.Module):
    """A text encoder with the fixed I/O its pipeline uses (Apple's SDXL export names the outputs the same way).

    ``mode="clip"``: ``input_ids`` -> ``hidden_embeds`` (hidden state ``hidden_state_index``; SD3 uses the
    penultimate, -2) and ``pooled_outputs`` (``text_embeds`` of ``CLIPTextModelWithProjection``).
    ``mode="t5"``: ``input_ids`` -> ``hidden_embeds`` (last hidden state).
    ``mode="generic"``: ``input_ids``, ``attention_mask`` -> ``hidden_embeds`` (last hidden state) and
    ``pooled_outputs`` (attention-mask mean of the tokens), as :class:`SnapGenPipeline` encodes a generic encoder.
    """

    MODES = ("clip", "t5", "generic")

    def __init__(self, encoder: nn.Module, mode: str = "clip", hidden_state_index: int = -2):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"`mode` must be one of {self.MODES}, got {mode!r}.")
        self.encoder = encoder
        self.mode = mode
        self.hidden_state_index = int(hidden_state_index)

    def forward(self, input_ids, attention_mask=None):
        input_ids = input_ids.long()
        if self.mode == "clip":
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
            return out.hidden_states[self.hidden_state_index], out[0]
        if self.mode == "t5":
            return self.encoder(input_ids, return_dict=True).last_hidden_state
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long(), return_dict=True)
        hidden = out.last_hidden_state
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return hidden, (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
