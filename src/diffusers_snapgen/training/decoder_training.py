"""Former home of the tiny-decoder pieces: the objective pieces are in :mod:`.reconstruction`, the command line in
:mod:`.task_args`. These names keep working for code that imported them from here."""

from .reconstruction import (  # noqa: F401
    DecoderLosses,
    ImagePatchDataset,
    encode_for_decoder,
    evaluate_decoder,
    load_lpips,
    psnr,
    random_patch,
    save_model_atomically,
    ssim,
)
from .task_args import RECONSTRUCTION_LOSSES, build_decoder_parser, parse_decoder_args, validate_decoder_args  # noqa: F401

__all__ = ["ImagePatchDataset", "random_patch", "psnr", "ssim", "load_lpips", "DecoderLosses", "RECONSTRUCTION_LOSSES",
           "encode_for_decoder", "evaluate_decoder", "save_model_atomically", "build_decoder_parser",
           "validate_decoder_args", "parse_decoder_args"]
