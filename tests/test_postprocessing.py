"""BraTS post-processing: small predicted enhancing tumour becomes necrosis (brats_kd.postprocessing)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from brats_kd.postprocessing import EnhancingToNecrosisd, enhancing_to_necrosis, min_voxels_at


def label_map(et_voxels: int, spacing: float = 1.0) -> MetaTensor:
    labels = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    labels[0, 2:6, 2:6, 2:6] = 2  # edema
    labels[0, 3:5, 3:5, 3:5] = 1  # core
    flat = labels.view(-1)
    core = torch.nonzero(flat == 1).flatten()
    flat[core[:et_voxels]] = 4
    return MetaTensor(labels, affine=torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64)))


def test_et_below_threshold_becomes_necrosis_and_regions_keep_their_voxels():
    labels = label_map(et_voxels=3)
    out = enhancing_to_necrosis(labels, min_voxels=4)
    assert int((out == 4).sum()) == 0
    assert int((out == 1).sum()) == 8  # the 3 ET voxels joined the core: TC and WT unchanged
    assert int((labels == 4).sum()) == 3, "the input is not modified"


def test_et_at_or_above_threshold_is_kept():
    labels = label_map(et_voxels=4)
    assert torch.equal(enhancing_to_necrosis(labels, min_voxels=4), labels)


def test_threshold_is_in_brats_voxels_scaled_to_the_voxel_volume():
    # 32 BraTS voxels (1 mm³ each) = 32 mm³ = 4 voxels of 2 mm (8 mm³ each)
    assert min_voxels_at(32, np.diag([2.0, 2.0, 2.0, 1.0])) == pytest.approx(4.0)
    transform = EnhancingToNecrosisd("seg", et_min_voxels=32)
    assert int((transform({"seg": label_map(3, spacing=2.0)})["seg"] == 4).sum()) == 0  # 24 mm³ < 32 mm³
    assert int((transform({"seg": label_map(4, spacing=2.0)})["seg"] == 4).sum()) == 4  # 32 mm³ kept
    assert int((transform({"seg": label_map(4, spacing=1.0)})["seg"] == 4).sum()) == 0  # 4 mm³ dropped


def test_zero_turns_it_off_and_negative_is_refused():
    labels = label_map(1)
    assert torch.equal(EnhancingToNecrosisd("seg", et_min_voxels=0)({"seg": labels})["seg"], labels)
    with pytest.raises(ValueError, match="et_min_voxels"):
        EnhancingToNecrosisd("seg", et_min_voxels=-1)
