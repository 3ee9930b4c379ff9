"""Neural-Engine form of the UNet, fp16-safe RMSNorm, PSNR, argument checks and atomic output (no conversion)."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from diffusers_snapgen.coreml.ane import ANESnapGenAttention, FP16SafeRMSNorm, to_ane_unet
from diffusers_snapgen.coreml.compress import parse_variants, swapped_parameters, variant_nbits
from diffusers_snapgen.coreml.components import parse_components, unet_component
from diffusers_snapgen.coreml.export import atomic_output_dir, few_step_schedule
from diffusers_snapgen.coreml.validate import psnr
from diffusers_snapgen.models.attention import SnapGenAttention
from diffusers_snapgen.testing import tiny_unet


def _randomize_norms(model):
    """Non-trivial norm weights, so a wrong channel permutation of the RMSNorm weights would show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def _unet_inputs(unet, size=16):
    gen = torch.Generator().manual_seed(0)
    c = unet.config
    return (
        torch.randn(1, c.in_channels, size, size, generator=gen),
        torch.tensor([700.0]),
        torch.randn(1, 7, c.joint_attention_dim, generator=gen),
        torch.randn(1, c.pooled_projection_dim, generator=gen),
    )


@pytest.mark.parametrize(
    "overrides",
    [{}, {"kv_heads": None}, {"kv_heads": 2}, {"qk_norm": None}, {"use_rope": False}],
    ids=["mqa", "mha", "gqa", "no-qk-norm", "no-rope"],
)
def test_ane_unet_matches_original(overrides):
    unet = _randomize_norms(tiny_unet(**overrides))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ane = to_ane_unet(unet)
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        reference = unet(*inputs).sample
        out = ane(*inputs).sample
    assert psnr(reference, out) >= 60.0
    # the source model is untouched and keeps its own attention modules
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert any(isinstance(m, SnapGenAttention) for m in unet.modules())
    assert not any(isinstance(m, SnapGenAttention) for m in ane.modules())
    assert any(isinstance(m, ANESnapGenAttention) for m in ane.modules())


def test_ane_unet_projects_the_text_in_every_step():
    """The ANE attentions project the text themselves: pipelines keep the per-step projection for an ANE UNet, and
    precomputed keys and values are refused with a message that says so."""
    from diffusers_snapgen.pipelines.pipeline_snapgen import projects_text_once

    unet = tiny_unet()
    ane = to_ane_unet(unet)
    assert projects_text_once(unet) and not projects_text_once(ane)
    with pytest.raises(ValueError, match="cross-attentions were replaced"):
        ane.precompute_cross_attention_kv(_unet_inputs(unet)[2])


def test_ane_attention_folds_nondefault_scale_into_query():
    attn = _randomize_norms(SnapGenAttention(32, heads=4, dim_head=8, kv_heads=1))
    attn.scale = 0.5  # a non-default softmax scale, applied by the reference below
    x = torch.randn(2, 10, 32)

    def reference(x):
        q = attn.norm_q(attn.to_q(x).unflatten(-1, (4, 8))).transpose(1, 2)
        k = attn.norm_k(attn.to_k(x).unflatten(-1, (1, 8))).transpose(1, 2).expand(-1, 4, -1, -1)
        v = attn.to_v(x).unflatten(-1, (1, 8)).transpose(1, 2).expand(-1, 4, -1, -1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
        return attn.to_out[0](out.transpose(1, 2).flatten(2))

    with torch.no_grad():
        assert psnr(reference(x), ANESnapGenAttention(attn)(x)) >= 60.0


def test_fp16_safe_rmsnorm_matches_and_survives_large_values():
    weight = torch.randn(64)
    ref = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(weight)
    ours = FP16SafeRMSNorm(64, eps=1e-6, weight=weight)
    x = torch.randn(3, 5, 64) * 30
    with torch.no_grad():
        assert psnr(ref(x), ours(x)) >= 60.0
        big = torch.randn(2, 64) * 2000  # squares overflow fp16 (max 65504)
        naive = big.half() * torch.rsqrt(big.half().pow(2).mean(-1, keepdim=True) + 1e-6)
        assert not torch.isfinite(naive).all() or (naive == 0).all()
        safe = ours.half()(big.half()).float()
        assert torch.isfinite(safe).all()
        assert psnr(ref(big), safe) >= 35.0
        tiny = torch.full((1, 64), 1e-7)  # below min_scale: still exact
        assert psnr(ref(tiny), ours(tiny)) >= 60.0


def test_psnr_definition():
    a = torch.tensor([1.0, -2.0, 0.5, 4.0])
    assert psnr(a, a) == float("inf")
    b = a + torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert psnr(a, b) == pytest.approx(20 * torch.log10(torch.tensor(4.0 / 0.1)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:2])
    with pytest.raises(TypeError, match="`reference`"):
        psnr([1.0], a)


def test_argument_parsing_errors_name_the_argument():
    assert parse_variants("fp16, palettize6,fp16") == ["fp16", "palettize6"]
    assert variant_nbits("palettize4") == 4 and variant_nbits("fp16") is None
    with pytest.raises(ValueError, match="Unknown `variants`.*palettize3"):
        parse_variants("fp16,palettize3")
    with pytest.raises(ValueError, match="`variants` is empty"):
        parse_variants("")
    assert parse_components("text,unet") == ["unet", "text"]
    with pytest.raises(ValueError, match="`components`"):
        parse_components("unet,vae")
    unet = tiny_unet()
    with pytest.raises(ValueError, match="`batch_size`"):
        unet_component(unet, 8, batch_size=3)
    with pytest.raises(ValueError, match="`latent_size`.*multiple of 4"):
        unet_component(unet, 10)
    with pytest.raises(TypeError, match="unsupported model"):
        unet_component(torch.nn.Linear(2, 2), 8)


def test_unet_component_fixed_shapes_and_batch_two():
    unet = tiny_unet()
    component = unet_component(unet, 8, batch_size=2, sequence_length=5)
    shapes = {k: tuple(v.shape) for k, v in component.inputs.items()}
    assert shapes == {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 5, 24),
                      "pooled_projections": (2, 20)}
    assert component.package == "Unet" and component.output_names == ["noise_pred"] and component.expect_sdpa
    with torch.no_grad():
        out = component.module(*component.inputs.values())
    assert out.shape == (2, 4, 8, 8)


def test_swapped_parameters_restores_after_error():
    layer = torch.nn.Linear(3, 3)
    original = layer.weight.detach().clone()
    with pytest.raises(RuntimeError):
        with swapped_parameters(layer, {"weight": torch.zeros(3, 3)}):
            assert torch.count_nonzero(layer.weight) == 0
            raise RuntimeError("boom")
    assert torch.equal(layer.weight, original)
    with pytest.raises(ValueError, match="not parameters"):
        with swapped_parameters(layer, {"nope": torch.zeros(1)}):
            pass


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("step failed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(target) as staging:
        (staging / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def test_few_step_schedule_matches_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = few_step_schedule(scheduler, 4)
    scheduler.set_timesteps(4)
    assert schedule["timesteps"] == pytest.approx(scheduler.timesteps.tolist(), abs=1e-4)
    assert schedule["sigmas"] == pytest.approx(scheduler.sigmas.tolist(), abs=1e-5)
    assert len(schedule["sigmas"]) == 5 and schedule["sigmas"][-1] == 0.0
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        few_step_schedule(scheduler, 0)
