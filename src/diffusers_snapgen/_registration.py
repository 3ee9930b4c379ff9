"""Make SnapGen classes loadable through diffusers' own entry points (docs/design.md, "diffusers integration").

diffusers 0.42.1 has no plugin registry, so registering means setting attributes:

- ``diffusers.<Class>`` for every public class: ``DiffusionPipeline.from_pretrained`` resolves a folder's
  ``_class_name`` with ``getattr(diffusers, name)``, and ``AutoModel.from_pretrained`` resolves a component's
  ``config.json`` ``_class_name`` the same way;
- ``diffusers.pipelines.diffusers_snapgen`` = this package: components saved as ``["diffusers_snapgen", Class]``
  are then found like diffusers' own pipeline-module components (``_get_library_or_raise`` and ``load_sub_model``),
  and Hub downloads accept the library name (``_get_custom_components_and_folders`` requires
  ``hasattr(diffusers.pipelines, library)``);
- ``AUTO_TEXT2IMAGE_PIPELINES_MAPPING["snapgen"]`` so ``AutoPipelineForText2Image`` maps the class name.

``import diffusers_snapgen`` must not import torch (``snapgen --help`` stays instant), yet registering needs
diffusers and our classes. So :func:`install` registers at once when diffusers is already imported, and otherwise
right after the outermost import of diffusers or of SnapGen's models/pipelines finishes (a ``sys.meta_path`` hook
that wraps only those loaders). Either way the classes are registered before ``DiffusionPipeline`` can be used.

:meth:`SnapGenPipeline.register_to_config` records our components under the short library name
``"diffusers_snapgen"`` (not a module path), so saved folders survive moving files inside the package.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys

AUTO_PIPELINE_KEY = "snapgen"
PACKAGE = __name__.rsplit(".", 1)[0]
#: Imports after which registration is attempted (when none of them is still running).
WATCHED_MODULES = ("diffusers", f"{PACKAGE}.models", f"{PACKAGE}.pipelines")
_registered = False
_registering = False


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
    """Register SnapGen's classes with diffusers (idempotent). Imports torch, diffusers and our classes."""
    global _registered, _registering
    if _registered or _registering:
        return
    _registering = True
    try:
        import diffusers
        import diffusers.pipelines

        from .models import SnapGenUNet2DModel, TinyDecoder, TinyEncoder
        from .pipelines import SnapGenPipeline

        for cls in (SnapGenPipeline, SnapGenUNet2DModel, TinyDecoder, TinyEncoder):
            setattr(diffusers, cls.__name__, cls)
        setattr(diffusers.pipelines, PACKAGE, sys.modules[PACKAGE])
        with quiet_transformers():
            from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
        AUTO_TEXT2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_KEY] = SnapGenPipeline
        _registered = True
    finally:
        _registering = False
    _uninstall()


def install() -> None:
    """Run by ``import diffusers_snapgen``: register now if diffusers is imported, else once it is."""
    if _registered:
        return
    if "diffusers" in sys.modules and _HOOK.depth == 0:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds :data:`WATCHED_MODULES` with the other finders and wraps their loaders to count running imports;
    when the outermost one finishes and diffusers is imported, :func:`register` runs."""

    def __init__(self):
        self.depth = 0

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def finished(self) -> None:
        if self.depth == 0 and "diffusers" in sys.modules:
            register()


class _CountingLoader(importlib.abc.Loader):
    """Delegates to the real loader; tells the hook when ``exec_module`` finishes."""

    def __init__(self, loader, hook: _RegisterAfterImport):
        self._loader, self._hook = loader, hook

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._hook.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._hook.depth -= 1
        self._hook.finished()


_HOOK = _RegisterAfterImport()
