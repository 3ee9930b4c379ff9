"""TeacherFeatureDiscriminator (LADD-style heads on a frozen teacher), PatchDiscriminator and the GAN losses."""

import pytest
import torch
from helpers import tiny_teacher
from torch import nn

from diffusers_snapgen.training.adversarial import (
    discriminator_loss,
    generator_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
    r1_penalty,
)
from diffusers_snapgen.training.discriminator import (
    PatchDiscriminator,
    TeacherFeatureDiscriminator,
    default_discriminator_layers,
    parse_discriminator_layers,
)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=3, joint_attention_dim=32, pooled_projection_dim=20)


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([900.0, 100.0][:b]), torch.randn(b, 5, 32, generator=g),
            torch.randn(b, 20, generator=g))


def test_default_layers_spread_over_the_teacher_depth():
    class DiT(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.transformer_blocks = nn.ModuleList(nn.Identity() for _ in range(n))

    assert default_discriminator_layers(DiT(38)) == [f"transformer_blocks.{i}" for i in (8, 18, 27, 37)]
    assert default_discriminator_layers(DiT(2), num_heads=4) == ["transformer_blocks.0", "transformer_blocks.1"]
    with pytest.raises(ValueError, match="transformer_blocks"):
        default_discriminator_layers(nn.Linear(2, 2))
    assert parse_discriminator_layers("transformer_blocks.1, transformer_blocks.3:1") == (
        ["transformer_blocks.1", "transformer_blocks.3"], [None, 1])
    with pytest.raises(ValueError, match="--discriminator_layers"):
        parse_discriminator_layers("")


def test_heads_train_and_the_teacher_stays_frozen_outside_the_state_dict(teacher):
    disc = TeacherFeatureDiscriminator.from_teacher(teacher, head_channels=16, cond_dim=32)
    assert disc.layers == [f"transformer_blocks.{i}" for i in range(4)]
    assert disc.feature_network is teacher and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("feature_network") for k in disc.state_dict())
    assert {n.split(".")[0] for n, _ in disc.named_parameters()} == {"time_embedding", "text_embedding", "heads"}
    latents, t, ehs, pooled = _inputs()
    latents.requires_grad_(True)
    logits = disc(latents, t, ehs, pooled)
    assert logits.shape == (2, 4 * 4 * 4)  # 4 heads x (8/2)^2 tokens
    logits.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0  # the generator gets a signal through the teacher
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # the logits depend on the noise level and the text (conditioned heads)
    with torch.no_grad():
        base = disc(latents, t, ehs, pooled)
        assert not torch.allclose(base, disc(latents, t.flip(0), ehs, pooled))
        assert not torch.allclose(base, disc(latents, t, ehs, pooled + 1))


def test_truncation_skips_the_blocks_after_the_deepest_head(teacher):
    calls = []
    blocks = teacher.transformer_blocks
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        disc = TeacherFeatureDiscriminator.from_teacher(teacher, layers="transformer_blocks.1", head_channels=16)
        calls.clear()
        with torch.no_grad():
            truncated = disc(*_inputs())
        assert calls == [0, 1]
        disc.truncate = False
        calls.clear()
        with torch.no_grad():
            full = disc(*_inputs())
        assert calls == [0, 1, 2, 3]
        torch.testing.assert_close(truncated, full)
    finally:
        for h in handles:
            h.remove()


def test_discriminator_argument_errors(teacher):
    with pytest.raises(ValueError, match="no module"):
        TeacherFeatureDiscriminator.from_teacher(teacher, layers="transformer_blocks.9")
    with pytest.raises(ValueError, match="same length"):
        TeacherFeatureDiscriminator(["a", "b"], [8], 20)
    with pytest.raises(ValueError, match="norm_num_groups"):
        TeacherFeatureDiscriminator(["a"], [8], 20, head_channels=24, norm_num_groups=32)
    disc = TeacherFeatureDiscriminator(["transformer_blocks.0"], [32], 20, head_channels=16)
    with pytest.raises(RuntimeError, match="attach"):
        disc(*_inputs())
    disc.attach(teacher)
    latents, t, ehs, pooled = _inputs()
    with pytest.raises(ValueError, match="one row per latent"):
        disc(latents, t, ehs[:1], pooled)
    with pytest.raises(TypeError, match="latents"):
        disc(latents.numpy(), t, ehs, pooled)


def test_patch_discriminator_gives_patch_logits_and_checks_its_input():
    disc = PatchDiscriminator(3, 8, num_layers=2, norm_num_groups=4)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 / 2^2 - 2
    with pytest.raises(ValueError, match="at least 12x12"):
        disc(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_num_groups"):
        PatchDiscriminator(3, 12, num_layers=2, norm_num_groups=32)
    assert PatchDiscriminator()(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # pix2pix 70x70 layout


def test_gan_losses_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 + 0.75)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)
    sp = torch.nn.functional.softplus
    assert non_saturating_discriminator_loss(real, fake).item() == pytest.approx(
        (sp(-real).mean() + sp(fake).mean()).item())
    assert non_saturating_generator_loss(fake).item() == pytest.approx(sp(-fake).mean().item())
    # per-sample reduction averages patch/token logits
    patch = torch.tensor([[[1.0, 3.0]], [[-1.0, -1.0]]])
    torch.testing.assert_close(generator_loss(patch, reduction="none"), torch.tensor([-2.0, 1.0]))
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(
        non_saturating_discriminator_loss(real, fake).item())
    with pytest.raises(ValueError, match="--gan_loss"):
        generator_loss(fake, "wasserstein")
    with pytest.raises(ValueError, match="reduction"):
        generator_loss(fake, reduction="sum")
    with pytest.raises(ValueError, match="batch dimension"):
        generator_loss(torch.tensor(1.0))


def test_r1_penalty_is_the_squared_input_gradient():
    a = torch.tensor([1.0, -2.0, 3.0])
    x = torch.randn(4, 3, requires_grad=True)
    logits = x @ a + (x**2).sum(1) * 0  # gradient w.r.t. x is `a` for every sample
    r1 = r1_penalty(logits, x)
    assert r1.item() == pytest.approx(14.0)
    assert r1.requires_grad  # differentiable: it trains the discriminator
    with pytest.raises(ValueError, match="requires_grad_"):
        r1_penalty(logits.detach(), x.detach())
