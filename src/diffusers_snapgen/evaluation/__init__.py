"""Evaluation on the rendered emoji set: an emoji classifier trained here gives prompt accuracy (by concept, on seen
prompts and both held-out kinds) and the feature space of FID; the prompt-vs-seed ratio; decoder PSNR/SSIM on
held-out images; :func:`evaluate_models` compares pipelines on the same prompts and seeds. Command line:
``snapgen eval`` (:mod:`.cli`); design: docs/emoji_evaluation.md."""

from .classifier import (
    EmojiClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .data import RenderedSet, concept_of, load_rendered, read_eval_prompts, read_rendered, to_tensor
from .harness import (
    EvaluationResult,
    evaluate_models,
    generate_images,
    image_grid,
    seed_grid,
    write_report,
)
from .metrics import decoder_psnr_ssim, fid, prompt_accuracy, prompt_seed_ratio, psnr_ssim
from .models import ModelSpec, SD3TransformerDenoiser, check_model_folder, load_model, parse_model_spec

__all__ = [
    "EmojiClassifier",
    "EvaluationResult",
    "ModelSpec",
    "RenderedSet",
    "SD3TransformerDenoiser",
    "check_model_folder",
    "concept_of",
    "decoder_psnr_ssim",
    "evaluate_models",
    "fid",
    "generate_images",
    "image_grid",
    "load_classifier",
    "load_model",
    "load_rendered",
    "parse_model_spec",
    "prompt_accuracy",
    "prompt_seed_ratio",
    "psnr_ssim",
    "read_eval_prompts",
    "read_rendered",
    "save_classifier",
    "seed_grid",
    "to_tensor",
    "train_classifier",
    "write_report",
]
