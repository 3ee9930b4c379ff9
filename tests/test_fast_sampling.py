"""SnapGenFastSampler gives the images of SnapGenPipeline (CPU: no CUDA graph, the same loop in one unit)."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils import logging
from diffusers.utils.testing_utils import CaptureLogger

from diffusers_snapgen.pipelines import SnapGenFastSampler
from diffusers_snapgen.testing import tiny_pipeline

H, W = 32, 64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("clip", num_inference_steps=3)


@pytest.mark.parametrize("output_type", ["pt", "np", "latent"])
def test_same_images_as_the_pipeline(pipe, output_type):
    fast = pipe.fast_sampler(height=H, width=W)
    expected = pipe("a red apple", height=H, width=W, generator=gen(), output_type=output_type).images
    images = fast("a red apple", generator=gen(), output_type=output_type).images
    assert type(images) is type(expected)
    np.testing.assert_allclose(np.asarray(images), np.asarray(expected), atol=1e-6)
    assert fast.compile_mode is None and not fast.use_cuda_graph


def test_cfg_batches_and_embeddings_match_the_pipeline(pipe):
    fast = SnapGenFastSampler(pipe, height=H, width=W, guidance_scale=3.0, batch_size=2)
    expected = pipe(["an apple", "a pear"], height=H, width=W, guidance_scale=3.0, generator=[gen(0), gen(1)],
                    output_type="pt").images
    torch.testing.assert_close(fast(["an apple", "a pear"], generator=[gen(0), gen(1)], output_type="pt").images,
                               expected)
    embeds = pipe.encode_prompt("an apple", do_classifier_free_guidance=False)
    one = SnapGenFastSampler(pipe, height=H, width=W, batch_size=2)
    images = one(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2], generator=gen(), output_type="pt").images
    expected = pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2], num_images_per_prompt=2, height=H,
                    width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(images, expected)


def _projections_and_images(pipe, run):
    """How often ``run()`` projects the text (``context_embedder`` calls), and its images."""
    projections = []
    handle = pipe.unet.context_embedder.register_forward_pre_hook(lambda module, args: projections.append(1))
    try:
        images = run()
    finally:
        handle.remove()
    return len(projections), images


def test_text_keys_and_values_are_projected_once_per_call(pipe, monkeypatch):
    """Pipeline and sampler project the text once per call, not in each of the 3 steps: the images of the per-step
    projection, bit for bit."""
    from diffusers_snapgen.pipelines import pipeline_snapgen

    def pipeline():
        return pipe("a red apple", height=H, width=W, generator=gen(), output_type="pt").images

    fast = pipe.fast_sampler(height=H, width=W)
    once, images = _projections_and_images(pipe, pipeline)
    fast_once, fast_images = _projections_and_images(
        pipe, lambda: fast("a red apple", generator=gen(), output_type="pt").images
    )
    monkeypatch.setattr(pipeline_snapgen, "projects_text_once", lambda unet: False)
    per_step, expected = _projections_and_images(pipe, pipeline)
    assert (once, fast_once, per_step) == (1, 1, 3) and fast.precompute_text_kv
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast_images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("hooks", ["layerwise_casting", "leaf_offloading", "block_offloading"])
def test_hooks_above_the_projections_keep_the_per_step_projection(hooks):
    """Block offloading moves weights in a block's forward hook, which a once-per-call projection would bypass: there
    pipeline and sampler project in every step. Hooks on the layers themselves (layerwise casting, leaf-level
    offloading) do not stop the precomputation. Either way the sampler gives the pipeline's images."""
    from diffusers.hooks import apply_group_offloading

    pipe = tiny_pipeline("clip", num_inference_steps=3)
    if hooks == "layerwise_casting":
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float32, compute_dtype=torch.float32)
    elif hooks == "leaf_offloading":
        apply_group_offloading(pipe.unet, onload_device=torch.device("cpu"), offload_type="leaf_level")
    else:
        apply_group_offloading(pipe.unet, onload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
    calls, expected = _projections_and_images(
        pipe, lambda: pipe("a red apple", height=H, width=W, generator=gen(), output_type="pt").images
    )
    fast = pipe.fast_sampler(height=H, width=W)
    fast_calls, images = _projections_and_images(
        pipe, lambda: fast("a red apple", generator=gen(), output_type="pt").images
    )
    projects_once = hooks != "block_offloading"
    assert fast.precompute_text_kv == projects_once
    assert calls == fast_calls == (1 if projects_once else 3)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


def test_compiled_loop_matches_the_pipeline():
    torch._dynamo.reset()
    pipe = tiny_pipeline("clip", num_inference_steps=2, block_out_channels=(16, 32),
                         transformer_layers_per_block=(1, 1), only_cross_attention=(True, False))
    fast = pipe.fast_sampler(height=H, width=W, compile="full", compile_kwargs={"backend": "eager"})
    expected = pipe("a red apple", height=H, width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(fast("a red apple", generator=gen(), output_type="pt").images, expected,
                               atol=1e-5, rtol=1e-5)


def test_cuda_graph_request_falls_back_off_cuda_with_one_log_line(pipe):
    logger = logging.get_logger("diffusers_snapgen.pipelines.fast_sampling")
    with CaptureLogger(logger) as captured:
        fast = pipe.fast_sampler(height=H, width=W, cuda_graph=True)
    assert not fast.use_cuda_graph
    assert captured.out.count("CUDA graphs need a CUDA device") == 1


def _sampler_with_stand_in_capture(pipe, monkeypatch, failing_part: str | None = None):
    """A sampler with graphs on whose CUDA graph capture is a stand-in that runs the function directly (so the
    capture logic runs on the CPU), and the list of its captures as (part, input shapes); capturing ``failing_part``
    raises as a capture that hits a host sync would."""
    from diffusers_snapgen.pipelines import fast_sampling

    captures = []

    class StandInCapture:
        def __init__(self, fn, inputs):
            part = "text" if fn.__name__ == "encode" else "denoise"
            if part == failing_part:
                raise RuntimeError("operation not permitted when stream is capturing")
            captures.append((part, tuple(t.shape for t in inputs)))
            self.fn, self.shapes = fn, captures[-1][1]

        def matches(self, inputs):
            return self.shapes == tuple(t.shape for t in inputs)

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(fast_sampling, "CapturedCall", StandInCapture)
    fast = pipe.fast_sampler(height=H, width=W)
    fast.use_cuda_graph = True
    return fast, captures


def _two_calls(fast):
    """The first call's images and what both calls (two prompts) logged."""
    with CaptureLogger(logging.get_logger("diffusers_snapgen.pipelines.fast_sampling")) as captured:
        images = fast("a red apple", generator=gen(), output_type="pt").images
        fast("a green pear", generator=gen(1), output_type="pt")
    return images, captured.out


def test_each_part_is_captured_once_per_shape_and_falls_back_alone(pipe, monkeypatch):
    """The loop+decoder and the text encoders are separate graphs: a text encoder that cannot be captured runs
    eagerly (one log line, named in ``cuda_graph_errors``) while the loop still replays; same shapes reuse a graph,
    new ones capture again. (A stand-in replaces CUDA graph capture so the logic runs on the CPU.)"""
    fast, captures = _sampler_with_stand_in_capture(pipe, monkeypatch, failing_part="text")
    images, log = _two_calls(fast)
    expected = pipe("a red apple", height=H, width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(images, expected)
    assert [part for part, _ in captures] == ["denoise"] and list(fast.cuda_graph_errors) == ["text"]
    assert log.count("CUDA graph capture of the text failed") == 1
    assert "text: RuntimeError" in fast.cuda_graph_error
    embeds = pipe.encode_prompt("a red apple", do_classifier_free_guidance=False, max_sequence_length=8)
    fast(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2], generator=gen(), output_type="pt")
    assert len(captures) == 2  # a shorter text sequence: the loop is captured again


@pytest.mark.parametrize("hooked", ["unet_layerwise_casting", "vae_accelerate_hook", "text_encoder_offloading"])
def test_parts_with_forward_hooks_run_without_a_graph(hooked, monkeypatch):
    """Offloading, layerwise casting and cache hooks run Python code in every forward, which a replayed graph would
    skip (weights not moved or cast): the part whose models carry them, wherever in the module tree, runs without a
    graph (one log line, named in ``cuda_graph_errors``) and the other part still replays. (A stand-in replaces CUDA
    graph capture so the logic runs on the CPU.)"""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from diffusers.hooks import apply_group_offloading

    pipe = tiny_pipeline("clip", num_inference_steps=2)
    if hooked == "unet_layerwise_casting":
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float32, compute_dtype=torch.float32)
        part, module = "denoise", "unet."
    elif hooked == "vae_accelerate_hook":
        add_hook_to_module(pipe.vae.up_blocks[0].resnets[0].conv1, ModelHook())
        part, module = "denoise", "vae.up_blocks.0.resnets.0.conv1"
    else:
        apply_group_offloading(pipe.text_encoder, onload_device=torch.device("cpu"), offload_type="leaf_level")
        part, module = "text", "text_encoder."
    fast, captures = _sampler_with_stand_in_capture(pipe, monkeypatch)
    images, log = _two_calls(fast)
    assert [captured for captured, _ in captures] == [{"denoise": "text", "text": "denoise"}[part]]
    assert list(fast.cuda_graph_errors) == [part] and module in fast.cuda_graph_errors[part]
    assert log.count(f"The {part} runs without a CUDA graph") == 1
    expected = pipe("a red apple", height=H, width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


def test_bad_arguments_name_the_argument(pipe):
    with pytest.raises(ValueError, match="compile"):
        pipe.fast_sampler(compile="everything")
    with pytest.raises(ValueError, match="height"):
        pipe.fast_sampler(height=40, width=W)
    with pytest.raises(ValueError, match="batch_size"):
        pipe.fast_sampler(height=H, width=W, batch_size=2)(["a", "b", "c"])
    with pytest.raises(TypeError, match="pipe"):
        SnapGenFastSampler(object())
    other = tiny_pipeline("none")
    other.scheduler = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler"):
        other.fast_sampler()
