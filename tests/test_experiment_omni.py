"""The experiment runner's omni experiment (Lachinov et al.): end to end on the `smoke` preset (fold 0 of 2), and
the report's pooling of folds and of data seeds on hand-made evaluation folders (mean ± std over the runs).

The report must give each model's mean ± std over the runs and the paired Wilcoxon p-values of the
distilled student against the manual-only student and the ensemble; both are checked against
``summary.json`` and the p-values again against scipy on the per-case Dice of ``per_case.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from tests.experiment_runs import run_experiment, table_rows
from tools.presets import PRESETS

OMNI_ROWS = {
    "member_unet": "UNet (No New-Net)",
    "member_resunet": "Res UNet",
    "member_cascade": "Cascaded UNet",
    "ensemble": "Ensemble (mean of 3)",
    "manual_student": "Res UNet, manual labels only",
    "omni_student": "Distilled (manual + pseudo labels)",
}
REGIONS = ("et", "tc", "wt")  # the tables' column order
PAIRED_HEADING = "## Paired tests: distilled student vs manual labels only and vs the ensemble"


def parse_cell(cell: str) -> tuple[float, float | None]:
    mean, _, std = cell.partition(" ± ")
    return float(mean), (float(std) if std else None)


def assert_table_matches_summary(report: str, summary: dict, runs: int) -> None:
    """Every Dice and HD95 cell of the Lachinov table is its model's summary.json mean ± std, with the run count."""
    rows = table_rows(report, "## Lachinov et al.")
    assert set(rows) == set(OMNI_ROWS.values())
    for model, label in OMNI_ROWS.items():
        cells = rows[label]
        assert cells[6] == str(runs), (label, cells)
        for column, (metric, digits) in enumerate([(f"dice_{r}", 3) for r in REGIONS] + [(f"hd95_{r}", 1) for r in REGIONS]):
            stats = summary["aggregate"][model][metric]
            mean, std = parse_cell(cells[column])
            if runs == 1:  # one run has no spread: the cell is the mean alone
                assert std is None and stats["std"] is None, (label, metric, cells[column])
                assert mean == round(stats["mean"], digits), (label, metric, cells[column], stats)
                assert stats["folds"] == runs
                continue
            assert std is not None, f"{label} {metric}: {runs} runs but no spread in {cells[column]!r}"
            expected = (round(stats["mean"], digits), round(stats["std"], digits))
            assert (mean, std) == expected, (label, metric, cells[column], stats)
            assert stats["folds"] == runs


def assert_paired_tests_match_summary(report: str, summary: dict, per_case: dict, cases: int) -> None:
    """Both comparisons × 3 regions in the report, equal to summary.json, and to scipy on the per-case Dice."""
    tests = {(t["model"], t["reference"], t["region"]): t for t in summary["paired_tests"]}
    section = report.split(PAIRED_HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "−" in line]
    seen = set()
    for line in lines:
        comparison, region, n, difference, p = [c.strip() for c in line.strip("|").split("|")]
        model, reference = comparison.split(" − ")
        record = tests[(model, reference, region.lower())]
        assert int(n) == record["cases"] == cases
        assert float(difference) == round(record["mean_difference"], 3)
        assert p == f"{record['p_value']:.3g}"
        # independently: scipy's two-sided Wilcoxon on the paired per-case Dice of per_case.csv
        pairs = [(per_case[model][k], per_case[reference][k]) for k in sorted(per_case[model]) if k in per_case[reference]]
        values = [(x[f"dice_{region.lower()}"], y[f"dice_{region.lower()}"]) for x, y in pairs]
        assert len(values) == cases
        differences = [x - y for x, y in values]
        expected = 1.0 if not any(differences) else float(wilcoxon(differences).pvalue)
        assert math.isclose(record["p_value"], expected, rel_tol=1e-9), (model, reference, region)
        assert math.isclose(record["mean_difference"], statistics.fmean(differences), rel_tol=1e-9, abs_tol=1e-12)
        seen.add((model, reference, region.lower()))
    comparisons = (("omni_student", "manual_student"), ("omni_student", "ensemble"))
    assert seen == {(m, r, region) for m, r in comparisons for region in REGIONS}


def read_per_case(path: Path) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
    """per_case.csv as ``{model: {(fold, case_id): {metric: value}}}``."""
    table: dict[str, dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            metrics = {k: float(v) for k, v in row.items() if k.startswith(("dice_", "hd95_")) and v != ""}
            table.setdefault(row["model"], {})[(row["fold"], row["case_id"])] = metrics
    return table


@pytest.mark.slow
def test_omni_smoke_fold0_reports_every_model_and_paired_tests(tmp_path):
    """The whole protocol on fold 0 (members, ensemble, pseudo-labels, both students): every cell is its summary.json
    value and the paired tests are scipy's on per_case.csv. (The spread over runs is checked on hand-made folders
    below: a second fold would double this, the suite's longest run.)"""
    out = tmp_path / "omni"
    result = run_experiment("omni", "--data", "synthetic", "--preset", "smoke", "--out", str(out), "--run_folds", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    datalist = json.loads((out / "datalist.json").read_text())
    assert_table_matches_summary(report, summary, runs=1)
    # the header states the settings of the networks this experiment trains: the patch bundles'
    assert f"- patch-bundle settings (omni): `{json.dumps(PRESETS['smoke'].patch_bundle)}`" in report
    test_cases = sum(1 for case in datalist["training"] if case["fold"] == 0)
    assert_paired_tests_match_summary(report, summary, read_per_case(out / "per_case.csv"), cases=test_cases)
    combined = json.loads((out / "fold0" / "pseudo_labels" / "datalist.json").read_text())
    sources = [c["source"] for c in combined["training"]]
    assert sources.count("manual") == len(datalist["training"])
    assert sources.count("pseudo") + len(combined.get("dropped", [])) == len(datalist["unlabeled"]) > 0
    assert combined["pseudo_label"]["tta"] is True  # the submission's 4 flips, the pseudo-labeller's default


# ------------------------------------------------------------------------------------------ data seeds


def write_evaluation(folder: Path, cases: dict[str, dict[str, float]]) -> None:
    """A bundle evaluation folder as MetricsSaver and write_metric_summary leave it (per-metric raw CSVs, summary.json)."""
    folder.mkdir(parents=True)
    for metric in [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]:
        lines = ["filename,class0,mean"] + [f"{cid},{m[metric]},{m[metric]}" for cid, m in cases.items()]
        (folder / f"{metric}_raw.csv").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text("{}")


@pytest.mark.parametrize("layout", ["seed{run}/fold0", "fold{run}"])
def test_report_pools_the_folds_of_every_data_seed(tmp_path, layout):
    """Two runs — two data seeds × one fold (the same case ids in both: each seed has its own phantom), or two folds of
    one experiment: the table's spread is over the two runs, and the paired tests use all 2 × 6 cases, their p-values
    those of scipy on the pooled differences."""
    from tools.report import write_report

    student = {0: [0.9, 0.8, 0.7, 0.75, 0.6, 0.95], 1: [0.5, 0.55, 0.6, 0.4, 0.45, 0.7]}
    reference = {0: [0.7, 0.75, 0.72, 0.5, 0.52, 0.8], 1: [0.52, 0.4, 0.41, 0.38, 0.2, 0.6]}
    ensemble = {s: [v + 0.01 for v in x] for s, x in reference.items()}
    models = {"omni_student": student, "manual_student": reference, "ensemble": ensemble}
    for model, per_seed in models.items():
        for seed, values in per_seed.items():
            cases = {f"case{i}": {**{f"dice_{r}": v for r in REGIONS}, **{f"hd95_{r}": 10 * (1 - v) for r in REGIONS}}
                     for i, v in enumerate(values)}
            if layout == "fold{run}":  # two folds test different cases
                cases = {f"fold{seed}_{case_id}": metrics for case_id, metrics in cases.items()}
            write_evaluation(tmp_path / layout.format(run=seed) / model / "evaluate", cases)
    report = write_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == ([0, 1] if layout.startswith("seed") else [])
    rows = table_rows(report, "## Lachinov et al.")
    count_column = "| Runs |" if layout.startswith("seed") else "| Folds |"
    assert count_column in report.split("## Lachinov et al.", 1)[1].split("\n## ", 1)[0]
    run_means = [statistics.fmean(student[s]) for s in (0, 1)]
    mean, std = parse_cell(rows["Distilled (manual + pseudo labels)"][0])
    assert (mean, std) == (round(statistics.fmean(run_means), 3), round(statistics.stdev(run_means), 3))
    assert rows["Distilled (manual + pseudo labels)"][6] == "2"
    differences = [x - y for s in (0, 1) for x, y in zip(student[s], reference[s])]
    key = ("omni_student", "manual_student", "et")
    record = next(t for t in summary["paired_tests"] if (t["model"], t["reference"], t["region"]) == key)
    assert record["cases"] == 12
    assert math.isclose(record["p_value"], float(wilcoxon(differences).pvalue), rel_tol=1e-9)
    line = f"| omni_student − manual_student | ET | 12 | {statistics.fmean(differences):+.3f} | {record['p_value']:.3g} |"
    assert line in report


@pytest.mark.parametrize("seeds", [[0, 0], [-1], [True], [], "a"])
def test_seeds_option_rejects_repeated_negative_and_non_integer_seeds(seeds):
    from tools.experiment import data_seeds

    with pytest.raises(ValueError, match="--seeds"):
        data_seeds(seeds)
    assert data_seeds([1, 0]) == [1, 0] and data_seeds(3) == [3]
