"""BraTS label maps: nested painting of the region channels into labels 0/1/2/4, and an atomic writer."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .io import write_nifti_atomic

# Output channel order of the networks (MONAI's ConvertToMultiChannelBasedOnBratsClasses).
REGIONS = ("tc", "wt", "et")


def regions_to_brats_labels(regions: torch.Tensor) -> torch.Tensor:
    """Paint binary region channels ``[TC, WT, ET, ...spatial]`` into one BraTS label map ``[1, ...]``.

    Nested painting, as in the BraTS challenge submissions: WT → 2 (edema), then TC → 1 (necrotic /
    non-enhancing core), then ET → 4 (enhancing). Regions the network predicts outside their parent
    (e.g. ET outside TC) keep the innermost label, so no predicted ET voxel is lost.
    """
    if regions.shape[0] != 3:
        raise ValueError(f"expected 3 region channels (TC, WT, ET), got shape {tuple(regions.shape)}.")
    tc, wt, et = (regions[i : i + 1] > 0.5 for i in range(3))
    labels = torch.zeros_like(regions[:1], dtype=torch.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = 4
    return labels


class RegionsToBratsLabelsd(MapTransform):
    """Dictionary transform: binary region channels (TC, WT, ET) → one BraTS label map (0/1/2/4)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = regions_to_brats_labels(d[key])
        return d


class SaveCaseImaged(MapTransform):
    """Base of the per-case NIfTI writers: ``image(tensor)`` → ``<output_dir>/<case_id>.nii.gz``, atomically.

    The tensor must already be in the case's original geometry (invert the preprocessing first);
    its affine comes from the tensor's metadata.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, case_id_key: str = "case_id") -> None:
        super().__init__(keys)
        self.output_dir = output_dir
        self.case_id_key = case_id_key

    def image(self, tensor: torch.Tensor) -> nib.Nifti1Image:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            write_nifti_atomic(Path(self.output_dir) / f"{d[self.case_id_key]}.nii.gz", self.image(d[key]))
        return d


class SaveBratsLabelMapd(SaveCaseImaged):
    """Save a BraTS label map (0/1/2/4, uint8) ``[1, *spatial]`` as ``<output_dir>/<case_id>.nii.gz``."""

    def image(self, tensor: torch.Tensor) -> nib.Nifti1Image:
        array = np.asarray(tensor.detach().cpu())[0].astype(np.uint8)
        return nib.Nifti1Image(array, np.asarray(tensor.affine, dtype=np.float64))
