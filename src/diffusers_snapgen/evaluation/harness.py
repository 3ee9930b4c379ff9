"""Compare text-to-image models on the same prompts and seeds: one table (JSON + Markdown), an image grid of every
model and a prompts x seeds grid of one model."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .classifier import EmojiClassifier
from .data import to_tensor, to_uint8
from .metrics import decoder_psnr_ssim, fid, prompt_accuracy, prompt_seed_ratio, round_trip

RENDERED = "rendered"  # name of the optional reference row: the dataset's own images
RECONSTRUCTED = "autoencoder"  # the rendered images through the encoder's autoencoder: what a perfect denoiser decodes


@dataclass
class EvaluationResult:
    """Rows of the table (one per model), the prompts (one per image, with their group) and the images."""

    rows: list[dict]
    groups: list[str]
    prompts: list[str]
    seeds: list[int]
    images: dict[str, torch.Tensor] = field(repr=False)  # name -> uint8 (N, 3, H, W), N = len(prompts)
    settings: dict = field(default_factory=dict)

    def columns(self) -> list[str]:
        names = ["model", "steps", "guidance"]
        group_names = list(dict.fromkeys(self.groups))
        names += [f"top{k}_{g}" for g in group_names for k in (1, 5)]
        names += ["fid", "prompt_seed_ratio", "psnr", "ssim", "sec_per_image"]
        return names + (["error"] if self.failed else [])

    @property
    def failed(self) -> dict[str, str]:
        """Model name -> error of the models that could not be evaluated (``continue_on_error=True``)."""
        return {row["model"]: row["error"] for row in self.rows if row.get("error")}

    def to_json(self) -> dict:
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        rows = [{k: clean(row.get(k)) for k in self.columns()} for row in self.rows]
        return {"columns": self.columns(), "rows": rows, "settings": self.settings,
                "prompts": [{"prompt": p, "group": g, "seed": s} for p, g, s in zip(self.prompts, self.groups,
                                                                                     self.seeds)]}

    def to_markdown(self) -> str:
        def cell(key, value):
            if value is None:
                return "—"
            if key == "error":
                return str(value).replace("|", "/").replace("\n", " ")
            if key.startswith("top"):
                return f"{100 * value:.1f}%"
            if key in ("ssim", "prompt_seed_ratio"):
                return "inf" if math.isinf(value) else f"{value:.3f}"
            if isinstance(value, float):
                return "inf" if math.isinf(value) else f"{value:.2f}"
            return str(value)

        columns = self.columns()
        header = [c.replace("sec_per_image", "s/image").replace("prompt_seed_ratio", "prompt/seed")
                  .replace("top1_", "top-1 ").replace("top5_", "top-5 ") for c in columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in self.rows]
        counts = {g: self.groups.count(g) for g in dict.fromkeys(self.groups)}
        per_group = ", ".join(f"{n} {g}" for g, n in counts.items())
        note = (f"\nSame prompts and seeds for every model ({per_group} images; copy j of every prompt uses seed "
                "first + j); accuracy (the prompt's concept among the classifier's top-1/top-5, whatever the style) "
                "and FID from the emoji classifier (FID against the whole rendered set; it depends on the image "
                "count, so compare rows of one table: the rendered row is the floor at this count; the autoencoder "
                "row, the rendered images through the reference autoencoder, is the ceiling of every model decoded "
                "in its latent space); prompt/seed: "
                "mean RMS pixel distance between different prompts at one seed over that between seeds of one "
                "prompt (>= 1: the prompt drives the picture); PSNR/SSIM of each model's decoder on held-out images "
                "encoded by the reference autoencoder.\n")
        return "\n".join(lines) + "\n" + note


# --------------------------------------------------------------------------- generation


def _flatten_prompts(prompts) -> tuple[list[str], list[str]]:
    if isinstance(prompts, Mapping):
        groups = {str(k): v for k, v in prompts.items()}
    elif isinstance(prompts, Sequence) and not isinstance(prompts, str):
        groups = {"all": prompts}
    else:
        raise TypeError("`prompts` must be a list of strings or a dict of prompt-set name -> list of strings.")
    flat, names = [], []
    for group, items in groups.items():
        if isinstance(items, str) or not isinstance(items, Sequence) or not all(isinstance(p, str) for p in items):
            raise TypeError(f"`prompts[{group!r}]` must be a list of strings.")
        flat += list(items)
        names += [group] * len(items)
    if not flat:
        raise ValueError("`prompts` is empty: pass at least one prompt.")
    return flat, names


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale=None,
                    height=None, width=None, batch_size: int = 8, autocast: torch.dtype | None = None) -> torch.Tensor:
    """uint8 images ``(N, 3, H, W)``, image i from ``prompts[i]`` with CPU noise seeded by ``seeds[i]`` (the same
    noise on any device and batch size). ``autocast``: a dtype (``torch.bfloat16``) to run the pipeline under
    ``torch.autocast`` on its device, e.g. fp32 weights on a GPU with bf16 matrix products."""
    if len(prompts) != len(seeds):
        raise ValueError(f"`seeds` has {len(seeds)} entries but `prompts` {len(prompts)}: pass one seed per prompt.")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"`autocast` must be torch.bfloat16, torch.float16 or None, got {autocast!r}.")
    device = getattr(pipe, "device", None)
    device_type = device.type if isinstance(device, torch.device) else "cpu"
    kwargs = {"num_inference_steps": steps, "output_type": "pt"}
    for key, value in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
        if value is not None:
            kwargs[key] = value
    out = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start: start + batch_size]]
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            images = pipe(prompt=list(prompts[start: start + batch_size]), generator=generators, **kwargs).images
        out.append(to_uint8(images if isinstance(images, torch.Tensor) else to_tensor(images)))
    return torch.cat(out)


def _check_models(models) -> list[tuple]:
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError("`models` must be a non-empty list of (name, pipeline, steps[, guidance_scale]).")
    checked, seen = [], set()
    for entry in models:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (3, 4):
            raise TypeError(f"each of `models` must be (name, pipeline, steps[, guidance_scale]), got {entry!r}.")
        name, pipe, steps = entry[:3]
        guidance = entry[3] if len(entry) == 4 else None
        if not isinstance(name, str) or not name or name in seen or name in (RENDERED, RECONSTRUCTED):
            raise ValueError(f"model names must be distinct non-empty strings other than {RENDERED!r} and "
                             f"{RECONSTRUCTED!r}; got {name!r}.")
        if not callable(pipe):
            raise TypeError(f"model {name!r}: the pipeline must be a DiffusionPipeline or a function returning one.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"model {name!r}: steps must be a positive integer, got {steps!r}.")
        if guidance is not None and (not isinstance(guidance, (int, float)) or not guidance >= 0):
            raise ValueError(f"model {name!r}: guidance_scale must be a number >= 0 or None, got {guidance!r}.")
        seen.add(name)
        checked.append((name, pipe, steps, guidance))
    return checked


def _is_class(classifier: EmojiClassifier, prompt: str) -> bool:
    try:
        classifier.class_index(prompt)
    except ValueError:
        return False
    return True


def _sync(pipe) -> None:
    device = getattr(pipe, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_models(
    models: Sequence[tuple],
    prompts,
    classifier: EmojiClassifier,
    *,
    reference_features: torch.Tensor | None = None,
    rendered: Mapping[str, object] | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    encoder=None,
    decoder_images=None,
    autocast: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
    continue_on_error: bool = False,
) -> EvaluationResult:
    """Generate, for every model, the same images (copy j of every prompt uses seed ``seed + j``, so images of
    different prompts share their noise) and measure them.

    Args:
        models: ``(name, pipeline, steps[, guidance_scale])``; ``pipeline`` is a DiffusionPipeline or a function
            returning one (loaded when its turn comes, released after). ``guidance_scale`` None: the model's default.
        prompts: a list of captions, or ``{"seen": [...], "heldout": [...]}``; accuracy is reported per group.
        classifier: the :class:`EmojiClassifier` (prompt accuracy and FID features).
        reference_features: classifier features of the rendered set for FID (``classifier.embed(images)``).
        rendered: optional caption -> rendered image; adds a first row ``"rendered"`` (the dataset's images) and,
            with ``encoder``, a row ``"autoencoder"``: those images encoded and decoded by it (the ceiling of every
            model whose latents it decodes).
        encoder, decoder_images: an ``AutoencoderKL`` and held-out images: PSNR/SSIM of each model's ``vae``.
        autocast: ``torch.bfloat16`` to sample under autocast (see :func:`generate_images`).
        progress: called with one line per finished model (e.g. ``print``).
        continue_on_error: a model that fails to load, sample or be measured gets a row with its ``error`` (and
            no images) and the next model runs, instead of the exception ending the evaluation and losing the rows
            before it. :attr:`EvaluationResult.failed` lists such models.
    """
    checked = _check_models(models)
    if not isinstance(classifier, EmojiClassifier):
        raise TypeError(f"`classifier` must be an EmojiClassifier, got {type(classifier).__name__}.")
    flat, groups = _flatten_prompts(prompts)
    unknown = sorted({p for p in flat if not _is_class(classifier, p)})
    if unknown:
        raise ValueError(f"{len(unknown)} prompts are not classes of the classifier (e.g. {unknown[0]!r}): use "
                         "captions of the rendered dataset the classifier was trained on.")
    for name, value in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an integer, got {type(seed).__name__}.")
    if not isinstance(continue_on_error, bool):
        raise TypeError(f"`continue_on_error` must be True or False, got {continue_on_error!r}.")
    if (encoder is None) != (decoder_images is None):
        raise ValueError("pass both `encoder` and `decoder_images` (decoder PSNR/SSIM), or neither.")
    prompts_rep = [p for p in flat for _ in range(images_per_prompt)]
    groups_rep = [g for g in groups for _ in range(images_per_prompt)]
    seeds = [seed + j for _ in flat for j in range(images_per_prompt)]

    def measure(name, images, steps=None, guidance=None, seconds=None, vae=None) -> dict:
        row = {"model": name, "steps": steps, "guidance": guidance, "fid": None, "prompt_seed_ratio": None,
               "psnr": None, "ssim": None}
        for group in dict.fromkeys(groups_rep):
            index = [i for i, g in enumerate(groups_rep) if g == group]
            accuracy = prompt_accuracy(images[index], [prompts_rep[i] for i in index], classifier)
            row[f"top1_{group}"], row[f"top5_{group}"] = accuracy["top1"], accuracy["top5"]
        if reference_features is not None and len(images) >= 2:
            row["fid"] = fid(classifier.embed(images), reference_features)
        if name not in (RENDERED, RECONSTRUCTED):  # reference rows: one image per prompt, whatever the seed
            row["prompt_seed_ratio"] = prompt_seed_ratio(images, prompts_rep, seeds)["ratio"]
        if vae is not None and encoder is not None:
            if id(vae) not in decoder_cache:
                decoder_cache[id(vae)] = decoder_psnr_ssim(decoder_images, encoder, vae)
            row["psnr"], row["ssim"] = decoder_cache[id(vae)]["psnr"], decoder_cache[id(vae)]["ssim"]
        row["sec_per_image"] = seconds
        return row

    decoder_cache: dict[int, dict] = {}
    rows, all_images = [], {}
    if rendered is not None:
        missing = [p for p in flat if p not in rendered]
        if missing:
            raise ValueError(f"`rendered` has no image for {len(missing)} prompts (e.g. {missing[0]!r}).")
        size = None if height is None else (height if height == width else None)
        reference = to_uint8(to_tensor([rendered[p] for p in prompts_rep], size))
        all_images[RENDERED] = reference
        rows.append(measure(RENDERED, reference))
        if encoder is not None:  # the ceiling of every model decoded through this latent space
            first = {p: i for i, p in reversed(list(enumerate(prompts_rep)))}  # one round trip per prompt
            order = {p: k for k, p in enumerate(first)}
            decoded = to_uint8(round_trip(reference[list(first.values())].float() / 255, encoder, encoder, batch_size))
            all_images[RECONSTRUCTED] = decoded[[order[p] for p in prompts_rep]]
            rows.append(measure(RECONSTRUCTED, all_images[RECONSTRUCTED]))
    def evaluate(name, pipe, steps, guidance) -> tuple[dict, torch.Tensor]:
        loaded = pipe if hasattr(pipe, "components") else pipe()
        _sync(loaded)
        start = time.perf_counter()
        images = generate_images(loaded, prompts_rep, seeds, steps, guidance, height, width, batch_size, autocast)
        _sync(loaded)
        seconds = (time.perf_counter() - start) / len(images)
        if guidance is None:  # the row names the CFG the model sampled with (its own default)
            guidance = (getattr(loaded, "sampling_defaults", None) or {}).get("guidance_scale")
        return measure(name, images, steps, guidance, seconds, getattr(loaded, "vae", None)), images

    for name, pipe, steps, guidance in checked:
        try:
            row, all_images[name] = evaluate(name, pipe, steps, guidance)
        except Exception as error:
            if not continue_on_error:
                raise
            row = {"model": name, "steps": steps, "guidance": guidance, "error": f"{type(error).__name__}: {error}"}
        rows.append(row)
        if torch.cuda.is_available():  # the loaded pipeline (if this call loaded it) is gone
            torch.cuda.empty_cache()
        if progress is not None:
            progress(f"{name}: failed: {row['error']}" if "error" in row else
                     f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                             if isinstance(v, float) and k != "guidance"))
    settings = {"seed": seed, "images_per_prompt": images_per_prompt, "height": height, "width": width,
                "batch_size": batch_size, "autocast": None if autocast is None else str(autocast).replace("torch.", ""),
                "classifier_classes": len(classifier.classes),
                "reference_images": None if reference_features is None else int(reference_features.shape[0]),
                "decoder_images": None if decoder_images is None else len(decoder_images)}
    return EvaluationResult(rows, groups_rep, prompts_rep, seeds, all_images, settings)


# --------------------------------------------------------------------------- report


def _chosen_prompts(result: EvaluationResult, max_prompts: int) -> list[int]:
    """Indices of the first image of up to ``max_prompts`` prompts, taking the prompt groups in turn."""
    firsts: dict[str, list[int]] = {}
    for i in range(0, len(result.prompts), result.settings.get("images_per_prompt", 1)):
        firsts.setdefault(result.groups[i], []).append(i)
    chosen, queues = [], [list(v) for v in firsts.values()]
    while len(chosen) < max_prompts and any(queues):
        for queue in queues:
            if queue and len(chosen) < max_prompts:
                chosen.append(queue.pop(0))
    return chosen


def _draw_grid(headers: list[str], rows: list[tuple[str, list[torch.Tensor]]], cell_size: int):
    """Labelled grid: one header per column, each row a caption and one uint8 ``(3, H, W)`` tile per column."""
    from PIL import Image, ImageDraw

    label_w, header_h, pad = 150, 22, 4
    grid = Image.new("RGB", (label_w + len(headers) * (cell_size + pad), header_h + len(rows) * (cell_size + pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for c, header in enumerate(headers):
        draw.text((label_w + c * (cell_size + pad) + 2, 5), header[: cell_size // 6], fill="black")
    for r, (caption, tiles) in enumerate(rows):
        y = header_h + r * (cell_size + pad)
        lines = [""]
        for word in caption.split():
            if len(lines[-1]) + len(word) + 1 > label_w // 7 and lines[-1]:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((4, y + 4), "\n".join(lines[:7]), fill="black")
        for c, tile in enumerate(tiles):
            image = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize((cell_size, cell_size),
                                                                          Image.Resampling.LANCZOS)
            grid.paste(image, (label_w + c * (cell_size + pad), y))
    return grid


def image_grid(result: EvaluationResult, max_prompts: int = 8, cell_size: int = 128):
    """A PIL image: one row per prompt (first image of the first ``max_prompts`` prompts, groups interleaved), one
    column per model, labelled."""
    if not isinstance(max_prompts, int) or max_prompts < 1 or not isinstance(cell_size, int) or cell_size < 16:
        raise ValueError("`max_prompts` must be >= 1 and `cell_size` >= 16.")
    steps = {row["model"]: row.get("steps") for row in result.rows}
    headers = [name if steps.get(name) is None else f"{name} ({steps[name]} st.)" for name in result.images]
    rows = [(f"{result.prompts[i]} [{result.groups[i]}]", [images[i] for images in result.images.values()])
            for i in _chosen_prompts(result, max_prompts)]
    return _draw_grid(headers, rows, cell_size)


def seed_grid(result: EvaluationResult, model: str, max_prompts: int = 16, max_seeds: int = 4, cell_size: int = 128):
    """A PIL image of one model: one row per prompt (groups interleaved), the rendered reference (when the result
    has it) then the images of the first ``max_seeds`` seeds."""
    if model not in result.images or model in (RENDERED, RECONSTRUCTED):
        evaluated = [n for n in result.images if n not in (RENDERED, RECONSTRUCTED)]
        raise ValueError(f"`model` must be one of the evaluated models {evaluated},"
                         f" got {model!r}.")
    for name, value, low in (("max_prompts", max_prompts, 1), ("max_seeds", max_seeds, 1),
                             ("cell_size", cell_size, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    copies = min(max_seeds, result.settings.get("images_per_prompt", 1))
    headers = ([RENDERED] if RENDERED in result.images else []) + [f"{model} seed {result.seeds[j]}"
                                                                   for j in range(copies)]
    rows = []
    for i in _chosen_prompts(result, max_prompts):
        tiles = [result.images[RENDERED][i]] if RENDERED in result.images else []
        rows.append((f"{result.prompts[i]} [{result.groups[i]}]", tiles + [result.images[model][i + j]
                                                                          for j in range(copies)]))
    return _draw_grid(headers, rows, cell_size)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(result: EvaluationResult, out_dir, stem: str = "eval_quality", grid_prompts: int = 8,
                 cell_size: int = 128, save_images: bool = False, seed_grid_model: str | None = None,
                 seed_grid_prompts: int = 16) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>_grid.png`` to ``out_dir`` (each through a temporary file;
    with ``seed_grid_model`` also ``<stem>_seeds.png``, its :func:`seed_grid`; with ``save_images`` also
    ``<stem>_images/<model>/<i>.png``). Returns the paths."""
    from PIL import Image

    if not isinstance(result, EvaluationResult):
        raise TypeError(f"`result` must be an EvaluationResult, got {type(result).__name__}.")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`out_dir` must be a folder path, got {type(out_dir).__name__}.")
    if seed_grid_model is not None and (seed_grid_model not in result.images or seed_grid_model == RENDERED):
        raise ValueError(f"`seed_grid_model` must be one of the evaluated models, got {seed_grid_model!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir`: {str(out)!r} exists and is not a folder.")
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "grid": out / f"{stem}_grid.png"}
    _write_atomically(paths["json"], (json.dumps(result.to_json(), indent=2) + "\n").encode("utf-8"))
    _write_atomically(paths["markdown"], result.to_markdown().encode("utf-8"))
    buffer = io.BytesIO()
    image_grid(result, grid_prompts, cell_size).save(buffer, format="PNG")
    _write_atomically(paths["grid"], buffer.getvalue())
    if seed_grid_model is not None:
        buffer = io.BytesIO()
        seed_grid(result, seed_grid_model, seed_grid_prompts, cell_size=cell_size).save(buffer, format="PNG")
        paths["seeds"] = out / f"{stem}_seeds.png"
        _write_atomically(paths["seeds"], buffer.getvalue())
    if save_images:
        for name, images in result.images.items():
            for i, image in enumerate(images):
                buffer = io.BytesIO()
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
                _write_atomically(out / f"{stem}_images" / name / f"{i:05d}.png", buffer.getvalue())
        paths["images"] = out / f"{stem}_images"
    return paths
