"""Loading encoders, VAE, student and teacher for training (src/diffusers_snapgen/training/components.py)."""

import pytest
import torch
from helpers import tiny_teacher

from diffusers_snapgen.training import (
    build_pipeline,
    check_teacher_student,
    encode_captions,
    encode_latents,
    load_base_components,
    load_student,
    load_teacher,
    load_vae_encoder,
    text_widths,
    weight_dtype_for,
)


def test_text_widths_follow_the_pipeline_rules():
    from diffusers_snapgen.testing import tiny_text_components

    for kind, expected in (("clip", (28, 20)), ("sd3", (32, 20)), ("generic", (16, 16))):
        comps, _ = tiny_text_components(kind)
        assert text_widths(comps) == expected, kind
    assert text_widths({}) is None


def test_sd3_style_base_feeds_a_fresh_student_and_a_teacher(tmp_path):
    """An SD3 pipeline folder (like stabilityai/stable-diffusion-3.5-large) as the base: its encoders, VAE and
    scheduler are loaded, its transformer is not; one encoding conditions both student and teacher."""
    from _sd3_fixtures import tiny_sd3_pipeline

    from diffusers_snapgen.testing import tiny_autoencoder_kl

    sd3 = tiny_sd3_pipeline(tiny_autoencoder_kl())
    sd3.save_pretrained(tmp_path / "sd3")
    comps = load_base_components(str(tmp_path / "sd3"))
    assert "transformer" not in comps and comps["text_encoder_2"] is not None
    teacher = load_teacher(str(tmp_path / "sd3"), dtype=torch.float32)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    student = load_student(str(tmp_path / "sd3"), latent_channels=teacher.config.in_channels,
                           text_dims=(teacher.config.joint_attention_dim, teacher.config.pooled_projection_dim),
                           unet_config=dict(block_out_channels=(16, 32, 48), layers_per_block=1,
                                            transformer_layers_per_block=(1, 1, 1), attention_head_dim=8,
                                            cross_attention_dim=32, norm_num_groups=8))
    check_teacher_student(teacher, student)
    pipe = build_pipeline(comps, student)
    embeds, pooled = encode_captions(pipe, ["a red circle", "a blue square"], "cpu")
    latents = encode_latents(load_vae_encoder(comps), torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        assert student(latents, t, embeds, pooled).sample.shape == latents.shape
        assert teacher(latents, embeds, pooled, t).sample.shape == latents.shape


def test_mismatches_and_bad_arguments_are_explained(tmp_path):
    from diffusers_snapgen.testing import tiny_decoder, tiny_unet

    with pytest.raises(ValueError, match="joint_attention_dim"):
        check_teacher_student(tiny_teacher(joint_attention_dim=16), tiny_unet())
    with pytest.raises(ValueError, match="--pretrained_vae_model_name_or_path"):
        load_vae_encoder({"vae": tiny_decoder()})
    with pytest.raises(TypeError, match="--pretrained_vae_model_name_or_path"):
        encode_latents(tiny_decoder(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="mixed_precision"):
        weight_dtype_for("fp8")
    assert weight_dtype_for("bf16") == torch.bfloat16 and weight_dtype_for(None) == torch.float32
    with pytest.raises(ValueError, match="model_index.json"):
        load_base_components(str(tmp_path))
    with pytest.raises(TypeError, match="unet_config"):
        load_student(unet_config="{}")


def test_student_sources(tmp_path):
    from diffusers_snapgen.testing import tiny_pipeline

    pipe = tiny_pipeline(text_encoder="none")
    pipe.save_pretrained(tmp_path / "snap")
    loaded = load_student(str(tmp_path / "snap"))
    assert torch.equal(next(loaded.parameters()), next(pipe.unet.parameters()))
    assert torch.equal(next(load_student(unet_model_name_or_path=str(tmp_path / "snap" / "unet")).parameters()),
                       next(pipe.unet.parameters()))
    small = dict(block_out_channels=(16, 32, 48), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                 attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
    fresh = load_student(str(tmp_path / "snap"), from_scratch=True, unet_config=small, latent_channels=4,
                         text_dims=(24, 12), seed=1)
    assert fresh.config.joint_attention_dim == 24 and fresh.config.in_channels == 4
    again = load_student(None, unet_config=small, latent_channels=4, text_dims=(24, 12), seed=1)
    assert torch.equal(next(fresh.parameters()), next(again.parameters()))  # seeded initialisation
