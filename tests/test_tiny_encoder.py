"""TinyEncoder: size of the default config (meta device), latents that every AutoencoderKL consumer accepts,
serialization through diffusers' entry points, argument errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoModel
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput

import diffusers_snapgen  # noqa: F401  (registers the classes with diffusers)
from diffusers_snapgen import TinyDecoder, TinyEncoder
from diffusers_snapgen.testing import tiny_encoder
from diffusers_snapgen.training.components import encode_latents, scale_latents


def test_default_config_is_small_and_mirrors_the_tiny_decoder():
    with torch.device("meta"):
        encoder, decoder = TinyEncoder(), TinyDecoder()
        latents = encoder(torch.empty(1, 3, 1024, 1024)).latents
    num_params = sum(p.numel() for p in encoder.parameters())
    decoder_params = sum(p.numel() for p in decoder.parameters())
    assert 1.3e6 <= num_params <= 1.6e6, num_params  # the decoder's size (1.42M), well under the 3M budget
    assert abs(num_params - decoder_params) < 0.1 * decoder_params
    assert num_params * 2 < 3.2e6  # fp16 bytes in the shipped folder
    assert latents.shape == (1, 16, 128, 128)  # SD3 latents: 16 channels, f = 8
    assert (encoder.config.scaling_factor, encoder.config.shift_factor) == (1.5305, 0.0609)


def test_encode_gives_a_zero_variance_latent_dist():
    encoder = tiny_encoder()
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    with torch.no_grad():
        output = encoder.encode(x)
        (dist,) = encoder.encode(x, return_dict=False)
        latents = encoder(x).latents
    assert isinstance(output, AutoencoderKLOutput)
    assert latents.shape == (2, 4, 5, 3)
    torch.testing.assert_close(output.latent_dist.mean, latents, rtol=0, atol=0)
    torch.testing.assert_close(output.latent_dist.mode(), latents, rtol=0, atol=0)
    sample = output.latent_dist.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, latents, rtol=0, atol=0)
    assert output.latent_dist.std.abs().max() == 0
    torch.testing.assert_close(dist.mean, latents, rtol=0, atol=0)


def test_training_helpers_scale_its_latents_like_an_autoencoder_kl():
    encoder = tiny_encoder(scaling_factor=0.5, shift_factor=0.25)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encoder(x).latents
    scaled = encode_latents(encoder, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled, (z - 0.25) * 0.5)
    torch.testing.assert_close(scale_latents(encoder, z), (z - 0.25) * 0.5)


def test_save_and_load_through_diffusers(tmp_path):
    encoder = tiny_encoder(seed=3)
    encoder.save_pretrained(tmp_path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for loaded in (TinyEncoder.from_pretrained(tmp_path), AutoModel.from_pretrained(str(tmp_path))):
        assert type(loaded) is TinyEncoder
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).latents, encoder(x).latents, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(latent_channels=0), ValueError, "latent_channels"),
    (dict(in_channels=3.0), TypeError, "in_channels"),
    (dict(block_out_channels=()), ValueError, "block_out_channels"),
    (dict(layers_per_block=(1, 1)), ValueError, "layers_per_block"),
    (dict(conv_type="dense"), ValueError, "conv_type"),
    (dict(downsample_conv_type="pool"), ValueError, "downsample_conv_type"),
])
def test_bad_config_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        TinyEncoder(**{**dict(block_out_channels=(8, 8, 8, 16), norm_num_groups=4), **kwargs})


def test_bad_images_name_the_expected_shape():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        encoder.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        encoder(torch.zeros(1, 4, 16, 16))


def test_model_card_shows_how_to_encode():
    from diffusers_snapgen.cards import render_pytorch_card

    card = str(render_pytorch_card("tiny_encoder", "tiny_encoder", "me/tiny-encoder", training={"steps": 10}))
    assert "TinyEncoder.from_pretrained(\"me/tiny-encoder\")" in card and "train_tiny_encoder.py" in card
    assert "tiny-encoder" in card and "snapgen generate" not in card
