"""Image-caption data for SnapGen training: HF datasets / ``imagefolder`` loading, deterministic augmentation,
an epoch-seeded sampler, and precomputed (cached) latents and text embeddings.

Every random choice of the data path (shuffle order, crop offset, flip, caption choice) is a pure function of
``(seed, epoch, sample index)``, so a resumed run sees exactly the samples and augmentations the uninterrupted run
would have seen after skipping the consumed batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "load_image_caption_dataset",
    "preprocess_image",
    "ImageCaptionDataset",
    "EpochShuffleSampler",
    "collate_examples",
    "build_train_dataloader",
    "cache_fingerprint",
    "LatentCache",
    "TextEmbeddingCache",
]


def _rng(seed: int, epoch: int, index: int, stream: int = 0) -> random.Random:
    """Stream 0: flip and caption choice; stream 1: crop offset."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]).generate_state(1)[0]
    return random.Random(int(state))


def load_image_caption_dataset(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None,
                               image_column="image", caption_column="text", max_train_samples=None):
    """The ``train`` split of ``dataset_name`` (HF datasets) or of ``load_dataset("imagefolder", data_dir=...)``,
    with ``image_column`` and ``caption_column`` checked to exist."""
    from datasets import load_dataset

    if dataset_name is None and train_data_dir is None:
        raise ValueError("Pass `dataset_name` (--dataset_name) or `train_data_dir` (--train_data_dir).")
    if dataset_name is not None:
        ds = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
    elif _is_flat_folder(train_data_dir):
        # one folder of images (+ metadata.jsonl) is the train split: datasets infers splits from file names too,
        # and the emoji test split's `bullet-train.png` would otherwise be the whole train split
        ds = load_dataset("imagefolder", data_files={"train": str(Path(train_data_dir) / "**")}, cache_dir=cache_dir)
    else:
        ds = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    if "train" not in ds:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(ds)}).")
    ds = ds["train"]
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in ds.column_names:
            hint = " (an imagefolder needs a metadata.jsonl with a caption field)" if flag == "--caption_column" else ""
            raise ValueError(f"{flag} {col!r} is not a dataset column; columns: {ds.column_names}{hint}.")
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise ValueError(f"`max_train_samples` must be >= 1, got {max_train_samples}.")
        ds = ds.select(range(min(max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError("the training dataset is empty.")
    return ds


def _is_flat_folder(data_dir) -> bool:
    """A local folder whose files sit at its top level (no ``train/``/``test/`` split subfolders)."""
    root = Path(data_dir)
    return root.is_dir() and not any(child.is_dir() for child in root.iterdir() if not child.name.startswith("."))


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
                     rng: random.Random | None = None) -> torch.Tensor:
    """Resize the short side to ``resolution`` (bilinear), crop a square (center, or at a ``rng`` offset), optionally
    flip horizontally, and return ``(3, resolution, resolution)`` in [-1, 1] - the diffusers examples' transform."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        rng = rng or random.Random(0)
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Wraps an HF dataset; items are ``{"pixel_values", "caption", "index", "flip"}``.

    ``set_epoch`` changes the augmentation draw; with ``load_images=False`` (latents cached) images are not decoded
    and ``pixel_values`` is omitted.
    """

    def __init__(self, dataset, image_column="image", caption_column="text", resolution=512, center_crop=False,
                 random_flip=False, seed=0, load_images=True):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"`dataset` must be an indexable dataset, got {type(dataset).__name__}.")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, bool(center_crop), bool(random_flip)
        self.seed, self.epoch, self.load_images = int(seed), 0, load_images

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def _pick_caption(self, cap, index: int, rng: random.Random | None):
        if isinstance(cap, str):
            return cap
        if isinstance(cap, (list, tuple, np.ndarray)) and len(cap) and all(isinstance(c, str) for c in cap):
            return cap[0] if rng is None else rng.choice(list(cap))
        raise ValueError(
            f"caption {index} in column {self.caption_column!r} must be a string or a list of strings, got {cap!r}."
        )

    def all_captions(self) -> list[list[str]]:
        """Every caption of every sample (a one-item list for a string caption), without decoding images."""
        column = self.dataset.select_columns([self.caption_column]) if hasattr(self.dataset, "select_columns") \
            else [self.dataset[i] for i in range(len(self))]
        out = []
        for i, row in enumerate(column):
            self._pick_caption(row[self.caption_column], i, None)  # validates the caption
            cap = row[self.caption_column]
            out.append([cap] if isinstance(cap, str) else list(cap))
        return out

    def first_captions(self) -> list[str]:
        """The first caption of every sample, without decoding images (for text-embedding caching)."""
        if hasattr(self.dataset, "select_columns"):
            column = self.dataset.select_columns([self.caption_column])
            return [self._pick_caption(row[self.caption_column], i, None) for i, row in enumerate(column)]
        return [self._pick_caption(self.dataset[i][self.caption_column], i, None) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.epoch, index)
        flip = self.random_flip and rng.random() < 0.5
        if self.load_images:
            row = self.dataset[index]
        else:  # latents are cached: read the caption column only, never decode the image
            if getattr(self, "_caption_column", None) is None:
                source = self.dataset.select_columns([self.caption_column]) if hasattr(self.dataset, "select_columns") else self.dataset
                self._caption_column = source
            row = self._caption_column[index]
        item = {"index": int(index), "flip": bool(flip), "caption": self._pick_caption(row[self.caption_column], index, rng)}
        if self.load_images:
            item["pixel_values"] = preprocess_image(
                row[self.image_column], self.resolution, self.center_crop, flip, _rng(self.seed, self.epoch, index, 1)
            )
        return item


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(num_samples)`` seeded by ``seed + epoch`` (set with ``set_epoch``; accelerate's
    prepared loaders forward their ``set_epoch`` here)."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self):
        return self.num_samples


def collate_examples(examples: list[dict]) -> dict:
    """Stacks ``pixel_values``; keeps captions as a list; ``index``/``flip`` as tensors."""
    if not examples:
        raise ValueError("`examples` is empty.")
    batch = {
        "caption": [e["caption"] for e in examples],
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "flip": torch.tensor([e["flip"] for e in examples], dtype=torch.bool),
    }
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format)
    return batch


def build_train_dataloader(dataset: ImageCaptionDataset, batch_size: int, seed: int = 0, num_workers: int = 0):
    """A ``DataLoader`` over ``dataset`` with an :class:`EpochShuffleSampler` and a private generator (so creating its
    iterator never touches the global torch RNG). Returns ``(dataloader, sampler)``."""
    if not isinstance(dataset, ImageCaptionDataset):
        raise TypeError(f"`dataset` must be an ImageCaptionDataset, got {type(dataset).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` (--train_batch_size) must be a positive int, got {batch_size!r}.")
    sampler = EpochShuffleSampler(len(dataset), seed=seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_examples, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def cache_fingerprint(**parts) -> str:
    """A short stable hash of the settings a cache depends on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _save_atomic(tensors: dict, path: Path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _PixelRows(torch.utils.data.Dataset):
    """Preprocessed pixels of every (index, flip) of an :class:`ImageCaptionDataset` (epoch-0 crops), for caching."""

    def __init__(self, dataset: ImageCaptionDataset, flips):
        self.dataset, self.flips = dataset, flips

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        ds = self.dataset
        image = ds.dataset[i][ds.image_column]
        return torch.stack([preprocess_image(image, ds.resolution, ds.center_crop, flip, _rng(ds.seed, 0, i, 1))
                            for flip in self.flips])


class LatentCache:
    """VAE latent distributions (mean and std) per dataset index, and per flip when ``random_flip``.

    ``sample(indices, flips, generator)`` draws ``mean + std * eps`` (the VAE's ``latent_dist.sample()``), in the VAE's
    unscaled space; the caller applies ``shift_factor``/``scaling_factor``. :meth:`to` moves the cache to the
    training device, where a batch is a gather (and the flips and the noise are drawn on the device).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        if mean.shape != std.shape or mean.ndim != 5:
            raise ValueError("`mean` and `std` must both be (N, n_flips, C, h, w).")
        self.mean, self.std = mean, std

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: ImageCaptionDataset, vae, batch_size: int = 8, device="cpu", dtype=torch.float32,
              path: str | os.PathLike | None = None, progress: bool = False, num_workers: int = 0):
        """Encodes every image of ``dataset`` (epoch-0 crops), or loads ``path`` if it exists; saves to ``path``.
        ``num_workers`` processes decode the images."""
        if path is not None and Path(path).is_file():
            return cls.load(path)
        from tqdm.auto import tqdm

        flips = [False, True] if dataset.random_flip else [False]
        loader = torch.utils.data.DataLoader(_PixelRows(dataset, flips), batch_size=batch_size,
                                             num_workers=num_workers)
        means, stds = [], []
        for pixels in tqdm(loader, desc="caching latents", disable=not progress):
            mean, std = cls.encode_views(vae, pixels, device, dtype)
            means.append(mean.cpu())
            stds.append(std.cpu())
        cache = cls(torch.cat(means), torch.cat(stds))
        if path is not None:
            _save_atomic({"mean": cache.mean, "std": cache.std}, Path(path))
        return cache

    @staticmethod
    @torch.no_grad()
    def encode_views(vae, views: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(mean, std)`` ``(B, F, C, h, w)`` of ``vae``'s latent distributions of ``views``
        ``(B, F, 3, H, W)`` (``F`` views of each image: itself, its mirror image)."""
        dist = vae.encode(views.flatten(0, 1).to(device=device, dtype=dtype)).latent_dist
        return dist.mean.float().unflatten(0, views.shape[:2]), dist.std.float().unflatten(0, views.shape[:2])

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["mean"], t["std"])

    def __len__(self):
        return self.mean.shape[0]

    def to(self, device) -> "LatentCache":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def _rows(self, indices: torch.Tensor, flips: torch.Tensor | None, generator: torch.Generator | None):
        device = self.mean.device
        indices = indices.to(device).long()
        if self.mean.shape[1] == 1:
            slot = torch.zeros_like(indices)
        elif flips is None:
            slot = (torch.rand(indices.shape, generator=generator, device=device) < 0.5).long()
        else:
            slot = flips.to(device).long()
        return indices, slot

    def sample(self, indices: torch.Tensor, flips: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` of ``indices``, on the cache's device; ``flips`` ``None`` draws them from
        ``generator`` (with ``random_flip`` caches)."""
        indices, slot = self._rows(indices, flips, generator)
        mean, std = self.mean[indices, slot], self.std[indices, slot]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)

    def mode(self, indices: torch.Tensor, flips: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The means of ``indices`` (``latent_dist.mode()``), flipped as in :meth:`sample`."""
        return self.mean[self._rows(indices, flips, generator)]


class TextEmbeddingCache:
    """``prompt_embeds``/``pooled_prompt_embeds`` of every caption of every sample (a sample may have several:
    rows ``sample_start[i] .. sample_start[i] + sample_count[i]``), plus the empty prompt's.

    :meth:`draw` picks one caption per sample and applies caption dropout on the cache's device; :meth:`get` returns
    each sample's first caption.
    """

    def __init__(self, embeds: torch.Tensor, pooled: torch.Tensor, empty_embeds: torch.Tensor,
                 empty_pooled: torch.Tensor, sample_start: torch.Tensor | None = None,
                 sample_count: torch.Tensor | None = None):
        if embeds.shape[0] != pooled.shape[0]:
            raise ValueError("`embeds` and `pooled` must have one row per caption.")
        if sample_start is None:
            sample_start = torch.arange(embeds.shape[0])
            sample_count = torch.ones(embeds.shape[0], dtype=torch.long)
        if sample_count is None or sample_start.shape != sample_count.shape:
            raise ValueError("`sample_start` and `sample_count` must both be given, one entry per sample.")
        self.embeds, self.pooled, self.empty_embeds, self.empty_pooled = embeds, pooled, empty_embeds, empty_pooled
        self.sample_start, self.sample_count = sample_start.long(), sample_count.long()

    @classmethod
    @torch.no_grad()
    def build(cls, captions: list, encode_fn, batch_size: int = 16, path=None, progress: bool = False,
              dtype=torch.float32):
        """``captions``: one string, or a list of strings, per sample; ``encode_fn(list_of_str) -> (embeds (B, L, D),
        pooled (B, P))``. Loads ``path`` if it exists, else encodes and saves it there."""
        if path is not None and Path(path).is_file():
            return cls.load(path)
        if not callable(encode_fn):
            raise TypeError("`encode_fn` must be callable: list[str] -> (prompt_embeds, pooled_prompt_embeds).")
        from tqdm.auto import tqdm

        per_sample = [[c] if isinstance(c, str) else list(c) for c in captions]
        if not all(per_sample) or not all(isinstance(c, str) for caps in per_sample for c in caps):
            raise TypeError("`captions` must hold, per sample, a string or a non-empty list of strings.")
        flat = [c for caps in per_sample for c in caps]
        count = torch.tensor([len(caps) for caps in per_sample], dtype=torch.long)
        start = torch.cumsum(count, 0) - count
        embeds, pooled = [], []
        for first in tqdm(range(0, len(flat), batch_size), desc="caching text embeddings", disable=not progress):
            e, p = encode_fn(flat[first : first + batch_size])
            embeds.append(e.to("cpu", dtype))
            pooled.append(p.to("cpu", dtype))
        ee, ep = encode_fn([""])
        cache = cls(torch.cat(embeds), torch.cat(pooled), ee[0].to("cpu", dtype), ep[0].to("cpu", dtype), start, count)
        if path is not None:
            _save_atomic({"embeds": cache.embeds, "pooled": cache.pooled, "empty_embeds": cache.empty_embeds,
                          "empty_pooled": cache.empty_pooled, "sample_start": cache.sample_start,
                          "sample_count": cache.sample_count}, Path(path))
        return cache

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["embeds"], t["pooled"], t["empty_embeds"], t["empty_pooled"], t.get("sample_start"),
                   t.get("sample_count"))

    def __len__(self):
        return self.sample_start.shape[0]

    def to(self, device) -> "TextEmbeddingCache":
        for name in ("embeds", "pooled", "empty_embeds", "empty_pooled", "sample_start", "sample_count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _rows(self, rows: torch.Tensor, empty: torch.Tensor | None):
        e, p = self.embeds[rows], self.pooled[rows]
        if empty is not None:
            m = empty.to(e.device).bool()
            e = torch.where(m[:, None, None], self.empty_embeds.to(e.dtype), e)
            p = torch.where(m[:, None], self.empty_pooled.to(p.dtype), p)
        return e, p

    def get(self, indices: torch.Tensor, empty: torch.Tensor | None = None):
        """Each sample's first caption; rows where ``empty`` is True get the empty prompt's embeddings."""
        return self._rows(self.sample_start[indices.to(self.sample_start.device).long()], empty)

    def draw(self, indices: torch.Tensor, generator: torch.Generator | None = None,
             proportion_empty: float = 0.0):
        """One caption per sample, drawn uniformly from its captions, and caption dropout with probability
        ``proportion_empty``; all on the cache's device, nothing read back to the host."""
        device = self.sample_start.device
        indices = indices.to(device).long()
        count = self.sample_count[indices]
        pick = (torch.rand(indices.shape, generator=generator, device=device) * count).long()
        rows = self.sample_start[indices] + torch.minimum(pick, count - 1)
        empty = None
        if proportion_empty > 0:
            empty = torch.rand(indices.shape, generator=generator, device=device) < proportion_empty
        return self._rows(rows, empty)
