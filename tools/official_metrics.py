"""The BraTS challenge's own scorer (BraTS-evaluation 0.0.10, built on panoptica) on the saved label maps.

    python -m tools.official_metrics score --predictions runs/quick/fold0/student/evaluate/predictions \\
        --datalist runs/quick/datalist.json --fold 0 --out student_fold0_official.csv
    python -m tools.official_metrics experiment runs/quick      # every evaluation of an experiment folder

BraTS-evaluation is AGPL-3.0, so it is an optional extra: it lives in its own virtual environment
(``tools/brats_eval_env.sh`` builds ``.venv-brats-eval``; ``BRATS_EVAL_VENV`` points elsewhere) and is
only ever run as a command, in a subprocess of that venv: neither this module nor ``brats_kd`` nor the
bundles import it.

What is scored: the label maps an evaluation saved (``<evaluate>/predictions/<case_id>.nii.gz``, BraTS
2018 labels 0/1/2/4) against the reference labels of the datalist. The scorer's bundled glioma config
(``gli``) follows the BraTS 2023+ convention (ET = 3; label 4 is the 2024 resection cavity), so both are
copied into a temporary folder with ET 4 → 3 (the reference after the datalist's own ``label_map`` to
BraTS 1/2/4); the saved files are never rewritten. The copies are named ``00000.nii.gz``, ... because
``brats-evaluate`` pairs files by a 5-digit subject id in their names; the CSV maps them back to case ids.

Per case and region (ET = 3, TC = 1 + 3, WT = 1 + 2 + 3), from ``brats-parse-metrics seg``:

- ``dice_<r>``: volume-wise Dice (panoptica's ``global_bin_dsc``); NaN when reference and prediction are
  both empty (this project's evaluation counts that case as Dice 1);
- ``lesion_dice_<r>``: the package's ``lesionwise_dsc_mean`` (panoptica's ``sq_dsc``): lesions are the
  connected components, matched one to one by maximal Dice (any overlap); the mean Dice over the matched
  pairs, 0 when no lesion is matched, NaN when neither side has a lesion;
- ``lesion_hd95_<r>``: ``lesionwise_hd95_mean`` in mm (voxel spacing of the files): the mean HD95 over the
  matched pairs, ``inf`` when no lesion is matched, NaN when neither side has a lesion;
- ``lesion_tp_<r>``, ``lesion_fp_<r>``, ``lesion_fn_<r>``: matched, unmatched predicted and unmatched
  reference lesions.

The CSV keeps the package's values as they are. :func:`read_official` (the report) averages them with one
rule of the package's own: an infinite HD95 counts as 373 mm (``metrics_parser``'s penalty, "diameter of
the cube in SRI space"); NaN cases are left out. The package's global (volume-wise) HD95 is not used: in
panoptica 2.1.7 it is computed without the voxel spacing, in voxels, not mm.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

from brats_kd.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
VENV_VARIABLE = "BRATS_EVAL_VENV"
DEFAULT_VENV = ROOT / ".venv-brats-eval"
#: the package's bundled glioma config: et = [3], tc = [1, 3], wt = [1, 2, 3]
CONFIG = "gli"
REGIONS = ("et", "tc", "wt")
BRATS_2018_LABELS = (0, 1, 2, 4)
#: BraTS 2018-2021 enhancing tumour (4) → BraTS 2023+ (3); necrosis (1) and edema (2) are the same in both
ET_2018, ET_2023 = 4, 3
#: the package's penalty for an infinite HD95 (brats_evaluation.metrics_parser): the diameter of the SRI-24 cube
HD95_PENALTY_MM = 373.0
#: (our column, the parsed CSV's column) per region
PARSED_COLUMNS = (
    ("dice", "global_dsc"),
    ("lesion_dice", "lesionwise_dsc_mean"),
    ("lesion_hd95", "lesionwise_hd95_mean"),
    ("lesion_tp", "all_instance_tp"),
    ("lesion_fp", "all_instance_fp"),
    ("lesion_fn", "all_instance_fn"),
)
COLUMNS = ("case_id", *(f"{ours}_{r}" for ours, _ in PARSED_COLUMNS for r in REGIONS))
CSV_NAME = "official_metrics.csv"
GEOMETRY_ATOL = 1e-4
SCORER_TIMEOUT_S = 3600


class ScorerMissing(FileNotFoundError):
    """The BraTS-evaluation venv is not there; the message says how to build it."""


class OfficialMetricsError(ValueError):
    """Bad input (missing file, unmatched case, other geometry, unknown label value), named in the message."""


class ScorerFailed(RuntimeError):
    """The scorer exited with an error or skipped a case; the message holds its output."""


def scorer_python(venv: str | os.PathLike | None = None) -> Path:
    """The venv's Python (``venv``, else ``$BRATS_EVAL_VENV``, else ``.venv-brats-eval``), or :class:`ScorerMissing`."""
    folder = Path(venv or os.environ.get(VENV_VARIABLE) or DEFAULT_VENV)
    python = folder / "bin" / "python"
    if not python.is_file():
        raise ScorerMissing(
            f"the BraTS-evaluation venv is missing (looked for {python}): build it with tools/brats_eval_env.sh "
            f"(or set {VENV_VARIABLE} to a venv with requirements-brats-eval.txt installed)"
        )
    return python


def labeled_cases(datalist: str | os.PathLike) -> dict[str, tuple[Path, dict]]:
    """``{case_id: (reference label path, label_map)}`` of the datalist's ``training`` entries with a label map
    (entries whose label is ``probabilities``, i.e. soft pseudo labels, have no reference to score against)."""
    path = Path(datalist)
    if not path.is_file():
        raise OfficialMetricsError(f"datalist {path} does not exist")
    content = json.loads(path.read_text())
    dataset_dir = content.get("dataset_dir", "")
    default_map = content.get("label_map", {"orig": [1, 2, 4], "target": [1, 2, 4]})
    cases = {}
    for entry in content.get("training", []):
        if "label" in entry and entry.get("label_format", "labels") == "labels":
            cases[entry["case_id"]] = (Path(dataset_dir) / entry["label"], entry.get("label_map", default_map))
    return cases


def to_scorer_labels(array: np.ndarray, label_map: Mapping | None, what: str) -> np.ndarray:
    """``array`` (the dataset's values, mapped by ``label_map`` ``orig`` → ``target`` to BraTS 1/2/4; identity when
    ``None``) as uint8 with the scorer's ET 3. Other values than 0/1/2/4 after the mapping are an error naming ``what``."""
    labels = np.asarray(array)
    if labels.ndim > 3:
        if any(n != 1 for n in labels.shape[3:]):
            raise OfficialMetricsError(f"{what}: expected a 3-D label map, got shape {labels.shape}")
        labels = labels.reshape(labels.shape[:3])
    mapped = labels.copy()
    if label_map is not None:
        for orig, target in zip(label_map["orig"], label_map["target"], strict=True):
            mapped[labels == orig] = target
    unknown = sorted(set(np.unique(mapped).tolist()) - set(BRATS_2018_LABELS))
    if unknown:
        raise OfficialMetricsError(f"{what}: label values {unknown} are not BraTS 0/1/2/4 (after the datalist's label_map)")
    out = mapped.astype(np.uint8)
    out[mapped == ET_2018] = ET_2023
    return out


def stage_case(case_id: str, prediction: Path, reference: Path, label_map: Mapping, name: str, folder: Path) -> None:
    """Write ``folder/pred/<name>`` and ``folder/ref/<name>``: the two label maps in the scorer's labels, on the
    reference's grid (checked to be the prediction's too)."""
    if not reference.is_file():
        raise OfficialMetricsError(f"case {case_id}: reference label {reference} does not exist")
    pred_image, ref_image = nib.load(str(prediction)), nib.load(str(reference))
    if pred_image.shape[:3] != ref_image.shape[:3]:
        raise OfficialMetricsError(
            f"case {case_id}: prediction shape {pred_image.shape} differs from the reference's {ref_image.shape}"
        )
    if not np.allclose(pred_image.affine, ref_image.affine, atol=GEOMETRY_ATOL):
        raise OfficialMetricsError(
            f"case {case_id}: prediction affine differs from the reference's\n{pred_image.affine}\n{ref_image.affine}"
        )
    pred = to_scorer_labels(np.asanyarray(pred_image.dataobj), None, f"case {case_id}: prediction {prediction}")
    ref = to_scorer_labels(np.asanyarray(ref_image.dataobj), label_map, f"case {case_id}: reference {reference}")
    for sub, array in (("pred", pred), ("ref", ref)):
        nib.save(nib.Nifti1Image(array, ref_image.affine), str(folder / sub / name))


def pair_cases(
    predictions: Path, datalist: str | os.PathLike, expected: Sequence[str] | None
) -> list[tuple[str, Path, Path, dict]]:
    """``(case_id, prediction, reference, label_map)`` for every ``<case_id>.nii.gz`` in ``predictions``; every
    prediction must name a labelled datalist case, and every case of ``expected`` must have a prediction."""
    if not predictions.is_dir():
        raise OfficialMetricsError(f"predictions folder {predictions} does not exist")
    files = {p.name[: -len(".nii.gz")]: p for p in sorted(predictions.glob("*.nii.gz")) if not p.name.startswith(".")}
    if not files:
        raise OfficialMetricsError(f"no label map (<case_id>.nii.gz) in {predictions}")
    cases = labeled_cases(datalist)
    unknown = sorted(set(files) - set(cases))
    if unknown:
        raise OfficialMetricsError(f"{predictions}: no labelled case in {datalist} for the predictions {unknown}")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
        if missing or extra:
            raise OfficialMetricsError(
                f"{predictions}: the predictions do not match the evaluated cases "
                f"(no prediction for {missing}; not evaluated: {extra})"
            )
    return [(case_id, path, *cases[case_id]) for case_id, path in files.items()]


def run_scorer(python: Path, folder: Path, names: Mapping[str, str]) -> Path:
    """``brats-evaluate --config gli`` on ``folder/ref`` vs ``folder/pred``, then ``brats-parse-metrics seg``; the
    parsed CSV. A case the scorer skipped or failed on is an error naming its case id (``names``: file → case id)."""
    summary, parsed = folder / "panoptica.json", folder / "parsed.csv"
    commands = [
        [str(python), "-m", "brats_evaluation.evaluation", "--config", CONFIG, "--ref_path", str(folder / "ref"),
         "--pred_path", str(folder / "pred"), "--summary_json", str(summary)],
        [str(python), "-m", "brats_evaluation.metrics_parser", "seg", "--json_path", str(summary),
         "--output_csv_path", str(parsed)],
    ]  # fmt: skip
    # one numerical thread per scorer: evaluations are scored side by side on the experiment's cores
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for command, output in zip(commands, (summary, parsed), strict=True):
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=SCORER_TIMEOUT_S)
        if result.returncode != 0 or not output.is_file():
            log = (result.stdout + result.stderr)[-4000:]
            raise ScorerFailed(f"{' '.join(command[2:4])} failed (exit {result.returncode}, no {output.name}):\n{log}")
        if output == summary:
            content = json.loads(summary.read_text())
            failed = {names.get(m["subject_name"], m["subject_name"]): m["error"] for m in content["metrics"] if "error" in m}
            skipped = [names.get(m, m) for m in content.get("missings", [])]
            if failed or skipped:
                raise ScorerFailed(f"the scorer failed on {failed} and skipped {skipped}:\n{result.stdout[-4000:]}")
    return parsed


def read_parsed(parsed: Path, names: Mapping[str, str]) -> list[dict[str, float | str]]:
    """Rows of :data:`COLUMNS` from ``brats-parse-metrics seg``'s CSV (its mean/std/median rows dropped)."""
    with parsed.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["subject_id"] in names]
    if sorted(row["subject_id"] for row in rows) != sorted(names):
        raise ScorerFailed(f"{parsed}: expected one row per case {sorted(names)}")
    out = []
    for row in sorted(rows, key=lambda r: names[r["subject_id"]]):
        values: dict[str, float | str] = {"case_id": names[row["subject_id"]]}
        for ours, theirs in PARSED_COLUMNS:
            for region in REGIONS:
                cell = row.get(f"{theirs}_{region}", "")
                value = float(cell) if cell != "" else math.nan
                # lesion counts as whole numbers (pandas wrote them as floats)
                is_count = ours in ("lesion_tp", "lesion_fp", "lesion_fn") and math.isfinite(value)
                values[f"{ours}_{region}"] = int(value) if is_count else value
        out.append(values)
    return out


def score(
    predictions: str,
    datalist: str,
    out: str,
    fold: int | None = None,
    venv: str | None = None,
    expected: Sequence[str] | None = None,
) -> str:
    """Score the label maps in ``predictions`` with the official scorer; write one row per case to ``out`` (CSV).

    Args:
        predictions: folder of ``<case_id>.nii.gz`` BraTS label maps (0/1/2/4), e.g. ``<evaluate>/predictions``.
        datalist: the ``tools.prepare`` datalist holding the cases' reference labels (and their ``label_map``).
        out: the CSV to write (columns: case_id, then dice / lesion_dice / lesion_hd95 / lesion_tp / lesion_fp /
            lesion_fn per region et, tc, wt).
        fold: if given, every test case of this fold must have a prediction.
        venv: the BraTS-evaluation venv (default ``$BRATS_EVAL_VENV``, else ``.venv-brats-eval``).
        expected: (from Python) the case ids that must have a prediction; overrides ``fold``.
    """
    if expected is None and fold is not None:
        expected = [e["case_id"] for e in json.loads(Path(datalist).read_text())["training"] if e.get("fold") == int(fold)]
    pairs = pair_cases(Path(predictions), datalist, expected)
    with tempfile.TemporaryDirectory(prefix="official_metrics_") as tmp:
        folder = Path(tmp)
        (folder / "ref").mkdir()
        (folder / "pred").mkdir()
        names = {}
        for index, (case_id, prediction, reference, label_map) in enumerate(pairs):
            name = f"{index:05d}.nii.gz"  # brats-evaluate pairs files by a 5-digit subject id in the name
            stage_case(case_id, prediction, reference, label_map, name, folder)
            names[name] = case_id
        # every input checked (above) before the scorer is looked for
        rows = read_parsed(run_scorer(scorer_python(venv), folder, names), names)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out, buffer.getvalue())
    return str(out)


def evaluation_folders(out: Path) -> list[Path]:
    """Every evaluation of an experiment folder that saved label maps: ``[seed<s>/]fold<k>/<model>/evaluate*``."""
    found = list(out.glob("fold*/*/evaluate*/predictions")) + list(out.glob("seed*/fold*/*/evaluate*/predictions"))
    return sorted(p.parent for p in found if (p.parent / "summary.json").is_file())


def evaluated_cases(evaluate_dir: Path) -> list[str]:
    """The case ids the evaluation scored (first column of its ``dice_tc_raw.csv``, MetricsSaver's per-case file)."""
    with (evaluate_dir / "dice_tc_raw.csv").open(newline="") as f:
        return [row[0] for row in list(csv.reader(f))[1:] if row]


def is_fresh(evaluate_dir: Path) -> bool:
    """The official CSV exists and was written after the evaluation's ``summary.json`` (else: stale or absent)."""
    official = evaluate_dir / CSV_NAME
    return official.is_file() and official.stat().st_mtime >= (evaluate_dir / "summary.json").stat().st_mtime


def score_evaluation(evaluate_dir: Path, venv: str | None = None) -> Path:
    """:func:`score` of one evaluation folder into ``<evaluate>/official_metrics.csv`` (datalist from its overrides)."""
    overrides = json.loads((evaluate_dir / "overrides.json").read_text())
    score(str(evaluate_dir / "predictions"), overrides["datalist"], str(evaluate_dir / CSV_NAME), venv=venv,
          expected=evaluated_cases(evaluate_dir))  # fmt: skip
    return evaluate_dir / CSV_NAME


def score_experiment(out: str, jobs: int | None = None, venv: str | None = None) -> list[str]:
    """Score every evaluation of the experiment folder ``out`` that has no up-to-date official CSV yet,
    ``jobs`` scorers side by side (default: 2 where there are 2 cores or more)."""
    scorer_python(venv)  # before anything: a clear error without the venv
    folders = [f for f in evaluation_folders(Path(out)) if not is_fresh(f)]
    workers = max(1, int(jobs) if jobs else min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        written = list(pool.map(lambda folder: score_evaluation(folder, venv), folders))
    return [str(p) for p in written]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_official(evaluate_dir: Path) -> dict[str, dict[str, float]] | None:
    """``{case_id: {metric: value}}`` of an evaluation's up-to-date official CSV, in the report's metric names:
    ``dice_<r>``/``hd95_<r>`` are the lesion-wise Dice and HD95 (an infinite HD95 counted as 373 mm, the package's
    penalty; NaN kept, so means leave it out), ``volume_dice_<r>`` the volume-wise Dice. ``None`` if absent or stale."""
    if not is_fresh(evaluate_dir):
        return None
    cases = {}
    for row in read_csv_rows(evaluate_dir / CSV_NAME):
        values = {}
        for region in REGIONS:
            hd95 = float(row[f"lesion_hd95_{region}"])
            values[f"dice_{region}"] = float(row[f"lesion_dice_{region}"])
            values[f"hd95_{region}"] = HD95_PENALTY_MM if math.isinf(hd95) else hd95
            values[f"volume_dice_{region}"] = float(row[f"dice_{region}"])
        cases[row["case_id"]] = values
    return cases


def collect_official(out: str | os.PathLike, evaluation: str = "evaluate") -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{model: {run: {case_id: metric: value}}}`` (:func:`read_official`) of every ``<model>/<evaluation>`` of the
    experiment folder ``out`` with an up-to-date official CSV; a run is ``fold<k>`` or ``seed<s>/fold<k>``."""
    root = Path(out)
    results: dict[str, dict[str, dict]] = {}
    for evaluate_dir in sorted(list(root.glob(f"fold*/*/{evaluation}")) + list(root.glob(f"seed*/fold*/*/{evaluation}"))):
        cases = read_official(evaluate_dir) if (evaluate_dir / "summary.json").is_file() else None
        if cases is not None:
            run = evaluate_dir.parent.parent.relative_to(root).as_posix()
            results.setdefault(evaluate_dir.parent.name, {})[run] = cases
    return results


def experiment_agreement(out: str | os.PathLike, evaluation: str = "evaluate") -> dict[str, float | int]:
    """:func:`volume_dice_agreement` pooled over every ``<model>/<evaluation>`` of ``out`` with an up-to-date CSV."""
    root = Path(out)
    parts = [
        volume_dice_agreement(d)
        for d in sorted(list(root.glob(f"fold*/*/{evaluation}")) + list(root.glob(f"seed*/fold*/*/{evaluation}")))
        if (d / "summary.json").is_file() and is_fresh(d)
    ]
    differences = [p["max_abs_difference"] for p in parts if p["compared"]]
    return {
        "max_abs_difference": max(differences, default=math.nan),
        "compared": sum(p["compared"] for p in parts),
        "empty_both": sum(p["empty_both"] for p in parts),
    }


def volume_dice_agreement(evaluate_dir: Path) -> dict[str, float | int]:
    """The official volume-wise Dice against the evaluation's own (``dice_<r>_raw.csv``), per case and region:
    ``max_abs_difference`` over the ``compared`` pairs where the official value is defined, and ``empty_both``: the
    pairs where it is NaN (reference and prediction both empty; the evaluation counts those as 1)."""
    official = {row["case_id"]: row for row in read_csv_rows(evaluate_dir / CSV_NAME)}
    differences, empty_both = [], 0
    for region in REGIONS:
        with (evaluate_dir / f"dice_{region}_raw.csv").open(newline="") as f:
            ours = {row[0]: float(row[1]) for row in list(csv.reader(f))[1:] if row}
        for case_id, value in ours.items():
            theirs = float(official[case_id][f"dice_{region}"])
            if math.isnan(theirs):
                empty_both += 1
            else:
                differences.append(abs(theirs - value))
    return {"max_abs_difference": max(differences, default=math.nan), "compared": len(differences), "empty_both": empty_both}


def main() -> None:
    try:
        fire.Fire({"score": score, "experiment": score_experiment}, name="python -m tools.official_metrics")
    except (ScorerMissing, OfficialMetricsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ScorerFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
