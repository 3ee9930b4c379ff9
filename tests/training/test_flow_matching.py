"""Flow-matching objective and timestep-aware scaling (src/diffusers_snapgen/training/{flow_matching,scaling}.py)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


from diffusers_snapgen.training import (
    AlphaSchedule,
    FlowMatchingSampler,
    TimestepAwareScaling,
    TimestepBucketStats,
    add_flow_noise,
    denoiser_forward,
    flow_matching_loss,
    flow_matching_target,
    prepare_flow_matching_batch,
    step_generator,
)


def test_sampler_uses_scheduler_shift_and_ignores_inference_state():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)  # an inference call must not change what training samples
    sampler = FlowMatchingSampler(sched, weighting_scheme="logit_normal")
    sigmas, timesteps = sampler(4000, generator=torch.Generator().manual_seed(0))
    assert sigmas.shape == timesteps.shape == (4000,)
    assert torch.allclose(timesteps, sigmas * 1000)
    assert 0 < sigmas.min() and sigmas.max() <= 1
    # logit-normal(0, 1) has median u = 0.5; shift 3 maps it to 3*0.5 / (1 + 2*0.5) = 0.75
    assert abs(sigmas.median().item() - 0.75) < 0.02
    unshifted = FlowMatchingSampler(FlowMatchEulerDiscreteScheduler(shift=1.0))(4000, torch.Generator().manual_seed(0))[0]
    assert abs(unshifted.median().item() - 0.5) < 0.02


def test_sampler_is_deterministic_per_generator_and_validates():
    sampler = FlowMatchingSampler(shift=3.0, weighting_scheme="mode")
    a = sampler(8, generator=step_generator(1, 5))[0]
    b = sampler(8, generator=step_generator(1, 5))[0]
    c = sampler(8, generator=step_generator(1, 6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingSampler(weighting_scheme="uniformish")
    with pytest.raises(ValueError, match="batch_size"):
        sampler(0)
    with pytest.raises(TypeError, match="scheduler"):
        FlowMatchingSampler(scheduler=3)
    with pytest.raises(ValueError, match="step"):
        step_generator(0, -1)


def test_interpolation_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(add_flow_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(add_flow_noise(x0, eps, torch.ones(3)), eps)
    # the target is the time derivative of x_t
    t, h = torch.full((3,), 0.3), 1e-3
    numeric = (add_flow_noise(x0, eps, t + h) - add_flow_noise(x0, eps, t)) / h
    assert torch.allclose(numeric, flow_matching_target(x0, eps), atol=1e-2)
    with pytest.raises(ValueError, match="sigmas"):
        add_flow_noise(x0, eps, torch.zeros(2))
    with pytest.raises(ValueError, match="noise"):
        flow_matching_target(x0, eps[:, :2])


def test_loss_is_per_sample_mse_with_diffusers_weighting():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    sigmas = torch.tensor([0.1, 0.4, 0.7, 1.0])
    loss = flow_matching_loss(pred, target, sigmas, "logit_normal")
    assert loss.shape == (4,)
    assert torch.allclose(loss, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(flow_matching_loss(pred, target, sigmas, "sigma_sqrt"), loss / sigmas**2)
    assert flow_matching_loss(target, target, sigmas).abs().max() == 0
    with pytest.raises(ValueError, match="model_pred"):
        flow_matching_loss(pred[:, :1], target, sigmas)
    with pytest.raises(ValueError, match="weighting_scheme"):
        flow_matching_loss(pred, target, sigmas, "bogus")


def test_prepare_batch_is_reproducible(tiny_models):
    unet, teacher = tiny_models
    latents = torch.randn(2, 4, 8, 8)
    sampler = FlowMatchingSampler()
    a = prepare_flow_matching_batch(latents, sampler, step_generator(3, 7))
    b = prepare_flow_matching_batch(latents, sampler, step_generator(3, 7))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.sigmas, b.sigmas)
    assert torch.allclose(a.noisy_latents, add_flow_noise(latents, a.noise, a.sigmas))
    ehs, pooled = torch.randn(2, 5, 24), torch.randn(2, 20)
    for model in (unet, teacher):  # one call convention for the UNet and the MMDiT
        out = denoiser_forward(model, a.noisy_latents, a.timesteps, ehs, pooled)
        assert out.shape == latents.shape


def test_alpha_schedules():
    t = torch.linspace(0, 1, 101)
    ln = AlphaSchedule("logit_normal", alpha_min=0.1, alpha_max=0.9)(t)
    assert abs(ln[50].item() - 0.9) < 1e-3  # peak of logit-normal(0, 1) density is at t = 0.5
    assert ln[0].item() == pytest.approx(0.1, abs=1e-3) and ln[-1].item() == pytest.approx(0.1, abs=1e-3)
    assert torch.allclose(ln, ln.flip(0), atol=1e-5)
    shifted = AlphaSchedule("logit_normal", alpha_max=1.0, logit_mean=1.0)(t)
    assert t[shifted.argmax()] > 0.6  # the mode follows the sampling density
    lin = AlphaSchedule("linear", alpha_min=0.2, alpha_max=0.6)(t)
    assert lin[0].item() == pytest.approx(0.6) and lin[-1].item() == pytest.approx(0.2)
    assert torch.all(AlphaSchedule("constant", alpha=0.3)(t) == 0.3)
    with pytest.raises(ValueError, match="kind"):
        AlphaSchedule("cosine")
    with pytest.raises(ValueError, match="alpha_min"):
        AlphaSchedule(alpha_min=0.8, alpha_max=0.2)


def test_timestep_aware_scaling_matches_the_formula_and_stops_the_ratio_gradient():
    t = torch.tensor([0.02, 0.5, 0.98])
    task = torch.tensor([2.0, 1.0, 0.5], requires_grad=True)
    kd = torch.tensor([40.0, 1.0, 0.01], requires_grad=True)
    sched = AlphaSchedule("logit_normal", alpha_min=0.1, alpha_max=0.7)
    scaling = TimestepAwareScaling(sched)
    total = scaling(task, kd, t)
    alpha = sched(t)
    # forward value: alpha*Lt + (1-alpha)*(Lt/Lkd)*Lkd = Lt per sample
    assert total.item() == pytest.approx(task.detach().mean().item(), rel=1e-6)
    total.backward()
    assert torch.allclose(task.grad, alpha / 3)  # sg(): no gradient through the ratio
    assert torch.allclose(kd.grad, (1 - alpha) * task.detach() / kd.detach() / 3)
    # the fixed linear mix the paper compares against
    base = TimestepAwareScaling.constant(0.25)(task.detach(), kd.detach(), t)
    assert base.item() == pytest.approx((0.25 * task.detach() + 0.75 * kd.detach()).mean().item())
    batch = TimestepAwareScaling(sched, ratio="batch").weights(task.detach(), kd.detach(), t)[1]
    assert torch.allclose(batch, (1 - alpha) * task.detach().mean() / kd.detach().mean())
    with pytest.raises(ValueError, match="same shape"):
        scaling(task, kd[:2], t)
    with pytest.raises(TypeError, match="schedule"):
        TimestepAwareScaling("logit_normal")


def test_bucket_stats():
    stats = TimestepBucketStats(num_buckets=4)
    stats.update(torch.tensor([0.1, 0.2, 0.9, 1.0]), task=torch.tensor([1.0, 3.0, 5.0, 7.0]))
    stats.update(torch.tensor([0.6]), task=torch.tensor([2.0]), kd=torch.tensor([4.0]))
    means = stats.means()
    assert means["task"] == [2.0, None, 2.0, 6.0]
    assert means["kd"] == [None, None, 4.0, None]
    logs = stats.compute(prefix="train/")
    assert logs["train/task/t0.00-0.25"] == 2.0 and logs["train/task/t0.75-1.00"] == 6.0
    assert math.isclose(logs["train/kd/t0.50-0.75"], 4.0)
    stats.reset()
    assert stats.compute() == {}
    with pytest.raises(ValueError, match="task"):
        stats.update(torch.tensor([0.1, 0.2]), task=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_buckets"):
        TimestepBucketStats(0)
