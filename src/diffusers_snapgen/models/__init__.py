from .tiny_decoder import TinyDecoder
from .unet_snapgen import SnapGenUNet2DModel, SnapGenUNet2DOutput

__all__ = ["SnapGenUNet2DModel", "SnapGenUNet2DOutput", "TinyDecoder"]
