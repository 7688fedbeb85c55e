"""Reliability and security: faults injected into the bundles and tools, and what must survive them.

* kills: a training SIGKILLed mid-epoch (``reliability_faults/kill.json``, at an exact step) resumes from
  its last checkpoint — the teacher, the KD student and an ensemble member; the experiment runner
  killed mid-training resumes on a rerun and then skips what is finished; a killed evaluation or
  pseudo-labelling leaves only complete files; a write killed half-way (SIGXFSZ from a file-size
  limit, at whatever byte it happens) never replaces the previous file;
* failed writes (ENOSPC, EFBIG) leave the previous checkpoint / prediction / datalist / report intact;
* safe loading: every ``torch.load`` is ``weights_only=True``; a malicious pickle is refused as the
  KD teacher, as a resume checkpoint and as the evaluated model; a checkpoint of another
  architecture is refused before training;
* numerical faults (``tests/reliability_faults/*.json``, config overrides only: forward hooks on the
  trainer's network, so they fit every trainer): a NaN loss and a NaN gradient under a finite loss stop
  the run non-zero with the checkpoints byte-identical — teacher, KD student and ensemble member;
* bad environment: a checkpoint folder that is a file (teacher, ensemble member), an output folder
  inside a file, a read-only folder (EROFS / EACCES injected at the write call), a folder missing on a
  rank > 0, a full disk (teacher, KD student, ensemble member).

What is guaranteed, and what these tests showed, is written up in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_runner import (
    ROOT,
    TINY,
    bundle_command,
    bundle_config,
    kill_group,
    log_tail,
    run_bundle,
    run_command,
    run_commands,
)
from tests.test_ensemble_bundle import ENSEMBLE, ENSEMBLE_TINY
from tests.test_gpu_path import OMNI_TINY

FAULTS = Path(__file__).resolve().parent / "reliability_faults"
CHECKPOINTS = ("checkpoint.pt", "model.pt")
ITERATION_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ --")
EPOCH_METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- .*val_mean_dice: ([0-9.]+)")
# temporary files of the atomic writers: ".<target name>.<random>.tmp"
TEMP_FILE = re.compile(r"^\..+\.[^.]+\.tmp$")
#: the ensemble member of the fault set: the one that trains with a VAE branch (a tuple output)
MEMBER = "resunet"


# ---------------------------------------------------------------------------------------------
# helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """File name → sha256 of every file in ``folder`` (hidden ones included)."""
    return {p.name: sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def trained_epochs(checkpoint: dict) -> int:
    state = checkpoint["trainer"]
    return state["iteration"] // state["epoch_length"]


def best_score(checkpoint: dict) -> float:
    """The best validation mean Dice recorded by the best-model saver in a resume checkpoint."""
    return float(checkpoint["best_model_saver"]["_saved"][0][0])


def epoch_length(run) -> int:
    """Iterations per epoch of a finished training (read from its checkpoint)."""
    return int(load(run.ckpt_dir / "checkpoint.pt")["trainer"]["epoch_length"])


def iteration_epochs(log: str) -> set[int]:
    return {int(m.group(1)) for m in ITERATION_LINE.finditer(log)}


def teacher_overrides(datalist: Path, work: Path, **extra) -> dict:
    return dict(TINY, datalist=str(datalist), ckpt_dir=str(work / "models"), output_dir=str(work / "runs"), **extra)


def run_and_kill_when(command: list[str], cwd: Path, log_file: Path, condition: Callable[[str, subprocess.Popen], bool],
                      timeout: float = 300, **popen) -> tuple[str, int]:
    """Start ``command`` (output to ``log_file``) and SIGKILL it (only it, not its children) once
    ``condition(log so far, process)`` holds.

    Returns the log and the exit code (``-SIGKILL`` when it was killed, anything else when the
    command ended first, which the caller must treat as a failed injection). The command runs in a
    process group of its own, killed whole on timeout or when the test is interrupted.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", **popen.pop("env", {}))
    with log_file.open("w") as out:
        proc = subprocess.Popen(command, cwd=str(cwd), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if condition(log_file.read_text(), proc):
                    proc.kill()
                    break
                time.sleep(0.01)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                kill_group(proc)
            proc.wait()
    return log_file.read_text(), proc.returncode


def run_jobs(jobs: dict[str, tuple], parallel: int = 4, timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Run bundle commands, ``parallel`` at a time, one torch thread each, each in its own process group
    (killed whole on timeout: :func:`tests.bundle_runner.run_commands`).

    ``jobs``: name → ``(bundle, configs, cwd, overrides[, preexec_fn])``.
    """
    return run_commands(
        {
            name: (bundle_command(bundle, configs, **overrides), cwd, *preexec)
            for name, (bundle, configs, cwd, overrides, *preexec) in jobs.items()
        },
        parallel=parallel,
        timeout=timeout,
    )


def assert_failed_before_training(result: subprocess.CompletedProcess, *messages: str) -> None:
    log = result.stdout
    assert result.returncode != 0, f"the run should have failed:\n{log_tail(log)}"
    for message in messages:
        assert message in log, f"expected {message!r} in the log:\n{log_tail(log)}"
    assert not ITERATION_LINE.search(log), f"the run must stop before the first iteration:\n{log_tail(log)}"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.name.startswith("tmp"))


class CheckpointWatcher(threading.Thread):
    """Loads every checkpoint file of ``folder`` each time it changes, while a training runs.

    Temporary files (``.<name>.<random>.tmp``) may appear and vanish; every other file must load
    with ``weights_only=True`` at every moment it is seen. ``problems`` collects the violations.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.problems: list[str] = []
        self.versions: set[tuple[str, int, int]] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.check()
            time.sleep(0.05)

    def check(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if TEMP_FILE.match(path.name):
                continue
            if path.name not in CHECKPOINTS:
                self.problems.append(f"unexpected file {path.name}")
                continue
            try:
                with path.open("rb") as f:  # the open file stays this version even if it is replaced now
                    st = os.fstat(f.fileno())
                    version = (path.name, st.st_ino, st.st_mtime_ns)
                    if version in self.versions:
                        continue
                    torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
                self.versions.add(version)
            except FileNotFoundError:
                continue  # removed between listing and opening: only temp files may be, checked above
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the failure under test
                self.problems.append(f"{path.name}: {type(err).__name__}: {err}")

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.check()


# ---------------------------------------------------------------------------------------------
# 1. kills and resume


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_and_keeps_the_best_model(datalist, trained_teacher_run, tmp_path):
    """SIGKILL in the middle of epoch 2 of 3 (``reliability_faults/kill.json``: the process kills itself
    during the forward of epoch 2's second step), then ``--resume true`` with the same epochs."""
    overrides = teacher_overrides(datalist, tmp_path, epochs=3, val_interval=1)
    length = epoch_length(trained_teacher_run)  # the same fold and batch size
    ckpt = tmp_path / "models"
    watcher = CheckpointWatcher(ckpt)
    watcher.start()
    try:
        killed = run_bundle("teacher", ["train.json", str(FAULTS / "kill.json")], cwd=tmp_path, check=False,
                            **dict(overrides, kill_at=length + 2))
        killed_log, code = killed.stdout, killed.returncode
        assert code == -signal.SIGKILL, f"the training ended (code {code}) before it could be killed:\n{log_tail(killed_log)}"
        assert iteration_epochs(killed_log) == {1, 2} and f"Epoch: 2/3, Iter: 1/{length}" in killed_log
        assert f"Epoch: 2/3, Iter: 2/{length}" not in killed_log, "killed in the second step of epoch 2"
        after_kill = load(ckpt / "checkpoint.pt")
        assert trained_epochs(after_kill) == 1, "the checkpoint must be that of the last completed epoch"
        model_after_kill = sha256(ckpt / "model.pt")

        resumed = run_bundle("teacher", "train.json", cwd=tmp_path, **dict(overrides, resume=True)).stdout
    finally:
        watcher.stop()
    assert not watcher.problems, f"a checkpoint file was incomplete or unloadable at some moment: {watcher.problems}"
    assert len(watcher.versions) >= 3, f"the watcher saw too few checkpoint versions to mean anything: {watcher.versions}"

    assert f"Restored all variables from {ckpt / 'checkpoint.pt'}" in resumed
    assert iteration_epochs(resumed) == {2, 3}, "the resumed run must train only the epochs after the checkpoint"
    final = load(ckpt / "checkpoint.pt")
    assert trained_epochs(final) == 3 and final["trainer"]["max_epochs"] == 3
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINTS), "temporary files were left behind"

    # model.pt is replaced only by a better validation Dice: the saver's record after the resume is the
    # best of all validated epochs, and model.pt changed iff a resumed epoch beat the pre-kill best.
    scores = {int(e): float(s) for e, s in EPOCH_METRICS.findall(killed_log + resumed)}
    assert sorted(scores) == [1, 2, 3], scores
    resumed_best = max(scores[2], scores[3])
    assert best_score(final) == pytest.approx(max(best_score(after_kill), resumed_best), abs=1e-4)
    if resumed_best < best_score(after_kill) - 1e-4:
        assert sha256(ckpt / "model.pt") == model_after_kill, "model.pt was replaced by a worse model"
    elif resumed_best > best_score(after_kill) + 1e-4:
        assert sha256(ckpt / "model.pt") != model_after_kill, "a better epoch after the resume was not saved"


@pytest.mark.slow
def test_resume_never_replaces_a_better_earlier_model(faulty_runs):
    """The earlier run's best score is part of checkpoint.pt: set to a perfect 1.0 (an earlier model no
    epoch can beat), the resumed run must keep model.pt byte-identical and the record must survive."""
    result, ckpt = faulty_runs["results"]["unbeatable_best"], faulty_runs["context"]["unbeatable_best"]["dir"] / "models"
    assert result.returncode == 0, log_tail(result.stdout)
    assert iteration_epochs(result.stdout) == {3}
    after = load(ckpt / "checkpoint.pt")
    assert trained_epochs(after) == 3 and best_score(after) == 1.0
    model = ckpt / "model.pt"
    assert sha256(model) == faulty_runs["files_before"]["unbeatable_best"][model], "model.pt was replaced by a worse model"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# The smoke preset trains 1 epoch; a mid-training kill needs 2. Only the teacher, to keep it short.
EXPERIMENT_DRIVER = (
    "import dataclasses, tools.presets as p, tools.experiment as e; s = p.PRESETS['smoke']; "
    "p.PRESETS['smoke'] = dataclasses.replace(s, bundle={**s.bundle, 'epochs': 2}); "
    "e.KDNET_MODELS = e.KDNET_MODELS[:1]; e.main()"
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the runner's child process")
def test_experiment_runner_killed_mid_training_resumes_it_and_skips_finished_stages(tmp_path):
    """``tools.experiment kdnet --preset smoke`` (teacher only, 2 epochs) killed in fold 1's training,
    after fold 0 is trained and evaluated; then the same command again."""
    out = tmp_path / "exp"
    # one stage at a time (the runner's default runs 2 side by side): the scenario is "fold 0 finished, fold 1
    # training", and the killed runner has exactly one child to lose
    command = [sys.executable, "-c", EXPERIMENT_DRIVER, "kdnet", "--preset", "smoke", "--jobs", "1", "--out", str(out)]
    env = {"PYTHONPATH": str(ROOT)}
    train_log = out / "fold1" / "teacher" / "train" / "log.txt"
    stage_pid: list[int] = []

    def mid_training(_runner_log: str, runner: subprocess.Popen) -> bool:
        if train_log.exists() and re.search(r"Epoch: 2/2, Iter: 1/", train_log.read_text()):
            stage_pid.extend(_children(runner.pid))
            return True
        return False

    # Only the runner is killed (not its process group): its training must not live on unseen.
    log, code = run_and_kill_when(command, tmp_path, tmp_path / "runner1.log", mid_training, env=env)
    assert code == -signal.SIGKILL, f"the experiment ended (code {code}) before it could be killed:\n{log_tail(log)}"
    assert len(stage_pid) == 1, f"expected the training stage as the runner's only child, found {stage_pid}"
    deadline = time.monotonic() + 30
    while _alive(stage_pid[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(stage_pid[0]), "the training kept running after its runner was killed"
    ckpt = out / "fold1" / "teacher" / "models"
    assert trained_epochs(load(ckpt / "checkpoint.pt")) == 1, "the orphaned training went on writing checkpoints"
    assert (out / "fold0" / "teacher" / "evaluate" / "summary.json").exists()

    def attempts() -> dict[str, int]:
        return {str(p.relative_to(out)): len(re.findall(r"^\$ ", p.read_text(), re.M)) for p in out.rglob("log.txt")}

    before = attempts()
    rerun = run_command(command, tmp_path, env=dict(os.environ, **env), timeout=900, merge_stderr=False)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    after = attempts()
    for stage in ("fold0/teacher/train/log.txt", "fold0/teacher/evaluate/log.txt"):
        assert after[stage] == before[stage] == 1, f"the finished stage {stage} was run again"
    assert after["fold1/teacher/train/log.txt"] == 2
    second_attempt = train_log.read_text().split("\n$ ")[-1]
    assert "Restored all variables from" in second_attempt, "the rerun restarted the training instead of resuming it"
    assert iteration_epochs(second_attempt) == {2}
    assert trained_epochs(load(ckpt / "checkpoint.pt")) == 2
    assert (out / "fold1" / "teacher" / "evaluate" / "summary.json").exists()
    assert (out / "report.md").exists()


@pytest.mark.slow
def test_killed_evaluation_leaves_only_complete_predictions_and_a_rerun_completes(trained_teacher_run, datalist_json, tmp_path):
    overrides = dict(trained_teacher_run.overrides, output_dir=str(tmp_path / "eval"))
    predictions = tmp_path / "eval" / "predictions"
    configs = ["train.json", "evaluate.json"]

    def some_written(_log: str, _proc) -> bool:
        return predictions.is_dir() and any(
            p.name.endswith(".nii.gz") and not p.name.startswith(".") for p in predictions.iterdir()
        )

    log, code = run_and_kill_when(
        bundle_command("teacher", configs, **overrides), tmp_path, tmp_path / "killed.log", some_written
    )
    assert code == -signal.SIGKILL, f"the evaluation ended (code {code}) before it could be killed:\n{log_tail(log)}"
    test_cases = sorted(c["case_id"] for c in datalist_json["training"] if c["fold"] == 0)
    written = sorted(p.name for p in predictions.iterdir())
    for name in written:
        if TEMP_FILE.match(name):
            continue  # an interrupted write: it never carries the .nii.gz suffix
        assert name.removesuffix(".nii.gz") in test_cases, f"unexpected file {name}"
        image = nib.load(str(predictions / name))
        assert set(np.unique(np.asanyarray(image.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert not (tmp_path / "eval" / "summary.json").exists()

    run_bundle("teacher", configs, cwd=tmp_path, **overrides)
    assert sorted(p.name for p in predictions.iterdir()) == [f"{c}.nii.gz" for c in test_cases]
    for case in test_cases:
        np.asanyarray(nib.load(str(predictions / f"{case}.nii.gz")).dataobj)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())


# A process that writes once completely, then dies of SIGXFSZ half-way through the second write of
# the same file: the file-size limit kills it at whatever byte the writer has reached, with no
# knowledge of the writer's internals.
HALF_WRITE_CHILD = r"""
import os, resource, signal, sys
what, target = sys.argv[1], sys.argv[2]
import nibabel as nib, numpy as np, torch

def cut_next_write():
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

if what == "nifti":
    from brats_kd.io import write_nifti_atomic
    rng = np.random.default_rng(0)
    write_nifti_atomic(target, nib.Nifti1Image(rng.integers(0, 5, (40, 40, 40)).astype(np.uint8), np.eye(4)))
    print("first write complete", flush=True)
    cut_next_write()
    write_nifti_atomic(target, nib.Nifti1Image(rng.integers(0, 5, (40, 40, 40)).astype(np.uint8), np.eye(4)))
else:
    from ignite.engine import Engine, Events
    from brats_kd.checkpoints import AtomicCheckpointSaver
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    saver = AtomicCheckpointSaver(save_dir=os.path.dirname(target), save_dict={"model": net}, save_interval=1,
                                  n_saved=1, interval_filename=os.path.basename(target), epoch_level=True)
    saver.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def after_save(e):
        print("first write complete", flush=True)
        cut_next_write()

    engine.run([0], max_epochs=2)
print("second write complete", flush=True)
"""


@pytest.mark.parametrize("what, name", [("nifti", "BraTS2021_00000.nii.gz"), ("checkpoint", "checkpoint.pt")])
def test_a_write_killed_half_way_never_replaces_the_previous_file(what, name, tmp_path):
    target = tmp_path / "out" / name
    target.parent.mkdir()
    script = tmp_path / "child.py"
    script.write_text(HALF_WRITE_CHILD)
    proc = subprocess.run([sys.executable, str(script), what, str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, f"the second write was not cut: {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("first write complete") == 1 and "second write complete" not in proc.stdout

    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and TEMP_FILE.match(leftovers[0].name), [p.name for p in leftovers]
    assert leftovers[0].stat().st_size > 0, "the kill should have hit a partly written temporary file"
    assert not leftovers[0].name.endswith((".nii.gz", ".pt")), "a partial file must not look like an output"
    first = target.read_bytes()

    if what == "nifti":
        from brats_kd.io import write_nifti_atomic

        image = nib.load(str(target))
        assert image.shape == (40, 40, 40)
        data = np.asanyarray(image.dataobj)
        write_nifti_atomic(target, nib.Nifti1Image(np.zeros_like(data), np.eye(4)))  # a later, successful write
        assert not np.asanyarray(nib.load(str(target)).dataobj).any()
    else:
        from ignite.engine import Engine

        from brats_kd.checkpoints import AtomicCheckpointSaver

        assert set(load(target)["model"]) == {"weight", "bias"}
        net = torch.nn.Linear(64, 64)
        engine = Engine(lambda e, b: None)
        AtomicCheckpointSaver(
            save_dir=str(target.parent),
            save_dict={"model": net},
            save_interval=1,
            n_saved=1,
            interval_filename=name,
            epoch_level=True,
        ).attach(engine)
        engine.run([0], max_epochs=1)
        assert torch.equal(load(target)["model"]["weight"], net.weight)
    assert target.read_bytes() != first
    assert [p.name for p in target.parent.iterdir()] == [name], "the successful write must remove the stale temporary file"


# ---------------------------------------------------------------------------------------------
# 2. failed writes leave the previous file intact


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` of any file fail with EFBIG (Python ignores SIGXFSZ), as root too: a disk
    that cannot take the file, whatever the writer's internals."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def fail_fsync_of(monkeypatch, prefix: str) -> None:
    """Make ``os.fsync`` fail with ENOSPC for temporary files named ``<prefix>…`` (the data is already
    in the temporary file: a disk that fills up while it is flushed)."""
    real = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(prefix):
            _enospc()
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_checkpoint_saver_on_a_full_disk_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from brats_kd.checkpoints import AtomicCheckpointSaver

    net = torch.nn.Linear(32, 32)
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": net, "trainer": engine},
        save_interval=1,
        n_saved=1,
        interval_filename="checkpoint.pt",
        epoch_level=True,
    ).attach(engine)
    engine.run([0], max_epochs=1)
    before = snapshot(tmp_path)

    real_save = torch.save

    def half_then_enospc(obj, f, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        _enospc()

    monkeypatch.setattr(torch, "save", half_then_enospc)
    engine.state.max_epochs = 2
    with pytest.raises(
        OSError,
        match=r"could not write checkpoint .*checkpoint\.pt': No space left on device\. "
        r"The previous 'checkpoint\.pt' \(if any\) is unchanged",
    ):
        engine.run([0])
    assert snapshot(tmp_path) == before, "the previous checkpoint changed or a temporary file was left"
    assert trained_epochs(load(tmp_path / "checkpoint.pt")) == 1


def _prepared(tmp_path: Path) -> tuple[Path, Path]:
    from tools.phantom import write_dataset
    from tools.prepare import prepare

    data = tmp_path / "data"
    write_dataset(data, layout="brats2021", cases=4, unlabeled=1, size=16, seed=0)
    out = tmp_path / "lists" / "datalist.json"
    out.parent.mkdir()
    prepare(data, out, folds=2, seed=0)
    return data, out


def _experiment_folder(out: Path) -> None:
    evaluate = out / "fold0" / "teacher" / "evaluate"
    evaluate.mkdir(parents=True)
    for metric in ("dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt"):
        (evaluate / f"{metric}_raw.csv").write_text("filename,class0,mean\ncase_a,0.5,0.5\ncase_b,0.75,0.75\n")
    (evaluate / "summary.json").write_text("{}")


def test_datalist_rewrite_failing_on_a_full_disk_keeps_the_old_datalist(tmp_path):
    from tools.prepare import prepare

    data, out = _prepared(tmp_path)
    before = snapshot(out.parent)
    with pytest.raises(OSError, match="File too large"), file_size_limit(64):
        prepare(data, out, folds=3, seed=1)
    assert snapshot(out.parent) == before


@pytest.mark.parametrize("failing", [".summary.json.", ".report.md."])
def test_report_rewrite_failing_on_a_full_disk_keeps_the_old_files(failing, tmp_path, monkeypatch):
    from tools.report import write_report

    _experiment_folder(tmp_path)
    write_report(tmp_path)
    old_report = (tmp_path / "report.md").read_bytes()
    (tmp_path / "fold0" / "teacher" / "evaluate" / "dice_wt_raw.csv").write_text("filename,class0,mean\ncase_a,0.1,0.1\n")
    before = snapshot(tmp_path)
    fail_fsync_of(monkeypatch, failing)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(tmp_path)
    after = snapshot(tmp_path)
    assert not temp_files(tmp_path), "a temporary file was left behind"
    assert (tmp_path / "report.md").read_bytes() == old_report
    if failing == ".summary.json.":
        assert after == before, "nothing may change when the first file cannot be written"


@pytest.mark.parametrize("what", ["prediction", "metric summary"])
def test_bundle_writers_failing_on_a_full_disk_keep_the_old_file(what, tmp_path):
    from brats_kd import io, metrics

    if what == "prediction":
        target = tmp_path / "BraTS2021_00001.nii.gz"
        io.write_nifti_atomic(target, nib.Nifti1Image(np.full((6, 6, 6), 2, np.uint8), np.eye(4)))
        write = lambda: io.write_nifti_atomic(target, nib.Nifti1Image(np.full((6, 6, 6), 4, np.uint8), np.eye(4)))  # noqa: E731
    else:
        target = tmp_path / "summary.json"
        (tmp_path / "dice_raw.csv").write_text("filename,class0,mean\na,0.5,0.5\n")
        metrics.write_metric_summary(str(tmp_path))
        (tmp_path / "dice_raw.csv").write_text("filename,class0,mean\na,0.9,0.9\n")
        write = lambda: metrics.write_metric_summary(str(tmp_path))  # noqa: E731
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="File too large"), file_size_limit(64):
        write()
    assert snapshot(tmp_path) == before, "the old file changed or a temporary file was left"


# ---------------------------------------------------------------------------------------------
# 3. safe loading


def test_every_torch_load_in_bundles_and_tools_is_weights_only():
    """Every ``torch.load(`` call in brats_kd/, bundles/ and tools/ (code and configs) passes ``weights_only=True``;
    no ``pickle.load`` / ``allow_pickle=True`` at all."""
    calls, problems = 0, []
    for path in sorted(
        p for d in ("brats_kd", "bundles", "tools") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".json")
    ):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            line = text.count("\n", 0, match.start()) + 1
            depth, end = 1, match.end()  # the call's argument text, up to its closing parenthesis
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            arguments = text[match.end() : end - 1]
            if text[max(0, match.start() - 2) : match.start()] == "``" or "..." in arguments:
                continue  # documentation of the call, not a call
            calls += 1
            if not re.search(r"\bweights_only\s*=\s*True\b", arguments):
                problems.append(f"{path.relative_to(ROOT)}:{line}: torch.load({arguments})")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False"):
            for match in re.finditer(pattern, text):
                problems.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}")
    assert calls >= 2, "the scan found no torch.load call at all: is it looking in the right place?"
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


def test_monai_checkpoint_loader_used_by_every_bundle_is_weights_only():
    """Resume, evaluation and inference load through MONAI's CheckpointLoader: it must stay weights_only."""
    import inspect

    from monai.handlers import CheckpointLoader

    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker)}, path)
    return path


def test_the_malicious_payload_is_live(tmp_path):
    """Guard for the tests below: a full unpickle of the file does run the payload."""
    marker = tmp_path / "PWNED"
    torch.load(_malicious_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def faulty_runs(trained_teacher_run, tmp_path_factory) -> dict:
    """Bundle runs with one injected fault each, side by side, each in its own folder and mostly
    starting from a copy of the session teacher's 2-epoch checkpoints: malicious pickles, a
    checkpoint of another architecture, a checkpoint folder that is a file, an output folder inside
    a file, a full disk, NaN faults, and an earlier best model no epoch can beat."""
    root = tmp_path_factory.mktemp("faults")
    run = trained_teacher_run
    common = dict(run.overrides, cache_rate=0.0)
    jobs, context = {}, {}

    def folder(name: str, with_checkpoints: bool = False) -> Path:
        path = root / name
        path.mkdir()
        context[name] = {"dir": path, "marker": path / "PWNED"}
        if with_checkpoints:
            shutil.copytree(run.ckpt_dir, path / "models")
        return path

    def resume(work: Path, epochs: int, **extra) -> dict:
        return dict(common, ckpt_dir=str(work / "models"), output_dir=str(work / "runs"), epochs=epochs, resume=True, **extra)

    # malicious pickles: the KD teacher, the resume checkpoint, the evaluated model
    work = folder("evil_teacher")
    evil = _malicious_checkpoint(work / "teacher" / "model.pt", context["evil_teacher"]["marker"])
    jobs["evil_teacher"] = (
        "kd_student",
        "train.json",
        work,
        dict(common, teacher_ckpt=str(evil), ckpt_dir=str(work / "models"), output_dir=str(work / "runs"), epochs=1),
    )
    work = folder("evil_resume")
    _malicious_checkpoint(work / "models" / "checkpoint.pt", context["evil_resume"]["marker"])
    jobs["evil_resume"] = ("teacher", "train.json", work, resume(work, 3))
    work = folder("evil_model")
    _malicious_checkpoint(work / "models" / "model.pt", context["evil_model"]["marker"])
    jobs["evil_model"] = (
        "teacher",
        ["train.json", "evaluate.json"],
        work,
        dict(common, ckpt_dir=str(work / "models"), output_dir=str(work / "eval")),
    )
    # another architecture: a 1-channel (T1ce) network resuming from the 4-channel teacher
    work = folder("wrong_channels", with_checkpoints=True)
    jobs["wrong_channels"] = ("teacher", "train.json", work, resume(work, 3, modalities=["t1ce"]))
    # bad environment
    work = folder("ckpt_dir_is_a_file")
    (work / "models").write_text("not a folder\n")
    jobs["ckpt_dir_is_a_file"] = (
        "teacher",
        "train.json",
        work,
        dict(common, ckpt_dir=str(work / "models"), output_dir=str(work / "runs"), epochs=1),
    )
    work = folder("output_inside_a_file")
    (work / "eval").write_text("not a folder\n")
    jobs["output_inside_a_file"] = (
        "teacher",
        ["train.json", "evaluate.json"],
        work,
        dict(common, output_dir=str(work / "eval" / "run1")),
    )
    work = folder("disk_full", with_checkpoints=True)
    limit = 256 * 1024  # bytes per file: TensorBoard events fit, a checkpoint does not (EFBIG, as root too)
    assert min(p.stat().st_size for p in (work / "models").iterdir()) > limit

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    jobs["disk_full"] = ("teacher", "train.json", work, resume(work, 3), file_size_limit)
    # numerical faults (config overrides only): nan_loss makes the loss NaN from the 2nd step of epoch 3;
    # nan_gradient makes the weights NaN at the last step of epoch 3 under a finite loss, so that without
    # a check they would be validated and saved at the end of that epoch.
    epoch_length = load(run.ckpt_dir / "checkpoint.pt")["trainer"]["epoch_length"]
    for fault, keys in (("nan_loss", {"fault_after": 1}), ("nan_gradient", {"fault_at": epoch_length})):
        work = folder(fault, with_checkpoints=True)
        jobs[fault] = ("teacher", ["train.json", str(FAULTS / f"{fault}.json")], work, resume(work, 4, **keys))
    # an earlier best model that no epoch can beat (its recorded score set to a perfect 1.0)
    work = folder("unbeatable_best", with_checkpoints=True)
    checkpoint = load(work / "models" / "checkpoint.pt")
    checkpoint["best_model_saver"]["_saved"] = [(1.0, checkpoint["best_model_saver"]["_saved"][0][1])]
    torch.save(checkpoint, work / "models" / "checkpoint.pt")
    jobs["unbeatable_best"] = ("teacher", "train.json", work, resume(work, 3))

    files_before = {name: {p: sha256(p) for p in c["dir"].rglob("*") if p.is_file()} for name, c in context.items()}
    return {"results": run_jobs(jobs), "context": context, "files_before": files_before, "epoch_length": epoch_length}


def _unchanged(faulty_runs: dict, name: str) -> None:
    """Every file the job's folder held before the run is byte-identical, and nothing was added to its
    checkpoint folder (no temporary file either)."""
    before = faulty_runs["files_before"][name]
    for path, digest in before.items():
        assert path.exists() and sha256(path) == digest, f"{name}: {path.name} changed"
    models = faulty_runs["context"][name]["dir"] / "models"
    if models.is_dir():
        assert sorted(models.iterdir()) == sorted(p for p in before if p.parent == models), f"{name}: files added"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, message",
    [
        ("evil_teacher", "Refusing to load teacher checkpoint"),
        ("evil_resume", "Weights only load failed"),
        ("evil_model", "Weights only load failed"),
    ],
)
def test_a_malicious_pickle_is_refused_and_never_runs(faulty_runs, name, message):
    result = faulty_runs["results"][name]
    assert_failed_before_training(result, message)
    assert "Unsupported global" in result.stdout or "not a plain state dict" in result.stdout
    assert not faulty_runs["context"][name]["marker"].exists(), "the pickle's payload ran"
    _unchanged(faulty_runs, name)
    assert not (faulty_runs["context"][name]["dir"] / "eval" / "predictions").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_refused_before_training(faulty_runs):
    result = faulty_runs["results"]["wrong_channels"]
    assert_failed_before_training(result, "size mismatch", "torch.Size([4, 4, 3, 3, 3])", "torch.Size([4, 1, 3, 3, 3])")
    _unchanged(faulty_runs, "wrong_channels")


# ---------------------------------------------------------------------------------------------
# 4. numerical faults


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, message",
    [
        ("nan_loss", "training loss is nan at epoch 3, iteration {first_of_epoch_3_plus_1}"),
        ("nan_gradient", "became NaN or infinite at epoch 3, iteration {last_of_epoch_3} although the loss was finite"),
    ],
)
def test_a_numerical_fault_stops_the_run_and_leaves_the_checkpoints_byte_identical(faulty_runs, fault, message):
    length = faulty_runs["epoch_length"]
    message = message.format(first_of_epoch_3_plus_1=2 * length + 2, last_of_epoch_3=3 * length)
    log = faulty_runs["results"][fault].stdout
    assert faulty_runs["results"][fault].returncode != 0, f"the run must fail:\n{log_tail(log)}"
    assert message in log and "the checkpoints on disk are those of the last completed epoch" in log, log_tail(log)
    assert "Saved checkpoint" not in log
    assert iteration_epochs(log) == {3}
    _unchanged(faulty_runs, fault)


# ---------------------------------------------------------------------------------------------
# 4b. the same faults for the KD student (KDTrainer, dict output, a frozen teacher) and an ensemble
#     member (its checkpoints in models/<member>, VAE-regularised tuple output): kill and resume, NaN
#     loss, NaN gradient, full disk, each from the epoch-1 checkpoints of the killed run


OTHER_TRAINERS = ("kd_student", "member", "omni_student")


def trainer_run(kind: str, datalist: Path, teacher_ckpt_dir: Path, work: Path) -> dict:
    """Bundle, configs, overrides and checkpoint folder of a 2-epoch training of ``kind`` in ``work``."""
    common = dict(datalist=str(datalist), output_dir=str(work / "runs"), epochs=2, val_interval=1, cache_rate=0.0)
    if kind == "kd_student":
        overrides = dict(TINY, **common, teacher_ckpt=str(teacher_ckpt_dir / "model.pt"), ckpt_dir=str(work / "models"))
        return dict(bundle="kd_student", configs=["train.json"], overrides=overrides, ckpt=work / "models", work=work)
    if kind == "omni_student":  # on the manual labels only: the pseudo-labelled datalist changes nothing here
        overrides = dict(OMNI_TINY, **common, ckpt_dir=str(work / "models"))
        return dict(bundle="omni_student", configs=["train.json"], overrides=overrides, ckpt=work / "models", work=work)
    # the member's folder comes from models_dir + member, as in a user's run
    overrides = dict(ENSEMBLE_TINY, **common, models_dir=str(work / "models"))
    return dict(bundle=ENSEMBLE, configs=["train.json", f"member_{MEMBER}.json"], overrides=overrides,
                ckpt=work / "models" / MEMBER, work=work)


def inference_network(kind: str) -> torch.nn.Module:
    """The network that evaluation and inference build for ``kind`` (what model.pt must load into)."""
    if kind == "kd_student":
        return bundle_config("kd_student", "inference.json", **TINY).get_parsed_content("network_def")
    if kind == "omni_student":
        return bundle_config("omni_student", "inference.json", **OMNI_TINY).get_parsed_content("network_def")
    return bundle_config(ENSEMBLE, ["train.json", f"member_{MEMBER}.json"], **ENSEMBLE_TINY).get_parsed_content("network_def")


@pytest.fixture(scope="module")
def trainer_faults(datalist, trained_teacher_run, tmp_path_factory) -> dict:
    """Phase 1: the KD student, the member and the omni-student train 2 epochs and kill themselves in the second step of
    epoch 2 (``kill.json``); the member's checkpoint folder is also tried as a file. Phase 2, side by
    side: each killed run resumed, and NaN loss, NaN gradient and a full disk, each on a copy of the
    killed run's epoch-1 checkpoints, resuming into epoch 2."""
    root = tmp_path_factory.mktemp("trainer_faults")
    length = epoch_length(trained_teacher_run)  # same fold, batch size 2, one sample per case
    runs = {kind: trainer_run(kind, datalist, trained_teacher_run.ckpt_dir, root / kind / "resume") for kind in OTHER_TRAINERS}
    jobs = {}
    for kind, run in runs.items():
        run["work"].mkdir(parents=True)
        jobs[f"{kind}_killed"] = (run["bundle"], run["configs"] + [str(FAULTS / "kill.json")], run["work"],
                                  dict(run["overrides"], kill_at=length + 2))
    blocked = trainer_run("member", datalist, trained_teacher_run.ckpt_dir, root / "member" / "ckpt_dir_is_a_file")
    blocked["ckpt"].parent.mkdir(parents=True)
    blocked["ckpt"].write_text("not a folder\n")
    jobs["member_ckpt_dir_is_a_file"] = (blocked["bundle"], blocked["configs"], blocked["work"], blocked["overrides"])
    results = run_jobs(jobs)

    jobs, files_before, after_kill = {}, {}, {}
    for kind, run in runs.items():
        if results[f"{kind}_killed"].returncode != -signal.SIGKILL or not (run["ckpt"] / "checkpoint.pt").exists():
            continue  # test_..._killed_mid_epoch reports it; there is nothing to resume from
        after_kill[kind] = {"checkpoint": load(run["ckpt"] / "checkpoint.pt"), "model": sha256(run["ckpt"] / "model.pt"),
                            "sizes": [p.stat().st_size for p in run["ckpt"].iterdir()]}
        jobs[f"{kind}_resume"] = (run["bundle"], run["configs"], run["work"], dict(run["overrides"], resume=True))
        # a file-size limit (EFBIG, as root too) under the size of every checkpoint file: TensorBoard's events fit
        limit = min(after_kill[kind]["sizes"]) // 2
        assert limit > 32 * 1024, f"{kind}: checkpoints too small for the full-disk fault: {after_kill[kind]['sizes']}"

        def file_size_limit(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        for fault, keys, extra in (
            ("nan_loss", {"fault_after": 1}, [str(FAULTS / "nan_loss.json")]),  # NaN from epoch 2's second step
            ("nan_gradient", {"fault_at": length}, [str(FAULTS / "nan_gradient.json")]),  # at epoch 2's last step
            ("disk_full", {}, []),
        ):
            copy = trainer_run(kind, datalist, trained_teacher_run.ckpt_dir, root / kind / fault)
            shutil.copytree(run["ckpt"], copy["ckpt"])
            files_before[f"{kind}_{fault}"] = (copy["ckpt"], snapshot(copy["ckpt"]))
            job = (copy["bundle"], copy["configs"] + extra, copy["work"], dict(copy["overrides"], resume=True, **keys))
            jobs[f"{kind}_{fault}"] = job + ((file_size_limit,) if fault == "disk_full" else ())
    results.update(run_jobs(jobs))
    return {"results": results, "runs": runs, "blocked": blocked, "after_kill": after_kill, "files_before": files_before,
            "epoch_length": length}


@pytest.mark.slow
@pytest.mark.parametrize("kind", OTHER_TRAINERS)
def test_a_killed_training_resumes_from_its_last_epoch_and_keeps_the_best_model(trainer_faults, kind):
    length, run = trainer_faults["epoch_length"], trainer_faults["runs"][kind]
    killed = trainer_faults["results"][f"{kind}_killed"]
    assert killed.returncode == -signal.SIGKILL, f"not killed (code {killed.returncode}):\n{log_tail(killed.stdout)}"
    assert iteration_epochs(killed.stdout) == {1, 2} and f"Epoch: 2/2, Iter: 1/{length}" in killed.stdout
    after_kill = trainer_faults["after_kill"][kind]
    assert trained_epochs(after_kill["checkpoint"]) == 1, "the checkpoint must be that of the last completed epoch"

    resumed = trainer_faults["results"][f"{kind}_resume"]
    assert resumed.returncode == 0, log_tail(resumed.stdout)
    ckpt = run["ckpt"]
    assert f"Restored all variables from {ckpt / 'checkpoint.pt'}" in resumed.stdout
    assert iteration_epochs(resumed.stdout) == {2}, "the resumed run must train only the epoch after the checkpoint"
    final = load(ckpt / "checkpoint.pt")
    assert trained_epochs(final) == 2 and final["trainer"]["max_epochs"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINTS), "temporary files were left behind"
    assert sorted(p.relative_to(run["work"]).as_posix() for p in run["work"].rglob("*.pt")) == sorted(
        (ckpt / name).relative_to(run["work"]).as_posix() for name in CHECKPOINTS
    ), "checkpoints outside the run's own folder"

    scores = {int(e): float(s) for e, s in EPOCH_METRICS.findall(killed.stdout + resumed.stdout)}
    assert sorted(scores) == [1, 2], scores
    assert best_score(final) == pytest.approx(max(scores.values()), abs=1e-4)
    if scores[2] < scores[1] - 1e-4:
        assert sha256(ckpt / "model.pt") == after_kill["model"], "model.pt was replaced by a worse model"
    elif scores[2] > scores[1] + 1e-4:
        assert sha256(ckpt / "model.pt") != after_kill["model"], "a better epoch after the resume was not saved"
    inference_network(kind).load_state_dict(load(ckpt / "model.pt")["model"], strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", OTHER_TRAINERS)
@pytest.mark.parametrize(
    "fault, message",
    [
        ("nan_loss", "training loss is nan at epoch 2, iteration {second_of_epoch_2}"),
        ("nan_gradient", "became NaN or infinite at epoch 2, iteration {last_of_epoch_2} although the loss was finite"),
        ("disk_full", r"could not write checkpoint '.*(model|checkpoint)\.pt': File too large\. The previous"),
    ],
)
def test_a_fault_stops_the_training_and_leaves_its_checkpoints_byte_identical(trainer_faults, kind, fault, message):
    length = trainer_faults["epoch_length"]
    assert f"{kind}_{fault}" in trainer_faults["results"], "the killed run left nothing to start the fault from"
    result = trainer_faults["results"][f"{kind}_{fault}"]
    log = result.stdout
    assert result.returncode not in (0, -signal.SIGKILL), f"the run must fail by itself:\n{log_tail(log)}"
    message = message.format(second_of_epoch_2=length + 2, last_of_epoch_2=2 * length)
    assert (re.search(message, log) if fault == "disk_full" else message in log), f"expected {message!r}:\n{log_tail(log)}"
    if fault != "disk_full":
        assert "the checkpoints on disk are those of the last completed epoch" in log and "Saved checkpoint" not in log
    assert iteration_epochs(log) == {2}
    ckpt, before = trainer_faults["files_before"][f"{kind}_{fault}"]
    assert snapshot(ckpt) == before, "a checkpoint file changed or a file was added"


@pytest.mark.slow
def test_an_ensemble_member_folder_that_is_a_file_fails_before_the_first_epoch(trainer_faults):
    """``models_dir/<member>`` is a file: the member's savers refuse it at start-up."""
    result, blocked = trainer_faults["results"]["member_ckpt_dir_is_a_file"], trainer_faults["blocked"]
    assert_failed_before_training(
        result, f"checkpoint folder '{blocked['ckpt']}' is not a folder (a file of that name exists): set ckpt_dir to a folder"
    )
    assert blocked["ckpt"].read_text() == "not a folder\n"


# ---------------------------------------------------------------------------------------------
# 5. bad environment


@pytest.mark.slow
def test_a_checkpoint_folder_that_is_a_file_fails_before_the_first_epoch(faulty_runs):
    result = faulty_runs["results"]["ckpt_dir_is_a_file"]
    assert_failed_before_training(result, "is not a folder (a file of that name exists): set ckpt_dir to a folder")
    _unchanged(faulty_runs, "ckpt_dir_is_a_file")


@pytest.mark.slow
def test_an_evaluation_output_folder_inside_a_file_fails_clearly(faulty_runs):
    result = faulty_runs["results"]["output_inside_a_file"]
    folder = faulty_runs["context"]["output_inside_a_file"]["dir"]
    assert result.returncode != 0
    assert f"Not a directory: '{folder / 'eval' / 'run1'}" in result.stdout, log_tail(result.stdout)
    _unchanged(faulty_runs, "output_inside_a_file")


@pytest.mark.slow
def test_a_full_disk_stops_the_run_clearly_and_keeps_the_previous_checkpoints(faulty_runs):
    result = faulty_runs["results"]["disk_full"]
    log = result.stdout
    assert result.returncode != 0
    assert re.search(r"could not write checkpoint '.*(model|checkpoint)\.pt': File too large\. The previous", log), log_tail(log)
    assert iteration_epochs(log) == {3}
    _unchanged(faulty_runs, "disk_full")


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_a_read_only_checkpoint_folder_is_refused_at_start_up(tmp_path, monkeypatch, error):
    """A read-only file system or a folder without write permission: every file opened for writing in the
    folder fails with that error (injected at ``os.open`` and ``open``, whichever the saver uses), as the
    kernel would; root may write almost anywhere, so a real read-only folder needs a mount this test avoids."""
    import builtins

    from brats_kd.checkpoints import AtomicCheckpointSaver

    folder = tmp_path / "ro"
    folder.mkdir()
    real_os_open, real_open = os.open, builtins.open

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.fsdecode(path)).resolve().is_relative_to(folder)

    def refused(path) -> OSError:
        return OSError(error, os.strerror(error), os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise refused(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(OSError, match=rf"cannot write checkpoints to '.*ro': {re.escape(os.strerror(error))}") as raised:
        AtomicCheckpointSaver(save_dir=str(folder), save_dict={"model": torch.nn.Linear(2, 2)}, save_interval=1)
    assert raised.value.errno == error
    monkeypatch.undo()
    assert not list(folder.iterdir())


def test_every_rank_creates_a_missing_checkpoint_folder(tmp_path, monkeypatch):
    """Under torchrun Ignite's ``DiskSaver`` creates the folder on rank 0 only; a rank > 0 whose savers were
    built first found no folder and failed with ``NotADirectoryError: ... (a file of that name exists)``
    (an ensemble member on 2 gloo processes, 1 run in 3). Here the process is rank 1 and alone."""
    import ignite.distributed as idist

    from brats_kd.checkpoints import AtomicCheckpointSaver

    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    folder = tmp_path / "models" / "resunet"
    AtomicCheckpointSaver(save_dir=str(folder), save_dict={"model": torch.nn.Linear(2, 2)}, save_interval=1)
    assert folder.is_dir() and not list(folder.iterdir())


# ---------------------------------------------------------------------------------------------
# 6. pseudo-labelling


@pytest.mark.slow
def test_pseudo_labelling_killed_mid_way_resumes_without_redoing_a_case(datalist, datalist_json, tmp_path_factory, tmp_path):
    from tests.test_ensemble_bundle import trained_members

    out = tmp_path / "pseudo"
    overrides = dict(
        ENSEMBLE_TINY,
        datalist=str(datalist),
        models_dir=str(trained_members(tmp_path_factory, datalist)),
        pseudo_label_dir=str(out),
    )
    configs = ["inference.json", "pseudo_label.json"]
    cases = sorted(c["case_id"] for c in datalist_json["unlabeled"])
    assert len(cases) >= 2

    def labels() -> list[str]:
        return (
            sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith("."))
            if out.is_dir()
            else []
        )

    killed, code = run_and_kill_when(
        bundle_command(ENSEMBLE, configs, **overrides), tmp_path, tmp_path / "killed.log", lambda _log, _proc: len(labels()) >= 1
    )
    assert code == -signal.SIGKILL, f"pseudo-labelling ended (code {code}) before it could be killed:\n{log_tail(killed)}"
    done = labels()
    assert 1 <= len(done) < len(cases)
    first = {name: (sha256(out / name), (out / name).stat().st_mtime_ns) for name in done}
    for name in done:
        np.asanyarray(nib.load(str(out / name)).dataobj)
        assert json.loads((out / name.replace(".nii.gz", ".json")).read_text())["case_id"] == name.removesuffix(".nii.gz")
    assert not (out / "datalist.json").exists()

    rerun = run_bundle(ENSEMBLE, configs, cwd=tmp_path, **overrides).stdout
    assert f"skipped {len(done)} case(s) already pseudo-labelled" in rerun
    assert f"{len(cases) - len(done)} case(s) to pseudo-label" in rerun
    finished = {name.removesuffix(".nii.gz") for name in done}
    for case in cases:  # a finished case is never segmented again; every other case once by the rerun
        segmented = len(re.findall(rf"{re.escape(case)}: confidence", rerun))
        assert segmented == (0 if case in finished else 1), f"{case} segmented {segmented} times by the rerun"
    assert {n: (sha256(out / n), (out / n).stat().st_mtime_ns) for n in done} == first, "a finished case was rewritten"
    assert labels() == [f"{c}.nii.gz" for c in cases]
    for case in cases:
        assert set(np.unique(np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj)).tolist()) <= {0, 1, 2, 4}
    combined = json.loads((out / "datalist.json").read_text())
    assert sorted(e["case_id"] for e in combined["training"] if e["source"] == "pseudo") == cases
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files were left behind"
