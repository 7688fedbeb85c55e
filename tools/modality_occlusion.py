"""Which input modalities a trained model's enhancing-tumour output rests on: predictions with channels blanked.

    python -m tools.modality_occlusion runs/quick --fold 0 --models teacher,baseline

Each model of the fold predicts its test cases once as they are and once per group of input channels set
to 0 (the mean after the bundles' per-channel z-score normalisation, i.e. "no information"): each single
modality the model has, T2 + FLAIR together, and everything but T1ce. For every variant it prints the ET
Dice on the cases that have ET and, on the cases without ET, how many get a false ET prediction and how many
voxels. All in the network's grid (the training-time validation transforms of the model's own merged
``evaluate/config.json``), so the numbers are comparable between variants, not with the report's Dice in the
original geometry. A model that keeps its false ET whichever group is blanked does not take it from one
modality alone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class OcclusionResult:
    model: str
    blanked: str  # "none" or the blanked modalities joined by "+"
    et_dice_on_et_cases: float
    cases_with_et: int
    cases_without_et: int
    cases_with_false_et: int
    false_et_voxels: int


def blank_groups(modalities: list[str]) -> dict[str, list[int]]:
    """``{name: channel indices}``: nothing, each modality alone, T2 + FLAIR, and everything but T1ce."""
    groups = {"none": []}
    groups.update({m: [i] for i, m in enumerate(modalities)} if len(modalities) > 1 else {})
    pair = [modalities.index(m) for m in ("t2", "flair") if m in modalities]
    if len(pair) == 2 and len(modalities) > 2:
        groups["t2+flair"] = pair
    if "t1ce" in modalities and len(modalities) > 2:
        others = [i for i, m in enumerate(modalities) if m != "t1ce"]
        groups["+".join(modalities[i] for i in others)] = others
    return groups


def load_model(model_dir: Path):
    """The network (weights of ``models/model.pt``), its input modalities, head and test data of a model folder."""
    from monai.bundle import ConfigParser

    config = json.loads((model_dir / "evaluate" / "config.json").read_text())
    bundle = "kd_student" if "student_modalities" in config else "teacher"
    parser = ConfigParser(config)
    parser["bundle_root"] = str(ROOT / "bundles" / bundle)
    # the training-time validation transforms (label in the network's grid), on the test fold
    parser["validate#preprocessing#transforms"] = "@preprocessing_transforms"
    parser["validate#dataset#data"] = "@test_datalist"
    network = parser.get_parsed_content("network")
    state = torch.load(model_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    network.eval()
    modalities = list(config.get("student_modalities") or config["modalities"])
    # runs made before the softmax head have no `activation`: they are sigmoid
    return network, modalities, config.get("activation", "sigmoid"), parser.get_parsed_content("validate#dataset")


def evaluated_model_dir(run: str, fold: int, name: str) -> Path:
    """``<run>/fold<fold>/<name>``, or exit 2 naming it when it holds no evaluated model."""
    model_dir = Path(run) / f"fold{fold}" / name
    if not (model_dir / "evaluate" / "config.json").exists() or not (model_dir / "models" / "model.pt").exists():
        print(f"error: {model_dir} has no evaluated model (evaluate/config.json and models/model.pt)", file=sys.stderr)
        sys.exit(2)
    return model_dir


def head_logits(network, image: torch.Tensor) -> torch.Tensor:
    """The head's logits of one batch (networks that also return features give them first)."""
    with torch.no_grad():
        logits = network(image)
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def occlusion(model_dir: Path) -> list[OcclusionResult]:
    """One :class:`OcclusionResult` per blanked group of ``model_dir``'s inputs."""
    from brats_kd.regions import probabilities_to_regions

    network, modalities, activation, dataset = load_model(model_dir)
    groups = blank_groups(modalities)
    counts = {g: {"dice": [], "without": 0, "false_cases": 0, "false_voxels": 0} for g in groups}
    for item in dataset:
        image, reference_et = item["image"].unsqueeze(0), item["label"][2] > 0
        for name, channels in groups.items():
            blanked = image.clone()
            blanked[:, channels] = 0
            logits = head_logits(network, blanked)
            probabilities = torch.sigmoid(logits[0]) if activation == "sigmoid" else torch.softmax(logits[0], dim=0)
            et = probabilities_to_regions(probabilities, activation)[2] > 0
            c = counts[name]
            if reference_et.any():
                c["dice"].append(float(2 * (et & reference_et).sum() / (et.sum() + reference_et.sum())))
            else:
                c["without"] += 1
                c["false_cases"] += int(et.any())
                c["false_voxels"] += int(et.sum())
    return [
        OcclusionResult(model_dir.name, name, sum(c["dice"]) / max(len(c["dice"]), 1), len(c["dice"]), c["without"],
                        c["false_cases"], c["false_voxels"])
        for name, c in counts.items()
    ]


def main(run: str, fold: int = 0, models="teacher,baseline") -> None:
    """Print one JSON line per (model, blanked group) of ``run``'s fold ``fold``."""
    names = models.split(",") if isinstance(models, str) else list(models)
    for name in names:
        for result in occlusion(evaluated_model_dir(run, fold, name)):
            print(json.dumps(asdict(result)))


if __name__ == "__main__":
    fire.Fire(main, name="python -m tools.modality_occlusion")
