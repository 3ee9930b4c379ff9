"""A small CNN that recognises rendered emoji by concept: prompt accuracy and the feature space of FID.

The classifier is trained on the rendered dataset (all splits: it measures images, it does not generate them) with
augmentation (small affine jitter on white, contrast/brightness, blur, noise) so that it also recognises imperfect
generated images. Its classes are concepts, whatever the style (``"red apple, noto style"`` and ``"red apple"`` are
both class ``red apple``): prompt accuracy asks whether the picture shows the prompt's emoji. Saved as one
safetensors file whose metadata holds the config and the class list.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import concept_of, to_tensor

FORMAT = "diffusers-snapgen/emoji-classifier/1"


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
    )


class EmojiClassifier(nn.Module):
    """CNN: stem + one stride-2 stage per extra width, global average pooling (the feature vector), linear head.

    Args:
        classes: the class names (captions), in label order.
        image_size: side the input is resized to.
        widths: channels of the stem and of each stage.
    """

    def __init__(self, classes: Sequence[str], image_size: int = 64, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2:
            raise ValueError("`classes` must be a list of at least two class names (captions).")
        if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise ValueError("`classes` must be distinct strings.")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"`image_size` must be an integer >= 8, got {image_size!r}.")
        widths = tuple(widths)
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"`widths` must be a non-empty list of positive integers, got {widths!r}.")
        self.classes = list(classes)
        self.image_size = image_size
        self.widths = widths
        self._index = {name: i for i, name in enumerate(self.classes)}
        layers = [_conv_block(3, widths[0], 1)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [_conv_block(c_in, c_out, 2), _conv_block(c_out, c_out, 1)]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(widths[-1], len(self.classes))

    @property
    def config(self) -> dict:
        return {"classes": self.classes, "image_size": self.image_size, "widths": list(self.widths)}

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def class_index(self, prompt: str) -> int:
        """Label of ``prompt``: a class name, or a caption ``"<class>, <style> style"``; ValueError for unknown
        prompts."""
        if not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
        try:
            return self._index[prompt.strip()] if prompt.strip() in self._index else self._index[concept_of(prompt)]
        except KeyError:
            raise ValueError(
                f"prompt {prompt!r} is not a class of the classifier ({len(self.classes)} concepts of the rendered "
                "set); use the dataset's captions, e.g. from eval_prompts.json."
            ) from None

    def preprocess(self, images) -> torch.Tensor:
        """Images (PIL list or tensor in [0, 1]) -> normalised input on the classifier's device."""
        return (to_tensor(images, self.image_size).to(self.device) - 0.5) / 0.5

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)`` of a preprocessed batch."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def _batched(self, images, fn, batch_size: int) -> torch.Tensor:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        was_training = self.training
        self.eval()
        try:
            outputs = [fn(self.preprocess(images[i: i + batch_size])).float().cpu()
                       for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outputs)

    def embed(self, images, batch_size: int = 128) -> torch.Tensor:
        """Features ``(N, feature_dim)`` of images (PIL list or tensor), in eval mode, on the CPU."""
        return self._batched(images, self.features, batch_size)

    def logits(self, images, batch_size: int = 128) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images, in eval mode, on the CPU."""
        return self._batched(images, self.forward, batch_size)


# --------------------------------------------------------------------------- augmentation and training


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter (scale 0.8-1.1, rotation +-10 deg, shift +-8%; white fill), brightness/contrast, blur
    and noise on a batch in [0, 1]."""
    n, device = x.shape[0], x.device

    def uniform(low, high, shape=(n,)):
        return torch.rand(shape, generator=generator, device=generator.device).to(device) * (high - low) + low

    scale, angle = uniform(0.8, 1.1), uniform(-math.pi / 18, math.pi / 18)
    shift = uniform(-0.08, 0.08, (n, 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast, brightness = uniform(0.85, 1.15), uniform(-0.08, 0.08)
    x = (x - 0.5) * contrast.view(-1, 1, 1, 1) + 0.5 + brightness.view(-1, 1, 1, 1)
    blur = (uniform(0, 1) < 0.3).view(-1, 1, 1, 1)
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
    x = x + torch.randn(x.shape, generator=generator, device=generator.device).to(device) * uniform(0, 0.03).view(
        -1, 1, 1, 1)
    return x.clamp(0, 1)


def _learning_rate(peak: float, progress: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine to zero (``progress`` in [0, 1])."""
    if progress < warmup:
        return peak * (progress / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_classifier(
    images,
    labels: Sequence[str],
    *,
    image_size: int = 64,
    widths: Sequence[int] = (32, 64, 128, 256),
    epochs: int = 100,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.05,
    augmentation: bool = True,
    seed: int = 0,
    device=None,
    max_seconds: float | None = None,
    mixed_precision: bool | None = None,
    progress: bool = False,
) -> EmojiClassifier:
    """Train an :class:`EmojiClassifier` on ``images`` (PIL list or tensor) labelled by ``labels`` (class names:
    concepts, or captions).

    The images stay on ``device`` (uint8) and every batch is drawn and augmented there, so a GPU never waits for the
    host. AdamW; the learning rate warms up over the first 10% of training and follows a cosine to zero, training's
    progress being the larger of the step and, with ``max_seconds``, the time fraction: a time budget ends with a
    fully annealed model. ``mixed_precision`` (default: on CUDA) runs forward and backward in bfloat16 autocast.
    Returns the model in eval mode on ``device``; ``model.training_log`` holds per-epoch loss, accuracy on the
    (augmented) training batches and seconds.
    """
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not all(isinstance(s, str) for s in labels):
        raise TypeError("`labels` must be a list of caption strings.")
    if len(labels) != len(images):
        raise ValueError(f"`labels` has {len(labels)} entries but `images` has {len(images)}: pass one per image.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}.")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"`max_seconds` must be a number > 0 or None, got {max_seconds!r}.")
    from tqdm.auto import tqdm

    from .data import to_uint8

    device = torch.device(device) if device is not None else torch.device("cpu")
    mixed_precision = device.type == "cuda" if mixed_precision is None else bool(mixed_precision)
    classes = sorted(set(labels))
    torch.manual_seed(seed)
    model = EmojiClassifier(classes, image_size=image_size, widths=widths).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    data = to_uint8(to_tensor(images, image_size)).to(device)
    targets = torch.tensor([model.class_index(label) for label in labels], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    count = len(labels)
    total_steps = epochs * math.ceil(count / batch_size)
    model.training_log = []
    model.train()
    start, step, done = time.perf_counter(), 0, False
    bar = tqdm(total=epochs, desc="classifier", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator, device=device)
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for first in range(0, count, batch_size):
            fraction = step / total_steps
            if max_seconds is not None:
                fraction = max(fraction, (time.perf_counter() - start) / max_seconds)
            if fraction >= 1:
                done = True
                break
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(learning_rate, fraction)
            index = order[first: first + batch_size]
            batch = data[index].float() / 255
            batch = augment(batch, generator) if augmentation else batch
            batch = ((batch - 0.5) / 0.5).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), targets[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(index)
            total_loss += loss.detach() * len(index)
            correct += (logits.argmax(1) == targets[index]).sum()
        if seen:
            model.training_log.append({"epoch": epoch + 1, "loss": total_loss.item() / seen,
                                       "accuracy": correct.item() / seen,
                                       "seconds": round(time.perf_counter() - start, 2)})
        bar.update()
        if done:
            break
    bar.close()
    return model.to(memory_format=torch.contiguous_format).eval()


# --------------------------------------------------------------------------- saving and loading


def save_classifier(model: EmojiClassifier, path) -> Path:
    """Write ``model`` to ``path`` (safetensors; config and classes in the metadata) through a temporary file."""
    from safetensors.torch import save_file

    if not isinstance(model, EmojiClassifier):
        raise TypeError(f"`model` must be an EmojiClassifier, got {type(model).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}.")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"`path` must end in .safetensors, got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(model.config)}
    if getattr(model, "training_log", None):
        metadata["training_log"] = json.dumps(model.training_log[-1])
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_classifier(path, device=None) -> EmojiClassifier:
    """Load a classifier written by :func:`save_classifier` (eval mode)."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}.")
    if not Path(path).is_file():
        raise ValueError(f"classifier {str(path)!r} does not exist; train one with `snapgen eval --train-classifier`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"classifier {str(path)!r} is not a readable safetensors file ({e}).") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an emoji classifier of this package "
                         f"(format {metadata.get('format')!r}).")
    model = EmojiClassifier(**json.loads(metadata["config"]))
    model.load_state_dict(state, strict=True)
    return model.to(device if device is not None else "cpu").eval()
