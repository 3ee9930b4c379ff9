"""The fused QK-norm + RoPE kernel (``models/qk_norm_rope.py``) against the plain ops it replaces."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from diffusers_snapgen.models import qk_norm_rope
from diffusers_snapgen.models.embeddings import (
    apply_rotary_emb_interleaved,
    rope_2d_tables,
    rotary_tables_for_attention,
)


def _inputs(dtype=torch.float32, heads=3, head_dim=16, grid=(3, 4)):
    generator = torch.Generator().manual_seed(0)
    tables = rotary_tables_for_attention(*rope_2d_tables(*grid, head_dim, 10000.0), dtype)
    norm = nn.RMSNorm(head_dim, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
    qkv = torch.randn(2, grid[0] * grid[1], (heads + 2) * head_dim, generator=generator).to(dtype)
    return qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim)), norm, tables


@pytest.fixture
def kernel_calls(monkeypatch):
    """Lets CPU tensors take the fused path and records its calls instead of launching a kernel."""
    calls = []

    def fake_kernel(x, weight, cos, sin, eps):
        calls.append(eps)
        return apply_rotary_emb_interleaved(nn.functional.rms_norm(x, x.shape[-1:], weight, eps), (cos, sin))

    monkeypatch.setattr(qk_norm_rope, "_KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(qk_norm_rope, "_ENABLED", True)  # restored after the test, whatever it switched
    monkeypatch.setattr(qk_norm_rope, "_triton_available", lambda: True)
    monkeypatch.setattr(qk_norm_rope, "_fused_rms_norm_rotary", fake_kernel)
    return calls


def test_plain_ops_are_norm_then_rotation():
    x, norm, tables = _inputs()
    with torch.no_grad():
        out = qk_norm_rope.rms_norm_rotary(x, norm, tables)
        torch.testing.assert_close(out, apply_rotary_emb_interleaved(norm(x), tables), rtol=0, atol=0)
        rotated = apply_rotary_emb_interleaved(x, tables)
        torch.testing.assert_close(qk_norm_rope.rms_norm_rotary(x, None, tables), rotated)
        torch.testing.assert_close(qk_norm_rope.rms_norm_rotary(x, norm, None), norm(x))
        assert qk_norm_rope.rms_norm_rotary(x, None, None) is x


def test_fused_path_only_where_it_applies(kernel_calls):
    x, norm, tables = _inputs()
    with torch.no_grad():
        qk_norm_rope.rms_norm_rotary(x, norm, tables)
    assert kernel_calls == [1e-6]

    cases = {
        "autograd": lambda: qk_norm_rope.rms_norm_rotary(x, norm, tables),  # weight requires grad
        "plain (S, D) tables": lambda: qk_norm_rope.rms_norm_rotary(x, norm, rope_2d_tables(3, 4, 16, 10000.0)),
        "tables in another dtype": lambda: qk_norm_rope.rms_norm_rotary(x, norm, tuple(t.double() for t in tables)),
        "head width not a power of two": lambda: qk_norm_rope.rms_norm_rotary(*_inputs(head_dim=12)),
        "no rotation": lambda: qk_norm_rope.rms_norm_rotary(x, norm, None),
    }
    for name, call in cases.items():
        call()
        assert len(kernel_calls) == 1, name
    with torch.no_grad():
        handle = norm.register_forward_hook(lambda *args: None)
        qk_norm_rope.rms_norm_rotary(x, norm, tables)
        handle.remove()
        assert len(kernel_calls) == 1, "a hooked norm must run as a module"
        from diffusers.hooks import HookRegistry, ModelHook

        registry = HookRegistry.check_if_exists_or_initialize(norm)  # as group offloading / layerwise casting do
        registry.register_hook(ModelHook(), "noop")
        qk_norm_rope.rms_norm_rotary(x, norm, tables)
        assert len(kernel_calls) == 1, "a norm with diffusers hooks must run as a module"
        registry.remove_hook("noop")
        del norm._diffusers_hook
        compiled = torch.compile(qk_norm_rope.rms_norm_rotary, fullgraph=True, backend="eager")
        compiled(x, norm, tables)
        assert len(kernel_calls) == 1, "under torch.compile inductor fuses the plain ops itself"
        assert qk_norm_rope.set_fused_qk_norm_rope(False) is True
        qk_norm_rope.rms_norm_rotary(x, norm, tables)
        assert len(kernel_calls) == 1, "switched off"
        assert qk_norm_rope.set_fused_qk_norm_rope(True) is False
        qk_norm_rope.rms_norm_rotary(x, norm, tables)
        assert len(kernel_calls) == 2
    with pytest.raises(TypeError, match="enabled"):
        qk_norm_rope.set_fused_qk_norm_rope("no")


def test_attention_uses_the_fused_path_for_queries_and_rotated_keys(kernel_calls):
    """Self-attention fuses its queries and keys, cross-attention its queries; text keys are only normed."""
    from diffusers_snapgen.models.attention import SnapGenAttention

    tables = rotary_tables_for_attention(*rope_2d_tables(2, 4, 8, 10000.0), torch.float32)
    hidden = torch.randn(1, 8, 32)
    with torch.no_grad():
        SnapGenAttention(32, heads=4, dim_head=8, kv_heads=1).eval()(hidden, image_rotary_emb=tables)
        assert len(kernel_calls) == 2
        cross = SnapGenAttention(32, cross_attention_dim=16, heads=4, dim_head=8, kv_heads=1).eval()
        cross(hidden, encoder_hidden_states=torch.randn(1, 5, 16), image_rotary_emb=tables)
        assert len(kernel_calls) == 3


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import test_qk_norm_rope as t
    from diffusers_snapgen.models import qk_norm_rope
    from diffusers_snapgen.testing import tiny_unet

    result = {{}}
    for name, dtype, heads, grid in [("fp32", torch.float32, 3, (3, 4)), ("fp32_ragged", torch.float32, 5, (7, 5)),
                                     ("bf16", torch.bfloat16, 3, (3, 4))]:
        x, norm, tables = t._inputs(dtype, heads=heads, grid=grid)
        with torch.no_grad():
            fused = qk_norm_rope._fused_rms_norm_rotary(x, norm.weight, *tables, norm.eps)
            plain = qk_norm_rope.rms_norm_rotary(x, norm, tables)
        result[name] = dict(contiguous=fused.is_contiguous(), shape=list(fused.shape), dtype=str(fused.dtype),
                            vs_plain=(fused.float() - plain.float()).abs().max().item())

    unet = tiny_unet()
    inputs = dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, unet.config.joint_attention_dim),
                  pooled_projections=torch.randn(1, unet.config.pooled_projection_dim))
    calls, kernel = [], qk_norm_rope._fused_rms_norm_rotary
    qk_norm_rope._fused_rms_norm_rotary = lambda *args: calls.append(1) or kernel(*args)
    with torch.no_grad():
        plain = unet(**inputs).sample
        qk_norm_rope._KERNEL_DEVICE_TYPES = ("cpu",)
        fused = unet(**inputs).sample
        unet.fuse_qkv_projections()
        fused_qkv = unet(**inputs).sample
    attentions = [m for m in unet.modules() if hasattr(m, "is_cross_attention")]
    result["unet"] = dict(calls=len(calls), expected=2 * sum(1 + (not m.is_cross_attention) for m in attentions),
                          vs_plain=(fused - plain).abs().max().item(),
                          fused_qkv_vs_plain=(fused_qkv - plain).abs().max().item(),
                          scale=plain.abs().max().item())
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package (CPU interpreter)")
def test_triton_kernel_matches_plain_ops_under_the_interpreter():
    """Runs the real Triton kernel on the CPU through ``TRITON_INTERPRET=1`` (a fresh process: the flag is read
    when the kernel is built): strided inputs, a row count that leaves the last program partly masked, bf16, and a
    whole tiny UNet with separate and fused projections."""
    script = _INTERPRETER_SCRIPT.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("fp32", "fp32_ragged"):
        assert result[name]["contiguous"] and result[name]["dtype"] == "torch.float32"
        assert result[name]["vs_plain"] < 1e-5, result
    assert result["fp32_ragged"]["shape"] == [2, 35, 5, 16]
    bf16 = result["bf16"]
    # The interpreter converts to bf16 its own way, so only agreement to bf16 rounding is checked here (the CUDA
    # test checks that the kernel's one rounding is at least as close to float64 as the plain ops' two).
    assert bf16["dtype"] == "torch.bfloat16" and bf16["vs_plain"] < 0.05, bf16
    unet = result["unet"]
    assert unet["calls"] == unet["expected"] > 0, unet  # every query and every rotated key, in both forwards
    assert unet["vs_plain"] < 1e-4 * max(1.0, unet["scale"]), unet
    assert unet["fused_qkv_vs_plain"] < 1e-4 * max(1.0, unet["scale"]), unet


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_cuda_kernel_matches_plain_ops_in_bf16():
    x, norm, tables = _inputs(torch.bfloat16, heads=14, head_dim=64, grid=(32, 32))
    x, norm, tables = x.cuda(), norm.cuda(), tuple(t.cuda() for t in tables)
    with torch.no_grad():
        fused = qk_norm_rope.rms_norm_rotary(x, norm, tables)
        exact = qk_norm_rope.rms_norm_rotary(x.double(), norm.double(), tuple(t.double() for t in tables))
        assert qk_norm_rope.set_fused_qk_norm_rope(False) is True
        try:
            plain = qk_norm_rope.rms_norm_rotary(x, norm, tables)
        finally:
            qk_norm_rope.set_fused_qk_norm_rope(True)
    assert fused.is_contiguous() and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
    # One rounding instead of two: on average at least as close to float64 as the plain bf16 ops.
    assert (fused.double() - exact).abs().mean() <= (plain.double() - exact).abs().mean()
