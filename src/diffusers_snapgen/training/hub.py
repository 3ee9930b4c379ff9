"""``--push_to_hub``: render the model card (``hub_cards/pytorch_model_card.md``) into ``--output_dir`` and upload it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["hub_base_model", "write_model_card", "push_to_hub"]

IGNORE = ["checkpoint-*", ".tmp-*", "cache/*", "logs/*", "validation/*"]


def hub_base_model(name_or_path):
    """``name_or_path`` when it is a Hub repo id (the card's ``base_model``), else ``None`` (a local folder)."""
    if isinstance(name_or_path, str) and name_or_path.count("/") == 1 and not os.path.exists(name_or_path):
        return name_or_path
    return None


def write_model_card(args, kind: str, stage: str, training: dict, source=None, notes: str | None = None,
                     subfolder: str | None = None, num_inference_steps=None, guidance_scale=None,
                     prompt: str | None = None) -> Path:
    """Writes the ``kind`` card (``cards.render_pytorch_card``) with the ``training`` table as
    ``<output_dir>/README.md`` (through a temporary file) and returns its path. The card names ``args.hub_repo_id``,
    else ``--hub_model_id``, else the output folder's name."""
    from ..cards import render_pytorch_card

    if not isinstance(training, dict):
        raise TypeError(f"`training` must be a dict of card rows, got {type(training).__name__}.")
    repo_id = getattr(args, "hub_repo_id", None) or args.hub_model_id or Path(args.output_dir).resolve().name
    card = render_pytorch_card(
        kind, stage, repo_id, subfolder=subfolder, base_model=hub_base_model(source), training=training,
        datasets=[args.dataset_name] if args.dataset_name else None, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, notes=notes, prompt=prompt,
    )
    path = Path(args.output_dir, "README.md")
    tmp = path.with_name(f".tmp-README-{os.getpid()}.md")
    card.save(str(tmp))
    os.replace(tmp, path)
    return path


def push_to_hub(args, kind: str, stage: str, training: dict, source=None, notes: str | None = None,
                subfolder: str | None = None, num_inference_steps=None, guidance_scale=None, prompt: str | None = None):
    """Writes the ``kind`` card (:func:`write_model_card`) into ``--output_dir`` and uploads the folder (checkpoints,
    caches and logs left out) to ``args.hub_repo_id``."""
    from huggingface_hub import upload_folder

    write_model_card(args, kind, stage, training, source=source, notes=notes, subfolder=subfolder,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, prompt=prompt)
    upload_folder(repo_id=args.hub_repo_id, folder_path=args.output_dir, commit_message="End of training",
                  ignore_patterns=IGNORE, token=args.hub_token)
