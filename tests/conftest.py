"""Session-wide artefacts shared by the bundle tests: one phantom data set, its datalist, one teacher.

Everything is tiny (32-voxel phantoms, 32³ network input, 4→64 filters, 2 epochs) so that the
end-to-end bundle tests stay within the suite's time budget on 2 CPU cores, and everything lives
under pytest's temporary folders: nothing is written into the checkout.
"""

from __future__ import annotations

import os

# The suite runs on 2 pytest-xdist workers (README). One OpenMP thread per process, inherited by every
# bundle subprocess, keeps 2 workers on 2 cores; with 2 threads each, tiny networks ran 5-25x slower
# from OpenMP contention. Set before torch is imported anywhere in the session.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bundle_runner import TINY, run_bundle

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


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A BraTS 2021-layout phantom: 12 labeled + 2 unlabeled cases of 32×32×21 voxels (7.5 mm)."""
    from tools.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantom") / "brats2021"
    write_dataset(
        out, layout="brats2021", cases=LABELED_CASES, unlabeled=UNLABELED_CASES, size=PHANTOM_SIZE, seed=PHANTOM_SEED
    )
    return out


@pytest.fixture(scope="session")
def datalist(phantom_dataset, tmp_path_factory) -> Path:
    """``tools.prepare`` datalist of :func:`phantom_dataset` with 3 folds (4 test cases per fold)."""
    from tools.prepare import prepare

    out = tmp_path_factory.mktemp("datalist") / "datalist.json"
    prepare(phantom_dataset, out, folds=NUM_FOLDS, seed=0)
    return out


@pytest.fixture(scope="session")
def datalist_json(datalist) -> dict:
    return json.loads(Path(datalist).read_text())


@pytest.fixture(scope="session")
def trained_teacher_run(datalist, tmp_path_factory) -> TrainedRun:
    """The teacher bundle trained for 2 epochs on fold 0 of :func:`datalist` (tiny network).

    Treat its folders as read-only: tests that modify a checkpoint copy it first.
    """
    work = tmp_path_factory.mktemp("teacher")
    overrides = dict(
        TINY,
        datalist=str(datalist),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "runs"),
        epochs=TEACHER_EPOCHS,
        val_interval=1,
    )
    proc = run_bundle("teacher", "train.json", cwd=work, **overrides)
    return TrainedRun(work / "models", work / "runs", proc.stdout, overrides)


@pytest.fixture(scope="session")
def trained_teacher(trained_teacher_run) -> Path:
    """Checkpoint folder (``model.pt``, ``checkpoint.pt``) of :func:`trained_teacher_run`."""
    return trained_teacher_run.ckpt_dir
