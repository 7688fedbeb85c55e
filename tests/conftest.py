"""Session-wide artefacts shared by the bundle tests: one phantom data set, its datalist, one teacher.

Everything is tiny (32-voxel phantoms, 32³ network input, 4→64 filters, 2 epochs) so that the
end-to-end bundle tests stay within the suite's time budget on 2 CPU cores, and everything lives
under pytest's temporary folders: nothing is written into the checkout.

Under pytest-xdist each worker has its own session, so a session fixture alone would build these
once per worker (with ``--dist loadfile`` the teacher was trained twice, side by side, doubling the
load on 2 cores). :func:`build_once` builds them once per test run in a folder all workers share,
behind a file lock, keyed by everything that determines them.
"""

from __future__ import annotations

import os

# The suite runs on 2 pytest-xdist workers (README). One OpenMP thread per process, inherited by every
# bundle subprocess, keeps 2 workers on 2 cores; with 2 threads each, tiny networks ran 5-25x slower
# from OpenMP contention. Set before torch is imported anywhere in the session; forced, not a default:
# a CI that exports its own value would otherwise oversubscribe the cores.
os.environ["OMP_NUM_THREADS"] = "1"

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from tests.bundle_runner import TINY, block_mlflow_in_subprocesses, run_bundle

# Bundle subprocesses run without mlflow (as with requirements.txt alone): importing it costs ~1 s of CPU in each of
# the suite's 100+ bundle processes. tests/test_tracking.py asks for it back (tests/mlflow_blocked/mlflow/__init__.py).
block_mlflow_in_subprocesses()

PHANTOM_SIZE = 32
PHANTOM_SEED = 0
LABELED_CASES = 12
UNLABELED_CASES = 2
NUM_FOLDS = 3
TEACHER_EPOCHS = 2


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run: its checkpoint folder, TensorBoard folder, log and overrides."""

    ckpt_dir: Path
    output_dir: Path
    log: str
    overrides: dict


def shared_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every xdist worker sees (without xdist: the session's own)."""
    base = tmp_path_factory.getbasetemp()
    # xdist workers' base folders are <run>/popen-gw<N>: their parent is this run's, not an older run's
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


def build_once(tmp_path_factory, name: str, key: dict, build: Callable[[Path], None]) -> Path:
    """The folder ``<shared>/<name>-<hash of key>``, filled by ``build(folder)`` by the first worker that
    asks; the others wait on its lock and reuse it. A build that failed half-way is redone by the next
    caller (its folder has no completion marker). ``key`` must hold everything the result depends on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = shared_folder(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    folder, done = root / f"{name}-{digest}", root / f"{name}-{digest}.done"
    with FileLock(str(root / f"{name}-{digest}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.write_text(json.dumps(key, sort_keys=True, default=str))
    return folder


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A BraTS 2021-layout phantom: 12 labeled + 2 unlabeled cases of 32×32×21 voxels (7.5 mm)."""
    from tools.phantom import write_dataset

    key = dict(layout="brats2021", cases=LABELED_CASES, unlabeled=UNLABELED_CASES, size=PHANTOM_SIZE, seed=PHANTOM_SEED)
    folder = build_once(tmp_path_factory, "phantom", key, lambda out: write_dataset(out / "brats2021", **key))
    return folder / "brats2021"


@pytest.fixture(scope="session")
def datalist(phantom_dataset, tmp_path_factory) -> Path:
    """``tools.prepare`` datalist of :func:`phantom_dataset` with 3 folds (4 test cases per fold)."""
    from tools.prepare import prepare

    key = dict(dataset=phantom_dataset, folds=NUM_FOLDS, seed=0)
    folder = build_once(
        tmp_path_factory, "datalist", key, lambda out: prepare(phantom_dataset, out / "datalist.json", folds=NUM_FOLDS, seed=0)
    )
    return folder / "datalist.json"


@pytest.fixture(scope="session")
def datalist_json(datalist) -> dict:
    return json.loads(Path(datalist).read_text())


@pytest.fixture(scope="session")
def trained_teacher_run(datalist, tmp_path_factory) -> TrainedRun:
    """The teacher bundle trained for 2 epochs on fold 0 of :func:`datalist` (tiny network), once per test run.

    Treat its folders as read-only (other workers use them too): tests that modify a checkpoint copy it first.
    """
    settings = dict(TINY, datalist=str(datalist), epochs=TEACHER_EPOCHS, val_interval=1)

    def train(work: Path) -> None:
        overrides = dict(settings, ckpt_dir=str(work / "models"), output_dir=str(work / "runs"))
        (work / "log.txt").write_text(run_bundle("teacher", "train.json", cwd=work, **overrides).stdout)

    work = build_once(tmp_path_factory, "teacher", settings, train)
    overrides = dict(settings, ckpt_dir=str(work / "models"), output_dir=str(work / "runs"))
    return TrainedRun(work / "models", work / "runs", (work / "log.txt").read_text(), overrides)


@pytest.fixture(scope="session")
def trained_teacher(trained_teacher_run) -> Path:
    """Checkpoint folder (``model.pt``, ``checkpoint.pt``) of :func:`trained_teacher_run`."""
    return trained_teacher_run.ckpt_dir


def python_of_venv(venv: Path, label: str, script: str, env_var: str) -> Path:
    """``<venv>/bin/python`` of an optional environment that CI builds (MONAI Label, the BraTS scorer): outside CI a
    missing venv skips the test, under CI (``CI`` set) it fails it, so CI can never pass by skipping."""
    python = venv / "bin" / "python"
    if not python.is_file():
        hint = f"run tools/{script} to create it (or set {env_var}); looked for {python}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the {label} venv is missing: {hint}")
        pytest.skip(f"{label} venv absent: {hint}")
    return python

