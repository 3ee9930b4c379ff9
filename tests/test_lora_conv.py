"""LoRA on the UNet's separable convolutions: conventional target names reach the pointwise 1x1 convs."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_snapgen import SnapGenPipeline
from diffusers_snapgen.models.lora_targets import resolve_lora_target_modules
from diffusers_snapgen.models.resnet import SeparableConv2d
from diffusers_snapgen.testing import tiny_pipeline, tiny_unet

CONV_TARGETS = ["conv1", "conv2", "to_q", "conv"]


def _embeds():
    generator = torch.Generator().manual_seed(3)
    return dict(prompt_embeds=torch.randn(1, 5, 32, generator=generator),
                pooled_prompt_embeds=torch.randn(1, 20, generator=generator))


def _latents(pipe):
    return pipe(**_embeds(), height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def _save_conv_lora(pipe, folder, seed=0, rank=4):
    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=CONV_TARGETS, init_lora_weights=False))
    SnapGenPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_separable_conv_targets_resolve_to_their_pointwise_conv():
    unet = tiny_unet()
    assert resolve_lora_target_modules(unet, CONV_TARGETS) == [
        "conv1.pointwise", "conv2.pointwise", "to_q", "conv.pointwise"
    ]
    assert resolve_lora_target_modules(unet, ["to_k", "conv_shortcut"]) == ["to_k", "conv_shortcut"]
    # A regular expression that reaches separable convs becomes the explicit list of module names.
    resolved = resolve_lora_target_modules(unet, r"down_blocks\.0\.resnets\.0\.conv[12]")
    assert resolved == ["down_blocks.0.resnets.0.conv1.pointwise", "down_blocks.0.resnets.0.conv2.pointwise"]
    with pytest.raises(TypeError, match="target_modules"):
        resolve_lora_target_modules(unet, 3)


def test_add_adapter_with_conv_names_adapts_every_pointwise_conv():
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, target_modules=["conv1", "conv2"], init_lora_weights=False))
    separable = [name for name, m in unet.named_modules() if isinstance(m, SeparableConv2d)
                 and name.rsplit(".", 1)[-1] in ("conv1", "conv2")]
    adapted = {name.split(".base_layer")[0].rsplit(".lora_A")[0] for name, m in unet.named_modules()
               if hasattr(m, "lora_A")}
    assert separable and adapted == {f"{name}.pointwise" for name in separable}


def test_conv_lora_load_fuse_unfuse_unload_through_the_pipeline(tmp_path):
    pipe = tiny_pipeline("none")
    base = _latents(pipe)
    pipe.load_lora_weights(_save_conv_lora(pipe, tmp_path), adapter_name="conv")
    with_lora = _latents(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    pipe.fuse_lora()
    torch.testing.assert_close(_latents(pipe), with_lora, atol=1e-4, rtol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(_latents(pipe), with_lora, atol=1e-4, rtol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(_latents(pipe), base, atol=1e-5, rtol=1e-5)


def test_lora_naming_a_separable_conv_is_refused_with_the_name_to_use():
    pipe = tiny_pipeline("none")
    state = {"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(4, 16, 3, 3),
             "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv1\.pointwise"):
        pipe.load_lora_weights(state)


def test_conv_lora_hotswaps_on_a_compiled_unet_without_recompiling(tmp_path):
    pipe = tiny_pipeline("none")
    first = _save_conv_lora(pipe, tmp_path / "first", seed=0)
    second = _save_conv_lora(pipe, tmp_path / "second", seed=1)
    reference = tiny_pipeline("none")
    reference.load_lora_weights(second)
    expected = _latents(reference)

    torch._dynamo.reset()
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(first, adapter_name="style")
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    with_first = _latents(pipe)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(second, adapter_name="style", hotswap=True)
        with_second = _latents(pipe)
    assert (with_second - with_first).abs().max() > 1e-3
    torch.testing.assert_close(with_second, expected, atol=1e-4, rtol=1e-4)
