"""The training engine every SnapGen training script runs on (docs/training_speed.md).

A script builds a :class:`TrainingTask` (what differs: ``compute_loss``, ``validate``, ``save_final``; see
:mod:`.tasks`), hands it to :func:`prepare_run` with the model to train, and calls :func:`train` and :func:`finish`.
The engine owns everything else, in the shape of diffusers' example scripts: the accelerator and trackers, the
optimizer (fused AdamW on CUDA), LR schedule, EMA, the one loop (accumulate -> backward -> clip -> step -> EMA ->
log -> checkpoint -> validate), atomic checkpoints with exact resume, and the fast step (:mod:`.step`: ``--compile``,
``--cuda_graphs``, metrics read every ``--logging_steps`` steps).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import DeviceIndexBatches, LoaderBatches
from .checkpointing import (
    TrainingState,
    checkpoint_num_processes,
    register_checkpoint_hooks,
    remove_incomplete,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .distributed import check_world_size, configure_deepspeed, full_copy, is_deepspeed, is_fsdp, is_sharded, \
    scheduler_steps_per_step
from .metrics import MetricsLog, StepMetrics, StepOutput
from .step import StepProgram

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "TrainingTask",
    "TrainingRun",
    "StepOutput",
    "setup_accelerator",
    "build_optimizer",
    "build_lr_scheduler",
    "build_ema",
    "compile_module",
    "prepare_run",
    "train",
    "save_model_snapshot",
    "finish",
]


class TrainingTask:
    """What differs between the training scripts. Subclasses implement :meth:`compute_loss` and
    :meth:`save_final`, and may add an auxiliary update (a discriminator's) and validation.

    ``run`` is set by :func:`prepare_run`. ``variant`` is the step variant (:meth:`step_variant`) of the step being
    computed: a CUDA graph is captured per variant.
    """

    name = "train"  # the pushed model card's stage; the default tracker project is "snapgen-<name>"
    run: "TrainingRun"
    variant = None

    def on_prepare(self, run: "TrainingRun"):
        """Called by :func:`prepare_run` once the models are prepared (compile, auxiliary optimizers, ...)."""
        self.run = run

    def on_train_start(self, resumed: bool):
        """Called by :func:`train` after resuming, before the first step (e.g. an initial evaluation)."""

    def on_start_after(self):
        """Called by :func:`train` with ``--start_after`` once the file exists, before the first step (e.g. to load
        weights an earlier stage has just written)."""

    def compute_loss(self, batch: dict, generator: torch.Generator) -> StepOutput:
        """The loss of one micro-batch. Must not synchronise with the device (no ``.item()``, no data-dependent
        Python branches): the same code is captured in a CUDA graph."""
        raise NotImplementedError

    def auxiliary_step(self):
        """Runs after the main optimizer step, inside the step (e.g. the discriminator's optimizer step)."""

    def auxiliary_optimizers(self) -> list:
        return []

    def auxiliary_schedulers(self) -> list:
        return []

    def step_variant(self, step: int):
        """A hashable that changes when the step's computation changes (e.g. a GAN term switched on)."""
        return None

    def validate(self, step: int, final: bool = False):
        """Called every ``--validation_steps`` steps (on every process) and once at the end."""

    def save_final(self, model: torch.nn.Module):
        """Main process, after training: writes the result (``model`` carries the EMA weights when on)."""
        raise NotImplementedError

    def save_model(self, model: torch.nn.Module, output_dir: Path):
        """Main process, during training (``--save_model_at_steps``): writes the model folder that
        :meth:`save_final` writes, without its evaluation, model card or upload, into ``output_dir``."""
        raise NotImplementedError(f"{type(self).__name__} does not support --save_model_at_steps.")


@dataclass
class TrainingRun:
    """Everything the loop holds. ``model`` is the prepared model being trained; ``trainable`` the prepared modules
    whose parameters the main optimizer updates (model first); ``params`` those it clips."""

    args: argparse.Namespace
    accelerator: object
    task: TrainingTask
    model: torch.nn.Module
    trainable: list
    params: list
    optimizer: object
    lr_scheduler: object
    batches: object
    max_train_steps: int
    ema: object = None
    state: TrainingState = field(default_factory=TrainingState)
    metrics: StepMetrics | None = None
    program: StepProgram | None = None

    @property
    def optimizers(self) -> list:
        return [self.optimizer, *self.task.auxiliary_optimizers()]

    @property
    def schedulers(self) -> list:
        return [self.lr_scheduler, *self.task.auxiliary_schedulers()]

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


# ---------------------------------------------------------------------------------------------- setup


def setup_accelerator(args):
    """``Accelerator`` with the run's precision, accumulation, trackers and project folders; seeds everything;
    creates ``output_dir`` (main process), removes leftovers of interrupted saves, creates the Hub repo."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed

    for name in ("output_dir", "seed", "gradient_accumulation_steps", "report_to"):
        if not hasattr(args, name):
            raise TypeError(f"`args` must come from a diffusers_snapgen.training parser (no `{name}`).")
    logging_dir = Path(args.output_dir, args.logging_dir)
    handlers = [AutocastKwargs(cache_enabled=False)] if getattr(args, "cuda_graphs", False) else []
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        kwargs_handlers=handlers,
    )
    check_world_size(accelerator)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    get_logger(__name__).info(accelerator.state, main_process_only=False)
    import diffusers
    import transformers

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if getattr(args, "cudnn_benchmark", False):  # process-wide, as torch has it; no effect without cuDNN
        torch.backends.cudnn.benchmark = True
    args.hub_repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for leftover in remove_incomplete(args.output_dir):
            logger.info("removed the leftover of an interrupted save: %s", leftover)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            args.hub_repo_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id
    return accelerator


def build_optimizer(args, param_groups: list[dict], device=None):
    """AdamW over ``param_groups``: torch's fused kernel on CUDA (capturable with ``--cuda_graphs``), its foreach
    kernel elsewhere, or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    if not isinstance(param_groups, list) or not all(isinstance(g, dict) and "params" in g for g in param_groups):
        raise TypeError("`param_groups` must be a list of dicts with 'params' (torch optimizer param groups).")
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if device is not None and torch.device(device).type == "cuda":
        kwargs.update(fused=True, capturable=bool(getattr(args, "cuda_graphs", False)))
    return torch.optim.AdamW(param_groups, **kwargs)


def build_lr_scheduler(args, optimizer, max_train_steps: int, num_processes: int = 1):
    """diffusers' ``get_scheduler`` with the run's ``--lr_scheduler`` flags, over ``max_train_steps x num_processes``
    schedule steps (accelerate steps a prepared schedule once per process; pass
    :func:`~.distributed.scheduler_steps_per_step`)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


def build_ema(args, model):
    """diffusers' ``EMAModel`` of ``model`` (``None`` without ``--use_ema``)."""
    if not hasattr(args, "use_ema"):
        raise TypeError("`args` must come from a diffusers_snapgen.training parser (no `use_ema`).")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a diffusers model, got {type(model).__name__}.")
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=args.ema_decay, model_cls=type(model), model_config=model.config,
                    foreach=True)


def compile_module(module, args):
    """``torch.compile(module)`` with ``--compile_mode`` when ``--compile`` is on, else ``module``. The compiled
    wrapper shares the parameters; only the training step calls it."""
    if not getattr(args, "compile", False):
        return module
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(module, mode=mode)


def max_train_steps_of(args, batches_per_epoch: int) -> int:
    """``--max_train_steps``, else ``--num_train_epochs`` x optimizer steps per epoch."""
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} is more than the "
                         f"{batches_per_epoch} micro-batches of an epoch: lower it or the batch size.")
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch


def prepare_run(args, accelerator, task: TrainingTask, model: torch.nn.Module, param_groups: list[dict],
                batches, extra_modules: list | None = None, checkpoint_subfolder: str = "unet",
                dataloader=None) -> TrainingRun:
    """Optimizer, LR schedule and EMA of ``model``; checkpoint hooks (the model in ``<checkpoint>/<subfolder>``, its
    EMA in ``<subfolder>_ema``); ``accelerator.prepare`` of model, ``extra_modules`` (KD projectors,
    discriminators: checkpointed with it), optimizer, ``dataloader`` (loader batches) and schedule. ``task.run`` is
    set; the task then builds its auxiliary optimizers. Under FSDP2 the EMA is built after ``prepare``, from the
    sharded parameters (docs/distributed_training.md)."""
    if not isinstance(task, TrainingTask):
        raise TypeError(f"`task` must be a TrainingTask, got {type(task).__name__}.")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "save_pretrained"):
        raise TypeError(f"`model` must be a diffusers model, got {type(model).__name__}.")
    extra_modules = list(extra_modules or [])
    if not all(isinstance(m, torch.nn.Module) for m in extra_modules):
        raise TypeError("`extra_modules` must be a list of nn.Modules (KD projectors, discriminators).")
    acc = accelerator
    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        for g in param_groups:
            g["lr"] = g.get("lr", args.learning_rate) * scale
        args.learning_rate *= scale
    if args.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    if getattr(args, "channels_last", False):  # before the optimizer and the EMA copy the parameters
        model.to(memory_format=torch.channels_last)
    model.train()
    max_steps = max_train_steps_of(args, batches.batches_per_epoch)
    args.max_train_steps = max_steps
    late = [step for step in getattr(args, "save_model_at_steps", None) or () if step > max_steps]
    if late:
        raise ValueError(f"--save_model_at_steps {late} lies past the run's {max_steps} optimizer steps: pass steps "
                         "up to --max_train_steps (the last one is the final folder itself).")
    optimizer = build_optimizer(args, param_groups, acc.device)
    lr_scheduler = build_lr_scheduler(args, optimizer, max_steps, scheduler_steps_per_step(acc))
    configure_deepspeed(acc, args.train_batch_size, 1 + len(extra_modules))
    sharded = is_fsdp(acc)
    ema = None if sharded else build_ema(args, model)
    if ema is not None:
        ema.to(acc.device)
    objects = [model, *extra_modules, optimizer] + ([dataloader] if dataloader is not None else []) + [lr_scheduler]
    prepared = acc.prepare(*objects)
    if sharded:  # the EMA of each process's shard
        ema = build_ema(args, acc.unwrap_model(prepared[0]))
    state = TrainingState(seed=args.seed, micro_batch_size=args.train_batch_size, num_processes=acc.num_processes)
    register_checkpoint_hooks(acc, type(model), ema=ema, state=state, student_subfolder=checkpoint_subfolder)
    model, extra = prepared[0], list(prepared[1 : 1 + len(extra_modules)])
    optimizer, lr_scheduler = prepared[1 + len(extra_modules)], prepared[-1]
    if dataloader is not None:
        batches.dataloader = prepared[-2]
    run = TrainingRun(args=args, accelerator=acc, task=task, model=model, trainable=[model, *extra],
                      params=[p for g in param_groups for p in g["params"]], optimizer=optimizer,
                      lr_scheduler=lr_scheduler, batches=batches, max_train_steps=max_steps, ema=ema, state=state,
                      metrics=StepMetrics(acc.device, getattr(args, "timestep_buckets", 10)))
    task.on_prepare(run)
    return run


def loader_or_device_batches(args, accelerator, num_samples: int, on_device: bool, dataset=None, why: str = ""):
    """:class:`DeviceIndexBatches` when the data set is cached on the device, else :class:`LoaderBatches` over a
    DataLoader of ``dataset`` (returned second, to be prepared by :func:`prepare_run`)."""
    if on_device:
        return DeviceIndexBatches(num_samples, args.train_batch_size, args.seed, accelerator.device,
                                  accelerator.process_index, accelerator.num_processes), None
    from .data import EpochShuffleSampler, collate_examples

    collate = collate_examples if hasattr(dataset, "first_captions") else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(len(dataset), seed=args.seed),
        collate_fn=collate, num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))
    return LoaderBatches(accelerator, loader, dataset, why), loader


# ---------------------------------------------------------------------------------------------- the loop


def train(run: TrainingRun) -> TrainingState:
    """Resumes (``--resume_from_checkpoint``) and runs optimizer steps up to ``--max_train_steps``; returns the
    state."""
    from tqdm.auto import tqdm

    if not isinstance(run, TrainingRun):
        raise TypeError(f"`run` must be a TrainingRun from prepare_run(), got {type(run).__name__}.")
    args, acc, state, task = run.args, run.accelerator, run.state, run.task
    accumulation = args.gradient_accumulation_steps
    per_epoch = run.batches.batches_per_epoch
    max_steps = run.max_train_steps
    if acc.is_main_process:
        acc.init_trackers(args.tracker_project_name or f"snapgen-{task.name}",
                          config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    resume = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        acc.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    if resume is not None:
        acc.print(f"Resuming from checkpoint {resume}")
        acc.load_state(str(resume))
        _relayout(run, checkpoint_num_processes(resume))
    task.on_train_start(resumed=resume is not None)
    run.program = StepProgram(run, cuda_graphs=getattr(args, "cuda_graphs", False))
    samples = args.train_batch_size * acc.num_processes * accumulation
    logger.info("***** %s: %s, batch %d per device (%d per step with accumulation and processes), %d optimization "
                "steps, step: %s%s *****", task.name, "a stream" if getattr(run.batches, "epochless", False) else
                f"{per_epoch} micro-batches an epoch", args.train_batch_size, samples, max_steps, run.program.mode,
                ", compiled" if getattr(args, "compile", False) else "")
    if getattr(args, "start_after", None):
        _prepare_and_wait(run, accumulation)
    log = MetricsLog(acc, args.output_dir, args.logging_dir)
    progress = tqdm(range(max_steps), initial=state.global_step, desc="Steps", disable=not acc.is_local_main_process)
    clock = _WindowClock()
    snapshot_steps = set(getattr(args, "save_model_at_steps", None) or ()) - {max_steps}  # the last is save_final's
    for module in run.trainable:
        module.train()
    while state.global_step < max_steps:
        _roll_epoch(state, accumulation, per_epoch)
        group = []
        for batch in run.batches.epoch(state.epoch, state.batches_in_epoch):
            group.append(batch)
            if len(group) < accumulation:
                continue
            run.program(state.global_step, group)
            group = []
            state.global_step += 1
            state.batches_in_epoch += accumulation
            for scheduler in run.schedulers:
                scheduler.step()
            progress.update(1)
            clock.steps += 1
            step = state.global_step
            if step % args.logging_steps == 0 or step == max_steps:
                record = _flush(run, clock, samples)
                progress.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.1f}")
                log.write(step, record)
            if step in snapshot_steps:
                with clock.paused():
                    save_model_snapshot(run, step)
            if step % args.checkpointing_steps == 0:
                with clock.paused(), run.program.host_learning_rates():
                    logger.info("Saved state to %s", save_checkpoint(acc, args.output_dir, state,
                                                                     args.checkpoints_total_limit))
            if step % getattr(args, "validation_steps", max_steps + 1) == 0 and step < max_steps:
                with clock.paused():
                    _validate(run, step)
                for module in run.trainable:
                    module.train()
            if step >= max_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    acc.wait_for_everyone()
    return state


def _roll_epoch(state: TrainingState, accumulation: int, per_epoch: int):
    """Start the next epoch when the current one has too few micro-batches left for a whole step."""
    if state.batches_in_epoch + accumulation > per_epoch:
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def _prepare_and_wait(run: TrainingRun, accumulation: int):
    """``--start_after``: compile and capture the first step (with ``--cuda_graphs``) while an earlier stage still
    uses the GPU, then wait until the file exists before training."""
    state = run.state
    if run.program.use_graphs:
        _roll_epoch(state, accumulation, run.batches.batches_per_epoch)  # where the loop's first step reads
        group = list(itertools.islice(run.batches.epoch(state.epoch, state.batches_in_epoch), accumulation))
        run.program.prepare(state.global_step, group)
    path = Path(run.args.start_after)
    if not path.exists():
        logger.info("Step prepared; waiting for %s before training", path)
        waited = time.perf_counter()
        while not path.exists():
            time.sleep(0.5)
        logger.info("%s appeared after %.0f s: training", path, time.perf_counter() - waited)
    else:
        logger.info("Step prepared; %s exists: training", path)
    run.task.on_start_after()


def _relayout(run: TrainingRun, saved_num_processes: int | None):
    """After loading a checkpoint: the data position in this run's layout (through global samples) and the LR
    schedules' step counts in this run's processes (accelerate steps a schedule once per process)."""
    acc, state = run.accelerator, run.state
    saved_b = state.micro_batch_size
    old_w, reread = state.relayout(run.args.train_batch_size, acc.num_processes, saved_num_processes)
    if old_w != acc.num_processes or (saved_b and saved_b != run.args.train_batch_size):
        logger.info("the checkpoint was written by %d process(es) x micro-batch %s; this run has %d x %d: resuming at "
                    "micro-batch %d of epoch %d%s", old_w, saved_b or "?", acc.num_processes, run.args.train_batch_size,
                    state.batches_in_epoch, state.epoch, f" ({reread} samples are seen again)" if reread else "")
    old_factor, factor = (1 if is_deepspeed(acc) else old_w), scheduler_steps_per_step(acc)
    if old_factor != factor:
        for scheduler in run.schedulers:
            inner = getattr(scheduler, "scheduler", scheduler)
            inner.last_epoch = inner.last_epoch * factor // old_factor
            inner._step_count = inner.last_epoch + 1


def _validate(run: TrainingRun, step: int):
    """``task.validate`` - on one process, with the full model; an FSDP2-sharded model is only whole at the end."""
    if is_fsdp(run.accelerator):
        if not getattr(run, "_said_no_validation", False):
            logger.warning("validation every --validation_steps is off under FSDP2 (the model is sharded across the "
                           "processes); it runs once at the end, on the gathered model.")
            run._said_no_validation = True
        return
    run.task.validate(step)


def _flush(run: TrainingRun, clock: "_WindowClock", samples_per_step: int) -> dict:
    acc = run.accelerator
    reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
    record = run.metrics.read(reduce)  # waits for the device: the window's wall time is now exact
    seconds, steps = clock.lap()
    lr = run.lr_scheduler.get_last_lr()[0]
    record.update(lr=float(lr), step_time=round(seconds / max(steps, 1), 5),
                  steps_per_s=round(steps / max(seconds, 1e-9), 3),
                  samples_per_s=round(samples_per_step * steps / max(seconds, 1e-9), 2))
    return record


class _WindowClock:
    """Wall time of the training steps of the current logging window, without checkpointing and validation."""

    def __init__(self):
        self.start, self.steps, self.excluded = time.perf_counter(), 0, 0.0

    def lap(self):
        now = time.perf_counter()
        seconds = now - self.start - self.excluded
        steps = self.steps
        self.start, self.steps, self.excluded = now, 0, 0.0
        return seconds, steps

    def paused(self):
        clock = self

        class _Pause:
            def __enter__(self):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.excluded += time.perf_counter() - self.t0

        return _Pause()


def save_model_snapshot(run: TrainingRun, step: int) -> Path:
    """``--save_model_at_steps``: the model as :func:`finish` would write it now (EMA weights when on) into
    ``<output_dir>/step-<step>``; the training weights are restored and training goes on."""
    acc, ema = run.accelerator, run.ema
    target = Path(run.args.output_dir, f"step-{step}")
    module = acc.unwrap_model(run.model)
    swap = ema is not None and not is_sharded(module)  # full_copy writes the EMA weights into the model itself
    if swap:
        ema.store(module.parameters())
    try:
        model = full_copy(acc, run.model, ema)
        if acc.is_main_process:
            was_training = model.training
            model.eval()
            run.task.save_model(model, target)
            model.train(was_training)
            logger.info("Saved the model at step %d to %s", step, target)
    finally:
        if swap:
            ema.restore(module.parameters())
    acc.wait_for_everyone()
    return target


def finish(run: TrainingRun):
    """EMA weights into the model and ``task.save_final`` on the main process (an FSDP2-sharded model is gathered
    into a full copy first, by every process); ends the trackers."""
    acc = run.accelerator
    acc.wait_for_everyone()
    model = full_copy(acc, run.model, run.ema)
    if acc.is_main_process:
        model.eval()
        run.task.save_final(model)
    acc.wait_for_everyone()
    acc.end_training()
