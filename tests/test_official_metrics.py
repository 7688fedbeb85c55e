"""The BraTS challenge's own scorer (BraTS-evaluation on panoptica, ``tools.official_metrics``) on saved label maps.

The scorer lives in its own virtual environment (``tools/brats_eval_env.sh`` makes ``.venv-brats-eval``;
``BRATS_EVAL_VENV`` points elsewhere). Without it the tests that run it are skipped, unless the environment
variable ``CI`` is set (``.ci/run`` builds it), where a missing venv is a failure. The input checks and the
missing-venv errors run without it.

Empty regions: where reference and prediction are both empty the scorer's volume-wise Dice is undefined (NaN,
panoptica's edge-case rule for the ``gli`` config), while this project's evaluation counts it as 1 (MONAI's
``DiceMetric(ignore_empty=False)``, the BraTS 2018 rule); such pairs are checked to be exactly that and the
others to agree to 1e-4.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_runner import ROOT, run_bundle, run_command
from tests.conftest import python_of_venv
from tools import official_metrics
from tools.official_metrics import CSV_NAME, HD95_PENALTY_MM, OfficialMetricsError, ScorerMissing, score

VENV = Path(os.environ.get("BRATS_EVAL_VENV", ROOT / ".venv-brats-eval"))
#: BraTS 2018 label values of each region in the saved label maps
REGION_LABELS = {"et": (4,), "tc": (1, 4), "wt": (1, 2, 4)}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def scorer_venv() -> str:
    python_of_venv(VENV, "BraTS-evaluation", "brats_eval_env.sh", "BRATS_EVAL_VENV")
    return str(VENV)


@pytest.fixture(scope="module")
def teacher_evaluation(trained_teacher_run, tmp_path_factory) -> Path:
    """The session's tiny teacher evaluated on fold 0 (4 phantom cases): its ``evaluate`` folder."""
    work = tmp_path_factory.mktemp("official_eval")
    overrides = dict(trained_teacher_run.overrides, ckpt_dir=str(trained_teacher_run.ckpt_dir), output_dir=str(work / "eval"))
    overrides.pop("epochs")
    run_bundle("teacher", ["train.json", "evaluate.json"], cwd=work, **overrides)
    return work / "eval"


@pytest.fixture(scope="module")
def scored_experiment(teacher_evaluation, datalist, scorer_venv, tmp_path_factory) -> Path:
    """An experiment folder holding :func:`teacher_evaluation` as ``fold0/teacher/evaluate``, scored by
    ``score_experiment`` (what ``kdnet --official_metrics`` runs): the folder."""
    out = tmp_path_factory.mktemp("official_experiment")
    evaluate = out / "fold0" / "teacher" / "evaluate"
    shutil.copytree(teacher_evaluation, evaluate)
    (evaluate / "overrides.json").write_text(json.dumps({"datalist": str(datalist), "fold": 0}))  # as tools.stages writes
    assert official_metrics.score_experiment(str(out), venv=scorer_venv) == [str(evaluate / CSV_NAME)]
    return out


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def our_dice(evaluate_dir: Path, region: str) -> dict[str, float]:
    """The evaluation's per-case Dice of ``region`` (MetricsSaver's ``dice_<region>_raw.csv``)."""
    with (evaluate_dir / f"dice_{region}_raw.csv").open(newline="") as f:
        return {row["filename"]: float(row["class0"]) for row in csv.DictReader(f)}


def region_is_empty(path: Path, labels: tuple[int, ...]) -> bool:
    return not np.isin(np.asanyarray(nib.load(str(path)).dataobj), labels).any()


@pytest.mark.slow
def test_official_volume_dice_equals_the_evaluations_per_case_dice(scored_experiment, datalist_json):
    teacher_evaluation = scored_experiment / "fold0" / "teacher" / "evaluate"
    official = read_rows(teacher_evaluation / CSV_NAME)
    test_cases = sorted(e["case_id"] for e in datalist_json["training"] if e["fold"] == 0)
    assert sorted(official) == test_cases
    dataset_dir = Path(datalist_json["dataset_dir"])
    labels = {e["case_id"]: dataset_dir / e["label"] for e in datalist_json["training"]}
    differences, empty_both = {r: [] for r in REGION_LABELS}, []
    for region, values in REGION_LABELS.items():
        for case_id, ours in our_dice(teacher_evaluation, region).items():
            theirs = float(official[case_id][f"dice_{region}"])
            prediction = teacher_evaluation / "predictions" / f"{case_id}.nii.gz"
            if region_is_empty(prediction, values) and region_is_empty(labels[case_id], values):
                # both empty: the scorer leaves the Dice undefined, this project's evaluation counts 1
                assert math.isnan(theirs) and ours == 1.0, (case_id, region, theirs, ours)
                empty_both.append((case_id, region))
            else:
                assert theirs == pytest.approx(ours, abs=TOLERANCE), (case_id, region)
                differences[region].append(abs(theirs - ours))
    # TC and WT exist in every phantom case: each case is compared there, not only matched as undefined
    assert len(differences["tc"]) == len(differences["wt"]) == len(test_cases)
    largest = max(d for values in differences.values() for d in values)
    print(f"max |official - ours| volume-wise Dice: {largest:.2e}; empty in both: {empty_both}")


def write_label(path: Path, array: np.ndarray, spacing: float = 2.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def hand_made_cases(tmp_path: Path) -> tuple[Path, Path]:
    """Two 16³ cases in BraTS 2023 labels (ET = 3, datalist ``label_map`` 1/2/3 → 1/2/4) and their predictions in
    BraTS 2018 labels (ET = 4). ``c00001``: two ET lesions, the prediction finds one (the other painted edema) and
    adds a detached edema lesion. ``c00002``: no ET on either side. (datalist, predictions folder)"""
    reference = np.zeros((16, 16, 16), np.uint8)
    reference[2:12, 2:12, 2:12] = 2  # edema
    reference[5:8, 5:8, 5:8] = 1  # necrosis
    reference[3:5, 3:5, 3:5] = 3  # ET lesion A (8 voxels)
    reference[9:11, 9:11, 9:11] = 3  # ET lesion B (8 voxels), apart from A
    prediction = np.where(reference == 3, 4, reference)
    prediction[9:11, 9:11, 9:11] = 2  # lesion B missed
    prediction[13:15, 13:15, 13:15] = 2  # a false-positive whole-tumour lesion
    no_et_reference = np.where(reference == 3, 1, reference)
    no_et_prediction = no_et_reference.copy()
    no_et_prediction[2:4, 2:12, 2:12] = 0  # less edema
    dataset, predictions = tmp_path / "data", tmp_path / "predictions"
    entries = []
    for case_id, ref, pred in (("c00001", reference, prediction), ("c00002", no_et_reference, no_et_prediction)):
        write_label(dataset / f"{case_id}_seg.nii.gz", ref)
        write_label(predictions / f"{case_id}.nii.gz", pred)
        entries.append({"case_id": case_id, "label": f"{case_id}_seg.nii.gz", "fold": 0})
    datalist = tmp_path / "datalist.json"
    label_map = {"orig": [1, 2, 3], "target": [1, 2, 4]}
    datalist.write_text(json.dumps({"dataset_dir": str(dataset), "label_map": label_map, "training": entries}))
    return datalist, predictions


def numpy_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return 2.0 * float((pred & ref).sum()) / float(pred.sum() + ref.sum())


@pytest.mark.slow
def test_hand_made_cases_score_as_computed_by_hand(tmp_path, scorer_venv):
    datalist, predictions = hand_made_cases(tmp_path)
    out = tmp_path / "official.csv"
    score(str(predictions), str(datalist), str(out), fold=0, venv=scorer_venv)
    rows = read_rows(out)
    ref = np.asanyarray(nib.load(str(tmp_path / "data" / "c00001_seg.nii.gz")).dataobj)
    pred = np.asanyarray(nib.load(str(predictions / "c00001.nii.gz")).dataobj)
    ref_regions = {"et": ref == 3, "tc": np.isin(ref, (1, 3)), "wt": ref > 0}  # BraTS 2023 labels
    for region, values in REGION_LABELS.items():
        expected = numpy_dice(np.isin(pred, values), ref_regions[region])
        assert float(rows["c00001"][f"dice_{region}"]) == pytest.approx(expected, abs=1e-9), region
    assert float(rows["c00001"]["dice_et"]) == pytest.approx(2 * 8 / (8 + 16))  # one of two 8-voxel lesions found
    # lesion-wise: lesion A matched exactly (Dice 1, HD95 0 mm), B missed; the mean is over the matched lesion
    a = rows["c00001"]
    assert (int(a["lesion_tp_et"]), int(a["lesion_fp_et"]), int(a["lesion_fn_et"])) == (1, 0, 1)
    assert float(a["lesion_dice_et"]) == 1.0 and float(a["lesion_hd95_et"]) == 0.0
    assert (int(a["lesion_tp_wt"]), int(a["lesion_fp_wt"]), int(a["lesion_fn_wt"])) == (1, 1, 0)
    # no ET on either side: every ET value undefined; WT Dice of the trimmed edema by hand
    b = rows["c00002"]
    assert all(math.isnan(float(b[f"{m}_et"])) for m in ("dice", "lesion_dice", "lesion_hd95"))
    assert float(b["dice_wt"]) == pytest.approx(2 * 800 / (800 + 1000))


def test_bad_inputs_are_named_before_the_scorer_is_needed(tmp_path):
    datalist, predictions = hand_made_cases(tmp_path)
    missing_venv = str(tmp_path / "no-venv")
    with pytest.raises(ScorerMissing, match="tools/brats_eval_env.sh"):
        score(str(predictions), str(datalist), str(tmp_path / "o.csv"), venv=missing_venv)
    stray = write_label(tmp_path / "stray" / "c00009.nii.gz", np.zeros((16, 16, 16)))
    with pytest.raises(OfficialMetricsError, match=r"no labelled case .* \['c00009'\]"):
        score(str(stray.parent), str(datalist), str(tmp_path / "o.csv"), venv=missing_venv)
    with pytest.raises(OfficialMetricsError, match=r"no prediction for \['c00003'\]"):
        three = ["c00001", "c00002", "c00003"]
        score(str(predictions), str(datalist), str(tmp_path / "o.csv"), venv=missing_venv, expected=three)
    write_label(predictions / "c00001.nii.gz", np.zeros((16, 16, 8)))
    with pytest.raises(OfficialMetricsError, match=r"case c00001: prediction shape \(16, 16, 8\)"):
        score(str(predictions), str(datalist), str(tmp_path / "o.csv"), venv=missing_venv)
    write_label(predictions / "c00001.nii.gz", np.full((16, 16, 16), 3))
    with pytest.raises(OfficialMetricsError, match=r"case c00001: prediction .* label values \[3\]"):
        score(str(predictions), str(datalist), str(tmp_path / "o.csv"), venv=missing_venv)
    assert not (tmp_path / "o.csv").exists()


def test_cli_and_experiment_refuse_a_missing_venv_at_once(tmp_path):
    env = dict(os.environ, BRATS_EVAL_VENV=str(tmp_path / "no-venv"), OMP_NUM_THREADS="1")
    result = run_command([sys.executable, "-m", "tools.official_metrics", "experiment", str(tmp_path)], ROOT, env=env,
                         timeout=120, merge_stderr=False)  # fmt: skip
    assert result.returncode == 2 and "build it with tools/brats_eval_env.sh" in result.stderr, result.stderr
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tools.experiment", "kdnet", "--preset", "smoke", "--out", str(out), "--official_metrics"]
    result = run_command(command, ROOT, env=env, timeout=120, merge_stderr=False)
    assert result.returncode == 2 and "build it with tools/brats_eval_env.sh" in result.stderr, result.stderr
    assert not out.exists(), "nothing trained or written before the scorer is found"


def expected_cell(rows: dict[str, dict[str, str]], column: str) -> float:
    """The report's one-fold cell by hand: mean over cases, inf HD95 → 373 mm, undefined (NaN) cases left out."""
    values = [float(r[column]) for r in rows.values()]
    values = [HD95_PENALTY_MM if math.isinf(v) else v for v in values if not math.isnan(v)]
    return statistics.fmean(values)


@pytest.mark.slow
def test_experiment_scoring_and_report_table(scored_experiment, scorer_venv, tmp_path):
    from tools.report import write_report

    out = tmp_path / "experiment"
    shutil.copytree(scored_experiment, out)  # this test makes the CSV stale at the end
    evaluate = out / "fold0" / "teacher" / "evaluate"
    assert official_metrics.score_experiment(str(out), venv=scorer_venv) == [], "an up-to-date CSV is not scored again"
    rows = read_rows(evaluate / CSV_NAME)

    report = write_report(out).read_text()
    section = report.split("## Official BraTS scorer", 1)[1].split("\n## ", 1)[0]
    cells = next(line for line in section.splitlines() if line.startswith("| Teacher")).strip("|").split("|")
    cells = [c.strip() for c in cells]
    for column, region in enumerate(("et", "tc", "wt"), start=1):
        assert cells[column] == f"{expected_cell(rows, f'lesion_dice_{region}'):.3f}", region
        assert cells[column + 3] == f"{expected_cell(rows, f'lesion_hd95_{region}'):.1f}", region
    agreement = json.loads((out / "summary.json").read_text())["official_metrics"]["evaluate"]["volume_dice_agreement"]
    assert agreement["max_abs_difference"] <= TOLERANCE and agreement["compared"] + agreement["empty_both"] == 3 * len(rows)

    # the evaluation redone after the scoring: its official CSV is stale and no longer reported
    os.utime(evaluate / "summary.json")
    assert official_metrics.read_official(evaluate) is None
    assert "## Official BraTS scorer" not in write_report(out).read_text()
