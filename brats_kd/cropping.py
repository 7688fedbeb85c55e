"""The brain's bounding box, which every KD-Net bundle crops a case to before resizing it.

BraTS scans are skull-stripped: every voxel outside the brain is exactly 0 in every modality, so the
brain is the bounding box of the non-zero voxels (nnU-Net's first step, "crop to nonzero"). Cropping
to it instead of a fixed central box fits any field of view: a 240×240×155 BraTS volume and a
64-voxel phantom alike. MONAI's ``CropForegroundd`` does the cropping (and is undone by ``Invertd``);
this module only names what counts as brain.
"""

from __future__ import annotations

__all__ = ["brain_voxels"]


def brain_voxels(image):
    """``image != 0``: the brain of a skull-stripped scan, also after ``NormalizeIntensityd(nonzero=True)``.

    MONAI's default foreground test (``x > 0``) would lose brain voxels that intensity normalisation
    made negative. ``CropForegroundd`` takes the union over channels (modalities). Works on tensors and arrays
    alike, so this module imports nothing and ``import brats_kd`` stays cheap.
    """
    return image != 0
