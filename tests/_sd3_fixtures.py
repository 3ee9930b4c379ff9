"""Tiny, offline StableDiffusion3Pipeline components (random weights, built in code) for tests."""

from __future__ import annotations

import string

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_HIDDEN = 16  # two CLIP encoders concatenated -> 32 = joint_attention_dim
CLIP_MAX_LENGTH = 77


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over lowercase letters, no merges (one token per letter)."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += [c for c in string.ascii_lowercase] + [f"{c}</w>" for c in string.ascii_lowercase]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def tiny_clip_text_encoder(seed: int, vocab_size: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=32,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_components(latent_channels: int = 4, seed: int = 0) -> dict:
    """Every StableDiffusion3Pipeline component except `vae` (T5 left out: the pipeline uses zeros)."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=4,
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * CLIP_HIDDEN,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=16,
    ).eval()
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_clip_text_encoder(seed + 1, len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(seed + 2, len(tokenizer)),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_sd3_pipeline(vae, seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny StableDiffusion3Pipeline decoding with `vae`; its latent channels match `vae.config.latent_channels`."""
    pipe = StableDiffusion3Pipeline(vae=vae, **tiny_sd3_components(vae.config.latent_channels, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
