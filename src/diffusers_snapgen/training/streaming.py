"""Training data that streams (docs/distributed_training.md): a Hub dataset with ``--dataset_name ... --streaming``, or
WebDataset-style tar shards with ``--train_shards "data/{00000..00099}.tar"`` (an image and a caption file per sample
key, read by datasets' ``webdataset`` builder, i.e. the standard library's ``tarfile``).

The stream is epoch-less: the data set repeats without end, and its position is the number of global samples
consumed (:class:`~.batches.StreamBatches` cuts it into micro-batches across processes). Crops, flips and the caption
choice of a sample are functions of ``(seed, global sample index)``, as for a map-style data set.
"""

from __future__ import annotations

import io
import re

import torch
from PIL import Image

from .data import _rng, preprocess_image

__all__ = ["expand_shards", "load_stream", "StreamExamples"]

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")


def expand_shards(pattern: str) -> list[str]:
    """Brace expansion of shard names, as webdataset writes them: ``"a/{00000..00002}.tar"`` -> three names (the
    width of the first bound is kept), ``"{train,extra}-0.tar"`` -> two; several patterns are joined by ``::``."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"`pattern` (--train_shards) must be a non-empty string, got {pattern!r}.")
    out = []
    for part in pattern.split("::"):
        out.extend(_expand(part.strip()))
    return out


def _expand(text: str) -> list[str]:
    """The leftmost brace group first, as a shell expands them."""
    found = [m for m in (_RANGE.search(text), _CHOICE.search(text)) if m]
    if not found:
        return [text]
    m = min(found, key=lambda m: m.start())
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"--train_shards range {m.group(0)} runs backwards.")
        width = len(lo) if lo.startswith("0") else 0
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        values = m.group(1).split(",")
    return [name for v in values for name in _expand(text[: m.start()] + v + text[m.end():])]


def load_stream(dataset_name=None, dataset_config_name=None, train_shards=None, cache_dir=None,
                image_column="image", caption_column="text", shuffle_buffer: int = 0, seed: int = 0,
                repeat: bool = True):
    """The ``train`` split as a ``datasets.IterableDataset`` - endless (the data set repeated) unless ``repeat`` is
    False - with the image column left encoded (decoded by :class:`StreamExamples`, in threads). Returns ``(stream,
    image_column, caption_column)``: for tar shards the columns are the file extensions (``jpg``/``png``/... and
    ``txt``) unless given."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if (dataset_name is None) == (train_shards is None):
        raise ValueError("Pass exactly one of `dataset_name` (--dataset_name with --streaming) and `train_shards` "
                         "(--train_shards).")
    if train_shards is not None:
        stream = load_dataset("webdataset", data_files={"train": expand_shards(train_shards)}, split="train",
                              streaming=True, cache_dir=cache_dir)
    else:
        stream = load_dataset(dataset_name, dataset_config_name, split="train", streaming=True, cache_dir=cache_dir)
    columns = list(stream.features or {})
    if train_shards is not None:
        if image_column not in columns:
            image_column = next((c for c in IMAGE_EXTENSIONS if c in columns), image_column)
        if caption_column not in columns:
            caption_column = next((c for c in CAPTION_KEYS if c in columns), caption_column)
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in columns:
            raise ValueError(f"{flag} {col!r} is not a column of the stream; columns: {columns}.")
    stream = stream.cast_column(image_column, ImageFeature(decode=False))
    if shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return (stream.repeat(None) if repeat else stream), image_column, caption_column


class StreamExamples:
    """Turns a block of stream rows (``datasets`` ``.batch()`` output) into a training micro-batch: decoded,
    resized, cropped and flipped images (``pixel_values``), one caption per sample, and the samples' global indices
    (``index``), every random choice drawn from ``(seed, global index)``."""

    def __init__(self, image_column: str, caption_column: str, resolution: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0):
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed

    def __call__(self, block: dict, first_index: int) -> dict:
        images, captions = block[self.image_column], block[self.caption_column]
        pixels, picked, flips = [], [], []
        for k, (image, caption) in enumerate(zip(images, captions)):
            index = first_index + k
            rng = _rng(self.seed, 0, index)
            flip = self.random_flip and rng.random() < 0.5
            pixels.append(preprocess_image(_decode(image), self.resolution, self.center_crop, flip,
                                           _rng(self.seed, 0, index, 1)))
            picked.append(_caption(caption, rng, self.caption_column, index))
            flips.append(flip)
        return {"pixel_values": torch.stack(pixels), "caption": picked,
                "index": torch.arange(first_index, first_index + len(pixels)), "flip": torch.tensor(flips)}


def _decode(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if isinstance(image, dict) and image.get("path"):
        return Image.open(image["path"])
    raise ValueError(f"a stream image must be encoded bytes or a path, got {type(image).__name__}.")


def _caption(caption, rng, column, index) -> str:
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    if isinstance(caption, str):
        return caption.strip()
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return rng.choice(list(caption))
    raise ValueError(f"sample {index}: caption column {column!r} must hold a string or a list of strings, got "
                     f"{type(caption).__name__}.")
