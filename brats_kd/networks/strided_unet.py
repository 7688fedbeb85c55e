"""The No New-Net U-Net of Lachinov et al. (§2.1, Fig. 1): MONAI's ``BasicUNet`` with strided convolutions
instead of max pooling.

Fig. 1's caption: "Instead of max pooling we use strided convolutions." MONAI's ``BasicUNet`` has the
rest of Isensee et al.'s modifications as options (leaky ReLU 0.01, instance norm, trilinear
up-sampling after a 1×1 filter reduction with ``upsample="nontrainable"``) but always down-samples
with ``MaxPool``; ``DynUNet`` down-samples with strided convolutions but up-samples only with
transposed convolutions. So this network keeps ``BasicUNet`` whole and only replaces its four
``Down`` blocks: each level's first 3×3×3 convolution gets stride 2 and the pooling goes (the
nnU-Net convention, also ``DynUNet``'s; the paper does not give the kernel of the strided
convolution). The number of convolutions, the widths and the decoder are ``BasicUNet``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet
from monai.utils import ensure_tuple_rep

__all__ = ["StridedDown", "StridedUNet"]


class StridedDown(nn.Sequential):
    """One encoder level: a 3×3×3 convolution with stride 2 (halving the resolution), then a 3×3×3
    convolution, each followed by ``norm`` and ``act`` (``Convolution``'s default NDA order, as in
    ``BasicUNet``'s ``TwoConv``). Its submodule names are ``TwoConv``'s under ``convs``."""

    def __init__(
        self,
        spatial_dims: int,
        in_chns: int,
        out_chns: int,
        act: str | tuple,
        norm: str | tuple,
        bias: bool,
        dropout: float | tuple = 0.0,
    ) -> None:
        super().__init__()
        convs = nn.Sequential()
        convs.add_module(
            "conv_0",
            Convolution(spatial_dims, in_chns, out_chns, strides=2, act=act, norm=norm, dropout=dropout, bias=bias, padding=1),
        )
        convs.add_module(
            "conv_1", Convolution(spatial_dims, out_chns, out_chns, act=act, norm=norm, dropout=dropout, bias=bias, padding=1)
        )
        self.add_module("convs", convs)


class StridedUNet(BasicUNet):
    """``BasicUNet`` whose encoder halves the resolution with strided convolutions (:class:`StridedDown`).

    Same arguments and forward as ``BasicUNet``. Every spatial size of the input must be divisible by
    16 (four stride-2 levels): a strided convolution rounds an odd size up, which ``BasicUNet``'s
    decoder (made for max pooling, which rounds down) cannot pad back.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.01, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float | tuple = 0.0,
        upsample: str = "nontrainable",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample)
        fea = ensure_tuple_rep(features, 6)
        for level in range(1, 5):
            setattr(self, f"down_{level}", StridedDown(spatial_dims, fea[level - 1], fea[level], act, norm, bias, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BasicUNet.forward with a size check first (TorchScript, which the zoo's ckpt_export uses, has no super())
        for size in x.shape[2:]:
            if size % 16 != 0:
                raise ValueError(
                    f"StridedUNet needs every spatial size divisible by 16 (4 stride-2 levels), got {list(x.shape)}."
                )
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        return self.final_conv(u1)
