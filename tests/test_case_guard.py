"""brats_kd.validation.CaseGuard: the input guard of every bundle's inference, evaluation and pseudo-labelling."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from brats_kd.validation import CaseGuard

MODALITIES = ["t1", "t1ce", "t2", "flair"]


def write(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def case(tmp_path, name, shape=(6, 6, 6), label=None, **changes):
    """A training-style entry with four modality files and, optionally, a label; ``changes`` replace arrays."""
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    entry = {"case_id": name}
    for m in MODALITIES:
        array = changes.get(m, rng.random(shape).astype(np.float32) + 0.1)
        entry[m] = write(folder / f"{m}.nii.gz", array)
    if label is not None:
        entry["label"] = write(folder / "seg.nii.gz", label)
    return entry


def test_bad_cases_are_named_once_each_and_the_run_ends_non_zero(tmp_path, caplog):
    nan = np.full((6, 6, 6), np.nan, np.float32)
    cases = [
        case(tmp_path, "good", label=np.array([0, 1, 2, 4] * 54, np.uint8).reshape(6, 6, 6)),
        case(tmp_path, "nan", t2=nan),
        case(tmp_path, "shape", flair=np.ones((6, 6, 5), np.float32)),
        case(tmp_path, "labels", label=np.full((6, 6, 6), 3, np.uint8)),
        {"case_id": "missing", **{m: str(tmp_path / "nowhere.nii.gz") for m in MODALITIES}},
    ]
    guard = CaseGuard(cases, MODALITIES, label_map={"orig": [1, 2, 4], "target": [1, 2, 4]}, what="evaluation")
    with caplog.at_level(logging.ERROR, logger="brats_kd.validation"):
        assert [c["case_id"] for c in guard.usable()] == ["good"]
        guard.usable()  # checked once: no second round of messages
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(line.count("\n") == 0 for line in lines)
    expected = {"nan": "NaN/Inf", "shape": "shape", "labels": "label values {3}", "missing": "missing"}
    for name, problem in expected.items():
        (line,) = [line for line in lines if line.startswith(f"{name}: skipped")]
        assert problem in line, line
    with pytest.raises(SystemExit) as ended:
        guard.finish()
    assert "evaluation: 4 of 5 case(s) skipped" in str(ended.value.code) and "missing" in str(ended.value.code)


def test_an_inference_entry_of_one_msd_file_is_checked_as_four_channels(tmp_path):
    msd = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    good = write(tmp_path / "good.nii.gz", np.ones((5, 5, 5, 4), np.float32))
    three = write(tmp_path / "three.nii.gz", np.ones((5, 5, 5, 3), np.float32))
    guard = CaseGuard([{"case_id": "g", "image": [good]}, {"case_id": "t", "image": [three]}], MODALITIES, msd)
    assert [c["case_id"] for c in guard.usable()] == ["g"]
    assert "4-D with 4 channels" in guard.skipped["t"]
    CaseGuard([{"case_id": "g", "image": [good]}], MODALITIES, msd).finish()  # all usable: returns
