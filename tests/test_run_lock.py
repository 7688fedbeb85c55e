"""One experiment runner per output folder (tools/run_lock.py), both ways: a live runner's folder is
refused at once with its name, and a lock left by a killed runner is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.bundle_runner import ROOT
from tools.run_lock import LOCK_NAME, acquire_folder


def test_a_second_runner_on_a_busy_folder_stops_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    acquire_folder(out)  # this test process is "the running runner"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tools.experiment", "kdnet", "--data", "synthetic", "--preset", "smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"pid {os.getpid()}" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "experiment.json").exists() and not (out / "data").exists(), "nothing written by the refused runner"
    assert time.monotonic() - start < 120


def test_a_lock_left_by_a_killed_runner_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from tools.run_lock import acquire_folder
            acquire_folder({str(out)!r}); print("locked", flush=True); time.sleep(600)
        """),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"pid {holder.pid}" in (out / LOCK_NAME).read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    previous = acquire_folder(out)  # the kernel released the dead runner's lock
    assert previous is not None and f"pid {holder.pid}" in previous
    assert f"pid {os.getpid()}" in (out / LOCK_NAME).read_text()
