"""SnapGenPipeline: text-to-image with the SnapGen UNet and flow-matching Euler sampling (paper §3; docs/design.md).

Modelled on ``StableDiffusion3Pipeline``: same text conditioning (SD3.5 encoders, or one generic encoder), same
scheduler (``FlowMatchEulerDiscreteScheduler``, shift 3), same latent unscaling before decoding, with a UNet in
place of the MMDiT and either SnapGen's tiny decoder or SD3's ``AutoencoderKL`` as ``vae``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel

from .._registration import quiet_transformers
from .checks import check_embeds, check_finite, check_guidance, check_positive_int, check_sigmas
from .hooks import modules_with_forward_hooks
from .lora import SnapGenLoraLoaderMixin
from .serialization import SnapGenSerializationMixin
from .text_encoding import SnapGenTextEncodingMixin, _as_prompt_list

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

logger = logging.get_logger(__name__)

#: Scheduler-config key holding a checkpoint's sampling defaults, e.g. ``{"num_inference_steps": 4,
#: "guidance_scale": 1.0}`` for the few-step (ASD, paper §3.4) models. ``FlowMatchEulerDiscreteScheduler``
#: keeps ``_``-prefixed keys through ``from_config``/``save_pretrained``/``from_pretrained`` without warnings.
SAMPLING_DEFAULTS_KEY = "_snapgen_defaults"
#: Used when the scheduler config has no defaults: the 28-step base model with CFG *(reconstructed: the paper
#: gives the step count, not the guidance scale; 3.5 is the recommended scale of its KD teacher, SD3.5-Large)*.
DEFAULT_NUM_INFERENCE_STEPS = 28
DEFAULT_GUIDANCE_SCALE = 3.5
DEFAULT_SHIFT = 3.0
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def snapgen_scheduler(
    num_inference_steps: int | None = None, guidance_scale: float | None = None, shift: float = DEFAULT_SHIFT,
    max_sequence_length: int | None = None,
) -> FlowMatchEulerDiscreteScheduler:
    """SnapGen's sampler: ``FlowMatchEulerDiscreteScheduler(shift=3)`` (docs/design.md), optionally carrying the
    checkpoint's sampling defaults under ``SAMPLING_DEFAULTS_KEY``."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    defaults = _sampling_defaults_dict(num_inference_steps, guidance_scale, max_sequence_length)
    if defaults:
        scheduler.register_to_config(**{SAMPLING_DEFAULTS_KEY: defaults})
    return scheduler


def projects_text_once(unet) -> bool:
    """Whether a sampling loop may compute the text's cross-attention keys and values once per prompt
    (``unet.precompute_cross_attention_kv``) instead of once per step. Not where a hook on a module above the
    projections (model or block offloading) expects every weight to be reached through that module's forward, nor
    where the UNet's attentions were swapped for others (the Core ML export's), nor for other denoisers (a teacher)."""
    if not hasattr(unet, "precompute_cross_attention_kv"):
        return False
    hooked_above = any(next(module.children(), None) is not None for _, module in modules_with_forward_hooks(unet))
    return not hooked_above and len(unet._cross_attentions()) == unet._num_cross_attentions


def _sampling_defaults_dict(num_inference_steps, guidance_scale, max_sequence_length=None) -> dict:
    defaults = {}
    if max_sequence_length is not None:
        check_positive_int(max_sequence_length, "max_sequence_length")
        defaults["max_sequence_length"] = int(max_sequence_length)
    if num_inference_steps is not None:
        check_positive_int(num_inference_steps, "num_inference_steps")
        defaults["num_inference_steps"] = int(num_inference_steps)
    if guidance_scale is not None:
        check_guidance(guidance_scale)
        defaults["guidance_scale"] = float(guidance_scale)
    return defaults


@dataclass
class SnapGenPipelineOutput(BaseOutput):
    """``images``: list of PIL images, a numpy array (B, H, W, 3), or a tensor (B, 3, H, W) / latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _uses_fused_processors(model) -> bool:
    """Whether a diffusers model with ``attn_processors`` (e.g. ``AutoencoderKL``) runs fused-projection processors."""
    return any("Fused" in type(processor).__name__ for processor in getattr(model, "attn_processors", {}).values())


class SnapGenPipeline(SnapGenSerializationMixin, DiffusionPipeline, SnapGenTextEncodingMixin,
                      SnapGenLoraLoaderMixin):
    r"""Text-to-image generation with SnapGen (Hu et al., CVPR 2025, arXiv 2412.09619).

    Components:
        unet ([`SnapGenUNet2DModel`]): the velocity-predicting UNet (paper §3.1). ``unet`` and ``vae`` may be None
            (``from_pretrained(path, unet=None, vae=None)``): the pipeline then only encodes prompts.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): flow-matching Euler sampler, shift 3 by default. Its config
            may carry sampling defaults under ``"_snapgen_defaults"`` (see :meth:`set_sampling_defaults`).
        vae ([`TinyDecoder`] or [`AutoencoderKL`]): decodes latents (paper §3.2); latents are unscaled with its
            ``scaling_factor`` and ``shift_factor`` before decoding.
        text_encoder, tokenizer: CLIP-L (``CLIPTextModelWithProjection``) in the SD3.5 set, or any single
            transformers encoder (e.g. BERT/MiniLM, mean-pooled) when ``text_encoder_2`` is None. Optional; when no
            text component is given and the scheduler config names a text-encoder package, it is loaded from there.
        text_encoder_2, tokenizer_2: CLIP-G with projection (SD3.5 set). Optional.
        text_encoder_3, tokenizer_3: T5 (SD3.5 set); zeros are used when absent. Optional.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->vae"
    _optional_components = [
        "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3",
    ]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]

    def __init__(
        self,
        unet: ModelMixin | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: ModelMixin | None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: Any = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: Any = None,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3: Any = None,
    ):
        super().__init__()
        text = dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                    tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self._check_component_types(unet, scheduler, vae, text)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, **text)
        self._unet_text_widths = None  # (joint, pooled) of a UNet that was not loaded; see serialization.py
        self._add_packaged_text_encoder()
        self._check_components()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = unet.config.sample_size if unet is not None else 128

    @staticmethod
    def _check_component_types(unet, scheduler, vae, text: dict) -> None:
        """``unet`` and ``vae`` may be None (a pipeline that only encodes prompts, like SD3's with
        ``transformer=None``); calling it then raises."""
        for name, value in (("unet", unet), ("vae", vae)):
            if value is not None and not isinstance(value, ModelMixin):
                raise TypeError(f"`{name}` must be a diffusers model or None, got {type(value).__name__}.")
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
        for name, value in text.items():
            if value is None:
                continue
            if name.startswith("text_encoder") and not isinstance(value, torch.nn.Module):
                raise TypeError(f"`{name}` must be a transformers model or None, got {type(value).__name__}.")
            if name.startswith("tokenizer") and not callable(value):
                raise TypeError(f"`{name}` must be a transformers tokenizer or None, got {type(value).__name__}.")

    def _check_components(self) -> None:
        if self.vae is not None:
            for key in ("scaling_factor", "block_out_channels", "latent_channels"):
                if key not in self.vae.config:
                    raise TypeError(f"`vae` config has no `{key}`: pass a TinyDecoder or an AutoencoderKL.")
        if self.vae is not None and self.unet is not None and (
            self.vae.config.latent_channels != self.unet.config.out_channels
        ):
            raise ValueError(
                f"`vae` decodes {self.vae.config.latent_channels}-channel latents but `unet` predicts "
                f"{self.unet.config.out_channels}: pair components that share a latent space."
            )
        self._check_text_components()

    # ------------------------------------------------------------------ sampling defaults

    @property
    def sampling_defaults(self) -> dict:
        """``num_inference_steps`` and ``guidance_scale`` used when a call leaves them None: the scheduler
        config's ``"_snapgen_defaults"`` entries, else 28 steps and guidance 3.5. ``max_sequence_length`` is
        included when the checkpoint stores one (the text length it was trained with)."""
        stored = self.scheduler.config.get(SAMPLING_DEFAULTS_KEY) or {}
        defaults = {
            "num_inference_steps": stored.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS),
            "guidance_scale": stored.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
        }
        if stored.get("max_sequence_length") is not None:
            defaults["max_sequence_length"] = stored["max_sequence_length"]
        return defaults

    def set_sampling_defaults(self, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                              max_sequence_length: int | None = None):
        """Store sampling defaults in the scheduler config (saved with ``save_pretrained``), e.g.
        ``pipe.set_sampling_defaults(4, 1.0)`` for a few-step, CFG-free model (paper §3.4).
        ``max_sequence_length``: the text tokens the model was trained with. The UNet attends to padding tokens
        too (as SD3 does), so a model trained on short padded prompts should be sampled with the same length."""
        defaults = dict(self.scheduler.config.get(SAMPLING_DEFAULTS_KEY) or {})
        defaults.update(_sampling_defaults_dict(num_inference_steps, guidance_scale, max_sequence_length))
        self.scheduler.register_to_config(**{SAMPLING_DEFAULTS_KEY: defaults})

    # ------------------------------------------------------------------ properties used in the loop

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE factor x the UNet's total downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        num_images_per_prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        generator=None,
        latents=None,
        output_type="pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=None,
    ) -> int:
        """Validate every argument of ``__call__``; returns the prompt batch size. Raises TypeError/ValueError
        naming the argument and the fix."""
        if self.unet is None or (self.vae is None and output_type != "latent"):
            missing = "unet" if self.unet is None else "vae"
            raise ValueError(
                f"This pipeline was loaded without `{missing}`, so it can only encode prompts (`encode_prompt`). "
                f"Load it with its `{missing}` to generate images"
                + (", or pass `output_type='latent'`." if missing == "vae" else ".")
            )
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompts is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` (text) or `prompt_embeds` (with `pooled_prompt_embeds`).")
        if negatives is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")

        joint_dim, pooled_dim = self.unet.config.joint_attention_dim, self.unet.config.pooled_projection_dim
        check_embeds(prompt_embeds, "prompt_embeds", 3, joint_dim)
        check_embeds(pooled_prompt_embeds, "pooled_prompt_embeds", 2, pooled_dim)
        check_embeds(negative_prompt_embeds, "negative_prompt_embeds", 3, joint_dim)
        check_embeds(negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", 2, pooled_dim)
        for name, tensor in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds),
                             ("negative_prompt_embeds", negative_prompt_embeds),
                             ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            check_finite(tensor, name)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` need `pooled_prompt_embeds` from the same encoders: pass both.")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` need `negative_pooled_prompt_embeds`: pass both.")
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if pooled_prompt_embeds is not None and pooled_prompt_embeds.shape[0] != batch_size:
            raise ValueError(
                f"`pooled_prompt_embeds` has batch {pooled_prompt_embeds.shape[0]}, the prompt batch is {batch_size}."
            )
        if negatives is not None and not isinstance(negative_prompt, str) and len(negatives) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} entries but the prompt batch has {batch_size}: pass one "
                "string (used for every prompt) or one negative prompt per prompt."
            )
        if negative_prompt_embeds is not None:
            if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)} but `prompt_embeds` "
                    f"has {tuple(prompt_embeds.shape)}: they must match."
                )
            if negative_prompt_embeds.shape[0] != batch_size or negative_pooled_prompt_embeds.shape[0] != batch_size:
                raise ValueError(f"`negative_prompt_embeds` must have the prompt batch size {batch_size}.")

        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
            if value <= 0 or value % multiple:
                fixed = max(multiple, round(value / multiple) * multiple)
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {value}; e.g. {fixed}.")
        if num_inference_steps is not None:
            check_positive_int(num_inference_steps, "num_inference_steps")
        if sigmas is not None:
            check_sigmas(sigmas, num_inference_steps)
        check_guidance(guidance_scale)
        check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        total = batch_size * num_images_per_prompt

        if isinstance(generator, list):
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("`generator` must be a torch.Generator or a list of them.")
            if len(generator) != total:
                raise ValueError(
                    f"`generator` is a list of {len(generator)} but {total} images are made (prompts x "
                    "num_images_per_prompt): pass one generator per image, or a single generator."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")

        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
            expected = (total, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` must have shape {expected} (images, channels, height/{self.vae_scale_factor}, "
                    f"width/{self.vae_scale_factor}), got {tuple(latents.shape)}."
                )
            check_finite(latents, "latents")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable (step_end(pipe, step, timestep, kwargs) -> dict).")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}."
            )
        return batch_size

    # ------------------------------------------------------------------ latents

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        """Initial noise (B, C, H/f, W/f) from ``generator`` with ``randn_tensor``, or the given ``latents``."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale with the VAE config (``latents / scaling_factor + shift_factor``) and decode to [-1, 1]."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def fast_sampler(self, **kwargs):
        """A :class:`~diffusers_snapgen.pipelines.fast_sampling.SnapGenFastSampler` for this pipeline: one fixed
        size, batch and step count, the loop and decoder replayed as one CUDA graph (see ``docs/performance.md``).
        ``fast = pipe.fast_sampler(height=1024, width=1024); image = fast("a red apple").images[0]``."""
        from .fast_sampling import SnapGenFastSampler

        return SnapGenFastSampler(self, **kwargs)

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fuse attention projections for inference, as diffusers' Stable Diffusion pipelines do: each UNet
        self-attention projects Q, K and V with one matmul and each cross-attention K and V with one
        (``SnapGenUNet2DModel.fuse_qkv_projections``); ``vae`` fuses an ``AutoencoderKL``'s attention as well (the
        tiny decoder has none). Same images. Merge LoRA adapters first (``fuse_lora()``) and unfuse before
        ``save_pretrained``; see ``docs/performance.md``. :meth:`unfuse_qkv_projections` undoes it."""
        self._apply_to_attention("fuse_qkv_projections", unet=unet, vae=vae)

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Undo :meth:`fuse_qkv_projections` on the UNet and/or ``AutoencoderKL`` (a no-op where nothing is fused)."""
        self._apply_to_attention("unfuse_qkv_projections", unet=unet, vae=vae)

    def _apply_to_attention(self, method: str, **components: bool) -> None:
        for name, wanted in components.items():
            if not isinstance(wanted, bool):
                raise TypeError(f"`{name}` must be True or False, got {wanted!r}.")
        fusing = method == "fuse_qkv_projections"
        for name, wanted in components.items():
            model = getattr(self, name)
            if not wanted or model is None or not hasattr(model, method):
                continue
            # The UNet's attentions fuse and unfuse idempotently. diffusers' AutoencoderKL swaps its processors and
            # keeps the ones it replaced, so it is called only when its state changes (a second fuse would record
            # the fused processors as the originals; a second unfuse fails).
            if name == "vae" and fusing == _uses_fused_processors(model):
                continue
            getattr(model, method)()

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
    ) -> SnapGenPipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: text or list of texts; or pass ``prompt_embeds`` + ``pooled_prompt_embeds`` instead.
            height, width: image size in pixels, multiples of 32 (non-square allowed); default
                ``unet.config.sample_size * vae_scale_factor`` (1024 for the paper model).
            num_inference_steps: Euler steps; default from the scheduler config (``sampling_defaults``).
            sigmas: custom noise levels in (0, 1], one per step (the scheduler's shift still applies).
            guidance_scale: classifier-free guidance weight; CFG is off at <= 1 (few-step models, paper §3.4).
                Default from the scheduler config.
            negative_prompt: text(s) for the unconditional branch (default ``""``); used only with CFG.
            num_images_per_prompt: images per prompt.
            generator: ``torch.Generator`` or one per image, for reproducible noise.
            latents: initial noise of shape (images, C, height/8, width/8).
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds:
                precomputed text conditioning of shapes (B, L, joint_attention_dim) and (B, pooled_projection_dim).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (scaled latents, not decoded).
            return_dict: return a :class:`SnapGenPipelineOutput` rather than a tuple.
            attention_kwargs: passed to the UNet.
            clip_skip: CLIP layers to skip (SD3 encoder set).
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` called after each step;
                returned tensors (e.g. ``latents``) replace the pipeline's. Set ``pipe._interrupt = True`` to stop.
            callback_on_step_end_tensor_inputs: which of ``_callback_tensor_inputs`` go in ``callback_kwargs``.
            max_sequence_length: T5 tokens (SD3 set, default 256) or tokens of a generic encoder (default 77);
                a checkpoint's stored default (:attr:`sampling_defaults`) comes first.

        Returns:
            :class:`SnapGenPipelineOutput` with ``images``, or ``(images,)`` when ``return_dict=False``.
        """
        defaults = self.sampling_defaults
        if num_inference_steps is None and sigmas is None:
            num_inference_steps = defaults["num_inference_steps"]
        if guidance_scale is None:
            guidance_scale = defaults["guidance_scale"]
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]

        batch_size = self.check_inputs(
            prompt, height, width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                max_sequence_length=max_sequence_length,
                clip_skip=clip_skip,
            )
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)

        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width,
            self.unet.dtype, device, generator, latents,
        )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps if sigmas is None else None, device, sigmas=sigmas
        )
        self._num_timesteps = len(timesteps)

        # The text's cross-attention keys and values do not change between steps: computed once (again only if a
        # callback replaces ``prompt_embeds``), unless offloading hooks must see every weight used in a forward call.
        project_once = projects_text_once(self.unet)
        text_kv, text_kv_source = None, None
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                if project_once and text_kv_source is not prompt_embeds:
                    text_kv, text_kv_source = self.unet.precompute_cross_attention_kv(prompt_embeds), prompt_embeds
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                velocity = self.unet(
                    model_input,
                    t.expand(model_input.shape[0]),
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled_prompt_embeds,
                    attention_kwargs=self.attention_kwargs,
                    return_dict=False,
                    **({} if text_kv is None else {"cross_attention_kv": text_kv}),
                )[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "pooled_prompt_embeds": pooled_prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    pooled_prompt_embeds = outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SnapGenPipelineOutput(images=images)
