"""Pseudo-labelling with the ensemble bundle (``configs/inference.json`` + ``configs/pseudo_label.json``):
output only into its own folder, refusal of the data folder, label maps in original geometry, the
ensemble average, skipping finished cases on a rerun, soft labels, ``min_confidence`` and the
combined datalist. The pseudo-labelled outputs are shared with ``test_omni_bundle.py`` through
:func:`pseudo_labelled` (made once per test run, whatever the xdist worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import build_once
from tests.test_ensemble_bundle import (
    ENSEMBLE,
    ENSEMBLE_TINY,
    MEMBERS,
    assert_label_map_like,
    member_network,
    run_parallel,
    trained_members,
)

PSEUDO_CONFIGS = ["inference.json", "pseudo_label.json"]
CONFIDENCE_LINE = "confidence 0."  # SaveConfidenced logs "<case>: confidence 0.xxxx (...)" per segmented case

_SESSION: dict[str, object] = {}


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder`` (hidden files included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def pseudo_labelled(tmp_path_factory, datalist, phantom_dataset) -> dict:
    """Hard pseudo labels (the defaults: 4-flip TTA, ET under 32 voxels to necrosis), soft pseudo labels (without
    TTA), and a run that must be refused (output = the data folder), side by side, once per test run for every
    xdist worker (:func:`tests.conftest.build_once`; ``test_omni_bundle.py`` may run on the other worker). The
    data folder's snapshot is taken before any of them. Treat ``work`` as read-only: other workers read it."""
    if "runs" not in _SESSION:
        models_dir = trained_members(tmp_path_factory, datalist)
        inside = phantom_dataset / sorted(p.name for p in phantom_dataset.iterdir() if p.is_dir())[0] / "pseudo"
        common = dict(ENSEMBLE_TINY, datalist=str(datalist), models_dir=str(models_dir))

        def label(work: Path) -> None:
            before = {"data": snapshot(phantom_dataset), "datalist": hashlib.sha256(Path(datalist).read_bytes()).hexdigest()}
            (work / "before.json").write_text(json.dumps(before))
            jobs = {
                "hard": dict(common, pseudo_label_dir=str(work / "hard")),
                "soft": dict(common, pseudo_label_dir=str(work / "soft"), soft_labels=True, tta=False),
                "refuse_data": dict(common, pseudo_label_dir=str(phantom_dataset), combined_datalist=str(work / "x.json")),
            }
            results = run_parallel({k: (ENSEMBLE, PSEUDO_CONFIGS, work, v) for k, v in jobs.items()}, check=False)
            for name in ("hard", "soft"):
                assert results[name].returncode == 0, f"{name} pseudo-labelling failed:\n{results[name].stdout[-4000:]}"
            (work / "results.json").write_text(json.dumps({k: [r.args, r.returncode] for k, r in results.items()}))

        key = {"configs": PSEUDO_CONFIGS, "common": common, "data": str(phantom_dataset)}
        work = build_once(tmp_path_factory, "pseudo-labels", key, label)
        before = json.loads((work / "before.json").read_text())
        # run_parallel leaves each job's log (stdout and stderr) in <cwd>/<name>.log
        runs = {
            name: subprocess.CompletedProcess(args, code, (work / f"{name}.log").read_text())
            for name, (args, code) in json.loads((work / "results.json").read_text()).items()
        }
        _SESSION.update(
            runs=runs, work=work, models_dir=models_dir, data_before=before["data"], datalist_before=before["datalist"],
            inside=inside, common=common,
        )
    return _SESSION


@pytest.fixture(scope="module")
def session(tmp_path_factory, datalist, phantom_dataset) -> dict:
    return pseudo_labelled(tmp_path_factory, datalist, phantom_dataset)


@pytest.fixture(scope="module")
def rerun(session, datalist, tmp_path_factory) -> dict:
    """The hard run again, in a copy of its output folder (the shared one stays read-only), with min_confidence at
    the highest case confidence (drops the others) and its combined datalist written to a new path; file mtimes
    are recorded before it."""
    work = tmp_path_factory.mktemp("rerun")
    hard = work / "hard"
    shutil.copytree(session["work"] / "hard", hard)
    confidences = {p.stem: json.loads(p.read_text())["confidence"] for p in hard.glob("*.json") if p.name != "datalist.json"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in hard.iterdir()}
    threshold = max(confidences.values())
    overrides = dict(session["common"], pseudo_label_dir=str(hard), combined_datalist=str(work / "rerun.json"),
                     min_confidence=threshold)
    result = run_parallel({"rerun": (ENSEMBLE, PSEUDO_CONFIGS, work, overrides)})["rerun"]
    return {"log": result.stdout, "mtimes": mtimes, "confidences": confidences, "threshold": threshold, "hard": hard,
            "datalist": json.loads((work / "rerun.json").read_text())}


def unlabeled(datalist_json) -> list[dict]:
    return datalist_json["unlabeled"]


# ---------------------------------------------------------------------------------------------
# the data folder is never written


def test_refuses_the_data_folder_as_output(session):
    result = session["runs"]["refuse_data"]
    assert result.returncode != 0
    assert "is the data folder" in result.stdout and "refusing to write pseudo labels there" in result.stdout
    assert "case(s) to pseudo-label" not in result.stdout, "the guard must run before anything else"
    assert not (session["work"] / "x.json").exists()


def test_data_folder_and_input_datalist_are_byte_identical_after_all_runs(session, rerun, phantom_dataset, datalist):
    assert snapshot(phantom_dataset) == session["data_before"], "pseudo-labelling changed or added files in the data folder"
    assert hashlib.sha256(Path(datalist).read_bytes()).hexdigest() == session["datalist_before"]


def test_output_guard_refuses_a_subfolder_or_parent_of_the_data_and_the_input_datalist(
    session, datalist, datalist_json, phantom_dataset
):
    from brats_kd.pseudo_label import check_output_paths

    work = session["work"]
    with pytest.raises(ValueError, match="is inside the data folder"):
        check_output_paths(str(session["inside"]), str(work / "a.json"), str(datalist), datalist_json)
    with pytest.raises(ValueError, match="contains the data folder"):
        check_output_paths(str(phantom_dataset.parent), str(work / "a.json"), str(datalist), datalist_json)
    with pytest.raises(ValueError, match="is the input datalist"):
        check_output_paths(str(work / "ok"), str(datalist), str(datalist), datalist_json)
    with pytest.raises(ValueError, match="inside the data folder"):
        check_output_paths(str(work / "ok"), str(phantom_dataset / "new.json"), str(datalist), datalist_json)
    check_output_paths(str(work / "ok"), str(work / "ok" / "datalist.json"), str(datalist), datalist_json)
    assert not (work / "ok").exists() and not session["inside"].exists(), "the guard itself writes nothing"


# ---------------------------------------------------------------------------------------------
# outputs


def test_hard_pseudo_labels_are_brats_label_maps_in_original_geometry(session, datalist_json):
    hard = session["work"] / "hard"
    expected = {c["case_id"] for c in unlabeled(datalist_json)}
    assert {p.name[: -len(".nii.gz")] for p in hard.glob("*.nii.gz")} == expected
    assert not list(hard.glob(".*")), "no temporary files may be left behind"
    for case in unlabeled(datalist_json):
        assert_label_map_like(hard / f"{case['case_id']}.nii.gz", Path(datalist_json["dataset_dir"]) / case["t1"])
        sidecar = json.loads((hard / f"{case['case_id']}.json").read_text())
        assert sidecar["case_id"] == case["case_id"] and sidecar["label_format"] == "labels"
        assert 0.0 <= sidecar["confidence"] <= 1.0


def test_combined_datalist_holds_manual_and_pseudo_training_entries(session, datalist_json):
    combined = json.loads((session["work"] / "hard" / "datalist.json").read_text())
    for key in ("layout", "label_map", "channel_index", "dataset_dir", "unlabeled"):
        assert combined[key] == datalist_json[key]
    manual = [e for e in combined["training"] if e["source"] == "manual"]
    pseudo = [e for e in combined["training"] if e["source"] == "pseudo"]
    assert len(manual) + len(pseudo) == len(combined["training"])
    assert [{k: e[k] for k in c} for e, c in zip(manual, datalist_json["training"])] == datalist_json["training"]
    assert all(e["label_map"] == datalist_json["label_map"] and e["label_format"] == "labels" for e in manual)
    assert sorted(e["case_id"] for e in pseudo) == sorted(c["case_id"] for c in unlabeled(datalist_json))
    by_id = {c["case_id"]: c for c in unlabeled(datalist_json)}
    for entry in pseudo:
        assert entry["fold"] == -1 and entry["label_format"] == "labels"
        assert entry["label_map"] == {"orig": [1, 2, 4], "target": [1, 2, 4]}, "pseudo labels are BraTS 0/1/2/4"
        assert os.path.isabs(entry["label"]) and Path(entry["label"]).is_file()
        for modality in ("t1", "t1ce", "t2", "flair"):
            assert entry[modality] == by_id[entry["case_id"]][modality]  # relative to dataset_dir, like manual entries
    assert combined["dropped"] == []
    info = combined["pseudo_label"]
    assert info["ensemble_fold"] == 0 and info["members"] == list(MEMBERS) and info["tta"] is True


def test_soft_labels_are_the_mean_of_the_members_sigmoid_outputs(session, datalist_json):
    """Soft labels: 3 channels of 16-bit probabilities (NIfTI has no float16) in original geometry,
    equal to the mean of the three members' sigmoid outputs computed here member by member."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity

    soft = session["work"] / "soft"
    case = unlabeled(datalist_json)[0]
    image_files = [Path(datalist_json["dataset_dir"]) / case[m] for m in ("t1", "t1ce", "t2", "flair")]
    stored = nib.load(str(soft / f"{case['case_id']}.nii.gz"))
    reference = nib.load(str(image_files[0]))
    assert stored.shape == reference.shape + (3,)
    assert stored.get_data_dtype() == np.uint16, "16 bits per probability"
    np.testing.assert_allclose(stored.affine, reference.affine, atol=1e-5)
    probs = np.moveaxis(np.asarray(stored.get_fdata(), dtype=np.float32), -1, 0)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert json.loads((soft / f"{case['case_id']}.json").read_text())["label_format"] == "probabilities"

    image = torch.as_tensor(np.stack([nib.load(str(f)).get_fdata(dtype=np.float32) for f in image_files]))
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(image)[None]
    outputs = []
    for member in MEMBERS:
        net = member_network(member)
        state = torch.load(session["models_dir"] / member / "model.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        with torch.no_grad():
            logits = sliding_window_inference(image, ENSEMBLE_TINY["roi_size"], 1, net.eval(), overlap=0.5, mode="gaussian")
        outputs.append(torch.sigmoid(torch.as_tensor(logits))[0])
    expected = torch.stack(outputs).mean(0).numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert not np.allclose(expected, outputs[0].numpy(), atol=1e-3), "the members must differ for this check to mean anything"


def test_rerun_skips_finished_cases_and_min_confidence_drops_the_less_confident(rerun, datalist_json):
    hard = rerun["hard"]
    ids = sorted(c["case_id"] for c in unlabeled(datalist_json))
    assert f"skipped {len(ids)} case(s) already pseudo-labelled" in rerun["log"]
    assert "0 case(s) to pseudo-label" in rerun["log"]
    assert CONFIDENCE_LINE not in rerun["log"].replace("with confidence below", ""), "a finished case was segmented again"
    assert {p.name: p.stat().st_mtime_ns for p in hard.iterdir()} == rerun["mtimes"], "a finished case was rewritten"

    combined = rerun["datalist"]
    kept = {e["case_id"] for e in combined["training"] if e["source"] == "pseudo"}
    dropped = {d["case_id"] for d in combined["dropped"]}
    assert kept | dropped == set(ids) and not kept & dropped
    assert dropped == {c for c, v in rerun["confidences"].items() if v < rerun["threshold"]}
    assert dropped, "the phantom cases should not all tie in confidence"
    assert all(d["confidence"] < rerun["threshold"] for d in combined["dropped"])
    assert "dropped" in rerun["log"] and all(c in rerun["log"] for c in dropped)


def test_invalid_existing_output_is_redone_and_combined_datalist_is_idempotent(session, datalist_json, tmp_path):
    from brats_kd.pseudo_label import pending_cases, write_combined_datalist

    out = tmp_path / "copy"
    shutil.copytree(session["work"] / "hard", out)
    cases = [
        {
            "case_id": c["case_id"],
            "image": [str(Path(datalist_json["dataset_dir"]) / c[m]) for m in ("t1", "t1ce", "t2", "flair")],
        }
        for c in unlabeled(datalist_json)
    ]
    assert pending_cases(cases, str(out)) == []
    assert [c["case_id"] for c in pending_cases(cases, str(out), soft=True)] == [c["case_id"] for c in cases]
    (out / f"{cases[0]['case_id']}.nii.gz").write_bytes(b"truncated")
    assert [c["case_id"] for c in pending_cases(cases, str(out))] == [cases[0]["case_id"]]
    # an earlier combined datalist as input: manual entries kept once, pseudo entries not stacked
    combined = json.loads((session["work"] / "hard" / "datalist.json").read_text())
    again = write_combined_datalist(combined, str(session["work"] / "hard"), str(tmp_path / "again.json"))
    assert again["training"] == combined["training"]


def test_mean_confidence_definition():
    from brats_kd.pseudo_label import mean_confidence

    probs = torch.zeros(3, 2, 2, 1)
    assert mean_confidence(probs) == (0.0, 0)  # nothing predicted: no confidence
    probs[1, 0, 0, 0] = 0.9  # one WT voxel; TC and ET certain (p = 0) there
    probs[1, 1, 1, 0] = 0.3  # background voxel: not counted
    confidence, count = mean_confidence(probs)
    assert count == 1 and confidence == pytest.approx((1.0 + 0.9 + 1.0) / 3)
