from .tiny_decoder import TinyDecoder
from .tiny_encoder import TinyEncoder, TinyEncoderOutput
from .unet_snapgen import SnapGenUNet2DModel, SnapGenUNet2DOutput

__all__ = ["SnapGenUNet2DModel", "SnapGenUNet2DOutput", "TinyDecoder", "TinyEncoder", "TinyEncoderOutput"]
