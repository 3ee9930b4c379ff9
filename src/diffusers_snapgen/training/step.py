"""One optimizer step of the training engine, run eagerly or captured once in a CUDA graph and replayed
(docs/training_speed.md).

The step body is the same in both modes: zero the gradients; for each of the ``--gradient_accumulation_steps``
micro-batches the task's ``compute_loss`` and ``accelerator.backward``; clip; the optimizer step and the task's
auxiliary step (a discriminator's); the EMA update; the metric sums. Each micro-batch draws its random numbers from a
:class:`StepRandom` generator re-seeded before every step from ``(seed, step, slot)``, where the slot is the
micro-batch's place in the step's global batch (``micro_batch x processes + process``), so a step draws the same
numbers for the same samples however its global batch is split between processes and accumulation
(docs/distributed_training.md). The step reads its learning rate from the optimizer's param groups (device tensors
under CUDA graphs) and never waits for the device, so a replayed graph computes what the eager step computes.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["step_seed", "micro_batch_slot", "StepRandom", "ema_update_", "cuda_graphs_unsupported_reason", "StepProgram"]


def step_seed(seed: int, step: int, slot: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(seed, slot, step)``: what a step draws does not depend on anything
    that ran before it, so a resumed run draws exactly what the uninterrupted run drew. ``slot`` is the micro-batch's
    place in the step's global batch (:func:`micro_batch_slot`; the process index without accumulation)."""
    state = np.random.SeedSequence([int(seed), int(slot), int(step)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)


def micro_batch_slot(micro_batch: int, process_index: int = 0, num_processes: int = 1) -> int:
    """The place of micro-batch ``micro_batch`` of process ``process_index`` in the step's global batch: micro-batch
    ``i`` of every process comes before micro-batch ``i + 1`` of any, as the batch sources order samples (a step of
    ``P`` processes x ``A`` accumulated micro-batches covers what one process covers with ``P x A`` of them)."""
    return int(micro_batch) * int(num_processes) + int(process_index)


class StepRandom:
    """The generators every random draw of a training step uses (timesteps, noise, flips, caption dropout, latent
    samples), on the training device: one per micro-batch of the step, re-seeded before each step from the
    micro-batch's slot (:func:`micro_batch_slot`). One object for the whole run; a CUDA graph registers the
    generators once and reads their new seeds at every replay."""

    def __init__(self, device, seed: int, process_index: int = 0, num_processes: int = 1):
        self.device = torch.device(device)
        self.seed, self.process_index, self.num_processes = int(seed), int(process_index), int(num_processes)
        self.generators = [torch.Generator(device=self.device)]

    @property
    def generator(self) -> torch.Generator:
        """The first micro-batch's generator."""
        return self.generators[0]

    def reseed(self, step: int, micro_batches: int = 1) -> torch.Generator:
        """Seeds the generators of ``micro_batches`` micro-batches for ``step``; returns the first one."""
        while len(self.generators) < micro_batches:
            self.generators.append(torch.Generator(device=self.device))
        for i in range(micro_batches):
            slot = micro_batch_slot(i, self.process_index, self.num_processes)
            self.generators[i].manual_seed(step_seed(self.seed, step, slot))
        return self.generators[0]


@torch.no_grad()
def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor):
    """``shadow -= weight * (shadow - param)`` for trainable params (copy for frozen ones), with ``weight = 1 -
    decay`` a device tensor: diffusers' ``EMAModel.step`` arithmetic, capturable (the decay changes every step)."""
    trained = [(s, p) for s, p in zip(shadow, params) if p.requires_grad]
    frozen = [(s, p) for s, p in zip(shadow, params) if not p.requires_grad]
    if frozen:
        torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
    if trained:
        s_list = [s for s, _ in trained]
        diff = torch._foreach_sub(s_list, [p.detach() for _, p in trained])
        torch._foreach_mul_(diff, weight)
        torch._foreach_sub_(s_list, diff)


def cuda_graphs_unsupported_reason(accelerator, device) -> str | None:
    """Why ``--cuda_graphs`` cannot run here (``None`` when it can)."""
    if torch.device(device).type != "cuda":
        return f"the training device is {device}, not a CUDA GPU"
    if accelerator.num_processes > 1:
        return (f"{accelerator.num_processes} processes: DDP/FSDP communication is not captured (each process steps "
                "eagerly)")
    if accelerator.mixed_precision == "fp16":
        return "fp16 mixed precision needs a gradient scaler that synchronises with the host: use --mixed_precision bf16"
    return None


class _Snapshot:
    """Parameters, optimizer states and EMA weights, restored in place after the warm-up steps of a capture."""

    def __init__(self, optimizers, ema_shadow):
        self.params, self.states, self.fresh = [], [], []
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    self.params.append((p, p.detach().clone()))
                    state = opt.state.get(p)
                    if state:
                        self.states.append({k: (v, v.detach().clone()) for k, v in state.items()
                                            if isinstance(v, torch.Tensor)})
                    else:
                        self.fresh.append((opt, p))
        self.shadow = [(s, s.detach().clone()) for s in ema_shadow]

    @torch.no_grad()
    def restore(self):
        for p, saved in self.params:
            p.copy_(saved)
        for state in self.states:
            for live, saved in state.values():
                live.copy_(saved)
        for opt, p in self.fresh:  # created by the warm-up: a fresh AdamW state is all zeros, step 0
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        for live, saved in self.shadow:
            live.copy_(saved)


class _CapturedStep:
    def __init__(self, graph, static_batches):
        self.graph, self.static_batches = graph, static_batches

    def replay(self, micro_batches):
        for static, batch in zip(self.static_batches, micro_batches):
            for key, buffer in static.items():
                buffer.copy_(batch[key], non_blocking=True)
        self.graph.replay()


class StepProgram:
    """Runs optimizer steps of a :class:`~.engine.TrainingRun` (``run``): eagerly, or (``cuda_graphs``) each distinct
    step variant (``task.step_variant(step)``, e.g. before/after a GAN term starts) captured once and replayed.

    Capture: the step runs ``warmup_steps`` times on a side stream (torch.compile compiles there, optimizer states are
    created), parameters/optimizer states/EMA are restored, learning rates become device tensors that the LR schedule
    fills, then one step is captured with its micro-batch tensors as static inputs.
    """

    def __init__(self, run, cuda_graphs: bool = False, warmup_steps: int = 2):
        self.run = run
        device = run.accelerator.device
        self.random = StepRandom(device, run.args.seed, run.accelerator.process_index, run.accelerator.num_processes)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.use_graphs, self.warmup_steps = bool(cuda_graphs), warmup_steps
        self.graphs: dict = {}
        self.pool = None
        if self.use_graphs:
            reason = cuda_graphs_unsupported_reason(run.accelerator, device)
            if reason is None and not run.batches.on_device:
                reason = run.batches.why_not_on_device
            if reason is not None:
                if run.accelerator.is_main_process:  # one line for the run, not one per process
                    logger.warning("--cuda_graphs is off: %s. Training steps run eagerly.", reason)
                self.use_graphs = False
        self.mode = "cuda_graph" if self.use_graphs else "eager"

    # -------------------------------------------------------------------------------------------- the step body

    def _ema_params(self):
        return [p for p in self.run.accelerator.unwrap_model(self.run.model).parameters()]

    def _no_sync(self):
        """Gradient accumulation without communication: ``accelerator.no_sync`` of every trained module (the model,
        KD projectors, discriminators), so gradients are all-reduced once, in the last micro-batch."""
        acc = self.run.accelerator
        stack = contextlib.ExitStack()
        if acc.num_processes > 1:
            for module in self.run.trainable:
                stack.enter_context(acc.no_sync(module))
        return stack

    def body(self, micro_batches: list[dict], variant=None):
        run = self.run
        acc, task = run.accelerator, run.task
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        task.variant = variant
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with self._no_sync() if i < last else contextlib.nullcontext():
                out = task.compute_loss(batch, self.random.generators[i])
                acc.backward(out.loss)
            run.metrics.add(out)
        if run.args.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(run.params, run.args.max_grad_norm)
            if norm is not None:
                run.metrics.add_step({"grad_norm": norm})
        run.optimizer.step()
        task.auxiliary_step()
        if run.ema is not None:
            ema_update_(run.ema.shadow_params, self._ema_params(), self.ema_weight)

    # -------------------------------------------------------------------------------------------- stepping

    def __call__(self, step: int, micro_batches: list[dict]):
        """Runs optimizer step ``step`` (0-based) on ``micro_batches``."""
        variant = self.run.task.step_variant(step)
        self.random.reseed(step, len(micro_batches))
        ema = self.run.ema
        if ema is not None:  # EMAModel.step's bookkeeping, on the host; the arithmetic runs in the body
            ema.optimization_step += 1
            ema.cur_decay_value = ema.get_decay(ema.optimization_step)
            self.ema_weight.fill_(1.0 - ema.cur_decay_value)
        captured = self._graph_for(step, micro_batches, variant) if self.use_graphs else None
        if captured is None:
            self.body(micro_batches, variant)
            return
        captured.replay(micro_batches)

    def prepare(self, step: int, micro_batches: list[dict]):
        """Compile and capture step ``step``'s graph now, on these micro-batches, without training (the capture leaves
        no trace in weights, optimizer states, EMA or metrics). Nothing to do without CUDA graphs."""
        if self.use_graphs:
            self._graph_for(step, micro_batches, self.run.task.step_variant(step))

    def _graph_for(self, step: int, micro_batches: list[dict], variant):
        """The captured graph of ``variant``, captured now if needed; ``None`` once capture failed (eager from then)."""
        captured = self.graphs.get(variant)
        if captured is None:
            try:
                captured = self.graphs[variant] = self._capture(micro_batches, variant, step)
            except Exception as e:  # noqa: BLE001 - any capture failure: say why, train on eagerly
                logger.warning("--cuda_graphs is off: capturing the step failed (%s: %s). Training steps run eagerly.",
                               type(e).__name__, e)
                self.use_graphs, self.mode = False, "eager"
                self.random.reseed(step, len(micro_batches))  # the failed capture drew from the step's generators
        return captured

    def _capture(self, micro_batches, variant, step) -> _CapturedStep:
        run = self.run
        device = run.accelerator.device
        static = []
        for batch in micro_batches:
            if not all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in batch.values()):
                raise TypeError("CUDA-graph steps need micro-batches of CUDA tensors (the device caches).")
            static.append({k: v.detach().clone() for k, v in batch.items()})
        self._device_learning_rates(device)
        snapshot = _Snapshot(run.optimizers, run.ema.shadow_params if run.ema is not None else [])
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    self.random.reseed(step, len(static))
                    self.body(static, variant)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            for opt in run.optimizers:
                opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            for generator in self.random.generators[: len(static)]:
                graph.register_generator_state(generator)
            self.random.reseed(step, len(static))
            with torch.cuda.graph(graph, pool=self.pool):
                self.body(static, variant)
        finally:  # the warm-up steps (and a failed capture) leave no trace in the weights or the metrics
            torch.cuda.synchronize()
            snapshot.restore()
            run.metrics.reset()
            for opt in run.optimizers:
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.zero_()
        if self.pool is None:
            self.pool = graph.pool()
        logger.info("captured the training step%s in a CUDA graph",
                    "" if variant is None else f" (variant {variant!r})")
        return _CapturedStep(graph, static)

    def _device_learning_rates(self, device):
        """AdamW(capturable) reads ``lr`` from a device tensor; the LR schedule ``fill_``s it on every step."""
        for opt in self.run.optimizers:
            for group in opt.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    @contextlib.contextmanager
    def host_learning_rates(self):
        """Plain-float learning rates while a checkpoint is written (so it resumes in eager mode too); the same device
        tensors afterwards (the captured graphs read their memory)."""
        saved = []
        for opt in self.run.optimizers:
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    saved.append((group, group["lr"]))
                    group["lr"] = float(group["lr"])
        try:
            yield
        finally:
            for group, tensor in saved:
                tensor.fill_(group["lr"])
                group["lr"] = tensor
