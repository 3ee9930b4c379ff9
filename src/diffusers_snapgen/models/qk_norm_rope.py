"""QK-norm followed by 2D RoPE, as one kernel on CUDA in eager inference (paper §3.1, Fig. 2 (f)).

Each attention of the UNet RMS-normalises its queries and keys per head and then rotates them by the stage's RoPE
tables. Written as PyTorch ops that is a norm, a flip, a multiply and an ``addcmul``: four kernels, each reading and
writing the whole tensor. :func:`rms_norm_rotary` does both in one Triton kernel, one read and one write, when it
can (docs/performance.md has the measurements): a CUDA tensor, no autograd, neither ``torch.compile`` (inductor
fuses the plain ops into one kernel itself) nor ``torch.jit`` tracing, ``nn.RMSNorm`` with a weight, the prepared
``(1, S, 1, D)`` tables of :func:`~diffusers_snapgen.models.embeddings.rotary_tables_for_attention` and a
power-of-two head width. Anything else, and any machine without Triton, takes the plain ops. The kernel computes in
float32 and rounds once; the plain ops round the norm's output to the input dtype before rotating, so the two agree
to that dtype's rounding. :func:`set_fused_qk_norm_rope` switches the kernel off (and on again) for the whole
process.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from .embeddings import apply_rotary_emb_interleaved

#: Rows (one head of one token each) per Triton program.
_BLOCK_ROWS = 32
#: Devices whose tensors take the kernel (the tests add "cpu" to run it under Triton's interpreter).
_KERNEL_DEVICE_TYPES = ("cuda",)
#: Switched by :func:`set_fused_qk_norm_rope`.
_ENABLED = True


def set_fused_qk_norm_rope(enabled: bool) -> bool:
    """Lets CUDA tensors take the fused kernel (``True``, the default) or always the plain ops (``False``), for every
    attention of every model in this process. Returns the previous setting."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__}.")
    previous, _ENABLED = _ENABLED, enabled
    return previous


def rms_norm_rotary(
    x: torch.Tensor, norm: nn.Module | None, rotary: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """``norm(x)`` (skipped when ``None``) then :func:`apply_rotary_emb_interleaved` with ``rotary`` (skipped when
    ``None``), for ``x`` of shape ``(B, S, heads, D)``; fused into one kernel when the module docstring's conditions
    hold."""
    if norm is not None and rotary is not None and _fusable(x, norm, rotary):
        cos, sin = rotary
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return _fused_rms_norm_rotary(x, norm.weight, cos, sin, eps)
    if norm is not None:
        x = norm(x)
    if rotary is not None:
        x = apply_rotary_emb_interleaved(x, rotary)
    return x


def _fusable(x: torch.Tensor, norm: nn.Module, rotary: tuple[torch.Tensor, torch.Tensor]) -> bool:
    if (not _ENABLED or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or x.device.type not in _KERNEL_DEVICE_TYPES or not _triton_available()):
        return False
    cos, sin = rotary
    weight = getattr(norm, "weight", None)
    head_dim = x.shape[-1]
    return (
        type(norm) is nn.RMSNorm
        and weight is not None
        and not norm._forward_hooks
        and not norm._forward_pre_hooks
        and not hasattr(norm, "_diffusers_hook")  # diffusers' hooks (offloading, layerwise casting) wrap forward
        and weight.device == x.device
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.ndim == 4
        and x.stride(-1) == 1
        and 4 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
        and weight.dtype == x.dtype
        and cos.ndim == 4
        and cos.shape == sin.shape == (1, x.shape[1], 1, head_dim)
        and cos.dtype == sin.dtype == x.dtype
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.device == x.device
    )


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused_rms_norm_rotary(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    batch, seq, heads, head_dim = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rows = batch * seq * heads
    if rows == 0:
        return out
    grid = (-(-rows // _BLOCK_ROWS),)
    args = (x, weight, cos, sin, out, rows, heads, seq, x.stride(0), x.stride(1), x.stride(2), eps)
    meta = dict(HEAD_DIM=head_dim, BLOCK_ROWS=_BLOCK_ROWS, num_warps=4)
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device, not on the tensors'
            _kernel()[grid](*args, **meta)
    else:
        _kernel()[grid](*args, **meta)
    return out


@functools.cache
def _kernel():
    """The Triton kernel, built on first use so that importing the package never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rotary_kernel(
        x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, seq, stride_b, stride_s, stride_h, eps,
        HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, HEAD_DIM)
        row_mask = (rows < n_rows)[:, None]
        head = rows % heads
        pos = (rows // heads) % seq
        sample = rows // (heads * seq)
        x_offsets = sample.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_s + head.to(tl.int64) * stride_h
        x = tl.load(x_ptr + x_offsets[:, None] + cols[None, :], mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        y = x * rstd[:, None] * tl.load(weight_ptr + cols).to(tl.float32)[None, :]
        # Interleaved pairs: swapped[2i] = y[2i + 1], swapped[2i + 1] = y[2i]; the sine table carries the sign.
        even, odd = tl.split(tl.reshape(y, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
        swapped = tl.reshape(tl.join(odd, even), (BLOCK_ROWS, HEAD_DIM))
        table_offsets = pos[:, None] * HEAD_DIM + cols[None, :]
        cos = tl.load(cos_ptr + table_offsets, mask=row_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table_offsets, mask=row_mask, other=0.0).to(tl.float32)
        out = y * cos + swapped * sin
        out_offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask)

    return rms_norm_rotary_kernel
