"""Former home of the denoiser training loop; the one engine is now :mod:`.engine` (loop, setup) with the tasks in
:mod:`.tasks`. These names keep working for code that imported them from here."""

from __future__ import annotations

from .engine import TrainingRun, build_ema, build_optimizer, setup_accelerator, train  # noqa: F401
from .tasks.denoising import FlowMatchingTask, load_denoiser_base

__all__ = ["TrainContext", "setup_accelerator", "build_optimizer", "build_ema", "setup_base", "batch_conditioning",
           "student_flow_matching_step", "flow_matching_task_loss", "train"]

#: The run container's former name.
TrainContext = TrainingRun


def _task(ctx) -> FlowMatchingTask:
    task = ctx.task if isinstance(ctx, TrainingRun) else ctx
    if not isinstance(task, FlowMatchingTask):
        raise TypeError(f"`ctx` must be a TrainingRun of a FlowMatchingTask (or the task), got {type(ctx).__name__}.")
    return task


def setup_base(args):
    """:func:`~.engine.setup_accelerator` and the frozen base components: ``(accelerator, components, latent_vae)``."""
    accelerator = setup_accelerator(args)
    base = load_denoiser_base(args, accelerator)
    return accelerator, base.components, base.vae_encoder


def batch_conditioning(ctx, batch: dict, generator):
    """``(latents, prompt_embeds, pooled_prompt_embeds)`` of a micro-batch (:meth:`FlowMatchingTask.conditioning`)."""
    return _task(ctx).conditioning(batch, generator)


def student_flow_matching_step(ctx, batch: dict, generator):
    """``(fm_batch, model_pred, prompt_embeds, pooled)`` (:meth:`FlowMatchingTask.student_step`)."""
    return _task(ctx).student_step(batch, generator)


def flow_matching_task_loss(ctx, batch: dict, generator):
    """``(loss, {}, {"t": sigmas, "task": per_sample})`` of plain flow matching."""
    out = FlowMatchingTask.compute_loss(_task(ctx), batch, generator)
    return out.loss, {}, {"t": out.timesteps, **out.per_sample}
