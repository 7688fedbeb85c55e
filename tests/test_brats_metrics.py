"""BraTS evaluation rules on hand-made masks: Dice and HD95 for empty masks, HD95 in mm from the
affine, nested label painting, the label-map writer and the metric summary
(``brats_kd.labels``, ``brats_kd.metrics``).
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric

from brats_kd import labels as label_maps
from brats_kd import metrics
from tests.bundle_runner import bundle_config

# MONAI warns about every empty mask; here empty masks are the point
pytestmark = pytest.mark.filterwarnings("ignore:the (ground truth|prediction) of class:UserWarning")

PENALTY = 373.13
SHAPE = (20, 20, 20)


def cube(offset=(0, 0, 0), size: int = 6, start: int = 5) -> torch.Tensor:
    """A ``[1, 1, 20, 20, 20]`` mask holding one cube, moved by ``offset`` voxels."""
    mask = torch.zeros(1, 1, *SHAPE)
    mask[(0, 0, *(slice(start + o, start + o + size) for o in offset))] = 1
    return mask


def empty() -> torch.Tensor:
    return torch.zeros(1, 1, *SHAPE)


# ---------------------------------------------------------------------------------------------
# Dice: MONAI's DiceMetric as the bundles configure it


EVALUATION_DICE = [
    "validate#key_metric#dice",
    "validate#additional_metrics#dice_tc",
    "validate#additional_metrics#dice_wt",
    "validate#additional_metrics#dice_et",
]
VALIDATION_DICE = [
    "validate#key_metric#val_mean_dice",
    "validate#additional_metrics#val_dice_tc",
    "validate#additional_metrics#val_dice_wt",
    "validate#additional_metrics#val_dice_et",
]


@pytest.mark.parametrize("metric_id", EVALUATION_DICE)
def test_evaluation_dice_follows_the_brats_empty_mask_rule(metric_id):
    """The DiceMetric objects the teacher's evaluation config builds (the reported numbers)."""
    metric = bundle_config("teacher", ["train.json", "evaluate.json"]).get_parsed_content(f"{metric_id}#metric_fn")
    assert isinstance(metric, DiceMetric)
    assert metric(empty(), empty()).item() == 1.0, "empty prediction of an empty reference is perfect"
    metric.reset()
    assert metric(cube(), empty()).item() == 0.0, "any prediction on an empty reference scores 0"
    metric.reset()
    assert metric(empty(), cube()).item() == 0.0
    metric.reset()
    assert metric(cube((0, 0, 3)), cube()).item() == pytest.approx(0.5)  # half of each cube overlaps


@pytest.mark.parametrize("metric_id", VALIDATION_DICE)
def test_validation_dice_skips_empty_references(metric_id):
    """The validation Dice (checkpoint selection) leaves cases with an empty reference out (NaN, not
    averaged), whatever the prediction; on the other cases it is the usual Dice."""
    metric = bundle_config("teacher", "train.json").get_parsed_content(f"{metric_id}#metric_fn")
    assert isinstance(metric, DiceMetric)
    assert math.isnan(metric(empty(), empty()).item())
    metric.reset()
    assert math.isnan(metric(cube(), empty()).item())
    metric.reset()
    assert metric(empty(), cube()).item() == 0.0
    metric.reset()
    assert metric(cube((0, 0, 3)), cube()).item() == pytest.approx(0.5)


def test_monai_default_dice_would_give_nan_on_empty_masks():
    """Why evaluate.json sets ``ignore_empty=False``: MONAI's default drops empty references as NaN."""
    assert math.isnan(DiceMetric()(empty(), empty()).item())
    assert DiceMetric(ignore_empty=False)(empty(), empty()).item() == 1.0


# ---------------------------------------------------------------------------------------------
# HD95


def test_hd95_both_empty_is_zero_and_one_empty_is_the_penalty():
    metric = metrics.BratsHausdorffDistance95Metric()
    assert metric(empty(), empty()).item() == 0.0
    assert metric(cube(), empty()).item() == pytest.approx(PENALTY)
    assert metric(empty(), cube()).item() == pytest.approx(PENALTY)
    assert metrics.BRATS_HD95_PENALTY_MM == PENALTY


def test_hd95_applies_the_empty_rule_per_channel():
    metric = metrics.BratsHausdorffDistance95Metric()
    pred = torch.cat([empty(), cube(), empty(), cube((2, 0, 0))], dim=1)
    ref = torch.cat([empty(), empty(), cube(), cube()], dim=1)
    result = metric(pred, ref)[0].tolist()
    assert result == pytest.approx([0.0, PENALTY, PENALTY, 2.0])


@pytest.mark.parametrize("axis, expected_mm", [(0, 6.0), (1, 3.0), (2, 1.5)])
def test_hd95_of_a_shifted_cube_is_the_shift_in_mm_from_an_anisotropic_affine(axis, expected_mm):
    """Voxel axes 0/1/2 are 2/1/0.5 mm; the affine also permutes and flips axes, as real ones do."""
    affine = torch.tensor(
        [[0.0, -1.0, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 0.5, 3.0], [0.0, 0.0, 0.0, 1.0]]
    )
    shift = [0, 0, 0]
    shift[axis] = 3
    metric = metrics.BratsHausdorffDistance95Metric()
    ref = MetaTensor(cube(), affine=affine)
    assert metric(cube(tuple(shift)), ref).item() == pytest.approx(expected_mm)
    metric.reset()
    # as the evaluation handler passes them: lists of per-case [C, H, W, D] tensors
    assert metric([cube(tuple(shift))[0]], [MetaTensor(cube()[0], affine=affine)]).item() == pytest.approx(expected_mm)


def test_hd95_without_an_affine_is_in_voxels():
    metric = metrics.BratsHausdorffDistance95Metric()
    assert metric(cube((0, 0, 3)), cube()).item() == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# label maps


def test_regions_are_painted_nested_wt_then_tc_then_et():
    # voxels along one line: background, edema only, core, enhancing, ET outside TC, TC outside WT
    tc = torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.float32)
    wt = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.float32)
    et = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.float32)
    regions = torch.stack([tc, wt, et]).reshape(3, 6, 1, 1)
    labels = label_maps.regions_to_brats_labels(regions)
    assert labels.shape == (1, 6, 1, 1)
    assert labels.dtype == torch.uint8
    assert labels.flatten().tolist() == [0, 2, 1, 4, 4, 1]


def test_regions_to_labels_rejects_anything_but_three_channels():
    with pytest.raises(ValueError, match="3 region channels"):
        label_maps.regions_to_brats_labels(torch.zeros(4, 2, 2, 2))


def test_label_painting_round_trips_monai_region_conversion():
    """Painting TC/WT/ET of a BraTS label map gives the label map back."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4], size=(1, 8, 8, 8)).astype(np.uint8)
    regions = ConvertToMultiChannelBasedOnBratsClasses()(labels)
    painted = label_maps.RegionsToBratsLabelsd(keys="seg")({"seg": torch.as_tensor(regions)})["seg"]
    np.testing.assert_array_equal(painted.numpy(), labels)


def test_save_label_map_writes_uint8_case_file_with_the_affine_and_no_temp_file(tmp_path):
    affine = np.array([[-1.5, 0, 0, 90.0], [0, -1.5, 0, 120.0], [0, 0, 2.0, -60.0], [0, 0, 0, 1]])
    labels = torch.zeros(1, 5, 6, 7, dtype=torch.uint8)
    labels[0, 1:3, 2:4, 3:6] = 2
    labels[0, 2, 3, 4] = 4
    labels[0, 1, 2, 3] = 1
    out = tmp_path / "pred"
    writer = label_maps.SaveBratsLabelMapd(keys="seg", output_dir=str(out))
    data = {"seg": MetaTensor(labels, affine=torch.as_tensor(affine)), "case_id": "BraTS2021_00042"}
    result = writer(data)
    assert result["seg"] is data["seg"], "the writer passes the data through"
    assert [p.name for p in out.iterdir()] == ["BraTS2021_00042.nii.gz"], "one file per case, no temp file"
    image = nib.load(str(out / "BraTS2021_00042.nii.gz"))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), labels[0].numpy())


# ---------------------------------------------------------------------------------------------
# summary


def test_metric_summary_of_metrics_saver_csvs(tmp_path):
    (tmp_path / "dice_raw.csv").write_text(
        "filename,class0,class1,class2,mean\n"
        "case_a,0.2,1.0,0.5,0.5666\n"
        "case_b,0.4,0.0,0.5,0.3\n"
        "case_c,0.9,0.5,0.5,0.6333\n"
    )
    (tmp_path / "hd95_wt_raw.csv").write_text(
        "filename,class0,mean\ncase_a,3.0,3.0\ncase_b,5.0,5.0\ncase_c,373.13,373.13\n"
    )
    (tmp_path / "dice_summary.csv").write_text("class,mean\nclass0,0.5\n")  # not per case: ignored
    summary = metrics.write_metric_summary(str(tmp_path))

    assert set(summary) == {"dice_class0", "dice_class1", "dice_class2", "hd95_wt"}
    a = summary["dice_class0"]
    assert a["mean"] == pytest.approx(0.5)
    assert a["median"] == pytest.approx(0.4)
    assert a["std"] == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 3))  # population std, as MONAI's
    assert a["n"] == 3
    assert summary["dice_class1"]["median"] == pytest.approx(0.5)
    assert summary["dice_class2"]["std"] == pytest.approx(0.0)
    hd = summary["hd95_wt"]
    assert hd["mean"] == pytest.approx((3.0 + 5.0 + 373.13) / 3)
    assert hd["median"] == pytest.approx(5.0)

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["dice_raw.csv", "dice_summary.csv", "hd95_wt_raw.csv", "summary.json"], "a temp file was left"



@pytest.mark.parametrize("bundle", ["teacher", "kd_student", "ensemble", "omni_student"])
def test_checkpoint_selection_does_not_reward_a_network_that_never_predicts_et(bundle):
    """Case A has no ET, case B has. Network X predicts no ET anywhere; Y finds B's ET and has a false
    positive on A. Under the BraTS rule both score 0.5 (X: 1 + 0, Y: 0 + 1), so on a small validation
    set a checkpoint that has not learned ET yet wins ties and early plateaus. The validation Dice
    that selects ``model.pt`` must prefer Y."""
    metric_id = "validate#key_metric#val_mean_dice#metric_fn"
    reference = torch.cat([empty(), cube()])  # [2, 1, ...]: A, B
    never = torch.cat([empty(), empty()])
    finds = torch.cat([cube(), cube()])
    scores = {}
    for name, pred in (("never", never), ("finds", finds)):
        metric = bundle_config(bundle, "train.json").get_parsed_content(metric_id)
        metric(pred, reference)
        scores[name] = metric.aggregate().item()
    assert scores["finds"] > scores["never"], scores
