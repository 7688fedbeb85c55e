"""Is a model's deficit its threshold? Region Dice of a sigmoid-head model at several probability thresholds.

    python -m tools.threshold_sweep runs/quick --fold 0 --models baseline,student --thresholds 0.5,0.4,0.3,0.2
    python -m tools.threshold_sweep runs/quick --fold 0 --models teacher --temperature 5   # a teacher's soft targets

For each model, over its fold's test cases in the network's grid (as ``tools.modality_occlusion`` reads them):
the mean probability of each region channel inside the reference region and on the brain outside it (voxels whose
input is non-zero), the share of brain voxels left undecided (0.1 < p < 0.9), and the mean Dice of the region at
each threshold over the cases that have the region. A model whose Dice recovers at a lower threshold is
under-confident (a calibration problem); one that does not ranks its voxels worse. ``--temperature T`` reads
``sigmoid(logits / T)`` instead: for a teacher, the soft targets Eq. 1 of KD-Net gives its student.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

from tools.modality_occlusion import evaluated_model_dir, head_logits, load_model

REGIONS = ("tc", "wt", "et")  # the sigmoid head's channel order
UNDECIDED = (0.1, 0.9)  # a probability strictly between these is "undecided"


def sweep(model_dir: Path, thresholds: list[float], temperature: float = 1.0) -> dict:
    """``{"model", "temperature", "mean_probability_inside_reference": {region}, "mean_probability_outside_reference":
    {region}, "undecided_share": {region}, "dice": {threshold: {region}}}`` of a sigmoid model; each value a mean over
    the test cases (inside and Dice: the cases that have the region; outside: those with brain outside it)."""
    network, _, activation, dataset = load_model(model_dir)
    if activation != "sigmoid":
        raise ValueError(f"{model_dir}: a {activation} head has no per-region probability threshold")
    inside: dict[str, list[float]] = {r: [] for r in REGIONS}
    outside: dict[str, list[float]] = {r: [] for r in REGIONS}
    undecided: dict[str, list[float]] = {r: [] for r in REGIONS}
    dice: dict[float, dict[str, list[float]]] = {t: {r: [] for r in REGIONS} for t in thresholds}
    for item in dataset:
        image = item["image"].unsqueeze(0)
        logits = head_logits(network, image)
        probabilities, reference = torch.sigmoid(logits[0] / temperature), item["label"] > 0
        brain = image[0].abs().sum(dim=0) > 0  # skull-stripped and normalised on non-zero voxels: zero outside
        for c, region in enumerate(REGIONS):
            in_brain = probabilities[c][brain]
            if in_brain.numel():
                undecided[region].append(float(((in_brain > UNDECIDED[0]) & (in_brain < UNDECIDED[1])).float().mean()))
            background = brain & ~reference[c]
            if background.any():
                outside[region].append(float(probabilities[c][background].mean()))
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
        "temperature": temperature,
        "mean_probability_inside_reference": {r: mean(v) for r, v in inside.items()},
        "mean_probability_outside_reference": {r: mean(v) for r, v in outside.items()},
        "undecided_share": {r: mean(v) for r, v in undecided.items()},
        "dice": {str(t): {r: mean(v) for r, v in dice[t].items()} for t in thresholds},
    }


def main(run: str, fold: int = 0, models="baseline,student", thresholds="0.5,0.4,0.3,0.2", temperature: float = 1.0) -> None:
    """Print one JSON line per model of ``run``'s fold ``fold``."""
    names = models.split(",") if isinstance(models, str) else list(models)
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = [thresholds]  # one threshold: the command line parser hands over a number
    values = [float(t) for t in (thresholds.split(",") if isinstance(thresholds, str) else thresholds)]
    if not values or any(not 0 < t < 1 for t in values):
        print(f"error: --thresholds must be numbers in (0, 1), got {thresholds!r}", file=sys.stderr)
        sys.exit(2)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        print(f"error: --temperature must be a number > 0, got {temperature!r}", file=sys.stderr)
        sys.exit(2)
    for name in names:
        print(json.dumps(sweep(evaluated_model_dir(run, fold, name), values, float(temperature))))


if __name__ == "__main__":
    fire.Fire(main, name="python -m tools.threshold_sweep")
