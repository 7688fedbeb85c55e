"""BraTS conventions the MONAI library does not ship: region → label-map painting, the BraTS
HD95 rule for empty masks, an atomic label-map writer and a JSON summary of per-case metrics.

Kept byte-identical in every bundle that needs it (a bundle must stay self-contained);
``tests/test_bundle_copies.py`` guards against drift.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import math
import os
import statistics
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import HausdorffDistanceMetric
from monai.transforms import MapTransform

# Maximal HD95 penalty of the BraTS evaluation when exactly one of prediction and reference is empty.
BRATS_HD95_PENALTY_MM = 373.13
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


class BratsHausdorffDistance95Metric(HausdorffDistanceMetric):
    """95th-percentile Hausdorff distance in mm with the BraTS rule for empty masks.

    Both empty → 0; exactly one empty → ``BRATS_HD95_PENALTY_MM`` (MONAI alone gives NaN / inf).
    Voxel spacing is read from the reference's affine when the caller gives none.
    """

    def __init__(self, include_background: bool = True, **kwargs) -> None:
        super().__init__(include_background=include_background, percentile=95.0, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("spacing") is None and hasattr(y, "affine"):
            affine = torch.as_tensor(y.affine, dtype=torch.float64)
            kwargs["spacing"] = torch.linalg.norm(affine[:3, :3], dim=0).tolist()
        hd = super()._compute_tensor(y_pred, y, **kwargs)
        pred_empty = y_pred.flatten(2).sum(-1) == 0
        ref_empty = y.flatten(2).sum(-1) == 0
        hd = torch.where(pred_empty & ref_empty, torch.zeros_like(hd), hd)
        return torch.where(pred_empty ^ ref_empty, torch.full_like(hd, BRATS_HD95_PENALTY_MM), hd)


class RegionsToBratsLabelsd(MapTransform):
    """Dictionary transform: binary region channels (TC, WT, ET) → one BraTS label map (0/1/2/4)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = regions_to_brats_labels(d[key])
        return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` so that a killed run leaves either the old file or the complete new one.

    The bytes go to ``.<name>.<random>.tmp`` in the same folder, are fsync'ed and renamed over
    ``path``. The temporary name keeps no ``.nii.gz`` / ``.json`` suffix, so nothing that lists
    ``*.nii.gz`` can pick up a half-written file; on a failure it is removed, and one left by a
    killed run is removed by the next write of the same file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write a NIfTI file (gzip-compressed for ``.nii.gz``) atomically, see :func:`atomic_write_bytes`."""
    data = nib.Nifti1Image(array, affine).to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # nibabel's level for .nii.gz
    atomic_write_bytes(data, path)


class SaveBratsLabelMapd(MapTransform):
    """Save a BraTS label map (0/1/2/4, uint8) as ``<output_dir>/<case_id>.nii.gz``, atomically.

    The label map must already be in the case's original geometry (invert the preprocessing first);
    its affine comes from the tensor's metadata.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, case_id_key: str = "case_id") -> None:
        super().__init__(keys)
        self.output_dir = output_dir
        self.case_id_key = case_id_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            array = np.asarray(labels.detach().cpu())[0].astype(np.uint8)
            affine = np.asarray(labels.affine, dtype=np.float64)
            atomic_save_nifti(array, affine, Path(self.output_dir) / f"{d[self.case_id_key]}.nii.gz")
        return d


def _summarise(values: Sequence[float]) -> dict[str, float | int]:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.pstdev(finite) if finite else math.nan,
        "median": statistics.median(finite) if finite else math.nan,
        "n": len(finite),
    }


def write_metric_summary(metrics_dir: str, filename: str = "summary.json") -> dict:
    """Summarise MONAI ``MetricsSaver``'s per-case ``*_raw.csv`` files into one JSON (mean, std, median).

    Returns the summary; it is written atomically to ``<metrics_dir>/<filename>``.
    """
    summary: dict[str, dict] = {}
    for raw in sorted(Path(metrics_dir).glob("*_raw.csv")):
        with raw.open(newline="") as f:
            header, *rows = list(csv.reader(f))
        metric = raw.stem[: -len("_raw")]
        # MetricsSaver columns: filename, one column per channel ("class0", ...), then "mean".
        channels = [name for name in header[1:] if name != "mean"]
        for col, name in enumerate(header[1:], start=1):
            if name == "mean":
                continue
            key = metric if len(channels) == 1 else f"{metric}_{name}"
            summary[key] = _summarise([float(r[col]) for r in rows if len(r) > col])
    atomic_write_bytes(json.dumps(summary, indent=2).encode("utf-8"), Path(metrics_dir) / filename)
    return summary
