"""BraTS post-processing of predicted label maps (0/1/2/4).

Small predicted enhancing-tumour (ET) volumes are mostly false positives: a case without
enhancement scores ET Dice 0 for any ET voxel under the BraTS rules, and 1 for none. Challenge
entries therefore relabel the predicted ET as necrosis / non-enhancing core (label 1, so TC and
WT keep those voxels) when its total volume is below a threshold. Lachinov et al. (the paper's
public inference code) use 32 voxels of BraTS's 1 mm grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

#: BraTS 2018-2021 label values
NECROSIS, EDEMA, ENHANCING = 1, 2, 4
#: volume of one voxel of the BraTS grid, in mm³ (1 mm isotropic)
BRATS_VOXEL_MM3 = 1.0


def voxel_volume_mm3(affine) -> float:
    """Volume of one voxel in mm³ from a 4x4 affine (the absolute determinant of its 3x3 part).

    Rounded to 1e-6 mm³: the determinant of diag(2, 2, 2) comes out as 7.999999999999998, which would
    move a volume exactly at the threshold to the wrong side of it.
    """
    return round(float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))), 6)


def min_voxels_at(et_min_voxels: float, affine) -> float:
    """``et_min_voxels`` BraTS voxels (1 mm³ each) as a voxel count on the grid of ``affine``."""
    return et_min_voxels * BRATS_VOXEL_MM3 / voxel_volume_mm3(affine)


def enhancing_to_necrosis(labels: torch.Tensor, min_voxels: float) -> torch.Tensor:
    """Relabel all ET (4) as necrosis (1) when fewer than ``min_voxels`` voxels are ET; 0 turns it off."""
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}.")
    et = labels == ENHANCING
    count = int(et.sum())
    if 0 < count < min_voxels:
        labels = labels.clone()
        labels[et] = NECROSIS
    return labels


class EnhancingToNecrosisd(MapTransform):
    """Dictionary form of :func:`enhancing_to_necrosis` for label maps in any geometry.

    ``et_min_voxels`` is given in voxels of BraTS's 1 mm grid (as in the challenge papers) and
    scaled to each label map's own voxel volume, read from its affine (1 mm³ when it has none),
    so the same value means the same physical volume on a resampled or down-sized volume.
    """

    def __init__(self, keys: KeysCollection, et_min_voxels: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if et_min_voxels < 0:
            raise ValueError(f"et_min_voxels must be >= 0 (0 = off), got {et_min_voxels}.")
        self.et_min_voxels = float(et_min_voxels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.et_min_voxels == 0:
            return d
        for key in self.key_iterator(d):
            affine = getattr(d[key], "affine", None)
            threshold = self.et_min_voxels if affine is None else min_voxels_at(self.et_min_voxels, affine)
            d[key] = enhancing_to_necrosis(d[key], threshold)
        return d
