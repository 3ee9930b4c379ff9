"""Fast sampling for :class:`SnapGenPipeline`: the few-step denoising loop and the decoder as one CUDA graph.

A few-step SnapGen model (paper §3.4: 4 steps, no CFG) spends its time in kernel launches, not arithmetic: one UNet
step launches over a thousand kernels. :class:`SnapGenFastSampler` fixes the image size, batch and step count,
compiles the UNet and decoder (optional), and captures every UNet step, the Euler updates and the decoder in one CUDA
graph that each call replays; the text's cross-attention keys and values are computed once per call, as in the
pipeline. Text encoders (after tokenization) replay from a second graph; noise and post-processing stay outside.
Off CUDA (or when capture fails) the same code runs without a graph and gives the images of ``pipe(...)``. See
``docs/performance.md``.
"""

from __future__ import annotations

import numbers

import torch
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging

from .._registration import quiet_transformers
from .checks import check_guidance, check_positive_int
from .cuda_graphs import CapturedCall
from .hooks import modules_with_forward_hooks
from .text_encoding import _as_prompt_list

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

logger = logging.get_logger(__name__)

COMPILE_MODES = ("auto", "full", "regional", None)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class SnapGenFastSampler:
    r"""Generate images with ``pipe`` at one fixed size, batch and step count, as fast as the device allows.

    Args:
        pipe ([`SnapGenPipeline`]): the pipeline whose components are used (not copied; ``compile="regional"``
            compiles ``pipe.unet``'s blocks in place).
        height, width (`int`, *optional*): image size; default ``unet.config.sample_size * 8``.
        num_inference_steps (`int`, *optional*), guidance_scale (`float`, *optional*): default from
            ``pipe.sampling_defaults``. CFG (scale > 1) doubles the UNet batch inside the graph.
        batch_size (`int`, defaults to 1): images per call (prompts x images per prompt).
        compile (`str`, defaults to `"auto"`): ``"full"``: ``torch.compile(fullgraph=True)`` of the UNet and of the
            decoding function (the UNet itself is not modified); ``"regional"``: ``unet.compile_repeated_blocks``
            (faster to compile) and the compiled decoding function; ``None``: no compilation; ``"auto"``: ``"full"``
            on CUDA, ``None`` elsewhere. A UNet already compiled by the user is used as it is.
        compile_kwargs (`dict`, *optional*): extra ``torch.compile`` arguments, e.g.
            ``{"mode": "max-autotune-no-cudagraphs"}`` (``fullgraph=True`` and ``dynamic=False`` unless given).
        cuda_graph (`bool`, *optional*): capture the loop and decoder in one CUDA graph, and the text encoders in
            another; default: on CUDA. Elsewhere, when a part's models carry hooks that run in every forward
            (accelerate's CPU offloading or device maps, diffusers' group offloading, layerwise casting or caches:
            a replay would skip them), or when a capture fails, that part runs without a graph (one log line says
            why; ``cuda_graph_errors`` keeps the reason).

    The sampler fixes the pipeline's device and dtype when it is built: build a new one after ``pipe.to(...)``.
    Calls take the text arguments of ``pipe(...)`` (``prompt``, ``negative_prompt``, the four ``*_embeds``,
    ``max_sequence_length``, ``clip_skip``), ``generator``/``latents`` for the noise, ``output_type`` and
    ``return_dict``, and return a [`SnapGenPipelineOutput`]. Callbacks and interruption are not available: the loop
    runs as one unit.
    """

    def __init__(
        self,
        pipe,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 1,
        compile: str | None = "auto",
        compile_kwargs: dict | None = None,
        cuda_graph: bool | None = None,
    ):
        from .pipeline_snapgen import SnapGenPipeline, projects_text_once

        if not isinstance(pipe, SnapGenPipeline):
            raise TypeError(f"`pipe` must be a SnapGenPipeline, got {type(pipe).__name__}.")
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) or pipe.scheduler.config.get(
            "stochastic_sampling", False
        ):
            raise ValueError(
                "`pipe.scheduler` must be a deterministic FlowMatchEulerDiscreteScheduler (SnapGen's sampler, "
                f"`stochastic_sampling=False`), got {type(pipe.scheduler).__name__}: the fast loop inlines its Euler "
                "step."
            )
        if compile not in COMPILE_MODES:
            raise ValueError(f"`compile` must be one of {COMPILE_MODES}, got {compile!r}.")
        if compile_kwargs is not None and not isinstance(compile_kwargs, dict):
            raise TypeError(f"`compile_kwargs` must be a dict or None, got {type(compile_kwargs).__name__}.")
        self.compile_kwargs = {"fullgraph": True, "dynamic": False, **(compile_kwargs or {})}
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"`cuda_graph` must be a bool or None, got {type(cuda_graph).__name__}.")
        defaults = pipe.sampling_defaults
        if num_inference_steps is None:
            num_inference_steps = defaults["num_inference_steps"]
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        check_positive_int(self.num_inference_steps, "num_inference_steps")
        check_guidance(self.guidance_scale)
        check_positive_int(batch_size, "batch_size")
        size = pipe.default_sample_size * pipe.vae_scale_factor
        self.height = size if height is None else height
        self.width = size if width is None else width
        for name, value in (("height", self.height), ("width", self.width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
            if value <= 0 or value % pipe.size_multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {pipe.size_multiple}, got {value}.")
        self.pipe = pipe
        self.batch_size = int(batch_size)
        self.device = pipe._execution_device
        self.dtype = pipe.unet.dtype
        on_cuda = self.device.type == "cuda"
        self.compile_mode = ("full" if on_cuda else None) if compile == "auto" else compile
        self.use_cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.use_cuda_graph and not on_cuda:
            logger.warning(f"CUDA graphs need a CUDA device; the fast loop runs without one on {self.device}.")
            self.use_cuda_graph = False
        self.precompute_text_kv = projects_text_once(pipe.unet)  # text keys and values once per call, not per step
        self.cuda_graph_errors: dict[str, str] = {}  # part ("denoise" or "text") -> why it runs without a graph
        self._graphs: dict[tuple, CapturedCall] = {}
        self._steps = self._schedule()  # kept alive: a captured graph reads these tensors by address
        self._unet, self._decode = self._compiled_components()

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1

    @property
    def cuda_graph_error(self) -> str | None:
        """Why a part runs without its CUDA graph (hooks, or a failed capture; parts joined), or ``None``."""
        return "; ".join(f"{part}: {error}" for part, error in self.cuda_graph_errors.items()) or None

    # ------------------------------------------------------------------ building blocks

    def _compiled_components(self):
        """The UNet and decoding callables: compiled as ``compile_mode`` says, except a UNet the user already compiled
        (``unet.compile(...)`` or ``unet.compile_repeated_blocks(...)``), which is used as it is."""
        pipe = self.pipe
        if self.compile_mode is None:
            return pipe.unet, pipe.decode_latents
        unet = pipe.unet
        already = any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())
        if not already and self.compile_mode == "full":
            unet = torch.compile(unet, **self.compile_kwargs)
        elif not already:
            unet.compile_repeated_blocks(**self.compile_kwargs)
        return unet, torch.compile(pipe.decode_latents, **self.compile_kwargs)

    def _schedule(self):
        """Timesteps (UNet input) and Euler step sizes ``sigma_next - sigma``, as 0-d float32 device tensors."""
        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, self.num_inference_steps, self.device)
        sigmas = self.pipe.scheduler.sigmas.to(device=self.device, dtype=torch.float32)
        steps = [(timesteps[i], sigmas[i + 1] - sigmas[i]) for i in range(len(timesteps))]
        return steps

    def _denoise_and_decode(self, latents, prompt_embeds, pooled_prompt_embeds, steps, decode: bool):
        """The pipeline's loop with the scheduler's Euler step inlined (same arithmetic), then decoding."""
        text_kv = self.pipe.unet.precompute_cross_attention_kv(prompt_embeds) if self.precompute_text_kv else None
        for timestep, dt in steps:
            model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            velocity = self._unet(
                model_input,
                timestep.expand(model_input.shape[0]),
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled_prompt_embeds,
                return_dict=False,
                **({} if text_kv is None else {"cross_attention_kv": text_kv}),
            )[0]
            if self.do_classifier_free_guidance:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + self.guidance_scale * (cond - uncond)
            latents = (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)
        return self._decode(latents) if decode else latents

    def _graphed(self, key: tuple, fn, inputs: tuple[torch.Tensor, ...]):
        """``fn(*inputs)``, replayed from the CUDA graph captured for ``key`` (captured again when the input shapes
        change); run directly where graphs are off or this part's capture failed once."""
        part = key[0]
        if not self.use_cuda_graph or part in self.cuda_graph_errors:
            return fn(*inputs)
        graph = self._graphs.get(key)
        if graph is None or not graph.matches(inputs):
            self._graphs.pop(key, None)  # release the previous graph's memory first
            hooked = _hooked_module(self._part_models(part))
            if hooked is not None:
                self.cuda_graph_errors[part] = f"{hooked} has forward hooks that a graph's replay would skip"
                logger.warning(f"The {part} runs without a CUDA graph: {hooked} has hooks (offloading, layerwise "
                               "casting or a cache) that run in every forward, which a replay would skip.")
                return fn(*inputs)
            try:
                graph = self._graphs[key] = CapturedCall(fn, inputs)
            except Exception as error:  # capture is an optimisation: fall back to running fn
                self.cuda_graph_errors[part] = f"{type(error).__name__}: {error}"
                logger.warning(f"CUDA graph capture of the {part} failed ({error}); it runs without a graph.")
                return fn(*inputs)
        return graph(*inputs)

    def _part_models(self, part: str) -> list[tuple[str, torch.nn.Module]]:
        """The pipeline components a part's graph would run: the UNet and VAE, or the text encoders."""
        wanted = ("unet", "vae") if part == "denoise" else ("text_encoder",)
        return [(name, module) for name, module in self.pipe.components.items()
                if name.startswith(wanted) and isinstance(module, torch.nn.Module)]

    def _run(self, latents, prompt_embeds, pooled_prompt_embeds, decode: bool):
        def denoise(*inputs):
            return self._denoise_and_decode(*inputs, self._steps, decode)

        return self._graphed(("denoise", decode), denoise, (latents, prompt_embeds, pooled_prompt_embeds))

    def _encode_texts(self, texts: list[str], max_sequence_length: int, clip_skip: int | None):
        """The pipeline's text encoding (same tokens, same arithmetic), its encoders replayed as one CUDA graph."""
        pipe = self.pipe
        tokens = pipe._tokenize_texts(texts, self.device, max_sequence_length)

        def encode(*token_tensors):
            return pipe._encode_tokens(token_tensors, max_sequence_length, clip_skip)

        return self._graphed(("text", max_sequence_length, clip_skip), encode, tokens)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        clip_skip: int | None = None,
    ):
        """Generate ``batch_size`` images; arguments mean what they mean for ``SnapGenPipeline.__call__``."""
        from .pipeline_snapgen import SnapGenPipelineOutput

        pipe = self.pipe
        prompts = _as_prompt_list(prompt, "prompt")
        prompt_batch = len(prompts) if prompts is not None else getattr(prompt_embeds, "shape", (self.batch_size,))[0]
        if prompt_batch < 1 or self.batch_size % prompt_batch:
            raise ValueError(
                f"This sampler makes {self.batch_size} images per call, which {prompt_batch} prompts do not divide: "
                f"pass 1 or {self.batch_size} prompts, or build a sampler with another `batch_size`."
            )
        num_images_per_prompt = self.batch_size // prompt_batch
        pipe.check_inputs(
            prompt, self.height, self.width, self.num_inference_steps, None, self.guidance_scale,
            num_images_per_prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            generator=generator,
            latents=latents,
            output_type=output_type,
        )
        # Text encoding through the graph; dtype and device were fixed when the sampler was built (looking them up
        # on the pipeline walks every module, milliseconds a call for the paper UNet).
        max_length = pipe._resolve_max_sequence_length(max_sequence_length)
        if prompts is not None:
            prompt_embeds, pooled_prompt_embeds = self._encode_texts(prompts, max_length, clip_skip)
        embeds, pooled = prompt_embeds, pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negatives = pipe._negative_prompts(negative_prompt, prompt_batch)
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_texts(
                    negatives, max_length, clip_skip
                )
            embeds = (negative_prompt_embeds, embeds)
            pooled = (negative_pooled_prompt_embeds, pooled)
        else:
            embeds, pooled = (embeds,), (pooled,)

        def batch(parts):  # image-major repeats, [negative; positive] under CFG, as SnapGenPipeline.encode_prompt
            parts = [p.to(device=self.device, dtype=self.dtype).repeat_interleave(num_images_per_prompt, 0)
                     for p in parts]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

        latents = pipe.prepare_latents(
            self.batch_size, pipe.unet.config.in_channels, self.height, self.width, self.dtype, self.device,
            generator, latents,
        )
        embeds, pooled = batch(embeds), batch(pooled)
        decode = output_type != "latent"
        images = self._run(latents, embeds, pooled, decode)
        if decode:
            images = pipe.image_processor.postprocess(images, output_type=output_type)
        if not return_dict:
            return (images,)
        return SnapGenPipelineOutput(images=images)


def _hooked_module(components: list[tuple[str, torch.nn.Module]]) -> str | None:
    """The name of the first module of these components whose forward runs hooks, or ``None``."""
    for component, model in components:
        for name, _ in modules_with_forward_hooks(model):
            return f"{component}.{name}" if name else component
    return None
