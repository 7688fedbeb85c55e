"""Paired Wilcoxon tests of the experiment report (tools/paired_tests.py) against hand computations."""

import math

import pytest

from tools.paired_tests import difference_line, paired_dice, paired_tests, wilcoxon_p


def results_with(differences, extra_case=False):
    base = {f"case{i}": {"dice_et": 0.5} for i in range(len(differences))}
    model = {f"case{i}": {"dice_et": 0.5 + d} for i, d in enumerate(differences)}
    if extra_case:
        model["only_in_model"] = {"dice_et": 1.0}  # unpaired: must be ignored
        base["case0"]["dice_tc"] = math.nan
    return {"student": {0: model}, "baseline": {0: base}}


def test_five_positive_differences_give_the_exact_two_sided_p():
    # all 5 differences positive: W+ = 15 is the most extreme of 2^5 equally likely sign patterns,
    # so the exact two-sided p is 2 / 32
    rows = paired_tests(results_with([0.1, 0.2, 0.3, 0.4, 0.5], extra_case=True))
    et = next(r for r in rows if r["region"] == "et")
    assert et["cases"] == 5
    assert et["mean_difference"] == pytest.approx(0.3)
    assert et["p_value"] == pytest.approx(2 / 32)
    assert not [r for r in rows if r["region"] == "tc"], "a region no case has is not reported"


def test_mixed_signs_by_hand():
    # differences -0.1, +0.2, +0.3, +0.4: ranks 1..4, W- = 1; P(W- <= 1) = 2/16 (W- = 0 or 1), two-sided 4/16
    assert wilcoxon_p([(0.4, 0.5), (0.7, 0.5), (0.8, 0.5), (0.9, 0.5)]) == pytest.approx(4 / 16)


def test_identical_models_give_p_one_and_pairs_follow_fold_and_case():
    assert wilcoxon_p([(0.5, 0.5)] * 4) == 1.0
    results = {"a": {0: {"x": {"dice_wt": 0.9}}, 1: {"y": {"dice_wt": 0.1}}}, "b": {1: {"y": {"dice_wt": 0.3}}}}
    assert paired_dice(results, "a", "b", "wt") == [(0.1, 0.3)]


def test_difference_line_is_model_minus_reference_per_region():
    agg = {
        "student": {"dice_et": {"mean": 0.6}, "dice_tc": {"mean": 0.5}, "dice_wt": {"mean": 0.7}},
        "baseline": {"dice_et": {"mean": 0.5}, "dice_tc": {"mean": 0.55}, "dice_wt": {"mean": 0.7}},
    }
    assert difference_line(agg, "student", "baseline").endswith("+0.100 / -0.050 / +0.000")
    assert difference_line(agg, "student", "teacher") is None
