"""Experiment tracking of the training configs: MONAI's built-in MLflow tracking and TensorBoard.

One run per bundle with ``--tracking mlflow`` covers both: MLflow (a local SQLite store; MONAI 1.6
rejects ``file://`` tracking URIs) must hold the run with the training loss per iteration, the
validation metrics per epoch and the executed config; TensorBoard must hold the same training,
and for the KD student each term of Eq. 5 as its own scalar (``loss``, ``loss_gt``, ``loss_kd``,
``loss_kl``) whose values add up as the objective says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.bundle_runner import TINY, run_bundle

pytestmark = pytest.mark.slow

VALIDATION_TAGS = {"val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et", "val_loss"}
TRAIN_TAGS = {"teacher": {"train_loss"}, "kd_student": {"loss", "loss_gt", "loss_kd", "loss_kl"}}
LAMBDA_KD, ALPHA_KL = 0.75, 10.0  # kd_student/configs/train.json defaults (KD-Net's values)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


@pytest.fixture(params=sorted(TRAIN_TAGS))
def tracked_run(request, datalist, tmp_path):
    bundle = request.param
    overrides = dict(
        TINY,
        datalist=str(datalist),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        epochs=1,
        tracking="mlflow",
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
        experiment_name=f"brats-kd-{bundle}",
        run_name="tracking-test",
        # an explicit path: MONAI derives the default from output_dir and breaks on a literal override
        save_execute_config=str(tmp_path / "runs" / "executed_config.json"),
    )
    if bundle == "kd_student":
        overrides["teacher_ckpt"] = str(request.getfixturevalue("trained_teacher") / "model.pt")
    run_bundle(bundle, "train.json", cwd=tmp_path, with_mlflow=True, **overrides)
    return bundle, tmp_path


def test_mlflow_and_tensorboard_record_the_training(tracked_run):
    import mlflow

    bundle, work = tracked_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns.db'}")
    experiment = client.get_experiment_by_name(f"brats-kd-{bundle}")
    assert experiment is not None, "no MLflow experiment"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracking-test" and run.info.status == "FINISHED"
    iterations = int(run.data.params["epoch_length"])
    assert run.data.params["max_epochs"] == "1"
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in train_loss] == list(range(1, iterations + 1))
    assert all(math.isfinite(m.value) for m in train_loss)
    assert VALIDATION_TAGS <= set(run.data.metrics), sorted(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["executed_config.json"]
    executed = json.loads((work / "runs" / "executed_config.json").read_text())
    assert executed["epochs"] == 1 and executed["tracking_uri"].startswith("sqlite:///")

    scalars = tensorboard_scalars(work / "runs")
    assert TRAIN_TAGS[bundle] | VALIDATION_TAGS <= set(scalars), sorted(scalars)
    for tag in TRAIN_TAGS[bundle]:
        assert [step for step, _ in scalars[tag]] == list(range(1, iterations + 1)), tag
    # MLflow's train_loss is the total objective, the same number TensorBoard calls loss / train_loss
    total_tag = "loss" if bundle == "kd_student" else "train_loss"
    for (_, tb_value), ml in zip(scalars[total_tag], train_loss):
        assert tb_value == pytest.approx(ml.value, rel=1e-5)
    assert scalars["val_mean_dice"][0][1] == pytest.approx(run.data.metrics["val_mean_dice"], rel=1e-5)

    if bundle == "kd_student":  # each term of Eq. 5 separately, and they add up
        terms = {tag: dict(scalars[tag]) for tag in TRAIN_TAGS[bundle]}
        for step in range(1, iterations + 1):
            assert terms["loss_kd"][step] > 0 and terms["loss_kl"][step] > 0 and terms["loss_gt"][step] > 0
            expected = LAMBDA_KD * terms["loss_kd"][step] + (1 - LAMBDA_KD) * terms["loss_gt"][step]
            expected += ALPHA_KL * terms["loss_kl"][step]
            assert terms["loss"][step] == pytest.approx(expected, rel=1e-4)
