"""Atomic, resumable training checkpoints on top of ``accelerate``'s ``save_state``/``load_state``.

A checkpoint ``<output_dir>/checkpoint-<step>`` is first written in full to ``<output_dir>/.tmp-checkpoint-<step>``
and then renamed into place; ``latest`` only considers ``checkpoint-<int>`` folders that carry the
``training_state.json`` written last, so a process killed while saving never leaves a checkpoint that resume would pick.
It holds (through accelerate) the trainable models, optimizer, LR scheduler and RNG states, plus, through the hooks
registered by :func:`register_checkpoint_hooks`, the student in diffusers format (``unet/``; a LoRA student's adapter:
``pytorch_lora_weights.safetensors``), its EMA (``unet_ema/``)
and :class:`TrainingState` (global step, epoch, data position).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "TrainingState",
    "checkpoint_num_processes",
    "STATE_FILE",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume_checkpoint",
    "prune_checkpoints",
    "remove_incomplete",
    "save_checkpoint",
    "register_checkpoint_hooks",
    "atomic_save_pipeline",
]

STATE_FILE = "training_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    """Where training stands: optimizer steps done, the epoch, and micro-batches of that epoch consumed per process,
    with the layout that consumed them (``micro_batch_size`` samples per process and micro-batch, ``num_processes``).

    The layout makes the data position a number of *global* samples (``samples_in_epoch``, written to the checkpoint
    too), so a run resumes at another world size or micro-batch size (:meth:`relayout`; docs/distributed_training.md).
    A layout of 0 is unknown: a checkpoint written before the layout was recorded.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    seed: int = 0
    micro_batch_size: int = 0
    num_processes: int = 0

    @property
    def samples_in_epoch(self) -> int:
        """Global samples of the epoch consumed: ``batches_in_epoch x micro_batch_size x num_processes``."""
        return self.batches_in_epoch * self.micro_batch_size * self.num_processes

    def state_dict(self) -> dict:
        return {**asdict(self), "samples_in_epoch": self.samples_in_epoch}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        for key in ("global_step", "epoch", "batches_in_epoch", "seed"):
            setattr(self, key, int(state.get(key, getattr(self, key))))
        # an older checkpoint has no layout: 0 until relayout() fills it in
        self.micro_batch_size = int(state.get("micro_batch_size", 0))
        self.num_processes = int(state.get("num_processes", 0))

    def relayout(self, micro_batch_size: int, num_processes: int, saved_num_processes: int | None = None):
        """Converts the data position to the layout ``micro_batch_size x num_processes`` through global samples and
        makes it the state's layout. An unknown saved layout (older checkpoints) is taken to have this micro-batch
        size and ``saved_num_processes`` processes (default: ``num_processes``).

        Returns ``(saved_num_processes, samples re-read)``: a position that is not a whole number of the new global
        micro-batches is rounded down, so up to ``micro_batch_size x num_processes - 1`` samples are seen again.
        """
        for name, v in (("micro_batch_size", micro_batch_size), ("num_processes", num_processes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        old_b = self.micro_batch_size or micro_batch_size
        old_w = self.num_processes or saved_num_processes or num_processes
        samples = self.batches_in_epoch * old_b * old_w
        self.micro_batch_size, self.num_processes = micro_batch_size, num_processes
        self.batches_in_epoch, reread = divmod(samples, micro_batch_size * num_processes)
        return old_w, reread


def checkpoint_num_processes(checkpoint) -> int | None:
    """How many processes wrote ``checkpoint`` (accelerate saves one ``random_states_<i>.pkl`` each); ``None`` when
    it holds none."""
    n = len(list(Path(checkpoint).glob("random_states_*.pkl")))
    return n or None


def _check_dir(output_dir) -> Path:
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a path, got {type(output_dir).__name__}.")
    return Path(output_dir)


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (a checkpoint is complete when it has ``STATE_FILE``)."""
    root = _check_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint or ``None`` when there is none (fresh
    start, as in diffusers' examples); a name or path -> that checkpoint (must be complete)."""
    if resume_from_checkpoint is None:
        return None
    if not isinstance(resume_from_checkpoint, str) or not resume_from_checkpoint:
        raise ValueError(f"`resume_from_checkpoint` must be 'latest' or a checkpoint path, got {resume_from_checkpoint!r}.")
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = _check_dir(output_dir) / path
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint "
            f"(no {STATE_FILE} in {path}); use 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]}."
        )
    return path


def remove_incomplete(output_dir) -> list[Path]:
    """Deletes leftovers of interrupted saves (``.tmp-*`` folders) and returns what it removed."""
    root = _check_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def prune_checkpoints(output_dir, total_limit: int | None) -> list[Path]:
    """Keeps the newest ``total_limit`` complete checkpoints; returns the deleted ones (``None``: keep all)."""
    if total_limit is None:
        return []
    if isinstance(total_limit, bool) or not isinstance(total_limit, int) or total_limit < 1:
        raise ValueError(f"`total_limit` (--checkpoints_total_limit) must be a positive int or None, got {total_limit!r}.")
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[: max(0, len(ckpts) - total_limit)]
    for p in doomed:
        # rename first so a kill mid-delete never leaves a half-deleted folder that looks complete
        trash = p.with_name(f".tmp-delete-{p.name}-{uuid.uuid4().hex[:8]}")
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def save_checkpoint(accelerator, output_dir, state: TrainingState, total_limit: int | None = None) -> Path:
    """Saves ``accelerator``'s state as ``checkpoint-<global_step>`` atomically, then prunes old ones.

    All processes must call it (accelerate collects sharded states); only the main process renames and prunes.
    """
    if not isinstance(state, TrainingState):
        raise TypeError(f"`state` must be a TrainingState, got {type(state).__name__}.")
    root = _check_dir(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f".tmp-checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()  # before the barrier: every process writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(tmp / STATE_FILE, state.state_dict())
        _fsync_tree(tmp)
        if final.exists():  # same step saved before (e.g. resumed and re-saved): replace it
            trash = root / f".tmp-delete-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def _write_json_atomic(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path):
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def register_checkpoint_hooks(accelerator, student_cls, ema=None, state: TrainingState | None = None,
                              student_subfolder: str = "unet"):
    """diffusers-example-style hooks: the student (the first prepared model of class ``student_cls``) is saved with
    ``save_pretrained`` into ``<ckpt>/unet`` and its EMA into ``<ckpt>/unet_ema``; other prepared models (KD
    projectors) are left to accelerate. ``state`` is registered for checkpointing (``custom_checkpoint_0.pkl``).

    A peft-adapted student (LoRA, ``train_snapgen_lora.py``) is saved as its adapter only,
    ``<ckpt>/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout), and loaded back into its adapter.

    Under FSDP2 and DeepSpeed accelerate saves and loads the prepared models itself (sharded); ``unet/`` and
    ``unet_ema/`` are then written from full tensors gathered on every process (docs/distributed_training.md) and the
    EMA is loaded back into each process's shard.
    """
    from .distributed import ema_is_sharded, full_copy, full_ema_tensors, is_deepspeed, is_fsdp, load_full_ema
    from .lora import has_lora_adapter, load_lora_adapter, save_lora_adapter

    if not isinstance(student_cls, type):
        raise TypeError(f"`student_cls` must be a model class, got {student_cls!r}.")
    if state is not None:
        if not isinstance(state, TrainingState):
            raise TypeError(f"`state` must be a TrainingState, got {type(state).__name__}.")
        accelerator.register_for_checkpointing(state)

    def _is_student(model):
        return isinstance(accelerator.unwrap_model(model), student_cls)

    def _accelerate_saves_models():
        return is_fsdp(accelerator) or is_deepspeed(accelerator)

    def save_model_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if _is_student(models[i]):
                model = full_copy(accelerator, models[i])  # a collective when sharded
                if model is not None and accelerator.is_main_process:
                    if has_lora_adapter(model):  # the adapter only, loadable with load_lora_weights(checkpoint)
                        save_lora_adapter(model, output_dir)
                    else:
                        model.save_pretrained(os.path.join(output_dir, student_subfolder))
                if not _accelerate_saves_models():
                    weights.pop(i)
                break
        if ema is not None:
            if ema_is_sharded(ema):
                full = full_ema_tensors(ema)  # a collective
                if accelerator.is_main_process:
                    _save_ema_tensors(ema, full, os.path.join(output_dir, f"{student_subfolder}_ema"))
            elif accelerator.is_main_process:
                ema.save_pretrained(os.path.join(output_dir, f"{student_subfolder}_ema"))

    def load_model_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if _is_student(models[i]):
                if _accelerate_saves_models():  # accelerate loads its own (sharded) copy
                    break
                model = accelerator.unwrap_model(models.pop(i))
                if has_lora_adapter(model):
                    load_lora_adapter(model, input_dir)
                    break
                loaded = student_cls.from_pretrained(input_dir, subfolder=student_subfolder)
                model.register_to_config(**loaded.config)
                model.load_state_dict(loaded.state_dict())
                del loaded
                break
        if ema is not None:
            loaded = type(ema).from_pretrained(os.path.join(input_dir, f"{student_subfolder}_ema"), student_cls)
            sharded, shards = ema_is_sharded(ema), list(ema.shadow_params)
            ema.load_state_dict(loaded.state_dict())
            if sharded:  # keep this process's shards, filled from the full tensors
                full, ema.shadow_params = ema.shadow_params, shards
                load_full_ema(ema, full)
            else:  # from_pretrained loads on the CPU: back to the training device, where the update runs
                ema.to(accelerator.device)
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def _save_ema_tensors(ema, full: list, path: str):
    """``EMAModel.save_pretrained`` from gathered full tensors (the FSDP2 EMA keeps shards)."""
    import torch

    model = ema.model_cls.from_config(ema.model_config)
    config = ema.state_dict()
    config.pop("shadow_params", None)
    model.register_to_config(**config)
    with torch.no_grad():
        for p, s in zip(model.parameters(), full):
            p.copy_(s)
    model.save_pretrained(path)


def atomic_save_pipeline(pipeline, output_dir, **save_kwargs) -> Path:
    """``pipeline.save_pretrained`` into a temporary folder, then moves the parts into ``output_dir``.

    ``model_index.json`` is removed first and moved in last, so ``DiffusionPipeline.from_pretrained(output_dir)``
    either fails (no pipeline yet) or loads the complete new pipeline; other content of ``output_dir``
    (checkpoints, logs) is kept.
    """
    if not hasattr(pipeline, "save_pretrained"):
        raise TypeError(f"`pipeline` must be a DiffusionPipeline, got {type(pipeline).__name__}.")
    root = _check_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-pipeline-{uuid.uuid4().hex[:8]}"
    pipeline.save_pretrained(str(tmp), **save_kwargs)
    (root / "model_index.json").unlink(missing_ok=True)
    _fsync_tree(tmp)
    for entry in sorted(tmp.iterdir()):
        if entry.name == "model_index.json":
            continue
        dest = root / entry.name
        if dest.is_dir():
            trash = root / f".tmp-delete-{entry.name}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(entry, dest)
    os.replace(tmp / "model_index.json", root / "model_index.json")
    _fsync_dir(root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root
