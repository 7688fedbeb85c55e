"""Run a bundle the way a user does (``python -m monai.bundle run``), in a subprocess.

Bundle code lives in the installed ``brats_kd`` package, so a config can also be parsed in-process
(:func:`bundle_config`) for quick checks; training and inference run in their own interpreter (this
venv's ``sys.executable``), as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"

#: Overrides that make a bundle run tiny and quick on 2 CPU cores (32³ input, five small levels).
TINY = {
    "filters": [4, 8, 16, 32, 64],
    "spatial_size": [32, 32, 32],
    "num_workers": 0,
}

LOG_TAIL_LINES = 60
#: first on the PYTHONPATH of the suite's subprocesses (tests/conftest.py): ``import mlflow`` fails there (its docstring)
MLFLOW_BLOCKER = Path(__file__).resolve().parent / "mlflow_blocked"


def _pythonpath_without_blocker(env: Mapping[str, str]) -> list[str]:
    """The entries of ``env``'s ``PYTHONPATH`` other than :data:`MLFLOW_BLOCKER`."""
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(MLFLOW_BLOCKER)]


def block_mlflow_in_subprocesses() -> None:
    """Put :data:`MLFLOW_BLOCKER` first on ``PYTHONPATH`` for every subprocess started from now on (idempotent)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(MLFLOW_BLOCKER), *_pythonpath_without_blocker(os.environ)])


def environment(with_mlflow: bool = False, **variables: str) -> dict[str, str]:
    """A copy of ``os.environ`` plus ``variables``; ``with_mlflow`` drops :data:`MLFLOW_BLOCKER` from ``PYTHONPATH``."""
    env = dict(os.environ, **variables)
    if with_mlflow:
        paths = _pythonpath_without_blocker(env)
        env.pop("PYTHONPATH", None)
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class BundleRunError(AssertionError):
    """A bundle command exited non-zero; the message holds the command and the tail of its log."""


def bundle_dir(bundle: str | os.PathLike) -> Path:
    """``bundles/<bundle>`` for a bundle name, or the given folder itself."""
    path = Path(bundle)
    return path if path.is_dir() and (path / "configs").is_dir() else BUNDLES / str(bundle)


def config_paths(bundle: str | os.PathLike, configs: str | Sequence[str]) -> list[str]:
    """Absolute paths of ``configs`` (names such as ``"train.json"`` or paths) of ``bundle``."""
    names = [configs] if isinstance(configs, (str, os.PathLike)) else list(configs)
    root = bundle_dir(bundle)
    return [str(Path(n) if Path(n).is_absolute() else root / "configs" / n) for n in names]


def encode_override(value) -> str:
    """One command-line value: JSON for lists, dicts, bools and None; ``str`` for the rest."""
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def bundle_command(bundle: str | os.PathLike, configs: str | Sequence[str], **overrides) -> list[str]:
    """The argv of ``python -m monai.bundle run`` for ``bundle`` with ``configs`` and ``overrides``."""
    files = config_paths(bundle, configs)
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg]
    command += ["--bundle_root", str(bundle_dir(bundle))]
    for key, value in overrides.items():
        command += [f"--{key}", encode_override(value)]
    return command


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group led by ``proc`` (started with ``start_new_session=True``): the command and
    everything it started (torchrun's ranks, the runner's stages, DataLoader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def run_command(
    command: Sequence[str],
    cwd: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    merge_stderr: bool = True,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own that is killed whole when the command ends,
    times out or the test is interrupted.

    ``subprocess.run(timeout=...)`` kills only the direct child: torchrun's ranks or a runner's
    stages would keep loading the 2 cores and make the next tests time out too. On timeout this
    raises ``subprocess.TimeoutExpired`` after the kill. With ``merge_stderr`` stderr goes into
    ``stdout`` (the log keeps the order of events); otherwise it is captured separately.
    """
    proc = subprocess.Popen(
        list(command),
        cwd=str(cwd),
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)  # leftovers after a normal exit too
        if proc.returncode is None:
            proc.communicate()  # reap it after a timeout or an interruption
    return subprocess.CompletedProcess(list(command), proc.returncode, out, err)


def run_commands(jobs: Mapping[str, tuple], parallel: int = 4, timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Run commands ``parallel`` at a time, each in its own process group, one torch thread each.

    ``jobs``: name → ``(command, cwd[, preexec_fn])``. Output (stdout and stderr merged) goes to
    ``<cwd>/<name>.log``, so a slow job never blocks on a full pipe while another is waited for. A job
    still running ``timeout`` seconds after the start is killed with its whole process group (and
    shows ``-SIGKILL`` as its return code), and so is every job when the caller is interrupted.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    pending, running, results = list(jobs.items()), {}, {}
    deadline = time.monotonic() + timeout
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, (command, cwd, *preexec) = pending.pop(0)
                log = (Path(cwd) / f"{name}.log").open("w+")
                proc = subprocess.Popen(list(command), cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=preexec[0] if preexec else None)
                running[name] = (command, proc, log)
            for name, (command, proc, log) in list(running.items()):
                if proc.poll() is None and time.monotonic() > deadline:
                    kill_group(proc)
                    proc.wait()
                if proc.poll() is not None:
                    kill_group(proc)
                    log.seek(0)
                    results[name] = subprocess.CompletedProcess(list(command), proc.returncode, log.read())
                    log.close()
                    del running[name]
            time.sleep(0.05)
    finally:
        for _command, proc, log in running.values():
            kill_group(proc)
            proc.wait()
            log.close()
    return results


def run_bundle(
    bundle: str | os.PathLike,
    configs: str | Sequence[str],
    cwd: str | os.PathLike,
    check: bool = True,
    timeout: float = 600,
    with_mlflow: bool = False,
    **overrides,
) -> subprocess.CompletedProcess:
    """Run ``monai.bundle run`` for ``bundle`` in a subprocess and return its ``CompletedProcess``.

    ``configs`` are file names in the bundle's ``configs`` folder (or paths); ``overrides`` become
    ``--key value`` (lists, dicts and bools JSON-encoded). stderr is merged into ``stdout``, so the
    log keeps the order of events. ``cwd`` should be a temporary folder: nothing is written into
    the checkout as long as the tests also point ``ckpt_dir`` / ``output_dir`` there.
    With ``check`` (default) a non-zero exit raises :class:`BundleRunError` with the log's tail; on
    ``timeout`` the command and everything it started are killed (:func:`run_command`). ``with_mlflow``: mlflow
    importable in the bundle process (the suite blocks it elsewhere, :data:`MLFLOW_BLOCKER`).
    """
    command = bundle_command(bundle, configs, **overrides)
    proc = run_command(command, cwd, env=environment(with_mlflow, PYTHONUNBUFFERED="1"), timeout=timeout)
    if check and proc.returncode != 0:
        raise BundleRunError(
            f"bundle command failed with exit code {proc.returncode}:\n  {' '.join(command)}\n"
            f"--- last {LOG_TAIL_LINES} lines of its log ---\n{log_tail(proc.stdout)}"
        )
    return proc


def bundle_config(bundle: str | os.PathLike, configs: str | Sequence[str], **overrides):
    """A ``ConfigParser`` holding ``bundle``'s ``configs`` with ``bundle_root`` and ``overrides`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_paths(bundle, configs))
    parser.update({"bundle_root": str(bundle_dir(bundle)), **overrides})
    return parser
