"""``multi_gpu_train.json`` under ``torchrun``: two CPU processes with gloo, one epoch on the session phantom.

For the teacher and the KD student: every rank exits 0, the training set is sharded (each rank runs
half the iterations of a single process), only rank 0 logs and writes checkpoints — exactly one
``model.pt`` and one ``checkpoint.pt``, saved without DDP's ``module.`` prefix so that inference and
the student's frozen teacher load them as they are.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bundle_runner import BUNDLES, TINY, bundle_command, bundle_config, log_tail

pytestmark = pytest.mark.slow

NPROC = 2
BATCH_SIZE = 2
TIMEOUT_S = 600


def torchrun(bundle: str, cwd: Path, **overrides) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m monai.bundle run`` with train.json + multi_gpu_train.json."""
    command = bundle_command(bundle, ["train.json", "multi_gpu_train.json"], **overrides)
    assert command[1:4] == ["-m", "monai.bundle", "run"]
    logs = cwd / "torchrun_logs"
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
        "--log-dir", str(logs), "--redirects", "3",  # each rank's stdout/stderr in its own file
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        launcher + command[1:], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    rank_logs: dict[int, str] = {}
    for log in sorted(logs.rglob("std*.log")):  # <log-dir>/<run id>/attempt_0/<rank>/{stdout,stderr}.log
        rank_logs[int(log.parent.name)] = rank_logs.get(int(log.parent.name), "") + log.read_text()
    proc.rank_logs = rank_logs
    assert proc.returncode == 0, (
        f"torchrun exited with {proc.returncode}\n{log_tail(proc.stdout + proc.stderr)}\n"
        + "\n".join(f"--- rank {r} ---\n{log_tail(text)}" for r, text in sorted(rank_logs.items()))
    )
    return proc


def check_run(bundle: str, proc: subprocess.CompletedProcess, work: Path, datalist_json: dict) -> None:
    assert sorted(proc.rank_logs) == list(range(NPROC)), f"logs of ranks {sorted(proc.rank_logs)}"
    models = work / "models"
    saved = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.pt"))
    assert saved == ["models/checkpoint.pt", "models/model.pt"], f"expected one model.pt and one checkpoint.pt: {saved}"

    # sharded data: 2 of 3 folds train, every 5th case of them validates (val_stride 5)
    pool = [c for c in datalist_json["training"] if c["fold"] != 0]
    n_train = sum(1 for i, _ in enumerate(pool) if i % 5 != 0)
    per_rank_iterations = math.ceil(math.ceil(n_train / NPROC) / BATCH_SIZE)
    single_process_iterations = math.ceil(n_train / BATCH_SIZE)
    assert per_rank_iterations < single_process_iterations, "the phantom must be large enough to see the sharding"
    checkpoint = torch.load(models / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == per_rank_iterations
    assert checkpoint["trainer"]["epoch_length"] == per_rank_iterations

    # rank 0 logs the iterations, rank 1 stays quiet
    iteration_line = f"Epoch: 1/1, Iter: {per_rank_iterations}/{per_rank_iterations}"
    assert iteration_line in proc.rank_logs[0]
    assert "Iter: " not in proc.rank_logs[1]
    assert "Saved checkpoint" not in proc.rank_logs[1]

    # model.pt is a plain {"model": state_dict} that the bundle's own network loads strictly
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert not [k for k in state if k.startswith("module.")], "DDP prefix in the saved weights"
    network = bundle_config(BUNDLES / bundle, "inference.json", **TINY).get_parsed_content("network_def")
    network.load_state_dict(state, strict=True)


def test_teacher_trains_on_two_gloo_processes(datalist, datalist_json, tmp_path):
    overrides = dict(
        TINY, datalist=str(datalist), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), epochs=1
    )
    proc = torchrun("teacher", tmp_path, **overrides)
    check_run("teacher", proc, tmp_path, datalist_json)


def test_kd_student_trains_on_two_gloo_processes(datalist, datalist_json, trained_teacher, tmp_path):
    overrides = dict(
        TINY,
        datalist=str(datalist),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        teacher_ckpt=str(trained_teacher / "model.pt"),
        epochs=1,
    )
    proc = torchrun("kd_student", tmp_path, **overrides)
    check_run("kd_student", proc, tmp_path, datalist_json)
    assert "loss_kd:" in proc.rank_logs[0] and "loss_kl:" in proc.rank_logs[0], "the teacher's terms are logged"
