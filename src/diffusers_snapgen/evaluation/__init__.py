"""Evaluation on the rendered emoji set (issue 7): an emoji classifier trained here gives prompt accuracy and the
feature space of FID; decoder PSNR/SSIM on held-out images; :func:`evaluate_models` compares pipelines on the same
prompts and seeds. Command line: ``snapgen eval`` (:mod:`.cli`)."""

from .classifier import (
    EmojiClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .data import load_rendered, read_eval_prompts, to_tensor
from .harness import (
    EvaluationResult,
    evaluate_models,
    generate_images,
    image_grid,
    write_report,
)
from .metrics import decoder_psnr_ssim, fid, prompt_accuracy, psnr_ssim
from .models import ModelSpec, SD3TransformerDenoiser, load_model, parse_model_spec

__all__ = [
    "EmojiClassifier",
    "EvaluationResult",
    "ModelSpec",
    "SD3TransformerDenoiser",
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
    "psnr_ssim",
    "read_eval_prompts",
    "save_classifier",
    "to_tensor",
    "train_classifier",
    "write_report",
]
