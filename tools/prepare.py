"""Check a BraTS / MSD brain-tumour dataset and write the datalist the bundles train from.

    python -m tools.prepare --data DIR --out DATALIST.json --folds 5 --seed 0 [--layout auto]

Stages: detect the layout (``tools.layouts``), validate every case (``brats_kd.validation``, the checks the bundles also run),
assign cross-validation folds, write a decathlon-style datalist atomically. If any case has a
problem, every problem is reported (one line per case on stderr) and nothing is written.

Source data is only read: label values are never rewritten on disk. The datalist carries a
``label_map`` that the bundles apply with MONAI's ``MapLabelValued`` to reach BraTS 1/2/4.

Exit status: 0 datalist written; 1 the dataset has problems; 2 invalid arguments.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import fire
import numpy as np

from brats_kd.io import write_json_atomic
from brats_kd.validation import validate_case
from tools.layouts import LAYOUTS, MODALITIES, Case, Layout, LayoutError, detect_layout, discover_cases

DATALIST_NAME = "brats-kd datalist"
EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """An argument is invalid (exit status 2)."""


class DatasetError(Exception):
    """The dataset cannot be turned into a datalist (exit status 1).

    ``lines`` are printed one per line: one per bad case, or a single dataset-level message.
    """

    def __init__(self, lines: list[str], summary: str):
        super().__init__(summary)
        self.lines = lines
        self.summary = summary


# ---------------------------------------------------------------------------------------------
# arguments


def _check_int(name: str, value, minimum: int) -> int:
    """fire passes whatever the user typed (str, bool, float); accept only whole numbers."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _choose_layout(root: Path, layout: str) -> Layout:
    if layout == "auto":
        return detect_layout(root)
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of auto, {', '.join(LAYOUTS)}; got {layout!r}")
    return LAYOUTS[layout]


def _is_our_datalist(path: Path) -> bool:
    """Whether ``path`` holds a datalist written by this tool (safe to overwrite)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("name") == DATALIST_NAME


def _check_output_path(out: Path, root: Path, cases: list[Case]) -> None:
    """Refuse an --out that would overwrite source data.

    Forbidden: any file a case points at (also through symlinks), and any other existing file
    inside the dataset folder (MSD's dataset.json, BraTS 2020's CSVs) unless it is an earlier
    datalist of ours. A new file inside the dataset folder, or anything elsewhere, is allowed.
    """
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the path of the JSON file to write")
    resolved = Path(os.path.realpath(out))
    data_files = {Path(os.path.realpath(root / rel)) for case in cases for rel in case.referenced_files()}
    if resolved in data_files:
        raise UsageError(f"--out {out} is a data file of the dataset; refusing to overwrite it")
    inside_dataset = resolved.is_relative_to(Path(os.path.realpath(root)))
    if inside_dataset and resolved.exists() and not _is_our_datalist(resolved):
        raise UsageError(f"--out {out} is an existing file of the dataset folder; refusing to overwrite it")


def _check_fold_count(cases: list[Case], num_folds: int) -> None:
    labeled = sum(case.label is not None for case in cases)
    # A dataset with no labels at all (e.g. a BraTS validation set) is still useful for inference.
    if 0 < labeled < num_folds:
        raise UsageError(f"cannot split {labeled} labeled case(s) into {num_folds} folds; lower --folds")


# ---------------------------------------------------------------------------------------------
# validation


def _progress(done: int, total: int) -> None:
    """A one-line counter on an interactive terminal; silent in logs, pipes and tests."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\rvalidating cases: {done}/{total}", end=end, file=sys.stderr, flush=True)


def validate_cases(root: Path, cases: list[Case], layout: Layout) -> list[str]:
    """Validate every case (one at a time, bounding memory); one ``"<case>: <problems>"`` line per bad case."""
    bad = []
    for index, case in enumerate(cases, start=1):
        problems = validate_case(root, case, layout)
        if problems:
            bad.append(f"{case.case_id}: {'; '.join(problems)}")
        _progress(index, len(cases))
    return bad


# ---------------------------------------------------------------------------------------------
# folds and datalist


def assign_folds(cases: list[Case], num_folds: int, seed: int) -> dict[str, int]:
    """Case id -> fold for the labeled cases: deterministic, balanced, stratified by ``group``.

    Cases are sorted by id (so filesystem order cannot matter), shuffled within each stratum
    by a seeded numpy Generator, and dealt round-robin with one running counter across the
    strata. Fold sizes therefore differ by at most one, and so do each stratum's (e.g. HGG,
    LGG) counts per fold.
    """
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        if case.label is not None:
            strata.setdefault(case.group or "", []).append(case.case_id)
    folds, dealt = {}, 0
    for group in sorted(strata):
        ids = strata[group]
        for index in rng.permutation(len(ids)):
            folds[ids[index]] = dealt % num_folds
            dealt += 1
    return folds


def _entry(case: Case) -> dict:
    entry = {"case_id": case.case_id}
    entry.update({modality: case.images[modality] for modality in MODALITIES})
    if case.label is not None:
        entry["label"] = case.label
    return entry


def build_datalist(root: Path, layout: Layout, cases: list[Case], num_folds: int, seed: int) -> dict:
    """The datalist dictionary (schema documented in docs and relied upon by every bundle)."""
    folds = assign_folds(cases, num_folds, seed)
    ordered = sorted(cases, key=lambda c: c.case_id)
    return {
        "name": DATALIST_NAME,
        "layout": layout.name,
        "dataset_dir": os.path.abspath(root),
        "modalities": list(MODALITIES),
        "channel_index": {modality: layout.channel_index[modality] for modality in MODALITIES},
        "label_map": {key: list(values) for key, values in layout.label_map.items()},
        "num_folds": num_folds,
        "seed": seed,
        "training": [{**_entry(c), "fold": folds[c.case_id]} for c in ordered if c.label is not None],
        "unlabeled": [_entry(c) for c in ordered if c.label is None],
    }


def _summary(datalist: dict, cases: list[Case], out: Path) -> str:
    """Short human-readable report of what was written."""
    groups = {c.case_id: c.group for c in cases}
    per_fold = Counter(entry["fold"] for entry in datalist["training"])
    fold_parts = []
    for fold in range(datalist["num_folds"]):
        strata = Counter(groups[e["case_id"]] for e in datalist["training"] if e["fold"] == fold)
        detail = ", ".join(f"{g} {n}" for g, n in sorted(strata.items()) if g)
        fold_parts.append(f"{per_fold[fold]}" + (f" ({detail})" if detail else ""))
    return "\n".join(
        [
            f"layout:    {datalist['layout']} ({datalist['dataset_dir']})",
            f"labeled:   {len(datalist['training'])}",
            f"unlabeled: {len(datalist['unlabeled'])}",
            f"folds:     {datalist['num_folds']} (seed {datalist['seed']}), cases per fold: {', '.join(fold_parts)}",
            f"datalist:  {os.path.abspath(out)}",
        ]
    )


# ---------------------------------------------------------------------------------------------
# entry points


def prepare(data, out, folds=5, seed=0, layout="auto") -> dict:
    """Validate ``data`` and write its datalist to ``out``; returns the datalist.

    Raises UsageError or DatasetError; nothing is written unless every case is valid.
    """
    num_folds, seed = _check_int("folds", folds, 2), _check_int("seed", seed, 0)
    root, out = Path(str(data)).expanduser(), Path(str(out)).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a folder")
    try:
        chosen = _choose_layout(root, str(layout))
        cases = discover_cases(root, chosen)
    except LayoutError as err:
        raise DatasetError([], f"error: {err}") from None
    if not cases:
        raise DatasetError([], f"error: no {chosen.name} cases found in {root}")
    # Cheap argument checks that depend on the cases come before the slow voxel pass.
    _check_output_path(out, root, cases)
    _check_fold_count(cases, num_folds)

    bad = validate_cases(root, cases, chosen)
    if bad:
        raise DatasetError(bad, f"error: {len(bad)} of {len(cases)} cases in {root} failed validation")
    datalist = build_datalist(root, chosen, cases, num_folds, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, datalist)
    print(_summary(datalist, cases, out))
    return datalist


def run(data, out, folds=5, seed=0, layout="auto") -> int:
    """``prepare`` with errors printed to stderr (no traceback); returns the exit status."""
    try:
        prepare(data, out, folds, seed, layout)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DatasetError as err:
        for line in err.lines:
            print(line, file=sys.stderr)
        print(f"{err.summary}; no datalist written", file=sys.stderr)
        return EXIT_BAD_DATA
    return EXIT_OK


def cli(data, out, folds=5, seed=0, layout="auto"):
    """Validate a BraTS/MSD dataset and write a cross-validation datalist.

    Args:
        data: dataset folder (BraTS 2018-2020, 2021, 2023 GLI, or MSD Task01_BrainTumour).
        out: datalist JSON to write (atomically; never a file of the dataset).
        folds: number of cross-validation folds (>= 2).
        seed: seed of the fold shuffle.
        layout: auto, brats2018, brats2021, brats2023 or msd.
    """
    raise SystemExit(run(data, out, folds, seed, layout))


if __name__ == "__main__":
    fire.Fire(cli)
