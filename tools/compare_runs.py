"""Two runs of one experiment that differ in a setting, model by model: paired Dice per region.

    python -m tools.compare_runs runs/omni_s0 runs/omni_plain_s0 [--json_path comparison.json]

Both folders must hold the same experiment on the same data, seed and folds (their ``experiment.json``);
then every model evaluated in both is compared case by case (same fold, same case id): the mean Dice of
each run, the mean difference B − A and the two-sided Wilcoxon signed-rank p-value of the paired
differences (``tools.paired_tests``). The settings in which the runs differ are printed above the table,
so the table says what it compares.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from brats_kd.io import write_json_atomic
from tools.paired_tests import REGIONS, paired_dice, paired_summary
from tools.report import collect

# what must agree for a case-by-case pairing to mean anything: the same cases in the same folds; on the built-in
# phantom also its size settings, since "synthetic" with the same seed names another data set under another preset
SAME_DATA_KEYS = ("experiment", "data", "seed", "folds")
PHANTOM_PREFIX = "preset.phantom_"
# how and when the run was started, not what it ran (the environment, e.g. the git commit, is listed)
NOT_SETTINGS = ("command", "started")


def read_experiment(out: Path) -> dict:
    """The ``experiment.json`` of an experiment folder, or a clear error naming the folder."""
    path = Path(out) / "experiment.json"
    if not path.is_file():
        raise SystemExit(f"{out}: no experiment.json: not a tools.experiment output folder")
    return json.loads(path.read_text())


def flat_settings(record: dict, prefix: str = "") -> dict[str, object]:
    """``experiment.json`` as ``{"preset.bundle.epochs": 80, ...}``, without the command line and start time."""
    flat: dict[str, object] = {}
    for key, value in record.items():
        if not prefix and key in NOT_SETTINGS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differing_settings(a: dict, b: dict) -> dict[str, tuple[object, object]]:
    """``{setting: (value in a, value in b)}`` for every setting the two records do not share."""
    fa, fb = flat_settings(a), flat_settings(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def check_same_data(changed: dict[str, tuple[object, object]], a_name: str, b_name: str) -> None:
    """Refuse two runs whose cases cannot be paired (another experiment, data set, phantom, seed or fold count);
    ``changed`` is their :func:`differing_settings`."""
    data_keys = [k for k in SAME_DATA_KEYS if k in changed] + [k for k in changed if k.startswith(PHANTOM_PREFIX)]
    wrong = [f"{k}: {changed[k][0]!r} in {a_name}, {changed[k][1]!r} in {b_name}" for k in data_keys]
    if wrong:
        raise SystemExit("cannot pair the cases of these runs: " + "; ".join(wrong))


def compare(results_a: dict, results_b: dict) -> list[dict]:
    """One record per (model, region) evaluated in both runs: cases, mean Dice A and B, B − A, Wilcoxon p."""
    rows = []
    for model in sorted(set(results_a) & set(results_b)):
        both = {"a": results_a[model], "b": results_b[model]}
        for region in REGIONS:
            pairs = paired_dice(both, "b", "a", region)
            if not pairs:
                continue
            means = {"mean_a": statistics.fmean(a for _, a in pairs), "mean_b": statistics.fmean(b for b, _ in pairs)}
            rows.append({"model": model, "region": region, **means, **paired_summary(pairs)})
    return rows


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare` records."""
    header = ["| Model | Region | Cases | Dice A | Dice B | B − A | Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    body = [
        f"| {r['model']} | {r['region'].upper()} | {r['cases']} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | "
        f"{r['mean_difference']:+.3f} | {r['p_value']:.3g} |"
        for r in rows
    ]
    return "\n".join(header + body)


def main(a: str, b: str, json_path: str | None = None) -> None:
    """Compare experiment folders ``a`` and ``b``; print the settings that differ and the table.

    Args:
        a: the reference run's folder.
        b: the run compared with it (differences are B − A).
        json_path: also write the settings and records to this JSON file.
    """
    changed = differing_settings(read_experiment(Path(a)), read_experiment(Path(b)))
    check_same_data(changed, a, b)
    rows = compare(collect(Path(a)), collect(Path(b)))
    if not rows:
        raise SystemExit(f"{a} and {b} have no evaluated model in common (no <model>/evaluate/summary.json in both)")
    lines = [f"A = {a}, B = {b}"]
    lines += [f"- {k}: {va!r} (A), {vb!r} (B)" for k, (va, vb) in changed.items()] or ["- no setting differs"]
    print("\n".join(lines) + "\n\n" + comparison_table(rows))
    if json_path:
        payload = {"a": a, "b": b, "differing_settings": {k: list(v) for k, v in changed.items()}, "rows": rows}
        write_json_atomic(json_path, payload)


if __name__ == "__main__":
    import fire

    fire.Fire(main, name="python -m tools.compare_runs")
