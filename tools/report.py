"""Experiment report: KD-Net / Lachinov-style tables, per-case CSV, summary JSON and figures.

Reads what the bundles wrote under an experiment folder (``fold<k>/<model>/evaluate`` for metrics
and predictions, ``fold<k>/<model>/train`` for TensorBoard logs) and writes ``report.md`` with
PNG figures next to it. ``python -m tools.report --out DIR`` rebuilds it. An experiment repeated on
several data seeds keeps each seed's folds in ``seed<s>/fold<k>``; the report then pools every
(seed, fold) run: the spread is over those runs and the paired tests over all their test cases.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import fire

from brats_kd.io import write_json_atomic, write_text_atomic
from tools.missing import missing_modalities, missing_modalities_section, subset_of_model
from tools.paired_tests import PAIRS, REGIONS, difference_line, paired_tests, paired_tests_table

METRICS = tuple(f"dice_{r}" for r in REGIONS) + tuple(f"hd95_{r}" for r in REGIONS)

# Table rows: (model folder name, label, skip connections, loss) in the papers' order.
TABLE1 = (("baseline", "Baseline (T1ce)"), ("teacher", "Teacher (4 modalities)"), ("student", "KD-Net student (T1ce)"))
TABLE2 = (
    ("baseline", "4", "Baseline", "GT"),
    ("teacher", "4", "Teacher", "GT"),
    ("student_gt_kl", "4", "KD-Net", "GT+KL"),
    ("student_gt_kd", "4", "KD-Net", "GT+KD"),
    ("student", "4", "KD-Net", "GT+KL+KD"),
    ("baseline_skip0", "0", "Baseline", "GT"),
    ("teacher_skip0", "0", "Teacher", "GT"),
    ("student_skip0_gt_kl", "0", "KD-Net", "GT+KL"),
    ("student_skip0_gt_kd", "0", "KD-Net", "GT+KD"),
    ("student_skip0", "0", "KD-Net", "GT+KL+KD"),
)
OMNI_TABLE = (
    ("member_unet", "UNet (No New-Net)"),
    ("member_resunet", "Res UNet"),
    ("member_cascade", "Cascaded UNet"),
    ("ensemble", "Ensemble (mean of 3)"),
    ("manual_student", "Res UNet, manual labels only"),
    ("omni_student", "Distilled (manual + pseudo labels)"),
)


def fold_dirs(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("fold*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))


def seed_dirs(out: Path) -> list[Path]:
    """``seed<s>`` folders of an experiment repeated on several data seeds (each holding its own folds)."""
    return sorted((p for p in out.glob("seed*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))


def run_dirs(out: Path) -> list[tuple[int | str, Path]]:
    """``(run, folder)`` of every evaluated run: ``(k, out/fold<k>)``, or ``("seed<s>/fold<k>", ...)`` when the
    experiment was repeated on several data seeds. A run is one test fold of one data set: the unit of the spread."""
    seeds = seed_dirs(out)
    if seeds:
        return [(f"{seed.name}/{fold.name}", fold) for seed in seeds for fold in fold_dirs(seed)]
    return [(int(fold.name[4:]), fold) for fold in fold_dirs(out)]


def read_case_metrics(evaluate_dir: Path) -> dict[str, dict[str, float]]:
    """Per-case metrics from MetricsSaver's ``<metric>_raw.csv`` files: ``{case_id: {metric: value}}``."""
    cases: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        raw = evaluate_dir / f"{metric}_raw.csv"
        if not raw.exists():
            continue
        with raw.open(newline="") as f:
            header, *rows = list(csv.reader(f))
        for row in rows:
            cases.setdefault(row[0], {})[metric] = float(row[1])
    return cases


def collect(out: Path, evaluation: str = "evaluate") -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """``{model: {fold: {case_id: {metric: value}}}}`` for every model evaluated in ``<model>/<evaluation>``."""
    results: dict[str, dict[int | str, dict]] = {}
    for fold, fold_dir in run_dirs(out):
        for evaluate_dir in sorted(fold_dir.glob(f"*/{evaluation}")):
            if (evaluate_dir / "summary.json").exists():
                results.setdefault(evaluate_dir.parent.name, {})[fold] = read_case_metrics(evaluate_dir)
    return results


def postprocessed_evaluations(out: Path) -> list[str]:
    """Names of the extra evaluations with ET post-processing (``evaluate_et<N>``) present under ``out``."""
    names = {p.name for _, fold_dir in run_dirs(out) for p in fold_dir.glob("*/evaluate_et*") if p.is_dir()}
    return sorted(names, key=lambda name: int(name[len("evaluate_et") :]) if name[len("evaluate_et") :].isdigit() else 0)


def fold_means(per_fold: dict[int, dict[str, dict[str, float]]], metric: str) -> list[float]:
    """One number per fold: the mean of ``metric`` over that fold's test cases."""
    means = []
    for cases in per_fold.values():
        values = [c[metric] for c in cases.values() if metric in c and math.isfinite(c[metric])]
        if values:
            means.append(statistics.fmean(values))
    return means


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std; the std is ``None`` for a single value (one fold has no spread to report)."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {metric: {mean, std, folds}}}``: mean ± std over folds of the per-fold means."""
    table = {}
    for model, per_fold in results.items():
        table[model] = {}
        for metric in METRICS:
            m, s = mean_std(fold_means(per_fold, metric))
            table[model][metric] = {"mean": m, "std": s, "folds": len(fold_means(per_fold, metric))}
    return table


def _cell(stats: dict[str, float], digits: int) -> str:
    if not math.isfinite(stats["mean"]):
        return "–"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(rows, agg: dict, first_columns: tuple[str, ...], count_label: str = "Folds") -> str:
    """Rows ``(model, *first column values)``; Dice (0–1) and HD95 (mm) columns as mean ± std over folds,
    then the number of folds behind the row (rows of one table may come from different ``--run_folds``);
    ``count_label`` "Runs" where the folds of several data seeds are pooled."""
    header = (
        list(first_columns)
        + [f"Dice {r.upper()}" for r in REGIONS]
        + [f"HD95 {r.upper()} (mm)" for r in REGIONS]
        + [count_label]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, *labels in rows:
        if model not in agg:
            continue
        cells = [_cell(agg[model][f"dice_{r}"], 3) for r in REGIONS] + [_cell(agg[model][f"hd95_{r}"], 1) for r in REGIONS]
        cells.append(str(agg[model]["dice_wt"]["folds"]))
        lines.append("| " + " | ".join(list(labels) + cells) + " |")
    return "\n".join(lines)


def official_metrics_sections(out: Path, evaluations: list[str], count_label: str = "Folds") -> tuple[dict, list[str]]:
    """The BraTS challenge scorer's lesion-wise Dice / HD95 table of each evaluation it was run on
    (``tools.official_metrics``, ``kdnet --official_metrics``): ``({evaluation: summary}, report lines)``."""
    from tools.official_metrics import HD95_PENALTY_MM, collect_official, experiment_agreement

    ablations = {m: f"{label} {loss}, {skips} skip connections" for m, skips, label, loss in TABLE2[2:4] + TABLE2[5:]}
    labels = {**dict(TABLE1), **ablations, **dict(OMNI_TABLE)}
    summary, lines = {}, []
    for evaluation in evaluations:
        results = collect_official(out, evaluation)
        if not results:
            continue
        agg, agreement = aggregate(results), experiment_agreement(out, evaluation)
        summary[evaluation] = {"lesionwise": agg, "volume_dice_agreement": agreement}
        rows = [(m, labels[m]) for m in labels if m in agg] + [(m, m) for m in sorted(agg) if m not in labels]
        lines += [
            f"## Official BraTS scorer: lesion-wise Dice and HD95 (`<model>/{evaluation}`)",
            "",
            "The BraTS 2023+ ranking metrics, computed by the challenge's own package (BraTS-evaluation on panoptica,"
            " requirements-brats-eval.txt) on the saved label maps (`official_metrics.csv` next to each evaluation):"
            " lesions are connected components, matched one to one; per case the mean Dice / HD95 (mm) over the"
            f" matched lesions, Dice 0 and HD95 {HD95_PENALTY_MM:.0f} mm where none matched, the region left out where"
            " neither reference nor prediction has a lesion. Each cell: mean ± std over the per-fold means.",
            "",
            markdown_table(rows, agg, ("Model",), count_label),
            "",
            f"- volume-wise Dice of the official scorer vs this report's, per case and region: max |difference|"
            f" {agreement['max_abs_difference']:.1e} over {agreement['compared']}; {agreement['empty_both']} with empty"
            " reference and prediction not compared (official: undefined; this report: 1).",
            "",
        ]
    return summary, lines


def write_per_case_csv(results: dict, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "fold", "case_id", *METRICS])
    for model in sorted(results):
        for fold in sorted(results[model]):
            for case_id, metrics in sorted(results[model][fold].items()):
                writer.writerow([model, fold, case_id, *(metrics.get(m, "") for m in METRICS)])
    write_text_atomic(path, buffer.getvalue())


def write_report(out: str | Path) -> Path:
    """Build ``report.md``, ``summary.json``, ``per_case.csv`` and the figures in ``out``; return the report path."""
    from tools import figures

    out = Path(out)
    experiment = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").exists() else {}
    stages = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    results = collect(out)
    if not results:
        raise FileNotFoundError(f"no evaluated model under {out} (expected fold<k>/<model>/evaluate/summary.json)")
    agg = aggregate(results)
    folds = {m: sorted(r) for m, r in results.items()}
    # every other KD student (ablation rows, loss variants) against the baseline too; a missing-modality
    # student is tested against its own subset's baseline (tools.missing)
    pairs = PAIRS + tuple((m, "baseline") for m in sorted(results) if m.startswith("student_") and not subset_of_model(m))
    tests = paired_tests(results, pairs)
    postprocessed = {name: collect(out, name) for name in postprocessed_evaluations(out)}
    postprocessed_agg = {name: aggregate(r) for name, r in postprocessed.items() if r}
    postprocessed_tests = {name: paired_tests(r, pairs) for name, r in postprocessed.items() if r}
    seeds = [int(p.name[4:]) for p in seed_dirs(out)]
    runs = "data seed × fold runs" if seeds else "folds"
    count_label = "Runs" if seeds else "Folds"
    summary = {"aggregate": agg, "folds": folds, "seeds": seeds, "paired_tests": tests, "experiment": experiment}
    summary["postprocessed"] = {n: {"aggregate": a, "paired_tests": postprocessed_tests[n]} for n, a in postprocessed_agg.items()}
    missing = missing_modalities(results, agg)
    if missing:
        summary["missing_modalities"] = missing
    official, official_lines = official_metrics_sections(out, ["evaluate", *postprocessed], count_label)
    if official:
        summary["official_metrics"] = official
    write_json_atomic(out / "summary.json", summary)
    write_per_case_csv(results, out / "per_case.csv")

    sections = [f"# {experiment.get('experiment', 'brats-kd')} experiment report", ""]
    env = experiment.get("environment", {})
    preset = experiment.get("preset", {})
    sections += [
        f"- command: `{experiment.get('command', '?')}`",
        f"- data: {experiment.get('data', '?')}; folds: {experiment.get('folds', '?')}; "
        f"seed: {experiment.get('seed', '?')}; preset: {preset.get('name', '?')}",
        f"- bundle settings: `{json.dumps(preset.get('bundle', {}))}`",
        *(  # omni's networks are the patch bundles': their settings override the shared ones
            [f"- patch-bundle settings (omni): `{json.dumps(preset.get('patch_bundle', {}))}`"]
            if experiment.get("experiment") == "omni" and preset.get("patch_bundle") else []
        ),
        f"- versions: python {env.get('python')}, torch {env.get('torch')}, monai {env.get('monai')}, "
        f"numpy {env.get('numpy')}; device: {env.get('device')}",
        f"- git commit: `{env.get('git_commit')}`{' (with uncommitted changes)' if env.get('git_dirty') else ''}",
        "- Dice in [0, 1] and HD95 in mm, computed per case in the original geometry with the BraTS empty-mask rules;"
        f" each cell is the mean ± standard deviation over {runs} of the per-fold mean over that fold's test cases"
        " (a single number where only one fold was run)"
        + (f"; data seeds {', '.join(map(str, seeds))}, each with its own phantom, split and training seed." if seeds else "."),
        "",
    ]
    if any(m in agg for m, _ in TABLE1):
        known = {m for m, *_ in TABLE2}
        extra = [m for m in sorted(agg) if m.startswith("student_") and m not in known and not subset_of_model(m)]
        variants = tuple((m, f"KD student, variant `{m[len('student_') :]}`") for m in extra)
        table = markdown_table(TABLE1 + variants, agg, ("Model",), count_label)
        sections += ["## KD-Net Table 1: teacher, baseline and student", "", table, ""]
        line = difference_line(agg, "student", "baseline")
        sections += [f"- {line}", ""] if line else []
    if missing:
        sections += missing_modalities_section(out, missing, runs)
    # the omni-student's tests stand under the Lachinov table; the others here
    omni_tests = [t for t in tests if t["model"] == "omni_student"]
    other_tests = [t for t in tests if t["model"] != "omni_student"]
    paired_explanation = (
        f"Per-case Dice of each pair over all test cases of all {runs} (the same cases), two-sided Wilcoxon"
        " signed-rank test; a small p with a positive difference favours the first model."
    )
    if other_tests:
        sections += ["## Paired tests", "", paired_explanation, "", paired_tests_table(other_tests), ""]
    if any(m in agg for m, *_ in TABLE2[2:4] + TABLE2[5:]):
        sections += [
            "## KD-Net Table 2: loss-term ablation, 4 and 0 skip connections",
            "",
            markdown_table(TABLE2, agg, ("Skip connections", "Model", "Loss"), count_label),
            "",
        ]
    if any(m in agg for m, _ in OMNI_TABLE):
        sections += [
            "## Lachinov et al.: ensemble, pseudo labels and distilled student",
            "",
            markdown_table(OMNI_TABLE, agg, ("Method",), count_label),
            "",
        ]
        lines = [difference_line(agg, "omni_student", reference) for reference in ("manual_student", "ensemble")]
        sections += [f"- {line}" for line in lines if line] + ([""] if any(lines) else [])
        if omni_tests:
            heading = "## Paired tests: distilled student vs manual labels only and vs the ensemble"
            sections += [heading, "", paired_explanation, "", paired_tests_table(omni_tests), ""]

    # Table 2's rows with their columns folded into one label, for the one-label-column tables below
    ablation_rows = tuple((m, f"{label} {loss}, {skips} skip connections") for m, skips, label, loss in TABLE2[2:4] + TABLE2[5:])
    for name, post_agg in postprocessed_agg.items():
        threshold = name[len("evaluate_et") :]
        sections += [
            f"## With ET post-processing: predicted ET under {threshold} BraTS voxels (mm³) becomes necrosis",
            "",
            "The same checkpoints as above, evaluated again with `et_min_voxels` = "
            f"{threshold} for every model (`<model>/{name}`).",
            "",
            markdown_table(TABLE1 + ablation_rows + OMNI_TABLE, post_agg, ("Model",), count_label),
            "",
        ]
        line = difference_line(post_agg, "student", "baseline")
        sections += [f"- {line}", ""] if line else []
        if postprocessed_tests[name]:
            sections += [paired_tests_table(postprocessed_tests[name]), ""]

    sections += official_lines
    pictures = figures.draw_all(out, results, agg)
    if pictures:
        sections += ["## Figures", ""]
        for title, path in pictures:
            sections += [f"### {title}", "", f"![{title}]({path.name})", ""]
    if stages:
        total = sum(r.get("seconds", 0) for r in stages.values())
        sections += [
            "## Stages",
            "",
            f"Wall time of the stages run: {total / 60:.1f} min. Each stage's folder holds its "
            "merged config (`config.json`), overrides and log.",
            "",
            "| stage | wall time (s) |",
            "|---|---|",
        ]
        sections += [f"| {name} | {r.get('seconds', '(earlier run)')} |" for name, r in stages.items()]
        sections.append("")
    report = out / "report.md"
    write_text_atomic(report, "\n".join(sections))
    return report


if __name__ == "__main__":
    fire.Fire(write_report, name="python -m tools.report")
