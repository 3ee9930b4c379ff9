"""Reading a rendered emoji dataset (``training_examples/data/prepare_emoji.py``) and turning images into tensors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


STYLE_SUFFIX = re.compile(r"^(?P<concept>.+), (?P<style>[a-z0-9][a-z0-9 -]*) style$")


def concept_of(prompt: str) -> str:
    """The concept of a caption: ``"red apple, noto style"`` -> ``"red apple"``; a bare caption is its own concept."""
    match = STYLE_SUFFIX.match(prompt.strip())
    return match["concept"] if match else prompt.strip()


@dataclass
class RenderedSet:
    """One entry per image of a rendered dataset split: the image, its (styled) caption, its concept (the classifier
    class: the caption without the style), style, held-out kind and icon name."""

    images: list
    texts: list[str]
    concepts: list[str]
    styles: list[str]
    kinds: list[str]
    names: list[str]
    file_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def reference_images(self) -> dict:
        """Caption -> its first image (the default tone sorts first): the rendered reference of a prompt."""
        reference = {}
        for text, image in zip(self.texts, self.images):
            reference.setdefault(text, image)
        return reference


def _read_split(folder: Path, workers: int) -> list[tuple[dict, object]]:
    from PIL import Image

    rows, seen = [], set()
    for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row["file_name"] not in seen:  # training rows repeat an image with its bare caption
                seen.add(row["file_name"])
                rows.append(row)

    def load(row):
        with Image.open(folder / row["file_name"]) as image:
            return image.convert("RGB")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(zip(rows, pool.map(load, rows)))


def read_rendered(data_dir, split: str = "train+test", workers: int | None = None) -> RenderedSet:
    """The images of ``split`` (``train``, ``test`` or ``train+test``) of a rendered dataset, once each (the first
    ``metadata.jsonl`` row of an image gives its caption), decoded by ``workers`` threads."""
    path = check_data_dir(data_dir)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    if "test" in split and not (path / "test" / "metadata.jsonl").is_file():
        raise ValueError(f"`data_dir`: {str(path)!r} has no test split; re-create it with prepare_emoji.py.")
    entries = []
    for name in split.split("+"):
        for row, image in _read_split(path / name, workers or min(16, os.cpu_count() or 1)):
            if "text" not in row:
                raise ValueError(f"`data_dir`: a row of {str(path)!r} has no 'text' caption ({row}).")
            row.setdefault("kind", "seen" if name == "train" else "heldout")  # one-set data: no kind column
            entries.append((row, image))
    return RenderedSet(
        images=[image for _, image in entries], texts=[row["text"] for row, _ in entries],
        concepts=[row.get("concept") or concept_of(row["text"]) for row, _ in entries],
        styles=[row.get("style", "") for row, _ in entries],
        kinds=[row["kind"] for row, _ in entries],
        names=[row.get("name", "") for row, _ in entries], file_names=[row["file_name"] for row, _ in entries])


def load_rendered(data_dir, split: str = "train+test") -> tuple[list, list[str], list[str]]:
    """``(images, texts, names)`` of ``split``, one entry per image (:func:`read_rendered`). Images are RGB
    ``PIL.Image``."""
    rendered = read_rendered(data_dir, split)
    return rendered.images, rendered.texts, rendered.names


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
