"""Code this bundle needs beyond MONAI: the network, BraTS conventions, resumable training."""

from . import brats, network, reliability
