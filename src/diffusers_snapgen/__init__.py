"""diffusers-snapgen: SnapGen (Hu et al., CVPR 2025, arXiv 2412.09619) for Hugging Face diffusers.

Importing this package makes its classes loadable through diffusers' own entry points
(``DiffusionPipeline.from_pretrained``, ``AutoPipelineForText2Image``, ``AutoModel``). The import itself is light:
the public names load on first use, and the classes are registered with diffusers as soon as diffusers is imported
(see ``_registration``), so ``snapgen --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

#: Public name -> the submodule that defines it (imported on first access, PEP 562).
_LAZY = {
    "SnapGenPipeline": ".pipelines",
    "SnapGenPipelineOutput": ".pipelines",
    "SnapGenUNet2DModel": ".models",
    "SnapGenUNet2DOutput": ".models",
    "TinyDecoder": ".models",
    "TinyEncoder": ".models",
    "default_model_path": ".default_model",
    "load_default_pipeline": ".default_model",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .default_model import default_model_path, load_default_pipeline
    from .models import SnapGenUNet2DModel, SnapGenUNet2DOutput, TinyDecoder, TinyEncoder
    from .pipelines import SnapGenPipeline, SnapGenPipelineOutput


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})


from ._registration import install as _install_registration  # noqa: E402

_install_registration()  # make DiffusionPipeline / AutoPipelineForText2Image / AutoModel find our classes
