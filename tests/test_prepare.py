"""Tests of tools/prepare.py: layout detection, datalist schema, folds, and every data defect.

Datasets are tiny phantoms (``tools.phantom.write_dataset`` at size 16, 16x16x10 voxels) made
once per layout, then copied per test so a test may damage its copy. Defect tests check the
whole contract: non-zero exit, a stderr line naming the case and the problem, no traceback,
and no datalist (nor temporary file) left behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_kd.io import write_json_atomic
from tools import prepare
from tools.layouts import Case
from tools.phantom import write_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
LABELED, UNLABELED = 7, 2
LAYOUT_NAMES = ("brats2018", "brats2021", "brats2023", "msd")
EXPECTED_LABEL_MAP = {
    "brats2018": {"orig": [1, 2, 4], "target": [1, 2, 4]},
    "brats2021": {"orig": [1, 2, 4], "target": [1, 2, 4]},
    "brats2023": {"orig": [1, 2, 3], "target": [1, 2, 4]},
    "msd": {"orig": [1, 2, 3], "target": [2, 1, 4]},
}


# ---------------------------------------------------------------------------------------------
# phantom datasets in each real layout


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def make_dataset(root: Path, layout: str) -> Path:
    """A phantom dataset with LABELED labeled and UNLABELED unlabeled cases in ``layout``."""
    write_dataset(root, layout=layout, cases=LABELED, unlabeled=UNLABELED, size=SIZE, seed=0)
    if layout == "msd":
        # macOS resource forks ship inside the real Task01 archive; they must be ignored.
        (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    return root


def rename_case(folder: Path, new_id: str) -> Path:
    """Rename a one-folder-per-case BraTS case (its folder and file prefixes) to ``new_id``."""
    for path in folder.iterdir():
        path.rename(folder / path.name.replace(folder.name, new_id))
    return folder.rename(folder.with_name(new_id))


@pytest.fixture(scope="session")
def templates(tmp_path_factory) -> dict[str, Path]:
    """One pristine dataset per layout, made once for the whole session."""
    base = tmp_path_factory.mktemp("templates")
    return {name: make_dataset(base / name, name) for name in LAYOUT_NAMES}


@pytest.fixture
def dataset(templates, tmp_path):
    """Factory: a private copy of a layout's template that the test may modify."""

    def copy(layout: str = "brats2021") -> Path:
        target, number = tmp_path / f"data_{layout}", 1
        while target.exists():  # a test may ask for the same layout twice
            number += 1
            target = tmp_path / f"data_{layout}_{number}"
        shutil.copytree(templates[layout], target)
        return target

    return copy


# ---------------------------------------------------------------------------------------------
# helpers


def case_folders(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_dir())


def brats2021_file(root: Path, index: int, suffix: str) -> Path:
    folder = case_folders(root, "BraTS2021_*")[index]
    return folder / f"{folder.name}_{suffix}.nii.gz"


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_inprocess(capsys, data: Path, out: Path, **kwargs):
    """Call the CLI's run() in-process; returns (exit status, stdout, stderr)."""
    kwargs = {"folds": 3, "seed": 0, **kwargs}
    status = prepare.run(str(data), str(out), **kwargs)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_cli(data: Path, out: Path, *extra: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m tools.prepare`` exactly as a user would (from ``cwd``)."""
    command = [sys.executable, "-m", "tools.prepare", "--data", str(data), "--out", str(out), "--folds", "3", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def assert_rejected(status: int, err: str, out: Path, *fragments: str) -> list[str]:
    """The common contract of every rejected dataset; returns the stderr lines."""
    assert status != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    for fragment in fragments:
        assert any(fragment in line for line in lines), f"{fragment!r} not in stderr:\n{err}"
    assert lines[-1].endswith("no datalist written") or status == prepare.EXIT_USAGE, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary file left"
    return lines


def load(out: Path) -> dict:
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# layouts and datalist schema


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_layout_detected_and_entries_resolve(dataset, tmp_path, capsys, layout):
    data = dataset(layout)
    out = tmp_path / "lists" / "datalist.json"  # parent folder does not exist yet
    status, stdout, err = run_inprocess(capsys, data, out)
    assert status == 0, err
    datalist = load(out)
    assert datalist["name"] == "brats-kd datalist"
    assert datalist["layout"] == layout
    assert datalist["dataset_dir"] == os.path.abspath(data)
    assert datalist["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert (datalist["num_folds"], datalist["seed"]) == (3, 0)
    assert len(datalist["training"]) == LABELED and len(datalist["unlabeled"]) == UNLABELED
    for entry in datalist["training"] + datalist["unlabeled"]:
        has_label = entry in datalist["training"]
        expected_keys = {"case_id", "t1", "t1ce", "t2", "flair"} | ({"label", "fold"} if has_label else set())
        assert set(entry) == expected_keys
        for key in ("t1", "t1ce", "t2", "flair") + (("label",) if has_label else ()):
            assert not Path(entry[key]).is_absolute() and "\\" not in entry[key]
            assert (data / entry[key]).is_file()
    assert layout in stdout and f"labeled:   {LABELED}" in stdout


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_label_map_and_channel_index(dataset, tmp_path, capsys, layout):
    out = tmp_path / "datalist.json"
    assert run_inprocess(capsys, dataset(layout), out)[0] == 0
    datalist = load(out)
    assert datalist["label_map"] == EXPECTED_LABEL_MAP[layout]
    if layout == "msd":
        assert datalist["channel_index"] == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    else:
        assert datalist["channel_index"] == {"t1": 0, "t1ce": 0, "t2": 0, "flair": 0}


def test_brats2021_modality_paths(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    out = tmp_path / "datalist.json"
    run_inprocess(capsys, data, out)
    entry = load(out)["training"][0]
    case = entry["case_id"]
    assert entry["t1ce"] == f"{case}/{case}_t1ce.nii.gz"
    assert entry["label"] == f"{case}/{case}_seg.nii.gz"


def test_brats2023_sequences_map_to_canonical_modalities(dataset, tmp_path, capsys):
    data = dataset("brats2023")
    out = tmp_path / "datalist.json"
    run_inprocess(capsys, data, out)
    entry = load(out)["training"][0]
    case = entry["case_id"]
    assert [entry[m] for m in ("t1", "t1ce", "t2", "flair")] == [
        f"{case}/{case}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")
    ]


def test_msd_entries_share_the_4d_image_and_ignore_macos_forks(dataset, tmp_path, capsys):
    data = dataset("msd")
    out = tmp_path / "datalist.json"
    run_inprocess(capsys, data, out)
    datalist = load(out)
    for entry in datalist["training"]:
        assert {entry[m] for m in ("t1", "t1ce", "t2", "flair")} == {f"imagesTr/{entry['case_id']}.nii.gz"}
        assert entry["label"] == f"labelsTr/{entry['case_id']}.nii.gz"
    assert all(e["t1"].startswith("imagesTs/") for e in datalist["unlabeled"])
    assert not any("._" in e["case_id"] for e in datalist["training"] + datalist["unlabeled"])


def test_brats2020_flat_naming_with_name_mapping(dataset, tmp_path, capsys):
    """BraTS 2020 dropped the HGG/LGG folders; the grades come from name_mapping.csv."""
    original = dataset("brats2018")
    data = tmp_path / "MICCAI_BraTS2020_TrainingData"
    data.mkdir()
    rows = ["Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,BraTS_2019_subject_ID,BraTS_2020_subject_ID"]
    for number, folder in enumerate(sorted(original.glob("?GG/*")), start=1):
        new_id = f"BraTS20_Training_{number:03d}"
        rename_case(folder, new_id).rename(data / new_id)
        rows.append(f"{folder.parent.name},NA,{folder.name},NA,{new_id}")
    (data / "name_mapping.csv").write_text("\n".join(rows) + "\n")
    reference = dataset("brats2018")

    status, stdout, err = run_inprocess(capsys, data, tmp_path / "flat.json")
    assert status == 0, err
    datalist = load(tmp_path / "flat.json")
    assert datalist["layout"] == "brats2018" and len(datalist["training"]) == LABELED
    assert all(e["t1"] == f"{e['case_id']}/{e['case_id']}_t1.nii.gz" for e in datalist["training"])
    # Per-fold HGG/LGG counts depend only on the grade counts, so they must equal those of
    # the same cases in HGG/LGG folders; without the CSV no grades would be shown at all.
    _, reference_stdout, _ = run_inprocess(capsys, reference, tmp_path / "foldered.json")
    folds_line = [line for line in stdout.splitlines() if line.startswith("folds:")]
    assert folds_line == [line for line in reference_stdout.splitlines() if line.startswith("folds:")]
    assert "HGG" in folds_line[0] and "LGG" in folds_line[0]


def test_brats2019_prefix_and_uncompressed_nifti(dataset, tmp_path, capsys):
    data = dataset("brats2018")
    for folder in sorted(data.glob("?GG/*")):
        renamed = rename_case(folder, folder.name.replace("Brats18_", "BraTS19_"))
        for path in renamed.glob("*.nii.gz"):
            path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))  # x.nii.gz -> x.nii
            path.unlink()
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert status == 0, err
    datalist = load(out)
    assert len(datalist["training"]) == LABELED
    assert all(e["case_id"].startswith("BraTS19_") and e["flair"].endswith("_flair.nii") for e in datalist["training"])


def test_explicit_layout_matches_auto(dataset, tmp_path, capsys):
    data = dataset("brats2023")
    auto, explicit = tmp_path / "auto.json", tmp_path / "explicit.json"
    run_inprocess(capsys, data, auto)
    run_inprocess(capsys, data, explicit, layout="brats2023")
    assert load(auto) == load(explicit)


def test_datalist_is_world_readable_json_with_no_temp_leftovers(dataset, tmp_path, capsys):
    out = tmp_path / "datalist.json"
    run_inprocess(capsys, dataset("brats2021"), out)
    umask = os.umask(0)
    os.umask(umask)
    # Not the 0600 of the temporary file: the mode any plainly created file would get.
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_brats2021", "datalist.json"]


# ---------------------------------------------------------------------------------------------
# folds


def fold_of(datalist: dict) -> dict[str, int]:
    return {entry["case_id"]: entry["fold"] for entry in datalist["training"]}


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_are_balanced(dataset, tmp_path, capsys, folds):
    out = tmp_path / "datalist.json"
    assert run_inprocess(capsys, dataset("brats2021"), out, folds=folds)[0] == 0
    sizes = np.bincount(list(fold_of(load(out)).values()), minlength=folds)
    assert len(sizes) == folds and sizes.max() - sizes.min() <= 1 and sizes.sum() == LABELED


def test_folds_deterministic_per_seed(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    paths = {name: tmp_path / f"{name}.json" for name in ("a", "b", "c")}
    run_inprocess(capsys, data, paths["a"], seed=0)
    run_inprocess(capsys, data, paths["b"], seed=0)
    run_inprocess(capsys, data, paths["c"], seed=1)
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert fold_of(load(paths["a"])) != fold_of(load(paths["c"]))


def test_folds_stratify_hgg_lgg(dataset, tmp_path, capsys):
    data = dataset("brats2018")
    out = tmp_path / "datalist.json"
    run_inprocess(capsys, data, out)
    for grade in ("HGG", "LGG"):
        folds = [e["fold"] for e in load(out)["training"] if e["t1"].startswith(f"{grade}/")]
        counts = np.bincount(folds, minlength=3)
        assert counts.max() - counts.min() <= 1, (grade, counts)


def test_assign_folds_ignores_input_order_and_unlabeled_cases():
    cases = [Case(f"c{i:02d}", {}, "seg" if i < 9 else None, "HGG" if i % 2 else "LGG") for i in range(12)]
    reference = prepare.assign_folds(cases, 4, seed=3)
    shuffled = [cases[i] for i in np.random.default_rng(1).permutation(len(cases))]
    assert prepare.assign_folds(shuffled, 4, seed=3) == reference
    assert set(reference) == {f"c{i:02d}" for i in range(9)}


# ---------------------------------------------------------------------------------------------
# defects: each must be reported by case and problem, with nothing written


def test_missing_modality_cli(dataset, tmp_path):
    data = dataset("brats2021")
    victim = brats2021_file(data, 2, "t1ce")
    victim.unlink()
    out = tmp_path / "datalist.json"
    result = run_cli(data, out)
    assert result.returncode == 1
    lines = assert_rejected(result.returncode, result.stderr, out, f"{victim.parent.name}: missing t1ce file")
    assert len(lines) == 2  # the case line and the summary line


def test_shape_mismatch_between_modalities_cli(dataset, tmp_path):
    data = dataset("brats2021")
    flair = brats2021_file(data, 1, "flair")
    volume, affine = read_nifti(flair)
    write_nifti(flair, volume[:, :, :-1], affine)
    out = tmp_path / "datalist.json"
    result = run_cli(data, out)
    assert_rejected(
        result.returncode, result.stderr, out,
        f"{flair.parent.name}: flair has shape {volume[:, :, :-1].shape} but t1/t1ce/t2 have {volume.shape}",
    )


def test_geometry_mismatch_between_modalities(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    t2 = brats2021_file(data, 0, "t2")
    volume, affine = read_nifti(t2)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    write_nifti(t2, volume, shifted)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    lines = assert_rejected(status, err, out, f"{t2.parent.name}: t2 geometry differs from t1: origin (")
    assert "voxel size" not in lines[0] and "orientation" not in lines[0]  # only the origin moved


def test_geometry_within_tolerance_is_accepted(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    t2 = brats2021_file(data, 0, "t2")
    volume, affine = read_nifti(t2)
    write_nifti(t2, volume, affine + 1e-5)  # float32 storage noise, not a different geometry
    status, _, err = run_inprocess(capsys, data, tmp_path / "datalist.json")
    assert status == 0, err


def test_seg_shape_mismatch(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    volume, affine = read_nifti(seg)
    write_nifti(seg, volume[:, :12], affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"{seg.parent.name}: seg has shape {volume[:, :12].shape} but the images have {volume.shape}"
    )


def test_seg_geometry_mismatch(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    volume, affine = read_nifti(seg)
    write_nifti(seg, volume, affine @ np.diag([1.0, 1.0, 2.0, 1.0]))  # slices twice as thick
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    mm = abs(affine[0, 0])
    assert_rejected(
        status, err, out,
        f"{seg.parent.name}: seg geometry differs from t1: "
        f"voxel size ({mm:g}, {mm:g}, {2 * mm:g}) vs ({mm:g}, {mm:g}, {mm:g})",
    )


def test_nan_and_inf_voxels(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    t1 = brats2021_file(data, 3, "t1")
    volume, affine = read_nifti(t1)
    volume = volume.astype(np.float32)
    volume[0, 0, 0], volume[1, 1, 1] = np.nan, np.inf
    write_nifti(t1, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"{t1.parent.name}: t1 has 2 NaN/Inf voxels")


def test_all_zero_modality_cli(dataset, tmp_path):
    data = dataset("brats2021")
    t2 = brats2021_file(data, 4, "t2")
    volume, affine = read_nifti(t2)
    write_nifti(t2, np.zeros_like(volume), affine)
    out = tmp_path / "datalist.json"
    result = run_cli(data, out)
    assert_rejected(result.returncode, result.stderr, out, f"{t2.parent.name}: t2 is all zeros")


def test_4d_volume_where_3d_expected(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    flair = brats2021_file(data, 0, "flair")
    volume, affine = read_nifti(flair)
    write_nifti(flair, volume[..., None], affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"{flair.parent.name}: flair is 4-D with shape {volume.shape + (1,)}, expected a 3-D volume"
    )


def test_brats2021_label_outside_set(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 5, "seg")
    volume, affine = read_nifti(seg)
    volume[0, 0, 0] = 3  # a 2023-style enhancing label in a 2021 dataset
    write_nifti(seg, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"{seg.parent.name}: seg has label values {{3}} outside the brats2021 set {{0, 1, 2, 4}}"
    )


def test_brats2023_label_outside_set(dataset, tmp_path, capsys):
    data = dataset("brats2023")
    folder = case_folders(data, "BraTS-GLI-*")[0]
    seg = folder / f"{folder.name}-seg.nii.gz"
    volume, affine = read_nifti(seg)
    volume[0, 0, 0] = 4  # a 2021-style enhancing label in a 2023 dataset
    write_nifti(seg, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"{folder.name}: seg has label values {{4}} outside the brats2023 set {{0, 1, 2, 3}}"
    )


def test_non_integer_float_labels(dataset, tmp_path, capsys):
    """Labels resampled with linear interpolation hold fractions: not a valid segmentation."""
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    volume, affine = read_nifti(seg)
    volume = volume.astype(np.float32)
    volume[0, 0, 0] = 0.5
    write_nifti(seg, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"{seg.parent.name}: seg has label values {{0.5}} outside")


def test_nan_in_segmentation(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    volume, affine = read_nifti(seg)
    volume = volume.astype(np.float32)
    volume[0, 0, 0] = np.nan
    write_nifti(seg, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    lines = assert_rejected(status, err, out, f"{seg.parent.name}: seg has 1 NaN/Inf voxels")
    assert "outside" not in lines[0]  # NaN is reported once, not again as an unexpected label value


def test_whole_float_labels_are_accepted(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    volume, affine = read_nifti(seg)
    write_nifti(seg, volume.astype(np.float32), affine)
    status, _, err = run_inprocess(capsys, data, tmp_path / "datalist.json")
    assert status == 0, err


def test_msd_label_outside_set(dataset, tmp_path, capsys):
    data = dataset("msd")
    label = data / "labelsTr" / "BRATS_002.nii.gz"
    volume, affine = read_nifti(label)
    volume[0, 0, 0] = 4  # BraTS numbering in an MSD label
    write_nifti(label, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "BRATS_002: label has label values {4} outside the msd set {0, 1, 2, 3}")


def test_msd_image_not_4d(dataset, tmp_path, capsys):
    data = dataset("msd")
    image = data / "imagesTr" / "BRATS_003.nii.gz"
    volume, affine = read_nifti(image)
    write_nifti(image, volume[..., 0], affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"BRATS_003: image has shape {volume.shape[:3]}, expected 4-D with 4 channels")


def test_msd_image_with_three_channels(dataset, tmp_path, capsys):
    data = dataset("msd")
    image = data / "imagesTr" / "BRATS_003.nii.gz"
    volume, affine = read_nifti(image)
    write_nifti(image, volume[..., :3], affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"BRATS_003: image has shape {volume.shape[:3] + (3,)}, expected 4-D with 4 channels"
    )


def test_msd_label_not_3d(dataset, tmp_path, capsys):
    data = dataset("msd")
    label = data / "labelsTr" / "BRATS_001.nii.gz"
    volume, affine = read_nifti(label)
    write_nifti(label, np.stack([volume, volume], axis=-1), affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(
        status, err, out, f"BRATS_001: label is 4-D with shape {volume.shape + (2,)}, expected a 3-D volume"
    )


def test_msd_all_zero_channel(dataset, tmp_path, capsys):
    data = dataset("msd")
    image = data / "imagesTr" / "BRATS_004.nii.gz"
    volume, affine = read_nifti(image)
    volume[..., 2] = 0
    write_nifti(image, volume, affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "BRATS_004: image channel 2 (t1ce) is all zeros")


def test_msd_label_geometry_mismatch(dataset, tmp_path, capsys):
    data = dataset("msd")
    label = data / "labelsTr" / "BRATS_001.nii.gz"
    volume, affine = read_nifti(label)
    write_nifti(label, volume[::-1], np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine)
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "BRATS_001: label geometry differs from image: orientation differs")


def test_msd_training_image_without_label(dataset, tmp_path, capsys):
    data = dataset("msd")
    (data / "labelsTr" / "BRATS_005.nii.gz").unlink()
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "BRATS_005: missing label file labelsTr/BRATS_005.nii.gz")


def test_msd_dataset_json_with_other_channel_order(dataset, tmp_path, capsys):
    data = dataset("msd")
    (data / "dataset.json").write_text(json.dumps({"modality": {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"}}))
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "modality channels are ['t1w', 't1gd', 't2w', 'flair']")


def test_msd_dataset_json_with_documented_order_is_accepted(dataset, tmp_path, capsys):
    data = dataset("msd")
    (data / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    assert run_inprocess(capsys, data, tmp_path / "datalist.json")[0] == 0


def test_corrupt_file_cli(dataset, tmp_path):
    data = dataset("brats2021")
    t1 = brats2021_file(data, 0, "t1")
    t1.write_bytes(b"this is not a NIfTI file at all")
    out = tmp_path / "datalist.json"
    result = run_cli(data, out)
    assert_rejected(result.returncode, result.stderr, out, f"{t1.parent.name}: t1 file", "is not a readable NIfTI")


def test_truncated_gzip(dataset, tmp_path, capsys):
    """The header survives but the voxel stream ends early: only reading the data finds it."""
    data = dataset("brats2021")
    flair = brats2021_file(data, 1, "flair")
    raw = gzip.decompress(flair.read_bytes())
    flair.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"{flair.parent.name}: flair file {flair.name} is corrupt or truncated")


def test_stray_nifti_in_case_folder(dataset, tmp_path, capsys):
    """BraTS 2020 case 355 ships its segmentation as W39_1998.09.19_Segm.nii."""
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    seg.rename(seg.with_name("W39_1998.09.19_Segm.nii.gz"))
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"{seg.parent.name}: unrecognised NIfTI file(s) W39_1998.09.19_Segm.nii.gz")


def test_empty_folder_cli(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    out = tmp_path / "datalist.json"
    result = run_cli(data, out)
    assert result.returncode == 1
    assert_rejected(result.returncode, result.stderr, out, "no cases found", "is empty")


def test_explicit_layout_without_cases(dataset, tmp_path, capsys):
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, dataset("brats2021"), out, layout="brats2023")
    assert_rejected(status, err, out, "no brats2023 cases found")


def test_unknown_layout_hints_at_wrapper_folder(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    wrapper = tmp_path / "download"
    wrapper.mkdir()
    data.rename(wrapper / "BraTS2021_Training_Data")
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, wrapper, out)
    assert_rejected(status, err, out, "cannot recognise the layout", "did you mean --data")


def test_ambiguous_layout(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    shutil.copytree(case_folders(dataset("brats2023"), "BraTS-GLI-*")[0], data / "BraTS-GLI-00099-000")
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, "ambiguous", "brats2021", "brats2023")


def test_unlabeled_case_is_listed_not_an_error(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    seg = brats2021_file(data, 0, "seg")
    seg.unlink()
    out = tmp_path / "datalist.json"
    assert run_inprocess(capsys, data, out)[0] == 0
    unlabeled = [e["case_id"] for e in load(out)["unlabeled"]]
    assert seg.parent.name in unlabeled and len(unlabeled) == UNLABELED + 1


def test_unlabeled_cases_are_validated_too(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    last = case_folders(data, "BraTS2021_*")[-1]  # an unlabeled case
    assert not list(last.glob("*_seg.nii.gz"))
    (last / f"{last.name}_t2.nii.gz").unlink()
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    assert_rejected(status, err, out, f"{last.name}: missing t2 file")


# ---------------------------------------------------------------------------------------------
# reporting and safety


def test_several_bad_cases_one_line_each(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    brats2021_file(data, 0, "t1").unlink()
    brats2021_file(data, 0, "t2").unlink()  # second problem of the same case: same line
    flair = brats2021_file(data, 2, "flair")
    write_nifti(flair, np.zeros_like(read_nifti(flair)[0]), read_nifti(flair)[1])
    brats2021_file(data, 4, "t1ce").write_bytes(b"garbage")
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, data, out)
    lines = assert_rejected(status, err, out)
    names = [p.name for p in case_folders(data, "BraTS2021_*")]
    assert len(lines) == 4
    assert lines[0].startswith(f"{names[0]}: ") and "missing t1 file" in lines[0] and "missing t2 file" in lines[0]
    assert lines[1].startswith(f"{names[2]}: ") and "flair is all zeros" in lines[1]
    assert lines[2].startswith(f"{names[4]}: ") and "t1ce file" in lines[2]
    assert lines[3].startswith(f"error: 3 of {LABELED + UNLABELED} cases")


def test_existing_datalist_untouched_on_failure(dataset, tmp_path, capsys):
    data = dataset("brats2021")
    out = tmp_path / "datalist.json"
    assert run_inprocess(capsys, data, out)[0] == 0
    before = out.read_bytes()
    brats2021_file(data, 1, "flair").unlink()
    status, _, err = run_inprocess(capsys, data, out, seed=7)
    assert status == 1 and "Traceback" not in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_brats2021", "datalist.json"]


@pytest.mark.parametrize("layout", ["brats2021", "msd"])
def test_source_data_is_byte_identical_after_runs(dataset, tmp_path, capsys, layout):
    data = dataset(layout)
    before = tree_digest(data)
    assert run_inprocess(capsys, data, tmp_path / "ok.json")[0] == 0
    assert tree_digest(data) == before
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    seg = next(p for p in sorted(bad.rglob("*.nii.gz")) if "seg" in p.name or "labelsTr" in p.parts)
    volume, affine = read_nifti(seg)
    write_nifti(seg, np.full_like(volume, 9), affine)  # unexpected labels: must be reported, never fixed
    bad_before = tree_digest(bad)
    assert run_inprocess(capsys, bad, tmp_path / "bad.json")[0] == 1
    assert tree_digest(bad) == bad_before


def test_out_equal_to_a_data_file_is_refused_cli(dataset):
    data = dataset("brats2021")
    target = brats2021_file(data, 0, "t1")
    before = target.read_bytes()
    result = run_cli(data, target)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data file of the dataset" in result.stderr
    assert target.read_bytes() == before


def test_out_over_msd_dataset_json_is_refused(dataset, capsys):
    data = dataset("msd")
    (data / "dataset.json").write_text('{"name": "BRATS"}')
    status, _, err = run_inprocess(capsys, data, data / "dataset.json")
    assert status == 2 and "refusing to overwrite" in err
    assert (data / "dataset.json").read_text() == '{"name": "BRATS"}'


def test_out_that_is_a_folder_is_refused(dataset, tmp_path, capsys):
    status, _, err = run_inprocess(capsys, dataset("brats2021"), tmp_path)
    assert status == prepare.EXIT_USAGE and "is a folder" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*.tmp"))


def test_out_inside_dataset_folder_is_allowed(dataset, capsys):
    data = dataset("brats2021")
    out = data / "datalist.json"
    assert run_inprocess(capsys, data, out)[0] == 0
    assert run_inprocess(capsys, data, out)[0] == 0  # our own earlier datalist may be replaced


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"folds": 1}, "--folds must be an integer >= 2"),
        ({"folds": "three"}, "--folds must be an integer >= 2"),
        ({"folds": True}, "--folds must be an integer >= 2"),
        ({"seed": -1}, "--seed must be an integer >= 0"),
        ({"folds": LABELED + 1}, f"cannot split {LABELED} labeled case(s) into {LABELED + 1} folds"),
        ({"layout": "brats2017"}, "--layout must be one of"),
    ],
)
def test_invalid_arguments(dataset, tmp_path, capsys, kwargs, message):
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, dataset("brats2021"), out, **kwargs)
    assert status == prepare.EXIT_USAGE
    assert_rejected(status, err, out, message)


def test_missing_data_folder(tmp_path, capsys):
    out = tmp_path / "datalist.json"
    status, _, err = run_inprocess(capsys, tmp_path / "nowhere", out)
    assert_rejected(status, err, out, "is not a folder")


def test_cli_success_with_relative_paths_and_no_torch_import(dataset, tmp_path):
    data = dataset("brats2018")
    result = run_cli(Path(data.name), Path("lists/datalist.json"), "--seed", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "layout:    brats2018" in result.stdout
    datalist = load(tmp_path / "lists" / "datalist.json")
    assert datalist["seed"] == 4
    assert Path(datalist["dataset_dir"]).is_absolute()  # stored absolute although given relative
    assert Path(datalist["dataset_dir"]).resolve() == data.resolve()
    probe = "import sys, tools.prepare; print('torch' in sys.modules, 'monai' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert imported.stdout.split() == ["False", "False"]


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "datalist.json"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"new": True})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["datalist.json"]
