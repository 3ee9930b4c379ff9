"""Adversarial step distillation (ASD; paper §3.4, docs/design.md; partly *reconstructed*).

The student (a trained SnapGen UNet) learns to sample in ``K`` = 4 or 8 Euler steps:

* **Timesteps**: the student trains only on the ``K``-step grid of its ``FlowMatchEulerDiscreteScheduler`` (the
  sigmas ``pipe(prompt, num_inference_steps=K)`` visits): :class:`FewStepSampler`.
* **KD targets** from a frozen few-step teacher (e.g. SD3.5-Large-Turbo, an ``SD3Transformer2DModel``): from the
  student's input ``x_sigma`` the teacher runs its own few-step schedule down to 0 (:func:`teacher_rollout`; one
  forward when its schedule has one step) and the velocity target is ``(x_sigma - x0_teacher) / sigma``. Output KD
  ``||v_s - v_T||^2`` and, optionally, feature KD (:class:`~.kd.MultiLevelKD`), both combined with the task loss by
  timestep-aware scaling ``S(L_task, L_kd)`` (:class:`~.scaling.TimestepAwareScaling`).
* **Adversarial loss** (diffusion-GAN, LADD-style): the student's clean estimate ``x0_s = x_sigma - sigma * v_s``
  and a real latent (the data, or the teacher's ``x0_teacher``) are re-noised to a random ``t'``; a
  :class:`~.discriminator.TeacherFeatureDiscriminator` (heads on frozen teacher features) scores them. Hinge loss by
  default, non-saturating as an option, optional R1.

Generator loss: ``S(L_task, L_out) + S(L_task, L_feat) + lambda_adv * L_adv``. :meth:`AdversarialStepDistillation.losses`
backpropagates the discriminator's loss (on the detached student sample) into the heads and returns the generator
loss computed with the heads frozen; :meth:`~AdversarialStepDistillation.discriminator_step` then updates the heads,
once per optimizer step (simultaneous updates). Nothing here waits for the device, so the whole step can be captured
in a CUDA graph. The training script's task is :class:`~.tasks.asd.ASDTask`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .adversarial import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty, set_requires_grad
from .flow_matching import FlowMatchingSampler, add_flow_noise, denoiser_forward, flow_matching_loss
from .kd import feature_kd_from_args, output_kd_loss  # feature_kd_from_args: re-exported (it lived here)
from .task_args import REAL_SOURCES, build_asd_parser, parse_asd_args, validate_asd_args  # re-exported

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "REAL_SOURCES",
    "few_step_sigmas",
    "FewStepSampler",
    "TeacherTargets",
    "teacher_rollout",
    "rollout_steps",
    "AdversarialStepDistillation",
    "build_asd_parser",
    "validate_asd_args",
    "parse_asd_args",
    "kd_scaling_from_args",
    "feature_kd_from_args",
    "require_student_checkpoint",
]


def kd_scaling_from_args(args):
    """The :class:`~.scaling.TimestepAwareScaling` the KD flags ask for (``--kd_scaling``, ``--kd_alpha*``)."""
    from .tasks.denoising import kd_scaling_from_args as build

    return build(args)




def _scheduler_config(scheduler, shift=None) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler is None:
        config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0 if shift is None else shift).config)
    elif hasattr(scheduler, "config") or isinstance(scheduler, dict):
        config = dict(scheduler.config if hasattr(scheduler, "config") else scheduler)
    else:
        raise TypeError(f"`scheduler` must be a FlowMatchEulerDiscreteScheduler, its config, or None; got "
                        f"{type(scheduler).__name__}.")
    if shift is not None:
        if not shift > 0:
            raise ValueError(f"`shift` must be > 0, got {shift!r}.")
        config["shift"] = float(shift)
    if config.get("use_dynamic_shifting"):
        raise ValueError("the scheduler uses dynamic (resolution-dependent) shifting: a fixed few-step grid needs "
                         "`use_dynamic_shifting=False` (SnapGen's and SD3.5's schedulers).")
    return config


def few_step_sigmas(scheduler=None, num_inference_steps: int = 4, shift: float | None = None) -> torch.Tensor:
    """The ``num_inference_steps`` sigmas (descending, > 0) that ``FlowMatchEulerDiscreteScheduler.set_timesteps``
    gives - what the pipeline visits with ``num_inference_steps`` steps. ``shift`` overrides the config's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
    sched = FlowMatchEulerDiscreteScheduler.from_config(_scheduler_config(scheduler, shift))
    sched.set_timesteps(num_inference_steps, device="cpu")
    return sched.sigmas[:num_inference_steps].detach().float().clone()


class FewStepSampler(FlowMatchingSampler):
    """Draws training sigmas uniformly from the ``num_inference_steps``-step sampling grid (a drop-in for
    :class:`~.flow_matching.FlowMatchingSampler`, e.g. as ``ctx.sampler``). ``grid`` holds the sigmas."""

    def __init__(self, scheduler=None, num_inference_steps: int = 4, weighting_scheme: str = "logit_normal",
                 shift: float | None = None):
        config = _scheduler_config(scheduler, shift)
        super().__init__(config, weighting_scheme)
        self.num_inference_steps = num_inference_steps
        self.grid = few_step_sigmas(config, num_inference_steps)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None, device="cpu"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        draw_device = generator.device if generator is not None else torch.device(device)
        index = torch.randint(0, len(self.grid), (batch_size,), generator=generator, device=draw_device)
        sigmas = self._table(self.grid, draw_device)[index]
        return sigmas.to(device), (sigmas * self.num_train_timesteps).to(device)


@dataclass
class TeacherTargets:
    """``velocity``: KD target ``(x_sigma - sample) / sigma``; ``sample``: the teacher's clean latent;
    ``first_velocity``: its prediction at ``x_sigma``; ``num_forwards``: teacher calls made."""

    velocity: torch.Tensor
    sample: torch.Tensor
    first_velocity: torch.Tensor
    num_forwards: int


def rollout_steps(student_sigmas, teacher_sigmas=None) -> int:
    """Teacher forwards :func:`teacher_rollout` needs for the worst sample of a student grid: 1 + the number of
    teacher schedule points below the largest student sigma."""
    student = torch.as_tensor(student_sigmas, dtype=torch.float32).flatten()
    if teacher_sigmas is None:
        return 1
    grid = torch.as_tensor(teacher_sigmas, dtype=torch.float32).flatten()
    return 1 + int((grid[None, :] < student[:, None] - 1e-6).sum(dim=1).max())


@torch.no_grad()
def teacher_rollout(teacher, noisy_latents: torch.Tensor, sigmas: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    pooled_projections: torch.Tensor | None = None, teacher_sigmas: torch.Tensor | None = None,
                    num_train_timesteps: int = 1000, num_steps: int | None = None, guidance_scale: float = 1.0,
                    negative_encoder_hidden_states: torch.Tensor | None = None,
                    negative_pooled_projections: torch.Tensor | None = None) -> TeacherTargets:
    """Runs ``teacher`` with Euler steps from each sample's ``sigma`` down to 0 through the points of its own
    schedule ``teacher_sigmas`` below that sigma (``None`` or a one-point schedule: a single step, i.e. plain
    output KD). Inputs are cast to the teacher's dtype; the integration runs in float32. The first call sees the
    whole batch (so feature-KD hooks capture every sample).

    ``num_steps`` (:func:`rollout_steps` of the student's grid) makes the loop static: every call sees the whole
    batch and finished samples stay put, so nothing is read back to the host (CUDA-graph safe; ``sigmas`` are then
    trusted to lie in (0, 1]). Without it ``sigmas`` are checked and the loop runs until every sample reached 0,
    calling the teacher on the unfinished samples only.

    ``guidance_scale`` > 1 guides every teacher velocity with classifier-free guidance against the ``negative_*``
    conditioning (the empty prompt's, one row or one per sample): a teacher that was not guidance-distilled (unlike
    SD3.5-Large-Turbo) then hands its guided sampling to a student that samples without CFG. The conditional call
    comes first, so feature-KD hooks capture the conditional features."""
    for name, v in (("noisy_latents", noisy_latents), ("sigmas", sigmas), ("encoder_hidden_states", encoder_hidden_states)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}.")
    b = noisy_latents.shape[0]
    if sigmas.shape != (b,):
        raise ValueError(f"`sigmas` must have shape ({b},), got {tuple(sigmas.shape)}.")
    if num_steps is None:  # the dynamic loop reads from the device anyway; the static one never does
        if not bool((sigmas > 0).all()) or not bool((sigmas <= 1).all()):
            raise ValueError("`sigmas` must lie in (0, 1]: the student's grid never includes sigma = 0.")
    if teacher_sigmas is None:
        grid = torch.zeros(0, device=noisy_latents.device)
    else:
        grid = torch.as_tensor(teacher_sigmas, dtype=torch.float32, device=noisy_latents.device).flatten()
    guided = guidance_scale != 1.0
    if guided and negative_encoder_hidden_states is None:
        raise ValueError("`guidance_scale` != 1 needs `negative_encoder_hidden_states` (the empty prompt's).")
    dtype = next(teacher.parameters()).dtype

    def rows_of(cond, rows, n):  # the teacher's dtype; one shared row is expanded to the batch
        if cond is None:
            return None
        if cond.shape[0] == 1 and n != 1:
            return cond.expand(n, *cond.shape[1:]).to(dtype)
        return (cond if rows is None else cond[rows]).to(dtype)

    def forward(x_in, t, rows=None):
        n = x_in.shape[0]
        v = denoiser_forward(teacher, x_in.to(dtype), t, rows_of(encoder_hidden_states, rows, n),
                             rows_of(pooled_projections, rows, n)).float()
        if not guided:
            return v
        u = denoiser_forward(teacher, x_in.to(dtype), t, rows_of(negative_encoder_hidden_states, rows, n),
                             rows_of(negative_pooled_projections, rows, n)).float()
        return u + guidance_scale * (v - u)

    per_call = 2 if guided else 1
    x = noisy_latents.detach().float().clone()
    cur = sigmas.detach().float().to(x.device).clone()
    shape = (-1, *([1] * (x.ndim - 1)))

    def next_sigma(c):
        if not grid.numel():
            return torch.zeros_like(c)
        return torch.where(grid[None, :] < c[:, None] - 1e-6, grid[None, :], torch.zeros_like(grid[None, :])).max(1).values

    first, calls = None, 0
    if num_steps is not None:
        for _ in range(num_steps):
            v = forward(x, cur * num_train_timesteps)
            first = v if first is None else first
            nxt = next_sigma(cur)
            x = x + (nxt - cur).reshape(shape) * v
            cur, calls = nxt, calls + per_call
    while num_steps is None and bool((cur > 0).any()):
        idx = (cur > 0).nonzero().squeeze(1)
        c = cur[idx]
        v = forward(x[idx], c * num_train_timesteps, idx)
        calls += per_call
        if first is None:
            first = v
        nxt = next_sigma(c)
        x[idx] = x[idx] + (nxt - c).reshape(shape) * v
        cur[idx] = nxt
    s = sigmas.float().to(x.device).reshape(shape)
    velocity = (noisy_latents.float() - x) / s
    return TeacherTargets(velocity=velocity, sample=x, first_velocity=first, num_forwards=calls)


def _unwrap(module):
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


class AdversarialStepDistillation:
    """The ASD objective on tensors: :meth:`losses` (the discriminator's loss backpropagated into its heads, then the
    generator loss with the heads frozen) and :meth:`discriminator_step` (the heads' optimizer step, once per
    optimizer step of the student).

    Args:
        teacher: frozen few-step teacher (``SD3Transformer2DModel``); also the discriminator's feature network.
        discriminator: a :class:`~.discriminator.TeacherFeatureDiscriminator` (possibly ``accelerator.prepare``d).
        d_optimizer: the discriminator's optimizer (``None``: no D update); d_lr_scheduler: its LR schedule, stepped
            by :meth:`discriminator_step` (leave it ``None`` when the training engine steps it).
        scaling: :class:`~.scaling.TimestepAwareScaling` for ``S(L_task, L_kd)``.
        feature_kd: a prepared/attached :class:`~.kd.MultiLevelKD` or ``None``; output_kd: use ``||v_s - v_T||^2``.
        adversarial_weight: ``lambda_adv``. gan_loss: ``"hinge"`` or ``"non_saturating"``. r1_gamma: R1 weight
            (``gamma / 2 * R1``; 0 = off; costs a double backward through the teacher).
        adversarial_sampler: draws the re-noising times ``t'`` (a :class:`~.flow_matching.FlowMatchingSampler`).
        teacher_sigmas: the teacher's own schedule for :func:`teacher_rollout` (``None``: one step).
        student_sigmas: the student's few-step grid; when given the teacher rollout is static (CUDA-graph safe).
        real_source: ``"data"`` (training latents) or ``"teacher"`` (the teacher's clean latent) as "real".
        weighting_scheme: task-loss weighting. max_grad_norm: discriminator gradient clipping (0 = off).
        accelerator: ``accelerate.Accelerator`` for backward/clipping (``None``: plain PyTorch).
    """

    def __init__(self, teacher, discriminator, d_optimizer=None, d_lr_scheduler=None, *, scaling, feature_kd=None,
                 output_kd: bool = True, adversarial_weight: float = 0.5, gan_loss: str = "hinge",
                 r1_gamma: float = 0.0, adversarial_sampler: FlowMatchingSampler | None = None, teacher_sigmas=None,
                 student_sigmas=None, real_source: str = "data", weighting_scheme: str = "logit_normal", max_grad_norm: float = 1.0,
                 accelerator=None, num_train_timesteps: int = 1000, teacher_guidance_scale: float = 1.0,
                 negative_conditioning: tuple | None = None):
        from .discriminator import TeacherFeatureDiscriminator
        from .scaling import TimestepAwareScaling

        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"`teacher` must be an nn.Module, got {type(teacher).__name__}.")
        if not isinstance(_unwrap(discriminator), TeacherFeatureDiscriminator):
            raise TypeError(f"`discriminator` must be a TeacherFeatureDiscriminator, got {type(discriminator).__name__}.")
        if not isinstance(scaling, TimestepAwareScaling):
            raise TypeError(f"`scaling` must be a TimestepAwareScaling, got {type(scaling).__name__}.")
        if not output_kd and feature_kd is None:
            raise ValueError("no KD term: enable `output_kd` or pass `feature_kd`.")
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"`gan_loss` (--gan_loss) must be one of {GAN_LOSSES}, got {gan_loss!r}.")
        if real_source not in REAL_SOURCES:
            raise ValueError(f"`real_source` (--adversarial_real_source) must be one of {REAL_SOURCES}, "
                             f"got {real_source!r}.")
        for name, v in (("adversarial_weight", adversarial_weight), ("r1_gamma", r1_gamma),
                        ("max_grad_norm", max_grad_norm)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"`{name}` (--{name}) must be a number >= 0, got {v!r}.")
        if isinstance(teacher_guidance_scale, bool) or not isinstance(teacher_guidance_scale, (int, float)) \
                or teacher_guidance_scale < 1:
            raise ValueError(f"`teacher_guidance_scale` (--teacher_guidance_scale) must be a number >= 1, "
                             f"got {teacher_guidance_scale!r}.")
        if teacher_guidance_scale != 1 and negative_conditioning is None:
            raise ValueError("`teacher_guidance_scale` > 1 needs `negative_conditioning`: the empty prompt's "
                             "(encoder_hidden_states, pooled_projections).")
        if adversarial_sampler is None:
            adversarial_sampler = FlowMatchingSampler()
        if not isinstance(adversarial_sampler, FlowMatchingSampler):
            raise TypeError(f"`adversarial_sampler` must be a FlowMatchingSampler, "
                            f"got {type(adversarial_sampler).__name__}.")
        self.teacher, self.discriminator = teacher, discriminator
        self.disc_module = _unwrap(discriminator)
        if self.disc_module.feature_network is None:
            self.disc_module.attach(teacher)
        self.d_optimizer, self.d_lr_scheduler = d_optimizer, d_lr_scheduler
        self.scaling, self.feature_kd, self.output_kd = scaling, feature_kd, output_kd
        self.adversarial_weight, self.gan_loss, self.r1_gamma = float(adversarial_weight), gan_loss, float(r1_gamma)
        self.adversarial_sampler, self.real_source = adversarial_sampler, real_source
        self.teacher_sigmas = None if teacher_sigmas is None else torch.as_tensor(teacher_sigmas, dtype=torch.float32)
        self.weighting_scheme, self.max_grad_norm = weighting_scheme, float(max_grad_norm)
        self.accelerator, self.num_train_timesteps = accelerator, num_train_timesteps
        self.teacher_guidance_scale = float(teacher_guidance_scale)
        self.negative_conditioning = negative_conditioning if self.teacher_guidance_scale != 1 else None
        self.rollout_steps = None if student_sigmas is None else rollout_steps(student_sigmas, self.teacher_sigmas)

    # ------------------------------------------------------------------ pieces

    def teacher_targets(self, noisy_latents, sigmas, encoder_hidden_states, pooled_projections) -> TeacherTargets:
        grid = self.teacher_sigmas
        if grid is not None and grid.device != noisy_latents.device:  # once: no host copy inside a captured step
            grid = self.teacher_sigmas = grid.to(noisy_latents.device)
        negative_ehs = negative_pooled = None
        if self.negative_conditioning is not None:
            negative_ehs, negative_pooled = self.negative_conditioning
            if negative_ehs.device != noisy_latents.device:  # once, like the grid
                negative_ehs, negative_pooled = negative_ehs.to(noisy_latents.device), (
                    None if negative_pooled is None else negative_pooled.to(noisy_latents.device))
                self.negative_conditioning = (negative_ehs, negative_pooled)
        return teacher_rollout(self.teacher, noisy_latents, sigmas, encoder_hidden_states, pooled_projections,
                               grid, self.num_train_timesteps, num_steps=self.rollout_steps,
                               guidance_scale=self.teacher_guidance_scale,
                               negative_encoder_hidden_states=negative_ehs, negative_pooled_projections=negative_pooled)

    def renoise_draw(self, like: torch.Tensor, generator: torch.Generator | None):
        """``(sigmas', timesteps', noise)`` for re-noising, drawn from ``generator`` (on its device)."""
        from diffusers.utils.torch_utils import randn_tensor

        sig, ts = self.adversarial_sampler(like.shape[0], generator=generator, device=like.device)
        noise = randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        return sig, ts, noise

    def discriminator_backward(self, real, fake, renoise, encoder_hidden_states, pooled_projections) -> dict:
        """The discriminator's loss on ``real`` and (detached) ``fake`` clean latents, re-noised with ``renoise``,
        backpropagated into the heads (when there is a ``d_optimizer``); leaves the discriminator frozen
        (``requires_grad=False``) for the generator's pass. Returns its metrics (0-dim tensors).

        With R1 the pass runs with PyTorch's math attention kernel: R1 differentiates an input gradient through the
        teacher, which the fused (flash / memory-efficient) kernels cannot, and gradient-checkpoint recomputation must
        use the kernel of the forward."""
        context = contextlib.nullcontext()
        if self.r1_gamma > 0:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            context = sdpa_kernel(SDPBackend.MATH)
        set_requires_grad(self.disc_module, True)
        try:
            with context:
                return self._discriminator_loss(real, fake, renoise, encoder_hidden_states, pooled_projections)
        finally:
            set_requires_grad(self.disc_module, False)

    def _discriminator_loss(self, real, fake, renoise, encoder_hidden_states, pooled_projections) -> dict:
        sig, ts, noise = renoise
        real_in = add_flow_noise(real.detach().float(), noise, sig)
        fake_in = add_flow_noise(fake.detach().float(), noise, sig)
        metrics = {}
        if self.r1_gamma > 0:
            real_in.requires_grad_(True)
            real_logits = self.discriminator(real_in, ts, encoder_hidden_states, pooled_projections)
            fake_logits = self.discriminator(fake_in, ts, encoder_hidden_states, pooled_projections)
        else:
            b = real_in.shape[0]
            logits = self.discriminator(torch.cat([real_in, fake_in]), torch.cat([ts, ts]),
                                        torch.cat([encoder_hidden_states] * 2), torch.cat([pooled_projections] * 2))
            real_logits, fake_logits = logits[:b], logits[b:]
        d_loss = discriminator_loss(real_logits, fake_logits, self.gan_loss)
        if self.r1_gamma > 0:
            r1 = r1_penalty(real_logits, real_in)
            d_loss = d_loss + 0.5 * self.r1_gamma * r1
            metrics["r1"] = r1.detach()
        metrics.update(d_loss=d_loss.detach(), d_real=real_logits.detach().float().mean(),
                       d_fake=fake_logits.detach().float().mean())
        if self.d_optimizer is not None:
            if self.accelerator is not None:
                self.accelerator.backward(d_loss)
            else:
                d_loss.backward()
        return metrics

    def discriminator_step(self):
        """Clips and applies the heads' accumulated gradients, then zeroes them (once per optimizer step)."""
        if self.d_optimizer is None:
            return
        params = [p for p in self.disc_module.parameters() if p.requires_grad or p.grad is not None]
        if self.max_grad_norm > 0:
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.d_optimizer.step()
        if self.d_lr_scheduler is not None:
            self.d_lr_scheduler.step()
        self.d_optimizer.zero_grad(set_to_none=True)

    def generator_adversarial_loss(self, fake, renoise, encoder_hidden_states, pooled_projections) -> torch.Tensor:
        """Per-sample adversarial loss ``(B,)`` of the student's clean estimate ``fake`` (gradients flow to it through
        the frozen teacher and heads; the heads collect none)."""
        sig, ts, noise = renoise
        set_requires_grad(self.disc_module, False)
        fake_in = add_flow_noise(fake.float(), noise, sig)
        logits = self.disc_module(fake_in, ts, encoder_hidden_states, pooled_projections)
        return generator_loss(logits, self.gan_loss, reduction="none")

    # ------------------------------------------------------------------ the objective

    def losses(self, fm, student_pred, encoder_hidden_states, pooled_projections, generator=None):
        """The discriminator's backward, then ``(generator_loss, metrics, per_sample)`` for a flow-matching batch
        ``fm`` on the few-step grid and the student's velocity ``student_pred``. ``metrics`` are 0-dim tensors,
        ``per_sample`` ``(B,)`` losses (``task``, ``kd_out``, ``kd_feat``, ``adv``)."""
        if not isinstance(student_pred, torch.Tensor) or student_pred.shape != fm.noisy_latents.shape:
            raise ValueError("`student_pred` must be the student's velocity, shaped like `fm.noisy_latents`.")
        targets = self.teacher_targets(fm.noisy_latents, fm.sigmas, encoder_hidden_states, pooled_projections)
        task = flow_matching_loss(student_pred, fm.target, fm.sigmas, self.weighting_scheme)
        loss = torch.zeros((), device=task.device)
        per_sample = {"task": task}
        if self.output_kd:
            l_out = output_kd_loss(student_pred, targets.velocity)
            loss = loss + self.scaling(task, l_out, fm.sigmas)
            per_sample["kd_out"] = l_out
        if self.feature_kd is not None:
            l_feat = self.feature_kd()
            loss = loss + self.scaling(task, l_feat, fm.sigmas)
            per_sample["kd_feat"] = l_feat
        s = fm.sigmas.float().reshape(-1, *([1] * (fm.noisy_latents.ndim - 1)))
        fake = fm.noisy_latents.float() - s * student_pred.float()  # the student's clean estimate x0_s
        real = fm.latents if self.real_source == "data" else targets.sample
        renoise = self.renoise_draw(fake, generator)
        d_metrics = self.discriminator_backward(real, fake, renoise, encoder_hidden_states, pooled_projections)
        if self.adversarial_weight > 0:
            adv = self.generator_adversarial_loss(fake, renoise, encoder_hidden_states, pooled_projections)
            loss = loss + self.adversarial_weight * adv.mean()
            per_sample["adv"] = adv
        metrics = {f"{k}_mean": v.detach().float().mean() for k, v in per_sample.items()}
        metrics.update(d_metrics)
        return loss, metrics, per_sample


def require_student_checkpoint(args) -> str:
    """Where the student comes from: ``--unet_model_name_or_path`` or the ``unet`` of the base pipeline. Raises
    ValueError when neither exists (ASD starts from a trained SnapGen UNet, never from scratch)."""
    from diffusers import DiffusionPipeline

    from .components import resolve_model_path

    if args.unet_model_name_or_path is not None:
        return resolve_model_path(args.unet_model_name_or_path, "--unet_model_name_or_path")
    try:
        index = DiffusionPipeline.load_config(resolve_model_path(args.pretrained_model_name_or_path), revision=args.revision,
                                              cache_dir=args.cache_dir)
    except Exception as e:
        raise ValueError(f"cannot read --pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {e}") from e
    entry = index.get("unet")
    if not isinstance(entry, (list, tuple)) or entry[0] is None:
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} has no `unet`: ASD "
                         "starts from a trained SnapGen UNet, pass it with --unet_model_name_or_path.")
    return resolve_model_path(args.pretrained_model_name_or_path)
