"""Run by test_distributed.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): the FSDP2 pieces of
diffusers_snapgen.training.distributed (the sharded EMA, gathered state dicts and copies; the sharded teacher is
tested in a KD run) against the same computation on unsharded tensors. Writes ``ok-<rank>`` into
the folder given as argv[1] when every check passes (an exception fails the run)."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from diffusers_snapgen.testing import tiny_unet
from diffusers_snapgen.training.distributed import (
    ema_is_sharded,
    full_copy,
    full_ema_tensors,
    full_state_dict,
    load_full_ema,
)
from diffusers_snapgen.training.engine import build_ema
from diffusers_snapgen.training.step import ema_update_


class _Args:
    use_ema, ema_decay = True, 0.9


def main(out: Path):
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    reference = tiny_unet()
    model = tiny_unet()  # the same seeded weights
    mesh = init_device_mesh("cpu", (2,))
    for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # the full state dict of the sharded model is the model's, on the main process
    state = full_state_dict(acc, model)
    if acc.is_main_process:
        assert state.keys() == reference.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    else:
        assert state == {}

    # an EMA of the shards computes the EMA of the full tensors
    ema, plain = build_ema(_Args, model), build_ema(_Args, reference)
    assert ema_is_sharded(ema) and not ema_is_sharded(plain)
    weight = torch.tensor(0.25)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.add_(1.0)
            q.add_(1.0)
    ema_update_(ema.shadow_params, list(model.parameters()), weight)
    ema_update_(plain.shadow_params, list(reference.parameters()), weight)
    full = full_ema_tensors(ema)
    assert all(torch.allclose(a, b) for a, b in zip(full, plain.shadow_params))

    # full_copy: a plain model with the EMA weights on the main process only
    copy = full_copy(acc, model, ema)
    if acc.is_main_process:
        assert type(copy) is type(reference)
        assert all(torch.allclose(a, b) for a, b in zip(copy.parameters(), plain.shadow_params))
    else:
        assert copy is None

    # loading full tensors into the shards (a checkpoint written by any number of processes)
    load_full_ema(ema, [t * 2 for t in plain.shadow_params])
    assert all(torch.allclose(a, 2 * b) for a, b in zip(full_ema_tensors(ema), plain.shadow_params))

    (out / f"ok-{acc.process_index}").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
