"""Text-to-image pipelines with random weights built from published configs, for end-to-end timing (no downloads).

- SnapGen: the paper UNet (§3.1) + tiny decoder (§3.2) + SD3.5's CLIP-L and CLIP-G (T5 absent: zeros), 4 steps.
- SANA-Sprint 1.6B: SANA's 1.6B transformer with Sprint's guidance embedding, Gemma-2-2B text encoder, DC-AE f32c32
  decoder, SCM scheduler, 2 steps.
- SDXL: UNet, VAE, CLIP-L and CLIP-G, 4 Euler steps without CFG (as the few-step SDXL distillations run).

Tokenizers are built in memory (CLIP: single characters; Gemma: whole words): token counts, not vocabularies,
decide the cost. ``smoke=True`` gives the same pipelines with tiny widths, for CPU tests.
"""

from __future__ import annotations

import inspect

import torch

from common import SRC  # noqa: F401  (puts src/ on sys.path)

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192)
SANA_SPRINT_1600M = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads", timestep_scale=1000.0)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                force_upcast=False)
STEPS = {"snapgen": 4, "sana_sprint": 2, "sdxl": 4}
PROMPT = "a photo of a red apple on a wooden table, soft morning light"


def _clip_tokenizer():
    from diffusers_snapgen.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 77
    return tokenizer


def _clip(kind: str, smoke: bool, with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    widths = (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
              if smoke else (CLIP_L if kind == "L" else CLIP_G))
    config = CLIPTextConfig(**{**CLIP_COMMON, **widths})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _finish(pipe, device, dtype):
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    return pipe


def snapgen_pipeline(device, dtype, smoke: bool = False):
    """SnapGen paper UNet + tiny decoder + CLIP-L/CLIP-G (SD3.5 set without T5), 4 steps, no CFG."""
    from diffusers_snapgen import SnapGenPipeline, SnapGenUNet2DModel, TinyDecoder
    from diffusers_snapgen.pipelines import snapgen_scheduler
    from diffusers_snapgen.testing import tiny_decoder, tiny_unet

    with torch.device(device):
        if smoke:
            unet = tiny_unet(in_channels=16, out_channels=16, joint_attention_dim=32, pooled_projection_dim=32)
            vae = tiny_decoder(latent_channels=16)
        else:
            unet, vae = SnapGenUNet2DModel(), TinyDecoder()
        text = dict(text_encoder=_clip("L", smoke), tokenizer=_clip_tokenizer(), text_encoder_2=_clip("G", smoke),
                    tokenizer_2=_clip_tokenizer())
    pipe = SnapGenPipeline(unet=unet, vae=vae,
                           scheduler=snapgen_scheduler(num_inference_steps=STEPS["snapgen"], guidance_scale=1.0),
                           **text)
    return _finish(pipe, device, dtype)


def _word_tokenizer():
    """A fast tokenizer that splits on whitespace and punctuation (one token per word, unknown words -> <unk>)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PROMPT.replace(",", " ").split()))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", model_max_length=4096)


def sana_sprint_pipeline(device, dtype, smoke: bool = False):
    """SANA-Sprint 1.6B (transformer, Gemma-2-2B, DC-AE f32c32, SCM scheduler), 2 steps."""
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    with torch.device(device):
        if smoke:
            text_encoder = Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    num_key_value_heads=1, head_dim=16))
            vae = AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_out_channels=(8, 16),
                                decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                                decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                                decoder_qkv_multiscales=((), ()), scaling_factor=0.41407)
            transformer = SanaTransformer2DModel(
                in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
                sample_size=32, **SANA_SPRINT_1600M,
            )
        else:
            text_encoder = Gemma2Model(Gemma2Config(**GEMMA2_2B))
            vae = AutoencoderDC(scaling_factor=0.41407)
            transformer = SanaTransformer2DModel(**SANA_SPRINT_1600M)
    pipe = SanaSprintPipeline(tokenizer=_word_tokenizer(), text_encoder=text_encoder, vae=vae,
                              transformer=transformer, scheduler=SCMScheduler())
    return _finish(pipe, device, dtype)


def sdxl_pipeline(device, dtype, smoke: bool = False):
    """SDXL (UNet, VAE, CLIP-L, CLIP-G) with an Euler scheduler on trailing timesteps, 4 steps, no CFG."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from bench_models import SDXL_UNET_CONFIG
    from diffusers_snapgen.testing import tiny_autoencoder_kl

    with torch.device(device):
        if smoke:
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
            )
            vae = tiny_autoencoder_kl(latent_channels=4)
        else:
            unet, vae = UNet2DConditionModel(**SDXL_UNET_CONFIG), AutoencoderKL(**SDXL_VAE)
        text_encoder, text_encoder_2 = _clip("L", smoke, with_projection=False), _clip("G", smoke)
    scheduler = EulerDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    return _finish(pipe, device, dtype)


BUILDERS = {"snapgen": snapgen_pipeline, "sana_sprint": sana_sprint_pipeline, "sdxl": sdxl_pipeline}


def call_kwargs(name: str, pipe, resolution: int, smoke: bool = False) -> dict:
    """Arguments of a ``pipe(...)`` call at the benchmark's settings (steps, no CFG, tensor output)."""
    kwargs = dict(height=resolution, width=resolution, num_inference_steps=STEPS[name], output_type="pt")
    if name == "snapgen":
        kwargs["guidance_scale"] = 1.0
    elif name == "sdxl":
        kwargs["guidance_scale"] = 0.0
    elif name == "sana_sprint" and smoke:
        kwargs["use_resolution_binning"] = False  # the tiny config is not one of SANA's resolutions
    return kwargs


def text_embeddings(name: str, pipe, device) -> dict:
    """Precomputed text conditioning of :data:`PROMPT`, as ``pipe(...)`` keyword arguments (text excluded)."""
    with torch.no_grad():
        if name == "snapgen":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
            return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
            return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        embeds, mask = pipe.encode_prompt(PROMPT, device=device)
        return dict(prompt_embeds=embeds, prompt_attention_mask=mask)


def encode_text(name: str, pipe, device):
    """Encode :data:`PROMPT` the way ``pipe(prompt)`` does (for timing text encoding alone)."""
    with torch.no_grad():
        if name == "sana_sprint":  # with the instruction prefix that pipe(prompt) adds
            instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
            return pipe.encode_prompt(PROMPT, device=device, complex_human_instruction=instruction)
        return pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
