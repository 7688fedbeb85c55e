"""Run a bundle the way a user does (``python -m monai.bundle run``), in a subprocess.

Bundle code lives in the installed ``brats_kd`` package, so a config can also be parsed in-process
(:func:`bundle_config`) for quick checks; training and inference run in their own interpreter (this
venv's ``sys.executable``), as a user runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
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


def run_bundle(
    bundle: str | os.PathLike,
    configs: str | Sequence[str],
    cwd: str | os.PathLike,
    check: bool = True,
    timeout: float = 600,
    **overrides,
) -> subprocess.CompletedProcess:
    """Run ``monai.bundle run`` for ``bundle`` in a subprocess and return its ``CompletedProcess``.

    ``configs`` are file names in the bundle's ``configs`` folder (or paths); ``overrides`` become
    ``--key value`` (lists, dicts and bools JSON-encoded). stderr is merged into ``stdout``, so the
    log keeps the order of events. ``cwd`` should be a temporary folder: nothing is written into
    the checkout as long as the tests also point ``ckpt_dir`` / ``output_dir`` there.
    With ``check`` (default) a non-zero exit raises :class:`BundleRunError` with the log's tail.
    """
    command = bundle_command(bundle, configs, **overrides)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        command,
        cwd=str(cwd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
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
