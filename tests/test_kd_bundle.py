"""The KD-Net student bundle end to end, on the session's tiny teacher: workflow properties, a student
run (frozen teacher untouched, every loss term logged), the Table 2 ablations, clear failures for a
missing or incompatible teacher, and the student's evaluation and inference.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_runner import BUNDLES, TINY, bundle_config, run_bundle

STUDENT = BUNDLES / "kd_student"
TEACHER = BUNDLES / "teacher"
ITERATION_LINE = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- (?P<terms>.*)")
TERM = re.compile(r"(loss(?:_gt|_kd|_kl)?): (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)")

# KD-Net Table 2 (Hu et al. 2020) with the paper's lambda = 0.75, alpha = 10 where a term is used
ABLATIONS = {
    "ablation_gt.json": (0.0, 0.0),
    "ablation_gt_kd.json": (0.75, 0.0),
    "ablation_gt_kl.json": (0.0, 10.0),
    "ablation_gt_kl_kd.json": (0.75, 10.0),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def logged_terms(log: str) -> list[dict[str, float]]:
    """The loss terms of every training-iteration line of a student log."""
    rows = []
    for line in ITERATION_LINE.finditer(log):
        rows.append({name: float(value) for name, value in TERM.findall(line.group("terms"))})
    return rows


def student_overrides(datalist: Path, work: Path, teacher_ckpt: Path | str, **extra) -> dict:
    defaults = dict(
        TINY,
        datalist=str(datalist),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "runs"),
        teacher_ckpt=str(teacher_ckpt),
        epochs=1,
        val_interval=1,
    )
    return {**defaults, **extra}


@dataclass(frozen=True)
class StudentRun:
    ckpt_dir: Path
    output_dir: Path
    log: str
    teacher_ckpt: Path
    teacher_sha256_before: str


@pytest.fixture(scope="module")
def student_run(trained_teacher, datalist, tmp_path_factory) -> StudentRun:
    """One epoch of the full KD-Net objective, distilled from the session's teacher."""
    work = tmp_path_factory.mktemp("student")
    teacher_ckpt = trained_teacher / "model.pt"
    before = sha256(teacher_ckpt)
    proc = run_bundle("kd_student", "train.json", cwd=work, **student_overrides(datalist, work, teacher_ckpt))
    return StudentRun(work / "models", work / "runs", proc.stdout, teacher_ckpt, before)


@pytest.fixture(scope="module")
def one_channel_teacher_ckpt(tmp_path_factory) -> Path:
    """A ``model.pt`` of the teacher bundle's T1ce baseline (1 input channel), untrained."""
    net = bundle_config(TEACHER, ["train.json", "baseline.json"], **TINY).get_parsed_content("network_def")
    assert net.encoder[0].conv1.conv.in_channels == 1
    path = tmp_path_factory.mktemp("baseline") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------
# configs


def test_train_and_infer_workflows_have_the_required_properties(datalist, tmp_path):
    from monai.bundle import ConfigWorkflow

    overrides = dict(
        TINY,
        bundle_root=str(STUDENT),
        datalist=str(datalist),
        cache_rate=0.0,
        teacher_ckpt=str(tmp_path / "model.pt"),  # read only when training starts
    )
    for config, workflow_type in (("train.json", "train"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(STUDENT / "configs" / config),
            workflow_type=workflow_type,
            logging_file=False,
            **overrides,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], f"{config}: missing or misnamed workflow properties"


def test_student_network_matches_its_metadata():
    """One T1ce channel in, TC/WT/ET out, as metadata.json states (``verify_net_in_out``-style)."""
    meta = json.loads((STUDENT / "configs" / "metadata.json").read_text())["network_data_format"]
    in_channels, out_channels = meta["inputs"]["image"]["num_channels"], meta["outputs"]["pred"]["num_channels"]
    assert (in_channels, out_channels) == (1, 3)
    net = bundle_config(STUDENT, "inference.json").get_parsed_content("network_def")
    net.eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(1, in_channels, 64, 64, 64)).shape) == (1, out_channels, 64, 64, 64)


@pytest.mark.parametrize("override, weights", sorted(ABLATIONS.items()))
def test_ablation_overrides_set_the_table_2_loss_weights(override, weights):
    lambda_kd, alpha_kl = weights
    parser = bundle_config(STUDENT, ["train.json", override])
    assert (parser.get_parsed_content("lambda_kd"), parser.get_parsed_content("alpha_kl")) == weights
    objective = parser.get_parsed_content("loss")
    assert (objective.lambda_kd, objective.alpha_kl) == (lambda_kd, alpha_kl)
    assert objective.needs_teacher_logits == (lambda_kd > 0)
    assert objective.needs_bottlenecks == (alpha_kl > 0)


def test_default_objective_is_the_full_kd_net_loss():
    parser = bundle_config(STUDENT, "train.json")
    assert (parser.get_parsed_content("lambda_kd"), parser.get_parsed_content("alpha_kl")) == (0.75, 10.0)
    assert parser.get_parsed_content("temperature") == 5.0
    kd = parser.get_parsed_content("loss").kd_loss
    # Eq. 2 as written: the teacher softened by T, the student not
    assert (kd.temperature, kd.student_temperature) == (5.0, 1.0)


@pytest.mark.parametrize("value", [False, True])
def test_teacher_cpu_bf16_reaches_the_frozen_teacher(value):
    parser = bundle_config(STUDENT, "train.json")
    assert parser.get_parsed_content("teacher_cpu_bf16") is False  # opt-in
    parser["teacher_cpu_bf16"] = value
    teacher = parser.get_parsed_content("train#frozen_teacher")
    assert teacher.cpu_bf16 is value


def test_student_temperature_reaches_the_kd_loss():
    parser = bundle_config(STUDENT, "train.json")
    parser["student_temperature"] = 5.0
    kd = parser.get_parsed_content("loss").kd_loss
    assert (kd.temperature, kd.student_temperature) == (5.0, 5.0)


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_student_run_leaves_the_teacher_untouched_and_logs_every_loss_term(student_run):
    assert sha256(student_run.teacher_ckpt) == student_run.teacher_sha256_before
    rows = logged_terms(student_run.log)
    assert len(rows) == 3, "6 training cases in batches of 2"
    for terms in rows:
        assert set(terms) == {"loss", "loss_gt", "loss_kd", "loss_kl"}
        assert all(math.isfinite(v) for v in terms.values()), terms
        assert terms["loss_kd"] > 0 and terms["loss_kl"] > 0, "the teacher's terms must be computed"
    # Eq. 5 with lambda 0.75 and alpha 10, from TensorBoard's float32 values: the console's 4 decimals (and the
    # abs=2e-3 they needed) could not see the KL term, ~1e-4 here, so alpha 1 or 0 would have passed
    from tests.test_tracking import tensorboard_scalars

    scalars = tensorboard_scalars(student_run.output_dir)
    steps = {tag: dict(scalars[tag]) for tag in ("loss", "loss_gt", "loss_kd", "loss_kl")}
    assert sorted(steps["loss"]) == [1, 2, 3]
    for step, loss in steps["loss"].items():
        kd, gt, kl = steps["loss_kd"][step], steps["loss_gt"][step], steps["loss_kl"][step]
        assert loss == pytest.approx(0.75 * kd + 0.25 * gt + 10.0 * kl, rel=1e-5, abs=1e-7)
        # the tolerance is far below what a wrong weight changes: alpha 9 instead of 10 moves the total by kl
        assert kl > 20 * (1e-5 * loss + 1e-7), f"the KL term ({kl}) is too small to check alpha at this tolerance"


@pytest.mark.slow
def test_student_run_writes_tensorboard_events_and_a_one_channel_model(student_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(student_run.output_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {student_run.output_dir}"
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"loss_gt", "loss_kd", "loss_kl"} <= tags, tags

    state = torch.load(student_run.ckpt_dir / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert state["encoder.0.conv1.conv.weight"].shape[1] == 1, "the student sees T1ce only"
    assert (student_run.ckpt_dir / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_gt_only_ablation_trains_without_a_teacher_checkpoint(datalist, tmp_path):
    absent = tmp_path / "no-teacher" / "model.pt"
    overrides = student_overrides(datalist, tmp_path, absent, val_interval=2)  # 1 epoch: skip validation
    proc = run_bundle("kd_student", ["train.json", "ablation_gt.json"], cwd=tmp_path, **overrides)
    rows = logged_terms(proc.stdout)
    assert rows, "no training iterations logged"
    for terms in rows:
        assert terms["loss_kd"] == 0.0 and terms["loss_kl"] == 0.0
        assert terms["loss"] == pytest.approx(terms["loss_gt"], abs=1e-4)
    assert not absent.exists()


@pytest.mark.slow
def test_a_missing_teacher_checkpoint_fails_before_training(datalist, tmp_path):
    absent = tmp_path / "no-teacher" / "model.pt"
    overrides = student_overrides(datalist, tmp_path, absent, cache_rate=0.0)
    proc = run_bundle("kd_student", "train.json", cwd=tmp_path, check=False, **overrides)
    assert proc.returncode != 0
    assert str(absent) in proc.stdout, "the error must name the missing file"
    assert "teacher_ckpt" in proc.stdout, "the error must name the config key to set"
    assert "Epoch: 1/" not in proc.stdout, "the run must stop before the first iteration"


@pytest.mark.slow
def test_a_teacher_checkpoint_with_another_channel_count_fails_clearly(datalist, one_channel_teacher_ckpt, tmp_path):
    overrides = student_overrides(datalist, tmp_path, one_channel_teacher_ckpt, cache_rate=0.0)
    proc = run_bundle("kd_student", "train.json", cwd=tmp_path, check=False, **overrides)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if str(one_channel_teacher_ckpt) in line]
    assert errors, "the error must name the checkpoint"
    assert any(re.search(r"\b1 input channels?\b.*\b4\b", line) for line in errors), "\n".join(errors)
    assert "Epoch: 1/" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# evaluation and inference


@pytest.mark.slow
def test_student_evaluation_and_inference(student_run, datalist, datalist_json, phantom_dataset, tmp_path):
    common = dict(TINY, ckpt_dir=str(student_run.ckpt_dir))
    out = tmp_path / "eval"
    evaluate = ["train.json", "evaluate.json"]
    run_bundle("kd_student", evaluate, cwd=tmp_path, datalist=str(datalist), output_dir=str(out), **common)
    test_cases = sorted(c["case_id"] for c in datalist_json["training"] if c["fold"] == 0)
    rows = (out / "dice_wt_raw.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == test_cases
    summary_keys = set(json.loads((out / "summary.json").read_text()))
    assert {"dice_tc", "dice_wt", "dice_et", "hd95_tc", "hd95_wt", "hd95_et"} <= summary_keys
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{c}.nii.gz" for c in test_cases]

    # inference from a folder of case folders alone (no datalist): only T1ce is read
    folder = tmp_path / "cases"
    folder.mkdir()
    case_id = datalist_json["unlabeled"][0]["case_id"]
    (folder / case_id).mkdir()
    t1ce = phantom_dataset / case_id / f"{case_id}_t1ce.nii.gz"
    (folder / case_id / t1ce.name).write_bytes(t1ce.read_bytes())
    predictions = tmp_path / "predictions"
    infer = dict(common, input_dir=str(folder), output_dir=str(predictions))
    run_bundle("kd_student", "inference.json", cwd=tmp_path, **infer)
    assert [p.name for p in predictions.iterdir()] == [f"{case_id}.nii.gz"]
    pred, ref = nib.load(str(predictions / f"{case_id}.nii.gz")), nib.load(str(t1ce))
    assert pred.shape == ref.shape and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
