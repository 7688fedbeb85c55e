"""End-to-end test of the experiment runner's omni experiment (Lachinov et al.): `smoke` preset, one fold."""

from __future__ import annotations

import json

import pytest

from tests.experiment_runs import dice_values, run_experiment, table_rows

pytestmark = pytest.mark.slow


def test_omni_smoke_one_fold(tmp_path):
    out = tmp_path / "omni"
    result = run_experiment("omni", "--data", "synthetic", "--preset", "smoke", "--out", str(out), "--run_folds", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = table_rows(report, "## Lachinov et al.")
    assert set(rows) == {
        "UNet (No New-Net)", "Res UNet", "Cascaded UNet", "Ensemble (mean of 3)",
        "Res UNet, manual labels only", "Distilled (manual + pseudo labels)",
    }
    for cells in rows.values():
        # one fold: the mean alone (no "± 0.000" that would pass for a measured spread), and the fold count
        assert len(dice_values(cells)) == 3 and cells[6] == "1", cells
        assert all(0.0 <= v <= 1.0 for v in dice_values(cells)), cells
    combined = json.loads((out / "fold0" / "pseudo_labels" / "datalist.json").read_text())
    sources = [c["source"] for c in combined["training"]]
    datalist = json.loads((out / "datalist.json").read_text())
    assert sources.count("manual") == len(datalist["training"])
    assert sources.count("pseudo") + len(combined.get("dropped", [])) == len(datalist["unlabeled"]) > 0
