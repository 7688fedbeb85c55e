"""The test helpers that start subprocesses leave nothing running: on a timeout the command and everything it
started are killed (torchrun's ranks, a runner's stages, DataLoader workers), so survivors cannot load the
2 cores and make the next tests time out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bundle_runner import run_command, run_commands

# a parent that starts a grandchild (in the same process group) which would outlive it, writes the
# grandchild's pid, then waits forever
SPAWNER = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def grandchild(pid_file: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the spawner never started its child"
        time.sleep(0.05)
    return int(pid_file.read_text())


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def test_run_command_kills_the_whole_process_group_on_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", SPAWNER, str(pid_file)]
    with pytest.raises(subprocess.TimeoutExpired):
        run_command(command, tmp_path, env=dict(os.environ), timeout=3)
    assert wait_dead(grandchild(pid_file)), "the grandchild outlived the timed-out command"


def test_run_commands_kills_each_timed_out_job_with_its_children(tmp_path):
    jobs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        jobs[name] = ([sys.executable, "-c", SPAWNER, str(tmp_path / name / "pid")], tmp_path / name)
    jobs["quick"] = ([sys.executable, "-c", "print('done')"], tmp_path)
    results = run_commands(jobs, parallel=3, timeout=3)
    assert results["quick"].returncode == 0 and "done" in results["quick"].stdout
    for name in ("a", "b"):
        assert results[name].returncode == -9, results[name]
        assert wait_dead(grandchild(tmp_path / name / "pid")), f"{name}: the grandchild outlived its job"


def test_subprocesses_run_without_mlflow_unless_asked(tmp_path):
    """The suite's subprocesses cannot import mlflow (conftest: ~1 s of CPU saved per bundle process), MONAI sees it as
    absent rather than failing, and ``environment(with_mlflow=True)`` (tests/test_tracking.py) gets it back."""
    pytest.importorskip("mlflow")  # installed by requirements-dev.txt
    from tests.bundle_runner import environment

    probe = ("import importlib.util, monai.handlers.mlflow_handler as h; "
             "print(h.mlflow.__class__.__name__ == '_LazyRaise', importlib.util.find_spec('mlflow').origin)")
    blocked = subprocess.run([sys.executable, "-c", probe], env=environment(), capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    assert blocked.stdout.split()[0] == "True" and "mlflow_blocked" in blocked.stdout, blocked.stdout
    allowed = subprocess.run([sys.executable, "-c", probe], env=environment(with_mlflow=True), capture_output=True,
                             text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert allowed.stdout.split()[0] == "False" and "mlflow_blocked" not in allowed.stdout, allowed.stdout
