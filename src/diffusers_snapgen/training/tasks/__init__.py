"""The training tasks: what differs between the training scripts (the engine, :mod:`..engine`, runs them all).

- :mod:`.denoising` - flow matching (SnapGen UNet, SD3 teacher) and multi-level KD (paper §3.3).
- :mod:`.asd` - adversarial step distillation (paper §3.4).
- :mod:`.reconstruction` - the tiny decoder (paper §3.2) and the autoencoder.
- :mod:`.encoder` - the tiny encoder, distilled from an autoencoder (fine-tuning a pipeline that ships a tiny decoder).
- :mod:`.lora` - LoRA / DreamBooth fine-tuning of the UNet (an adapter trained with flow matching).
"""

from .asd import ASDTask
from .denoising import DenoiserBase, FlowMatchingTask, KDTask, kd_scaling_from_args, load_denoiser_base
from .lora import LoRATask, add_lora_from_args, prepare_class_images
from .encoder import ENCODER_SUBFOLDER, TinyEncoderTask, build_encoder, train_tiny_encoder
from .reconstruction import (
    AutoencoderTask,
    ReconstructionTask,
    TinyDecoderTask,
    build_autoencoder,
    build_decoder,
    load_reconstruction_data,
    train_autoencoder,
    train_tiny_decoder,
)

__all__ = [name for name in dir() if not name.startswith("_")]
