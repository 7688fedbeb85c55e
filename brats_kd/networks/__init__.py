"""Networks MONAI does not ship: KD-Net's encoder–decoder with switchable skips, Lachinov's cascaded U-Net."""

from .cascade import CascadedUNet
from .encoder_decoder import EncoderDecoder

__all__ = ["CascadedUNet", "EncoderDecoder"]
