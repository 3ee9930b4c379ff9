"""Former home of the autoencoder pieces: the objective pieces are in :mod:`.autoencoder`, the command line in
:mod:`.task_args`, the task in :mod:`.tasks.reconstruction`. These names keep working."""

from .autoencoder import PosteriorCapture, kl_divergence, latent_statistics  # noqa: F401
from .task_args import build_autoencoder_parser, parse_autoencoder_args, validate_autoencoder_args  # noqa: F401
from .tasks.reconstruction import build_autoencoder, train_autoencoder  # noqa: F401

__all__ = ["kl_divergence", "PosteriorCapture", "latent_statistics", "build_autoencoder", "build_autoencoder_parser",
           "validate_autoencoder_args", "parse_autoencoder_args", "train_autoencoder"]
