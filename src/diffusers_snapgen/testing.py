"""Builders of tiny, randomly initialised SnapGen components for tests and downstream projects.

Everything here is built from configs in code: no file is read and nothing is downloaded.
"""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, **overrides):
    """A SnapGen UNet of a few hundred thousand parameters with every paper feature switched on.

    ``overrides`` replace config keys, e.g. ``tiny_unet(use_rope=False)``.
    """
    from .models import SnapGenUNet2DModel

    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 48),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=8,
        cross_attention_dim=32,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        norm_num_groups=8,
        time_embedding_dim=64,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return SnapGenUNet2DModel(**config).eval()


def tiny_decoder(seed: int = 0, **overrides):
    """A TinyDecoder of a few thousand parameters (8x upsampling, like the paper's).

    Four latent channels by default, like :func:`tiny_unet`; ``tiny_decoder(latent_channels=16)`` for SD3 latents.
    ``overrides`` replace config keys.
    """
    from .models import TinyDecoder

    config = dict(
        latent_channels=4,
        out_channels=3,
        block_out_channels=(8, 8, 8, 16),
        layers_per_block=1,
        norm_per_block=(False, False, True, True),
        norm_num_groups=4,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return TinyDecoder(**config).eval()


def tiny_encoder(seed: int = 0, **overrides):
    """A TinyEncoder of a few thousand parameters (8x downsampling), four latent channels like :func:`tiny_unet`;
    ``overrides`` replace config keys (``latent_channels=16`` for SD3 latents)."""
    from .models import TinyEncoder

    config = dict(latent_channels=4, block_out_channels=(8, 8, 8, 16), layers_per_block=1,
                  norm_per_block=(False, False, True, True), norm_num_groups=4)
    config.update(overrides)
    torch.manual_seed(seed)
    return TinyEncoder(**config).eval()


# --------------------------------------------------------------------------- tiny text encoders and pipelines
# Tokenizers are built in memory from tiny vocabularies (one token per
# character, no merges), text encoders from tiny configs: nothing is read from disk or downloaded.

TINY_TOKEN_LENGTH = 16  # CLIP context / generic encoder positions of the tiny encoders
TEXT_ENCODER_KINDS = ("clip", "sd3", "generic", "none")


def _tiny_chars() -> str:
    import string

    return string.ascii_lowercase + string.digits


def tiny_clip_tokenizer():
    """A CLIPTokenizer whose vocabulary is single characters (with and without ``</w>``)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _tiny_chars():
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TOKEN_LENGTH)


def tiny_clip_text_encoder(seed: int = 0, hidden_size: int = 16, projection_dim: int = 8):
    """A two-layer ``CLIPTextModelWithProjection`` matching :func:`tiny_clip_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tiny_clip_tokenizer()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_TOKEN_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over single characters."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _tiny_chars()] + [("\u2581" + c, -2.5) for c in _tiny_chars()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    """A one-layer ``T5EncoderModel`` matching :func:`tiny_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tiny_t5_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_bert_tokenizer():
    """A WordPiece BertTokenizer over single characters (``c`` and ``##c``)."""
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for char in _tiny_chars():
        vocab[char] = len(vocab)
        vocab[f"##{char}"] = len(vocab)
    return BertTokenizer(vocab=vocab, model_max_length=TINY_TOKEN_LENGTH)


def tiny_bert_encoder(seed: int = 0, hidden_size: int = 16):
    """A one-layer ``BertModel``: the generic-encoder stand-in for MiniLM (docs/design.md, "Offline assets")."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tiny_bert_tokenizer()),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=TINY_TOKEN_LENGTH,
    )
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_text_components(text_encoder: str = "clip", seed: int = 0) -> tuple[dict, dict]:
    """Text components for :class:`SnapGenPipeline` and the UNet overrides that match their widths.

    ``"clip"``: CLIP-L (hidden 16, projection 8) + CLIP-G (hidden 12, projection 12), no T5 (zeros);
    ``"sd3"``: the same plus a T5 of width 32; ``"generic"``: one BERT of width 16; ``"none"``: no encoder.
    Returns ``(components, unet_overrides)``.
    """
    if text_encoder not in TEXT_ENCODER_KINDS:
        raise ValueError(f"`text_encoder` must be one of {TEXT_ENCODER_KINDS}, got {text_encoder!r}.")
    if text_encoder == "generic":
        components = dict(text_encoder=tiny_bert_encoder(seed), tokenizer=tiny_bert_tokenizer())
        return components, dict(joint_attention_dim=16, pooled_projection_dim=16)
    overrides = dict(joint_attention_dim=32, pooled_projection_dim=20)
    if text_encoder == "none":
        return {}, overrides
    components = dict(
        text_encoder=tiny_clip_text_encoder(seed, hidden_size=16, projection_dim=8),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 1, hidden_size=12, projection_dim=12),
        tokenizer_2=tiny_clip_tokenizer(),
    )
    if text_encoder == "sd3":
        components.update(text_encoder_3=tiny_t5_encoder(seed + 2, d_model=32), tokenizer_3=tiny_t5_tokenizer())
    return components, overrides


def tiny_autoencoder_kl(seed: int = 0, latent_channels: int = 4):
    """A tiny diffusers ``AutoencoderKL`` with SD3's latent statistics and f = 8 (four stages)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        mid_block_add_attention=False,
    ).eval()


def tiny_pipeline(
    text_encoder: str = "clip",
    vae: str = "tiny",
    seed: int = 0,
    num_inference_steps: int | None = 2,
    guidance_scale: float | None = 1.0,
    **unet_overrides,
):
    """A complete :class:`SnapGenPipeline` of tiny random components (CPU, seconds).

    Args:
        text_encoder: ``"clip"`` (CLIP-L + CLIP-G, T5 zeros), ``"sd3"`` (+ T5), ``"generic"`` (one BERT) or ``"none"``.
        vae: ``"tiny"`` (:func:`tiny_decoder`) or ``"kl"`` (:func:`tiny_autoencoder_kl`).
        seed: seeds every component.
        num_inference_steps, guidance_scale: sampling defaults stored in the scheduler config (2 steps, no CFG).
        unet_overrides: passed to :func:`tiny_unet` (after the text-width overrides).
    """
    from .pipelines import SnapGenPipeline, snapgen_scheduler

    vaes = {"tiny": lambda: tiny_decoder(seed + 10), "kl": lambda: tiny_autoencoder_kl(seed + 10)}
    if vae not in vaes:
        raise ValueError(f"`vae` must be one of {tuple(vaes)}, got {vae!r}.")
    text_components, overrides = tiny_text_components(text_encoder, seed + 20)
    overrides.update(unet_overrides)
    pipe = SnapGenPipeline(
        unet=tiny_unet(seed, **overrides),
        scheduler=snapgen_scheduler(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale),
        vae=vaes[vae](),
        **text_components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
