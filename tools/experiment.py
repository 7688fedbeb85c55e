"""One-command experiments: data → every bundle's training and evaluation per fold → report.

    python -m tools.experiment kdnet --data synthetic --preset quick --out runs/quick
    python -m tools.experiment kdnet --data /data/BraTS2018 --folds 3 --preset paper --out runs/kd --ablation
    python -m tools.experiment omni --data synthetic --preset quick --out runs/omni
    python -m tools.experiment missing --data synthetic --preset quick --out runs/missing --subsets "flair t1,t2"

Every model is trained and evaluated by running its bundle (``monai.bundle run`` with overrides);
nothing here re-implements their logic. A rerun with the same ``--out`` skips the stages whose
outputs are complete and resumes an interrupted training from its last epoch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fire
from tqdm.auto import tqdm

from brats_kd.config import as_flag
from brats_kd.io import write_json_atomic
from tools import official_metrics as official_metrics_module
from tools.prepare import DatasetError, UsageError
from tools.presets import Preset, get_preset
from tools.run_lock import FolderBusy, acquire_folder, runner_command
from tools.stages import ROOT, Stage, StageFailed, check_overrides, defined_settings, run_stage, stop_running_stages


@dataclass(frozen=True)
class Model:
    """A row of a results table: which bundle trains it, with which override files."""

    name: str
    bundle: str
    configs: tuple[str, ...]
    teacher: str | None = None  # for KD students: the model whose checkpoint is the frozen teacher
    overrides: dict = field(default_factory=dict)


TRAIN = "configs/train.json"
KDNET_MODELS = (
    Model("teacher", "teacher", (TRAIN,)),
    Model("baseline", "teacher", (TRAIN, "configs/baseline.json")),
    Model("student", "kd_student", (TRAIN,), teacher="teacher"),
)
# KD-Net Table 2: the loss-term ablation with 4 and with 0 skip connections.
KDNET_ABLATION_MODELS = (
    Model("student_gt_kl", "kd_student", (TRAIN, "configs/ablation_gt_kl.json"), teacher="teacher"),
    Model("student_gt_kd", "kd_student", (TRAIN, "configs/ablation_gt_kd.json"), teacher="teacher"),
    Model("teacher_skip0", "teacher", (TRAIN, "configs/skip0.json")),
    Model("baseline_skip0", "teacher", (TRAIN, "configs/baseline.json", "configs/skip0.json")),
    Model(
        "student_skip0_gt_kl", "kd_student", (TRAIN, "configs/skip0.json", "configs/ablation_gt_kl.json"), teacher="teacher_skip0"
    ),
    Model(
        "student_skip0_gt_kd", "kd_student", (TRAIN, "configs/skip0.json", "configs/ablation_gt_kd.json"), teacher="teacher_skip0"
    ),
    Model("student_skip0", "kd_student", (TRAIN, "configs/skip0.json"), teacher="teacher_skip0"),
)
DEFAULT_METHOD = "kdnet"  # the ``student`` row: kd_student's train.json as it is (KD-Net, the paper's losses)
# Methods whose teacher is not the 4-modality teacher. ``born_again``: the KD-Net losses with the fold's baseline
# (the student's own inputs and network) as the frozen teacher, a control that separates what the losses do to
# training from what the teacher's extra modalities add (Furlanello et al., Born-again neural networks, ICML 2018).
METHOD_TEACHERS = {"born_again": "baseline"}


TEACHERS = ("teacher", "teacher_skip0")  # the 4-modality models the students distil from


def check_activation_option(activation: str) -> None:
    """``--activation``: the network head of every model of an experiment, ``sigmoid`` or ``softmax``."""
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"--activation must be sigmoid or softmax, got {activation!r}")


def check_epochs(epochs, preset: Preset) -> int:
    """``--epochs``, else the preset's ``epochs``: a whole number >= 1."""
    value = epochs if epochs is not None else preset.epochs
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--epochs must be a whole number >= 1, got {epochs!r}")
    return value


def check_teacher_epochs(teacher_epochs, preset: Preset, epochs: int | None = None) -> int:
    """``--teacher_epochs``, else the preset's ``teacher_epochs``, else ``epochs`` (``--epochs``), else the preset's
    ``epochs``: a whole number >= 1."""
    value = teacher_epochs if teacher_epochs is not None else (preset.teacher_epochs or epochs or preset.epochs)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--teacher_epochs must be a whole number >= 1, got {teacher_epochs!r}")
    return value


def method_models(methods) -> tuple[Model, ...]:
    """``--methods``: one KD student row per named loss configuration of kd_student, same folds, same teacher.

    ``kdnet`` is the default student (row ``student``); any other name ``m`` is the override file
    ``configs/method_<m>.json`` (``hinton``, ``protokd``, ``features``, the KD-Net variants
    ``kdnet_kl_channel`` ...) or, failing that, the Table 2 file ``configs/ablation_<m>.json`` (``gt_kd``,
    ``gt_kl``), trained as row ``student_<m>``, from the fold's 4-modality teacher except for the controls of
    :data:`METHOD_TEACHERS`. Unknown names fail before anything is written.
    """
    if methods is None:
        return ()
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    if not names or any(not n for n in names) or len(set(names)) < len(names):
        raise ValueError(f"--methods must be distinct names separated by commas, e.g. kdnet,hinton; got {methods!r}")
    bundle = ROOT / "bundles" / "kd_student"
    models = []
    for name in names:
        if name == DEFAULT_METHOD:
            continue  # the student row every kdnet experiment trains
        candidates = [f"configs/method_{name}.json", f"configs/ablation_{name}.json"]
        found = next((c for c in candidates if (bundle / c).is_file()), None)
        if found is None:
            known = sorted(
                [p.stem[len("method_") :] for p in bundle.glob("configs/method_*.json")]
                + [p.stem[len("ablation_") :] for p in bundle.glob("configs/ablation_gt_k*.json")]
            )
            raise ValueError(f"--methods: no kd_student config for {name!r} ({' or '.join(candidates)}); "
                             f"known: {DEFAULT_METHOD}, {', '.join(known)}")
        models.append(Model(f"student_{name}", "kd_student", (TRAIN, found), teacher=METHOD_TEACHERS.get(name, "teacher")))
    return tuple(models)


GPU_CONFIG = "configs/gpu.json"


def check_device(device: str | None) -> None:
    """``--device``: ``None`` (the bundles' defaults) or ``cuda``, which needs a visible CUDA device.

    Asked in a short subprocess, so that the runner itself never holds a CUDA context.
    """
    if device is None:
        return
    if device != "cuda":
        raise ValueError(f"--device must be cuda (or left out for the bundles' defaults), got {device!r}")
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")


def use_gpu_configs(stages: list[Stage], device: str | None) -> list[Stage]:
    """``--device cuda``: every stage built on train.json (training, evaluation, teacher cache) merges its
    bundle's ``configs/gpu.json`` last (bf16 autocast, data cached on the GPU, cudnn.benchmark; docs/performance.md).
    The pseudo-labelling stage runs inference.json, which picks CUDA and amp by itself."""
    if device == "cuda":
        for stage in stages:
            if TRAIN in stage.configs and GPU_CONFIG not in stage.configs:
                stage.configs.append(GPU_CONFIG)
    return stages


def model_dir(out: Path, fold: int, model: str) -> Path:
    return out / f"fold{fold}" / model


def model_stages(
    model: Model, out: Path, fold: int, datalist: Path, preset: Preset, seed: int, extra: dict, shared: bool = True
) -> list[Stage]:
    """The training and the evaluation stage of ``model`` on ``fold``.

    ``shared``: apply all of the preset's bundle settings (the KD-Net bundles); otherwise only ``extra``.
    """
    folder = model_dir(out, fold, model.name)
    overrides = {
        **(preset.bundle if shared else {}),
        **extra,
        "datalist": str(datalist),
        "fold": fold,
        "seed": seed,
        "ckpt_dir": str(folder / "models"),
        "resume": True,
        **model.overrides,  # last: a model may train on another datalist or keep its weights elsewhere
    }
    needs: tuple[str, ...] = ()
    if model.teacher is not None:
        overrides["teacher_ckpt"] = str(model_dir(out, fold, model.teacher) / "models" / "model.pt")
        needs = (f"fold{fold}/{model.teacher}/train",)
    train = Stage(
        name=f"fold{fold}/{model.name}/train",
        bundle=model.bundle,
        configs=list(model.configs),
        overrides={**overrides, "output_dir": str(folder / "train")},
        folder=folder / "train",
        kind="train",
        epochs=int(overrides["epochs"]),
        needs=needs,
    )
    evaluate = Stage(
        name=f"fold{fold}/{model.name}/evaluate",
        bundle=model.bundle,
        configs=list(model.configs) + ["configs/evaluate.json"],
        overrides={**overrides, "output_dir": str(folder / "evaluate")},
        folder=folder / "evaluate",
        kind="evaluate",
        done_file=folder / "evaluate" / "summary.json",
        needs=(train.name,),
    )
    return [train, evaluate]


def postprocessed_evaluation(evaluate: Stage, et_min_voxels: int) -> Stage:
    """A second evaluation of the same checkpoint with the BraTS ET post-processing, in ``evaluate_et<N>``:
    the report shows each table both ways, from the same trainings."""
    name = f"evaluate_et{et_min_voxels}"
    folder = evaluate.folder.parent / name
    return Stage(
        name=evaluate.name.rsplit("/", 1)[0] + f"/{name}",
        bundle=evaluate.bundle,
        configs=list(evaluate.configs),
        overrides={**evaluate.overrides, "et_min_voxels": et_min_voxels, "output_dir": str(folder)},
        folder=folder,
        kind="evaluate",
        done_file=folder / "summary.json",
        needs=evaluate.needs,
    )


def teacher_cache_stage(model: Model, out: Path, fold: int, datalist: Path, preset: Preset, seed: int, extra: dict) -> Stage:
    """``teacher_mode: cached``: the stage storing the targets of KD student ``model``'s teacher in
    ``extra["teacher_cache_dir"]``, with the student training's own settings; run before that training."""
    train = model_stages(model, out, fold, datalist, preset, seed, extra)[0]
    cache_dir = Path(extra["teacher_cache_dir"])
    return Stage(
        name=f"fold{fold}/{model.teacher}/teacher_cache",
        bundle=model.bundle,
        configs=train.configs + ["configs/cache_teacher.json"],
        overrides={**train.overrides, "output_dir": str(cache_dir)},
        folder=cache_dir,
        kind="infer",
        done_file=cache_dir / "summary.json",  # written last by the cache step
        needs=train.needs,
    )


def prepare_data(data: str, out: Path, preset: Preset, folds: int, seed: int, need_unlabeled: bool) -> Path:
    """Write (or reuse) ``out/datalist.json``; for ``synthetic``, first generate the phantom in ``out/data``."""
    from tools import phantom, prepare

    datalist = out / "datalist.json"
    if datalist.exists():
        return datalist
    if data == "synthetic":
        data_dir = out / "data"
        if data_dir.exists():
            # An interrupted generation (no datalist yet): the folder is ours and incomplete.
            shutil.rmtree(data_dir)
        phantom.write_dataset(
            data_dir,
            layout="brats2021",
            cases=preset.phantom_cases,
            unlabeled=preset.phantom_unlabeled if need_unlabeled else 0,
            size=preset.phantom_size,
            seed=seed,
        )
    else:
        data_dir = Path(data).expanduser().resolve()
    prepare.prepare(data_dir, datalist, folds=folds, seed=seed)
    return datalist


def environment() -> dict:
    """Versions and the git commit, recorded with every experiment."""
    import monai
    import numpy
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "git_commit": commit,
        "git_dirty": dirty,
    }


def default_jobs() -> int:
    """Stages run side by side by default: 2 where there are at least 2 CPU cores, else 1.

    The quick preset's small 3-D networks do not keep 2 threads busy, so two 1-thread stages side by
    side use 2 cores better than one 2-thread stage (docs/performance.md has the measured wall times).
    On a GPU the stages share one device, so ``--jobs 1`` is the better choice there.
    """
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def threads_per_job(jobs: int) -> int | None:
    """CPU threads of each stage when ``jobs`` run at once: the cores split evenly; None (inherit) for 1 job.

    A user's ``OMP_NUM_THREADS`` wins, so a run can be pinned to a thread count (results depend on it).
    """
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def parallelism(jobs: int | None) -> dict:
    """``--jobs`` (None: :func:`default_jobs`) and the threads each stage gets, as recorded in experiment.json."""
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    return {"jobs": jobs, "threads_per_job": threads_per_job(jobs) or os.environ.get("OMP_NUM_THREADS", "inherited")}


def check_dependencies(stages: list[Stage]) -> None:
    """Every stage a stage needs must come earlier in ``stages`` (so the order is a valid schedule)."""
    seen: set[str] = set()
    for stage in stages:
        missing = [name for name in stage.needs if name not in seen]
        if missing:
            raise ValueError(f"stage {stage.name} needs {', '.join(missing)}, which is not planned before it")
        seen.add(stage.name)


def remaining_path(stages: list[Stage]) -> dict[str, int]:
    """Per stage, the cost of the longest chain of stages that starts with it (it, then what needs it, ...).

    A training costs its epochs, any other stage 1: a rough duration, enough to rank the stages. Starting the
    stage with the longest chain first (a teacher before a baseline: the teacher's student waits for it) keeps
    a long stage from running alone at the end while the other cores idle (list scheduling by critical path).
    """
    dependents: dict[str, list[str]] = {s.name: [] for s in stages}
    for stage in stages:
        for need in stage.needs:
            dependents.setdefault(need, []).append(stage.name)
    cost = {s.name: max(1, s.epochs) if s.kind == "train" else 1 for s in stages}
    path: dict[str, int] = {}
    for stage in reversed(stages):  # check_dependencies: every dependent comes after what it needs
        path[stage.name] = cost[stage.name] + max((path[d] for d in dependents[stage.name]), default=0)
    return path


def run_stages(stages: list[Stage], out: Path, jobs: int = 1) -> dict:
    """Run the unfinished stages with progress bars, up to ``jobs`` at once; wall times go to ``stages.json``.

    A stage starts when every stage it ``needs`` is done. With ``jobs=1`` the order is exactly the list's;
    with more, the ready stage with the longest chain of dependents goes first (:func:`remaining_path`),
    ties in list order. Which stage runs when does not change any stage's result. When a stage fails, the
    others still running are stopped (their trainings resume on the next run) and :class:`StageFailed` is raised.
    """
    import json

    jobs = parallelism(jobs)["jobs"]
    check_dependencies(stages)
    for stage in stages:  # every stage before the first one runs: a typo must not surface hours in
        check_overrides(stage)
    records_file = out / "stages.json"
    records = json.loads(records_file.read_text()) if records_file.exists() else {}
    threads = threads_per_job(jobs)
    path = remaining_path(stages)
    pending = sorted(stages, key=lambda s: -path[s.name]) if jobs > 1 else list(stages)  # sorted() is stable
    done, running = set(), {}

    def launch(pool: ThreadPoolExecutor, stage: Stage):
        bar = (
            tqdm(total=stage.epochs, desc=stage.name, unit="epoch", leave=False, file=sys.stderr)
            if stage.kind == "train"
            else None
        )
        on_epoch = (lambda n: bar.update(n - bar.n)) if bar is not None else None
        running[pool.submit(run_stage, stage, on_epoch, threads)] = (stage, bar)

    with tqdm(total=len(stages), desc="stages", unit="stage", file=sys.stderr) as overall, ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            ready = [s for s in pending if all(n in done for n in s.needs)]
            while ready:
                stage = ready.pop(0)
                if stage.is_done():  # finished by an earlier run: skip it, and what needs it may be ready now
                    pending.remove(stage)
                    done.add(stage.name)
                    records.setdefault(stage.name, {})["status"] = "done"
                    overall.update()
                    ready = [s for s in pending if all(n in done for n in s.needs)]
                elif len(running) < jobs:
                    pending.remove(stage)
                    launch(pool, stage)
            if not running:
                if pending:  # every pending stage waits on a stage that can never finish
                    raise StageFailed(f"stages {', '.join(s.name for s in pending)} cannot start: what they need did not run")
                break
            overall.set_postfix_str(", ".join(stage.name for stage, _ in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage, bar = running.pop(future)
                if bar is not None:
                    bar.close()
                try:
                    seconds = future.result()
                except BaseException:
                    stop_running_stages()
                    write_json_atomic(records_file, records)
                    raise
                done.add(stage.name)
                records[stage.name] = {
                    "status": "done",
                    "seconds": round(seconds, 1),
                    "finished": dt.datetime.now().isoformat(timespec="seconds"),
                }
                write_json_atomic(records_file, records)
                overall.update()
    write_json_atomic(records_file, records)
    return records


def folds_to_run(num_folds: int, run_folds) -> list[int]:
    """All folds, or the subset ``run_folds`` (e.g. one fold per machine; the report covers what exists)."""
    if run_folds is None:
        return list(range(num_folds))
    chosen = sorted({int(f) for f in (run_folds if isinstance(run_folds, (list, tuple)) else [run_folds])})
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_folds:
        raise ValueError(f"--run_folds must name folds in [0, {num_folds - 1}], got {run_folds!r}")
    return chosen


# Options that change what a finished stage holds: a rerun with another value would reuse stale trainings.
MODEL_OPTIONS = ("activation", "dice_batch", "dice_squared", "epochs", "teacher_epochs", "teacher_mode")


def check_same_models(record: Path, wanted: dict) -> None:
    """Refuse to resume ``record``'s experiment folder with settings that change its models.

    A rerun skips every finished stage, so a teacher trained with ``--activation sigmoid`` would be evaluated and
    distilled again as if it were the softmax one asked for now. Settings absent from an older record are not compared;
    adding rows (``--methods``, ``--ablation``), folds to run or evaluations (``--et_min_voxels``) stays allowed.
    """
    if not record.exists():
        return
    recorded = json.loads(record.read_text())
    previous = {"experiment": recorded.get("experiment"), "folds": recorded.get("folds"), "seed": recorded.get("seed"),
                "preset": (recorded.get("preset") or {}).get("name"), **(recorded.get("options") or {})}
    changed = [f"{key}: {previous[key]!r} there, {value!r} now" for key, value in wanted.items()
               if key in previous and previous[key] is not None and previous[key] != value]
    if changed:
        raise ValueError(
            f"{record.parent} holds an experiment with other settings ({'; '.join(changed)}); its finished stages would be "
            "reused as if they had been trained with the new ones. Use another --out (or remove that folder)."
        )


def _start(
    kind: str, data: str, out: str, preset: str, folds: int | None, seed: int, run_folds, args: dict
) -> tuple[Path, Preset, int, list[int]]:
    """Check the arguments (before anything is written), create ``out`` and record the experiment."""
    chosen = get_preset(preset)
    num_folds = int(folds) if folds is not None else chosen.folds
    if num_folds < 2:
        raise ValueError(f"--folds must be at least 2, got {num_folds}")
    fold_list = folds_to_run(num_folds, run_folds)
    root = Path(out).expanduser().resolve()
    previous = acquire_folder(root)  # before anything is written: one runner per folder
    if previous:
        print(f"taking over {root} from a runner that is gone ({previous})", file=sys.stderr)
    check_same_models(root / "experiment.json", {"experiment": kind, "folds": num_folds, "seed": seed, "preset": chosen.name,
                                                 **{k: v for k, v in args.items() if k in MODEL_OPTIONS}})
    write_json_atomic(
        root / "experiment.json",
        {
            "experiment": kind,
            "command": runner_command(),
            "data": data,
            "folds": num_folds,
            "seed": seed,
            "preset": asdict(chosen),
            "options": args,
            "environment": environment(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    return root, chosen, num_folds, fold_list


def kdnet(
    data: str = "synthetic",
    out: str = "runs/kdnet",
    preset: str = "quick",
    folds: int | None = None,
    seed: int = 0,
    ablation: bool = False,
    teacher_mode: str = "online",
    run_folds=None,
    et_min_voxels: int = 0,
    jobs: int | None = None,
    activation: str = "sigmoid",
    device: str | None = None,
    official_metrics: bool = False,
    methods=None,
    teacher_epochs: int | None = None,
    dice_batch: bool = False,
    epochs: int | None = None,
) -> str:
    """KD-Net (Hu et al.): teacher, T1ce baseline and KD student per fold (+ Table 2 with ``--ablation``).

    Args:
        data: a BraTS folder (any layout ``tools.prepare`` knows) or ``synthetic`` for the built-in phantom.
        out: experiment folder; rerunning with the same folder resumes.
        preset: ``smoke`` (tests), ``quick`` (CPU minutes), ``paper`` (KD-Net's settings, for a GPU).
        folds: cross-validation folds (default: the preset's).
        seed: seed of the phantom, the split, initialisation and augmentation.
        ablation: also train the Table 2 variants (GT+KL, GT+KD; 0 skip connections).
        teacher_mode: ``online`` (teacher run on every batch) or ``cached`` (precomputed targets).
        run_folds: only these folds (e.g. ``0`` or ``[0,2]``); default all.
        et_min_voxels: also evaluate every model with predicted ET under this many BraTS (1 mm³) voxels
            turned into necrosis, the same value for every model; the report then has each table both ways.
        jobs: stages run side by side (teacher and baseline, a student as soon as its teacher is done),
            each with the CPU cores split evenly; default 2 on a machine with 2 or more cores. Results
            depend on the threads per stage, so compare runs made with the same ``--jobs``.
        activation: the network head of teacher, baseline and student: ``sigmoid`` (3 region channels TC/WT/ET)
            or ``softmax`` (4 exclusive classes, KD-Net's Eq. 1 as written).
        device: ``cuda``: every bundle run merges its ``configs/gpu.json``; ``--jobs`` defaults to 1 (one GPU).
        official_metrics: after the evaluations, also score every saved label map with the BraTS challenge's own
            scorer (``tools.official_metrics``; its venv from ``tools/brats_eval_env.sh``) and add its lesion-wise
            Dice and HD95 to the report.
        methods: more KD students from the same teachers, one report row each, e.g. ``kdnet,hinton,protokd``
            (``kdnet`` is the default student; other names are kd_student's ``configs/method_<name>.json`` or
            the Table 2 files ``configs/ablation_<name>.json``: ``gt_kd``, ``gt_kl``).
        teacher_epochs: epochs of the 4-modality teachers (default: the preset's ``teacher_epochs``, else
            ``--epochs``, else the preset's ``epochs``); baseline and students keep ``--epochs``, so they stay comparable.
        dice_batch: L_GT's Dice over the whole batch (nnU-Net's batch Dice) for every model of the table.
        epochs: epochs of the baselines and students (and of the teachers unless ``--teacher_epochs`` or the preset
            says otherwise); default the preset's ``epochs``. The learning-rate schedule is the preset's.
    """
    check_device(device)
    extra_students = method_models(methods)  # an unknown method fails here, before anything is written
    jobs = 1 if jobs is None and device == "cuda" else jobs  # one GPU: stages one at a time
    if official_metrics:
        official_metrics_module.scorer_python()  # a missing scorer venv fails now, not after the trainings
    if teacher_mode not in ("online", "cached"):
        raise ValueError(f"--teacher_mode must be online or cached, got {teacher_mode!r}")
    check_activation_option(activation)
    if isinstance(et_min_voxels, bool) or not isinstance(et_min_voxels, int) or et_min_voxels < 0:
        raise ValueError(f"--et_min_voxels must be a whole number >= 0 (0 = off), got {et_min_voxels!r}")
    if not isinstance(dice_batch, bool):
        raise ValueError(f"--dice_batch must be True or False, got {dice_batch!r}")
    parallel = parallelism(jobs)  # a bad --jobs fails here, before anything is written
    chosen_epochs = check_epochs(epochs, get_preset(preset))
    chosen_teacher_epochs = check_teacher_epochs(teacher_epochs, get_preset(preset), chosen_epochs)
    root, chosen, num_folds, fold_list = _start(
        "kdnet",
        data,
        out,
        preset,
        folds,
        seed,
        run_folds,
        {"ablation": ablation, "teacher_mode": teacher_mode, "run_folds": run_folds, "et_min_voxels": et_min_voxels,
         "activation": activation, "device": device, "methods": methods, "epochs": chosen_epochs,
         "teacher_epochs": chosen_teacher_epochs, "dice_batch": dice_batch, **parallel},
    )
    start = time.monotonic()
    datalist = prepare_data(data, root, chosen, num_folds, seed, need_unlabeled=False)
    models = KDNET_MODELS + (KDNET_ABLATION_MODELS if ablation else ())
    models += tuple(m for m in extra_students if m.name not in {known.name for known in models})
    stages = kd_stages(models, root, fold_list, datalist, chosen, seed, teacher_mode=teacher_mode, activation=activation,
                       dice_batch=dice_batch, epochs=chosen_epochs, teacher_epochs=chosen_teacher_epochs,
                       et_min_voxels=et_min_voxels)
    run_stages(use_gpu_configs(stages, device), root, parallel["jobs"])
    if official_metrics:
        official_metrics_module.score_experiment(str(root), parallel["jobs"])
    return _finish_report(root, start)


def kd_stages(
    models, root: Path, fold_list: list[int], datalist: Path, preset: Preset, seed: int, *, teacher_mode: str = "online",
    activation: str = "sigmoid", dice_batch: bool = False, epochs: int | None = None, teacher_epochs: int | None = None,
    et_min_voxels: int = 0,
) -> list[Stage]:
    """Per fold, the stages of the KD-Net-style ``models`` (teachers, baselines and KD students of the teacher and
    kd_student bundles), in a valid schedule: training and evaluation of each, a teacher cache per teacher and fold
    with ``teacher_mode="cached"``, and the ET-post-processed evaluation with ``et_min_voxels``. Every model trains
    ``epochs`` (None: the preset's), the 4-modality teachers (:data:`TEACHERS`) ``teacher_epochs`` (None: the same)."""
    stages = []
    for fold in fold_list:
        for model in models:
            extra = {"teacher_mode": teacher_mode} if model.bundle == "kd_student" else {}
            extra["activation"] = activation  # one head for teacher, baseline and student (a student checks its teacher's)
            extra["dice_batch"] = dice_batch
            if epochs is not None:
                extra["epochs"] = epochs
            if model.name in TEACHERS and teacher_epochs is not None:
                extra["epochs"] = teacher_epochs
            if model.teacher is not None and teacher_mode == "cached":
                # one cache per teacher and fold, shared by the students of that teacher
                extra["teacher_cache_dir"] = str(model_dir(root, fold, model.teacher) / "teacher_cache")
                cache = teacher_cache_stage(model, root, fold, datalist, preset, seed, extra)
                stages += [cache] if cache.name not in {s.name for s in stages} else []
            train, evaluate = model_stages(model, root, fold, datalist, preset, seed, extra)
            if model.teacher is not None and teacher_mode == "cached":
                train.needs += (cache.name,)
            stages += [train, evaluate] + ([postprocessed_evaluation(evaluate, et_min_voxels)] if et_min_voxels else [])
    return stages


def _finish_report(root: Path, start: float) -> str:
    from tools.report import write_report

    report = write_report(root)
    print(f"report: {report} ({time.monotonic() - start:.0f} s)")
    return str(report)


def missing_models(subsets) -> tuple[Model, ...]:
    """The missing-modality experiment's rows: the 4-modality teacher, then per subset (:func:`tools.missing.parse_subsets`)
    a baseline (the teacher bundle's baseline config with ``modalities`` = the subset) and a KD student (kd_student with
    ``student_modalities`` = the subset) of that teacher. A subset ``t1ce`` gives exactly kdnet's baseline and student."""
    from tools.missing import baseline_name, student_name

    models = [KDNET_MODELS[0]]
    for subset in subsets:
        models += [
            Model(baseline_name(subset), "teacher", (TRAIN, "configs/baseline.json"), overrides={"modalities": list(subset)}),
            Model(student_name(subset), "kd_student", (TRAIN,), teacher="teacher",
                  overrides={"student_modalities": list(subset)}),
        ]
    return tuple(models)


def plan_missing(subsets="all") -> tuple[Model, ...]:
    """``--subsets`` → the models of ``missing`` (checked; raises ValueError with the reason for a bad subset)."""
    from tools.missing import parse_subsets

    return missing_models(parse_subsets(subsets))


def missing(
    data: str = "synthetic",
    out: str = "runs/missing",
    preset: str = "quick",
    subsets="all",
    folds: int | None = None,
    seed: int = 0,
    run_folds=None,
    jobs: int | None = None,
    activation: str = "sigmoid",
) -> str:
    """Missing modalities: one 4-modality teacher per fold, then a baseline and a KD student per subset of T1, T1ce,
    T2, FLAIR; the report's "Missing modalities" table (Dice ET/TC/WT of both, student − baseline, Wilcoxon p) and
    heat map.

    Args:
        data: a BraTS folder (any layout ``tools.prepare`` knows) or ``synthetic`` for the built-in phantom.
        out: experiment folder; rerunning with the same folder resumes (finished stages are skipped).
        preset: ``smoke`` (tests), ``quick`` (CPU), ``paper`` (KD-Net's settings, for a GPU).
        subsets: ``all`` (the 15 non-empty subsets, in ``tools.missing.ALL_SUBSETS`` order) or subsets separated by
            spaces, modalities by commas: ``"flair t1,t2"``. Models ``baseline_<s>`` / ``student_<s>`` with ``<s>``
            the modalities joined by ``+`` in the teacher's order (``student_t1+t2``).
        folds: cross-validation folds (default: the preset's).
        seed: seed of the phantom, the split, initialisation and augmentation.
        run_folds: only these folds (e.g. ``0`` or ``[0,2]``); default all.
        jobs: stages run side by side, as for ``kdnet`` (every student waits only for its fold's teacher).
        activation: the network head of every model, ``sigmoid`` or ``softmax``, as for ``kdnet``.
    """
    from tools.missing import parse_subsets, subset_key

    chosen_subsets = parse_subsets(subsets)  # a bad subset fails here, before anything is written
    check_activation_option(activation)
    parallel = parallelism(jobs)
    chosen_teacher_epochs = check_teacher_epochs(None, get_preset(preset))
    options = {"subsets": [subset_key(s) for s in chosen_subsets], "run_folds": run_folds, "activation": activation,
               "teacher_epochs": chosen_teacher_epochs, **parallel}
    root, chosen, num_folds, fold_list = _start("missing", data, out, preset, folds, seed, run_folds, options)
    start = time.monotonic()
    datalist = prepare_data(data, root, chosen, num_folds, seed, need_unlabeled=False)
    stages = kd_stages(missing_models(chosen_subsets), root, fold_list, datalist, chosen, seed, activation=activation,
                       teacher_epochs=chosen_teacher_epochs)
    run_stages(stages, root, parallel["jobs"])
    return _finish_report(root, start)


MEMBERS = ("unet", "resunet", "cascade")
# Values of the preset's bundle settings that the patch-based bundles (ensemble, omni_student) share.
# (lr_patience is not shared: the patch bundles use MultiStepLR, and passing it was silently ignored.)
SHARED_TRAINING_KEYS = ("epochs", "val_interval", "batch_size", "num_workers", "learning_rate")


def omni_stages(root: Path, fold: int, datalist: Path, preset: Preset, seed: int, dice_squared: bool = True) -> list[Stage]:
    """Lachinov et al. on one fold: members, ensemble, pseudo-labels, omni-student, manual-only student; every network
    trained with the paper's Dice (squared denominators) or, with ``dice_squared=False``, the plain form."""
    fold_dir = root / f"fold{fold}"
    models_dir = fold_dir / "ensemble_models"
    common = {
        **{k: v for k, v in preset.bundle.items() if k in SHARED_TRAINING_KEYS},
        **preset.patch_bundle,
        "datalist": str(datalist),
        "fold": fold,
        "seed": seed,
        "resume": True,
        "dice_squared": dice_squared,
    }
    stages = []
    for member in MEMBERS:
        configs = (TRAIN, f"configs/member_{member}.json")
        stages += model_stages(
            Model(
                f"member_{member}",
                "ensemble",
                configs,
                overrides={"models_dir": str(models_dir), "ckpt_dir": str(models_dir / member)},
            ),
            root,
            fold,
            datalist,
            preset,
            seed,
            extra=defined_settings("ensemble", list(configs), common),
            shared=False,
        )
    member_trainings = tuple(f"fold{fold}/member_{member}/train" for member in MEMBERS)
    ensemble = fold_dir / "ensemble" / "evaluate"
    configs = [TRAIN, "configs/evaluate.json", "configs/evaluate_ensemble.json"]
    stages.append(
        Stage(
            name=f"fold{fold}/ensemble/evaluate",
            bundle="ensemble",
            configs=configs,
            overrides={
                **defined_settings("ensemble", configs, common),
                "models_dir": str(models_dir),
                "output_dir": str(ensemble),
            },
            folder=ensemble,
            kind="evaluate",
            done_file=ensemble / "summary.json",
            needs=member_trainings,
        )
    )
    pseudo_dir = fold_dir / "pseudo_labels"
    combined = pseudo_dir / "datalist.json"
    configs = ["configs/inference.json", "configs/pseudo_label.json"]
    stages.append(
        Stage(
            name=f"fold{fold}/pseudo_label",
            bundle="ensemble",
            configs=configs,
            overrides={
                **defined_settings("ensemble", configs, common),
                "models_dir": str(models_dir),
                "pseudo_label_dir": str(pseudo_dir),
                "combined_datalist": str(combined),
            },
            folder=fold_dir / "pseudo_label",
            kind="pseudo",
            done_file=combined,
            needs=member_trainings,
        )
    )
    student = defined_settings("omni_student", [TRAIN], common)
    omni_train, omni_evaluate = model_stages(
        Model("omni_student", "omni_student", (TRAIN,), overrides={"datalist": str(combined)}),
        root,
        fold,
        datalist,
        preset,
        seed,
        extra=student,
        shared=False,
    )
    omni_train.needs += (f"fold{fold}/pseudo_label",)  # it trains on the pseudo-labelled datalist
    stages += [omni_train, omni_evaluate]
    stages += model_stages(
        Model("manual_student", "omni_student", (TRAIN,)), root, fold, datalist, preset, seed, extra=student, shared=False
    )
    return stages


def omni(
    data: str = "synthetic",
    out: str = "runs/omni",
    preset: str = "quick",
    folds: int | None = None,
    seed: int = 0,
    run_folds=None,
    jobs: int | None = None,
    seeds=None,
    device: str | None = None,
    dice_squared: bool = True,
) -> str:
    """Lachinov et al.: ensemble members, ensemble, pseudo-labelling, omni-student and manual-only student per fold.

    Args:
        data: a BraTS folder with unlabeled cases (no seg file) or ``synthetic`` for the built-in phantom.
        out: experiment folder; rerunning with the same folder resumes.
        preset: ``smoke`` (tests), ``quick`` (CPU minutes), ``paper`` (for a GPU).
        folds: cross-validation folds (default: the preset's).
        seed: seed of the phantom, the split, initialisation and augmentation.
        run_folds: only these folds (e.g. ``0`` or ``[0,2]``); default all.
        jobs: stages run side by side, as for ``kdnet``.
        seeds: repeat the whole experiment on these data seeds (e.g. ``[0,1]``; ``--seed`` is then not used), each
            in ``<out>/seed<s>`` with its own phantom, split and training seed; the report in ``out`` pools every
            (seed, fold) run: mean ± std over those runs, paired tests over all their test cases.
        device: ``cuda``: every bundle run built on train.json merges its ``configs/gpu.json``, as for ``kdnet``.
        dice_squared: the Dice term of every network: ``true`` the paper's 1 - 2 sum(pg) / (sum(p^2) + sum(g^2)),
            ``false`` the plain 1 - 2 sum(pg) / (sum(p) + sum(g)) (the bundles' ``dice_squared``).
    """
    check_device(device)
    try:  # a bad word fails here, before anything is written
        dice_squared = as_flag(dice_squared)
    except ValueError as err:
        raise ValueError(f"--dice_squared: {err}") from None
    jobs = 1 if jobs is None and device == "cuda" else jobs  # one GPU: stages one at a time
    if seeds is not None:
        return omni_over_seeds(data, out, preset, folds, seeds, run_folds, jobs, device, dice_squared)
    parallel = parallelism(jobs)
    options = {"run_folds": run_folds, "device": device, "dice_squared": dice_squared, **parallel}
    root, chosen, num_folds, fold_list = _start("omni", data, out, preset, folds, seed, run_folds, options)
    start = time.monotonic()
    datalist = prepare_data(data, root, chosen, num_folds, seed, need_unlabeled=True)
    stages = [stage for fold in fold_list for stage in omni_stages(root, fold, datalist, chosen, seed, dice_squared)]
    run_stages(use_gpu_configs(stages, device), root, parallel["jobs"])
    return _finish_report(root, start)


def data_seeds(seeds) -> list[int]:
    """``--seeds``: distinct whole numbers >= 0 (Fire gives a list for ``[0,1]``, an int for ``0``)."""
    values = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if not values or not valid or len(set(values)) < len(values):
        raise ValueError(f"--seeds must be distinct whole numbers >= 0, e.g. [0,1], got {seeds!r}")
    return values


def omni_over_seeds(
    data: str, out: str, preset: str, folds: int | None, seeds, run_folds, jobs: int | None, device: str | None = None,
    dice_squared: bool = True,
) -> str:
    """:func:`omni` once per data seed into ``<out>/seed<s>``, then one report over every (seed, fold) run in ``out``."""
    chosen = data_seeds(seeds)
    options = {"run_folds": run_folds, "seeds": chosen, "dice_squared": dice_squared, **parallelism(jobs)}
    root = _start("omni", data, out, preset, folds, chosen, run_folds, options)[0]
    start = time.monotonic()
    for seed in chosen:
        omni(data, str(root / f"seed{seed}"), preset, folds, seed, run_folds, jobs, device=device, dice_squared=dice_squared)
    from tools.report import write_report

    report = write_report(root)
    print(f"report over seeds {chosen}: {report} ({time.monotonic() - start:.0f} s)")
    return str(report)


def main() -> None:
    try:
        fire.Fire({"kdnet": kdnet, "omni": omni, "missing": missing}, name="python -m tools.experiment")
    except (StageFailed, FolderBusy, official_metrics_module.ScorerFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except DatasetError as err:
        for line in err.lines:
            print(line, file=sys.stderr)
        print(f"{err.summary}; no datalist written", file=sys.stderr)
        sys.exit(1)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
