"""Per-case input checks, the same at every entry point: ``tools.prepare`` before it writes a datalist,
and every bundle's inference, evaluation and pseudo-labelling before a case reaches ``LoadImaged``
(:class:`CaseGuard`: a bad case is named in one line and skipped, the others are processed, and
the run ends non-zero with a summary).

Every check returns human-readable problem strings instead of raising, so one pass reports
all defects of all cases. Headers (shape, affine) are compared first; then each volume's
voxels are read, one file at a time, to find NaN/Inf, empty modalities and unexpected label
values. Memory use is therefore bounded by the largest single file, whatever the dataset size.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np

from .config import one_file_per_case

MODALITIES = ("t1", "t1ce", "t2", "flair")
logger = logging.getLogger(__name__)


class Layout(Protocol):
    """What the checks need to know about a dataset (``tools.layouts.Layout`` or :class:`CaseFormat`)."""

    name: str
    label_values: frozenset[int]
    channel_index: dict[str, int]
    multichannel: bool


class Case(Protocol):
    """A case to check (``tools.layouts.Case``): relative file paths per modality and of the label."""

    case_id: str
    images: dict[str, str]
    label: str | None
    stray_files: list[str]


@dataclass(frozen=True)
class CaseFormat:
    """A :class:`Layout` described by a prepared datalist (what a bundle knows at inference time)."""

    name: str = "datalist"
    label_values: frozenset[int] = frozenset({0, 1, 2, 4})
    channel_index: dict[str, int] = field(default_factory=dict)
    multichannel: bool = False

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
    if getattr(case, "stray_files", None):
        # BraTS 2020 ships case 355 with a misnamed segmentation; silently treating such a case
        # as unlabeled would move a labeled case into the pseudo-labelling pool.
        problems.append(
            f"unrecognised NIfTI file(s) {', '.join(case.stray_files)} in the case folder "
            "(rename to the layout's naming or remove)"
        )
    return problems + check_files({role: (root / rel, rel) for role, rel in file_roles(case, layout).items()}, layout)


def check_files(files: Mapping[str, tuple[Path, str]], layout: Layout) -> list[str]:
    """All problems of one case's files ``{role: (path, name to report)}``; roles are modality names,
    ``image`` (an MSD 4-D file) and ``seg`` / ``label``."""
    problems = []
    headers = {}
    for role, (path, rel) in files.items():
        image, problem = _load_header(Path(path), role, rel)
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


# ---------------------------------------------------------------------------------------------
# the guard of the bundles' entry points


class CaseGuard:
    """Check the cases of an inference, evaluation or pseudo-labelling run before any is loaded.

    ``cases`` are the entries the run's dataset would get: ``{"case_id", "image": [files]}``
    (inference) or ``{"case_id", <modality>: file, ..., "label": file}`` (evaluation). A bad case
    (missing, truncated or corrupt file, NaN/inf, shape or affine mismatch, unknown label values) is
    logged in ONE line naming the case and its problems and left out; :meth:`finish`, the run's last
    step, then ends the run non-zero with a summary, without a traceback (``SystemExit``).
    ``label_map``: the datalist's, whose ``orig`` values (plus 0) are the valid label values.
    """

    def __init__(
        self,
        cases: Sequence[Mapping[str, Any]],
        modalities: Sequence[str] = MODALITIES,
        channel_index: Mapping[str, int] | None = None,
        label_map: Mapping[str, Sequence[int]] | None = None,
        label_key: str = "label",
        what: str = "inference",
    ) -> None:
        self.cases = list(cases)
        self.modalities = list(modalities)
        self.channel_index = dict(channel_index or {})
        self.label_values = frozenset({0, *(label_map or {"orig": [1, 2, 4]})["orig"]})
        self.label_key = label_key
        self.what = what
        self.skipped: dict[str, str] = {}
        self._usable: list[Mapping[str, Any]] | None = None

    def _files(self, case: Mapping[str, Any]) -> tuple[dict[str, tuple[Path, str]], bool]:
        """``({role: (path, file name)}, multichannel)`` of one entry."""
        if "image" in case:
            images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
        else:
            images = [case[m] for m in self.modalities if m in case]
        multichannel = one_file_per_case(self.channel_index) and len(set(map(str, images))) == 1
        roles = {"image": images[0]} if multichannel else dict(zip(self.modalities, images))
        if case.get(self.label_key):
            roles["label" if multichannel else "seg"] = case[self.label_key]
        return {role: (Path(f), os.path.basename(str(f))) for role, f in roles.items()}, multichannel

    def usable(self) -> list[Mapping[str, Any]]:
        """The cases that pass every check (computed once); each bad one is logged in one line."""
        if self._usable is None:
            self._usable = []
            for index, case in enumerate(self.cases):
                case_id = str(case.get("case_id", f"case {index}"))
                files, multichannel = self._files(case)
                layout = CaseFormat(label_values=self.label_values, channel_index=self.channel_index, multichannel=multichannel)
                problems = check_files(files, layout)
                if problems:
                    self.skipped[case_id] = "; ".join(problems)
                    logger.error(f"{case_id}: skipped: {self.skipped[case_id]}")
                else:
                    self._usable.append(case)
        return self._usable

    def finish(self) -> None:
        """End the run: nothing when every case was usable; otherwise exit status 1 with a summary."""
        self.usable()
        if self.skipped:
            raise SystemExit(
                f"{self.what}: {len(self.skipped)} of {len(self.cases)} case(s) skipped because their input is "
                f"unusable ({', '.join(self.skipped)}); the other {len(self.cases) - len(self.skipped)} were processed."
            )
