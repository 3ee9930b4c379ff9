"""What the engine does differently under several processes (docs/distributed_training.md): DDP, FSDP2 (accelerate's
``fsdp_version: 2``) and DeepSpeed ZeRO-2.

* FSDP2 shards the trained model in place: its parameters become ``DTensor`` shards. The EMA is then built from the
  shards (each process keeps the EMA of its shard); saving a diffusers folder gathers full tensors on every process
  (a collective) and writes them from the main process (:func:`full_state_dict`, :func:`full_ema_tensors`).
* DeepSpeed wraps exactly one model, takes the micro-batch size from its config, steps the optimizer (at its own
  accumulation boundary) and the LR schedule inside ``accelerator.backward``: :func:`configure_deepspeed` and
  :func:`scheduler_steps_per_step`.
* A frozen module (the KD/ASD teacher) is replicated on every process, or sharded with FSDP2 across them
  (:func:`shard_frozen_module`), with DDP and FSDP2 alike.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "check_world_size",
    "is_fsdp",
    "is_deepspeed",
    "is_sharded",
    "ema_is_sharded",
    "scheduler_steps_per_step",
    "configure_deepspeed",
    "full_state_dict",
    "full_ema_tensors",
    "load_full_ema",
    "shard_frozen_module",
    "full_copy",
]


def check_world_size(accelerator):
    """Raises when the launcher started more processes than accelerate sees (e.g. a GPU config on a machine without
    GPUs): each would work alone, on the same files."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > accelerator.num_processes:
        fix = ("accelerate runs DeepSpeed on GPUs only" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else
               "on a machine without GPUs set ACCELERATE_USE_CPU=true (gloo)")
        raise RuntimeError(
            f"launched as {world} processes but accelerate runs {accelerator.num_processes}: each would work alone on "
            f"the same files; {fix}. See docs/distributed_training.md.")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP2 (``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def ema_is_sharded(ema) -> bool:
    """Whether an ``EMAModel`` holds FSDP2 shards (built from a sharded model)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(s, DTensor) for s in ema.shadow_params)


def scheduler_steps_per_step(accelerator) -> int:
    """How many times the LR schedule steps per optimizer step: accelerate's prepared schedule steps once per process
    (so the engine builds it over ``steps x processes``); DeepSpeed steps it once, inside its optimizer step."""
    return 1 if is_deepspeed(accelerator) else accelerator.num_processes


def configure_deepspeed(accelerator, micro_batch_size: int, num_models: int):
    """Fills DeepSpeed's batch keys from the run (the engine passes no DataLoader to ``prepare`` when the data is on
    the device) and refuses what one DeepSpeed engine cannot train. A no-op without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return
    if num_models > 1:
        raise ValueError(
            f"DeepSpeed trains one model per engine, this run trains {num_models} (the model plus KD projectors or a "
            "discriminator): use the DDP or FSDP2 config (training_examples/configs/), or --disable_feature_kd.")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    accumulation = accelerator.gradient_accumulation_steps
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch_size * accumulation * accelerator.num_processes


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_state_dict(accelerator, model: torch.nn.Module) -> dict:
    """The full state dict of ``model`` (prepared or not). FSDP2: a collective (every process must call it); the
    tensors land on the CPU of the main process (other processes get ``{}``). Otherwise the unwrapped model's."""
    module = accelerator.unwrap_model(model)
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def full_ema_tensors(ema) -> list[torch.Tensor]:
    """The EMA's shadow parameters as full tensors (a collective when they are FSDP2 shards)."""
    return [_full_tensor(s) for s in ema.shadow_params]


@torch.no_grad()
def load_full_ema(ema, full: list[torch.Tensor]):
    """Copies full tensors into the EMA's shadow parameters, each process keeping its shard of a ``DTensor``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if len(full) != len(ema.shadow_params):
        raise ValueError(f"the EMA has {len(ema.shadow_params)} tensors, the checkpoint {len(full)}.")
    for shadow, value in zip(ema.shadow_params, full):
        if isinstance(shadow, DTensor):
            value = distribute_tensor(value.to(shadow.device, shadow.dtype), shadow.device_mesh, shadow.placements)
        shadow.copy_(value)


def full_copy(accelerator, model: torch.nn.Module, ema=None) -> torch.nn.Module | None:
    """A plain, full copy of the trained diffusers ``model`` on the main process (``None`` elsewhere), with the EMA
    weights when ``ema`` is given: the model itself (no copy) unless it is FSDP2-sharded, when building it is a
    collective (every process must call it)."""
    module = accelerator.unwrap_model(model)
    if not is_sharded(module):
        if ema is not None:
            ema.copy_to(module.parameters())
        return module
    state = full_state_dict(accelerator, module)
    shadow = full_ema_tensors(ema) if ema is not None else None
    if not accelerator.is_main_process:
        return None
    copy = type(module).from_config(module.config)
    copy.load_state_dict(state)
    if shadow is not None:
        with torch.no_grad():
            for p, s in zip(copy.parameters(), shadow):
                p.copy_(s)
    return copy.to(accelerator.device)


def shard_frozen_module(module: torch.nn.Module, accelerator, block_lists=("transformer_blocks",)) -> torch.nn.Module:
    """Shards a frozen module (the teacher) across all processes with FSDP2: each block of ``block_lists`` and the
    rest of the module become ``fully_shard`` units, so a process holds ``1 / processes`` of the weights and
    all-gathers one block at a time in forward (and backward, when a loss backpropagates through it, as ASD's
    adversarial term does). Every process must then run the module's forwards in step. A no-op with one process."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be an nn.Module (the frozen teacher), got {type(module).__name__}.")
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError("`module` must be frozen (requires_grad False): trained modules are sharded by accelerate.")
    if accelerator.num_processes < 2:
        return module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = 0
    for name in block_lists:
        for block in getattr(module, name, None) or []:
            fully_shard(block, mesh=mesh)
            blocks += 1
    fully_shard(module, mesh=mesh)
    logger.info("sharded the frozen %s across %d processes (FSDP2, %d blocks)", type(module).__name__,
                accelerator.num_processes, blocks)
    return module
