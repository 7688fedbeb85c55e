"""The KD-Net encoder–decoder: an nnU-Net-style 3-D U-Net whose skip connections can be switched off.

KD-Net (Hu et al., Table 2) compares teacher and student with 4 skip connections (a U-Net) and
with 0 (a plain encoder–decoder), otherwise the same network. MONAI's DynUNet always has its skip
connections, so this module composes MONAI's nnU-Net blocks into a network where they are a
parameter. The bottleneck is the submodule ``bottleneck``: the KD student hooks it by that name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, get_conv_layer
from torch import nn


class EncoderDecoder(nn.Module):
    """nnU-Net-like 3-D encoder–decoder with ``skip_connections`` of its levels joined to the decoder.

    Each level is two 3×3×3 convolutions with instance norm and leaky ReLU (MONAI ``UnetBasicBlock``);
    the encoder halves the resolution with a strided first convolution, the decoder doubles it with a
    transposed convolution and, where a skip connection is enabled, concatenates the encoder's
    features of that level. With ``filters`` of length L there are L − 1 down-samplings and up to
    L − 1 skip connections; they are enabled from the finest level down, so ``skip_connections=4``
    with five filter levels is the full U-Net and ``0`` the plain encoder–decoder.

    Args:
        in_channels: number of input channels (one per MRI modality).
        out_channels: number of output channels (sigmoid regions TC, WT, ET by default).
        filters: feature channels per level, finest first; the last level is the bottleneck.
        skip_connections: how many encoder levels feed the decoder, in ``[0, len(filters) - 1]``.
        spatial_dims: 3 for volumes (2 works for slices).
        norm: MONAI normalisation name and arguments.
        act: MONAI activation name and arguments.
        dropout: dropout probability in every block (``None`` for none).

    Input spatial sizes must be divisible by ``2 ** (len(filters) - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        skip_connections: int = 4,
        spatial_dims: int = 3,
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}.")
        if len(filters) < 2:
            raise ValueError(f"filters needs at least two levels (one down-sampling), got {filters}.")
        if not 0 <= skip_connections <= len(filters) - 1:
            raise ValueError(
                f"skip_connections must be in [0, {len(filters) - 1}] for {len(filters)} filter levels, "
                f"got {skip_connections}."
            )
        self.in_channels = in_channels
        self.skip_connections = skip_connections
        self.divisor = 2 ** (len(filters) - 1)

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return UnetBasicBlock(spatial_dims, cin, cout, 3, stride, norm_name=norm, act_name=act, dropout=dropout)

        self.encoder = nn.ModuleList(
            [block(in_channels, filters[0], 1)] + [block(filters[i - 1], filters[i], 2) for i in range(1, len(filters) - 1)]
        )
        self.bottleneck = block(filters[-2], filters[-1], 2)
        # Decoder levels run coarse to fine; level i (finest = 0) uses a skip when i < skip_connections.
        levels = range(len(filters) - 2, -1, -1)
        self.upsamples = nn.ModuleList(
            [
                get_conv_layer(spatial_dims, filters[i + 1], filters[i], 2, 2, conv_only=True, is_transposed=True)
                for i in levels
            ]
        )
        self.decoder = nn.ModuleList(
            [block(filters[i] * (2 if self._has_skip(i) else 1), filters[i], 1) for i in levels]
        )
        self.head = UnetOutBlock(spatial_dims, filters[0], out_channels, dropout=None)

    def _has_skip(self, level: int) -> bool:
        return level < self.skip_connections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor} "
                f"({len(self.encoder)} down-samplings)."
            )
        features = []
        for down in self.encoder:
            x = down(x)
            features.append(x)
        x = self.bottleneck(x)
        for level, up, dec in zip(range(len(features) - 1, -1, -1), self.upsamples, self.decoder):
            x = up(x)
            if self._has_skip(level):
                x = torch.cat([x, features[level]], dim=1)
            x = dec(x)
        return self.head(x)
