"""The missing-modality experiment (``python -m tools.experiment missing``): its subsets, model names and report section.

RFNet, mmFormer, M3AE and DeMoSeg report one row per non-empty subset of T1, T1ce, T2 and FLAIR (15 rows).
Here each subset ``S`` gets a baseline (the teacher bundle with ``modalities`` = ``S``, folder
``baseline_<S>``) and a KD student (kd_student with ``student_modalities`` = ``S``, folder ``student_<S>``),
both next to the one 4-modality teacher of each fold. ``<S>`` is the subset's modalities joined by ``+`` in
the teacher's order (``t1``, ``t1ce``, ``t2``, ``flair``): ``student_t1+t2``. ``+`` is a valid character of a
folder name on Linux, macOS and Windows, and no other model of the project has a name of that form.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from brats_kd.modalities import CHANNEL_NAMES

#: the teacher's modalities, in its channel order (bundles/kd_student/configs/train.json's teacher_modalities)
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: ``--subsets all``: the 15 non-empty subsets, by size, then in ``itertools.combinations`` order of MODALITIES
#: (t1, t1ce, t2, flair, t1+t1ce, t1+t2, ..., t1+t1ce+t2+flair)
ALL_SUBSETS = tuple(s for size in range(1, len(MODALITIES) + 1) for s in itertools.combinations(MODALITIES, size))
BASELINE_PREFIX, STUDENT_PREFIX = "baseline_", "student_"
HEATMAP_FILE = "missing_modalities_heatmap.png"


def _canonical(modalities) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if m in modalities)


def _parse_one(text: str, given) -> tuple[str, ...]:
    names = [m.strip() for m in text.split(",")]
    where = f"in --subsets {given!r}"
    if any(not n for n in names):
        raise ValueError(f"--subsets: empty modality name in subset {text!r} ({where}); "
                         "separate modalities by commas, e.g. t1,t2")
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ValueError(f"--subsets: unknown modality {', '.join(map(repr, unknown))} in subset {text!r} ({where}); "
                         f"known: {', '.join(MODALITIES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--subsets: {', '.join(map(repr, repeated))} listed more than once in subset {text!r} ({where})")
    return _canonical(names)


def parse_subsets(subsets) -> list[tuple[str, ...]]:
    """``--subsets``: ``"all"`` (the 15 of :data:`ALL_SUBSETS`) or subsets separated by spaces, modalities by
    commas (``"flair t1,t2"``). Each subset comes back in the teacher's channel order (``t2,t1`` is ``t1,t2``).

    Fire turns an unquoted ``t1,t2`` into the tuple ``("t1", "t2")``: a tuple or list of names is that one
    subset; a list of lists (from Python) is one subset per inner list. Refused, before anything is written:
    no subset, an empty or unknown modality name, a modality twice in a subset, the same subset twice.
    """
    if isinstance(subsets, str) and subsets.strip() == "all":
        return list(ALL_SUBSETS)
    if isinstance(subsets, str):
        texts = subsets.split()
    elif isinstance(subsets, (list, tuple)) and subsets and all(isinstance(s, str) for s in subsets):
        texts = [",".join(subsets)]
    elif isinstance(subsets, (list, tuple)) and subsets and all(isinstance(s, (list, tuple)) for s in subsets):
        texts = [",".join(map(str, s)) for s in subsets]
    else:
        texts = []
    if not texts:
        raise ValueError(f"--subsets must be 'all' or subsets separated by spaces, modalities by commas "
                         f"(e.g. \"flair t1,t2\"), got {subsets!r}")
    chosen = [_parse_one(text, subsets) for text in texts]
    twice = sorted({subset_key(s) for s in chosen if chosen.count(s) > 1})
    if twice:
        raise ValueError(f"--subsets: subset {', '.join(twice)} requested more than once (in --subsets {subsets!r}; "
                         "the order of modalities inside a subset does not matter)")
    return chosen


def subset_key(subset) -> str:
    """``("t1", "t2")`` → ``"t1+t2"``: the folder-name part and the summary.json key of a subset."""
    return "+".join(subset)


def subset_label(subset) -> str:
    """``("t1", "t2")`` → ``"T1 + T2"``: the report's row label."""
    return " + ".join(CHANNEL_NAMES[m] for m in subset)


def baseline_name(subset) -> str:
    return BASELINE_PREFIX + subset_key(subset)


def student_name(subset) -> str:
    return STUDENT_PREFIX + subset_key(subset)


def subset_of_model(model: str) -> tuple[str, ...] | None:
    """The subset of a missing-modality model folder (``student_t1+t2`` → ``("t1", "t2")``); None for any other
    model (``baseline``, ``student_gt_kl``, ``baseline_skip0``, ...)."""
    for prefix in (BASELINE_PREFIX, STUDENT_PREFIX):
        if model.startswith(prefix):
            names = model[len(prefix):].split("+")
            if all(n in MODALITIES for n in names) and len(set(names)) == len(names) and tuple(names) == _canonical(names):
                return tuple(names)
    return None


def missing_modalities(results: dict, agg: dict) -> dict | None:
    """The ``missing_modalities`` entry of summary.json, or None when no missing-modality model was evaluated.

    One row per subset with a baseline or a student, in :data:`ALL_SUBSETS` order: per region ``r`` (ET, TC,
    WT) the Dice of ``baseline`` and ``student`` (``{mean, std, folds}``: mean ± std over folds of the per-fold
    means, :func:`tools.report.aggregate`), ``difference[r]`` = student mean − baseline mean, and the paired
    test over every test case both evaluated (``tools.paired_tests``: ``cases``, ``p_value``, ``mean_difference``
    per case); None where a model of the row is missing.
    """
    from tools.paired_tests import REGIONS, paired_tests

    present = {subset_of_model(m) for m in results} - {None}
    if not present:
        return None
    rows = []
    for subset in (s for s in ALL_SUBSETS if s in present):
        baseline, student = baseline_name(subset), student_name(subset)
        tests = {t["region"]: t for t in paired_tests(results, [(student, baseline)])}

        def dice(model: str, region: str):
            return agg[model][f"dice_{region}"] if model in agg else None

        row = {
            "subset": subset_key(subset),
            "label": subset_label(subset),
            "modalities": list(subset),
            "baseline_model": baseline,
            "student_model": student,
            "baseline": {r: dice(baseline, r) for r in REGIONS},
            "student": {r: dice(student, r) for r in REGIONS},
        }
        row["difference"] = {
            r: row["student"][r]["mean"] - row["baseline"][r]["mean"] if row["student"][r] and row["baseline"][r] else None
            for r in REGIONS
        }
        row["paired_test"] = {
            r: {k: tests[r][k] for k in ("cases", "mean_difference", "p_value")} if r in tests else None for r in REGIONS
        }
        rows.append(row)
    return {"regions": list(REGIONS), "rows": rows}


def _number(value: float | None, form: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, form)


def missing_modalities_table(summary: dict) -> str:
    """The report's table of :func:`missing_modalities`: one row per subset; Dice cells as in the other tables."""
    from tools.report import _cell

    regions = [r.upper() for r in summary["regions"]]
    header = (
        ["Modalities"]
        + [f"Baseline Dice {r}" for r in regions]
        + [f"Student Dice {r}" for r in regions]
        + [f"Student − baseline {r}" for r in regions]
        + [f"Wilcoxon p {r}" for r in regions]
        + ["Folds", "Cases"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["label"]]
        cells += [_cell(row["baseline"][r], 3) if row["baseline"][r] else "–" for r in summary["regions"]]
        cells += [_cell(row["student"][r], 3) if row["student"][r] else "–" for r in summary["regions"]]
        cells += [_number(row["difference"][r], "+.3f") for r in summary["regions"]]
        tests = [row["paired_test"][r] for r in summary["regions"]]
        cells += [_number(t["p_value"] if t else None, ".3g") for t in tests]
        folds = {str(row[m][r]["folds"]) for m in ("baseline", "student") for r in summary["regions"] if row[m][r]}
        cells.append("/".join(sorted(folds)) or "–")
        cells.append("/".join(str(n) for n in sorted({t["cases"] for t in tests if t})) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_modalities_section(out: Path, summary: dict, runs: str) -> list[str]:
    """Report lines of the "Missing modalities" section, and its heat map (:data:`HEATMAP_FILE` next to report.md)."""
    from tools.figures import missing_heatmap

    regions = summary["regions"]
    picture = missing_heatmap(
        [row["label"] for row in summary["rows"]],
        [[row["difference"][r] for r in regions] for row in summary["rows"]],
        [r.upper() for r in regions],
        Path(out) / HEATMAP_FILE,
    )
    return [
        "## Missing modalities",
        "",
        "One row per subset of the teacher's modalities: the baseline (teacher bundle on the subset, `baseline_<subset>`)"
        " and the KD student (kd_student with `student_modalities` = the subset, `student_<subset>`), both from the same"
        f" folds, the student distilled from the fold's 4-modality teacher. Dice: mean ± std over {runs} of the"
        " per-fold means; student − baseline: difference of those means; Wilcoxon p: two-sided signed-rank test on the"
        f" per-case Dice of student vs baseline over all test cases of all {runs} (Cases: the pairs tested).",
        "",
        missing_modalities_table(summary),
        "",
        f"![Student − baseline Dice per subset and region]({picture.name})",
        "",
    ]
