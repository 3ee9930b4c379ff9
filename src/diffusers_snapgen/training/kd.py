"""Multi-level knowledge distillation (paper §3.3, Fig. 5; docs/design.md, "Training objectives").

* Output KD: ``||v_student - v_teacher||^2`` per sample (:func:`output_kd_loss`).
* Feature KD: features of named teacher and student modules are captured by forward hooks
  (:class:`FeatureCapture`); DiT token sequences ``(B, N, C)`` are folded back onto their patch grid
  ``(B, C, H/p, W/p)``; a learned :class:`FeatureProjector` per layer pair maps the teacher map onto the
  student's channels and spatial size (the paper's description), or the student map onto the teacher's
  (``projector_direction="student_to_teacher"``, FitNets-style: the target is the fixed teacher feature, so the
  projector cannot shrink it); the loss is the per-sample MSE (:class:`MultiLevelKD`).

Layer pairs are configurable (:class:`KDLayerPair`, :func:`parse_layer_pairs`); the default for an SD3/SD3.5
teacher and a SnapGen UNet student is :func:`default_sd3_snapgen_layer_pairs` (*reconstructed*: the paper does
not list its pairs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_DIRECTIONS = ("teacher_to_student", "student_to_teacher")

__all__ = [
    "KDLayerPair",
    "parse_layer_pairs",
    "default_sd3_snapgen_layer_pairs",
    "select_feature",
    "tokens_to_map",
    "FeatureCapture",
    "FeatureProjector",
    "bilinear_resize",
    "MultiLevelKD",
    "PROJECTOR_DIRECTIONS",
    "feature_kd_from_args",
    "output_kd_loss",
    "probe_inputs",
]


@dataclass(frozen=True)
class KDLayerPair:
    """One feature-KD pair: dotted module names (``model.get_submodule`` paths) in the student and teacher.

    ``*_index`` picks the element of a tuple output (``None``: the first 4-D tensor, else the last tensor -
    which is the image stream of an SD3 ``JointTransformerBlock``'s ``(encoder_hidden_states, hidden_states)``).
    """

    student: str
    teacher: str
    student_index: int | None = None
    teacher_index: int | None = None
    weight: float = 1.0

    def __post_init__(self):
        for name in ("student", "teacher"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"KDLayerPair.{name} must be a non-empty module name, got {value!r}.")
        for name in ("student_index", "teacher_index"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"KDLayerPair.{name} must be an int or None, got {value!r}.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"KDLayerPair.weight must be a number >= 0, got {self.weight!r}.")


def parse_layer_pairs(spec) -> list[KDLayerPair]:
    """Layer pairs from a CLI string or a list.

    Accepted: ``"mid_block=transformer_blocks.19,up_blocks.0.attentions.1=transformer_blocks.28:1"``
    (``student=teacher[:teacher_index]``, comma separated), a JSON list of objects with ``KDLayerPair`` fields,
    or a list of ``KDLayerPair``/dicts/``(student, teacher)`` tuples.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("`spec` is empty: give 'student_module=teacher_module[,...]' or a JSON list.")
        if text.startswith("["):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"layer-pair JSON does not parse: {e}") from None
        else:
            pairs = []
            for item in text.split(","):
                if "=" not in item:
                    raise ValueError(f"layer pair {item!r} must read 'student_module=teacher_module[:index]'.")
                student, teacher = (s.strip() for s in item.split("=", 1))
                index = None
                if ":" in teacher:
                    teacher, idx = teacher.rsplit(":", 1)
                    if not idx.lstrip("-").isdigit():
                        raise ValueError(f"teacher output index in {item!r} must be an int.")
                    index = int(idx)
                pairs.append(KDLayerPair(student, teacher, teacher_index=index))
            return pairs
    if not isinstance(spec, (list, tuple)) or not spec:
        raise TypeError(f"`spec` must be a non-empty string or list of layer pairs, got {spec!r}.")
    out = []
    for item in spec:
        if isinstance(item, KDLayerPair):
            out.append(item)
        elif isinstance(item, dict):
            out.append(KDLayerPair(**item))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(KDLayerPair(item[0], item[1]))
        else:
            raise TypeError(f"cannot read a layer pair from {item!r}.")
    return out


def default_sd3_snapgen_layer_pairs(teacher_num_layers: int, student: nn.Module) -> list[KDLayerPair]:
    """Default pairs for an SD3/SD3.5 ``SD3Transformer2DModel`` teacher and a SnapGen UNet student (*reconstructed*).

    Four pairs spanning the student's low-resolution core and the teacher's depth: the last transformer of the
    deepest down stage, the mid block, and the last transformer of the first two up stages, matched to teacher
    blocks at 1/4, 1/2, 3/4 and ~95% depth (SD3.5-Large, 38 blocks: 9, 18, 28, 35). The teacher's image tokens
    (``teacher_index=1``) sit on an ``H/2`` grid: the student's second stage has the same size, the others are
    resized by the projectors. Pairs whose student module does not exist are skipped.
    """
    if isinstance(teacher_num_layers, bool) or not isinstance(teacher_num_layers, int) or teacher_num_layers < 1:
        raise ValueError(f"`teacher_num_layers` must be a positive int, got {teacher_num_layers!r}.")
    if not isinstance(student, nn.Module):
        raise TypeError(f"`student` must be an nn.Module, got {type(student).__name__}.")
    names = dict(student.named_modules())

    def last_attention(prefix):
        idx = [int(n.rsplit(".", 1)[1]) for n in names if n.startswith(prefix + ".attentions.") and n.count(".") == 3]
        return f"{prefix}.attentions.{max(idx)}" if idx else None

    n_down = len([n for n in names if n.startswith("down_blocks.") and n.count(".") == 1])
    candidates = [
        (last_attention(f"down_blocks.{n_down - 1}"), 0.25),
        ("mid_block" if "mid_block" in names else None, 0.5),
        (last_attention("up_blocks.0"), 0.75),
        (last_attention("up_blocks.1"), 0.95),
    ]
    pairs = []
    for name, frac in candidates:
        if name is not None:
            block = min(teacher_num_layers - 1, int(round(frac * (teacher_num_layers - 1))))
            pairs.append(KDLayerPair(name, f"transformer_blocks.{block}", teacher_index=1))
    if not pairs:
        raise ValueError("no default KD layer found in `student`: pass explicit layer pairs.")
    return pairs


def select_feature(output, index: int | None = None) -> torch.Tensor:
    """The feature tensor inside a module output (tensor, tuple/list, or ``BaseOutput`` with ``.sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):
        return output.sample
    if isinstance(output, (tuple, list)):
        if index is not None:
            if not -len(output) <= index < len(output) or not isinstance(output[index], torch.Tensor):
                raise ValueError(f"output index {index} does not hold a tensor (output has {len(output)} items).")
            return output[index]
        tensors = [o for o in output if isinstance(o, torch.Tensor)]
        for t in tensors:
            if t.ndim == 4:
                return t
        if tensors:
            return tensors[-1]
    raise TypeError(f"cannot find a feature tensor in a module output of type {type(output).__name__}.")


def tokens_to_map(tokens: torch.Tensor, grid_hw: tuple[int, int] | None) -> torch.Tensor:
    """``(B, N, C)`` tokens on a row-major ``(h, w)`` patch grid -> ``(B, C, h, w)`` (square grid if ``None``)."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise ValueError(f"`tokens` must be a (B, N, C) tensor, got {getattr(tokens, 'shape', tokens)!r}.")
    b, n, c = tokens.shape
    if grid_hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens are not a square grid: pass `grid_hw`.")
        grid_hw = (side, side)
    h, w = grid_hw
    if h * w != n:
        raise ValueError(f"grid {grid_hw} holds {h * w} tokens but the sequence has {n}.")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class FeatureCapture:
    """Forward hooks that keep the outputs of named submodules of ``model`` as feature maps.

    ``features[name]`` is ``(B, C, h, w)``: token outputs are folded onto the patch grid of the latest
    input (read by a pre-hook on ``model``: ``latent H, W // patch_size``). The first call of a module per
    :meth:`clear` wins, so gradient-checkpoint recomputation during backward does not replace it.
    ``detach=True`` stores detached tensors (teacher side).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], indices: Sequence[int | None] | None = None,
                 patch_size: int | None = None, detach: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        names = list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"`names` must list at least one module name, got {names!r}.")
        indices = [None] * len(names) if indices is None else list(indices)
        if len(indices) != len(names):
            raise ValueError(f"`indices` ({len(indices)}) must have one entry per name ({len(names)}).")
        by_name: dict[str, int | None] = {}
        for name, index in zip(names, indices):
            if name in by_name and by_name[name] != index:
                raise ValueError(f"module {name!r} is listed with two output indices ({by_name[name]}, {index}).")
            by_name[name] = index
        names, indices = list(by_name), list(by_name.values())
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no submodule {name!r}.") from None
        if patch_size is None:
            patch_size = int(getattr(getattr(model, "config", None), "patch_size", None) or 1)
        self.model, self.names, self.indices = model, names, dict(zip(names, indices))
        self.patch_size, self.detach = patch_size, detach
        self.features: dict[str, torch.Tensor] = {}
        self._grid = None
        self._handles = []

    def _pre_hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self._grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def _make_hook(self, name):
        def hook(module, args, output):
            if name in self.features:
                return
            feat = select_feature(output, self.indices[name])
            if feat.ndim == 3:
                feat = tokens_to_map(feat, self._grid)
            elif feat.ndim != 4:
                raise ValueError(f"feature of {name!r} has shape {tuple(feat.shape)}; expected (B,C,H,W) or (B,N,C).")
            self.features[name] = feat.detach() if self.detach else feat

        # torch.compile runs the hook eagerly (a graph break per captured module): a hook traced into a compiled
        # region can lose its side effect on ``features`` when the region is split or specialised
        return torch.compiler.disable(hook)

    def attach(self) -> "FeatureCapture":
        if self._handles:
            return self
        pre_hook = torch.compiler.disable(self._pre_hook)
        self._handles.append(self.model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._make_hook(name)))
        return self

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self):
        self.features.clear()

    def __getitem__(self, name):
        if name not in self.features:
            raise KeyError(f"no feature captured for {name!r}: run the model's forward first (captured: {list(self.features)}).")
        return self.features[name]

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.remove()


def _linear_weights(n_in: int, n_out: int, device) -> torch.Tensor:
    """``(n_in, n_out)``: row ``i`` is ``F.interpolate``'s linear resize (``align_corners=False``) of indicator
    ``i``."""
    eye = torch.eye(n_in, device=device, dtype=torch.float32).unsqueeze(0)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two small matrix products (rows, columns).

    Feature maps here are small (a 4x4 student map onto an 8x8 teacher grid) with many channels, where CUDA's
    channels-first bilinear kernel runs one thread per output pixel and loops over batch x channels: 9 ms a call at
    batch 128 x 384 channels on an H200, more than the teacher's forward and the KD losses together
    (benchmarks/results/bench_train_loop_h200_profile.md). Bilinear resizing is separable, so the same linear map is
    ``rows.T @ x @ cols`` with the 1-D interpolation matrices: batched GEMMs forward and backward.
    """
    h, w = x.shape[-2:]
    rows = _linear_weights(h, size[0], x.device).to(x.dtype)
    cols = _linear_weights(w, size[1], x.device).to(x.dtype)
    return rows.t() @ x @ cols


class FeatureProjector(nn.Module):
    """Maps a teacher feature map ``(B, C_t, h_t, w_t)`` onto a student's ``(B, C_s, h_s, w_s)``.

    ``kind="linear"``: a 1x1 convolution; ``"mlp"``: 1x1 conv -> SiLU -> 1x1 conv (hidden = C_s). The spatial
    resize (area when shrinking, bilinear when growing) runs where it is cheaper; for the linear kind the two
    commute, so the result does not depend on the order.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str = "linear"):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        if kind not in ("linear", "mlp"):
            raise ValueError(f"`kind` must be 'linear' or 'mlp', got {kind!r}.")
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 1)
            )

    @staticmethod
    def _resize(x, size):
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
            return F.interpolate(x, size=size, mode="area")
        return bilinear_resize(x, size)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"`x` must be a (B, C, H, W) tensor, got {getattr(x, 'shape', x)!r}.")
        x = x.to(next(self.parameters()).dtype)
        shrink = x.shape[-2] * x.shape[-1] >= size[0] * size[1]
        if self.kind == "mlp" or shrink:
            return self.proj(self._resize(x, size))
        return self._resize(self.proj(x), size)


def output_kd_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """Output KD: per-sample ``mean((v_s - v_T)^2)``, shape ``(B,)``, float32; the teacher gets no gradient."""
    for name, v in (("student_pred", student_pred), ("teacher_pred", teacher_pred)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}.")
    if student_pred.shape != teacher_pred.shape:
        raise ValueError(
            f"`student_pred` {tuple(student_pred.shape)} and `teacher_pred` {tuple(teacher_pred.shape)} differ: "
            "teacher and student must share the latent space (in/out channels) and input size."
        )
    err = (student_pred.float() - teacher_pred.detach().float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def probe_inputs(model: nn.Module, batch_size: int = 1, latent_size: int = 16, seq_len: int = 4):
    """Small random ``(latents, timesteps, encoder_hidden_states, pooled_projections)`` that fit ``model``'s
    config (``in_channels``, ``joint_attention_dim``, ``pooled_projection_dim``), on its device and dtype."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("`model` must be a diffusers model with a `config`.")
    p = next(model.parameters())
    kw = dict(device=p.device, dtype=p.dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, cfg.in_channels, latent_size, latent_size, generator=g).to(**kw)
    ehs = torch.randn(batch_size, seq_len, cfg.joint_attention_dim, generator=g).to(**kw)
    pooled = torch.randn(batch_size, cfg.pooled_projection_dim, generator=g).to(**kw)
    return latents, torch.full((batch_size,), 500.0, device=p.device), ehs, pooled


class MultiLevelKD(nn.Module):
    """Feature KD over several layer pairs; its parameters are the projectors (train them with the student).

    Use::

        kd = MultiLevelKD.from_models(student, teacher, pairs)   # probes channels with one tiny forward each
        kd.attach(student, teacher)                               # registers hooks (models are NOT submodules)
        kd.clear(); v_s = student(...); with torch.no_grad(): v_t = teacher(...)
        loss_feat = kd()                                          # (B,) per-sample, weighted mean over pairs

    ``forward`` takes no input (features come from the hooks) so a DDP-wrapped ``MultiLevelKD`` still syncs
    projector gradients.
    """

    def __init__(self, pairs: Sequence[KDLayerPair], teacher_channels: Sequence[int],
                 student_channels: Sequence[int], projector_type: str = "linear",
                 projector_direction: str = "teacher_to_student"):
        super().__init__()
        if projector_direction not in PROJECTOR_DIRECTIONS:
            raise ValueError(f"`projector_direction` must be one of {PROJECTOR_DIRECTIONS}, got {projector_direction!r}.")
        pairs = parse_layer_pairs(list(pairs))
        if not len(pairs) == len(teacher_channels) == len(student_channels):
            raise ValueError(
                f"`pairs` ({len(pairs)}), `teacher_channels` ({len(teacher_channels)}) and `student_channels` "
                f"({len(student_channels)}) must have the same length."
            )
        self.pairs = pairs
        self.projector_type = projector_type
        self.projector_direction = projector_direction
        channels = zip(teacher_channels, student_channels)
        if projector_direction == "student_to_teacher":
            channels = ((cs, ct) for ct, cs in channels)
        self.projectors = nn.ModuleList(FeatureProjector(int(c_in), int(c_out), projector_type) for c_in, c_out in channels)
        self.student_capture: FeatureCapture | None = None
        self.teacher_capture: FeatureCapture | None = None

    @classmethod
    @torch.no_grad()
    def from_models(cls, student: nn.Module, teacher: nn.Module, pairs, projector_type: str = "linear",
                    probe_latent_size: int = 16, projector_direction: str = "teacher_to_student") -> "MultiLevelKD":
        """Builds projectors whose channels are read from one tiny forward of each model."""
        pairs = parse_layer_pairs(pairs)
        from .flow_matching import denoiser_forward

        channels = []
        for model, side in ((student, "student"), (teacher, "teacher")):
            names = [getattr(p, side) for p in pairs]
            idx = [getattr(p, f"{side}_index") for p in pairs]
            cap = FeatureCapture(model, names, idx, detach=True)
            was_training = model.training
            model.eval()
            with cap:
                denoiser_forward(model, *probe_inputs(model, latent_size=probe_latent_size))
                channels.append([cap[n].shape[1] for n in names])
            model.train(was_training)
        return cls(pairs, channels[1], channels[0], projector_type, projector_direction)

    def attach(self, student: nn.Module, teacher: nn.Module) -> "MultiLevelKD":
        """Registers the hooks on (unwrapped) ``student`` and ``teacher``; call once before training."""
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"`{name}` must be an nn.Module (unwrapped from DDP), got {type(model).__name__}.")
        self.detach_hooks()
        self.student_capture = FeatureCapture(
            student, [p.student for p in self.pairs], [p.student_index for p in self.pairs]
        ).attach()
        self.teacher_capture = FeatureCapture(
            teacher, [p.teacher for p in self.pairs], [p.teacher_index for p in self.pairs], detach=True
        ).attach()
        return self

    def detach_hooks(self):
        for cap in (self.student_capture, self.teacher_capture):
            if cap is not None:
                cap.remove()
        self.student_capture = self.teacher_capture = None

    def clear(self):
        for cap in (self.student_capture, self.teacher_capture):
            if cap is not None:
                cap.clear()

    def pair_losses(self) -> list[torch.Tensor]:
        """Per-pair, per-sample MSE between the student feature and the projected teacher feature (or, with
        ``projector_direction="student_to_teacher"``, between the projected student feature and the teacher's)."""
        if self.student_capture is None:
            raise RuntimeError("MultiLevelKD is not attached: call `kd.attach(student, teacher)` first.")
        losses = []
        for pair, proj in zip(self.pairs, self.projectors):
            s, t = self.student_capture[pair.student], self.teacher_capture[pair.teacher]
            if self.projector_direction == "teacher_to_student":
                t = proj(t, tuple(s.shape[-2:]))
            else:
                s = proj(s, tuple(t.shape[-2:]))
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"batch sizes differ for pair {pair}: student {s.shape[0]}, teacher {t.shape[0]}.")
            err = (s.float() - t.float()) ** 2
            losses.append(err.reshape(err.shape[0], -1).mean(dim=1))
        return losses

    def forward(self) -> torch.Tensor:
        losses = self.pair_losses()
        total = sum(p.weight for p in self.pairs) or 1.0
        return sum(p.weight * loss for p, loss in zip(self.pairs, losses)) / total


def feature_kd_from_args(args, student: nn.Module, teacher: nn.Module) -> MultiLevelKD | None:
    """An attached :class:`MultiLevelKD` for the training scripts' ``--kd_feature_layers`` (default: SD3 -> SnapGen
    pairs), ``--kd_projector_type`` and ``--kd_projector_direction``, or ``None`` with ``--disable_feature_kd``.
    ``student`` and ``teacher`` are the unwrapped models, on the same device."""
    if args.disable_feature_kd:
        return None
    pairs = (parse_layer_pairs(args.kd_feature_layers) if args.kd_feature_layers
             else default_sd3_snapgen_layer_pairs(teacher.config.num_layers, student))
    kd = MultiLevelKD.from_models(student, teacher, pairs, projector_type=args.kd_projector_type,
                                  projector_direction=getattr(args, "kd_projector_direction", "teacher_to_student"))
    return kd.attach(student, teacher)
