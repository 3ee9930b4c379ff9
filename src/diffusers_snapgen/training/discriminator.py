"""Discriminators: a diffusion-GAN discriminator on frozen teacher features (adversarial step distillation, paper
§3.4) and a patch-GAN discriminator on pixels (tiny-decoder training, paper §3.2).

:class:`TeacherFeatureDiscriminator` follows LADD (Sauer et al. 2024, "Fast high-resolution image synthesis with
latent adversarial diffusion distillation"): a *frozen* diffusion transformer (the few-step teacher) sees the noised
latent ``x_t'`` with its text conditioning; forward hooks read the token features of a few of its blocks, and a
small trainable head per block turns each feature map into per-token logits, conditioned on the noise level and
the pooled text embedding (projection-discriminator style). Only the heads train; the feature network is never a
submodule (not in ``state_dict``, not in the optimizer, not moved by ``.to``). Which blocks, the head width and
the conditioning are *reconstructed* (the paper's §3.4 text is not available): all configurable.

:class:`PatchDiscriminator` is the pix2pix / taming-transformers "NLayer" patch discriminator (GroupNorm instead
of BatchNorm, so it behaves the same at any per-device batch size).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .flow_matching import denoiser_forward
from .kd import FeatureCapture, probe_inputs

__all__ = [
    "default_discriminator_layers",
    "parse_discriminator_layers",
    "DiscriminatorHead",
    "TeacherFeatureDiscriminator",
    "PatchDiscriminator",
]


class _StopForward(Exception):
    """Raised by a hook to end the feature network's forward after the deepest block the heads need."""


def _check_pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def _check_groups(channels: int, groups: int, what: str):
    if channels % groups:
        raise ValueError(f"`norm_num_groups`={groups} must divide {what} ({channels}): pick a divisor.")


def default_discriminator_layers(feature_network: nn.Module, num_heads: int = 4) -> list[str]:
    """``num_heads`` blocks spread evenly over the depth of a DiT (``transformer_blocks``), deepest last; for
    SD3.5-Large (38 blocks) and 4 heads: blocks 8, 18, 27 and 37 (*reconstructed*)."""
    if not isinstance(feature_network, nn.Module):
        raise TypeError(f"`feature_network` must be an nn.Module, got {type(feature_network).__name__}.")
    _check_pos_int("num_heads", num_heads)
    blocks = getattr(feature_network, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"{type(feature_network).__name__} has no `transformer_blocks`: pass explicit layers "
                         "(--discriminator_layers).")
    n = len(blocks)
    heads = min(num_heads, n)
    picked = sorted({int((k + 1) * n / heads) - 1 for k in range(heads)})
    return [f"transformer_blocks.{i}" for i in picked]


def parse_discriminator_layers(spec) -> tuple[list[str], list[int | None]]:
    """Module names (and optional output indices) from ``"transformer_blocks.9,transformer_blocks.18:1"`` or a
    list of names; returns ``(names, indices)``."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise TypeError(f"`spec` (--discriminator_layers) must be a string or a list of module names, got {spec!r}.")
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"`spec` (--discriminator_layers) must name at least one module, got {spec!r}.")
    names, indices = [], []
    for item in items:
        index = None
        if ":" in item:
            item, idx = item.rsplit(":", 1)
            if not idx.lstrip("-").isdigit():
                raise ValueError(f"output index in {item}:{idx!r} must be an int (--discriminator_layers).")
            index = int(idx)
        names.append(item)
        indices.append(index)
    return names, indices


class DiscriminatorHead(nn.Module):
    """Per-token logits from one feature map ``(B, C, h, w)`` and a condition vector ``(B, E)``.

    ``1x1 conv -> GN -> SiLU -> 3x3 conv -> GN -> SiLU`` (hidden width ``hidden_channels``), then
    ``logit = conv_1x1(h) + <h, W c> / sqrt(hidden)`` per position (projection discriminator). Returns ``(B, h*w)``.
    """

    def __init__(self, in_channels: int, cond_dim: int, hidden_channels: int = 256, norm_num_groups: int | None = None):
        super().__init__()
        _check_pos_int("hidden_channels", hidden_channels)
        if norm_num_groups is None:
            norm_num_groups = math.gcd(32, hidden_channels)
        for name, v in (("in_channels", in_channels), ("cond_dim", cond_dim), ("norm_num_groups", norm_num_groups)):
            _check_pos_int(name, v)
        _check_groups(hidden_channels, norm_num_groups, "`hidden_channels` (--discriminator_head_channels)")
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 1)
        self.norm_in = nn.GroupNorm(norm_num_groups, hidden_channels)
        self.conv = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1)
        self.norm = nn.GroupNorm(norm_num_groups, hidden_channels)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(hidden_channels, 1, 1)
        self.cond_proj = nn.Linear(cond_dim, hidden_channels)
        self.scale = 1.0 / math.sqrt(hidden_channels)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            raise ValueError(f"`features` must be (B, C, h, w), got {getattr(features, 'shape', features)!r}.")
        features = features.to(self.conv_in.weight.dtype)
        h = self.act(self.norm_in(self.conv_in(features)))
        h = self.act(self.norm(self.conv(h)))
        proj = self.cond_proj(cond.to(h.dtype))[:, :, None, None]
        logits = self.conv_out(h) + (h * proj).sum(dim=1, keepdim=True) * self.scale
        return logits.flatten(1)


class TeacherFeatureDiscriminator(nn.Module):
    """Diffusion-GAN discriminator: trainable heads on block features of a frozen teacher (LADD-style).

    Build with :meth:`from_teacher` (probes the feature widths with one tiny forward), or directly with the
    ``layers`` and their ``feature_channels``, then :meth:`attach` the feature network. ``forward(latents,
    timesteps, encoder_hidden_states, pooled_projections)`` returns per-token logits ``(B, sum_i h_i*w_i)``: the
    noised latents ``x_t'`` go through the feature network (gradients flow back to them when they require grad:
    the generator's adversarial loss), the features through the heads. With ``truncate=True`` the feature network
    stops after the deepest hooked block.

    Args:
        layers: dotted module names inside the feature network (e.g. ``"transformer_blocks.18"``).
        feature_channels: channels of each layer's feature map.
        pooled_projection_dim: width of the pooled text embedding (the teacher's ``pooled_projection_dim``).
        layer_indices: which tuple element of a layer's output holds the feature (``None``: the image tokens of
            an SD3 ``JointTransformerBlock``).
        head_channels, norm_num_groups: head width and GroupNorm groups (``None``: ``gcd(32, head_channels)``).
        cond_dim: width of the condition vector. truncate: stop the feature network after the deepest hooked block.
    """

    def __init__(self, layers: Sequence[str], feature_channels: Sequence[int], pooled_projection_dim: int,
                 layer_indices: Sequence[int | None] | None = None, head_channels: int = 256,
                 norm_num_groups: int | None = None, cond_dim: int = 256, truncate: bool = True):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        layers, indices = parse_discriminator_layers(list(layers) if not isinstance(layers, str) else layers)
        if layer_indices is not None:
            indices = list(layer_indices)
        feature_channels = list(feature_channels)
        if not len(layers) == len(feature_channels) == len(indices):
            raise ValueError(f"`layers` ({len(layers)}), `feature_channels` ({len(feature_channels)}) and "
                             f"`layer_indices` ({len(indices)}) must have the same length.")
        _check_pos_int("pooled_projection_dim", pooled_projection_dim)
        _check_pos_int("cond_dim", cond_dim)
        if not isinstance(truncate, bool):
            raise TypeError(f"`truncate` must be a bool, got {type(truncate).__name__}.")
        self.layers, self.layer_indices, self.truncate = layers, indices, truncate
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, cond_dim)
        self.text_embedding = TimestepEmbedding(pooled_projection_dim, cond_dim)  # Linear -> SiLU -> Linear
        self.heads = nn.ModuleList(DiscriminatorHead(int(c), cond_dim, head_channels, norm_num_groups)
                                   for c in feature_channels)
        object.__setattr__(self, "feature_network", None)  # not a submodule: frozen, not saved, not moved

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher: nn.Module, layers=None, num_heads: int = 4, **kwargs) -> "TeacherFeatureDiscriminator":
        """Heads on ``layers`` of ``teacher`` (default :func:`default_discriminator_layers`), widths probed with one
        small forward; the discriminator is returned attached to ``teacher``."""
        if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
            raise TypeError(f"`teacher` must be a diffusers model, got {type(teacher).__name__}.")
        if layers is None:
            layers = default_discriminator_layers(teacher, num_heads)
        names, indices = parse_discriminator_layers(layers)
        for name in names:
            try:
                teacher.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(teacher).__name__} has no module {name!r} (--discriminator_layers).") from None
        was_training = teacher.training
        teacher.eval()
        with FeatureCapture(teacher, names, indices, detach=True) as cap:
            denoiser_forward(teacher, *probe_inputs(teacher, latent_size=8))
            channels = [cap[n].shape[1] for n in names]
        teacher.train(was_training)
        disc = cls(names, channels, teacher.config.pooled_projection_dim, layer_indices=indices, **kwargs)
        return disc.attach(teacher)

    def attach(self, feature_network: nn.Module) -> "TeacherFeatureDiscriminator":
        """Uses ``feature_network`` (frozen here: ``requires_grad_(False)``, eval mode) for the features."""
        if not isinstance(feature_network, nn.Module):
            raise TypeError(f"`feature_network` must be an nn.Module, got {type(feature_network).__name__}.")
        for name in self.layers:
            try:
                feature_network.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(feature_network).__name__} has no module {name!r} "
                                 "(--discriminator_layers).") from None
        feature_network.requires_grad_(False).eval()
        order = {name: i for i, (name, _) in enumerate(feature_network.named_modules())}
        self._deepest_layer = max(self.layers, key=order.__getitem__)
        object.__setattr__(self, "feature_network", feature_network)
        return self

    def condition(self, timesteps: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        """The condition vector ``(B, cond_dim)``: noise-level embedding + pooled-text embedding."""
        dtype = self.time_embedding.linear_1.weight.dtype
        t = self.time_proj(timesteps.reshape(-1).float()).to(dtype)
        return self.time_embedding(t) + self.text_embedding(pooled_projections.to(dtype))

    def features(self, latents, timesteps, encoder_hidden_states, pooled_projections) -> list[torch.Tensor]:
        """Feature maps of the hooked layers for the noised ``latents`` (in the feature network's dtype)."""
        net = self.feature_network
        if net is None:
            raise RuntimeError("no feature network: call `discriminator.attach(teacher)` first.")
        dtype = next(net.parameters()).dtype
        last = self._deepest_layer if self.truncate else None
        capture = FeatureCapture(net, self.layers, self.layer_indices, detach=False)
        handle = None
        with capture:
            if last is not None:
                def stop(module, args, output):
                    raise _StopForward

                handle = net.get_submodule(last).register_forward_hook(stop)
            try:
                denoiser_forward(net, latents.to(dtype), timesteps, encoder_hidden_states.to(dtype),
                                 pooled_projections.to(dtype))
            except _StopForward:
                pass
            finally:
                if handle is not None:
                    handle.remove()  # before any backward recomputation (gradient checkpointing) runs the block
            return [capture[name] for name in self.layers]

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        for name, v in (("latents", latents), ("timesteps", timesteps),
                        ("encoder_hidden_states", encoder_hidden_states), ("pooled_projections", pooled_projections)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}.")
        if latents.ndim != 4:
            raise ValueError(f"`latents` must be (B, C, H, W), got {tuple(latents.shape)}.")
        b = latents.shape[0]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape[0] != b or encoder_hidden_states.shape[0] != b or pooled_projections.shape[0] != b:
            raise ValueError("`timesteps`, `encoder_hidden_states` and `pooled_projections` need one row per latent.")
        feats = self.features(latents, timesteps, encoder_hidden_states, pooled_projections)
        cond = self.condition(timesteps.to(latents.device), pooled_projections)
        return torch.cat([head(f, cond) for head, f in zip(self.heads, feats, strict=True)], dim=1)


class PatchDiscriminator(nn.Module):
    """pix2pix "NLayer" patch discriminator: ``num_layers`` stride-2 4x4 convs (GroupNorm + LeakyReLU 0.2 after
    all but the first), one stride-1 conv, and a 1-channel 4x4 conv giving a map of patch logits ``(B, 1, h, w)``.

    Args:
        in_channels: image channels. base_channels: width of the first conv (doubled per layer, at most x8).
        num_layers: stride-2 layers (3: 70x70 receptive field). norm_num_groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm_num_groups: int = 32):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers),
                        ("norm_num_groups", norm_num_groups)):
            _check_pos_int(name, v)
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            _check_groups(out, norm_num_groups, "every PatchDiscriminator width (base_channels x 2^n)")
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(norm_num_groups, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.num_layers, self.min_size = num_layers, 3 * 2**num_layers  # output side = size / 2^num_layers - 2
        for m in self.modules():  # pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"`images` must be (B, C, H, W), got {getattr(images, 'shape', images)!r}.")
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(f"`images` must be at least {self.min_size}x{self.min_size} pixels for a "
                             f"{self.num_layers}-layer patch discriminator, got {tuple(images.shape[-2:])}: "
                             "use larger patches or fewer discriminator layers.")
        return self.model(images.to(self.model[0].weight.dtype))
