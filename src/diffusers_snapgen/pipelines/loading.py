"""Checks and summaries of saved SnapGen pipeline folders (used by ``from_pretrained`` and ``snapgen info``).

Everything here reads ``model_index.json``, component configs and safetensors *headers* only: no weight is loaded.
"""

from __future__ import annotations

import json
import os

import safetensors

LIBRARY_NAME = "diffusers_snapgen"
PIPELINE_CLASS_NAME = "SnapGenPipeline"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_model_index(folder: str, argument: str = "pretrained_model_name_or_path") -> dict:
    """Return the parsed ``model_index.json`` of ``folder`` if it describes a SnapGen pipeline; ValueError if not."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"`{argument}`: {folder!r} is not a diffusers pipeline folder (no model_index.json). Pass a folder "
            "written by `SnapGenPipeline.save_pretrained` or a Hub repo id of a SnapGen pipeline."
        )
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"`{argument}`: {index_path!r} is not valid JSON ({e}); re-save the pipeline.") from e
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name != PIPELINE_CLASS_NAME:
        raise ValueError(
            f"`{argument}`: {folder!r} holds a {class_name or 'unknown'} pipeline, not a {PIPELINE_CLASS_NAME}. "
            "Load it with `diffusers.DiffusionPipeline.from_pretrained`, or pass a SnapGen pipeline."
        )
    if not isinstance(index.get("unet"), list) or index["unet"][0] is None:
        raise ValueError(f"`{argument}`: {index_path!r} declares no `unet` component; re-save the pipeline.")
    return index


def component_names(index: dict) -> list[str]:
    """Names of the non-empty components declared in a model index."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]


def check_weight_files(folder: str, index: dict, use_safetensors: bool | None, argument: str) -> None:
    """Open the header of every safetensors file of the declared components; refuse pickle-only components
    when ``use_safetensors`` is True (False/None: the caller opted in to pickle files). Raises ValueError naming
    ``argument`` and the file."""
    for name in component_names(index):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        files = sorted(os.listdir(sub))
        tensors = [f for f in files if f.endswith(".safetensors")]
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles and not tensors and use_safetensors:
            raise ValueError(
                f"`{argument}`: component {name!r} has only pickle weights ({pickles[0]}); SnapGen loads safetensors "
                "only unless you opt in. Convert them, or pass `use_safetensors=False` if you trust the files."
            )
        for file in tensors:
            path = os.path.join(sub, file)
            try:
                with safetensors.safe_open(path, framework="pt") as handle:
                    handle.keys()
            except Exception as e:  # SafetensorError, OSError: the message says which
                raise ValueError(
                    f"`{argument}`: {path!r} is not a readable safetensors file ({e}). The download or save was "
                    "probably interrupted: re-download or re-save the pipeline."
                ) from e


def parameter_count(component_folder: str) -> int | None:
    """Number of parameters stored in the safetensors files of one component folder (None when there are none)."""
    if not os.path.isdir(component_folder):
        return None
    files = [f for f in sorted(os.listdir(component_folder)) if f.endswith(".safetensors")]
    if not files:
        return None
    total = 0
    for file in files:
        with safetensors.safe_open(os.path.join(component_folder, file), framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def describe_folder(folder: str, argument: str = "model") -> dict:
    """A summary of a saved SnapGen pipeline: per component the class, parameter count and key config values,
    plus the scheduler settings. Reads configs and safetensors headers only."""
    index = read_model_index(folder, argument)
    check_weight_files(folder, index, use_safetensors=None, argument=argument)
    components = {}
    for name in component_names(index):
        library, class_name = index[name]
        sub = os.path.join(folder, name)
        config = read_json(os.path.join(sub, "config.json")) or read_json(os.path.join(sub, "scheduler_config.json"))
        components[name] = {
            "library": library,
            "class": class_name,
            "parameters": parameter_count(sub),
            "config": config or {},
        }
    return {"folder": folder, "diffusers_version": index.get("_diffusers_version"), "components": components}
