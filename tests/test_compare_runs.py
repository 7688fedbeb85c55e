"""tools/compare_runs.py: two runs of one experiment compared case by case, against hand computations."""

import json

import pytest

from tools.compare_runs import main


def write_run(out, seed=0, dice_squared=True, models=None, phantom_cases=60):
    """An experiment folder as tools.experiment leaves it: experiment.json and <model>/evaluate raw CSVs."""
    out.mkdir()
    record = {
        "experiment": "omni",
        "command": f"python -m tools.experiment omni --out {out}",  # provenance: differs, not a setting
        "data": "synthetic",
        "folds": 2,
        "seed": seed,
        "preset": {"name": "quick", "phantom_cases": phantom_cases, "bundle": {"epochs": 80}},
        "options": {"dice_squared": dice_squared, "jobs": 2},
        "environment": {"torch": "2.13.0", "git_commit": "abc" if dice_squared else "def"},
    }
    (out / "experiment.json").write_text(json.dumps(record))
    for model, per_fold in (models or {}).items():
        for fold, cases in per_fold.items():
            evaluate = out / f"fold{fold}" / model / "evaluate"
            evaluate.mkdir(parents=True)
            (evaluate / "summary.json").write_text("{}")
            for region in ("et", "tc", "wt"):
                rows = [f"{case},{d[region]},{d[region]}" for case, d in cases.items() if region in d]
                if rows:
                    (evaluate / f"dice_{region}_raw.csv").write_text("filename,class0,mean\n" + "\n".join(rows) + "\n")
    return out


def cases(values, region="et"):
    return {f"case{i}": {region: v} for i, v in enumerate(values)}


def test_paired_means_differences_and_exact_p_by_hand(tmp_path, capsys):
    # fold 0 has 3 cases, fold 1 has 2; B is above A on all 5 pairs: the exact two-sided p is 2 / 2^5
    a = write_run(tmp_path / "a", models={"student": {0: cases([0.5, 0.6, 0.7]), 1: cases([0.2, 0.4])},
                                           "only_in_a": {0: cases([0.1])}})
    b_student = {0: cases([0.6, 0.8, 1.0]), 1: cases([0.6, 0.9])}
    b_student[1]["not_in_a"] = {"et": 0.0}  # unpaired: ignored
    b = write_run(tmp_path / "b", dice_squared=False, models={"student": b_student})
    out_json = tmp_path / "cmp.json"
    main(str(a), str(b), json_path=str(out_json))
    text = capsys.readouterr().out

    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["model"], r["region"]) for r in rows] == [("student", "et")], "a model or region not in both is left out"
    row = rows[0]
    assert row["cases"] == 5
    assert row["mean_a"] == pytest.approx((0.5 + 0.6 + 0.7 + 0.2 + 0.4) / 5)
    assert row["mean_b"] == pytest.approx((0.6 + 0.8 + 1.0 + 0.6 + 0.9) / 5)
    assert row["mean_difference"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)
    assert row["p_value"] == pytest.approx(2 / 32)
    assert "| student | ET | 5 | 0.480 | 0.780 | +0.300 | 0.0625 |" in text
    # the settings that differ are named; the command line is not a setting
    assert "- options.dice_squared: True (A), False (B)" in text
    assert "- environment.git_commit: 'abc' (A), 'def' (B)" in text, "the code each run ran is part of what differs"
    assert "environment.torch" not in text
    assert "command" not in text.split("\n\n")[0]


def test_runs_on_other_seeds_are_refused_by_name(tmp_path):
    a = write_run(tmp_path / "a", models={"student": {0: cases([0.5])}})
    b = write_run(tmp_path / "b", seed=1, models={"student": {0: cases([0.6])}})
    with pytest.raises(SystemExit, match=r"cannot pair the cases of these runs: seed: 0 in .*a, 1 in .*b"):
        main(str(a), str(b), json_path=str(tmp_path / "cmp.json"))
    assert not (tmp_path / "cmp.json").exists(), "nothing is written for a refused comparison"


def test_another_phantom_under_the_same_seed_is_refused(tmp_path):
    # "synthetic" and seed 0 under another preset are other cases with the same ids
    a = write_run(tmp_path / "a", models={"student": {0: cases([0.5])}})
    b = write_run(tmp_path / "b", phantom_cases=8, models={"student": {0: cases([0.6])}})
    with pytest.raises(SystemExit, match=r"preset.phantom_cases: 60 in .*a, 8 in .*b"):
        main(str(a), str(b))


def test_a_folder_without_experiment_json_is_named(tmp_path):
    a = write_run(tmp_path / "a")
    with pytest.raises(SystemExit, match=r"nope: no experiment.json"):
        main(str(a), str(tmp_path / "nope"))
