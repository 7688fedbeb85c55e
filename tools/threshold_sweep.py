"""Is a model's deficit its threshold? Region Dice of a sigmoid-head model at several probability thresholds.

    python -m tools.threshold_sweep runs/quick --fold 0 --models baseline,student --thresholds 0.5,0.4,0.3,0.2

For each model, over its fold's test cases in the network's grid (as ``tools.modality_occlusion`` reads them):
the mean probability of each region channel inside the reference region, and the mean Dice of the region at each
threshold over the cases that have the region. A model whose Dice recovers at a lower threshold is under-confident
(a calibration problem); one that does not ranks its voxels worse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

from tools.modality_occlusion import evaluated_model_dir, head_logits, load_model

REGIONS = ("tc", "wt", "et")  # the sigmoid head's channel order


def sweep(model_dir: Path, thresholds: list[float]) -> dict:
    """``{"model", "mean_probability_inside_reference": {region}, "dice": {threshold: {region}}}`` of a sigmoid model."""
    network, _, activation, dataset = load_model(model_dir)
    if activation != "sigmoid":
        raise ValueError(f"{model_dir}: a {activation} head has no per-region probability threshold")
    inside: dict[str, list[float]] = {r: [] for r in REGIONS}
    dice: dict[float, dict[str, list[float]]] = {t: {r: [] for r in REGIONS} for t in thresholds}
    for item in dataset:
        logits = head_logits(network, item["image"].unsqueeze(0))
        probabilities, reference = torch.sigmoid(logits[0]), item["label"] > 0
        for c, region in enumerate(REGIONS):
            if not reference[c].any():
                continue
            inside[region].append(float(probabilities[c][reference[c]].mean()))
            for t in thresholds:
                predicted = probabilities[c] >= t
                dice[t][region].append(float(2 * (predicted & reference[c]).sum() / (predicted.sum() + reference[c].sum())))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "model": model_dir.name,
        "mean_probability_inside_reference": {r: mean(v) for r, v in inside.items()},
        "dice": {str(t): {r: mean(v) for r, v in dice[t].items()} for t in thresholds},
    }


def main(run: str, fold: int = 0, models="baseline,student", thresholds="0.5,0.4,0.3,0.2") -> None:
    """Print one JSON line per model of ``run``'s fold ``fold``."""
    names = models.split(",") if isinstance(models, str) else list(models)
    values = [float(t) for t in (thresholds.split(",") if isinstance(thresholds, str) else thresholds)]
    if not values or any(not 0 < t < 1 for t in values):
        print(f"error: --thresholds must be numbers in (0, 1), got {thresholds!r}", file=sys.stderr)
        sys.exit(2)
    for name in names:
        print(json.dumps(sweep(evaluated_model_dir(run, fold, name), values)))


if __name__ == "__main__":
    fire.Fire(main, name="python -m tools.threshold_sweep")
