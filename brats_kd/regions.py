"""Per-entry label conventions for a datalist that mixes manual and pseudo labels.

A combined datalist (written by the ensemble bundle's pseudo-labelling) holds manual labels in the
dataset's own values (BraTS 2023: ET = 3; MSD: 1/2/3 with edema = 1) next to pseudo labels in BraTS
values 0/1/2/4, or soft pseudo labels that already are TC/WT/ET probabilities. MONAI's
``MapLabelValued`` takes one mapping for the whole dataset, so :class:`EntryLabelToRegionsd` reads
the mapping (and the label format) from each item instead.

It also holds the two network heads (config value ``activation``) and the conversions between them:

- ``"sigmoid"``: three overlapping region channels TC, WT, ET (MONAI's
  ``ConvertToMultiChannelBasedOnBratsClasses`` order, the zoo's), each an independent sigmoid;
- ``"softmax"``: four exclusive classes, one softmax over the channels: 0 background, 1 necrotic /
  non-enhancing tumour core (BraTS label 1), 2 edema (label 2), 3 enhancing tumour (label 4).

The bundles' labels stay TC/WT/ET region channels in both modes (data, validation, evaluation); only the
head and its loss differ. The regions are nested (ET within TC within WT), so they determine the class of
every voxel (:func:`regions_to_classes`) and the classes determine the regions
(:func:`classes_to_regions`): TC = 1 + 3, WT = 1 + 2 + 3, ET = 3.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import Activationsd, ConvertToMultiChannelBasedOnBratsClasses, MapLabelValue, MapTransform

from .labels import regions_to_brats_labels

__all__ = [
    "ACTIVATIONS",
    "CLASS_LABELS",
    "LABEL_FORMATS",
    "EntryLabelToRegionsd",
    "HeadActivationd",
    "ProbabilitiesToBratsLabelsd",
    "ProbabilitiesToRegionsd",
    "check_activation",
    "classes_to_regions",
    "head_channels",
    "label_to_regions",
    "probabilities_to_brats_labels",
    "probabilities_to_regions",
    "regions_to_classes",
]

# "labels": one channel of label values; "probabilities": three channels TC, WT, ET in [0, 1].
LABEL_FORMATS = ("labels", "probabilities")
BRATS_IDENTITY_MAP = {"orig": [1, 2, 4], "target": [1, 2, 4]}


def _check_label_map(label_map) -> tuple[list, list]:
    if not isinstance(label_map, Mapping) or "orig" not in label_map or "target" not in label_map:
        raise ValueError(f"label_map must be a mapping with 'orig' and 'target' lists, got {label_map!r}.")
    orig, target = list(label_map["orig"]), list(label_map["target"])
    if len(orig) != len(target):
        raise ValueError(f"label_map 'orig' and 'target' differ in length: {label_map!r}.")
    return orig, target


def label_to_regions(label: torch.Tensor, label_format: str, label_map: Mapping) -> torch.Tensor:
    """Return the float32 TC/WT/ET region channels ``[3, *spatial]`` of one item's label.

    ``labels``: ``[1, *spatial]`` values mapped with ``label_map`` to BraTS 1/2/4, then split into
    the nested regions (MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``); ``probabilities``:
    ``[3, *spatial]`` kept as they are.
    """
    if label_format == "labels":
        if label.shape[0] != 1:
            raise ValueError(f"a 'labels' label needs one channel, got shape {tuple(label.shape)}.")
        orig, target = _check_label_map(label_map)
        mapped = MapLabelValue(orig_labels=orig, target_labels=target)(label)
        regions = ConvertToMultiChannelBasedOnBratsClasses()(mapped)
    elif label_format == "probabilities":
        if label.shape[0] != 3:
            raise ValueError(f"a 'probabilities' label needs 3 channels (TC, WT, ET), got shape {tuple(label.shape)}.")
        regions = label
    else:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}.")
    return regions.to(torch.float32)


class EntryLabelToRegionsd(MapTransform):
    """Dictionary transform: the label of each item → TC/WT/ET region channels, by the item's own convention.

    The item's ``label_map_key`` (``{"orig": [...], "target": [...]}``) and ``format_key``
    (``"labels"`` or ``"probabilities"``) entries are read and removed from the item (so batches of
    mixed items collate); items without them use ``default_label_map`` and ``"labels"``, so a plain
    ``tools.prepare`` datalist works unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        default_label_map: Mapping | None = None,
        label_map_key: str = "label_map",
        format_key: str = "label_format",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.default_label_map = dict(default_label_map or BRATS_IDENTITY_MAP)
        _check_label_map(self.default_label_map)
        self.label_map_key = label_map_key
        self.format_key = format_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        label_map = d.pop(self.label_map_key, None) or self.default_label_map
        label_format = d.pop(self.format_key, None) or "labels"
        for key in self.key_iterator(d):
            d[key] = label_to_regions(d[key], label_format, label_map)
        return d


# ---------------------------------------------------------------------------------------------
# network heads: sigmoid regions or softmax classes

#: the config value ``activation``: the head of the teacher, baseline and student networks
ACTIVATIONS = ("sigmoid", "softmax")
#: BraTS 2018-2021 label value of each softmax class: background, necrotic / non-enhancing core, edema, enhancing
CLASS_LABELS = (0, 1, 2, 4)
#: class indices that make up each region channel (TC, WT, ET order)
REGION_CLASSES = ((1, 3), (1, 2, 3), (3,))
#: the 0.5 threshold of a sigmoid region channel (``AsDiscrete(threshold=0.5)``: probability >= 0.5)
REGION_THRESHOLD = 0.5


def check_activation(activation: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS`, else a ``ValueError`` that lists them."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} (sigmoid: 3 region channels TC/WT/ET; softmax: 4 classes "
            f"background/necrosis/edema/enhancing), got {activation!r}."
        )
    return activation


def head_channels(activation: str) -> int:
    """Output channels of the network for ``activation``: 3 regions (sigmoid) or 4 classes (softmax)."""
    return len(REGION_CLASSES) if check_activation(activation) == "sigmoid" else len(CLASS_LABELS)


def regions_to_classes(regions: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Class indices 0-3 (``dim`` of size 1) of binary TC/WT/ET region channels along ``dim``.

    ET → 3, else TC → 1, else WT → 2, else 0 (a channel counts where it is > 0.5). For nested regions
    (what BraTS labels give) this inverts :func:`classes_to_regions`; a region outside its parent keeps
    the innermost class, as the nested painting of :func:`~brats_kd.labels.regions_to_brats_labels` does.
    """
    if regions.shape[dim] != len(REGION_CLASSES):
        raise ValueError(f"expected 3 region channels (TC, WT, ET) along dim {dim}, got shape {tuple(regions.shape)}.")
    tc, wt, et = (r > 0.5 for r in torch.split(regions, 1, dim=dim))
    classes = torch.zeros_like(tc, dtype=torch.long)
    classes[wt] = 2
    classes[tc] = 1
    classes[et] = 3
    return classes


def classes_to_regions(classes: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """TC/WT/ET channels (sums of the class channels along ``dim``: TC = 1 + 3, WT = 1 + 2 + 3, ET = 3).

    One-hot classes give binary regions; class probabilities give region probabilities (the classes are
    exclusive, so a region's probability is the sum of its classes').
    """
    if classes.shape[dim] != len(CLASS_LABELS):
        raise ValueError(
            f"expected 4 class channels (background, necrosis, edema, enhancing) along dim {dim}, got shape "
            f"{tuple(classes.shape)}."
        )
    channels = torch.split(classes, 1, dim=dim)
    regions = [sum(channels[c] for c in region) for region in REGION_CLASSES]
    return torch.cat(regions, dim=dim)


def _argmax_one_hot(probabilities: torch.Tensor) -> torch.Tensor:
    """One-hot ``[4, *spatial]`` of the most probable class per voxel (ties: the lower class index)."""
    index = probabilities.argmax(dim=0, keepdim=True)
    return torch.cat([index == c for c in range(probabilities.shape[0])]).to(probabilities.dtype)


def _check_head_shape(probabilities: torch.Tensor, activation: str) -> None:
    expected = head_channels(activation)
    if probabilities.ndim < 2 or probabilities.shape[0] != expected:
        raise ValueError(
            f"a {activation} head gives {expected} channels, got shape {tuple(probabilities.shape)}: the network's "
            "out_channels and the config value `activation` disagree (or the checkpoint is of the other head)."
        )


def probabilities_to_regions(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """Binary TC/WT/ET channels ``[3, *spatial]`` of one item's head probabilities ``[C, *spatial]``.

    sigmoid: each region channel at probability >= 0.5 (what ``AsDiscrete(threshold=0.5)`` does);
    softmax: the regions of the most probable class (:func:`classes_to_regions` of its one-hot).
    """
    _check_head_shape(probabilities, activation)
    if activation == "sigmoid":
        return (probabilities >= REGION_THRESHOLD).to(probabilities.dtype)
    return classes_to_regions(_argmax_one_hot(probabilities))


def probabilities_to_brats_labels(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """One BraTS label map ``[1, *spatial]`` (uint8, 0/1/2/4) of one item's head probabilities ``[C, *spatial]``.

    sigmoid: the region channels at >= 0.5, painted nested (WT → 2, TC → 1, ET → 4;
    :func:`~brats_kd.labels.regions_to_brats_labels`); softmax: the label of the most probable class
    (:data:`CLASS_LABELS`). Metadata (affine) of a ``MetaTensor`` input is kept.
    """
    _check_head_shape(probabilities, activation)
    if activation == "sigmoid":
        return regions_to_brats_labels(probabilities_to_regions(probabilities, activation))
    index = probabilities.argmax(dim=0, keepdim=True)
    labels = torch.zeros_like(probabilities[:1], dtype=torch.uint8)
    for c, value in enumerate(CLASS_LABELS[1:], start=1):
        labels[index == c] = value
    return labels


class HeadActivationd(Activationsd):
    """MONAI's ``Activationsd`` for a head: ``sigmoid`` per channel, or ``softmax`` over the channels."""

    def __init__(self, keys: KeysCollection, activation: str, allow_missing_keys: bool = False) -> None:
        check_activation(activation)
        super().__init__(
            keys, sigmoid=activation == "sigmoid", softmax=activation == "softmax", allow_missing_keys=allow_missing_keys
        )
        self.activation = activation


class _HeadProbabilitiesd(MapTransform):
    """Base: apply ``convert(probabilities, activation)`` to each key of the item."""

    def __init__(self, keys: KeysCollection, activation: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.activation = check_activation(activation)

    @staticmethod
    def convert(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key], self.activation)
        return d


class ProbabilitiesToRegionsd(_HeadProbabilitiesd):
    """Dictionary form of :func:`probabilities_to_regions`: head probabilities → binary TC/WT/ET channels."""

    convert = staticmethod(probabilities_to_regions)


class ProbabilitiesToBratsLabelsd(_HeadProbabilitiesd):
    """Dictionary form of :func:`probabilities_to_brats_labels`: head probabilities → BraTS label map 0/1/2/4."""

    convert = staticmethod(probabilities_to_brats_labels)
