"""The UNet under torch.compile: full graphs forward and backward, regional compilation once per block shape, and
RoPE tables computed once per latent size (eager cache, opaque op when compiled, nothing in the state dict)."""

import torch
from torch._dynamo.utils import counters

from diffusers_snapgen.models import embeddings
from diffusers_snapgen.models.embeddings import SnapGenRotaryPosEmbed2D, rope_2d_tables
from diffusers_snapgen.testing import tiny_unet


def _small_unet(**overrides):
    """Two stages (cross-attention only, then self + cross): every attention kind, half the graph of tiny_unet."""
    config = dict(block_out_channels=(16, 32), transformer_layers_per_block=(1, 1),
                  only_cross_attention=(True, False))
    return tiny_unet(**{**config, **overrides})


def _inputs(unet, batch=2, height=8, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    return dict(
        sample=torch.randn(batch, config.in_channels, height, width, generator=generator),
        timestep=torch.linspace(100.0, 900.0, batch),
        encoder_hidden_states=torch.randn(batch, 5, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=generator),
    )


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_rope_tables_are_cached_per_grid_and_never_saved(monkeypatch):
    calls = []
    real = embeddings.rope_2d_tables
    monkeypatch.setattr(embeddings, "rope_2d_tables", lambda *a, **k: calls.append(a[:2]) or real(*a, **k))
    embeddings.clear_rope_cache()
    unet = tiny_unet()
    with torch.no_grad():
        unet(**_inputs(unet, height=8, width=12))
        unet(**_inputs(unet, height=8, width=12, seed=1))
        unet(**_inputs(unet, height=12, width=8))
    # One table per stage grid and size; the second call at 8x12 computed nothing.
    assert calls == [(8, 12), (4, 6), (2, 3), (12, 8), (6, 4), (3, 2)]
    assert not any("pos_embed" in key or "rope" in key for key in unet.state_dict())
    cos, sin = SnapGenRotaryPosEmbed2D(8)(4, 6)
    expected = rope_2d_tables(4, 6, 8, 10000.0)
    torch.testing.assert_close(cos, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, expected[1], rtol=0, atol=0)
    # The attention form is prepared once per grid and dtype too: a forward pass reuses the same tensors.
    pos_embed = SnapGenRotaryPosEmbed2D(8)
    prepared = pos_embed.attention_tables(4, 6, dtype=torch.bfloat16)
    assert all(a is b for a, b in zip(prepared, pos_embed.attention_tables(4, 6, dtype=torch.bfloat16)))
    assert prepared[0].dtype == torch.bfloat16 and pos_embed.attention_tables(4, 6)[0].dtype == torch.float32
    assert len(calls) == 6  # built from the cached (S, D) tables, nothing recomputed


def test_tables_cached_under_inference_mode_serve_training():
    embeddings.clear_rope_cache()
    unet = _small_unet()
    with torch.inference_mode():
        unet(**_inputs(unet))  # fills the cache inside inference mode
    unet(**_inputs(unet)).sample.square().mean().backward()
    assert unet.conv_in.pointwise.weight.grad is not None


def test_fullgraph_compile_forward_and_backward_match_eager_without_recompiling():
    torch._dynamo.reset()
    unet = _small_unet()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    inputs = _inputs(unet)
    out = compiled(**inputs).sample
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
    unet.zero_grad()
    reference = unet(**inputs).sample
    reference.square().mean().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for name, p in unet.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(**_inputs(unet, seed=1)).sample.sum().backward()


def test_fused_qkv_projections_and_precomputed_text_kv_compile_in_full_graphs():
    torch._dynamo.reset()
    unet = _small_unet().eval()
    inputs = _inputs(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
        unet.fuse_qkv_projections()
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(**inputs).sample, reference, rtol=1e-5, atol=1e-5)
        cross_attention_kv = unet.precompute_cross_attention_kv(inputs["encoder_hidden_states"])
        torch.testing.assert_close(compiled(**inputs, cross_attention_kv=cross_attention_kv).sample, reference,
                                   rtol=1e-5, atol=1e-5)


def test_export_keeps_the_rope_tables_in_the_graph():
    """torch.export gives a self-contained program: the tables are computed in it, not by this package's op."""
    module = torch.nn.Module()
    module.pos_embed = SnapGenRotaryPosEmbed2D(8)
    module.forward = lambda x: x * module.pos_embed(4, 6, device=x.device)[0]
    program = torch.export.export(module, (torch.ones(24, 8),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("rope_2d" in target for target in targets) and any("cos" in target for target in targets)


def test_regional_compilation_compiles_once_per_block_shape():
    """Three stages give three block shapes: three graphs, within diffusers' recompile limit of that many."""
    torch._dynamo.reset()
    unet = tiny_unet()
    unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    before = _graphs()
    with torch._dynamo.config.patch(recompile_limit=3), torch.no_grad():
        first = unet(**_inputs(unet)).sample
        second = unet(**_inputs(unet)).sample
    assert _graphs() - before == 3
    torch.testing.assert_close(first, second)
    # Precomputed text keys and values (what the fast sampler passes) are new block inputs: one more graph per stage
    # (three), not one per block.
    inputs = _inputs(unet)
    with torch._dynamo.config.patch(recompile_limit=6), torch.no_grad():
        cross_attention_kv = unet.precompute_cross_attention_kv(inputs["encoder_hidden_states"])
        cached = unet(**inputs, cross_attention_kv=cross_attention_kv).sample
    assert _graphs() - before == 6
    torch.testing.assert_close(cached, first)



def test_compiled_graph_reads_rope_tables_through_the_cached_table_op():
    """Compiled (not exported), each stage's RoPE table comes from the cached-table op, not recomputed in the graph.
    torch < 2.13 folds ``torch.compiler.is_exporting()`` to True under ``torch.compile``; this test fails there
    unless the model reads torch's export flag itself."""
    unet = _small_unet()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(unet, fullgraph=True, backend=backend)(**_inputs(unet))
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("rope_2d" in t for t in targets) == 2  # one table per stage grid
    assert not any(t.endswith(".cos") or "cos.default" in t for t in targets)
