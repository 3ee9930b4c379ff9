"""Image-level quality of a Core ML variant, measured in PyTorch (no Core ML runtime on Linux).

The full few-step sampling an app runs (text encoders -> UNet x steps -> decoder, paper §4) is replayed in PyTorch
with each package's weights decompressed back from the Core ML program, and compared with the fp32 pipeline on the
same prompts and initial noise:

- **end-to-end image PSNR** (images in [0, 1], peak 1, mean squared error pooled over all images), plus the worst
  single image;
- **nearest-reference agreement**: the share of variant images whose nearest fp32 image (pixel L2, over all prompts
  and seeds) is the fp32 image of the same prompt and seed -- a classifier-free check that compression did not turn
  one prompt's picture into another's;
- with an emoji classifier (:mod:`diffusers_snapgen.evaluation`, the one ``snapgen eval`` trains): **classifier
  top-1**, the share of images whose prompt's concept is the classifier's top class (the prompt-to-concept mapping
  of ``snapgen eval``), for the fp32 reference and every variant, and the share of variant images given the same
  class as their fp32 image.

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

#: Images per pipeline call of :meth:`EndToEndQuality.sample` (bounds memory for a few hundred images).
SAMPLE_BATCH = 25

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
        classifier: optional :class:`~diffusers_snapgen.evaluation.EmojiClassifier`: adds classifier top-1 (every
            prompt must be one of its classes, or a caption ``"<class>, <style> style"``).
        groups: optional label per prompt (``"seen"``, ``"heldout_pair"``): image PSNR and top-1 also per group.
    """

    def __init__(self, pipe, components: Sequence[CoreMLComponent], resolution: int,
                 prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None, classifier=None,
                 groups: Sequence[str] | None = None):
        prompts = list(DEFAULT_QUALITY_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"`seeds` must be one int per prompt ({len(prompts)}), got {seeds!r}.")
        if groups is not None and (isinstance(groups, str) or len(groups) != len(prompts)
                                   or not all(isinstance(g, str) and g for g in groups)):
            raise ValueError(f"`groups` must be one non-empty string per prompt ({len(prompts)}), got {groups!r}.")
        self.prompts, self.seeds, self.resolution = prompts, seeds, resolution
        self.groups = None if groups is None else list(groups)
        self.classifier = classifier
        if classifier is not None:
            from ..evaluation.classifier import EmojiClassifier
            from ..evaluation.harness import _is_class

            if not isinstance(classifier, EmojiClassifier):
                raise TypeError(f"`classifier` must be an EmojiClassifier (load_classifier), got "
                                f"{type(classifier).__name__}.")
            unknown = [p for p in dict.fromkeys(prompts) if not _is_class(classifier, p)]
            if unknown:
                raise ValueError(f"{len(unknown)} prompt(s) are not classes of the classifier (e.g. {unknown[0]!r}): "
                                 "use captions of the dataset it was trained on (its eval_prompts.json).")
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
        # each prompt's concept (the mapping of ``snapgen eval``) and the fp32 images' top classes, computed once
        self.targets = None if classifier is None else torch.tensor([classifier.class_index(p) for p in prompts])
        self.reference_classes = None if classifier is None else self._classes(self.reference)

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
        """Images ``(N, 3, H, W)`` in [0, 1] from ``pipe`` (default: the converted forms, current weights), in
        calls of :data:`SAMPLE_BATCH` images."""
        pipe = self.pipe if pipe is None else pipe
        out = []
        for first in range(0, len(self.prompts), SAMPLE_BATCH):
            part = slice(first, first + SAMPLE_BATCH)
            out.append(pipe(self.prompts[part], height=self.resolution, width=self.resolution,
                            latents=self.latents[part].clone(), num_inference_steps=self.num_inference_steps,
                            guidance_scale=self.guidance_scale, output_type="pt").images.float().clamp(0, 1))
        return torch.cat(out)

    def _classes(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's top class of each image (8-bit images, as ``snapgen eval`` classifies them)."""
        from ..evaluation.data import to_uint8

        return self.classifier.logits(to_uint8(images), batch_size=128).argmax(dim=1)

    def _subsets(self) -> dict[str, list[int]]:
        if self.groups is None:
            return {}
        return {g: [i for i, x in enumerate(self.groups) if x == g] for g in dict.fromkeys(self.groups)}

    def _top1(self, classes: torch.Tensor, index=None) -> float:
        """Classifier top-1 from the images' top ``classes`` (:meth:`_classes`; all, or those at ``index``): the
        share whose top class is their prompt's concept, as ``prompt_accuracy`` of ``snapgen eval`` counts it."""
        hits = classes == self.targets
        if index is not None:
            hits = hits[index]
        return round(float(hits.double().mean()), 4)

    def psnr(self, states: Mapping[str, Mapping] | None = None) -> float:
        """End-to-end image PSNR with ``states`` (``{component: {parameter: tensor}}``) swapped in."""
        from .mixed_bit import swapped_states

        with swapped_states(self.modules, states or {}):
            return image_psnr(self.reference, self.sample())

    def report(self, states: Mapping[str, Mapping] | None = None) -> dict:
        """``{"image_psnr_db", "worst_image_psnr_db", "nearest_reference_agreement", "images", ...}`` of one
        variant; with a classifier also ``classifier_top1`` and ``classifier_same_class_as_reference`` (share of
        images given the class of their fp32 image); with groups ``by_group`` (image PSNR and top-1 per group)."""
        from .mixed_bit import swapped_states

        with swapped_states(self.modules, states or {}):
            images = self.sample()
        worst = min(image_psnr(r[None], t[None]) for r, t in zip(self.reference, images))
        out = {
            "image_psnr_db": _db(image_psnr(self.reference, images)),
            "worst_image_psnr_db": _db(worst),
            "nearest_reference_agreement": round(nearest_reference_agreement(self.reference, images), 4),
            "images": len(images),
            "resolution": self.resolution,
            "num_inference_steps": self.num_inference_steps,
        }
        classes = None if self.classifier is None else self._classes(images)
        if classes is not None:
            out["classifier_top1"] = self._top1(classes)
            out["classifier_same_class_as_reference"] = round(
                float((classes == self.reference_classes).double().mean()), 4)
        subsets = self._subsets()
        if subsets:
            out["by_group"] = {}
            for group, index in subsets.items():
                entry = {"images": len(index), "image_psnr_db": _db(image_psnr(self.reference[index], images[index]))}
                if classes is not None:
                    entry["classifier_top1"] = self._top1(classes, index)
                out["by_group"][group] = entry
        return out

    def settings(self) -> dict:
        out = {"prompts": self.prompts, "seeds": self.seeds, "resolution": self.resolution,
               "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        if self.groups is not None:
            out["groups"] = self.groups
        if self.classifier is not None:
            out["classifier"] = {"classes": len(self.classifier.classes),
                                 "reference_top1": self._top1(self.reference_classes),
                                 "reference_top1_by_group": {g: self._top1(self.reference_classes, i)
                                                             for g, i in self._subsets().items()}}
        return out


def _db(value: float):
    return "inf" if not math.isfinite(value) else round(float(value), 2)
