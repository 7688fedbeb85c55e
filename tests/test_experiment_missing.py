"""``python -m tools.experiment missing``: one teacher per fold, a baseline and a KD student per modality subset.

End to end on the ``smoke`` preset, fold 0, subsets FLAIR and T1 + T2 (a file of its own so that pytest-xdist can
run it beside the other end-to-end runs); the planning of ``--subsets all`` and the argument checks without training.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shlex
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tests.experiment_runs import run_experiment

SUBSETS = "flair t1,t2"
#: the rows expected, in the report's order (subsets by size first): (summary key, row label)
ROWS = (("flair", "FLAIR"), ("t1+t2", "T1 + T2"))
REGIONS = ("et", "tc", "wt")
HEADING = "## Missing modalities"


@pytest.fixture(scope="module")
def missing_smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("missing") / "run"
    result = run_experiment("missing", "--data", "synthetic", "--preset", "smoke", "--run_folds", "0",
                            "--subsets", SUBSETS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def section_rows(report: str, heading: str) -> list[list[str]]:
    """Body rows (cells) of the markdown table under ``heading``."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return rows[1:] if rows else []


def cell(stats: dict) -> str:
    """A Dice cell as the other tables write it: mean ± std over folds, the mean alone for one fold."""
    return f"{stats['mean']:.3f}" if stats["std"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def per_case_pairs(out: Path, student: str, baseline: str, region: str) -> list[tuple[float, float]]:
    """(student, baseline) Dice of ``region`` for every (fold, case) in per_case.csv."""
    with (out / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    values = {(r["model"], r["fold"], r["case_id"]): float(r[f"dice_{region}"]) for r in rows}
    keys = sorted({(fold, case) for model, fold, case in values if model == student})
    return [(values[(student, *k)], values[(baseline, *k)]) for k in keys if (baseline, *k) in values]


def wilcoxon_p(pairs: list[tuple[float, float]]) -> float:
    from scipy.stats import wilcoxon

    differences = [s - b for s, b in pairs]
    return 1.0 if not any(differences) else float(wilcoxon(differences).pvalue)


@pytest.mark.slow
def test_table_has_one_row_per_requested_subset_from_the_models_trained(missing_smoke):
    """One row per subset, in ALL_SUBSETS order; the folders are the readable names, each trained on its subset
    (the baseline's ``modalities``, the student's ``student_modalities``) from the fold's 4-modality teacher."""
    report = (missing_smoke / "report.md").read_text()
    rows = section_rows(report, HEADING)
    assert [r[0] for r in rows] == [label for _, label in ROWS]
    fold = missing_smoke / "fold0"
    assert sorted(p.name for p in fold.iterdir() if p.is_dir()) == [
        "baseline_flair", "baseline_t1+t2", "student_flair", "student_t1+t2", "teacher"]  # fmt: skip
    for key, _ in ROWS:
        modalities = key.split("+")
        baseline = json.loads((fold / f"baseline_{key}" / "train" / "config.json").read_text())
        student = json.loads((fold / f"student_{key}" / "train" / "config.json").read_text())
        assert baseline["modalities"] == modalities and student["student_modalities"] == modalities, key
        assert Path(student["teacher_ckpt"]) == fold / "teacher" / "models" / "model.pt"
    teacher = json.loads((fold / "teacher" / "train" / "config.json").read_text())
    assert teacher["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert "variant `flair`" not in report, "the subsets' students are not Table 1 method variants"


@pytest.mark.slow
def test_every_cell_is_its_summary_value(missing_smoke):
    """Each cell of the table equals its summary.json value, and each summary value is the aggregate of its own model
    (baseline_<s>, student_<s>) and region, the p-value a Wilcoxon test over per_case.csv: a swapped column fails."""
    summary = json.loads((missing_smoke / "summary.json").read_text())
    aggregate, missing = summary["aggregate"], summary["missing_modalities"]
    rows = section_rows((missing_smoke / "report.md").read_text(), HEADING)
    assert [r["subset"] for r in missing["rows"]] == [key for key, _ in ROWS]
    differ = False
    for (key, label), cells, row in zip(ROWS, rows, missing["rows"]):
        assert cells[0] == row["label"] == label
        for i, region in enumerate(REGIONS):
            baseline, student = aggregate[f"baseline_{key}"][f"dice_{region}"], aggregate[f"student_{key}"][f"dice_{region}"]
            assert row["baseline"][region] == baseline and row["student"][region] == student, (key, region)
            assert cells[1 + i] == cell(baseline), (key, region, "baseline")
            assert cells[4 + i] == cell(student), (key, region, "student")
            assert row["difference"][region] == pytest.approx(student["mean"] - baseline["mean"], abs=1e-12)
            assert cells[7 + i] == f"{student['mean'] - baseline['mean']:+.3f}", (key, region, "difference")
            pairs = per_case_pairs(missing_smoke, f"student_{key}", f"baseline_{key}", region)
            test = row["paired_test"][region]
            assert test["cases"] == len(pairs) > 0
            assert test["p_value"] == pytest.approx(wilcoxon_p(pairs), rel=1e-9)
            assert cells[10 + i] == f"{test['p_value']:.3g}", (key, region, "p")
            differ |= cells[1 + i] != cells[4 + i]
        assert cells[13] == "1", "the Folds column (fold 0 only)"
        assert cells[14] == str(row["paired_test"]["et"]["cases"]), "the Cases column"
    assert differ, "baseline and student cells are all equal: a baseline/student swap would go unseen"


@pytest.mark.slow
def test_heat_map_is_a_png_of_its_rows_linked_from_the_report(missing_smoke):
    """missing_modalities_heatmap.png: a PNG of 6.5 in × (1.4 + 0.42 × rows) in at 110 dpi, not blank, linked."""
    path = missing_smoke / "missing_modalities_heatmap.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[:2] == (round((1.4 + 0.42 * len(ROWS)) * 110), round(6.5 * 110)), image.shape
    assert image[..., :3].std() > 0.05, "blank heat map"
    section = (missing_smoke / "report.md").read_text().split(HEADING, 1)[1].split("\n## ", 1)[0]
    assert "](missing_modalities_heatmap.png)" in section


@pytest.mark.slow
def test_rerun_skips_finished_stages(missing_smoke):
    """Resumable like kdnet: the same command again trains nothing (one command line in every stage's log)."""
    before = {p: p.stat().st_mtime_ns for p in missing_smoke.glob("fold0/*/models/checkpoint.pt")}
    assert len(before) == 5
    result = run_experiment("missing", "--data", "synthetic", "--preset", "smoke", "--run_folds", "0",
                            "--subsets", SUBSETS, "--out", str(missing_smoke))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    for log in missing_smoke.glob("fold0/*/*/log.txt"):
        assert log.read_text().count("$ ") == 1, f"{log} was run again"


def test_all_plans_the_15_subsets_with_a_baseline_and_a_student_each():
    """``--subsets all``: the teacher, then for each of the 15 non-empty subsets of the 4 modalities a baseline and a
    student of that teacher, under folder names of letters, digits, ``_`` and ``+``; the stages form a valid schedule
    and every override is a key of its bundle's configs."""
    from tools.experiment import check_dependencies, kd_stages, plan_missing
    from tools.missing import subset_of_model
    from tools.presets import get_preset
    from tools.stages import check_overrides

    models = plan_missing("all")
    assert models[0].name == "teacher" and len(models) == 31
    modalities = ("t1", "t1ce", "t2", "flair")
    expected = {frozenset(c) for size in range(1, 5) for c in itertools.combinations(modalities, size)}
    baselines = [m for m in models if m.name.startswith("baseline_")]
    students = [m for m in models if m.name.startswith("student_")]
    assert len(baselines) == len(students) == 15
    assert {frozenset(m.overrides["modalities"]) for m in baselines} == expected
    assert {frozenset(m.overrides["student_modalities"]) for m in students} == expected
    assert all(m.bundle == "teacher" and m.teacher is None for m in baselines)
    assert all(m.bundle == "kd_student" and m.teacher == "teacher" for m in students)
    for model in baselines + students:
        assert re.fullmatch(r"(baseline|student)_[a-z0-9]+(\+[a-z0-9]+)*", model.name), model.name
        subset = subset_of_model(model.name)
        assert list(subset) == model.overrides.get("modalities", model.overrides.get("student_modalities"))
    assert [m.name for m in models[1:3]] == ["baseline_t1", "student_t1"] and models[-1].name == "student_t1+t1ce+t2+flair"
    stages = kd_stages(models, Path("/nonexistent"), [0], Path("/nonexistent/datalist.json"), get_preset("smoke"), 0)
    check_dependencies(stages)
    assert len(stages) == 62
    for stage in (s for s in stages if "t1+t2+flair" in s.name):
        check_overrides(stage)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("subsets", "message"),
    [
        ("t1,t3", "unknown modality 't3'"),
        ("flair t1,t1", "'t1' listed more than once in subset 't1,t1'"),
        ("t1,,t2", "empty modality name in subset 't1,,t2'"),
        ("t1,t2 t2,t1", "subset t1+t2 requested more than once"),
    ],
)
def test_a_bad_subset_fails_cleanly_with_nothing_written(tmp_path, subsets, message):
    out = tmp_path / "run"
    result = run_experiment("missing", "--data", "synthetic", "--preset", "smoke", "--subsets", subsets, "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists(), "nothing may be written for a bad --subsets"


def test_parse_subsets_reads_the_cli_forms():
    """Quoted list, Fire's tuple for an unquoted ``t1,t2``, and the channel order of the teacher inside a subset."""
    from tools.missing import parse_subsets

    assert parse_subsets("flair t1,t2") == [("flair",), ("t1", "t2")]
    assert parse_subsets(("t2", "t1")) == [("t1", "t2")]
    assert parse_subsets("flair,t1ce") == [("t1ce", "flair")]
    assert len(parse_subsets("all")) == 15 and math.comb(4, 2) == sum(len(s) == 2 for s in parse_subsets("all"))


def test_activation_and_subsets_reach_every_stage_and_experiment_json(tmp_path, monkeypatch):
    """``--activation softmax`` is passed to the teacher, every baseline and every student (a student refuses a
    teacher of the other head); experiment.json records the subsets as parsed. No training: stages are captured."""
    import tools.experiment as experiment
    import tools.report

    captured = []
    monkeypatch.setattr(experiment, "prepare_data", lambda *args, **kwargs: tmp_path / "datalist.json")
    monkeypatch.setattr(experiment, "run_stages", lambda stages, *args, **kwargs: captured.extend(stages))
    monkeypatch.setattr(tools.report, "write_report", lambda root: Path(root) / "report.md")
    argv = ["tools/experiment.py", "missing", "--subsets", "t2,t1 flair", "--activation", "softmax"]
    monkeypatch.setattr(sys, "argv", argv)
    experiment.missing(out=str(tmp_path / "run"), preset="smoke", subsets="t2,t1 flair", activation="softmax", run_folds=0)
    assert [s.name for s in captured if s.kind == "train"] == [
        "fold0/teacher/train", "fold0/baseline_t1+t2/train", "fold0/student_t1+t2/train",
        "fold0/baseline_flair/train", "fold0/student_flair/train"]  # fmt: skip
    assert all(stage.overrides["activation"] == "softmax" for stage in captured)
    record = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert record["options"]["subsets"] == ["t1+t2", "flair"] and record["options"]["activation"] == "softmax"
    # the recorded command reruns as typed: the space inside the --subsets value stays quoted
    assert shlex.split(record["command"])[3:] == argv[1:]
    with pytest.raises(ValueError, match="--activation"):
        experiment.missing(out=str(tmp_path / "bad"), preset="smoke", subsets="flair", activation="relu")
    assert not (tmp_path / "bad").exists()
