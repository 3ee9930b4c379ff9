"""diffusers-snapgen: SnapGen (Hu et al., CVPR 2025, arXiv 2412.09619) for Hugging Face diffusers.

Importing this package makes its classes loadable through diffusers' own entry points
(``DiffusionPipeline.from_pretrained``, ``AutoPipelineForText2Image``, ``AutoModel``).
"""

__version__ = "0.1.0.dev0"

from ._registration import register as _register
from .default_model import default_model_path, load_default_pipeline
from .models import SnapGenUNet2DModel, SnapGenUNet2DOutput, TinyDecoder
from .pipelines import SnapGenPipeline, SnapGenPipelineOutput

_register()  # make DiffusionPipeline / AutoPipelineForText2Image / AutoModel find our classes

__all__ = [
    "SnapGenPipeline",
    "SnapGenPipelineOutput",
    "SnapGenUNet2DModel",
    "SnapGenUNet2DOutput",
    "TinyDecoder",
    "default_model_path",
    "load_default_pipeline",
]
