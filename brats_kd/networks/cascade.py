"""Cascaded multi-encoder U-Net of Lachinov et al. (ensemble member ``cascade``).

Lachinov, Vasiliev, Turlapov, "Glioma segmentation with cascaded UNet" (BraTS 2018), reused as
the third ensemble member in Lachinov et al., "Knowledge distillation for brain tumor
segmentation" (BraTS 2019, section 2.3 and Fig. 3):

* every input modality has its own encoder, built of pre-activation residual blocks
  (norm -> ReLU -> conv 3 -> norm -> ReLU -> conv 3, plus an identity or 1x1 shortcut);
* the encoders' features are merged by an element-wise maximum at every level (all skip
  levels and the bottleneck);
* one shared decoder with skip connections produces the logits;
* two networks of this topology form a cascade on two scales: the coarse one sees the input
  down-sampled by ``coarse_scale``, its logits are up-sampled back to full size and handed to
  the fine one as extra input channels.

The building blocks are small named modules so that a config, a test or a distillation hook
can address them: :class:`PreActResBlock`, :class:`ModalityEncoder`, :class:`MaxFusion`,
:class:`DecoderLevel`, :class:`MultiEncoderUNet` (one network of the cascade) and
:class:`CascadedUNet` (the cascade).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution, UpSample
from monai.networks.layers.utils import get_act_layer, get_norm_layer

__all__ = [
    "CascadedUNet",
    "DecoderLevel",
    "MaxFusion",
    "ModalityEncoder",
    "MultiEncoderUNet",
    "PreActResBlock",
]

# torch's name of the linear interpolation mode for 1, 2 and 3 spatial dimensions.
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check_positive_int(name: str, value) -> int:
    """Return ``value`` if it is an integer >= 1, else raise a ValueError naming ``name``."""
    # bool is an int subclass; ``True`` channels is a config mistake, not a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_features(features: Sequence[int]) -> tuple[int, ...]:
    """Return ``features`` as a tuple of >= 2 positive integers, else raise a ValueError."""
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise ValueError(f"features must be a sequence of positive integers, got {features!r}.")
    features = tuple(features)
    if len(features) < 2:
        raise ValueError(
            f"features needs at least two levels (one skip level and the bottleneck), got {features!r}."
        )
    for level, width in enumerate(features):
        _check_positive_int(f"features[{level}]", width)
    return features


class PreActResBlock(nn.Module):
    """Pre-activation residual block: ``conv2(act(norm(conv1(act(norm(x)))))) + shortcut(x)``.

    MONAI's ``ResidualUnit`` applies normalisation and activation *after* each convolution
    and ``SegResNet``'s ``ResBlock`` cannot change width or resolution, so the block of
    He et al. (2016, "Identity mappings in deep residual networks") used by Lachinov et al.
    is assembled here from MONAI's layer factories. ``stride > 1`` down-samples in the first
    convolution; the shortcut is then a strided 1x1 convolution (also when the width changes),
    otherwise the identity.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        act: activation type and arguments, as accepted by ``get_act_layer``.
        norm: normalisation type and arguments, as accepted by ``get_norm_layer``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("INSTANCE", {"affine": True}),
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("stride", stride)
        self.norm1 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=in_channels)
        self.act1 = get_act_layer(act)
        # No bias: every convolution here is followed by a normalisation (of this block or
        # of the next one), which would cancel it.
        self.conv1 = Convolution(
            spatial_dims, in_channels, out_channels, strides=stride, kernel_size=3, bias=False, conv_only=True
        )
        self.norm2 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out_channels)
        self.act2 = get_act_layer(act)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, bias=False, conv_only=True)
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = Convolution(
                spatial_dims, in_channels, out_channels, strides=stride, kernel_size=1, bias=False, conv_only=True
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut takes the raw input, so an in-place activation on norm1's output is safe.
        residual = self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))
        return residual + self.shortcut(x)


class ModalityEncoder(nn.Module):
    """Encoder of one input modality: a 3x3 stem, then one :class:`PreActResBlock` per level.

    Level 0 keeps the input resolution; every further level halves it with a stride-2 block
    and changes the width to ``features[level]``. The features of all levels are returned,
    the last one being the bottleneck.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels given to this encoder (1 for a plain modality; more when context
            channels, such as the coarse logits of the cascade, are concatenated to it).
        features: width of each level, e.g. ``(16, 32, 64, 128)``.
        act: activation type and arguments.
        norm: normalisation type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("INSTANCE", {"affine": True}),
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        features = _check_features(features)
        # A plain convolution first: pre-activating the raw image (ReLU of a z-scored MRI)
        # would discard every below-mean intensity before anything is learned.
        self.stem = Convolution(spatial_dims, in_channels, features[0], kernel_size=3, bias=False, conv_only=True)
        self.levels = nn.ModuleList(
            [PreActResBlock(spatial_dims, features[0], features[0], stride=1, act=act, norm=norm)]
            + [
                PreActResBlock(spatial_dims, features[i - 1], features[i], stride=2, act=act, norm=norm)
                for i in range(1, len(features))
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every level, finest first; the last item is the bottleneck."""
        outputs: list[torch.Tensor] = []
        x = self.stem(x)
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class MaxFusion(nn.Module):
    """Element-wise maximum over a list of same-shaped feature maps (one per modality).

    Unlike a mean or a sum, the maximum lets each voxel and channel take the strongest
    modality's response, so a modality that is uninformative somewhere does not dilute the
    others there. The gradient flows only into the winning input (split evenly on exact ties).
    """

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) == 0:
            raise ValueError("MaxFusion needs at least one feature map.")
        for item in features:
            if item.shape != features[0].shape:
                raise ValueError(
                    f"MaxFusion needs feature maps of one shape, got {features[0].shape} and {item.shape}."
                )
        if len(features) == 1:
            return features[0]
        return torch.stack(features, dim=0).amax(dim=0)


class DecoderLevel(nn.Module):
    """One decoder step: reduce width (1x1 conv), up-sample x2 by interpolation, concatenate
    the fused skip features, and merge them with a :class:`PreActResBlock`.

    Non-trainable up-sampling with a prior 1x1 width reduction (MONAI ``UpSample`` in
    ``"nontrainable"`` mode) avoids the checkerboard artefacts of transposed convolutions and
    costs almost no parameters.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the coarser decoder (or bottleneck) features.
        skip_channels: channels of the fused skip features of this level.
        out_channels: channels produced by this level.
        act: activation type and arguments.
        norm: normalisation type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("INSTANCE", {"affine": True}),
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("skip_channels", skip_channels)):
            _check_positive_int(name, value)
        self.upsample = UpSample(
            spatial_dims,
            in_channels,
            skip_channels,
            scale_factor=2,
            mode="nontrainable",
            pre_conv="default",  # a 1x1 convolution in_channels -> skip_channels
            interp_mode="linear",  # MONAI picks bi-/trilinear from spatial_dims
            align_corners=False,
        )
        self.block = PreActResBlock(spatial_dims, 2 * skip_channels, out_channels, act=act, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.upsample(x)], dim=1))


class MultiEncoderUNet(nn.Module):
    """One network of the cascade (Fig. 3 of Lachinov et al.): per-modality encoders, max fusion
    of every level, one shared decoder and a pre-activated 1x1 head.

    ``context`` channels (the coarse logits in the cascade) are concatenated to *each*
    modality's input, so every encoder sees ``1 + context_channels`` channels.

    Named submodules (useful for hooks): ``encoders[m]`` (modality ``m``), ``skip_fusions[l]``
    (fused skip features of level ``l``), ``bottleneck`` (fused deepest features,
    ``[B, features[-1], *(spatial // 2 ** (len(features) - 1))]``), ``decoder[i]``
    (coarsest first) and ``head``.

    Args:
        spatial_dims: number of spatial dimensions.
        num_modalities: number of input modalities = number of encoders.
        out_channels: number of output channels (logits).
        features: width of each level; ``len(features)`` levels, the last is the bottleneck.
        context_channels: channels concatenated to every modality (0 for none).
        act: activation type and arguments.
        norm: normalisation type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_modalities: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 64, 128),
        context_channels: int = 0,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("INSTANCE", {"affine": True}),
    ) -> None:
        super().__init__()
        self.num_modalities = _check_positive_int("num_modalities", num_modalities)
        _check_positive_int("out_channels", out_channels)
        features = _check_features(features)
        if isinstance(context_channels, bool) or not isinstance(context_channels, int) or context_channels < 0:
            raise ValueError(f"context_channels must be a non-negative integer, got {context_channels!r}.")
        self.context_channels = context_channels
        self.size_multiple = 2 ** (len(features) - 1)
        self.encoders = nn.ModuleList(
            [
                ModalityEncoder(spatial_dims, 1 + context_channels, features, act=act, norm=norm)
                for _ in range(num_modalities)
            ]
        )
        self.skip_fusions = nn.ModuleList([MaxFusion() for _ in features[:-1]])
        self.bottleneck = MaxFusion()
        self.decoder = nn.ModuleList(
            [
                DecoderLevel(spatial_dims, features[i + 1], features[i], features[i], act=act, norm=norm)
                for i in reversed(range(len(features) - 1))
            ]
        )
        # Pre-activation networks end with norm -> act before the classifier (He et al. 2016).
        self.head = nn.Sequential(
            ADN(ordering="NA", in_channels=features[0], act=act, norm=norm, norm_dim=spatial_dims),
            Convolution(spatial_dims, features[0], out_channels, kernel_size=1, bias=True, conv_only=True),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``[B, out_channels, *spatial]`` for ``x`` ``[B, num_modalities, *spatial]``.

        ``context`` (``[B, context_channels, *spatial]``) is required iff ``context_channels > 0``.
        """
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modality channels, got input of shape {list(x.shape)}.")
        for size in x.shape[2:]:
            # Each level halves the size; skips and up-sampled features must match exactly.
            if size % self.size_multiple != 0:
                raise ValueError(
                    f"every spatial size must be divisible by 2 ** (levels - 1) = {self.size_multiple}, "
                    f"got spatial size {list(x.shape[2:])}."
                )
        if (context is None) != (self.context_channels == 0):
            raise ValueError(
                f"this network takes {self.context_channels} context channels; "
                f"context {'is missing' if context is None else 'was given but is not used'}."
            )
        per_modality: list[list[torch.Tensor]] = []
        for m, encoder in enumerate(self.encoders):
            modality = x[:, m : m + 1]
            if context is not None:
                modality = torch.cat([modality, context], dim=1)
            per_modality.append(encoder(modality))

        skips: list[torch.Tensor] = []
        for level, fusion in enumerate(self.skip_fusions):
            skips.append(fusion([feats[level] for feats in per_modality]))
        y = self.bottleneck([feats[-1] for feats in per_modality])
        for i, level in enumerate(self.decoder):
            y = level(y, skips[len(skips) - 1 - i])
        return self.head(y)


class CascadedUNet(nn.Module):
    """Two-scale cascade of :class:`MultiEncoderUNet` (Lachinov et al., BraTS 2018/2019).

    ``coarse`` runs on the input down-sampled by ``coarse_scale``; its logits are up-sampled
    (bi-/trilinear) to the input size and concatenated to every modality's input of ``fine``,
    whose logits are returned. ``forward`` returns a single tensor, so MONAI inferers and
    ``SupervisedTrainer`` work unchanged; :meth:`forward_with_coarse` also returns the
    up-sampled coarse logits for optional deep supervision at no extra cost.

    How the coarse logits enter the fine network: they are concatenated to *each modality's*
    input (each fine encoder gets ``1 + out_channels`` channels) rather than given a fifth
    encoder of their own. With max fusion, a separate "coarse" encoder would only compete
    with the modalities voxel by voxel: its context survives only where it wins (or it masks
    the modalities where it does), whereas conditioning every modality encoder on it keeps
    the fusion a choice between modalities, each informed by the global context. It also
    costs ``out_channels * features[0] * 3**spatial_dims`` weights per encoder instead of a
    whole extra encoder (~0.9 M parameters at the default features).

    Down-sampling of the input uses area averaging: for the default ``coarse_scale=2`` it is
    exactly trilinear interpolation (each output is the mean of a 2x2x2 block), and for larger
    scales it stays anti-aliased where trilinear sampling would skip voxels.

    Hook points: ``net.fine.bottleneck`` outputs the fused bottleneck of the fine network,
    ``[B, features[-1], *(spatial // 2 ** (len(features) - 1))]``; ``net.coarse.bottleneck``
    is its coarse counterpart.

    Args:
        in_channels: number of input modalities (one encoder each per network). Defaults to 4.
        out_channels: number of output channels (logits). Defaults to 3 (TC, WT, ET).
        features: width of each level of every encoder and of the decoder; the last entry is
            the bottleneck. Defaults to ``(16, 32, 64, 128)``.
        coarse_scale: integer down-sampling factor of the coarse network's input. Defaults to 2.
        spatial_dims: number of spatial dimensions. Defaults to 3.
        act: activation type and arguments. Defaults to in-place ReLU.
        norm: normalisation type and arguments. Defaults to affine instance norm.

    Every spatial size of the input must be divisible by
    ``coarse_scale * 2 ** (len(features) - 1)`` (16 with the defaults); pad or crop (e.g.
    ``DivisiblePadd``) or choose a matching sliding-window ``roi_size``.

    Example::

        net = CascadedUNet(in_channels=4, out_channels=3)
        logits = net(torch.randn(1, 4, 64, 64, 64))  # [1, 3, 64, 64, 64]
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        features: Sequence[int] = (16, 32, 64, 128),
        coarse_scale: int = 2,
        spatial_dims: int = 3,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("INSTANCE", {"affine": True}),
    ) -> None:
        super().__init__()
        if spatial_dims not in _LINEAR_MODES:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        features = _check_features(features)
        self.coarse_scale = _check_positive_int("coarse_scale", coarse_scale)
        self.spatial_dims = spatial_dims
        self.size_multiple = coarse_scale * 2 ** (len(features) - 1)
        self.linear_mode = _LINEAR_MODES[spatial_dims]
        self.coarse = MultiEncoderUNet(spatial_dims, in_channels, out_channels, features, act=act, norm=norm)
        self.fine = MultiEncoderUNet(
            spatial_dims, in_channels, out_channels, features, context_channels=out_channels, act=act, norm=norm
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"CascadedUNet expects a [B, C, *spatial] input with {self.spatial_dims} spatial dims, "
                f"got shape {list(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"CascadedUNet expects {self.in_channels} input channels, got shape {list(x.shape)}.")
        spatial = list(x.shape[2:])
        for size in spatial:
            if size % self.size_multiple != 0:
                raise ValueError(
                    f"CascadedUNet needs every spatial size divisible by coarse_scale * 2 ** (levels - 1) "
                    f"= {self.size_multiple}, got spatial size {spatial}; pad or crop the input."
                )

    def forward_with_coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(fine_logits, coarse_logits)``, both ``[B, out_channels, *spatial]``.

        The coarse logits are those given to the fine network, i.e. already up-sampled to the
        input size, so a deep-supervision loss can compare them with the full-size label.
        """
        self._check_input(x)
        spatial = x.shape[2:]
        if self.coarse_scale == 1:
            coarse = self.coarse(x)
        else:
            small = [s // self.coarse_scale for s in spatial]
            coarse = self.coarse(F.interpolate(x, size=small, mode="area"))
            coarse = F.interpolate(coarse, size=[int(s) for s in spatial], mode=self.linear_mode, align_corners=False)
        return self.fine(x, coarse), coarse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fine logits ``[B, out_channels, *spatial]`` of ``x`` ``[B, in_channels, *spatial]``."""
        return self.forward_with_coarse(x)[0]
