"""tools.et_errors counts ET Dice on ET cases and where false ET lies on cases without ET."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tools.et_errors import EtErrors, model_et_errors


def test_counts_against_a_hand_made_pair_of_cases():
    errors = EtErrors("teacher")
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[0, :, :] = 2
    reference[1, :2, :] = 1
    reference[1, 2:, :] = 4  # 8 ET voxels
    prediction = reference.copy()
    prediction[1, 3, :] = 1  # 4 of the 8 ET voxels missed
    errors.add_case(prediction, reference)  # ET case: Dice = 2*4 / (4 + 8)

    no_et = reference.copy()
    no_et[no_et == 4] = 1
    painted = no_et.copy()
    painted[1, :2, :2] = 4  # 4 false ET voxels in the core (label 1)
    painted[0, 0, 0] = 4  # 1 in the oedema
    painted[3, 3, 3] = 4  # 1 in the background
    errors.add_case(painted, no_et)
    summary = errors.summary()
    assert summary["et_dice_on_et_cases"] == pytest.approx(8 / 12)
    assert (summary["cases_with_et"], summary["cases_without_et"], summary["cases_with_false_et"]) == (1, 1, 1)
    assert summary["false_et_voxels_by_reference_label"] == {0: 1, 1: 4, 2: 1}
    # predicted / reference volume: ET case TC 16/16, WT 32/32, ET 4/8; no-ET case TC 18/16, WT 33/32 (ET not counted)
    assert summary["median_volume_ratio"] == pytest.approx({"tc": (1 + 18 / 16) / 2, "wt": (1 + 33 / 32) / 2, "et": 0.5})


def test_reads_an_experiment_folder_and_names_a_missing_evaluation(tmp_path):
    affine = np.eye(4)
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[1, :, :] = 1
    nib.save(nib.Nifti1Image(reference, affine), tmp_path / "case_a_seg.nii.gz")
    (tmp_path / "datalist.json").write_text(
        json.dumps({"dataset_dir": str(tmp_path), "training": [{"case_id": "case_a", "label": "case_a_seg.nii.gz"}]})
    )
    saved = tmp_path / "fold0" / "teacher" / "evaluate" / "labels"
    saved.mkdir(parents=True)
    prediction = reference.copy()
    prediction[1, 0, :] = 4
    nib.save(nib.Nifti1Image(prediction, affine), saved / "case_a.nii.gz")
    summary = model_et_errors(tmp_path, 0, "teacher").summary()
    assert summary["cases_with_false_et"] == 1 and summary["false_et_voxels_by_reference_label"][1] == 4
    with pytest.raises(FileNotFoundError, match="baseline evaluation of fold 0"):
        model_et_errors(tmp_path, 0, "baseline")
