"""Sharded, precomputed latents and text embeddings (docs/distributed_training.md): written in parallel by
``training_examples/precompute_latents.py`` (``accelerate launch --num_processes N``), read by the denoiser scripts
with ``--precompute_dir`` as their data set (the device caches of ``--cache_latents --cache_text_embeddings``).

On disk::

    <dir>/index.json                  written last: format, settings, sample count, the shard list
    <dir>/empty.safetensors           the empty prompt's embeddings (caption dropout)
    <dir>/shard-00000.safetensors     samples [0, S): mean, std (n, flips, C, h, w) float32 - the VAE's latent
                                      distributions of each sample's epoch-0 crop (and its mirror with
                                      random_flip) - embeds (m, L, D), pooled (m, P), caption_count (n,) int64 - every
                                      caption of the n samples, in order
    <dir>/shard-00001.safetensors     samples [S, 2S), ...

Shard ``k`` (samples ``[k S, (k + 1) S)``) is written by process ``k mod N`` to a temporary name and renamed, so an
interrupted run continues where it stopped; ``index.json`` is written by the main process once every shard exists.
Crops, flips and sample order are those of :class:`~.data.LatentCache` (map-style data) and
:class:`~.streaming.StreamExamples` (streams): functions of ``(seed, sample index)``.
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .data import LatentCache, TextEmbeddingCache, _rng, preprocess_image

__all__ = ["INDEX_FILE", "FORMAT", "is_precomputed", "read_index", "load_precomputed", "precompute_settings",
           "fit_text_width", "check_settings", "shard_name", "write_shard", "write_index", "encode_block"]

INDEX_FILE = "index.json"
FORMAT = "diffusers-snapgen-precomputed"
VERSION = 1


def is_precomputed(folder) -> bool:
    """Whether ``folder`` holds a complete precomputed data set (its ``index.json``)."""
    return folder is not None and Path(folder, INDEX_FILE).is_file()


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def read_index(folder) -> dict:
    path = Path(folder, INDEX_FILE)
    if not path.is_file():
        raise ValueError(f"--precompute_dir {folder} holds no {INDEX_FILE}: run training_examples/precompute_latents.py "
                         "(to the end) first.")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} index (format {index.get('format')!r}, version "
                         f"{index.get('version')!r}).")
    return index


def precompute_settings(args, vae, pipeline) -> dict:
    """What the precomputed data depends on, keyed by the flag that sets it (the encoders by a fingerprint of their
    configurations): the precompute script records it, the training scripts check it (:func:`check_settings`)."""
    from .data import cache_fingerprint

    encoders = [(type(m).__name__, getattr(getattr(m, "config", None), "hidden_size", None),
                 getattr(getattr(m, "config", None), "num_hidden_layers", None))
                for m in (getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))]
    vae_config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return {"resolution": args.resolution, "center_crop": bool(args.center_crop), "random_flip": bool(args.random_flip),
            "max_sequence_length": args.max_sequence_length,
            "pretrained_vae_model_name_or_path": "vae " + cache_fingerprint(vae=vae_config),
            "pretrained_model_name_or_path": "text encoders " + cache_fingerprint(text=encoders)}


def fit_text_width(text: TextEmbeddingCache, widths, dtype) -> TextEmbeddingCache:
    """The cache in ``dtype``, its embeddings zero-padded to the model's ``(joint_attention_dim,
    pooled_projection_dim)`` as the pipeline pads them (precomputed at the encoders' own widths)."""
    def fit(t, width, flag):
        if width is None or t.shape[-1] == width:
            return t.to(dtype)
        if t.shape[-1] > width:
            raise ValueError(f"the precomputed text embeddings are {t.shape[-1]} wide, the model's {flag} is {width}.")
        return torch.nn.functional.pad(t, (0, width - t.shape[-1])).to(dtype)

    joint, pooled = widths or (None, None)
    return TextEmbeddingCache(fit(text.embeds, joint, "joint_attention_dim"),
                              fit(text.pooled, pooled, "pooled_projection_dim"),
                              fit(text.empty_embeds, joint, "joint_attention_dim"),
                              fit(text.empty_pooled, pooled, "pooled_projection_dim"), text.sample_start,
                              text.sample_count)


def check_settings(index: dict, expected: dict):
    """Raises ``ValueError`` naming the flag whose value differs from what the data was precomputed with."""
    saved = index["settings"]
    for flag, value in expected.items():
        if flag in saved and saved[flag] != value:
            raise ValueError(f"the data in --precompute_dir was precomputed with --{flag} {saved[flag]!r}, this run "
                             f"has {value!r}: pass the same value or precompute again.")


def load_precomputed(folder, max_samples: int | None = None) -> tuple[LatentCache, TextEmbeddingCache, dict]:
    """The caches of a precomputed folder (concatenated shards, on the CPU), optionally its first ``max_samples``."""
    from safetensors.torch import load_file

    index = read_index(folder)
    means, stds, embeds, pooled, counts = [], [], [], [], []
    taken = 0
    for shard in index["shards"]:
        if max_samples is not None and taken >= max_samples:
            break
        t = load_file(str(Path(folder, shard["file"])))
        n = t["mean"].shape[0] if max_samples is None else min(t["mean"].shape[0], max_samples - taken)
        count = t["caption_count"][:n]
        means.append(t["mean"][:n])
        stds.append(t["std"][:n])
        embeds.append(t["embeds"][: int(count.sum())])
        pooled.append(t["pooled"][: int(count.sum())])
        counts.append(count)
        taken += n
    empty = load_file(str(Path(folder, index["empty"])))
    count = torch.cat(counts)
    latents = LatentCache(torch.cat(means), torch.cat(stds))
    text = TextEmbeddingCache(torch.cat(embeds), torch.cat(pooled), empty["empty_embeds"], empty["empty_pooled"],
                              torch.cumsum(count, 0) - count, count)
    return latents, text, index


def _save_atomic(tensors: dict, path: Path):
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_shard(folder, k: int, mean, std, embeds, pooled, caption_count):
    _save_atomic({"mean": mean, "std": std, "embeds": embeds, "pooled": pooled, "caption_count": caption_count},
                 Path(folder, shard_name(k)))


def write_index(folder, settings: dict, empty_embeds, empty_pooled) -> dict:
    """Lists the shards ``0..K-1`` present in ``folder`` (they must be contiguous) and writes ``index.json``."""
    from safetensors import safe_open

    folder = Path(folder)
    _save_atomic({"empty_embeds": empty_embeds, "empty_pooled": empty_pooled}, folder / "empty.safetensors")
    shards, start = [], 0
    while (folder / shard_name(len(shards))).is_file():
        with safe_open(str(folder / shard_name(len(shards))), "pt") as f:
            count = f.get_slice("mean").get_shape()[0]
            captions = f.get_slice("embeds").get_shape()[0]
        shards.append({"file": shard_name(len(shards)), "start": start, "count": count, "captions": captions})
        start += count
    later = sorted(p.name for p in folder.glob("shard-*.safetensors") if p.name not in {s["file"] for s in shards})
    if later or not shards:
        raise RuntimeError(f"the shards in {folder} are not contiguous from {shard_name(0)} (also found {later}).")
    index = {"format": FORMAT, "version": VERSION, "num_samples": start, "settings": settings,
             "empty": "empty.safetensors", "shards": shards}
    tmp = folder / f".tmp-{INDEX_FILE}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, folder / INDEX_FILE)
    return index


@torch.no_grad()
def encode_block(images: list, captions: list, first_index: int, vae, encode_text, *, resolution: int,
                 center_crop: bool, random_flip: bool, seed: int, batch_size: int, num_threads: int = 0):
    """Latent distributions and text embeddings of one shard's samples (``images``: PIL images or encoded
    ``{"bytes"}``; ``captions``: a string or a list of strings each). ``encode_text(list[str]) -> (embeds, pooled)``.
    Returns ``(mean, std, embeds, pooled, caption_count)`` on the CPU."""
    from .streaming import _caption, _decode

    flips = [False, True] if random_flip else [False]

    def pixels(k):
        index = first_index + k
        image = _decode(images[k])
        return torch.stack([preprocess_image(image, resolution, center_crop, f, _rng(seed, 0, index, 1)) for f in flips])

    means, stds, embeds, pooled, counts = [], [], [], [], []
    pool = ThreadPoolExecutor(num_threads) if num_threads else None
    try:
        for lo in range(0, len(images), batch_size):
            ks = range(lo, min(lo + batch_size, len(images)))
            x = torch.stack(list(pool.map(pixels, ks) if pool else map(pixels, ks)))
            b, f = x.shape[:2]
            dist = vae.encode(x.flatten(0, 1).to(device=vae.device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu().unflatten(0, (b, f)))
            stds.append(dist.std.float().cpu().unflatten(0, (b, f)))
            per_sample = [[c] if isinstance(c, (str, bytes)) else list(c) for c in (captions[k] for k in ks)]
            flat = [_caption(c, _rng(seed, 0, first_index + k), "caption", first_index + k)
                    for k, caps in zip(ks, per_sample) for c in caps]
            e, p = encode_text(flat)
            embeds.append(e.cpu())
            pooled.append(p.cpu())
            counts.append(torch.tensor([len(caps) for caps in per_sample], dtype=torch.long))
    finally:
        if pool is not None:
            pool.shutdown()
    return torch.cat(means), torch.cat(stds), torch.cat(embeds), torch.cat(pooled), torch.cat(counts)


# ---------------------------------------------------------------------------------------------- the script


def build_precompute_parser():
    """``training_examples/precompute_latents.py``'s command line (the data and caption flags of the training
    scripts, so the same values describe the same data)."""
    import argparse

    from .args import add_base_model_args, add_vae_encoder_arg

    p = argparse.ArgumentParser(description="Precompute sharded VAE latents and text embeddings for SnapGen training.")
    add_base_model_args(p)
    add_vae_encoder_arg(p.add_argument_group("latent encoder"))
    g = p.add_argument_group("data (as in the training scripts)")
    a = g.add_argument
    a("--dataset_name", type=str, default=None)
    a("--dataset_config_name", type=str, default=None)
    a("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it.")
    a("--train_data_dir", type=str, default=None)
    a("--train_shards", type=str, default=None, help='Tar shards, e.g. "data/{00000..00099}.tar".')
    a("--image_column", type=str, default="image")
    a("--caption_column", type=str, default="text")
    a("--max_train_samples", type=int, default=None)
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true", help="Also encode every image mirrored (training draws one per step).")
    a("--max_sequence_length", type=int, default=None)
    a("--seed", type=int, default=0, help="Seed of the random crops (without --center_crop).")
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
      help="Precision of the encoders; the text embeddings are stored in it.")
    g = p.add_argument_group("output")
    a = g.add_argument
    a("--output_dir", type=str, required=True, help="The folder to write (pass it to training as --precompute_dir).")
    a("--shard_size", type=int, default=512, help="Samples per shard file.")
    a("--batch_size", type=int, default=32, help="Images per VAE / text-encoder call.")
    a("--dataloader_num_workers", type=int, default=4, help="Threads decoding and cropping images.")
    return p


def parse_precompute_args(argv=None):
    """Parses and validates ``argv``; raises ``ValueError`` naming the flag."""
    args = build_precompute_parser().parse_args(argv)
    sources = [x is not None for x in (args.dataset_name, args.train_data_dir, args.train_shards)]
    if sum(sources) != 1:
        raise ValueError("Pass exactly one of --dataset_name, --train_data_dir and --train_shards.")
    if args.streaming and args.dataset_name is None:
        raise ValueError("--streaming streams --dataset_name: pass it.")
    for name in ("shard_size", "batch_size", "resolution"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}.")
    if args.dataloader_num_workers < 0 or (args.max_train_samples is not None and args.max_train_samples < 1):
        raise ValueError("--dataloader_num_workers must be >= 0 and --max_train_samples >= 1.")
    return args


def _blocks(args, process_index: int, num_processes: int):
    """``(shard k, first sample index, images, captions)`` of the shards of this process: ``k = p, p + N, ...``."""
    from datasets import Image as ImageFeature

    size = args.shard_size
    if args.train_shards is not None or args.streaming:
        from datasets.distributed import split_dataset_by_node

        from .streaming import load_stream

        stream, image_column, caption_column = load_stream(
            args.dataset_name, args.dataset_config_name, args.train_shards, args.cache_dir, args.image_column,
            args.caption_column, repeat=False)
        if args.max_train_samples is not None:
            stream = stream.take(args.max_train_samples)
        blocks = split_dataset_by_node(stream.batch(size), rank=process_index, world_size=num_processes,
                                       strategy="examples")
        for j, block in enumerate(blocks):
            k = j * num_processes + process_index
            yield k, k * size, block[image_column], block[caption_column]
        return
    from .data import load_image_caption_dataset

    ds = load_image_caption_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                                    args.image_column, args.caption_column, args.max_train_samples)
    ds = ds.cast_column(args.image_column, ImageFeature(decode=False))
    for k in range(process_index, -(-len(ds) // size), num_processes):
        rows = ds[k * size: (k + 1) * size]
        yield k, k * size, rows[args.image_column], rows[args.caption_column]


def run_precompute(args) -> dict | None:
    """Writes the sharded latents and text embeddings of the data set to ``--output_dir`` on every process of the
    launch (shards ``p, p + N, ...`` on process ``p``); returns the index (main process) once all are written."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .components import (
        build_pipeline, encode_captions, load_base_components, load_vae_encoder, text_widths, weight_dtype_for,
    )
    from .distributed import check_world_size

    acc = Accelerator(mixed_precision=args.mixed_precision)
    check_world_size(acc)
    dtype = weight_dtype_for(acc.mixed_precision)
    components = load_base_components(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir,
                                      dtype=dtype)
    vae = load_vae_encoder(components, args.pretrained_vae_model_name_or_path, dtype, args.revision, args.variant,
                           args.cache_dir).to(acc.device)
    pipe = build_pipeline(components, None)
    pipe._unet_text_widths = text_widths(components)  # the encoders' own widths; training pads to its model's
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(acc.device, dtype=dtype)
    settings = {**precompute_settings(args, vae, pipe), "seed": args.seed,
                "data": args.dataset_name or args.train_data_dir or args.train_shards}
    out = Path(args.output_dir)
    if is_precomputed(out):
        check_settings(read_index(out), settings)
        acc.print(f"{out} is complete already.")
        return read_index(out) if acc.is_main_process else None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    def encode_text(captions):
        e, p = encode_captions(pipe, captions, acc.device, args.max_sequence_length)
        return e.to(dtype), p.to(dtype)

    written = 0
    for k, first, images, captions in tqdm(_blocks(args, acc.process_index, acc.num_processes), desc="shards",
                                           disable=not acc.is_local_main_process):
        if Path(out, shard_name(k)).is_file():  # written by an interrupted run
            continue
        tensors = encode_block(images, captions, first, vae, encode_text, resolution=args.resolution,
                               center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
                               batch_size=args.batch_size, num_threads=args.dataloader_num_workers)
        write_shard(out, k, *tensors)
        written += 1
    acc.wait_for_everyone()
    index = None
    if acc.is_main_process:
        empty_embeds, empty_pooled = encode_text([""])
        index = write_index(out, settings, empty_embeds[0].cpu(), empty_pooled[0].cpu())
        acc.print(f"{index['num_samples']} samples in {len(index['shards'])} shards: {out}")
    acc.wait_for_everyone()
    return index
