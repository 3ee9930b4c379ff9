"""TinyDecoder (paper §3.2, Table 2): size and cost of the paper config, decoding, serialization, SD3 drop-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sd3_fixtures import tiny_sd3_pipeline
from diffusers import AutoModel, StableDiffusion3Pipeline
from diffusers.models.autoencoders.vae import DecoderOutput
from torch.utils.flop_counter import FlopCounterMode

import diffusers_snapgen
from diffusers_snapgen import TinyDecoder
from diffusers_snapgen.testing import tiny_decoder


def test_paper_config_matches_table_2_size_and_cost():
    with torch.device("meta"):
        decoder = TinyDecoder()
        num_params = sum(p.numel() for p in decoder.parameters())
        with FlopCounterMode(display=False) as counter:
            image = decoder.decode(torch.empty(1, 16, 128, 128)).sample
    assert abs(num_params - 1.38e6) <= 0.05 * 1.38e6, num_params
    # the paper counts multiply-accumulates (its 4970 G for SD3); FlopCounterMode counts 2 per MAC
    gmacs = counter.get_total_flops() / 2e9
    assert 213 <= gmacs <= 235, gmacs  # paper: 224 G for a 128x128 latent -> 1024x1024 image
    assert image.shape == (1, 3, 1024, 1024)

    config = decoder.config
    assert (config.latent_channels, config.out_channels) == (16, 3)
    assert 2 ** (len(config.block_out_channels) - 1) == 8  # how diffusers pipelines derive vae_scale_factor
    assert (config.scaling_factor, config.shift_factor, config.force_upcast) == (1.5305, 0.0609, False)


def test_paper_config_decodes_to_a_bounded_image():
    decoder = TinyDecoder().eval()
    with torch.no_grad():
        image = decoder.decode(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and image.abs().max() < 5


@pytest.mark.parametrize(
    "latent_channels, latent_shape", [(4, (2, 4, 4)), (4, (1, 3, 5)), (16, (1, 6, 2))], ids=["square", "wide", "tall"]
)
def test_decode_upsamples_8x(latent_channels, latent_shape):
    batch, height, width = latent_shape
    decoder = tiny_decoder(latent_channels=latent_channels)
    z = torch.randn(batch, latent_channels, height, width)
    with torch.no_grad():
        output = decoder.decode(z)
        (as_tuple,) = decoder.decode(z, return_dict=False)
        forward = decoder(z).sample
    assert isinstance(output, DecoderOutput)
    assert output.sample.shape == (batch, 3, 8 * height, 8 * width)
    assert output.sample.dtype == z.dtype and torch.isfinite(output.sample).all()
    torch.testing.assert_close(as_tuple, output.sample, rtol=0, atol=0)
    torch.testing.assert_close(forward, output.sample, rtol=0, atol=0)


def test_slicing_decodes_each_sample_alike():
    decoder = tiny_decoder()
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        batched = decoder.decode(z).sample
        decoder.enable_slicing()
        sliced = decoder.decode(z).sample
        decoder.disable_slicing()
    torch.testing.assert_close(sliced, batched, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    decoder = tiny_decoder(latent_channels=16, seed=3)
    decoder.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()

    reloaded = TinyDecoder.from_pretrained(tmp_path).eval()
    z = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decode(z).sample, decoder.decode(z).sample, rtol=0, atol=0)
    for key, value in decoder.config.items():
        if not key.startswith("_"):
            assert reloaded.config[key] == (list(value) if isinstance(value, tuple) else value), key


def test_auto_model_loads_a_tiny_decoder(tmp_path):
    tiny_decoder().save_pretrained(tmp_path)
    assert diffusers_snapgen.TinyDecoder is TinyDecoder
    # str(): AutoModel in diffusers 0.42.1 fails on a pathlib.Path.
    assert isinstance(AutoModel.from_pretrained(str(tmp_path)), TinyDecoder)


def test_gradient_checkpointing_gives_the_same_gradients():
    decoder = tiny_decoder().train()
    z = torch.randn(2, 4, 4, 4)

    def gradients():
        decoder.zero_grad()
        z_grad = z.clone().requires_grad_()
        decoder(z_grad).sample.square().mean().backward()
        return [z_grad.grad] + [p.grad.clone() for p in decoder.parameters()]

    reference = gradients()
    calls = []

    def checkpoint(module, *args):
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    decoder.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    checkpointed = gradients()
    assert len(calls) == len(decoder.up_blocks)
    for expected, actual in zip(reference, checkpointed, strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("shape", [(4, 4, 4), (1, 16, 4, 4), (1, 1, 4, 4, 4)])
def test_bad_latents_raise_value_error_naming_z(shape):
    with pytest.raises(ValueError, match="`z`.*\\(batch, 4, height, width\\)"):
        tiny_decoder().decode(torch.randn(shape))


def test_bad_config_and_encode_raise_clear_errors():
    with pytest.raises(ValueError, match="layers_per_block"):
        tiny_decoder(layers_per_block=(1, 1))
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_decoder(norm_num_groups=3)
    with pytest.raises(ValueError, match="conv type"):
        tiny_decoder(conv_type="depthwise")
    with pytest.raises(NotImplementedError, match="no encoder.*AutoencoderKL"):
        tiny_decoder().encode(torch.randn(1, 3, 32, 32))


def _generate(pipe, output_type):
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red apple", num_inference_steps=2, height=32, width=32, output_type=output_type, generator=generator)
    return out.images


def test_drop_in_vae_for_stable_diffusion_3_pipeline():
    pipe = tiny_sd3_pipeline(TinyDecoder().eval())  # the paper config: 16 latent channels
    assert pipe.vae_scale_factor == 8

    image = _generate(pipe, "np")
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1

    # the pipeline's image is the decoder applied to the unscaled latents
    latents = _generate(pipe, "latent")
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / 1.5305 + 0.0609).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(image, expected, atol=1e-6)

    # and another decoder gives another image
    other = StableDiffusion3Pipeline(**{**pipe.components, "vae": TinyDecoder(norm_out=True).eval()})
    other.set_progress_bar_config(disable=True)
    assert np.abs(_generate(other, "np") - image).max() > 1e-3


def test_tiny_decoder_fits_a_tiny_four_channel_pipeline():
    image = _generate(tiny_sd3_pipeline(tiny_decoder()), "np")
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
