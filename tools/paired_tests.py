"""Paired per-case comparisons of two models of an experiment: Wilcoxon signed-rank tests on Dice.

The folds' test sets are disjoint, so pooling every fold's test cases gives one paired sample per
case; two models are compared on the cases both evaluated (same fold, same case id).
"""

from __future__ import annotations

import math
import statistics

REGIONS = ("et", "tc", "wt")  # the papers' column order
# (model, reference) pairs a reader of the KD-Net and Lachinov tables asks about
PAIRS = (
    ("student", "baseline"),
    ("teacher", "baseline"),
    ("omni_student", "manual_student"),
    ("omni_student", "ensemble"),
)


def paired_dice(results: dict, model: str, reference: str, region: str) -> list[tuple[float, float]]:
    """(model, reference) Dice of ``region`` for every (fold, case) both evaluated, in a fixed order.

    ``results`` is ``{model: {fold: {case_id: {metric: value}}}}`` (``tools.report.collect``).
    """
    metric = f"dice_{region}"
    pairs = []
    for fold in sorted(set(results.get(model, {})) & set(results.get(reference, {}))):
        cases, reference_cases = results[model][fold], results[reference][fold]
        for case_id in sorted(set(cases) & set(reference_cases)):
            x, y = cases[case_id].get(metric, math.nan), reference_cases[case_id].get(metric, math.nan)
            if math.isfinite(x) and math.isfinite(y):
                pairs.append((x, y))
    return pairs


def wilcoxon_p(pairs: list[tuple[float, float]]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test on the paired differences (1.0 when all are 0)."""
    from scipy.stats import wilcoxon

    differences = [x - y for x, y in pairs]
    if not any(differences):
        return 1.0
    return float(wilcoxon(differences).pvalue)


def paired_summary(pairs: list[tuple[float, float]]) -> dict:
    """``{cases, mean_difference, p_value}`` of (model, reference) pairs: mean of model − reference, Wilcoxon p."""
    return {
        "cases": len(pairs),
        "mean_difference": statistics.fmean(x - y for x, y in pairs),
        "p_value": wilcoxon_p(pairs),
    }


def paired_tests(results: dict, pairs=PAIRS) -> list[dict]:
    """One record per (model, reference, region) present: cases, mean Dice difference, Wilcoxon p-value."""
    rows = []
    for model, reference in pairs:
        if model not in results or reference not in results:
            continue
        for region in REGIONS:
            values = paired_dice(results, model, reference, region)
            if values:
                rows.append({"model": model, "reference": reference, "region": region, **paired_summary(values)})
    return rows


def paired_tests_table(rows: list[dict]) -> str:
    """Markdown table of :func:`paired_tests` records."""
    lines = ["| Comparison | Region | Cases | Mean Dice difference | Wilcoxon p |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} − {r['reference']} | {r['region'].upper()} | {r['cases']} | "
            f"{r['mean_difference']:+.3f} | {r['p_value']:.3g} |"
        )
    return "\n".join(lines)


def difference_line(agg: dict, model: str, reference: str) -> str | None:
    """``model − reference`` of the fold-mean Dice per region (the student-minus-baseline line)."""
    if model not in agg or reference not in agg:
        return None
    cells = [f"{agg[model][f'dice_{r}']['mean'] - agg[reference][f'dice_{r}']['mean']:+.3f}" for r in REGIONS]
    return f"{model} − {reference}, Dice ET / TC / WT: " + " / ".join(cells)
