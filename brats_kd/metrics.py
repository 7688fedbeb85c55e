"""BraTS evaluation rules MONAI's metrics lack: the HD95 penalty for empty masks, and a JSON summary
of ``MetricsSaver``'s per-case files."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.metrics import HausdorffDistanceMetric

from .io import write_json_atomic

# Maximal HD95 penalty of the BraTS evaluation when exactly one of prediction and reference is empty.
BRATS_HD95_PENALTY_MM = 373.13


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
    write_json_atomic(Path(metrics_dir) / filename, summary)
    return summary
