"""2D rotary position embedding of the SnapGen UNet (paper §3.1, Fig. 2 (f)).

The ``(cos, sin)`` tables depend only on the token grid, so they are computed once per grid, device and head size
and kept in a process-wide cache (never in a module's state dict: checkpoints do not change). Under ``torch.compile``
the tables come from an opaque custom op instead, so the compiled graph reads one table per stage rather than
recomputing ``cos``/``sin`` inside every attention kernel, and the graph holds no Python-side cache that could
trigger recompiles or break autograd. See ``docs/performance.md``.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn

# (height, width, head_dim, theta, device) -> (cos, sin) in float32. Entries are never evicted: CUDA graphs captured
# through the custom op below read them by address. A 1024² image needs ~10 MB for its three stages.
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _is_exporting() -> bool:
    """``torch.export`` is tracing. Reads torch's flag itself: before torch 2.13, dynamo folded
    ``torch.compiler.is_exporting()`` to ``True`` under every ``torch.compile``, which sent compiled graphs down the
    export path (tables recomputed in the graph)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return bool(flag)
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # older torch exports through the compiler
    return bool(is_exporting and is_exporting())


def clear_rope_cache() -> None:
    """Drop every cached RoPE table (e.g. after many resolutions). Captured CUDA graphs that read them must be
    discarded first: they hold the tables' addresses."""
    _TABLES.clear()


def rope_2d_tables(
    height: int, width: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the 2D RoPE ``(cos, sin)`` tables, each ``(height * width, head_dim)`` float32, without caching.

    Half of each head's channels rotate with the row index, the other half with the column index; channel pairs
    are interleaved, as :func:`diffusers.models.embeddings.apply_rotary_emb` expects with ``use_real_unbind_dim=-1``.
    """
    axis_dim = head_dim // 2
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    cos_h, sin_h = get_1d_rotary_pos_embed(axis_dim, rows, theta=theta, use_real=True)
    cos_w, sin_w = get_1d_rotary_pos_embed(axis_dim, cols, theta=theta, use_real=True)
    # Token (i, j) of the row-major grid gets [row-i angles | column-j angles].
    cos = torch.cat(
        [cos_h[:, None, :].expand(height, width, axis_dim), cos_w[None, :, :].expand(height, width, axis_dim)], dim=-1
    )
    sin = torch.cat(
        [sin_h[:, None, :].expand(height, width, axis_dim), sin_w[None, :, :].expand(height, width, axis_dim)], dim=-1
    )
    return cos.reshape(height * width, head_dim), sin.reshape(height * width, head_dim)


def _cached_tables(height: int, width: int, head_dim: int, theta: float, device: torch.device):
    key = (int(height), int(width), int(head_dim), float(theta), torch.device(device))
    tables = _TABLES.get(key)
    if tables is None:
        # Plain tensors even under inference_mode, so later autograd (training) may save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            tables = tuple(t.contiguous() for t in rope_2d_tables(*key[:4], device=key[4]))
        _remember(key, tables)
    return tables


def _remember(key: tuple, tables: tuple[torch.Tensor, ...]) -> None:
    """Cache ``tables`` under ``key`` (device at ``key[4]``), except fake/functional tensors of a tracing mode and
    memory of a CUDA graph being captured."""
    capturing = key[4].type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and all(type(t) is torch.Tensor for t in tables):
        _TABLES[key] = tables


def _cached_attention_tables(height: int, width: int, head_dim: int, theta: float, device: torch.device, dtype):
    key = (int(height), int(width), int(head_dim), float(theta), torch.device(device), dtype)
    tables = _TABLES.get(key)
    if tables is None:
        with torch.inference_mode(False), torch.no_grad():
            tables = rotary_tables_for_attention(*_cached_tables(*key[:5]), dtype)
        _remember(key, tables)
    return tables


@torch.library.custom_op("diffusers_snapgen::rope_2d", mutates_args=())
def _rope_2d_op(
    height: int, width: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: a compiled graph owns (and may reuse the memory of) what an op returns.
    cos, sin = _cached_tables(height, width, head_dim, theta, device)
    return cos.clone(), sin.clone()


@_rope_2d_op.register_fake
def _(height, width, head_dim, theta, device):
    shape = (height * width, head_dim)
    return tuple(torch.empty(shape, device=device, dtype=torch.float32) for _ in range(2))


class SnapGenRotaryPosEmbed2D(nn.Module):
    r"""2D rotary position embedding over the token grid of one UNet stage.

    Half of each head's channels rotate with the row index, the other half with the column index
    (paper §3.1: "we adapt RoPE from one dimension to two dimensions"). Positions are integer grid
    indices, so the table is computed for whatever ``(height, width)`` arrives: any resolution and
    aspect ratio works, and larger images extrapolate to positions never seen in training.

    Holds no parameters or buffers: nothing to save, nothing for weight compression to touch. Tables are cached per
    grid and device (see :func:`clear_rope_cache`); under ``torch.compile`` they come from an opaque custom op, and
    under ``torch.export`` they are computed in the graph.

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
        device = torch.get_default_device() if device is None else torch.device(device)
        if torch.compiler.is_compiling():
            if _is_exporting():  # an exported program should not depend on this package's op
                return rope_2d_tables(height, width, self.head_dim, self.theta, device=device)
            return torch.ops.diffusers_snapgen.rope_2d(height, width, self.head_dim, self.theta, device)
        return _cached_tables(height, width, self.head_dim, self.theta, device)

    def attention_tables(
        self, height: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid's tables in the form attention applies them (:func:`rotary_tables_for_attention`), in
        ``dtype``. Cached per grid, device and dtype in eager mode, so a forward pass prepares nothing."""
        device = torch.get_default_device() if device is None else torch.device(device)
        if torch.compiler.is_compiling():
            return rotary_tables_for_attention(*self(height, width, device=device), dtype)
        return _cached_attention_tables(height, width, self.head_dim, self.theta, device, dtype)


def rotary_tables_for_attention(
    cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, D)`` ``(cos, sin)`` tables -> ``(1, S, 1, D)`` tables in ``dtype`` that broadcast over ``(B, S, heads,
    D)``, the sine with the rotation's sign folded in (``-sin`` on even channels, ``+sin`` on odd ones), so
    :func:`apply_rotary_emb_interleaved` needs no negation."""
    signed_sin = torch.stack((-sin[:, 0::2], sin[:, 1::2]), dim=-1).flatten(-2)
    return cos.to(dtype)[None, :, None, :], signed_sin.to(dtype)[None, :, None, :]


def apply_rotary_emb_interleaved(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, heads, D)`` by 2D RoPE tables in the interleaved-pair layout.

    ``freqs`` is either ``(cos, sin)``, each ``(S, D)`` (:func:`rope_2d_tables`, diffusers' layout), or the
    prepared ``(1, S, 1, D)`` tables of :func:`rotary_tables_for_attention` (what the UNet passes: nothing is
    prepared per call). Same result as ``diffusers.models.embeddings.apply_rotary_emb(x, freqs, sequence_dim=1)``
    computed in ``x``'s dtype, in three kernels: ``x * cos + swap_pairs(x) * signed_sin`` as a flip and an
    ``addcmul``.
    """
    cos, sin = freqs
    if cos.ndim == 2:
        cos, sin = rotary_tables_for_attention(cos, sin, x.dtype)
    elif cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)
