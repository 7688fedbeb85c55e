"""End-to-end tests of the experiment runner's KD-Net experiment: `smoke` preset, report, resumption, determinism.

The omni experiment is in test_experiment_omni.py (a file of its own so that pytest-xdist can run the
two end-to-end runs side by side)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tests.experiment_runs import dice_values, run_experiment, table_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kdnet_smoke(tmp_path_factory) -> Path:
    """``kdnet --preset smoke``: 2 folds x (teacher, baseline, student) x (train, evaluate)."""
    out = tmp_path_factory.mktemp("kdnet") / "run"
    result = run_experiment("kdnet", "--data", "synthetic", "--preset", "smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


#: a threshold no prediction reaches: the post-processed evaluation must hold no ET at all
ET_MIN_VOXELS = 10**9
#: the fold run again: with seed 0 the smoke phantom's fold 1 holds test cases with and without ET (fold 0 has ET in all 4)
AGAIN_FOLD = 1


@pytest.fixture(scope="module")
def kdnet_fold_again(tmp_path_factory) -> Path:
    """Fold :data:`AGAIN_FOLD` of :func:`kdnet_smoke` again, in a new folder with the same seed, with ``--et_min_voxels``: one run
    for the same-seed check and for the ET post-processing (3 evaluations more here instead of 6 in the 2-fold run;
    per_case.csv holds the plain evaluations only, so the same-seed comparison is unaffected)."""
    out = tmp_path_factory.mktemp("again") / "run"
    result = run_experiment(
        "kdnet", "--data", "synthetic", "--preset", "smoke", "--out", str(out), "--run_folds", str(AGAIN_FOLD),
        "--et_min_voxels", str(ET_MIN_VOXELS),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_kdnet_report_has_table1_rows_with_dice_in_unit_interval(kdnet_smoke):
    report = (kdnet_smoke / "report.md").read_text()
    rows = table_rows(report, "## KD-Net Table 1")
    assert set(rows) == {"Baseline (T1ce)", "Teacher (4 modalities)", "KD-Net student (T1ce)"}
    for cells in rows.values():
        assert all(0.0 <= v <= 1.0 for v in dice_values(cells)), cells
        hd95 = [float(c.split(" ± ")[0]) for c in cells[3:6]]
        assert all(0.0 <= v <= 373.13 for v in hd95), cells
        assert cells[6] == "2", "the Folds column"


def test_every_table1_cell_is_its_summary_value(kdnet_smoke):
    """Each cell of Table 1 is the aggregate of its own model and metric: swapped rows or columns fail."""
    rows = table_rows((kdnet_smoke / "report.md").read_text(), "## KD-Net Table 1")
    aggregate = json.loads((kdnet_smoke / "summary.json").read_text())["aggregate"]
    labels = {"Baseline (T1ce)": "baseline", "Teacher (4 modalities)": "teacher", "KD-Net student (T1ce)": "student"}
    columns = ["dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt"]
    for label, model in labels.items():
        for column, metric in enumerate(columns):
            stats = aggregate[model][metric]
            digits = 3 if metric.startswith("dice") else 1
            assert rows[label][column] == f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}", (label, metric)


@pytest.mark.parametrize("model", ["teacher", "baseline", "student"])
def test_progress_counts_the_epochs_of_every_training_stage(kdnet_smoke, model):
    """The runner's epoch bar follows each stage's log; the student logs as KDTrainer, not SupervisedTrainer
    (its bar stayed at 0 for the whole training), and the validation evaluator's lines must not count."""
    from tools.stages import EPOCH_DONE

    log = (kdnet_smoke / "fold0" / model / "train" / "log.txt").read_text().splitlines()
    epochs = [int(m.group(1)) for m in map(EPOCH_DONE.search, log) if m]
    assert epochs == [1], f"{model}: epochs read from the log {epochs}, the smoke preset trains 1"
    assert any("Evaluator - INFO - Epoch[1] Complete" in line for line in log), "the evaluator line is in the log"


def test_kdnet_report_records_provenance_and_stage_times(kdnet_smoke):
    report = (kdnet_smoke / "report.md").read_text()
    experiment = json.loads((kdnet_smoke / "experiment.json").read_text())
    assert experiment["seed"] == 0 and experiment["folds"] == 2 and experiment["preset"]["name"] == "smoke"
    assert experiment["environment"]["monai"] in report and experiment["environment"]["git_commit"] in report
    stages = json.loads((kdnet_smoke / "stages.json").read_text())
    # 2 folds x 3 models x (train, evaluate), each with its wall time and its merged config on disk
    assert len(stages) == 12 and all(s["seconds"] > 0 for s in stages.values())
    for name in stages:
        assert json.loads((kdnet_smoke / name / "config.json").read_text())["seed"] == 0


def test_kdnet_per_case_csv_and_summary(kdnet_smoke):
    datalist = json.loads((kdnet_smoke / "datalist.json").read_text())
    with (kdnet_smoke / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    # every labeled case is a test case exactly once per model (2-fold cross-validation)
    assert len(rows) == 3 * len(datalist["training"])
    assert {r["model"] for r in rows} == {"teacher", "baseline", "student"}
    assert all(0.0 <= float(r["dice_wt"]) <= 1.0 for r in rows)
    summary = json.loads((kdnet_smoke / "summary.json").read_text())
    teacher_wt = summary["aggregate"]["teacher"]["dice_wt"]
    fold_means = []
    for fold in ("0", "1"):
        values = [float(r["dice_wt"]) for r in rows if r["model"] == "teacher" and r["fold"] == fold]
        fold_means.append(sum(values) / len(values))
    # the table's cell is the mean over folds of the per-fold means
    assert teacher_wt["folds"] == 2
    assert teacher_wt["mean"] == pytest.approx(sum(fold_means) / 2, abs=1e-6)


def test_et_postprocessing_is_evaluated_and_reported_both_ways(kdnet_fold_again):
    """Fold :data:`AGAIN_FOLD` (one fold: a cell is the mean, no spread; the 2-fold mean ± std cells of the same table code are
    checked on Table 1 above)."""
    import nibabel as nib
    import numpy as np

    run = kdnet_fold_again
    name = f"evaluate_et{ET_MIN_VOXELS}"
    datalist = json.loads((run / "datalist.json").read_text())
    has_et = {}
    for entry in datalist["training"]:
        label = np.asanyarray(nib.load(str(Path(datalist["dataset_dir"]) / entry["label"])).dataobj)
        has_et[entry["case_id"]] = bool((label == 4).any())
    test_cases = sorted(e["case_id"] for e in datalist["training"] if e["fold"] == AGAIN_FOLD)
    for model in ("teacher", "baseline", "student"):
        folder = run / f"fold{AGAIN_FOLD}" / model / name
        predictions = sorted((folder / "predictions").glob("*.nii.gz"))
        assert [p.name for p in predictions] == [f"{c}.nii.gz" for c in test_cases], model
        for prediction in predictions:
            assert not (np.asanyarray(nib.load(str(prediction)).dataobj) == 4).any(), prediction
        with (folder / "dice_et_raw.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert sorted(row["filename"] for row in rows) == test_cases, model
        for row in rows:  # no ET predicted: BraTS Dice 1 without reference ET, else 0
            assert float(row["class0"]) == (0.0 if has_et[row["filename"]] else 1.0), (model, row)
    assert {has_et[c] for c in test_cases} == {True, False}, "the test fold must hold cases with and without ET"
    report = (run / "report.md").read_text()
    heading = f"## With ET post-processing: predicted ET under {ET_MIN_VOXELS} BraTS voxels"
    post = table_rows(report, heading)
    summary = json.loads((run / "summary.json").read_text())["postprocessed"][name]["aggregate"]
    rows = {"Baseline (T1ce)": "baseline", "Teacher (4 modalities)": "teacher", "KD-Net student (T1ce)": "student"}
    for label, model in rows.items():
        cells = post[label]
        for column, region in enumerate(("et", "tc", "wt")):
            stats = summary[model][f"dice_{region}"]
            assert stats["folds"] == 1 and stats["std"] is None, (label, region, stats)
            assert cells[column] == f"{stats['mean']:.3f}", (label, region)


def test_kdnet_figures_are_real_images(kdnet_smoke):
    report = (kdnet_smoke / "report.md").read_text()
    for name in ("dice_bars.png", "training_curves.png", "qualitative.png"):
        assert f"]({name})" in report
        image = mpimg.imread(kdnet_smoke / name)
        assert image.shape[0] > 200 and image.shape[1] > 300, (name, image.shape)
        assert image.std() > 0.01, f"{name} is blank"


def test_rerun_skips_finished_stages(kdnet_smoke):
    checkpoints = sorted(kdnet_smoke.glob("fold*/*/models/checkpoint.pt"))
    before = {p: p.stat().st_mtime_ns for p in checkpoints}
    result = run_experiment("kdnet", "--data", "synthetic", "--preset", "smoke", "--out", str(kdnet_smoke))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(checkpoints) == 6
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == before
    for log in kdnet_smoke.glob("fold*/*/train/log.txt"):
        assert log.read_text().count("$ ") == 1, f"{log} was run again"


def test_same_seed_gives_same_numbers(kdnet_smoke, kdnet_fold_again):
    """On CPU, a fold of a second run with the same seed reproduces every per-case metric."""

    def rows_of_fold(path: Path) -> list[dict]:
        with path.open() as f:
            return [r for r in csv.DictReader(f) if r["fold"] == str(AGAIN_FOLD)]

    rows = rows_of_fold(kdnet_fold_again / "per_case.csv")
    assert {r["model"] for r in rows} == {"teacher", "baseline", "student"} and len(rows) == 3 * 4, "3 models x 4 test cases"
    assert rows == rows_of_fold(kdnet_smoke / "per_case.csv")


def test_bad_arguments_fail_cleanly(tmp_path):
    result = run_experiment("kdnet", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "unknown preset 'nope'" in result.stderr and "Traceback" not in result.stderr
    result = run_experiment("kdnet", "--preset", "smoke", "--out", str(tmp_path / "y"), "--folds", "2", "--run_folds", "5")
    assert result.returncode == 2 and "--run_folds" in result.stderr and "Traceback" not in result.stderr
    result = run_experiment("kdnet", "--preset", "smoke", "--out", str(tmp_path / "z"), "--methods", "kdnet,hintn")
    assert result.returncode == 2 and "no kd_student config for 'hintn'" in result.stderr and "Traceback" not in result.stderr
    assert "hinton" in result.stderr, "the error lists the known methods"
    assert not (tmp_path / "z").exists(), "nothing written for a bad --methods"
    result = run_experiment("kdnet", "--preset", "smoke", "--out", str(tmp_path / "t"), "--teacher_epochs", "0")
    assert result.returncode == 2 and "--teacher_epochs must be a whole number >= 1" in result.stderr
    assert not (tmp_path / "t").exists(), "nothing written for a bad --teacher_epochs"
    result = run_experiment("kdnet", "--preset", "smoke", "--out", str(tmp_path / "e"), "--epochs", "0")
    assert result.returncode == 2 and "--epochs must be a whole number >= 1" in result.stderr
    assert not (tmp_path / "e").exists(), "nothing written for a bad --epochs"
    # a folder trained with another head is not resumed as if it were this one (its stages would be skipped)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    record = {"experiment": "kdnet", "folds": 2, "seed": 0, "preset": {"name": "smoke"}, "options": {"activation": "sigmoid"}}
    (earlier / "experiment.json").write_text(json.dumps(record))
    result = run_experiment("kdnet", "--preset", "smoke", "--out", str(earlier), "--activation", "softmax")
    assert result.returncode == 2 and "activation: 'sigmoid' there, 'softmax' now" in result.stderr, result.stderr[-2000:]
    assert json.loads((earlier / "experiment.json").read_text()) == record, "the record is left as it was"
    assert sorted(p.name for p in earlier.iterdir()) == [".runner.lock", "experiment.json"]


# ---------------------------------------------------------------------------------------------
# KD-Net Table 2 with cached teacher targets: --ablation --teacher_mode cached on fold 0


def markdown_rows(report: str, heading: str) -> list[list[str]]:
    """Body rows (cells) of the markdown table under ``heading``."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return [cells for cells in rows[1:] if not set("".join(cells)) <= set("-")]


#: KD-Net Table 2 (Hu et al.): (model folder, skip connections, model, loss) in the paper's order
TABLE2_ROWS = (
    ("baseline", "4", "Baseline", "GT"),
    ("teacher", "4", "Teacher", "GT"),
    ("student_gt_kl", "4", "KD-Net", "GT+KL"),
    ("student_gt_kd", "4", "KD-Net", "GT+KD"),
    ("student", "4", "KD-Net", "GT+KL+KD"),
    ("baseline_skip0", "0", "Baseline", "GT"),
    ("teacher_skip0", "0", "Teacher", "GT"),
    ("student_skip0_gt_kl", "0", "KD-Net", "GT+KL"),
    ("student_skip0_gt_kd", "0", "KD-Net", "GT+KD"),
    ("student_skip0", "0", "KD-Net", "GT+KL+KD"),
)


@pytest.fixture(scope="module")
def kdnet_ablation(kdnet_smoke, tmp_path_factory) -> Path:
    """``kdnet --preset smoke --run_folds 0 --ablation --teacher_mode cached``, started from a copy of the smoke
    run's datalist and fold-0 teacher and baseline (same preset and seed: the runner finds them finished and
    skips them). Runs: 3 teacher caches (teacher, teacher_skip0, and the baseline for ``born_again``), the KD student,
    the 6 other Table 2 models and 2 method rows, trained and evaluated."""
    out = tmp_path_factory.mktemp("kdnet_ablation") / "run"
    out.mkdir()
    shutil.copy2(kdnet_smoke / "datalist.json", out / "datalist.json")  # it names the smoke run's phantom
    for model in ("teacher", "baseline"):
        shutil.copytree(kdnet_smoke / "fold0" / model, out / "fold0" / model)
    result = run_experiment(
        "kdnet", "--data", "synthetic", "--preset", "smoke", "--run_folds", "0", "--ablation", "--teacher_mode", "cached",
        "--methods", "kdnet,gt_kd,kdnet_kl_channel,born_again", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_ablation_with_cached_targets_reports_every_table2_row_as_its_summary_value(kdnet_ablation):
    """Every Table 2 row is present, in the paper's order, and each cell is the fold-0 value of its own model
    and metric in summary.json: swapped rows (e.g. GT+KL and GT+KD) or columns fail. The rows are written out
    here, not read from tools.report, whose mapping is what is under test."""
    report = (kdnet_ablation / "report.md").read_text()
    rows = markdown_rows(report, "## KD-Net Table 2")
    assert [tuple(r[:3]) for r in rows] == [(skips, label, loss) for _, skips, label, loss in TABLE2_ROWS]
    aggregate = json.loads((kdnet_ablation / "summary.json").read_text())["aggregate"]
    columns = ["dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt"]
    for (model, *_), cells in zip(TABLE2_ROWS, rows):
        for column, metric in enumerate(columns):
            stats = aggregate[model][metric]
            assert stats["folds"] == 1 and stats["std"] is None, (model, metric, stats)
            digits = 3 if metric.startswith("dice") else 1
            assert cells[3 + column] == f"{stats['mean']:.{digits}f}", (model, metric)
        assert cells[-1] == "1", "the Folds column"
    # the copied stages were not run again (one "$ " command line each), the Table 2 models were
    for model in ("teacher", "baseline"):
        assert (kdnet_ablation / "fold0" / model / "train" / "log.txt").read_text().count("$ ") == 1


def test_methods_add_one_table1_row_each_from_the_same_teacher(kdnet_ablation):
    """``--methods kdnet,gt_kd,kdnet_kl_channel``: ``kdnet`` is the student row and ``gt_kd`` the Table 2 row
    (not trained twice); ``kdnet_kl_channel`` is a new row of Table 1 whose cells are its summary values,
    trained with its method file on the fold's teacher, and compared with the baseline case by case."""
    report = (kdnet_ablation / "report.md").read_text()
    rows = {r[0]: r[1:] for r in markdown_rows(report, "## KD-Net Table 1")}
    label = "KD student, variant `kdnet_kl_channel`"
    assert label in rows and "KD student, variant `gt_kd`" not in rows, "gt_kd is Table 2's GT+KD row"
    summary = json.loads((kdnet_ablation / "summary.json").read_text())
    stats = summary["aggregate"]["student_kdnet_kl_channel"]
    assert rows[label][:3] == [f"{stats[f'dice_{r}']['mean']:.3f}" for r in ("et", "tc", "wt")]
    config = json.loads((kdnet_ablation / "fold0" / "student_kdnet_kl_channel" / "train" / "config.json").read_text())
    assert config["kl_normalisation"] == "channel" and config["lambda_kd"] == 0.75 and config["alpha_kl"] == 10.0
    teacher = kdnet_ablation / "fold0" / "teacher" / "models" / "model.pt"
    assert Path(config["teacher_ckpt"]) == teacher
    compared = {(t["model"], t["reference"]) for t in summary["paired_tests"]}
    assert ("student_kdnet_kl_channel", "baseline") in compared
    trained = sorted(p.parent.parent.name for p in kdnet_ablation.glob("fold0/student*/train/log.txt"))
    assert "student_kdnet_kl_channel" in trained and "student_kdnet" not in trained
    assert (kdnet_ablation / "fold0" / "student_gt_kd" / "train" / "log.txt").read_text().count("$ ") == 1


def test_born_again_control_distils_the_fold_baseline_on_the_student_inputs(kdnet_ablation):
    """``--methods born_again``: KD-Net's losses unchanged, the teacher is the fold's T1ce baseline (checkpoint,
    modalities, cached targets), not the 4-modality teacher; a Table 1 row with its paired test."""
    from monai.bundle import ConfigParser

    from brats_kd.teacher_cache import file_sha256

    fold = kdnet_ablation / "fold0"
    config = json.loads((fold / "student_born_again" / "train" / "config.json").read_text())
    assert Path(config["teacher_ckpt"]) == fold / "baseline" / "models" / "model.pt"
    parser = ConfigParser(config)  # the stored config is the merged, unresolved one
    assert parser.get_parsed_content("teacher_modalities") == ["t1ce"] == parser.get_parsed_content("modalities")
    assert (config["lambda_kd"], config["temperature"], config["alpha_kl"]) == (0.75, 5.0, 10.0)
    assert Path(config["teacher_cache_dir"]) == fold / "baseline" / "teacher_cache"
    cache = json.loads((fold / "baseline" / "teacher_cache" / "summary.json").read_text())
    assert cache["teacher_checkpoint_sha256"] == file_sha256(fold / "baseline" / "models" / "model.pt")
    summary = json.loads((kdnet_ablation / "summary.json").read_text())
    assert ("student_born_again", "baseline") in {(t["model"], t["reference"]) for t in summary["paired_tests"]}
    rows = {r[0]: r[1:] for r in markdown_rows((kdnet_ablation / "report.md").read_text(), "## KD-Net Table 1")}
    stats = summary["aggregate"]["student_born_again"]
    assert rows["KD student, variant `born_again`"][:3] == [f"{stats[f'dice_{r}']['mean']:.3f}" for r in ("et", "tc", "wt")]


def test_ablation_students_train_on_the_cached_targets_of_their_own_teacher(kdnet_ablation):
    """One cache per teacher (4 and 0 skip connections), computed from that teacher's model.pt for every
    training case; each KD student trained in cached mode on its own teacher's cache."""
    from brats_kd.teacher_cache import file_sha256
    from tools.experiment import KDNET_ABLATION_MODELS, KDNET_MODELS

    fold = kdnet_ablation / "fold0"
    datalist = json.loads((kdnet_ablation / "datalist.json").read_text())
    for teacher in ("teacher", "teacher_skip0"):
        summary = json.loads((fold / teacher / "teacher_cache" / "summary.json").read_text())
        assert summary["computed"] == summary["cases"] > 0, summary
        assert summary["cases"] < len(datalist["training"]), "only the training cases of fold 0 are cached"
        assert summary["teacher_checkpoint_sha256"] == file_sha256(fold / teacher / "models" / "model.pt"), teacher
    students = [m for m in KDNET_MODELS + KDNET_ABLATION_MODELS if m.teacher is not None]
    assert len(students) == 6
    for model in students:
        config = json.loads((fold / model.name / "train" / "config.json").read_text())
        assert config["teacher_mode"] == "cached", model.name
        assert Path(config["teacher_cache_dir"]) == fold / model.teacher / "teacher_cache", model.name
        assert Path(config["teacher_ckpt"]) == fold / model.teacher / "models" / "model.pt", model.name


def test_modality_occlusion_reads_the_models_of_a_finished_experiment(kdnet_smoke):
    """tools.modality_occlusion on the smoke run: each model's own merged config, checkpoint and test fold; the
    teacher's 4 inputs give 7 blanked groups, the T1ce models only the unblanked prediction."""
    from tools.modality_occlusion import occlusion

    datalist = json.loads((kdnet_smoke / "datalist.json").read_text())
    test_cases = [c for c in datalist["training"] if c["fold"] == 0]
    teacher = occlusion(kdnet_smoke / "fold0" / "teacher")
    assert [r.blanked for r in teacher] == ["none", "t1", "t1ce", "t2", "flair", "t2+flair", "t1+t2+flair"]
    for model in ("baseline", "student"):
        (result,) = occlusion(kdnet_smoke / "fold0" / model)
        assert result.blanked == "none" and result.cases_with_et + result.cases_without_et == len(test_cases)
    assert all(r.cases_with_et + r.cases_without_et == len(test_cases) for r in teacher)


def test_teacher_epochs_and_dice_batch_reach_their_stages(tmp_path):
    """``--teacher_epochs`` trains the 4-modality teachers only (baseline and students keep the preset's epochs, or
    ``--epochs``); ``--dice_batch`` reaches every model's training and evaluation. Planned stages only."""
    from tools.experiment import KDNET_ABLATION_MODELS, KDNET_MODELS, check_teacher_epochs, kd_stages
    from tools.presets import get_preset

    models = KDNET_MODELS + KDNET_ABLATION_MODELS
    for epochs, expected_others in ((None, 1), (4, 4)):
        stages = kd_stages(models, tmp_path, [0], tmp_path / "datalist.json", get_preset("smoke"), 0,
                           dice_batch=True, epochs=epochs, teacher_epochs=3)
        trainings = {s.name.split("/")[1]: s for s in stages if s.kind == "train"}
        assert {name: (s.epochs, s.overrides["epochs"]) for name, s in trainings.items()} == {
            name: ((3, 3) if name in ("teacher", "teacher_skip0") else (expected_others,) * 2) for name in trainings
        }
        assert len(trainings) == 10 and all(s.overrides["dice_batch"] is True for s in stages)
    # without --teacher_epochs the teachers follow --epochs, unless the preset sets their epochs itself
    assert check_teacher_epochs(None, get_preset("smoke"), 4) == 4
    assert check_teacher_epochs(7, get_preset("smoke"), 4) == 7
