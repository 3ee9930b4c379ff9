"""Image-level quality of a Core ML variant, measured in PyTorch (no Core ML runtime on Linux).

The full few-step sampling an app runs (text encoders -> UNet x steps -> decoder, paper §4) is replayed in PyTorch
with each package's weights decompressed back from the Core ML program, and compared with the fp32 pipeline on the
same prompts and initial noise:

- **end-to-end image PSNR** (images in [0, 1], peak 1, mean squared error pooled over all images), plus the worst
  single image;
- **nearest-reference agreement**: the share of variant images whose nearest fp32 image (pixel L2, over all prompts
  and seeds) is the fp32 image of the same prompt and seed -- a classifier-free check that compression did not turn
  one prompt's picture into another's.

The UNet runs in its Neural-Engine form (the module that was converted), the text encoders and decoder as wrapped
for export; the fp32 reference uses the original modules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch

from .components import CoreMLComponent

__all__ = ["DEFAULT_QUALITY_PROMPTS", "image_psnr", "nearest_reference_agreement", "EndToEndQuality"]

#: Prompts of the end-to-end check when the caller gives none: captions the embedded default model was trained
#: on (seen set of its evaluation, benchmarks/results/eval_quality.json), one seed each.
DEFAULT_QUALITY_PROMPTS = (
    "airplane",
    "anatomical heart",
    "antenna bars",
    "artist palette",
    "baby chick",
    "blueberries",
    "cheese wedge",
    "croissant",
)


def image_psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (peak 1), squared error pooled over every pixel of every image."""
    if reference.shape != test.shape:
        raise ValueError(f"`reference` {tuple(reference.shape)} and `test` {tuple(test.shape)} must match.")
    mse = float(torch.mean((reference.double() - test.double()) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def nearest_reference_agreement(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Share of ``test[i]`` whose nearest image in ``reference`` (pixel L2) is ``reference[i]``."""
    ref = reference.flatten(1).double()
    out = test.flatten(1).double()
    nearest = torch.cdist(out, ref).argmin(dim=1)
    return float((nearest == torch.arange(len(ref))).double().mean())


class EndToEndQuality:
    """Samples ``prompts`` (seed ``seeds[i]`` for prompt ``i``) with the export's modules and compares to fp32.

    Args:
        pipe: the :class:`SnapGenPipeline` being exported (left untouched).
        components: its :class:`CoreMLComponent` list (their ``module``\\ s receive the variant weights).
        resolution: image side in pixels.
        prompts, seeds: what to sample; default :data:`DEFAULT_QUALITY_PROMPTS` with seeds ``0..n-1``.
    """

    def __init__(self, pipe, components: Sequence[CoreMLComponent], resolution: int,
                 prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None):
        prompts = list(DEFAULT_QUALITY_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"`seeds` must be one int per prompt ({len(prompts)}), got {seeds!r}.")
        self.prompts, self.seeds, self.resolution = prompts, seeds, resolution
        self.components = {c.name: c for c in components}
        self.modules = {c.name: c.module for c in components}
        text = getattr(pipe, "text_encoder_mode", None) is not None
        if text and not any(c.group == "text" for c in components):
            raise ValueError("the end-to-end check needs the text encoders: export them too (components 'text').")
        self.reference_pipe = self._assemble(pipe, use_reference=True)
        self.pipe = self._assemble(pipe, use_reference=False)
        defaults = pipe.sampling_defaults
        self.num_inference_steps = defaults["num_inference_steps"]
        self.guidance_scale = float(defaults["guidance_scale"])
        latent = resolution // pipe.vae_scale_factor
        channels = pipe.unet.config.in_channels
        self.latents = torch.cat([torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(s))
                                  for s in seeds])
        self.reference = self.sample(self.reference_pipe)

    def _assemble(self, pipe, use_reference: bool):
        """A pipeline over the export's fp32 modules: reference (original) forms or the converted forms."""
        parts = {"scheduler": copy.deepcopy(pipe.scheduler)}
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            parts[name] = getattr(pipe, name, None)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            comp = self.components.get(name)
            source = getattr(pipe, name, None)
            parts[name] = comp.module.encoder if comp is not None else (
                None if source is None else copy.deepcopy(source).float().eval())
        unet = self.components.get("unet")
        wrapper = None if unet is None else (unet.reference if use_reference else unet.module)
        parts["unet"] = wrapper.unet if wrapper is not None else copy.deepcopy(pipe.unet).float().eval()
        decoder = self.components.get("decoder")
        parts["vae"] = decoder.module.decoder if decoder is not None else copy.deepcopy(pipe.vae).float().eval()
        out = type(pipe)(**parts)
        out.set_progress_bar_config(disable=True)
        return out

    @torch.no_grad()
    def sample(self, pipe=None) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] from ``pipe`` (default: the converted forms, current weights)."""
        pipe = self.pipe if pipe is None else pipe
        return pipe(self.prompts, height=self.resolution, width=self.resolution, latents=self.latents.clone(),
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    output_type="pt").images.float().clamp(0, 1)

    def psnr(self, states: Mapping[str, Mapping] | None = None) -> float:
        """End-to-end image PSNR with ``states`` (``{component: {parameter: tensor}}``) swapped in."""
        from .mixed_bit import swapped_states

        with swapped_states(self.modules, states or {}):
            return image_psnr(self.reference, self.sample())

    def report(self, states: Mapping[str, Mapping] | None = None) -> dict:
        """``{"image_psnr_db", "worst_image_psnr_db", "nearest_reference_agreement", "images"}`` of one variant."""
        from .mixed_bit import swapped_states

        with swapped_states(self.modules, states or {}):
            images = self.sample()
        worst = min(image_psnr(r[None], t[None]) for r, t in zip(self.reference, images))
        return {
            "image_psnr_db": _db(image_psnr(self.reference, images)),
            "worst_image_psnr_db": _db(worst),
            "nearest_reference_agreement": round(nearest_reference_agreement(self.reference, images), 4),
            "images": len(images),
            "resolution": self.resolution,
            "num_inference_steps": self.num_inference_steps,
        }

    def settings(self) -> dict:
        return {"prompts": self.prompts, "seeds": self.seeds, "resolution": self.resolution,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}


def _db(value: float):
    return "inf" if not math.isfinite(value) else round(float(value), 2)
