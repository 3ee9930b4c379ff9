"""Adversarial step distillation pieces: the few-step grid, the teacher rollout, the ASD objective and its flags."""

import json

import pytest
import torch
from helpers import tiny_teacher

from diffusers_snapgen.testing import tiny_unet
from diffusers_snapgen.training import (
    FlowMatchingSampler,
    MultiLevelKD,
    TimestepAwareScaling,
    denoiser_forward,
    prepare_flow_matching_batch,
    step_generator,
)
from diffusers_snapgen.training.asd import (
    AdversarialStepDistillation,
    FewStepSampler,
    build_asd_parser,
    few_step_sigmas,
    parse_asd_args,
    require_student_checkpoint,
    rollout_steps,
    teacher_rollout,
)
from diffusers_snapgen.training.discriminator import TeacherFeatureDiscriminator


@pytest.fixture(scope="module")
def models():
    return tiny_unet(joint_attention_dim=32, pooled_projection_dim=20).train(), tiny_teacher(
        seed=3, joint_attention_dim=32, pooled_projection_dim=20)


def _cond(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 32, generator=g), torch.randn(b, 20, generator=g)


def test_few_step_grid_is_what_the_pipeline_samples():
    from diffusers_snapgen.pipelines import snapgen_scheduler

    sched = snapgen_scheduler()
    for steps in (4, 8):
        ref = snapgen_scheduler()
        ref.set_timesteps(steps)
        grid = few_step_sigmas(sched, steps)
        torch.testing.assert_close(grid, ref.sigmas[:steps].float())
        sampler = FewStepSampler(sched, steps)
        sigmas, timesteps = sampler(256, generator=torch.Generator().manual_seed(0))
        assert set(sigmas.tolist()) == set(grid.tolist())  # only grid points, all of them
        torch.testing.assert_close(timesteps, sigmas * 1000)
        assert set(torch.round(timesteps).tolist()) == set(torch.round(ref.timesteps).tolist())
    assert sched.sigmas.shape[0] == 1000  # the scheduler passed in is not modified
    a = FewStepSampler(sched, 4)(8, generator=torch.Generator().manual_seed(1))
    b = FewStepSampler(sched, 4)(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_inference_steps"):
        few_step_sigmas(sched, 0)
    with pytest.raises(ValueError, match="dynamic"):
        few_step_sigmas({**sched.config, "use_dynamic_shifting": True}, 4)


@torch.no_grad()
def test_teacher_rollout_is_euler_sampling_along_the_teacher_schedule(models):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, teacher = models
    noise, ehs, pooled = _cond(3)
    grid = few_step_sigmas(None, 4)
    # from sigma = 1 along the teacher's 4 steps: exactly the scheduler's Euler sampling
    out = teacher_rollout(teacher, noise, torch.ones(3), ehs, pooled, grid)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(denoiser_forward(teacher, x, t.expand(3), ehs, pooled), t, x).prev_sample
    torch.testing.assert_close(out.sample, x, atol=1e-5, rtol=1e-5)
    assert out.num_forwards == 4
    torch.testing.assert_close(out.velocity, noise - x)
    # a one-step schedule is plain output KD: the teacher's velocity at x_sigma
    sig = torch.tensor([1.0, 0.6, 0.2])
    one = teacher_rollout(teacher, noise, sig, ehs, pooled, few_step_sigmas(None, 1))
    torch.testing.assert_close(one.velocity, denoiser_forward(teacher, noise, sig * 1000, ehs, pooled), atol=1e-5, rtol=1e-5)
    assert one.num_forwards == 1
    # mixed noise levels in one batch: each sample follows its own path (the first call sees the whole batch)
    mixed = teacher_rollout(teacher, noise, grid[[0, 2, 3]], ehs, pooled, grid)
    assert mixed.num_forwards == 4
    for i, k in enumerate([0, 2, 3]):
        alone = teacher_rollout(teacher, noise[i:i + 1], grid[k:k + 1], ehs[i:i + 1], pooled[i:i + 1], grid)
        torch.testing.assert_close(mixed.sample[i:i + 1], alone.sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        teacher_rollout(teacher, noise, torch.tensor([1.0, 0.0, 0.5]), ehs, pooled, grid)


@torch.no_grad()
def test_teacher_rollout_with_classifier_free_guidance(models):
    _, teacher = models
    noise, ehs, pooled = _cond(3)
    neg_ehs, neg_pooled = torch.zeros(1, *ehs.shape[1:]), torch.zeros(1, pooled.shape[1])
    sig = torch.tensor([1.0, 0.6, 0.2])
    guided = teacher_rollout(teacher, noise, sig, ehs, pooled, few_step_sigmas(None, 1), guidance_scale=3.0,
                             negative_encoder_hidden_states=neg_ehs, negative_pooled_projections=neg_pooled)
    v = denoiser_forward(teacher, noise, sig * 1000, ehs, pooled)
    u = denoiser_forward(teacher, noise, sig * 1000, neg_ehs.expand_as(ehs), neg_pooled.expand_as(pooled))
    torch.testing.assert_close(guided.velocity, u + 3.0 * (v - u), atol=1e-4, rtol=1e-4)
    assert guided.num_forwards == 2 and not torch.allclose(guided.velocity, v, atol=1e-3)
    # the static (CUDA-graph) loop and the dynamic loop agree, with per-sample negatives too
    grid = few_step_sigmas(None, 4)
    kw = dict(guidance_scale=2.0, negative_encoder_hidden_states=neg_ehs.expand_as(ehs).clone(),
              negative_pooled_projections=neg_pooled.expand_as(pooled).clone())
    dynamic = teacher_rollout(teacher, noise, grid[[0, 2, 3]], ehs, pooled, grid, **kw)
    static = teacher_rollout(teacher, noise, grid[[0, 2, 3]], ehs, pooled, grid, num_steps=4, **kw)
    torch.testing.assert_close(dynamic.sample, static.sample, atol=1e-5, rtol=1e-5)
    assert dynamic.num_forwards == 8
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        teacher_rollout(teacher, noise, sig, ehs, pooled, guidance_scale=3.0)


def _objective(models, **kw):
    student, teacher = models
    disc = TeacherFeatureDiscriminator.from_teacher(teacher, head_channels=16)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-2)
    kw.setdefault("scaling", TimestepAwareScaling())
    return AdversarialStepDistillation(teacher, disc, d_opt, teacher_sigmas=few_step_sigmas(None, 4), **kw), disc


def _step(models, objective, seed=0):
    student, _ = models
    latents, ehs, pooled = _cond(4, seed)
    g = step_generator(0, seed)
    fm = prepare_flow_matching_batch(latents, FewStepSampler(None, 4), g)
    pred = denoiser_forward(student, fm.noisy_latents, fm.timesteps, ehs, pooled)
    return fm, objective.losses(fm, pred, ehs, pooled, g)


def test_asd_objective_updates_the_heads_then_trains_only_the_student(models):
    student, teacher = models
    objective, disc = _objective(models)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    student.zero_grad(set_to_none=True)
    fm, (loss, metrics, per_sample) = _step(models, objective)
    # the heads got their loss's gradients and are frozen for the generator's backward; nothing moved yet
    head_grads = {n: p.grad.clone() for n, p in disc.named_parameters() if p.grad is not None}
    assert head_grads and all(torch.equal(before[k], v) for k, v in disc.state_dict().items())
    assert not any(p.requires_grad for p in disc.parameters())
    assert {"d_loss", "d_real", "d_fake", "task_mean", "kd_out_mean", "adv_mean"} <= metrics.keys()
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())  # no host sync in the step
    assert set(per_sample) == {"task", "kd_out", "adv"} and all(v.shape == (4,) for v in per_sample.values())
    assert set(fm.sigmas.tolist()) <= set(few_step_sigmas(None, 4).tolist())
    loss.backward()
    assert all(torch.equal(head_grads[n], p.grad) for n, p in disc.named_parameters() if n in head_grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    objective.discriminator_step()  # the heads' step, once per optimizer step
    assert any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())
    assert all(p.grad is None for p in disc.parameters())
    student.zero_grad(set_to_none=True)


def test_static_rollout_matches_the_dynamic_one(models):
    _, teacher = models
    grid = few_step_sigmas(None, 4)
    latents, ehs, pooled = _cond(3)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    sig = grid[[0, 2, 3]]
    steps = rollout_steps(grid, grid)
    assert steps == 4 and rollout_steps(grid, None) == 1 and rollout_steps(grid, few_step_sigmas(None, 1)) == 1
    dynamic = teacher_rollout(teacher, noise, sig, ehs, pooled, grid)
    static = teacher_rollout(teacher, noise, sig, ehs, pooled, grid, num_steps=steps)
    assert static.num_forwards == steps
    torch.testing.assert_close(static.sample, dynamic.sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.velocity, dynamic.velocity, atol=1e-5, rtol=1e-5)


def test_adversarial_loss_reaches_the_student_sample_through_the_frozen_teacher(models):
    objective, disc = _objective(models, gan_loss="non_saturating")
    latents, ehs, pooled = _cond(2)
    fake = latents.clone().requires_grad_(True)
    renoise = objective.renoise_draw(fake, torch.Generator().manual_seed(0))
    adv = objective.generator_adversarial_loss(fake, renoise, ehs, pooled)
    assert adv.shape == (2,)
    adv.sum().backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in disc.parameters())


def test_asd_options_r1_teacher_real_source_feature_kd_and_no_adversarial_term(models):
    student, teacher = models
    kd = MultiLevelKD.from_models(student, teacher, [("mid_block", "transformer_blocks.1")])
    kd.attach(student, teacher)
    try:
        objective, _ = _objective(models, r1_gamma=1.0, real_source="teacher", feature_kd=kd, output_kd=False,
                                  adversarial_weight=0.0)
        kd.clear()
        _, (loss, metrics, per_sample) = _step(models, objective, seed=1)
        assert metrics["r1"] >= 0 and set(per_sample) == {"task", "kd_feat"}
        loss.backward()
        assert all(p.grad is not None for p in kd.parameters())
    finally:
        kd.detach_hooks()
        student.zero_grad(set_to_none=True)


def test_asd_objective_argument_errors(models):
    student, teacher = models
    disc = TeacherFeatureDiscriminator.from_teacher(teacher, head_channels=16)
    scaling = TimestepAwareScaling()
    with pytest.raises(TypeError, match="TeacherFeatureDiscriminator"):
        AdversarialStepDistillation(teacher, student, scaling=scaling)
    with pytest.raises(ValueError, match="no KD term"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, output_kd=False)
    with pytest.raises(ValueError, match="--adversarial_real_source"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, real_source="noise")
    with pytest.raises(ValueError, match="--adversarial_weight"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, adversarial_weight=-1)
    with pytest.raises(TypeError, match="adversarial_sampler"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, adversarial_sampler="logit_normal")
    with pytest.raises(ValueError, match="negative_conditioning"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, teacher_guidance_scale=2.0)
    with pytest.raises(ValueError, match="teacher_guidance_scale"):
        AdversarialStepDistillation(teacher, disc, scaling=scaling, teacher_guidance_scale=0.5)
    objective = AdversarialStepDistillation(teacher, disc, scaling=scaling, adversarial_sampler=FlowMatchingSampler())
    fm = prepare_flow_matching_batch(torch.zeros(1, 4, 8, 8), FewStepSampler(None, 4))
    with pytest.raises(ValueError, match="student_pred"):
        objective.losses(fm, torch.zeros(1, 4, 4, 4), torch.zeros(1, 5, 32), torch.zeros(1, 20))


def test_asd_flags_extend_the_kd_parser(tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--teacher_model_name_or_path", "t",
            "--train_data_dir", str(tmp_path), "--report_to", "none"]
    args = parse_asd_args(base)
    assert (args.num_inference_steps, args.teacher_num_inference_steps, args.gan_loss) == (4, 4, "hinge")
    assert (args.validation_num_inference_steps, args.validation_guidance_scale) == (4, 1.0)
    assert args.tracker_project_name == "snapgen-asd" and args.kd_scaling == "timestep_aware"
    args = parse_asd_args([*base, "--num_inference_steps", "8", "--validation_num_inference_steps", "2"])
    assert (args.num_inference_steps, args.validation_num_inference_steps) == (8, 2)
    help_text = build_asd_parser().format_help()
    for flag in ("--kd_feature_layers", "--use_ema", "--push_to_hub", "--discriminator_layers", "--r1_gamma"):
        assert flag in help_text
    for extra, match in ((["--from_scratch"], "from_scratch"), (["--num_inference_steps", "0"], "num_inference_steps"),
                         (["--adversarial_weight", "-1"], "adversarial_weight"),
                         (["--discriminator_learning_rate", "0"], "discriminator_learning_rate"),
                         (["--teacher_guidance_scale", "0.5"], "teacher_guidance_scale")):
        with pytest.raises(ValueError, match=match):
            parse_asd_args([*base, *extra])
    with pytest.raises(TypeError, match="argv"):
        parse_asd_args("--seed 1")


def test_student_must_come_from_a_checkpoint(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                           "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--teacher_model_name_or_path", "t",
            "--train_data_dir", str(tmp_path), "--report_to", "none"]
    with pytest.raises(ValueError, match="--unet_model_name_or_path"):
        require_student_checkpoint(parse_asd_args(base))
    assert require_student_checkpoint(parse_asd_args([*base, "--unet_model_name_or_path", "x"])) == "x"
