"""Loading what a SnapGen training run needs: text encoders, VAE, scheduler, the student UNet and the KD teacher.

One :class:`SnapGenPipeline` holds the (frozen) text encoders, the decoder and the scheduler plus the student as its
``unet``: it encodes captions (``encode_prompt``; the same embeddings feed an SD3 teacher, whose
``joint_attention_dim``/``pooled_projection_dim`` the encoders match by construction), runs validation and is what
the run saves at the end. Latents come from an image encoder: ``--pretrained_vae_model_name_or_path`` when given,
else the base pipeline's ``vae`` when it can encode, else the ``TinyEncoder`` in its ``vae_encoder/`` subfolder
(docs/finetuning.md). ``--pretrained_model_name_or_path default`` is the package's embedded default model.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = [
    "DTYPES",
    "weight_dtype_for",
    "text_widths",
    "DEFAULT_MODEL_NAME",
    "resolve_model_path",
    "load_base_components",
    "load_student",
    "load_teacher",
    "teacher_from_config",
    "check_teacher_student",
    "build_pipeline",
    "encode_captions",
    "encode_latents",
    "scale_latents",
    "load_vae_encoder",
    "load_sd3_transformer",
    "save_model_in_subfolder",
]

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TEXT = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
#: The word that names the package's embedded default model wherever a training script takes a model path.
DEFAULT_MODEL_NAME = "default"
#: The subfolder of a pipeline folder that holds its ``TinyEncoder`` (not a pipeline component: not in
#: ``model_index.json``, loaded by training only).
ENCODER_SUBFOLDER = "vae_encoder"


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """dtype of frozen modules under accelerate's ``mixed_precision`` (``None``/"no" -> fp32)."""
    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"`mixed_precision` must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}.")
    return DTYPES.get(mixed_precision or "no")


def _is_local(path) -> bool:
    return os.path.isdir(os.fspath(path))


def _has_subfolder(path, subfolder, revision=None, cache_dir=None) -> bool:
    if _is_local(path):
        return os.path.isfile(os.path.join(path, subfolder, "config.json"))
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(path, "config.json", subfolder=subfolder, revision=revision, cache_dir=cache_dir)
        return True
    except Exception:
        return False


def _cannot_encode(vae) -> bool:
    from ..models import TinyDecoder

    return isinstance(vae, TinyDecoder) or not hasattr(vae, "encode")


def resolve_model_path(name_or_path, flag: str = "--pretrained_model_name_or_path"):
    """``name_or_path`` itself, or, for the word ``"default"`` (and no folder of that name here), the folder of the
    embedded default model (:func:`diffusers_snapgen.default_model_path`). ``None`` stays ``None``."""
    if name_or_path is None or os.fspath(name_or_path) != DEFAULT_MODEL_NAME or _is_local(name_or_path):
        return name_or_path
    from ..default_model import default_model_path

    folder = default_model_path()
    if folder is None:
        raise ValueError(f"{flag} default: this build of diffusers-snapgen ships no default model (or "
                         "$SNAPGEN_DEFAULT_MODEL is empty); pass a pipeline folder or Hub id instead.")
    return str(folder)


def load_base_components(pretrained_model_name_or_path, revision=None, variant=None, cache_dir=None,
                         dtype=torch.float32) -> dict:
    """Text encoders/tokenizers, ``vae`` and ``scheduler`` of a SnapGen or SD3-style pipeline (its denoiser is not
    loaded). Returns a dict of SnapGenPipeline component names (absent encoders are ``None``).

    ``"default"`` is the embedded default model. A folder without text encoder whose scheduler config names a
    text-encoder package (the default model: MiniLM-L6) gets that package's encoder; a folder whose ``vae`` cannot
    encode (a ``TinyDecoder``) and that has a ``vae_encoder/`` subfolder gets that ``TinyEncoder`` as the extra
    entry ``"vae_encoder"`` (used by :func:`load_vae_encoder`)."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        raise TypeError("`pretrained_model_name_or_path` must be a folder or Hub id (--pretrained_model_name_or_path).")
    pretrained_model_name_or_path = resolve_model_path(pretrained_model_name_or_path)
    try:
        index = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(
            f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r} is not a diffusers pipeline "
            f"(no readable model_index.json): {e}"
        ) from e
    comps = {}
    import importlib

    for name in (*_TEXT, "vae", "scheduler"):
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or entry[0] is None:
            comps[name] = None
            continue
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name)
        sub = dict(subfolder=name, revision=revision, cache_dir=cache_dir)
        if name.startswith("tokenizer") or name == "scheduler":
            comps[name] = cls.from_pretrained(pretrained_model_name_or_path, **sub)
        else:
            comps[name] = cls.from_pretrained(pretrained_model_name_or_path, torch_dtype=dtype, variant=variant, **sub)
    if comps["vae"] is None:
        raise ValueError(f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r} has no `vae` component.")
    if not isinstance(comps["scheduler"], FlowMatchEulerDiscreteScheduler):
        from ..pipelines import snapgen_scheduler

        comps["scheduler"] = snapgen_scheduler()
    package = (comps["scheduler"].config.get("_snapgen_defaults") or {}).get("text_encoder")
    if package is not None and all(comps[name] is None for name in _TEXT):
        from ..pipelines.text_packages import load_packaged_text_encoder

        comps["text_encoder"], comps["tokenizer"] = load_packaged_text_encoder(package, dtype=dtype)
    if _cannot_encode(comps["vae"]) and _is_local(pretrained_model_name_or_path) and _has_subfolder(
            pretrained_model_name_or_path, ENCODER_SUBFOLDER):
        from ..models import TinyEncoder

        comps[ENCODER_SUBFOLDER] = TinyEncoder.from_pretrained(pretrained_model_name_or_path,
                                                               subfolder=ENCODER_SUBFOLDER, torch_dtype=dtype)
    for name, value in comps.items():
        if isinstance(value, torch.nn.Module):
            value.requires_grad_(False).eval()
    return comps


def _check_autoencoder_folder(path, subfolder) -> None:
    """A local folder whose config names another class than ``AutoencoderKL`` (e.g. the default model's
    ``TinyDecoder``) would load as a randomly initialised autoencoder: refuse it with the fix."""
    if not _is_local(path):
        return
    config = os.path.join(path, subfolder or "", "config.json")
    if not os.path.isfile(config):
        return
    import json

    with open(config, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    if name not in (None, "AutoencoderKL"):
        raise ValueError(
            f"{path!r} holds a {name}, not an AutoencoderKL: it cannot encode images. A pipeline with a decoder only "
            "encodes with its `vae_encoder/` TinyEncoder (pass it as --pretrained_model_name_or_path instead); "
            "train one with train_tiny_encoder.py --targets pipeline_samples."
        )


def load_vae_encoder(components: dict, pretrained_vae_model_name_or_path=None, dtype=torch.float32, revision=None,
                     variant=None, cache_dir=None):
    """The image encoder of training images: the ``AutoencoderKL`` ``pretrained_vae_model_name_or_path`` (``vae``
    subfolder if present), else the base pipeline's ``vae`` if it can encode, else the base pipeline's ``TinyEncoder``
    (``components["vae_encoder"]``, from its ``vae_encoder/`` subfolder)."""
    from diffusers import AutoencoderKL

    pretrained_vae_model_name_or_path = resolve_model_path(pretrained_vae_model_name_or_path,
                                                           "--pretrained_vae_model_name_or_path")
    if pretrained_vae_model_name_or_path is not None:
        sub = "vae" if _has_subfolder(pretrained_vae_model_name_or_path, "vae", revision, cache_dir) else None
        _check_autoencoder_folder(pretrained_vae_model_name_or_path, sub)
        vae = AutoencoderKL.from_pretrained(pretrained_vae_model_name_or_path, subfolder=sub, torch_dtype=dtype,
                                            revision=revision, variant=variant, cache_dir=cache_dir)
    else:
        vae = components.get("vae")
        if _cannot_encode(vae) and components.get(ENCODER_SUBFOLDER) is not None:
            vae = components[ENCODER_SUBFOLDER]
        elif _cannot_encode(vae):
            raise ValueError(
                f"the base pipeline's vae ({type(vae).__name__}) cannot encode images and it has no `vae_encoder/` "
                "TinyEncoder: pass an AutoencoderKL with --pretrained_vae_model_name_or_path (e.g. the SD3.5 repo), "
                "or train a TinyEncoder for it (train_tiny_encoder.py --targets pipeline_samples) and save it there."
            )
    return vae.requires_grad_(False).eval()


def text_widths(components: dict) -> tuple[int, int] | None:
    """``(joint_attention_dim, pooled_projection_dim)`` the text encoders produce (SnapGenPipeline's rules:
    SD3 set -> max(CLIP-L + CLIP-G hidden, T5 d_model) and CLIP-L + CLIP-G projections; one encoder -> its hidden)."""
    te, te2, te3 = components.get("text_encoder"), components.get("text_encoder_2"), components.get("text_encoder_3")
    if te is None:
        return None
    if te2 is None:
        return te.config.hidden_size, te.config.hidden_size
    joint = te.config.hidden_size + te2.config.hidden_size
    if te3 is not None:
        joint = max(joint, te3.config.d_model)
    return joint, te.config.projection_dim + te2.config.projection_dim


def load_student(pretrained_model_name_or_path=None, unet_model_name_or_path=None, unet_config: dict | None = None,
                 from_scratch: bool = False, latent_channels: int | None = None, text_dims=None, seed: int = 0,
                 revision=None, variant=None, cache_dir=None):
    """The trainable ``SnapGenUNet2DModel`` in fp32.

    Priority: ``unet_model_name_or_path`` (its ``unet`` subfolder if it has one), else the base pipeline's ``unet``
    (unless ``from_scratch``), else a fresh model: paper defaults updated with the latent channels, the text widths
    (``text_dims``) and ``unet_config``, initialised under ``torch.manual_seed(seed)``.
    """
    from ..models import SnapGenUNet2DModel

    if unet_config is not None and not isinstance(unet_config, dict):
        raise TypeError(f"`unet_config` (--unet_config) must be a dict, got {type(unet_config).__name__}.")
    pretrained_model_name_or_path = resolve_model_path(pretrained_model_name_or_path)
    unet_model_name_or_path = resolve_model_path(unet_model_name_or_path, "--unet_model_name_or_path")
    kw = dict(revision=revision, cache_dir=cache_dir, variant=variant)
    source = None
    if unet_model_name_or_path is not None:
        source = unet_model_name_or_path
    elif pretrained_model_name_or_path is not None and not from_scratch and unet_config is None:
        if _has_subfolder(pretrained_model_name_or_path, "unet", revision, cache_dir):
            source = pretrained_model_name_or_path
    if source is not None:
        sub = "unet" if _has_subfolder(source, "unet", revision, cache_dir) else None
        logger.info("student: SnapGenUNet2DModel from %s%s", source, f" ({sub})" if sub else "")
        return SnapGenUNet2DModel.from_pretrained(source, subfolder=sub, torch_dtype=torch.float32, **kw)
    config = {}
    if latent_channels is not None:
        config.update(in_channels=latent_channels, out_channels=latent_channels)
    if text_dims is not None:
        config.update(joint_attention_dim=int(text_dims[0]), pooled_projection_dim=int(text_dims[1]))
    config.update(unet_config or {})
    logger.info("student: a new SnapGenUNet2DModel (paper defaults updated with %s)", config)
    torch.manual_seed(seed)
    return SnapGenUNet2DModel(**config)


def load_teacher(teacher_model_name_or_path, subfolder="transformer", dtype=torch.bfloat16, revision=None,
                 variant=None, cache_dir=None):
    """A frozen ``SD3Transformer2DModel`` teacher in ``dtype`` (eval mode, no gradients)."""
    from diffusers import SD3Transformer2DModel

    if not isinstance(teacher_model_name_or_path, (str, os.PathLike)):
        raise TypeError("`teacher_model_name_or_path` (--teacher_model_name_or_path) must be a folder or Hub id.")
    if subfolder and not _has_subfolder(teacher_model_name_or_path, subfolder, revision, cache_dir):
        if _has_subfolder(teacher_model_name_or_path, "", revision, cache_dir) or _is_local(teacher_model_name_or_path):
            subfolder = None
    teacher = SD3Transformer2DModel.from_pretrained(
        teacher_model_name_or_path, subfolder=subfolder or None, torch_dtype=dtype, revision=revision,
        variant=variant, cache_dir=cache_dir,
    )
    return teacher.requires_grad_(False).eval()


def teacher_from_config(config: dict, latent_channels: int, text_dims=None, dtype=torch.bfloat16):
    """A frozen ``SD3Transformer2DModel`` with placeholder weights, the architecture :func:`load_sd3_transformer`
    builds from the same ``config`` (``train_sd3_teacher.py --transformer_config``; a saved config.json works too)
    for a run that loads the trained weights later (``--teacher_config`` with ``--start_after``)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):  # neither its seed nor its init may shift what the run draws next
        teacher = load_sd3_transformer(None, config, latent_channels, text_dims)
    return teacher.to(dtype).requires_grad_(False).eval()


def check_teacher_student(teacher, student):
    """Teacher and student must share the latent space and the text conditioning widths."""
    t, s = teacher.config, student.config
    for key_t, key_s in (("in_channels", "in_channels"), ("out_channels", "out_channels"),
                         ("joint_attention_dim", "joint_attention_dim"),
                         ("pooled_projection_dim", "pooled_projection_dim")):
        if t[key_t] != s[key_s]:
            raise ValueError(
                f"teacher {key_t}={t[key_t]} but student {key_s}={s[key_s]}: one text encoding and one latent "
                f"space must feed both models; build the student with {key_s}={t[key_t]} (--unet_config)."
            )


def build_pipeline(components: dict, student):
    """A :class:`SnapGenPipeline` around ``student`` with the base components (progress bar off). An
    ``SD3Transformer2DModel`` student (``train_sd3_teacher.py``) is wrapped by ``SD3TransformerDenoiser``, which
    shares its parameters, so the pipeline samples the model being trained."""
    from diffusers import SD3Transformer2DModel

    from ..pipelines import SnapGenPipeline

    if not isinstance(components, dict):
        raise TypeError(f"`components` must be the dict of load_base_components, got {type(components).__name__}.")
    if isinstance(student, SD3Transformer2DModel):
        from ..evaluation.models import SD3TransformerDenoiser

        student = SD3TransformerDenoiser.wrap(student)
    comps = {k: components.get(k) for k in (*_TEXT, "vae", "scheduler")}
    pipe = SnapGenPipeline(unet=student, **comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(pipeline, captions: list[str], device, max_sequence_length=None):
    """``(prompt_embeds, pooled_prompt_embeds)`` for ``captions`` with the pipeline's encoders (no CFG branch)."""
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError("`captions` must be a list of strings.")
    embeds, _, pooled, _ = pipeline.encode_prompt(
        list(captions), device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return embeds, pooled


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents ``(z - shift_factor) * scaling_factor`` sampled from ``vae.encode(pixels).latent_dist``."""
    from ..models import TinyDecoder

    if isinstance(vae, TinyDecoder) or not hasattr(vae, "encode"):
        raise TypeError(
            f"{type(vae).__name__} cannot encode images: pass an AutoencoderKL with --pretrained_vae_model_name_or_path."
        )
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return scale_latents(vae, dist.sample(generator=generator))


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3's latent normalisation: ``(z - shift_factor) * scaling_factor``."""
    shift = vae.config.get("shift_factor") or 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


def load_sd3_transformer(model_name_or_path=None, config: dict | None = None, latent_channels: int = 16,
                         text_dims=None, seed: int = 0, revision=None, variant=None, cache_dir=None):
    """A trainable ``SD3Transformer2DModel`` in fp32 (``train_sd3_teacher.py``): ``model_name_or_path`` (its
    ``transformer`` subfolder if it has one, ``--transformer_model_name_or_path``), or a new one from ``config``
    (``--transformer_config``) over the latent channels and the text widths ``text_dims = (joint_attention_dim,
    pooled_projection_dim)``, initialised under ``torch.manual_seed(seed)``. Raises ValueError when the model cannot
    take the base pipeline's latents or text embeddings."""
    from diffusers import SD3Transformer2DModel

    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"`latent_channels` must be a positive int (the VAE's latent_channels), got "
                         f"{latent_channels!r}.")
    if text_dims is not None and (len(text_dims) != 2 or not all(isinstance(d, int) and d > 0 for d in text_dims)):
        raise ValueError(f"`text_dims` must be (joint_attention_dim, pooled_projection_dim) ints or None, got "
                         f"{text_dims!r}.")
    if (model_name_or_path is None) == (config is None):
        raise ValueError("pass exactly one of --transformer_model_name_or_path and --transformer_config.")
    if model_name_or_path is not None:
        flag = "--transformer_model_name_or_path"
        model = load_teacher(model_name_or_path, "transformer", torch.float32, revision, variant,
                             cache_dir).requires_grad_(True).train()
        logger.info("transformer: SD3Transformer2DModel from %s", model_name_or_path)
    else:
        flag = "--transformer_config"
        full = {"in_channels": latent_channels, "out_channels": latent_channels}
        if text_dims is not None:
            full.update(joint_attention_dim=text_dims[0], pooled_projection_dim=text_dims[1])
        full.update(config)
        torch.manual_seed(seed)
        try:
            model = SD3Transformer2DModel(**full)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise ValueError(f"{flag} does not build an SD3Transformer2DModel ({type(e).__name__}: {e}); "
                             f"the full config was {full}.") from e
        logger.info("transformer: a new SD3Transformer2DModel %s", full)
    c = model.config
    for key in ("in_channels", "out_channels"):
        if c[key] != latent_channels:
            raise ValueError(f"{flag}: {key}={c[key]} but the VAE has {latent_channels} latent channels; use "
                             f"{key}={latent_channels}.")
    if text_dims is not None:
        for key, width in zip(("joint_attention_dim", "pooled_projection_dim"), text_dims):
            if c[key] < width:
                raise ValueError(f"{flag}: {key}={c[key]} is narrower than the base pipeline's text embeddings "
                                 f"({width}); use {key}={width} (or leave it out of --transformer_config).")
    logger.info("transformer: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def save_model_in_subfolder(model, output_dir, subfolder: str):
    """``<output_dir>/<subfolder>/`` with ``save_pretrained``, atomically (its ``config.json`` is written last)."""
    from .reconstruction import save_model_atomically

    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"`model` must be a diffusers model, got {type(model).__name__}.")
    return save_model_atomically(model, os.path.join(os.fspath(output_dir), subfolder))
