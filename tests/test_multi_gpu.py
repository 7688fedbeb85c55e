"""``multi_gpu_train.json`` under ``torchrun``: two CPU processes with gloo, one epoch on the session phantom.

For the teacher, the KD student, an ensemble member and the omni-student: every rank exits 0, the
training set is sharded (each rank runs half the iterations of a single process), only rank 0 logs
and writes checkpoints — exactly one ``model.pt`` and one ``checkpoint.pt``, saved without DDP's
``module.`` prefix so that inference and the student's frozen teacher load them as they are — and
every rank ends with the same validation metrics (gathered over the ranks; ``multi_gpu_probe.json``
makes each rank print them). The ensemble member and the omni-student run with the bundles' default
``num_workers: 2`` (DataLoader worker processes under DDP); the others with 0.

CUDA is hidden from the ranks (``CUDA_VISIBLE_DEVICES=""``): on a machine with one GPU the configs
would otherwise pick nccl and ask rank 1 for ``cuda:1``. ``torchrun --standalone`` lets the OS pick
the rendezvous port (``localhost:0``), so parallel tests cannot race for a free port.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bundle_runner import BUNDLES, TINY, bundle_command, bundle_config, log_tail, run_command
from tests.test_ensemble_bundle import ENSEMBLE_TINY

pytestmark = pytest.mark.slow

NPROC = 2
BATCH_SIZE = 2
TIMEOUT_S = 600
PROBE = Path(__file__).resolve().parent / "multi_gpu_probe.json"
RANK_METRICS = re.compile(r"^validation metrics of rank (\d+): (\{.*\})$", re.M)
#: the omni-student at test size (patches and sliding windows of 32³, 8 initial filters)
OMNI_TINY = {"roi_size": [32, 32, 32], "init_filters": 8}


def torchrun(bundle: str, configs: list[str], cwd: Path, **overrides) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m monai.bundle run`` with ``configs`` + multi_gpu_train.json
    (+ the metrics probe). The ranks' logs are in ``proc.rank_logs``; a non-zero exit fails the test."""
    command = bundle_command(bundle, [*configs, "multi_gpu_train.json", str(PROBE)], **overrides)
    assert command[1:4] == ["-m", "monai.bundle", "run"]
    logs = cwd / "torchrun_logs"
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
        "--log-dir", str(logs), "--redirects", "3",  # each rank's stdout/stderr in its own file
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    # its own process group: on a timeout the ranks die with the launcher instead of loading the cores
    proc = run_command(launcher + command[1:], cwd, env=env, timeout=TIMEOUT_S, merge_stderr=False)
    rank_logs: dict[int, str] = {}
    for log in sorted(logs.rglob("std*.log")):  # <log-dir>/<run id>/attempt_0/<rank>/{stdout,stderr}.log
        rank_logs[int(log.parent.name)] = rank_logs.get(int(log.parent.name), "") + log.read_text()
    proc.rank_logs = rank_logs
    assert proc.returncode == 0, (
        f"torchrun exited with {proc.returncode}\n{log_tail(proc.stdout + proc.stderr)}\n"
        + "\n".join(f"--- rank {r} ---\n{log_tail(text)}" for r, text in sorted(rank_logs.items()))
    )
    return proc


def check_run(
    proc: subprocess.CompletedProcess, work: Path, models: str, datalist_json: dict, network: torch.nn.Module
) -> dict[str, float]:
    """The checks every bundle shares; returns the validation metrics (equal on every rank)."""
    assert sorted(proc.rank_logs) == list(range(NPROC)), f"logs of ranks {sorted(proc.rank_logs)}"
    saved = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.pt"))
    assert saved == [f"{models}/checkpoint.pt", f"{models}/model.pt"], f"expected one model.pt and one checkpoint.pt: {saved}"

    # sharded data: 2 of 3 folds train, every 5th case of them validates (val_stride 5)
    pool = [c for c in datalist_json["training"] if c["fold"] != 0]
    n_train = sum(1 for i, _ in enumerate(pool) if i % 5 != 0)
    per_rank_iterations = math.ceil(math.ceil(n_train / NPROC) / BATCH_SIZE)
    single_process_iterations = math.ceil(n_train / BATCH_SIZE)
    assert per_rank_iterations < single_process_iterations, "the phantom must be large enough to see the sharding"
    checkpoint = torch.load(work / models / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == per_rank_iterations
    assert checkpoint["trainer"]["epoch_length"] == per_rank_iterations

    # rank 0 logs the iterations, rank 1 stays quiet
    iteration_line = f"Epoch: 1/1, Iter: {per_rank_iterations}/{per_rank_iterations}"
    assert iteration_line in proc.rank_logs[0]
    assert "Iter: " not in proc.rank_logs[1]
    assert "Saved checkpoint" not in proc.rank_logs[1]

    # every rank ends with the same validation metrics: gathered over both shards of the validation set
    metrics = {int(rank): json.loads(values) for r in proc.rank_logs.values() for rank, values in RANK_METRICS.findall(r)}
    assert sorted(metrics) == list(range(NPROC)), f"metrics printed by ranks {sorted(metrics)}"
    assert "val_mean_dice" in metrics[0] and all(math.isfinite(v) for v in metrics[0].values()), metrics[0]
    assert metrics[1] == metrics[0], f"the ranks disagree on the validation metrics: {metrics}"
    # ... and they are the values rank 0 logged and selected model.pt with
    assert f"val_mean_dice: {metrics[0]['val_mean_dice']:.4f}" in proc.rank_logs[0]
    assert float(checkpoint["best_model_saver"]["_saved"][0][0]) == pytest.approx(metrics[0]["val_mean_dice"], abs=1e-6)

    # model.pt is a plain {"model": state_dict} that the bundle's own network loads strictly
    state = torch.load(work / models / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert not [k for k in state if k.startswith("module.")], "DDP prefix in the saved weights"
    network.load_state_dict(state, strict=True)
    return metrics[0]


def test_teacher_trains_on_two_gloo_processes(datalist, datalist_json, tmp_path):
    overrides = dict(
        TINY, datalist=str(datalist), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), epochs=1
    )
    proc = torchrun("teacher", ["train.json"], tmp_path, **overrides)
    network = bundle_config(BUNDLES / "teacher", "inference.json", **TINY).get_parsed_content("network_def")
    metrics = check_run(proc, tmp_path, "models", datalist_json, network)
    assert "val_loss" in metrics, "the LR schedule's validation loss is gathered too"


def test_kd_student_trains_on_two_gloo_processes(datalist, datalist_json, trained_teacher, tmp_path):
    overrides = dict(
        TINY,
        datalist=str(datalist),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        teacher_ckpt=str(trained_teacher / "model.pt"),
        epochs=1,
    )
    proc = torchrun("kd_student", ["train.json"], tmp_path, **overrides)
    network = bundle_config(BUNDLES / "kd_student", "inference.json", **TINY).get_parsed_content("network_def")
    check_run(proc, tmp_path, "models", datalist_json, network)
    assert "loss_kd:" in proc.rank_logs[0] and "loss_kl:" in proc.rank_logs[0], "the teacher's terms are logged"


def test_ensemble_member_trains_on_two_gloo_processes_with_dataloader_workers(datalist, datalist_json, tmp_path):
    """A member saves into ``models_dir/<member>``, a folder that does not exist at start: every rank's
    savers check it (rank 1 failed 1 run in 3 with ``NotADirectoryError`` before it was created there)."""
    overrides = dict(
        ENSEMBLE_TINY,
        num_workers=2,
        datalist=str(datalist),
        models_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        epochs=1,
        val_interval=1,
    )
    configs = ["train.json", "member_resunet.json"]
    proc = torchrun("ensemble", configs, tmp_path, **overrides)
    network = bundle_config(BUNDLES / "ensemble", configs, **ENSEMBLE_TINY).get_parsed_content("network_def")
    check_run(proc, tmp_path, "models/resunet", datalist_json, network)
    assert "train_loss:" in proc.rank_logs[0]


def test_omni_student_trains_on_two_gloo_processes_with_dataloader_workers(datalist, datalist_json, tmp_path):
    """On a plain (manual-only) datalist: what the manual-only student of the omni experiment trains on."""
    overrides = dict(
        OMNI_TINY,
        num_workers=2,
        datalist=str(datalist),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        epochs=1,
        val_interval=1,
    )
    proc = torchrun("omni_student", ["train.json"], tmp_path, **overrides)
    network = bundle_config(BUNDLES / "omni_student", "inference.json", **OMNI_TINY).get_parsed_content("network_def")
    check_run(proc, tmp_path, "models", datalist_json, network)
