"""The teacher bundle end to end: workflow properties, network I/O, training and resume, evaluation,
inference, the baseline and skip0 overrides, and the BraTS label mapping of every supported layout.

Bundle commands run in subprocesses (:mod:`tests.bundle_runner`); config-only checks run in-process
(the bundle's code is the installed ``brats_kd`` package).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_runner import BUNDLES, TINY, bundle_command, bundle_config, run_bundle

TEACHER = BUNDLES / "teacher"
ITERATION_LINE = re.compile(r"Epoch: (\d+)/(\d+), Iter: \d+/\d+")
REGIONS = ("tc", "wt", "et")
HD95_PENALTY_MM = 373.13
BRATS_LABELS = {0, 1, 2, 4}


def iteration_epochs(log: str) -> set[int]:
    """Epoch numbers of the trainer's per-iteration log lines."""
    return {int(m.group(1)) for m in ITERATION_LINE.finditer(log)}


def trained_epochs(checkpoint: dict) -> int:
    """Completed epochs recorded in a checkpoint's Ignite trainer state."""
    state = checkpoint["trainer"]
    return state["iteration"] // state["epoch_length"]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def fold_case_ids(datalist_json: dict, fold: int = 0) -> list[str]:
    return [c["case_id"] for c in datalist_json["training"] if c["fold"] == fold]


def read_raw_csv(path: Path) -> dict[str, dict[str, float]]:
    """MetricsSaver ``*_raw.csv``: case id → {column: value}."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {row["filename"]: {k: float(v) for k, v in row.items() if k != "filename"} for row in rows}


def assert_label_map_like(pred_path: Path, reference_path: Path) -> np.ndarray:
    """The prediction has the reference image's grid, is uint8, and holds only BraTS labels."""
    pred, ref = nib.load(str(pred_path)), nib.load(str(reference_path))
    assert pred.shape == ref.shape, f"{pred_path.name}: shape {pred.shape} != {ref.shape}"
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5, err_msg=f"{pred_path.name}: affine differs")
    assert pred.get_data_dtype() == np.uint8, f"{pred_path.name}: stored as {pred.get_data_dtype()}"
    data = np.asanyarray(pred.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data).tolist()) <= BRATS_LABELS, f"{pred_path.name}: values {np.unique(data)}"
    return data


# ---------------------------------------------------------------------------------------------
# configs, network


def test_train_and_infer_workflows_have_the_required_properties(datalist):
    from monai.bundle import ConfigWorkflow

    overrides = dict(TINY, bundle_root=str(TEACHER), datalist=str(datalist), cache_rate=0.0)
    for config, workflow_type in (("train.json", "train"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(TEACHER / "configs" / config),
            workflow_type=workflow_type,
            logging_file=False,  # leave pytest's logging alone
            **overrides,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], f"{config}: missing or misnamed workflow properties"


def test_network_from_inference_config_maps_4x64_cubed_to_3x64_cubed():
    """``verify_net_in_out``-style: the default network and the shapes stated in metadata.json."""
    meta = json.loads((TEACHER / "configs" / "metadata.json").read_text())["network_data_format"]
    n = 2  # spatial_shape "32*n": four halvings with instance norm need at least 2 voxels at the bottleneck
    size = [eval(s, {"n": n}) for s in meta["inputs"]["image"]["spatial_shape"]]  # noqa: S307 (own metadata)
    assert size == [64, 64, 64]
    in_channels, out_channels = meta["inputs"]["image"]["num_channels"], meta["outputs"]["pred"]["num_channels"]
    assert (in_channels, out_channels) == (4, 3)
    net = bundle_config(TEACHER, "inference.json").get_parsed_content("network_def")
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, in_channels, *size))
    assert tuple(out.shape) == (1, out_channels, 64, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def first_conv_in_channels(net) -> int:
    return net.encoder[0].conv1.conv.in_channels


def test_baseline_override_builds_a_one_channel_t1ce_network(datalist_json, datalist):
    teacher = bundle_config(TEACHER, "train.json", datalist=str(datalist), **TINY)
    baseline = bundle_config(TEACHER, ["train.json", "baseline.json"], datalist=str(datalist), **TINY)
    assert first_conv_in_channels(teacher.get_parsed_content("network_def")) == 4
    net = baseline.get_parsed_content("network_def")
    assert first_conv_in_channels(net) == 1
    with torch.no_grad():
        assert tuple(net(torch.zeros(1, 1, 32, 32, 32)).shape) == (1, 3, 32, 32, 32)
    # The baseline's input is the teacher's T1ce channel (channel 1 of t1, t1ce, t2, flair).
    case = teacher.get_parsed_content("val_datalist")[0]
    teacher_image = teacher.get_parsed_content("validate#preprocessing")(dict(case))["image"]
    baseline_image = baseline.get_parsed_content("validate#preprocessing")(dict(case))["image"]
    assert baseline_image.shape[0] == 1 and teacher_image.shape[0] == 4
    torch.testing.assert_close(baseline_image[0], teacher_image[1])


def test_skip0_override_removes_every_skip_concatenation():
    filters = TINY["filters"]
    unet = bundle_config(TEACHER, "train.json", **TINY).get_parsed_content("network_def")
    plain = bundle_config(TEACHER, ["train.json", "skip0.json"], **TINY).get_parsed_content("network_def")
    # Decoder blocks run coarse to fine; the first one sits just above the bottleneck.
    assert unet.decoder[0].conv1.conv.in_channels == 2 * filters[-2]
    assert plain.decoder[0].conv1.conv.in_channels == filters[-2]
    assert [d.conv1.conv.in_channels for d in plain.decoder] == list(reversed(filters[:-1]))
    with torch.no_grad():
        assert tuple(plain(torch.zeros(1, 4, 32, 32, 32)).shape) == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("layout", ["brats2023", "msd"])
def test_preprocessing_maps_each_layouts_labels_to_tc_wt_et(layout, tmp_path):
    """2023's ET=3 and MSD's swapped 1/2 (and its 4-D image) reach the network as TC/WT/ET of BraTS 1/2/4."""
    from monai.transforms import CenterSpatialCrop, Compose, NormalizeIntensity, Resize

    from tools.phantom import MODALITIES, make_case, write_dataset
    from tools.prepare import prepare

    size, seed, crop, spatial = 32, 3, [24, 24, 16], [32, 32, 32]
    ids = write_dataset(tmp_path / layout, layout=layout, cases=2, unlabeled=0, size=size, seed=seed)
    prepare(tmp_path / layout, tmp_path / "datalist.json", folds=2, seed=0)
    parser = bundle_config(
        TEACHER, "train.json", datalist=str(tmp_path / "datalist.json"), crop_size=crop, spatial_size=spatial
    )
    preprocessing = Compose(parser.get_parsed_content("preprocessing_transforms"))
    entries = {c["case_id"]: c for c in parser.get_parsed_content("training_cases")}

    resample_label = Compose([CenterSpatialCrop(crop), Resize(spatial, mode="nearest")])
    resample_image = Compose(
        [
            NormalizeIntensity(nonzero=True, channel_wise=True),
            CenterSpatialCrop(crop),
            Resize(spatial, mode="trilinear"),
        ]
    )
    for index, case_id in enumerate(ids):
        case = make_case(index, size, seed)
        label = case.label
        regions = np.stack([(label == 1) | (label == 4), label > 0, label == 4]).astype(np.float32)
        # the phantom case must exercise every label, or a wrong mapping could go unnoticed
        assert all(np.any(label == v) for v in (1, 2, 4)), f"{case_id}: phantom case lacks a label"
        images = np.stack([case.images[m] for m in MODALITIES])
        # the brain's bounding box: non-zero in any modality
        corners = np.argwhere(np.any(images != 0, axis=0))
        brain = (slice(None),) + tuple(slice(lo, hi + 1) for lo, hi in zip(corners.min(0), corners.max(0)))
        assert images[brain].shape[1:] != images.shape[1:], "the phantom's brain must not fill the volume"
        expected = np.asarray(resample_label(regions[brain]))
        out = preprocessing(entries[case_id])
        np.testing.assert_array_equal(np.asarray(out["label"]), expected, err_msg=f"{layout} {case_id}: TC/WT/ET")
        np.testing.assert_allclose(
            np.asarray(out["image"]), np.asarray(resample_image(images[brain])), atol=1e-4,
            err_msg=f"{layout} {case_id}: image channels are not t1, t1ce, t2, flair",
        )


# ---------------------------------------------------------------------------------------------
# training


def test_two_epoch_training_writes_model_and_resumable_checkpoint(trained_teacher_run):
    run = trained_teacher_run
    model = load_checkpoint(run.ckpt_dir / "model.pt")
    assert set(model) == {"model", "record"}
    # what a KD student checks before distilling this teacher (tests/test_kd_softmax.py)
    assert model["record"] == {"activation": "sigmoid", "modalities": ["t1", "t1ce", "t2", "flair"]}
    net = bundle_config(TEACHER, "train.json", **TINY).get_parsed_content("network_def")
    net.load_state_dict(model["model"], strict=True)

    checkpoint = load_checkpoint(run.ckpt_dir / "checkpoint.pt")
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)
    assert trained_epochs(checkpoint) == 2
    assert checkpoint["trainer"]["max_epochs"] == 2
    assert checkpoint["optimizer"]["state"], "the optimizer never stepped"
    assert checkpoint["lr_scheduler"]["last_epoch"] == 2  # stepped once per validation round
    assert iteration_epochs(run.log) == {1, 2}
    assert list(run.output_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert not [p.name for p in run.ckpt_dir.iterdir() if p.name not in {"model.pt", "checkpoint.pt"}]


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(trained_teacher_run, tmp_path):
    ckpt = shutil.copytree(trained_teacher_run.ckpt_dir, tmp_path / "models")
    before = load_checkpoint(ckpt / "checkpoint.pt")
    overrides = dict(trained_teacher_run.overrides, ckpt_dir=str(ckpt), output_dir=str(tmp_path / "runs"))
    proc = run_bundle("teacher", "train.json", cwd=tmp_path, **dict(overrides, epochs=3, resume=True))
    assert iteration_epochs(proc.stdout) == {3}, "a resumed run must train only the missing epoch"
    after = load_checkpoint(ckpt / "checkpoint.pt")
    assert trained_epochs(after) == 3
    assert after["lr_scheduler"]["last_epoch"] == before["lr_scheduler"]["last_epoch"] + 1
    assert not torch.equal(after["model"]["head.conv.conv.weight"], before["model"]["head.conv.conv.weight"])


@pytest.mark.parametrize("bundle", ["teacher", "kd_student"])
def test_resume_flag_reads_command_line_strings(bundle):
    """``--resume false`` reaches the config as the string 'false' (Fire parses only Python literals),
    which is truthy: the run lists must use the parsed flag ``resume_enabled``, never ``@resume`` itself."""
    from fire.parser import DefaultParseValue

    assert DefaultParseValue("false") == "false" and DefaultParseValue("True") is True
    cases = {"false": False, "no": False, "0": False, False: False, "true": True, "yes": True, "1": True, True: True}
    for value, expected in cases.items():
        parser = bundle_config(bundle, "train.json", resume=value)
        assert parser.get_parsed_content("resume_enabled") is expected, f"resume={value!r}"
    for configs in (["train.json"], ["train.json", "multi_gpu_train.json"]):
        run = [str(step) for step in bundle_config(bundle, configs)["run"]]
        resuming = [step for step in run if "checkpoint_loader" in step]
        assert resuming and all("@resume_enabled" in step for step in resuming), f"{configs}: {run}"
        assert not any(re.search(r"@resume\b", step) for step in run), f"{configs}: {run}"


# ---------------------------------------------------------------------------------------------
# evaluation and inference


@pytest.mark.slow
def test_evaluate_writes_per_case_metrics_summary_and_label_maps(trained_teacher_run, datalist_json, tmp_path):
    out = tmp_path / "eval"
    overrides = dict(trained_teacher_run.overrides, ckpt_dir=str(trained_teacher_run.ckpt_dir), output_dir=str(out))
    overrides.pop("epochs")
    run_bundle("teacher", ["train.json", "evaluate.json"], cwd=tmp_path, **overrides)

    cases = fold_case_ids(datalist_json)
    assert len(cases) == 4
    summary = json.loads((out / "summary.json").read_text())
    for metric in [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]:
        per_case = read_raw_csv(out / f"{metric}_raw.csv")
        assert sorted(per_case) == sorted(cases), f"{metric}: one row per test-fold case, named by case id"
        values = [row["class0"] for row in per_case.values()]
        assert all(math.isfinite(v) for v in values), f"{metric}: {values}"
        if metric.startswith("dice"):
            assert all(0.0 <= v <= 1.0 for v in values), f"{metric}: {values}"
        else:
            assert all(0.0 <= v <= HD95_PENALTY_MM + 1e-3 for v in values), f"{metric}: {values}"
        stats = summary[metric]
        assert stats["mean"] == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert stats["median"] == pytest.approx(statistics.median(values), abs=1e-6)
        assert stats["std"] == pytest.approx(statistics.pstdev(values), abs=1e-6)

    predictions = out / "predictions"
    assert sorted(p.name for p in predictions.iterdir()) == sorted(f"{c}.nii.gz" for c in cases)
    dataset_dir = Path(datalist_json["dataset_dir"])
    for entry in datalist_json["training"]:
        if entry["fold"] == 0:
            assert_label_map_like(predictions / f"{entry['case_id']}.nii.gz", dataset_dir / entry["label"])


def dice_of_region(pred: np.ndarray, ref: np.ndarray, labels: tuple[int, ...]) -> float:
    """Dice of a BraTS region (the label values it unites), with the BraTS rule: both empty = 1."""
    p, r = np.isin(pred, labels), np.isin(ref, labels)
    if not p.any() and not r.any():
        return 1.0
    return 2.0 * float((p & r).sum()) / float(p.sum() + r.sum())


REGION_LABELS = {"tc": (1, 4), "wt": (1, 2, 4), "et": (4,)}


@pytest.mark.parametrize("et_min_voxels", [0, 10**9])
def test_metrics_are_computed_from_the_saved_label_map(trained_teacher_run, datalist_json, tmp_path, et_min_voxels):
    """Every Dice in the table is the Dice of the label map written to disk (nested regions, after the ET
    post-processing), not of the raw thresholded channels; a threshold no ET reaches leaves no label 4."""
    out = tmp_path / "eval"
    overrides = dict(trained_teacher_run.overrides, ckpt_dir=str(trained_teacher_run.ckpt_dir), output_dir=str(out))
    overrides.pop("epochs")
    run_bundle("teacher", ["train.json", "evaluate.json"], cwd=tmp_path, et_min_voxels=et_min_voxels, **overrides)
    dataset_dir = Path(datalist_json["dataset_dir"])
    for region, labels in REGION_LABELS.items():
        table = read_raw_csv(out / f"dice_{region}_raw.csv")
        for entry in (e for e in datalist_json["training"] if e["fold"] == 0):
            saved = np.asanyarray(nib.load(str(out / "predictions" / f"{entry['case_id']}.nii.gz")).dataobj)
            if et_min_voxels:
                assert not (saved == 4).any(), f"{entry['case_id']}: ET left under et_min_voxels={et_min_voxels}"
            ref = np.asanyarray(nib.load(str(dataset_dir / entry["label"])).dataobj)
            expected = dice_of_region(saved, ref, labels)
            assert table[entry["case_id"]]["class0"] == pytest.approx(expected, abs=1e-5), (region, entry["case_id"])


@pytest.mark.slow
def test_inference_segments_the_datalists_unlabeled_cases_and_an_input_folder(
    trained_teacher_run, datalist_json, datalist, phantom_dataset, tmp_path
):
    folder = tmp_path / "cases"
    folder.mkdir()
    folder_cases = [c["case_id"] for c in datalist_json["training"][:2]]
    for case_id in folder_cases:
        shutil.copytree(phantom_dataset / case_id, folder / case_id)
    (folder / "notes.txt").write_text("not a case folder")
    unlabeled = [c["case_id"] for c in datalist_json["unlabeled"]]
    assert len(unlabeled) == 2

    out = tmp_path / "predictions"
    run_bundle(
        "teacher", "inference.json", cwd=tmp_path, datalist=str(datalist), input_dir=str(folder),
        ckpt_dir=str(trained_teacher_run.ckpt_dir), output_dir=str(out), **TINY,
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.nii.gz" for c in unlabeled + folder_cases)
    for case_id in unlabeled + folder_cases:
        assert_label_map_like(out / f"{case_id}.nii.gz", phantom_dataset / case_id / f"{case_id}_t1ce.nii.gz")


@pytest.mark.slow
def test_inference_skips_a_corrupt_case_in_one_line_and_ends_non_zero(
    trained_teacher_run, datalist_json, phantom_dataset, tmp_path
):
    """Two case folders, one with a truncated FLAIR: the good one is segmented, the bad one named in one
    line with its problem, no traceback, and the run exits non-zero with a summary."""
    good, bad = (c["case_id"] for c in datalist_json["training"][:2])
    folder = tmp_path / "cases"
    for case_id in (good, bad):
        shutil.copytree(phantom_dataset / case_id, folder / case_id)
    flair = folder / bad / f"{bad}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])

    out = tmp_path / "predictions"
    command = bundle_command(
        "teacher",
        "inference.json",
        input_dir=str(folder),
        ckpt_dir=str(trained_teacher_run.ckpt_dir),
        output_dir=str(out),
        **TINY,
    )
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert [p.name for p in out.iterdir()] == [f"{good}.nii.gz"]
    log = proc.stdout + proc.stderr
    named = [line for line in log.splitlines() if bad in line and "skipped" in line and "flair" in line]
    assert len(named) == 1 and "truncated" in named[0], log[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "1 of 2 case(s) skipped" in proc.stderr and bad in proc.stderr.splitlines()[-1]
