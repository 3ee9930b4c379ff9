"""Every task's optimizer step does device work only, checked on the CPU (where CUDA graphs cannot be captured).

A step that reads a device value on the host (``.item()``, ``bool(tensor)``, ``nonzero``) or creates a tensor on the
default device (on a GPU run a host tensor, copied in during the step) cannot be captured: ``--cuda_graphs`` then
falls back to eager steps, and even eager steps wait for the GPU. The runs are the engine's, built by
``benchmarks/bench_train_loop.py`` on synthetic device caches with tiny models, one per task. The step runs once
normally (lazy state is created there), then under a dispatch mode that records host reads, with ``meta`` as the
default device so that a tensor created without a device cannot be combined with the step's tensors.
"""

import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_train_loop as bench  # noqa: E402

# Every benchmark config at tiny size, so a config added there is checked here too; the paper-size UNet's step is the
# flow-matching student's at another size.
CONFIGS = [name for name in bench.CONFIGS if name != "paper1024"]

HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2",
              "unique_consecutive", "allclose"}


class _HostReads(TorchDispatchMode):
    """Records ops that read device values on the host, with the innermost frame of this package that called them.
    The CPU optimizer's own ``step.item()`` is left out: the engine's CUDA AdamW is fused and capturable."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS:
            stack = traceback.format_stack()
            if not any(f"torch{sep}optim" in frame for frame in stack for sep in "/\\"):
                ours = [frame.strip().splitlines()[0] for frame in stack if "diffusers_snapgen" in frame]
                self.found.append((name, ours[-1] if ours else "".join(stack[-6:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", CONFIGS)
def test_a_training_step_never_reads_the_device_on_the_host(config, tmp_path):
    from diffusers_snapgen.training import setup_accelerator
    from diffusers_snapgen.training.step import StepProgram

    kind, _, _, size, batch = bench.CONFIGS[config]
    args = bench._args(kind, batch, size, "eager", tmp_path, 1, 2, bench.CONFIG_FLAGS.get(config, ()))
    build = bench._reconstruction_run if kind in bench.RECONSTRUCTION else bench._denoiser_run
    run, _ = build(kind, size, batch, args, setup_accelerator(args), True)
    run.program = StepProgram(run)
    batches = run.batches.epoch(0, 0)
    run.program(0, [next(batches)])
    step_batch = [next(batches)]
    before = [p.detach().clone() for p in run.params]
    reads = _HostReads()
    torch.set_default_device("meta")
    try:
        with reads:
            run.program(1, step_batch)
    finally:
        torch.set_default_device(None)
    assert not reads.found, reads.found
    assert any(not torch.equal(b, p) for b, p in zip(before, run.params))  # the checked step did train
