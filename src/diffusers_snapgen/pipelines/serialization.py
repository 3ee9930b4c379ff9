"""``from_pretrained`` / ``save_pretrained`` of :class:`SnapGenPipeline` (mixed in before ``DiffusionPipeline``).

- ``SnapGenPipeline.from_pretrained`` (and ``AutoPipelineForText2Image``, which calls it) checks the folder before
  diffusers loads anything: a SnapGen ``model_index.json``, readable safetensors, and no pickle-only component
  unless the caller opts in with ``use_safetensors=False``.
- ``DiffusionPipeline.from_pretrained`` loads the components itself (pickle files included, with torch's
  weights-only unpickler) before SnapGen code runs; the pipeline then refuses components that came from pickle
  files, so every pipeline entry point ends the same way.
- Loaded without ``unet`` (text encoding only), the pipeline remembers the UNet's text widths from the folder so
  :meth:`encode_prompt` pads exactly as the full pipeline does.
- ``save_pretrained`` writes no absolute local path (``_name_or_path`` of components loaded from local folders).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os

import torch
from diffusers.configuration_utils import FrozenDict
from huggingface_hub.utils import validate_hf_hub_args

from .loading import LIBRARY_NAME, PICKLE_SUFFIXES, check_weight_files, read_model_index

#: Set by :meth:`SnapGenSerializationMixin.from_pretrained` while diffusers builds the pipeline: the caller's
#: choices that ``__init__``/``register_to_config`` cannot see (``allow_pickle``, ``folder``, ``dtype``,
#: ``packaged_text_encoder``).
_LOAD_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("snapgen_load_options", default=None)
_PUBLIC_CLASSES = ("SnapGenPipeline", "SnapGenUNet2DModel", "TinyDecoder")


def current_load_options() -> dict:
    """The options of the ``SnapGenPipeline.from_pretrained`` call in progress (empty outside one)."""
    return _LOAD_OPTIONS.get() or {}


def _recorded_folder(module) -> str | None:
    """The folder a diffusers/transformers model says it was loaded from (``_name_or_path``), if any."""
    path = getattr(module, "name_or_path", None)  # transformers
    config = getattr(module, "config", None)
    if not path and hasattr(config, "get"):  # diffusers FrozenDict
        path = config.get("_name_or_path")
    return path if isinstance(path, str) and path else None


def is_local_path(value) -> bool:
    """True for strings that name a path on this machine (absolute, home-relative, or an existing file/folder)."""
    return isinstance(value, str) and bool(value) and (
        os.path.isabs(value) or value.startswith("~") or os.path.exists(value)
    )


@contextlib.contextmanager
def _without_local_paths(configurables):
    """Hide ``_name_or_path`` of diffusers configs (pipeline and models) while they are saved, when it is a local
    path. transformers does not write it to ``config.json``."""
    restore = []
    try:
        for item in configurables:
            config = getattr(item, "_internal_dict", None)
            if isinstance(config, FrozenDict) and is_local_path(config.get("_name_or_path")):
                restore.append((item, config))
                item._internal_dict = FrozenDict({k: v for k, v in config.items() if k != "_name_or_path"})
        yield
    finally:
        for item, config in reversed(restore):
            item._internal_dict = config


class SnapGenSerializationMixin:
    """Loading and saving for :class:`SnapGenPipeline`; see the module docstring."""

    @classmethod
    @validate_hf_hub_args
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved SnapGen pipeline from a folder or Hub repo id (``DiffusionPipeline.from_pretrained``
        options apply). Checks first that it is a SnapGen pipeline with readable safetensors weights.

        ``use_safetensors``: components with only pickle weights (``.bin``, ``.pt``, ...) are refused unless you
        pass ``use_safetensors=False`` (or ``None``, diffusers' "safetensors where present, else pickle"), which
        loads safetensors where present and pickle files elsewhere. Pass ``unet=None, vae=None`` to load only the
        text encoders (``encode_prompt`` then gives exactly what the full pipeline feeds its UNet), and
        ``text_encoder=None`` to skip a text encoder the folder names by package (docs/model_format.md).
        """
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "`pretrained_model_name_or_path` must be a folder path or a Hub repo id, got "
                f"{type(pretrained_model_name_or_path).__name__}."
            )
        source = os.fspath(pretrained_model_name_or_path)
        allow_pickle = "use_safetensors" in kwargs and kwargs["use_safetensors"] is not True
        kwargs["use_safetensors"] = None if allow_pickle else True
        folder = cls._checked_folder(source, kwargs)
        options = {
            "allow_pickle": allow_pickle,
            "folder": folder,
            "dtype": kwargs.get("dtype", kwargs.get("torch_dtype")),
            "packaged_text_encoder": not ("text_encoder" in kwargs and kwargs["text_encoder"] is None),
        }
        token = _LOAD_OPTIONS.set(options)
        try:
            pipe = super().from_pretrained(folder, **kwargs)
            pipe.register_to_config(_name_or_path=source)
        finally:
            _LOAD_OPTIONS.reset(token)
        return pipe

    @classmethod
    def _checked_folder(
        cls, source: str, kwargs: dict | None = None, argument: str = "pretrained_model_name_or_path"
    ) -> str:
        """Resolve ``source`` to a local folder and check it holds a SnapGen pipeline with readable weights."""
        kwargs = kwargs or {}
        folder = cls._resolve_folder(source, kwargs, argument)
        index = read_model_index(folder, argument)
        check_weight_files(folder, index, kwargs.get("use_safetensors", True), argument)
        return folder

    @classmethod
    def _resolve_folder(
        cls, source: str, kwargs: dict | None = None, argument: str = "pretrained_model_name_or_path"
    ) -> str:
        """The local folder of ``source``: itself when it is a folder, else the Hub snapshot (downloaded or
        from the cache, honouring ``HF_HUB_OFFLINE``). ValueError naming ``argument`` when neither works."""
        if os.path.isdir(source):
            return source
        kwargs = kwargs or {}
        looks_local = os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1
        if looks_local:
            raise ValueError(
                f"`{argument}`: {source!r} is not a folder. Pass the folder written by `save_pretrained`, or a Hub "
                "repo id like 'org/name'."
            )
        keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant",
                "use_safetensors", "use_onnx", "custom_pipeline", "custom_revision", "trust_remote_code")
        components, _ = cls._get_signature_keys(cls)
        download_kwargs = {k: kwargs[k] for k in (*keys, *components) if k in kwargs}
        try:
            return os.fspath(cls.download(source, **download_kwargs))
        except (OSError, ValueError) as e:  # hub errors: not cached offline, unknown repo, invalid id
            raise ValueError(
                f"`{argument}`: {source!r} is neither a local folder nor a Hub repository that "
                f"could be fetched or found in the cache ({type(e).__name__}: {e})."
            ) from e

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained``, without recording the local folders components came from."""
        with _without_local_paths([self, *self.components.values()]):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def register_to_config(self, **kwargs):
        """Record components of this package as ``["diffusers_snapgen", Class]`` (not a module path), which stays
        valid when files move inside the package; see ``_registration``. ``from_pretrained`` ends by registering
        ``_name_or_path``, which runs the checks of :meth:`_loaded_from`."""
        for name, value in kwargs.items():
            if (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and isinstance(value[0], str)
                and value[0].split(".", 1)[0].startswith(LIBRARY_NAME)
                and value[1] in _PUBLIC_CLASSES
            ):
                kwargs[name] = (LIBRARY_NAME, value[1])
        super().register_to_config(**kwargs)
        if "_name_or_path" in kwargs:
            self._loaded_from(kwargs["_name_or_path"])

    def _loaded_from(self, source) -> None:
        """After ``from_pretrained`` (any entry point): refuse components loaded from pickle files unless the
        caller opted in, and remember the UNet's text widths when the UNet was not loaded."""
        options = current_load_options()
        if not options.get("allow_pickle"):
            for name, component in self.components.items():
                folder = _recorded_folder(component) if isinstance(component, torch.nn.Module) else None
                pickles = _pickle_only_files(folder)
                if pickles:
                    raise ValueError(
                        f"`pretrained_model_name_or_path`: component {name!r} was loaded from pickle weights "
                        f"({os.path.join(folder, pickles[0])}); SnapGen pipelines load safetensors only unless you "
                        "opt in. Convert the weights to safetensors, or load with "
                        "`SnapGenPipeline.from_pretrained(..., use_safetensors=False)` if you trust the files."
                    )
        if getattr(self, "unet", None) is None and getattr(self, "_unet_text_widths", None) is None:
            if isinstance(source, os.PathLike):
                source = os.fspath(source)
            folder = options.get("folder") or (source if isinstance(source, str) and os.path.isdir(source) else None)
            config_path = os.path.join(folder, "unet", "config.json") if folder else None
            if config_path and os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
                self._unet_text_widths = (config.get("joint_attention_dim"), config.get("pooled_projection_dim"))


def _pickle_only_files(folder: str | None) -> list[str]:
    """Pickle weight files of ``folder`` when it has no safetensors file; empty otherwise."""
    if not folder or not os.path.isdir(folder):
        return []
    files = sorted(os.listdir(folder))
    if any(f.endswith(".safetensors") for f in files):
        return []
    return [f for f in files if f.endswith(PICKLE_SUFFIXES)]
