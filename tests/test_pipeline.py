"""Behaviour of SnapGenPipeline on tiny random components (CPU, 2 steps, 32x64 images)."""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_snapgen import SnapGenPipeline, SnapGenPipelineOutput
from diffusers_snapgen.pipelines import SAMPLING_DEFAULTS_KEY, snapgen_scheduler
from diffusers_snapgen.testing import tiny_autoencoder_kl, tiny_decoder, tiny_pipeline

H, W = 32, 64  # non-square on purpose: latents 4x8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents_of(pipe, prompt="a red apple", seed=0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("height", H)
    kwargs.setdefault("width", W)
    return pipe(prompt, generator=gen(seed), output_type="latent", **kwargs).images


@contextlib.contextmanager
def unet_batches(pipe):
    """Record the batch size of every UNet forward."""
    sizes = []
    handle = pipe.unet.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("clip", "tiny")


def test_same_seed_same_images_and_other_seed_differs(pipe):
    first = pipe("a red apple", height=H, width=W, generator=gen(0), output_type="np").images
    again = pipe("a red apple", height=H, width=W, generator=gen(0), output_type="np").images
    other = pipe("a red apple", height=H, width=W, generator=gen(1), output_type="np").images
    assert first.shape == (1, H, W, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_batch_of_two_equals_two_single_calls(pipe):
    batch = pipe(["a red apple", "a blue car"], height=H, width=W, generator=[gen(3), gen(4)], output_type="latent")
    single_a = latents_of(pipe, "a red apple", seed=3)
    single_b = latents_of(pipe, "a blue car", seed=4)
    torch.testing.assert_close(batch.images, torch.cat([single_a, single_b]), atol=1e-4, rtol=1e-4)
    assert (single_a - single_b).abs().max() > 1e-3  # the comparison above is not vacuous


def test_num_images_per_prompt_matches_per_image_generators(pipe):
    many = latents_of(pipe, num_images_per_prompt=2, seed=0)
    assert many.shape == (2, 4, H // 8, W // 8)
    listed = pipe("a red apple", height=H, width=W, num_images_per_prompt=2, generator=[gen(5), gen(6)],
                  output_type="latent").images
    torch.testing.assert_close(listed[1:], latents_of(pipe, seed=6), atol=1e-4, rtol=1e-4)


def test_given_latents_are_the_initial_noise(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor((1, 4, H // 8, W // 8), generator=gen(9))
    torch.testing.assert_close(latents_of(pipe, latents=noise.double(), seed=0), latents_of(pipe, seed=9))


def test_progress_bar_counts_the_steps():
    import io

    local = tiny_pipeline("none")
    stream = io.StringIO()
    local.set_progress_bar_config(disable=False, file=stream, ascii=True)
    local(prompt_embeds=torch.zeros(1, 5, 32), pooled_prompt_embeds=torch.zeros(1, 20), num_inference_steps=3,
          height=H, width=W, output_type="latent")
    assert "3/3" in stream.getvalue()


def test_prompt_changes_the_output(pipe):
    assert (latents_of(pipe, "a red apple") - latents_of(pipe, "a blue car")).abs().max() > 1e-3


def test_cfg_runs_two_branches_only_above_one(pipe):
    with unet_batches(pipe) as sizes:
        off = latents_of(pipe, guidance_scale=1.0)
    assert sizes == [1, 1]
    with unet_batches(pipe) as sizes:
        on = latents_of(pipe, guidance_scale=5.0)
    assert sizes == [2, 2]
    assert (on - off).abs().max() > 1e-3
    # the negative prompt matters with CFG and is ignored without it
    other_negative = latents_of(pipe, guidance_scale=5.0, negative_prompt="a blue car")
    assert (other_negative - on).abs().max() > 1e-4
    torch.testing.assert_close(latents_of(pipe, guidance_scale=1.0, negative_prompt="a blue car"), off)


def test_prompt_embeds_give_the_same_images_as_the_prompt(pipe):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red apple", do_classifier_free_guidance=True, negative_prompt="blurry"
    )
    from_text = latents_of(pipe, guidance_scale=4.0, negative_prompt="blurry")
    from_embeds = pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled, guidance_scale=4.0, height=H, width=W,
        generator=gen(0), output_type="latent",
    ).images
    torch.testing.assert_close(from_embeds, from_text)


def test_callback_that_replaces_prompt_embeds_is_followed(pipe):
    """The text keys and values are computed once per call: a callback that swaps ``prompt_embeds`` mid-loop gets
    them computed again, so the later steps follow the new text as they did with per-step projections."""
    other = pipe.encode_prompt("a blue bird", do_classifier_free_guidance=False)[0]

    def switch_text(pipeline, step, timestep, callback_kwargs):
        return {"prompt_embeds": other} if step == 0 else {}

    switched = latents_of(pipe, num_inference_steps=3, callback_on_step_end=switch_text,
                          callback_on_step_end_tensor_inputs=["prompt_embeds"])
    generator = gen(0)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, H, W, torch.float32, pipe.device, generator)
    embeds, _, pooled, _ = pipe.encode_prompt("a red apple", do_classifier_free_guidance=False)
    pipe.scheduler.set_timesteps(3)
    with torch.no_grad():
        for step, t in enumerate(pipe.scheduler.timesteps):
            text = embeds if step == 0 else other
            velocity = pipe.unet(latents, t.expand(1), encoder_hidden_states=text, pooled_projections=pooled).sample
            latents = pipe.scheduler.step(velocity, t, latents).prev_sample
    torch.testing.assert_close(switched, latents, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(switched, latents_of(pipe, num_inference_steps=3), atol=1e-4)


def test_callback_sees_requested_tensors_and_can_edit_latents(pipe):
    seen = []

    def zero_latents_at_last_step(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs)))
        if step == pipeline.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    out = latents_of(pipe, callback_on_step_end=zero_latents_at_last_step,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert torch.count_nonzero(out) == 0


def test_interrupt_stops_the_loop(pipe):
    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return {}

    with unet_batches(pipe) as sizes:
        latents_of(pipe, num_inference_steps=4, callback_on_step_end=stop)
    assert len(sizes) == 1


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_and_return_dict(pipe, output_type):
    images = pipe("a red apple", height=H, width=W, generator=gen(0), output_type=output_type).images
    if output_type == "pil":
        assert isinstance(images, list) and isinstance(images[0], PIL.Image.Image)
        assert images[0].size == (W, H)
    elif output_type == "np":
        assert images.shape == (1, H, W, 3) and 0 <= images.min() and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (1, 3, H, W)
    else:
        assert images.shape == (1, 4, H // 8, W // 8)
    as_tuple = pipe("a red apple", height=H, width=W, generator=gen(0), output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1


def test_default_size_comes_from_the_unet(pipe):
    out = pipe("a red apple", generator=gen(0), output_type="pt")
    assert isinstance(out, SnapGenPipelineOutput)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert out.images.shape[-2:] == (side, side)


def test_sampling_defaults_are_read_from_the_scheduler_config(tmp_path):
    pipe = tiny_pipeline("none", num_inference_steps=3, guidance_scale=1.0)
    embeds = dict(prompt_embeds=torch.randn(1, 5, 32), pooled_prompt_embeds=torch.randn(1, 20))
    with unet_batches(pipe) as sizes:
        pipe(**embeds, height=H, width=W, output_type="latent")
    assert sizes == [1, 1, 1]

    pipe.set_sampling_defaults(num_inference_steps=1)
    pipe.scheduler.save_pretrained(tmp_path)
    reloaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert reloaded.config[SAMPLING_DEFAULTS_KEY] == {"num_inference_steps": 1, "guidance_scale": 1.0}
    assert reloaded.config.shift == 3.0
    pipe.scheduler = reloaded
    with unet_batches(pipe) as sizes:
        pipe(**embeds, height=H, width=W, output_type="latent")
    assert sizes == [1]

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # no stored defaults: the base-model ones
    assert pipe.sampling_defaults == {"num_inference_steps": 28, "guidance_scale": 3.5}


def test_custom_sigmas_set_the_schedule(pipe):
    with unet_batches(pipe) as sizes:
        latents_of(pipe, sigmas=[1.0, 0.6, 0.3])
    assert len(sizes) == 3
    shift = pipe.scheduler.config.shift
    expected = [shift * s / (1 + (shift - 1) * s) for s in (1.0, 0.6, 0.3)]
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, tokens, width", [("clip", 16 + 256, 32), ("sd3", 16 + 256, 32), ("generic", 16, 16)]
)
def test_text_encoder_sets(kind, tokens, width):
    pipe = tiny_pipeline(kind)
    assert pipe.text_encoder_mode == ("generic" if kind == "generic" else "sd3")
    embeds, _, pooled, _ = pipe.encode_prompt(["a red apple", "a dog"], do_classifier_free_guidance=False)
    assert embeds.shape == (2, tokens, width)
    assert pooled.shape == (2, pipe.unet.config.pooled_projection_dim)
    if kind == "clip":  # T5 absent: its 256 tokens are zeros, and the 12 + 16 CLIP channels are padded to 32
        assert torch.count_nonzero(embeds[:, 16:]) == 0 and torch.count_nonzero(embeds[:, :16, 28:]) == 0
    if kind == "sd3":
        assert torch.count_nonzero(embeds[:, 16:]) > 0
    if kind == "generic":  # pooled = attention-mask mean of the BERT tokens
        inputs = pipe.tokenizer(["a dog"], padding="max_length", max_length=16, return_tensors="pt")
        hidden = pipe.text_encoder(**inputs).last_hidden_state
        mask = inputs.attention_mask[..., None].float()
        torch.testing.assert_close(pooled[1:], (hidden * mask).sum(1) / mask.sum(1))
    out = pipe("a red apple", height=H, width=W, generator=gen(0), output_type="latent").images
    assert torch.isfinite(out).all()


def test_a_stored_text_length_is_the_default(tmp_path):
    """A model trained on short padded prompts stores its length; the UNet attends to padding, so it matters."""
    pipe = tiny_pipeline("generic")
    assert "max_sequence_length" not in pipe.sampling_defaults
    embeds = pipe.encode_prompt("a red apple", do_classifier_free_guidance=False)[0]
    default_tokens = embeds.shape[1]
    pipe.set_sampling_defaults(max_sequence_length=6)
    assert pipe.sampling_defaults["max_sequence_length"] == 6
    pipe.scheduler.save_pretrained(tmp_path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert pipe.encode_prompt("a red apple", do_classifier_free_guidance=False)[0].shape[1] == 6 != default_tokens
    assert pipe.encode_prompt("a red apple", do_classifier_free_guidance=False,
                              max_sequence_length=9)[0].shape[1] == 9  # an explicit length still wins
    with pytest.raises(ValueError, match="`max_sequence_length`"):
        pipe.set_sampling_defaults(max_sequence_length=0)
    assert snapgen_scheduler(max_sequence_length=16).config[SAMPLING_DEFAULTS_KEY] == {"max_sequence_length": 16}


def test_vae_swap_tiny_decoder_and_autoencoder_kl():
    """Both decoders get the same unscaled latents (latents / scaling_factor + shift_factor)."""
    pipe = tiny_pipeline("none")
    embeds = dict(prompt_embeds=torch.randn(1, 5, 32), pooled_prompt_embeds=torch.randn(1, 20))
    decoded = {}
    for name, vae in (("tiny", tiny_decoder(1)), ("kl", tiny_autoencoder_kl(1))):
        pipe.vae = vae
        assert pipe.config.vae[1] == type(vae).__name__
        received = []

        def spy(z, return_dict=True, _decode=vae.decode, _seen=received):
            _seen.append(z)
            return _decode(z, return_dict)

        vae.decode = spy
        latents = pipe(**embeds, height=H, width=W, generator=gen(0), output_type="latent").images
        decoded[name] = pipe(**embeds, height=H, width=W, generator=gen(0), output_type="pt").images
        torch.testing.assert_close(received[0], latents / 1.5305 + 0.0609)
        assert decoded[name].shape == (1, 3, H, W)
    assert (decoded["tiny"] - decoded["kl"]).abs().max() > 1e-3


def test_mismatched_latent_channels_are_refused():
    pipe = tiny_pipeline("none")
    with pytest.raises(ValueError, match="vae"):
        SnapGenPipeline(unet=pipe.unet, scheduler=snapgen_scheduler(), vae=tiny_decoder(0, latent_channels=16))


def test_model_cpu_offload_hook_wiring(pipe):
    """CPU-only check of ``enable_model_cpu_offload``: a hook on every model, in ``model_cpu_offload_seq``
    order, same images, hooks re-armed by ``maybe_free_model_hooks`` at the end of the call."""
    local = tiny_pipeline("clip", "tiny")
    reference = latents_of(local)
    local.enable_model_cpu_offload(device="cpu")
    modules = [name for name, c in local.components.items() if isinstance(c, torch.nn.Module)]
    assert sorted(modules) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert all(hasattr(local.components[name], "_hf_hook") for name in modules)
    assert len(local._all_hooks) == len(modules)
    hooked_order = [hook.model for hook in local._all_hooks]
    assert hooked_order == [local.text_encoder, local.text_encoder_2, local.unet, local.vae]
    hooks_before = list(local._all_hooks)
    torch.testing.assert_close(latents_of(local), reference)
    assert len(local._all_hooks) == len(modules) and local._all_hooks[0] is not hooks_before[0]
    local.remove_all_hooks()
    assert not hasattr(local.unet, "_hf_hook") or local.unet._hf_hook is None


def _random_unet_lora(pipe, tmp_path):
    """Save a random LoRA on every Linear layer of the UNet with ``SnapGenPipeline.save_lora_weights``."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    targets = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)]
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    SnapGenPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    return tmp_path


def test_lora_load_fuse_unfuse_unload(tmp_path):
    pipe = tiny_pipeline("none")
    embeds = dict(prompt_embeds=torch.randn(1, 5, 32), pooled_prompt_embeds=torch.randn(1, 20))

    def run():
        return pipe(**embeds, height=H, width=W, generator=gen(0), output_type="latent").images

    base = run()
    weights = _random_unet_lora(pipe, tmp_path)
    assert (weights / "pytorch_lora_weights.safetensors").is_file()
    pipe.load_lora_weights(weights, adapter_name="style")
    with_lora = run()
    assert (with_lora - base).abs().max() > 1e-3
    assert pipe.get_active_adapters() == ["style"]

    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    torch.testing.assert_close(run(), with_lora, atol=1e-4, rtol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(run(), with_lora, atol=1e-4, rtol=1e-4)

    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), base, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("vae", ["tiny", "kl"])
def test_pipeline_fuse_qkv_projections_keeps_the_images(vae):
    """diffusers' pipeline API: ``pipe.fuse_qkv_projections()`` fuses the UNet's attentions (and an AutoencoderKL's;
    the tiny decoder has none) with the same images; ``unfuse_qkv_projections()`` restores the separate ones."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from diffusers_snapgen.models.attention import SnapGenAttention

    pipe = tiny_pipeline(vae=vae)
    if vae == "kl":  # the tiny AutoencoderKL has no attention: give its mid-block one
        torch.manual_seed(0)
        pipe.vae = AutoencoderKL.from_config({**pipe.vae.config, "mid_block_add_attention": True}).eval()
    unet_attentions = [m for m in pipe.unet.modules() if isinstance(m, SnapGenAttention)]
    vae_attentions = [m for m in pipe.vae.modules() if isinstance(m, Attention)]
    assert bool(vae_attentions) == (vae == "kl")
    images = pipe("a red apple", generator=gen(0), output_type="pt").images

    pipe.fuse_qkv_projections(vae=False)
    assert all(m.fused_projections for m in unet_attentions) and not any(m.fused_projections for m in vae_attentions)
    pipe.fuse_qkv_projections()
    assert all(m.fused_projections for m in unet_attentions + vae_attentions)
    assert all(isinstance(m.processor, FusedAttnProcessor2_0) for m in vae_attentions)
    torch.testing.assert_close(pipe("a red apple", generator=gen(0), output_type="pt").images, images,
                               rtol=1e-5, atol=1e-5)

    pipe.unfuse_qkv_projections()
    assert not any(m.fused_projections or hasattr(m, "to_qkv") for m in unet_attentions)
    # diffusers' AutoencoderKL unfuses by restoring its original processors (the fused weights stay unused)
    assert not any(isinstance(m.processor, FusedAttnProcessor2_0) for m in vae_attentions)
    torch.testing.assert_close(pipe("a red apple", generator=gen(0), output_type="pt").images, images,
                               rtol=0, atol=0)
    pipe.unfuse_qkv_projections()  # nothing fused: nothing to do
    pipe.fuse_qkv_projections()
    pipe.fuse_qkv_projections()  # already fused: the VAE must keep its unfused processors as the originals
    pipe.unfuse_qkv_projections()
    assert not any(isinstance(m.processor, FusedAttnProcessor2_0) for m in vae_attentions)


def test_pipeline_fuse_qkv_projections_rejects_non_bool_flags():
    pipe = tiny_pipeline("none")
    with pytest.raises(TypeError, match="`unet` must be True or False"):
        pipe.fuse_qkv_projections(unet="yes")
    with pytest.raises(TypeError, match="`vae` must be True or False"):
        pipe.unfuse_qkv_projections(vae=None)
    assert not any(getattr(m, "fused_projections", False) for m in pipe.unet.modules())


def test_lora_weights_loaded_after_fusing_qkv_are_refused(tmp_path):
    """``load_lora_weights`` after ``fuse_qkv_projections()``: the adapter's Q/K/V layers would never run, so the load
    is refused and leaves no adapter behind."""
    pipe = tiny_pipeline("none")
    weights = _random_unet_lora(pipe, tmp_path)
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        pipe.load_lora_weights(weights, adapter_name="style")
    assert not getattr(pipe.unet, "peft_config", {})
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_lora_loading_rejects_non_lora_state_dicts():
    pipe = tiny_pipeline("none")
    with pytest.raises(ValueError, match="pretrained_model_name_or_path_or_dict"):
        pipe.load_lora_weights({"unet.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unet"):
        pipe.load_lora_weights({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)})
    with pytest.raises(TypeError, match="pretrained_model_name_or_path_or_dict"):
        pipe.load_lora_weights(42)
