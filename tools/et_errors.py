"""Where a model's enhancing-tumour errors are: the analysis behind docs/results.md's teacher-ET finding.

For each model of an experiment fold, over the saved label maps of its evaluation::

    python -m tools.et_errors runs/quick --fold 0 --models teacher baseline student

prints the ET Dice on the test cases that have ET, and for the cases without ET how many got a false
ET prediction and in which reference label those false voxels lie (0 background, 1 necrotic /
non-enhancing core, 2 oedema). A model that paints the non-enhancing core as ET shows its false
voxels under label 1. It also prints, per region, the median over the cases that have the region of the
predicted / reference volume: below 1 a model under-segments that region, above 1 it over-segments.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

ET = 4
REGION_LABELS = {"tc": (1, 4), "wt": (1, 2, 4), "et": (4,)}  # BraTS 2018-2021 labels of each nested region


@dataclass
class EtErrors:
    """ET errors of one model over one fold's test cases."""

    model: str
    et_dice_on_et_cases: list[float] = field(default_factory=list)
    cases_without_et: int = 0
    cases_with_false_et: int = 0
    false_et_voxels_by_reference_label: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0, 2: 0})
    volume_ratios: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in REGION_LABELS})

    def add_case(self, prediction: np.ndarray, reference: np.ndarray) -> None:
        """Count one case: ``prediction`` and ``reference`` are BraTS label maps (0/1/2/4) of the same grid."""
        if prediction.shape != reference.shape:
            raise ValueError(f"{self.model}: prediction shape {prediction.shape} differs from the reference {reference.shape}")
        for region, labels in REGION_LABELS.items():
            reference_volume = int(np.isin(reference, labels).sum())
            if reference_volume:
                self.volume_ratios[region].append(float(np.isin(prediction, labels).sum()) / reference_volume)
        predicted, true = prediction == ET, reference == ET
        if true.any():
            self.et_dice_on_et_cases.append(float(2 * (predicted & true).sum() / (predicted.sum() + true.sum())))
            return
        self.cases_without_et += 1
        self.cases_with_false_et += bool(predicted.any())
        for label in self.false_et_voxels_by_reference_label:
            self.false_et_voxels_by_reference_label[label] += int((predicted & (reference == label)).sum())

    def summary(self) -> dict:
        return {
            "model": self.model,
            "et_dice_on_et_cases": float(np.mean(self.et_dice_on_et_cases)) if self.et_dice_on_et_cases else None,
            "cases_with_et": len(self.et_dice_on_et_cases),
            "cases_without_et": self.cases_without_et,
            "cases_with_false_et": self.cases_with_false_et,
            "false_et_voxels_by_reference_label": self.false_et_voxels_by_reference_label,
            "median_volume_ratio": {r: float(np.median(v)) if v else None for r, v in self.volume_ratios.items()},
        }


def reference_labels(out: Path) -> dict[str, Path]:
    """Case id → reference label file, from the experiment's datalist (tools.prepare's format)."""
    datalist = json.loads((out / "datalist.json").read_text())
    root = Path(datalist.get("dataset_dir", ""))
    return {case["case_id"]: root / case["label"] for case in datalist["training"] if case.get("label")}


def model_et_errors(out: Path, fold: int, model: str, evaluation: str = "evaluate") -> EtErrors:
    """ET errors of ``model`` on ``fold``, from the label maps its evaluation saved."""
    folder = out / f"fold{fold}" / model / evaluation
    maps = sorted(folder.glob("**/*.nii.gz"))
    if not maps:
        raise FileNotFoundError(f"{folder}: no saved label maps (has the {model} evaluation of fold {fold} run?)")
    references, errors = reference_labels(out), EtErrors(model)
    for path in maps:
        case_id = path.name.removesuffix(".nii.gz")
        if case_id not in references:
            raise ValueError(f"{path}: case {case_id} has no reference label in {out / 'datalist.json'}")
        errors.add_case(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(references[case_id]).dataobj))
    return errors


def main(out: str, fold: int = 0, models=("teacher", "baseline", "student"), evaluation: str = "evaluate") -> None:
    """Print one JSON line of ET errors per model; ``--models teacher,baseline``."""
    names = models.split(",") if isinstance(models, str) else list(models)
    for name in names:
        print(json.dumps(model_et_errors(Path(out), int(fold), name, evaluation).summary()))


if __name__ == "__main__":
    try:
        fire.Fire(main, name="python -m tools.et_errors")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
