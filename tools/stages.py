"""One stage of an experiment = one ``monai.bundle run`` of a bundle, in its own process.

Stages run the bundles themselves (never a re-implementation of their logic). Each stage has a
folder holding its overrides, the merged config it ran with, and its log. Whether a stage is
finished is read from its outputs (a training's checkpoint at the requested epoch, an
evaluation's summary), so a rerun of an interrupted experiment skips finished stages and lets an
unfinished training resume from its last epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from brats_kd.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
# An epoch of any Ignite trainer (SupervisedTrainer, the KD student's KDTrainer, ...) completing; the
# evaluator that ValidationHandler runs logs the same line as "...Evaluator", which must not count.
EPOCH_DONE = re.compile(r"\.\w*Trainer - INFO - Epoch\[(\d+)\] Complete")


class StageFailed(RuntimeError):
    """A bundle run exited non-zero; the message names the stage and points at its log."""


@dataclass
class Stage:
    """A bundle run: ``configs`` of ``bundle`` merged with ``overrides``, outputs under ``folder``.

    ``kind`` is ``"train"`` (finished when ``<ckpt_dir>/checkpoint.pt`` holds ``epochs`` epochs),
    or ``"evaluate"`` / ``"infer"`` / ``"pseudo"`` (finished when ``done_file`` exists; bundles write
    it atomically as their last act). ``needs`` names the stages whose outputs this one reads (a
    student's teacher training, an evaluation's training); the runner starts it only after them.
    """

    name: str
    bundle: str
    configs: list[str]
    overrides: dict
    folder: Path
    kind: str
    done_file: Path | None = None
    epochs: int = 0
    needs: tuple[str, ...] = ()
    seconds: float | None = field(default=None, compare=False)

    @property
    def log_file(self) -> Path:
        return self.folder / "log.txt"

    def is_done(self) -> bool:
        if self.kind == "train":
            return trained_epochs(Path(self.overrides["ckpt_dir"])) >= self.epochs
        return self.done_file is not None and self.done_file.exists()


def trained_epochs(ckpt_dir: Path) -> int:
    """Epochs recorded in a training's resume checkpoint (0 if there is none or no model yet)."""
    checkpoint, model = ckpt_dir / "checkpoint.pt", ckpt_dir / "model.pt"
    if not (checkpoint.exists() and model.exists()):
        return 0
    import torch  # deferred: listing stages should not pay for importing torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    trainer = state.get("trainer", {})
    if "epoch" in trainer:
        return int(trainer["epoch"])
    # Ignite's Engine.state_dict() records the iteration, not the epoch.
    return int(trainer.get("iteration", 0)) // max(int(trainer.get("epoch_length") or 1), 1)


class UnknownOverride(StageFailed):
    """An override names a key that none of the stage's configs defines (``monai.bundle run`` would
    silently ignore it, e.g. ``--activation softmax`` would train a sigmoid network without a word)."""


def _parser(bundle: str, configs: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / c) for c in configs])
    return parser


def defined_settings(bundle: str, configs: list[str], settings: dict) -> dict:
    """The entries of ``settings`` that ``configs`` of ``bundle`` define.

    For settings shared on purpose by stages of different bundles (a preset's ``patch_bundle`` holds
    the ensemble's and the omni-student's network sizes): each stage takes its own. Overrides a stage
    is given directly are checked by :func:`check_overrides`, never filtered.
    """
    parser = _parser(bundle, configs)
    return {key: value for key, value in settings.items() if key in parser}


def check_overrides(stage: Stage) -> None:
    """Raise :class:`UnknownOverride` unless every override key of ``stage`` is defined by its configs.

    Keys are config ids as ``monai.bundle run`` takes them (``epochs``, ``train#trainer#max_epochs``).
    Only the config files are read; nothing is instantiated.
    """
    parser = _parser(stage.bundle, stage.configs)
    unknown = sorted(key for key in stage.overrides if key not in parser)
    if unknown:
        raise UnknownOverride(
            f"stage {stage.name}: override {', '.join(repr(k) for k in unknown)} is not defined by any config of "
            f"bundle '{stage.bundle}' ({', '.join(stage.configs)}); monai.bundle run would ignore it silently. "
            "Check the spelling or add the key to the bundle's config."
        )


def merged_config(stage: Stage) -> dict:
    """The configuration the stage runs with: its config files merged, then its overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / stage.bundle / c) for c in stage.configs])
    for key, value in stage.overrides.items():
        parser[key] = value
    return parser.config


def _die_with_parent():
    """On Linux, a ``preexec_fn`` that makes the stage's process get SIGTERM when the runner dies.

    Without it, a runner killed with SIGKILL leaves its training running on, unseen, and a rerun
    starts a second training that writes the same checkpoints. ``None`` elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    runner, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if os.getppid() != runner:  # the runner died before prctl took effect
            os._exit(1)

    return preexec


# Bundle processes of the stages running now (several when the runner runs stages side by side), so
# that a failing stage can stop the others at once instead of leaving them to run to their end.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def stop_running_stages() -> None:
    """SIGTERM every bundle process started by :func:`run_stage` that is still alive."""
    with _RUNNING_LOCK:
        for process in _RUNNING:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)


def run_stage(stage: Stage, on_epoch=None, threads: int | None = None) -> float:
    """Run ``stage`` to completion and return its wall time in seconds.

    The merged config is saved as ``config.json`` and the output as ``log.txt`` in the stage's
    folder. ``on_epoch(n)`` is called each time the trainer completes epoch ``n``. ``threads`` sets
    the bundle's CPU threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``; None: inherit the environment).
    Raises ``StageFailed`` (with the end of the log) when the bundle exits non-zero, and
    :class:`UnknownOverride` before launching when an override names a key no config defines.
    """
    check_overrides(stage)
    stage.folder.mkdir(parents=True, exist_ok=True)
    overrides_file = stage.folder / "overrides.json"
    write_json_atomic(overrides_file, stage.overrides)
    write_json_atomic(stage.folder / "config.json", merged_config(stage))
    bundle_dir = BUNDLES / stage.bundle
    config_files = [str(bundle_dir / c) for c in stage.configs] + [str(overrides_file)]
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps(config_files),
        "--bundle_root", str(bundle_dir),
        "--logging_file", str(bundle_dir / "configs" / "logging.conf"),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=25)
    # Line-buffered: a killed runner's log still ends where the stage stopped.
    with stage.log_file.open("a", buffering=1) as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_die_with_parent(),
        )
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip())
                match = EPOCH_DONE.search(line)
                if match and on_epoch is not None:
                    on_epoch(int(match.group(1)))
            code = process.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
    seconds = time.monotonic() - start
    if code != 0:
        raise StageFailed(
            f"stage {stage.name} failed (exit code {code}); full log: {stage.log_file}\n" + "\n".join(tail)
        )
    return seconds
