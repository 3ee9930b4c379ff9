"""Where the engine's micro-batches come from (docs/training_speed.md).

* :class:`DeviceIndexBatches` - the fast path: the data set lives on the training device (cached latents and text
  embeddings, or cached images), an epoch is a permutation on the device, and a micro-batch is ``{"index": (B,)}``
  that the task gathers from its caches. No data loader, no host work per step.
* :class:`LoaderBatches` - a ``DataLoader`` (images decoded and augmented in worker processes), prepared by
  accelerate.
* :class:`StreamBatches` - an endless stream (:mod:`.streaming`: tar shards, a streamed Hub dataset), decoded in
  threads; its position is the number of global samples consumed.

All three give global micro-batch ``m`` of an epoch (or of the stream) the samples ``[m B P, (m + 1) B P)`` of its order
(``B`` samples per process, ``P`` processes), process ``p`` taking ``[(m P + p) B, (m P + p + 1) B)``, and resume at the
exact micro-batch (docs/distributed_training.md).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["epoch_permutation", "DeviceIndexBatches", "LoaderBatches", "StreamBatches", "DeviceImageCache"]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch: :class:`~.data.EpochShuffleSampler`'s permutation (CPU, seeded by seed and epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=g)


class DeviceIndexBatches:
    """Micro-batches of sample indices on ``device``: epoch ``e`` is :func:`epoch_permutation` cut into global
    batches of ``batch_size x num_processes`` (the incomplete last one is dropped), each process taking its slice."""

    on_device = True
    why_not_on_device = None

    def __init__(self, num_samples: int, batch_size: int, seed: int, device, process_index: int = 0,
                 num_processes: int = 1):
        for name, v in (("num_samples", num_samples), ("batch_size", batch_size), ("num_processes", num_processes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, int(seed)
        self.device, self.process_index, self.num_processes = torch.device(device), process_index, num_processes
        self.batches_per_epoch = num_samples // (batch_size * num_processes)
        if self.batches_per_epoch < 1:
            raise ValueError(f"--train_batch_size {batch_size} x {num_processes} process(es) is larger than the "
                             f"{num_samples} training samples: use a smaller batch.")

    def epoch(self, epoch: int, start: int = 0):
        """Yields ``{"index": LongTensor(B)}`` for micro-batches ``start..`` of ``epoch``."""
        perm = epoch_permutation(self.num_samples, self.seed, epoch).to(self.device)
        b, w = self.batch_size, self.num_processes
        for position in range(start, self.batches_per_epoch):
            first = (position * w + self.process_index) * b
            yield {"index": perm[first : first + b]}


class LoaderBatches:
    """Micro-batches from a prepared ``DataLoader`` over a dataset with ``set_epoch`` (decoded images)."""

    on_device = False

    def __init__(self, accelerator, dataloader, dataset, why: str):
        self.accelerator, self.dataloader, self.dataset = accelerator, dataloader, dataset
        self.batches_per_epoch = len(dataloader)
        self.why_not_on_device = why

    def epoch(self, epoch: int, start: int = 0):
        self.dataset.set_epoch(epoch)
        loader = self.accelerator.skip_first_batches(self.dataloader, start) if start else self.dataloader
        loader.set_epoch(epoch)
        yield from loader


class StreamBatches:
    """Micro-batches of an endless ``datasets.IterableDataset`` (:func:`~.streaming.load_stream`). From global sample
    ``start x batch_size x num_processes`` on, the stream is cut into blocks of ``batch_size`` samples and block ``k``
    goes to process ``k mod num_processes`` (``datasets.distributed.split_dataset_by_node`` over the blocks: each
    process reads every block and decodes its own). ``examples(block, first_index)`` makes a micro-batch of a block
    (:class:`~.streaming.StreamExamples`); ``num_workers`` threads run it ahead of the loop.

    There are no epochs (``epochless``): the stream repeats the data set, and the engine's position in it
    (micro-batches of "epoch" 0) is a number of global samples, so a run resumes at any world size.
    """

    on_device = False
    epochless = True
    batches_per_epoch = sys.maxsize

    def __init__(self, stream, examples, batch_size: int, device, process_index: int = 0, num_processes: int = 1,
                 num_workers: int = 0, why: str = ""):
        for name, v in (("batch_size", batch_size), ("num_processes", num_processes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        if not callable(examples):
            raise TypeError("`examples` must be callable: (block, first_index) -> micro-batch dict.")
        self.stream, self.examples, self.batch_size = stream, examples, batch_size
        self.device, self.process_index, self.num_processes = torch.device(device), process_index, num_processes
        self.num_workers, self.why_not_on_device = num_workers, why

    def epoch(self, epoch: int, start: int = 0):
        """Yields this process's micro-batches from micro-batch ``start`` of the stream on (``epoch`` is always 0)."""
        from datasets.distributed import split_dataset_by_node

        b, w, p = self.batch_size, self.num_processes, self.process_index
        first = start * b * w
        blocks = (self.stream.skip(first) if first else self.stream).batch(b)
        if w > 1:
            blocks = split_dataset_by_node(blocks, rank=p, world_size=w, strategy="examples")

        def make(item):
            j, block = item
            batch = self.examples(block, first + (j * w + p) * b)
            return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}

        numbered = enumerate(blocks)
        if not self.num_workers:
            yield from map(make, numbered)
            return
        with ThreadPoolExecutor(self.num_workers) as pool:  # decoding in order, num_workers x 2 blocks ahead
            ahead = deque()
            for item in numbered:
                ahead.append(pool.submit(make, item))
                if len(ahead) > 2 * self.num_workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


class DeviceImageCache:
    """Training images on the device as uint8 ``(N, 3, S, S)`` (resized and center-cropped once); :meth:`patches`
    cuts random ``size``² patches and flips them there, drawing from the step's generator."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError("`images` must be a uint8 (N, 3, S, S) tensor.")
        self.images = images

    @classmethod
    @torch.no_grad()
    def build(cls, dataset, image_column: str, resolution: int, path=None, num_workers: int = 0,
              progress: bool = False) -> "DeviceImageCache":
        """Decodes every image of the HF ``dataset`` at ``resolution`` (or loads ``path``; saves it there)."""
        from tqdm.auto import tqdm

        if path is not None and Path(path).is_file():
            from safetensors.torch import load_file

            return cls(load_file(str(path))["images"])
        loader = torch.utils.data.DataLoader(_ImageRows(dataset, image_column, resolution), batch_size=64,
                                             num_workers=num_workers)
        images = torch.cat([b for b in tqdm(loader, desc="caching images", disable=not progress)])
        if path is not None:
            from safetensors.torch import save_file

            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
            save_file({"images": images.contiguous()}, str(tmp))
            os.replace(tmp, path)
        return cls(images)

    def __len__(self):
        return self.images.shape[0]

    def to(self, device) -> "DeviceImageCache":
        self.images = self.images.to(device)
        return self

    @torch.no_grad()
    def encode(self, vae, batch_size: int = 64, random_flip: bool = False):
        """The frozen ``vae``'s latent distributions of every cached image (and of its mirror image with
        ``random_flip``) as a :class:`~.data.LatentCache` on the images' device, in ``vae``'s unscaled space."""
        from .data import LatentCache

        means, stds = [], []
        for start in range(0, len(self), batch_size):
            x = self.images[start:start + batch_size].float() / 127.5 - 1.0
            views = torch.stack([x, x.flip(-1)], 1) if random_flip else x[:, None]
            mean, std = LatentCache.encode_views(vae, views, vae.device, vae.dtype)
            means.append(mean)
            stds.append(std)
        return LatentCache(torch.cat(means), torch.cat(stds)).to(self.images.device)

    def patches(self, index: torch.Tensor, size: int, generator: torch.Generator | None = None,
                random_flip: bool = False, flips: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, size, size)`` float patches in [-1, 1] at random offsets of the cached images ``index``, half of
        them mirrored with ``random_flip``; ``flips`` (bool ``(B,)``) mirrors those given instead."""
        images = self.images[index.to(self.images.device).long()]
        b, _, side, _ = images.shape
        device = images.device
        if side > size:
            top = (torch.rand(b, generator=generator, device=device) * (side - size + 1)).long()
            left = (torch.rand(b, generator=generator, device=device) * (side - size + 1)).long()
            offs = torch.arange(size, device=device)
            rows = (top[:, None] + offs)[:, None, :, None].expand(b, 3, size, side)
            images = images.gather(2, rows)
            cols = (left[:, None] + offs)[:, None, None, :].expand(b, 3, size, size)
            images = images.gather(3, cols)
        x = images.float() / 127.5 - 1.0
        if random_flip and flips is None:
            flips = torch.rand(b, generator=generator, device=device) < 0.5
        if flips is not None:
            x = torch.where(flips.to(device)[:, None, None, None], x.flip(-1), x)
        return x


class _ImageRows(torch.utils.data.Dataset):
    def __init__(self, dataset, image_column, resolution):
        self.dataset, self.image_column, self.resolution = dataset, image_column, resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from .data import preprocess_image

        x = preprocess_image(self.dataset[i][self.image_column], self.resolution, center_crop=True)
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
