"""Networks MONAI does not ship: KD-Net's encoder–decoder with switchable skips, Lachinov's cascaded U-Net,
and the No New-Net U-Net with strided convolutions instead of max pooling."""

from .cascade import CascadedUNet
from .encoder_decoder import EncoderDecoder
from .strided_unet import StridedUNet

__all__ = ["CascadedUNet", "EncoderDecoder", "StridedUNet"]
