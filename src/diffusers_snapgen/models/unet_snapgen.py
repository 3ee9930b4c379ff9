"""The SnapGen efficient UNet (Hu et al., CVPR 2025, arXiv 2412.09619, §3.1 and Fig. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .attention import SnapGenAttention
from .embeddings import SnapGenRotaryPosEmbed2D
from .lora_targets import resolve_lora_config
from .resnet import CONV_TYPES, make_conv
from .unet_blocks import SnapGenDownBlock2D, SnapGenMidBlock2D, SnapGenUpBlock2D


@dataclass
class SnapGenUNet2DOutput(BaseOutput):
    """Output of :class:`SnapGenUNet2DModel`: ``sample`` is the predicted flow-matching velocity ``noise - x0``."""

    sample: torch.Tensor


def _per_stage(value, num_stages: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_stages
    if len(values) != num_stages:
        raise ValueError(f"`{name}` needs one entry per stage ({num_stages}), got {len(values)}: {value!r}.")
    return values


class SnapGenUNet2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""SnapGen's denoising UNet: an SDXL-style UNet made thin, short and mobile friendly (paper §3.1, Fig. 2).

    The defaults are the final paper model (Fig. 2 (f), ~379M parameters): three stages of (256, 512, 896) channels
    with (1, 2, 4) transformer blocks each, self-attention only in the lowest-resolution stage and the mid block,
    expanded separable-conv residual blocks, FFN expansion 3, multi-query attention, RMSNorm QK-norm and 2D RoPE.
    Every step of Fig. 2 is a config switch, so variants (a)-(f) are built from configs
    (see ``benchmarks/ablation_table.py``):

    - (a) baseline: ``conv_type="regular"``, ``transformer_layers_per_block=(0, 2, 4)``,
      ``only_cross_attention=False``, ``ff_mult=4``, ``kv_heads=None``, ``qk_norm=None``, ``use_rope=False``;
    - (b) ``only_cross_attention=(True, True, False)``; (c) ``conv_type="separable"``, ``conv_expansion_ratio=2``;
      (d) ``ff_mult=3``; (e) ``kv_heads=1`` and conditions from the first stage, ``transformer_layers_per_block=(1, 2, 4)``;
      (f) ``qk_norm="rms_norm"``, ``use_rope=True``.

    Conditioning follows SD3: ``encoder_hidden_states`` (the joint text sequence, ``joint_attention_dim`` wide) pass
    through ``context_embedder`` into every cross-attention; ``pooled_projections`` are embedded and added to the
    timestep embedding. Timesteps use the scheduler's scale (``FlowMatchEulerDiscreteScheduler``: 0-1000), as for
    ``SD3Transformer2DModel``. Latent height and width must be multiples of ``2 ** (len(block_out_channels) - 1)``
    (4 for three stages, i.e. images in multiples of 32 px with an f=8 autoencoder); any aspect ratio works.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SnapGenTransformerBlock", "SnapGenResnetBlock2D"]
    _repeated_blocks = ["SnapGenTransformerBlock"]
    _skip_layerwise_casting_patterns = ["norm", "time_proj", "pos_embed"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        block_out_channels: tuple[int, ...] = (256, 512, 896),
        layers_per_block: int = 2,
        transformer_layers_per_block: tuple[int, ...] = (1, 2, 4),
        only_cross_attention: bool | tuple[bool, ...] = (True, True, False),
        attention_head_dim: int = 64,
        kv_heads: int | None = 1,
        qk_norm: str | None = "rms_norm",
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        conv_type: str = "separable",
        conv_expansion_ratio: int = 2,
        ff_mult: float = 3,
        cross_attention_dim: int = 1024,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 2048,
        time_embedding_dim: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        num_stages = len(block_out_channels)
        if num_stages < 2:
            raise ValueError(f"`block_out_channels` needs at least two stages, got {block_out_channels!r}.")
        if conv_type not in CONV_TYPES:
            raise ValueError(f"`conv_type` must be one of {CONV_TYPES}, got {conv_type!r}.")
        if layers_per_block < 1:
            raise ValueError(f"`layers_per_block` must be >= 1, got {layers_per_block}.")
        transformer_layers = _per_stage(transformer_layers_per_block, num_stages, "transformer_layers_per_block")
        only_cross = _per_stage(only_cross_attention, num_stages, "only_cross_attention")
        for channels in block_out_channels:
            if channels % norm_num_groups != 0:
                raise ValueError(
                    f"Every entry of `block_out_channels` must be divisible by `norm_num_groups` "
                    f"({norm_num_groups}), got {block_out_channels!r}."
                )

        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        resnet_kwargs = dict(
            conv_type=conv_type,
            expansion_ratio=conv_expansion_ratio,
            norm_num_groups=norm_num_groups,
            eps=norm_eps,
            dropout=dropout,
        )

        def transformer_kwargs(stage: int) -> dict:
            return dict(
                attention_head_dim=attention_head_dim,
                cross_attention_dim=cross_attention_dim,
                kv_heads=kv_heads,
                only_cross_attention=only_cross[stage],
                qk_norm=qk_norm,
                ff_mult=ff_mult,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                dropout=dropout,
            )

        # Conditioning (SD3-style): timestep sinusoid + pooled text, and the joint text sequence for cross-attention.
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.add_embedding = TimestepEmbedding(pooled_projection_dim, time_embed_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, cross_attention_dim)
        self.pos_embed = SnapGenRotaryPosEmbed2D(attention_head_dim, theta=rope_theta) if use_rope else None

        self.conv_in = make_conv(conv_type, in_channels, block_out_channels[0])

        self.down_blocks = nn.ModuleList()
        output_channels = block_out_channels[0]
        for stage, channels in enumerate(block_out_channels):
            input_channels, output_channels = output_channels, channels
            self.down_blocks.append(
                SnapGenDownBlock2D(
                    input_channels,
                    output_channels,
                    time_embed_dim,
                    num_layers=layers_per_block,
                    transformer_layers=transformer_layers[stage],
                    add_downsample=stage < num_stages - 1,
                    resnet_kwargs=resnet_kwargs,
                    transformer_kwargs=transformer_kwargs(stage),
                )
            )

        self.mid_block = SnapGenMidBlock2D(
            block_out_channels[-1],
            time_embed_dim,
            transformer_layers=transformer_layers[-1],
            resnet_kwargs=resnet_kwargs,
            transformer_kwargs=transformer_kwargs(num_stages - 1),
        )

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channels = reversed_channels[0]
        for i, channels in enumerate(reversed_channels):
            stage = num_stages - 1 - i
            prev_output_channels, output_channels = output_channels, channels
            skip_input_channels = reversed_channels[min(i + 1, num_stages - 1)]
            self.up_blocks.append(
                SnapGenUpBlock2D(
                    skip_input_channels,
                    prev_output_channels,
                    output_channels,
                    time_embed_dim,
                    num_layers=layers_per_block + 1,
                    transformer_layers=transformer_layers[stage],
                    add_upsample=i < num_stages - 1,
                    resnet_kwargs=resnet_kwargs,
                    transformer_kwargs=transformer_kwargs(stage),
                )
            )

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_out = make_conv(conv_type, block_out_channels[0], out_channels)
        self.gradient_checkpointing = False
        cross_attentions = self._cross_attentions()
        for index, attention in enumerate(cross_attentions):
            attention.cross_attention_index = index
        self._num_cross_attentions = len(cross_attentions)

    def _cross_attentions(self) -> list[SnapGenAttention]:
        return [m for m in self.modules() if isinstance(m, SnapGenAttention) and m.is_cross_attention]

    def precompute_cross_attention_kv(
        self, encoder_hidden_states: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        r"""The text keys and values of every cross-attention, for ``forward(..., cross_attention_kv=...)``.

        They depend on the text alone, not on the latents or the timestep, so a sampler computes them once per prompt
        instead of once per step (``context_embedder``, then each cross-attention's K/V projection and K-norm):
        fewer kernels per step, the same outputs. ``encoder_hidden_states`` is ``(B, L, joint_attention_dim)``, as
        for ``forward``; the result holds one ``(key, value)`` pair of ``(B, L, kv_heads, attention_head_dim)``
        tensors per cross-attention. Compute it again after changing weights (LoRA scale, ``fuse_qkv_projections``).
        """
        self._check_encoder_hidden_states(encoder_hidden_states, batch=None)
        attentions = self._cross_attentions()
        if len(attentions) != self._num_cross_attentions:
            raise ValueError(
                f"This UNet's cross-attentions were replaced ({len(attentions)} of {self._num_cross_attentions} left, "
                "e.g. by the Core ML export's attention): call it without `cross_attention_kv`."
            )
        context = self.context_embedder(encoder_hidden_states)
        return tuple(attention.project_context(context) for attention in attentions)

    def compile_repeated_blocks(self, *args, **kwargs):
        """Regional compilation: ``torch.compile`` each :class:`SnapGenTransformerBlock` (``_repeated_blocks``).

        Blocks of one stage share one compiled graph; the stages differ in width and token count, so a forward
        compiles one graph per stage (three for the paper model) and reuses them on every later call at that batch
        size and resolution. ``dynamic`` defaults to ``False`` here: with automatic dynamic shapes the second
        stage would recompile the first stage's graph as a dynamic one. Arguments go to ``torch.compile``, e.g.
        ``unet.compile_repeated_blocks(fullgraph=True)``; see ``docs/performance.md``.
        """
        kwargs.setdefault("dynamic", False)
        return super().compile_repeated_blocks(*args, **kwargs)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """Add a peft adapter (``PeftAdapterMixin.add_adapter``). Targets that name a separable convolution, e.g.
        ``LoraConfig(target_modules=["conv1", "conv2"])``, adapt its pointwise 1x1 conv (``conv1.pointwise``): see
        :func:`~diffusers_snapgen.models.lora_targets.resolve_lora_target_modules`."""
        super().add_adapter(resolve_lora_config(self, adapter_config), adapter_name=adapter_name)
        self._refuse_adapters_on_fused_projections({adapter_name})

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        """``PeftAdapterMixin.load_lora_adapter`` (what ``pipe.load_lora_weights`` calls), refused with a
        ``ValueError`` when the adapter would adapt a projection that ``fuse_qkv_projections()`` replaced."""
        before = set(getattr(self, "peft_config", {}))
        super().load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        self._refuse_adapters_on_fused_projections(set(getattr(self, "peft_config", {})) - before)

    def _refuse_adapters_on_fused_projections(self, adapter_names: set):
        """After ``fuse_qkv_projections()`` a self-attention reads ``to_qkv`` and a cross-attention ``to_kv``: an
        adapter on their ``to_q``/``to_k``/``to_v`` (``to_k``/``to_v``) would never run. Such an adapter is deleted
        again and refused rather than silently left out."""
        for name, module in self.named_modules():
            if not isinstance(module, SnapGenAttention) or not module.fused_projections:
                continue
            unused = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            hit = [proj for proj in unused if adapter_names & set(getattr(getattr(module, proj), "lora_A", {}))]
            if hit:
                for adapter in adapter_names:
                    self.delete_adapters(adapter)
                raise ValueError(
                    f"the LoRA adapter adapts `{name}.{hit[0]}`, which `fuse_qkv_projections()` replaced by a fused "
                    "matmul that would leave the adapter out: call `unfuse_qkv_projections()` first, load the adapter, "
                    "then `fuse_lora()` and `fuse_qkv_projections()` again."
                )

    @property
    def latent_size_multiple(self) -> int:
        """Latent height and width must be multiples of this (4 for three stages)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check_encoder_hidden_states(self, encoder_hidden_states, batch: int | None) -> None:
        width = self.config.joint_attention_dim
        if (
            not isinstance(encoder_hidden_states, torch.Tensor)
            or encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[-1] != width
            or (batch is not None and encoder_hidden_states.shape[0] != batch)
        ):
            raise ValueError(
                f"`encoder_hidden_states` must be a ({'batch' if batch is None else batch}, sequence, {width}) tensor, "
                f"got {getattr(encoder_hidden_states, 'shape', type(encoder_hidden_states).__name__)}."
            )

    def _check_cross_attention_kv(self, cross_attention_kv, encoder_hidden_states) -> None:
        expected = self._num_cross_attentions
        pairs_ok = isinstance(cross_attention_kv, (tuple, list)) and len(cross_attention_kv) == expected
        pairs_ok = pairs_ok and all(
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(t, torch.Tensor) and t.shape[:2] == encoder_hidden_states.shape[:2] for t in pair)
            for pair in cross_attention_kv
        )
        if not pairs_ok:
            raise ValueError(
                f"`cross_attention_kv` must be the {expected} (key, value) pairs that "
                "`unet.precompute_cross_attention_kv(encoder_hidden_states)` returns for this call's "
                f"{tuple(encoder_hidden_states.shape[:2])} text tokens."
            )

    def _check_inputs(self, sample, encoder_hidden_states, pooled_projections, encoder_attention_mask) -> None:
        config = self.config
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"`sample` must be a (batch, {config.in_channels}, height, width) tensor, got "
                f"{tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}."
            )
        multiple = self.latent_size_multiple
        if sample.shape[-2] % multiple or sample.shape[-1] % multiple:
            raise ValueError(
                f"`sample` height and width must be multiples of {multiple} (images in multiples of {multiple * 8} px "
                f"with an f=8 autoencoder), got {tuple(sample.shape[-2:])}."
            )
        batch = sample.shape[0]
        self._check_encoder_hidden_states(encoder_hidden_states, batch)
        if pooled_projections is not None and tuple(pooled_projections.shape) != (batch, config.pooled_projection_dim):
            raise ValueError(
                f"`pooled_projections` must be a ({batch}, {config.pooled_projection_dim}) tensor, "
                f"got {tuple(pooled_projections.shape)}."
            )
        if (
            encoder_attention_mask is not None
            and tuple(encoder_attention_mask.shape) != encoder_hidden_states.shape[:2]
        ):
            raise ValueError(
                f"`encoder_attention_mask` must be a {tuple(encoder_hidden_states.shape[:2])} mask, "
                f"got {tuple(encoder_attention_mask.shape)}."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
        cross_attention_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
    ) -> SnapGenUNet2DOutput | tuple[torch.Tensor]:
        r"""Predict the flow-matching velocity for ``sample`` at ``timestep``.

        Args:
            sample: noisy latents ``(B, in_channels, h, w)``.
            timestep: scalar or ``(B,)`` on the scheduler's 0-1000 scale.
            encoder_hidden_states: text tokens ``(B, L, joint_attention_dim)``.
            pooled_projections: pooled text vector ``(B, pooled_projection_dim)``; zeros when ``None``.
            encoder_attention_mask: ``(B, L)``, 1/True for tokens to attend to; ``None`` attends to all.
            attention_kwargs: accepted for API compatibility with diffusers models (LoRA ``scale`` is set through
                peft's ``set_adapters``); unused.
            return_dict: return a :class:`SnapGenUNet2DOutput` instead of a tuple.
            cross_attention_kv: the text keys and values that :meth:`precompute_cross_attention_kv` returned for
                these ``encoder_hidden_states``; the cross-attentions then skip their projections (a sampler computes
                them once per prompt). ``encoder_hidden_states`` is still required, for its shape.
        """
        self._check_inputs(sample, encoder_hidden_states, pooled_projections, encoder_attention_mask)
        if cross_attention_kv is not None:
            self._check_cross_attention_kv(cross_attention_kv, encoder_hidden_states)
        batch = sample.shape[0]

        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        if pooled_projections is not None:
            temb = temb + self.add_embedding(pooled_projections.to(dtype=temb.dtype))
        else:
            temb = temb + self.add_embedding(temb.new_zeros(batch, self.config.pooled_projection_dim))

        context = self.context_embedder(encoder_hidden_states) if cross_attention_kv is None else None
        mask = None
        if encoder_attention_mask is not None:
            # (B, L) keep-mask -> boolean (B, 1, 1, L), broadcast over heads and query tokens.
            mask = encoder_attention_mask.to(device=sample.device, dtype=torch.bool)[:, None, None, :]

        rotary_embs = None
        if self.pos_embed is not None:  # one 2D RoPE table per stage resolution, shared by its transformers
            # Plain-int keys, so traced shapes (torch.jit.trace, Core ML export) still find their table. The tables
            # are cached (eager) or come from one opaque op per stage (compiled): see models/embeddings.py.
            height, width = int(sample.shape[-2]), int(sample.shape[-1])
            grids = [(height >> stage, width >> stage) for stage in range(len(self.config.block_out_channels))]
            rotary_embs = {
                grid: self.pos_embed.attention_tables(*grid, device=sample.device, dtype=sample.dtype) for grid in grids
            }

        hidden_states = self.conv_in(sample)
        skips = (hidden_states,)
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, temb, context, mask, rotary_embs, cross_attention_kv)
            skips += block_skips

        hidden_states = self.mid_block(hidden_states, temb, context, mask, rotary_embs, cross_attention_kv)

        for block in self.up_blocks:
            num_resnets = len(block.resnets)
            block_skips, skips = skips[-num_resnets:], skips[:-num_resnets]
            hidden_states = block(hidden_states, block_skips, temb, context, mask, rotary_embs, cross_attention_kv)

        hidden_states = self.conv_out(F.silu(self.conv_norm_out(hidden_states)))
        if not return_dict:
            return (hidden_states,)
        return SnapGenUNet2DOutput(sample=hidden_states)
