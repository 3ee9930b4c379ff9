"""Every invalid SnapGenPipeline argument raises ValueError/TypeError naming the argument (table-driven)."""

from __future__ import annotations

import pytest
import torch

from diffusers_snapgen import SnapGenPipeline
from diffusers_snapgen.pipelines import snapgen_scheduler
from diffusers_snapgen.testing import tiny_clip_tokenizer, tiny_decoder, tiny_pipeline, tiny_unet

OK = dict(prompt="a red apple", height=32, width=32)
EMBEDS = dict(prompt_embeds=torch.zeros(1, 5, 32), pooled_prompt_embeds=torch.zeros(1, 20))


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# (case id, call arguments replacing OK's, exception type, text the message must contain)
CASES = [
    ("height-not-multiple-of-32", dict(height=48), ValueError, "`height`"),
    ("width-not-multiple-of-32", dict(width=100), ValueError, "`width`"),
    ("height-zero", dict(height=0), ValueError, "`height`"),
    ("width-negative", dict(width=-32), ValueError, "`width`"),
    ("height-float", dict(height=32.0), TypeError, "`height`"),
    ("steps-zero", dict(num_inference_steps=0), ValueError, "`num_inference_steps`"),
    ("steps-float", dict(num_inference_steps=2.5), TypeError, "`num_inference_steps`"),
    ("images-per-prompt-zero", dict(num_images_per_prompt=0), ValueError, "`num_images_per_prompt`"),
    ("prompt-and-embeds", dict(**EMBEDS), ValueError, "`prompt_embeds`"),
    ("neither-prompt-nor-embeds", dict(prompt=None), ValueError, "`prompt_embeds`"),
    ("prompt-wrong-type", dict(prompt=42), TypeError, "`prompt`"),
    ("prompt-list-of-non-str", dict(prompt=["a", 3]), TypeError, "`prompt`"),
    ("prompt-empty-list", dict(prompt=[]), ValueError, "`prompt`"),
    ("embeds-without-pooled", dict(prompt=None, prompt_embeds=torch.zeros(1, 5, 32)), ValueError,
     "`pooled_prompt_embeds`"),
    ("embeds-wrong-width", dict(prompt=None, prompt_embeds=torch.zeros(1, 5, 7),
                                pooled_prompt_embeds=torch.zeros(1, 20)), ValueError, "`prompt_embeds`"),
    ("embeds-not-tensor", dict(prompt=None, prompt_embeds=[[0.0]], pooled_prompt_embeds=torch.zeros(1, 20)),
     TypeError, "`prompt_embeds`"),
    ("pooled-batch-mismatch", dict(prompt=None, prompt_embeds=torch.zeros(2, 5, 32),
                                   pooled_prompt_embeds=torch.zeros(1, 20)), ValueError, "`pooled_prompt_embeds`"),
    ("negative-prompt-batch-mismatch", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError,
     "`negative_prompt`"),
    ("negative-prompt-and-embeds", dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 5, 32),
                                        negative_pooled_prompt_embeds=torch.zeros(1, 20)), ValueError,
     "`negative_prompt_embeds`"),
    ("negative-embeds-shape-mismatch", dict(prompt=None, **EMBEDS, negative_prompt_embeds=torch.zeros(1, 6, 32),
                                            negative_pooled_prompt_embeds=torch.zeros(1, 20)), ValueError,
     "`negative_prompt_embeds`"),
    ("generator-list-too-short", dict(prompt=["a", "b"], generator=[g()]), ValueError, "`generator`"),
    ("generator-list-vs-images-per-prompt", dict(num_images_per_prompt=3, generator=[g(), g()]), ValueError,
     "`generator`"),
    ("generator-wrong-type", dict(generator=0), TypeError, "`generator`"),
    ("latents-wrong-shape", dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "`latents`"),
    ("latents-wrong-batch", dict(latents=torch.zeros(2, 4, 4, 4)), ValueError, "`latents`"),
    ("latents-not-tensor", dict(latents=[0.0]), TypeError, "`latents`"),
    ("latents-nan", dict(latents=torch.zeros(1, 4, 4, 4).index_fill_(1, torch.tensor([2]), float("nan"))),
     ValueError, "`latents`"),
    ("latents-inf", dict(latents=torch.full((1, 4, 4, 4), float("inf"))), ValueError, "`latents`"),
    ("embeds-nan", dict(prompt=None, prompt_embeds=torch.full((1, 5, 32), float("nan")),
                        pooled_prompt_embeds=torch.zeros(1, 20)), ValueError, "`prompt_embeds`"),
    ("pooled-embeds-inf", dict(prompt=None, prompt_embeds=torch.zeros(1, 5, 32),
                               pooled_prompt_embeds=torch.full((1, 20), -float("inf"))), ValueError,
     "`pooled_prompt_embeds`"),
    ("negative-embeds-nan", dict(prompt=None, **EMBEDS, guidance_scale=2.0,
                                 negative_prompt_embeds=torch.full((1, 5, 32), float("nan")),
                                 negative_pooled_prompt_embeds=torch.zeros(1, 20)), ValueError,
     "`negative_prompt_embeds`"),
    ("unknown-output-type", dict(output_type="jpeg"), ValueError, "`output_type`"),
    ("sigmas-length-vs-steps", dict(num_inference_steps=2, sigmas=[1.0, 0.5, 0.25]), ValueError, "`sigmas`"),
    ("sigmas-empty", dict(sigmas=[]), ValueError, "`sigmas`"),
    ("sigmas-out-of-range", dict(sigmas=[2.0, 0.5]), ValueError, "`sigmas`"),
    ("sigmas-string", dict(sigmas="1,0.5"), TypeError, "`sigmas`"),
    ("sigmas-increasing", dict(sigmas=[0.25, 0.5, 1.0]), ValueError, "decrease"),
    ("sigmas-repeated", dict(sigmas=[1.0, 0.5, 0.5]), ValueError, "decrease"),
    ("guidance-negative", dict(guidance_scale=-1.0), ValueError, "`guidance_scale`"),
    ("guidance-nan", dict(guidance_scale=float("nan")), ValueError, "`guidance_scale`"),
    ("guidance-string", dict(guidance_scale="7"), TypeError, "`guidance_scale`"),
    ("callback-not-callable", dict(callback_on_step_end=3), TypeError, "`callback_on_step_end`"),
    ("callback-unknown-tensor", dict(callback_on_step_end=lambda *a: {},
                                     callback_on_step_end_tensor_inputs=["noise"]), ValueError,
     "`callback_on_step_end_tensor_inputs`"),
    ("max-sequence-length-too-long", dict(max_sequence_length=600), ValueError, "`max_sequence_length`"),
]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("clip", "tiny")


@pytest.mark.parametrize("overrides, error, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_call_arguments_are_named(pipe, overrides, error, needle):
    kwargs = {**OK, **overrides}
    with pytest.raises(error) as info:
        pipe(**kwargs)
    assert needle in str(info.value)


def test_the_valid_baseline_runs(pipe):
    """OK itself is valid, so each case above fails only because of its own override."""
    assert pipe(**OK, generator=g(), output_type="latent").images.shape == (1, 4, 4, 4)


def test_prompt_needs_a_text_encoder():
    pipe = tiny_pipeline("none")
    with pytest.raises(ValueError, match="`prompt_embeds`") as info:
        pipe(**OK)
    # the message names the fixes that work, not only the embeddings
    for fix in ("text_encoder=", "load_default_pipeline()", "set_packaged_text_encoder"):
        assert fix in str(info.value)
    with pytest.raises(ValueError, match="`negative_prompt_embeds`"):
        pipe(**EMBEDS, height=32, width=32, guidance_scale=3.0)


@pytest.mark.parametrize(
    "components, error, needle",
    [
        (dict(unet="not a model"), TypeError, "`unet`"),
        (dict(vae=tiny_decoder(0, latent_channels=16)), ValueError, "`vae`"),
        (dict(text_encoder=torch.nn.Linear(1, 1)), ValueError, "`tokenizer`"),
        (dict(scheduler=object()), TypeError, "`scheduler`"),
        (dict(text_encoder_2=torch.nn.Linear(1, 1), tokenizer_2=tiny_clip_tokenizer()), ValueError,
         "`text_encoder`"),
        (dict(text_encoder=torch.nn.Linear(1, 1), tokenizer=tiny_clip_tokenizer(),
              text_encoder_2=torch.nn.Linear(1, 1), tokenizer_2=tiny_clip_tokenizer()), ValueError,
         "CLIPTextModelWithProjection"),
        (dict(text_encoder="clip", tokenizer=tiny_clip_tokenizer()), TypeError, "`text_encoder`"),
        (dict(text_encoder=torch.nn.Linear(1, 1), tokenizer="vocab.json"), TypeError, "`tokenizer`"),
    ],
    ids=["unet-not-a-model", "vae-latent-channels", "encoder-without-tokenizer", "scheduler-wrong-type",
         "clip-g-without-clip-l", "sd3-set-without-projection", "encoder-wrong-type", "tokenizer-wrong-type"],
)
def test_invalid_components_are_named(components, error, needle):
    kwargs = dict(unet=tiny_unet(0), scheduler=snapgen_scheduler(), vae=tiny_decoder(0))
    kwargs.update(components)
    with pytest.raises(error) as info:
        SnapGenPipeline(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(num_inference_steps=0), ValueError, "`num_inference_steps`"),
        (dict(guidance_scale="high"), TypeError, "`guidance_scale`"),
    ],
)
def test_invalid_sampling_defaults_are_named(pipe, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        pipe.set_sampling_defaults(**kwargs)
    with pytest.raises(error, match=needle):
        snapgen_scheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(latent_channels=0), ValueError, "`latent_channels`"),
        (dict(latent_channels=4.0), TypeError, "`latent_channels`"),
        (dict(out_channels=-3), ValueError, "`out_channels`"),
        (dict(block_out_channels=()), ValueError, "`block_out_channels`"),
    ],
    ids=["latent-channels-zero", "latent-channels-float", "out-channels-negative", "no-stages"],
)
def test_invalid_tiny_decoder_arguments_are_named(kwargs, error, needle):
    from diffusers_snapgen import TinyDecoder

    with pytest.raises(error, match=needle):
        TinyDecoder(**kwargs)


def test_a_pipeline_without_unet_or_vae_only_encodes():
    kwargs = dict(unet=tiny_unet(0, joint_attention_dim=32, pooled_projection_dim=20), scheduler=snapgen_scheduler(),
                  vae=tiny_decoder(0))
    for missing in ("unet", "vae"):
        pipe = SnapGenPipeline(**{**kwargs, missing: None})
        with pytest.raises(ValueError, match=f"without `{missing}`"):
            pipe(prompt_embeds=EMBEDS["prompt_embeds"], pooled_prompt_embeds=EMBEDS["pooled_prompt_embeds"],
                 height=32, width=32)
    no_vae = SnapGenPipeline(**{**kwargs, "vae": None})  # latents need no decoder
    out = no_vae(**EMBEDS, height=32, width=32, guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    assert out.images.shape == (1, 4, 4, 4)
