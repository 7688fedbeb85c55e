"""Running ``python -m tools.experiment`` from the tests and reading the tables of its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.bundle_runner import ROOT, run_command


def run_experiment(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m tools.experiment *args`` (stdout and stderr apart); on timeout the runner and its stages
    are killed. One OpenMP thread whatever the caller's environment says: the same-seed tests compare
    CSV files bit for bit, and CPU results depend on the thread count (a CI may export another)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_command([sys.executable, "-m", "tools.experiment", *args], ROOT, env=env, timeout=timeout, merge_stderr=False)


def table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of the markdown table under ``heading``."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def dice_values(cells: list[str]) -> list[float]:
    """The mean and the std of the three Dice columns (the first three cells after the label columns);
    a one-fold cell holds the mean only."""
    values = []
    for cell in cells[:3]:
        mean, std = re.fullmatch(r"([0-9.]+)(?: ± ([0-9.]+))?", cell).groups()
        values += [float(mean)] + ([float(std)] if std is not None else [])
    return values
