"""The experiment runner's schedule: stages start only after the stages they need, independent stages
run side by side with the CPU cores split between them, and one failing stage stops the others."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tools import experiment
from tools.experiment import KDNET_MODELS, check_dependencies, model_stages, omni_stages, run_stages, threads_per_job
from tools.presets import PRESETS
from tools.stages import Stage, StageFailed


def fake_stage(tmp_path: Path, name: str, needs: tuple[str, ...] = ()) -> Stage:
    folder = tmp_path / name.replace("/", "_")
    return Stage(name=name, bundle="teacher", configs=["configs/train.json"], overrides={}, folder=folder,
                 kind="evaluate", done_file=folder / "summary.json", needs=needs)


class FakeRunner:
    """Stands in for ``run_stage``: records start and end times, writes the done file, can fail."""

    def __init__(self, seconds: float = 0.2, fail: str | None = None):
        self.seconds, self.fail = seconds, fail
        self.spans: dict[str, tuple[float, float]] = {}
        self.threads: dict[str, int | None] = {}
        self.stopped = threading.Event()

    def __call__(self, stage: Stage, on_epoch=None, threads=None) -> float:
        start = time.monotonic()
        self.threads[stage.name] = threads
        if stage.name == self.fail:
            raise StageFailed(f"stage {stage.name} failed (exit code 1)")
        # a stage still running when another fails must be stopped, not waited for to its end
        self.stopped.wait(self.seconds)
        if not self.stopped.is_set():
            stage.done_file.parent.mkdir(parents=True, exist_ok=True)
            stage.done_file.write_text("{}")
        self.spans[stage.name] = (start, time.monotonic())
        return self.spans[stage.name][1] - start


@pytest.fixture
def fake(monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(experiment, "run_stage", runner)
    monkeypatch.setattr(experiment, "check_overrides", lambda stage: None)
    monkeypatch.setattr(experiment, "stop_running_stages", runner.stopped.set)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(experiment.os, "cpu_count", lambda: 2)
    return runner


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_independent_stages_run_side_by_side_and_dependents_wait(fake, tmp_path):
    stages = [
        fake_stage(tmp_path, "fold0/teacher/train"),
        fake_stage(tmp_path, "fold0/baseline/train"),
        fake_stage(tmp_path, "fold0/student/train", needs=("fold0/teacher/train",)),
        fake_stage(tmp_path, "fold0/student/evaluate", needs=("fold0/student/train",)),
    ]
    records = run_stages(stages, tmp_path, jobs=2)
    spans = fake.spans
    assert overlaps(spans["fold0/teacher/train"], spans["fold0/baseline/train"]), "teacher and baseline side by side"
    assert spans["fold0/student/train"][0] >= spans["fold0/teacher/train"][1], "the student waits for its teacher"
    assert spans["fold0/student/evaluate"][0] >= spans["fold0/student/train"][1]
    assert set(records) == {s.name for s in stages} and all(r["status"] == "done" for r in records.values())
    assert set(fake.threads.values()) == {1}, "2 cores split between 2 jobs: 1 thread each"


def test_one_job_keeps_the_planned_order_and_inherits_threads(fake, tmp_path):
    names = ["fold0/teacher/train", "fold0/baseline/train", "fold0/teacher/evaluate"]
    stages = [fake_stage(tmp_path, n) for n in names]
    stages[2].needs = (names[0],)
    fake.seconds = 0.01
    run_stages(stages, tmp_path, jobs=1)
    assert sorted(fake.spans, key=lambda n: fake.spans[n][0]) == names
    assert set(fake.threads.values()) == {None}


def test_a_user_thread_count_wins(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_job(2) is None, "the bundle processes inherit OMP_NUM_THREADS=3"


def test_a_failing_stage_stops_the_running_ones_and_starts_no_more(fake, tmp_path):
    fake.seconds, fake.fail = 30.0, "fold0/baseline/train"
    stages = [
        fake_stage(tmp_path, "fold0/teacher/train"),
        fake_stage(tmp_path, "fold0/baseline/train"),
        fake_stage(tmp_path, "fold0/teacher/evaluate", needs=("fold0/teacher/train",)),
    ]
    start = time.monotonic()
    with pytest.raises(StageFailed, match="fold0/baseline/train"):
        run_stages(stages, tmp_path, jobs=2)
    assert time.monotonic() - start < 10, "the teacher's 30 s stage was stopped, not waited for"
    assert "fold0/teacher/evaluate" not in fake.threads, "nothing starts after a failure"


def test_finished_stages_are_skipped_and_unblock_their_dependents(fake, tmp_path):
    teacher = fake_stage(tmp_path, "fold0/teacher/train")
    teacher.done_file.parent.mkdir(parents=True)
    teacher.done_file.write_text("{}")
    evaluate = fake_stage(tmp_path, "fold0/teacher/evaluate", needs=(teacher.name,))
    run_stages([teacher, evaluate], tmp_path, jobs=2)
    assert list(fake.spans) == [evaluate.name]


def test_a_stage_planned_before_what_it_needs_is_refused(tmp_path):
    early = fake_stage(tmp_path, "fold0/student/train", needs=("fold0/teacher/train",))
    with pytest.raises(ValueError, match="fold0/student/train needs fold0/teacher/train"):
        check_dependencies([early, fake_stage(tmp_path, "fold0/teacher/train")])


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_bad_jobs_are_refused(jobs, tmp_path):
    with pytest.raises(ValueError, match="--jobs"):
        run_stages([], tmp_path, jobs=jobs)


def test_the_planned_experiments_declare_what_each_stage_reads(tmp_path):
    datalist, preset = tmp_path / "datalist.json", PRESETS["smoke"]
    kd = [s for m in KDNET_MODELS for s in model_stages(m, tmp_path, 0, datalist, preset, 0, {})]
    needs = {s.name: s.needs for s in kd}
    assert needs["fold0/teacher/train"] == () and needs["fold0/baseline/train"] == ()
    assert needs["fold0/student/train"] == ("fold0/teacher/train",)
    assert needs["fold0/student/evaluate"] == ("fold0/student/train",)
    omni = {s.name: s for s in omni_stages(tmp_path, 0, datalist, preset, 0)}
    members = {f"fold0/member_{m}/train" for m in ("unet", "resunet", "cascade")}
    assert set(omni["fold0/ensemble/evaluate"].needs) == members == set(omni["fold0/pseudo_label"].needs)
    assert omni["fold0/omni_student/train"].needs == ("fold0/pseudo_label",)
    assert omni["fold0/manual_student/train"].needs == ()
    check_dependencies(kd)
    check_dependencies(list(omni.values()))


def train_stage(tmp_path: Path, name: str, epochs: int, needs: tuple[str, ...] = ()) -> Stage:
    stage = fake_stage(tmp_path, name, needs)
    stage.kind, stage.epochs = "train", epochs
    stage.overrides = {"ckpt_dir": str(stage.folder / "models")}  # no checkpoint: not trained yet
    return stage


def kd_fold(tmp_path: Path, fold: int) -> list[Stage]:
    teacher = train_stage(tmp_path, f"fold{fold}/teacher/train", 80)
    return [
        teacher,
        train_stage(tmp_path, f"fold{fold}/baseline/train", 80),
        train_stage(tmp_path, f"fold{fold}/student/train", 80, needs=(teacher.name,)),
        fake_stage(tmp_path, f"fold{fold}/student/evaluate", needs=(f"fold{fold}/student/train",)),
    ]


def test_remaining_path_is_the_longest_chain_of_dependents(tmp_path):
    path = experiment.remaining_path(kd_fold(tmp_path, 0))
    # teacher 80 + student 80 + evaluation 1; the baseline has no dependents here
    assert path == {"fold0/teacher/train": 161, "fold0/baseline/train": 80, "fold0/student/train": 81,
                    "fold0/student/evaluate": 1}


def test_teachers_start_first_so_no_student_runs_alone_at_the_end(fake, tmp_path):
    """Planned order T0 B0 S0 T1 B1 S1: in that order two slots end with a student alone; by critical
    path both teachers run first, then the students and baselines in pairs."""
    fake.seconds = 0.15
    stages = kd_fold(tmp_path, 0) + kd_fold(tmp_path, 1)
    run_stages(stages, tmp_path, jobs=2)
    first_two = sorted(fake.spans, key=lambda n: fake.spans[n][0])[:2]
    assert sorted(first_two) == ["fold0/teacher/train", "fold1/teacher/train"]
    baselines_start = min(fake.spans[f"fold{f}/baseline/train"][0] for f in (0, 1))
    assert all(fake.spans[f"fold{f}/teacher/train"][1] <= baselines_start + 0.05 for f in (0, 1))
