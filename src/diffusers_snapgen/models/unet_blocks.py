"""Down, mid and up stages of the SnapGen UNet (paper §3.1, Fig. 2)."""

from __future__ import annotations

import torch
from torch import nn

from .resnet import SnapGenDownsample2D, SnapGenResnetBlock2D, SnapGenUpsample2D
from .transformer_2d import SnapGenSpatialTransformer


class _StageMixin:
    """Runs resnet/attention pairs with optional gradient checkpointing of each resnet."""

    gradient_checkpointing = False

    def _resnet(self, resnet: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, hidden_states, temb)
        return resnet(hidden_states, temb)


def _make_attentions(num_blocks: int, num_layers: int, channels: int, transformer_kwargs: dict) -> nn.ModuleList | None:
    if num_layers == 0:
        return None
    return nn.ModuleList(
        SnapGenSpatialTransformer(channels, num_layers=num_layers, **transformer_kwargs) for _ in range(num_blocks)
    )


class SnapGenDownBlock2D(_StageMixin, nn.Module):
    """``num_layers`` x (resnet [+ transformer]) then an optional stride-2 downsampler; returns the skip features."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        transformer_layers: int,
        add_downsample: bool,
        resnet_kwargs: dict,
        transformer_kwargs: dict,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            SnapGenResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, **resnet_kwargs)
            for i in range(num_layers)
        )
        self.attentions = _make_attentions(num_layers, transformer_layers, out_channels, transformer_kwargs)
        conv_type = resnet_kwargs.get("conv_type", "separable")
        self.downsamplers = (
            nn.ModuleList([SnapGenDownsample2D(out_channels, conv_type=conv_type)]) if add_downsample else None
        )

    def forward(self, hidden_states, temb, encoder_hidden_states, encoder_attention_mask=None, rotary_embs=None,
                cross_attention_kv=None):
        skips = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](
                    hidden_states, encoder_hidden_states, encoder_attention_mask, rotary_embs, cross_attention_kv
                )
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class SnapGenMidBlock2D(_StageMixin, nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(
        self, channels: int, temb_channels: int, transformer_layers: int, resnet_kwargs: dict, transformer_kwargs: dict
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            SnapGenResnetBlock2D(channels, channels, temb_channels, **resnet_kwargs) for _ in range(2)
        )
        self.attentions = _make_attentions(1, transformer_layers, channels, transformer_kwargs)

    def forward(self, hidden_states, temb, encoder_hidden_states, encoder_attention_mask=None, rotary_embs=None,
                cross_attention_kv=None):
        hidden_states = self._resnet(self.resnets[0], hidden_states, temb)
        if self.attentions is not None:
            hidden_states = self.attentions[0](
                hidden_states, encoder_hidden_states, encoder_attention_mask, rotary_embs, cross_attention_kv
            )
        return self._resnet(self.resnets[1], hidden_states, temb)


class SnapGenUpBlock2D(_StageMixin, nn.Module):
    """``num_layers`` x (concat skip -> resnet [+ transformer]) then an optional x2 upsampler."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        transformer_layers: int,
        add_upsample: bool,
        resnet_kwargs: dict,
        transformer_kwargs: dict,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channels if i == 0 else out_channels
            resnets.append(
                SnapGenResnetBlock2D(resnet_in_channels + skip_channels, out_channels, temb_channels, **resnet_kwargs)
            )
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _make_attentions(num_layers, transformer_layers, out_channels, transformer_kwargs)
        conv_type = resnet_kwargs.get("conv_type", "separable")
        self.upsamplers = (
            nn.ModuleList([SnapGenUpsample2D(out_channels, conv_type=conv_type)]) if add_upsample else None
        )

    def forward(self, hidden_states, skips, temb, encoder_hidden_states, encoder_attention_mask=None, rotary_embs=None,
                cross_attention_kv=None):
        for i, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, skips[-1]], dim=1)
            skips = skips[:-1]
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](
                    hidden_states, encoder_hidden_states, encoder_attention_mask, rotary_embs, cross_attention_kv
                )
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states
