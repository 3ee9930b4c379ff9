"""Former home of the tiny-decoder loop; it runs on the one engine now (:mod:`.engine`, :mod:`.tasks.reconstruction`)."""

from .tasks.reconstruction import EVAL_FILE, build_decoder, load_reconstruction_data, train_tiny_decoder  # noqa: F401

__all__ = ["train_tiny_decoder", "build_decoder", "load_reconstruction_data", "EVAL_FILE"]
