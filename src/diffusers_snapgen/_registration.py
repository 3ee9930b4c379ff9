"""Make SnapGen classes loadable through diffusers' own entry points (DESIGN §5).

diffusers 0.42.1 has no plugin registry, so importing ``diffusers_snapgen`` registers by setting attributes:

- ``diffusers.<Class>`` for every public class: ``DiffusionPipeline.from_pretrained`` resolves a folder's
  ``_class_name`` with ``getattr(diffusers, name)``, and ``AutoModel.from_pretrained`` resolves a component's
  ``config.json`` ``_class_name`` the same way;
- ``diffusers.pipelines.diffusers_snapgen`` = this package: components saved as ``["diffusers_snapgen", Class]``
  are then found like diffusers' own pipeline-module components (``_get_library_or_raise`` and ``load_sub_model``),
  and Hub downloads accept the library name (``_get_custom_components_and_folders`` requires
  ``hasattr(diffusers.pipelines, library)``);
- ``AUTO_TEXT2IMAGE_PIPELINES_MAPPING["snapgen"]`` so ``AutoPipelineForText2Image`` maps the class name.

:meth:`SnapGenPipeline.register_to_config` records our components under the short library name
``"diffusers_snapgen"`` (not a module path), so saved folders survive moving files inside the package.
"""

from __future__ import annotations

import contextlib
import sys

AUTO_PIPELINE_KEY = "snapgen"
_registered = False


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' import-time notices (e.g. "requires torchvision") while diffusers modules that
    SnapGen needs are imported; the previous verbosity is restored."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def register() -> None:
    """Register SnapGen's classes with diffusers (idempotent; run by ``import diffusers_snapgen``)."""
    global _registered
    if _registered:
        return
    import diffusers
    import diffusers.pipelines

    package = sys.modules[__name__.rsplit(".", 1)[0]]
    for name in ("SnapGenPipeline", "SnapGenUNet2DModel", "TinyDecoder"):
        setattr(diffusers, name, getattr(package, name))
    setattr(diffusers.pipelines, package.__name__, package)

    with quiet_transformers():
        from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_KEY] = package.SnapGenPipeline
    _registered = True
