"""Reading a rendered emoji dataset (``training_examples/data/prepare_emoji.py``) and turning images into tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "train+test")


def check_data_dir(data_dir, argument: str = "data_dir") -> Path:
    """``data_dir`` as a Path; ValueError unless it holds ``train/metadata.jsonl``."""
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a folder path, got {type(data_dir).__name__}.")
    path = Path(data_dir)
    if not (path / "train" / "metadata.jsonl").is_file():
        raise ValueError(
            f"`{argument}`: {str(path)!r} is not a rendered emoji dataset (no train/metadata.jsonl); create it with "
            "training_examples/data/prepare_emoji.py."
        )
    return path


def load_rendered(data_dir, split: str = "train+test") -> tuple[list, list[str], list[str]]:
    """``(images, texts, names)`` of ``split`` (``train``, ``test`` or ``train+test``), read with datasets'
    ``imagefolder`` loader exactly as the training scripts read it. Images are RGB ``PIL.Image``."""
    path = check_data_dir(data_dir)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    if "test" in split and not (path / "test" / "metadata.jsonl").is_file():
        raise ValueError(f"`data_dir`: {str(path)!r} has no test split; re-create it with prepare_emoji.py.")
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(path), split=split)
    for column in ("image", "text"):
        if column not in dataset.column_names:
            raise ValueError(f"`data_dir`: the dataset has no {column!r} column (columns: {dataset.column_names}).")
    names = dataset["name"] if "name" in dataset.column_names else [""] * len(dataset)
    images = [image.convert("RGB") for image in dataset["image"]]
    return images, list(dataset["text"]), list(names)


def read_eval_prompts(data_dir) -> dict[str, list[str]]:
    """``{"heldout": [...], "seen": [...]}`` from the dataset's ``eval_prompts.json``."""
    path = check_data_dir(data_dir) / "eval_prompts.json"
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"`data_dir`: cannot read {str(path)!r} ({e}); re-create the dataset.") from e
    if not isinstance(prompts, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in prompts.values()
    ):
        raise ValueError(f"`data_dir`: {str(path)!r} must map prompt-set names to lists of prompts.")
    return prompts


def to_tensor(images, size: int | None = None) -> torch.Tensor:
    """Float tensor ``(N, 3, H, W)`` in [0, 1] from a list of PIL images or a tensor (uint8, or float in [0, 1]);
    resized (antialiased bilinear) to ``size`` squared when given."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}.")
        tensor = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    elif isinstance(images, Sequence) and not isinstance(images, str):
        if len(images) == 0:
            raise ValueError("`images` is empty: pass at least one image.")
        import numpy as np
        from PIL import Image

        if not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("`images` must be a tensor or a list of PIL images.")
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
            arrays.append(np.asarray(image))
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("`images` have different sizes: pass `size` to resize them.")
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    else:
        raise TypeError(f"`images` must be a tensor or a list of PIL images, got {type(images).__name__}.")
    if size is not None and tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor.clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float in [0, 1] -> uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
