"""Per-case checks of a BraTS-style dataset, run before any datalist is written.

Every check returns human-readable problem strings instead of raising, so one pass reports
all defects of all cases. Headers (shape, affine) are compared first; then each volume's
voxels are read, one file at a time, to find NaN/Inf, empty modalities and unexpected label
values. Memory use is therefore bounded by the largest single file, whatever the dataset size.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from tools.layouts import MODALITIES, Case, Layout

# Affines of co-registered BraTS volumes are identical; the tolerance (mm for the origin,
# unitless for direction x spacing) only absorbs float32 storage and qform/sform rounding.
AFFINE_TOLERANCE = 1e-3
MAX_VALUES_SHOWN = 10
LABEL_ROLES = ("seg", "label")


def file_roles(case: Case, layout: Layout) -> dict[str, str]:
    """Role name -> relative path of each distinct file of a case.

    One-file-per-modality layouts use the modality names and ``seg``; MSD uses ``image`` (the
    4-D file behind all four modalities) and ``label``.
    """
    if layout.multichannel:
        roles = {"image": case.images[MODALITIES[0]]}
        label_role = "label"
    else:
        roles = dict(case.images)
        label_role = "seg"
    if case.label is not None:
        roles[label_role] = case.label
    return roles


def validate_case(root: Path, case: Case, layout: Layout) -> list[str]:
    """All problems found in one case; an empty list means the case is usable."""
    problems = []
    if case.stray_files:
        # BraTS 2020 ships case 355 with a misnamed segmentation; silently treating such a case
        # as unlabeled would move a labeled case into the pseudo-labelling pool.
        problems.append(
            f"unrecognised NIfTI file(s) {', '.join(case.stray_files)} in the case folder "
            "(rename to the layout's naming or remove)"
        )
    headers = {}
    for role, rel in file_roles(case, layout).items():
        image, problem = _load_header(root / rel, role, rel)
        if problem:
            problems.append(problem)
        else:
            headers[role] = image
    problems += _dimension_problems(headers, layout)
    problems += _geometry_problems(headers, layout)
    for role, image in headers.items():
        problems += _voxel_problems(role, image, layout)
    return problems


# ---------------------------------------------------------------------------------------------
# header checks


def _describe_error(err: Exception, path: Path | None = None) -> str:
    """One short line for a read error (nibabel, gzip and zlib messages can be long).

    The absolute path that nibabel puts in its messages is shortened to the file name: the
    caller's message already names the case and the file.
    """
    text = " ".join(str(err).split()) or "no details"
    if path is not None:
        text = text.replace(str(path), path.name)
    return f"{type(err).__name__}: {text[:160]}"


def _load_header(path: Path, role: str, rel: str) -> tuple[nib.Nifti1Image | None, str | None]:
    """Open a NIfTI file (header only); returns (image, None) or (None, problem)."""
    if not path.is_file():
        return None, f"missing {role} file {rel}"
    try:
        return nib.load(path), None
    except Exception as err:  # noqa: BLE001 - nibabel, gzip, zlib and OS errors all mean "unreadable"
        return None, f"{role} file {rel} is not a readable NIfTI ({_describe_error(err, path)})"


def _expected_ndim(role: str, layout: Layout) -> int:
    """MSD images carry the modalities as a 4th axis; every other volume is 3-D."""
    return 4 if layout.multichannel and role not in LABEL_ROLES else 3


def _dimension_problem(role: str, image: nib.Nifti1Image, layout: Layout) -> str | None:
    """Why a volume has the wrong number of dimensions/channels, or None if it is fine."""
    shape = tuple(image.shape)
    if _expected_ndim(role, layout) == 4:
        if len(shape) != 4 or shape[3] != len(MODALITIES):
            return (
                f"{role} has shape {shape}, expected 4-D with {len(MODALITIES)} channels "
                "(FLAIR, T1w, T1gd, T2w)"
            )
    elif len(shape) != 3:
        return f"{role} is {len(shape)}-D with shape {shape}, expected a 3-D volume"
    return None


def _dimension_problems(headers: dict[str, nib.Nifti1Image], layout: Layout) -> list[str]:
    found = (_dimension_problem(role, image, layout) for role, image in headers.items())
    return [problem for problem in found if problem]


def _join_roles(roles: list[str]) -> str:
    return "/".join(roles) + (" has" if len(roles) == 1 else " have")


def _geometry_problems(headers: dict[str, nib.Nifti1Image], layout: Layout) -> list[str]:
    """Spatial shape and affine of every volume must match those of the images.

    The reference is the spatial shape most images share (ties go to the first modality), so
    a single odd modality is the one reported rather than the three that agree.
    """
    # Volumes with the wrong dimensionality were reported already and cannot be compared.
    usable = {r: img for r, img in headers.items() if _dimension_problem(r, img, layout) is None}
    images = {r: img for r, img in usable.items() if r not in LABEL_ROLES}
    if not images:
        return []
    spatial = {r: tuple(img.shape[:3]) for r, img in usable.items()}
    image_shapes = [spatial[r] for r in images]  # in modality order
    counts = Counter(image_shapes)
    reference_shape = max(image_shapes, key=counts.__getitem__)  # max() keeps the first of equals
    reference_roles = [r for r in images if spatial[r] == reference_shape]
    reference_role = reference_roles[0]

    problems = []
    for role in usable:
        if spatial[role] != reference_shape:
            if role in LABEL_ROLES:
                problems.append(f"{role} has shape {spatial[role]} but the images have {reference_shape}")
            else:
                problems.append(
                    f"{role} has shape {spatial[role]} but {_join_roles(reference_roles)} {reference_shape}"
                )
    reference_affine = usable[reference_role].affine
    for role, image in usable.items():
        if role != reference_role and not np.allclose(image.affine, reference_affine, atol=AFFINE_TOLERANCE):
            problems.append(
                f"{role} geometry differs from {reference_role}: "
                f"{_affine_difference(image.affine, reference_affine)}"
            )
    return problems


def _affine_difference(affine: np.ndarray, reference: np.ndarray) -> str:
    """Say which part of two affines differs: voxel size, orientation and/or origin."""
    parts = []
    spacing, ref_spacing = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(reference[:3, :3], axis=0)
    if not np.allclose(spacing, ref_spacing, atol=AFFINE_TOLERANCE):
        parts.append(f"voxel size {_fmt_vector(spacing)} vs {_fmt_vector(ref_spacing)}")
    directions = affine[:3, :3] / np.where(spacing == 0, 1, spacing)
    ref_directions = reference[:3, :3] / np.where(ref_spacing == 0, 1, ref_spacing)
    if not np.allclose(directions, ref_directions, atol=AFFINE_TOLERANCE):
        parts.append("orientation differs")
    if not np.allclose(affine[:3, 3], reference[:3, 3], atol=AFFINE_TOLERANCE):
        parts.append(f"origin {_fmt_vector(affine[:3, 3])} vs {_fmt_vector(reference[:3, 3])}")
    return ", ".join(parts) or f"affines differ by more than {AFFINE_TOLERANCE}"


def _fmt_vector(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# ---------------------------------------------------------------------------------------------
# voxel checks


def _voxel_problems(role: str, image: nib.Nifti1Image, layout: Layout) -> list[str]:
    """Read one volume's voxels and check them; the array is dropped before the next file."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - a truncated gzip surfaces here as EOFError, zlib.error, ...
        path = Path(image.get_filename())
        return [f"{role} file {path.name} is corrupt or truncated ({_describe_error(err, path)})"]
    if role in LABEL_ROLES:
        return _label_problems(role, data, layout)
    channels = [m for m, _ in sorted(layout.channel_index.items(), key=lambda kv: kv[1])]
    return _intensity_problems(role, data, channels if layout.multichannel else None)


def _count_non_finite(data: np.ndarray) -> int:
    """Number of NaN/Inf voxels (integer data cannot hold any)."""
    if data.dtype.kind not in "fc":
        return 0
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _intensity_problems(role: str, data: np.ndarray, channels: list[str] | None) -> list[str]:
    """NaN/Inf voxels and all-zero volumes (per channel for a 4-D multi-modal image)."""
    problems = []
    non_finite = _count_non_finite(data)
    if non_finite:
        problems.append(f"{role} has {non_finite} NaN/Inf voxels")
    if channels and data.ndim == 4 and data.shape[3] == len(channels):
        for index, name in enumerate(channels):
            if not np.any(data[..., index]):
                problems.append(f"{role} channel {index} ({name}) is all zeros")
    elif not np.any(data):
        problems.append(f"{role} is all zeros")
    return problems


def _label_problems(role: str, data: np.ndarray, layout: Layout) -> list[str]:
    """NaN/Inf voxels and label values outside the layout's set (e.g. 3 in a BraTS 2021 seg)."""
    problems = []
    non_finite = _count_non_finite(data)
    if non_finite:
        problems.append(f"{role} has {non_finite} NaN/Inf voxels")
        data = data[np.isfinite(data)]
    values = np.unique(data)
    # Float labels compare equal to the integer set when they hold whole numbers (2.0 == 2).
    unexpected = [v.item() for v in values if v.item() not in layout.label_values]
    if unexpected:
        shown = ", ".join(_fmt_label(v) for v in unexpected[:MAX_VALUES_SHOWN])
        if len(unexpected) > MAX_VALUES_SHOWN:
            shown += f", ... ({len(unexpected)} in all)"
        allowed = ", ".join(str(v) for v in sorted(layout.label_values))
        problems.append(f"{role} has label values {{{shown}}} outside the {layout.name} set {{{allowed}}}")
    return problems


def _fmt_label(value: float | int) -> str:
    """2.0 -> '2', 0.5 -> '0.5': whole numbers print as integers."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"
