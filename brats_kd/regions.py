"""Per-entry label conventions for a datalist that mixes manual and pseudo labels.

A combined datalist (written by the ensemble bundle's pseudo-labelling) holds manual labels in the
dataset's own values (BraTS 2023: ET = 3; MSD: 1/2/3 with edema = 1) next to pseudo labels in BraTS
values 0/1/2/4, or soft pseudo labels that already are TC/WT/ET probabilities. MONAI's
``MapLabelValued`` takes one mapping for the whole dataset, so :class:`EntryLabelToRegionsd` reads
the mapping (and the label format) from each item instead.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, MapLabelValue, MapTransform

__all__ = ["LABEL_FORMATS", "EntryLabelToRegionsd", "label_to_regions"]

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
