"""Tests of the synthetic BraTS-like phantom (tools/phantom.py).

Small volumes (size 24-64) keep the whole file to a few seconds. The information tests
measure the generated intensities, because the phantom is only useful for knowledge
distillation if T1ce alone genuinely cannot see oedema (DESIGN.md section 4).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import rankdata

from tools import phantom
from tools.phantom import EDEMA, ENHANCING, GM, NECROSIS, NON_ENHANCING, WM, PhantomError, make_case, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 24  # 24 x 24 x 16 voxels of 10 mm: enough for file and label checks
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")


def relative_files(folder: Path) -> list[str]:
    """All files under ``folder`` (hidden ones included), as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of the best single intensity threshold, either direction.

    Mann-Whitney form: the probability that a random positive voxel is brighter than a random
    negative one (ties count half), folded so that 0.5 means inseparable and 1 perfectly separable.
    """
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    area = (ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(max(area, 1.0 - area))


# ---------------------------------------------------------------------------------------------
# make_case


def test_case_geometry_types_and_labels():
    case = make_case(3, size=32, seed=0)
    shape = (32, 32, 21)  # round(32 * 155 / 240)
    assert phantom.volume_shape(240) == (240, 240, 155)
    assert set(case.images) == set(BRATS_MODALITIES)
    for image in case.images.values():
        assert image.shape == shape and image.dtype == np.float32
        assert np.all(image[~case.brain_mask] == 0)  # skull-stripped
        assert np.all(image == np.rint(image)) and image.max() < 2**15  # exact in int16
        assert np.median(image[case.brain_mask]) > 50  # real signal inside the brain
    assert case.label.dtype == np.uint8 and case.label.shape == shape
    assert set(np.unique(case.label)) <= {0, 1, 2, 4}
    assert np.all(case.brain_mask[case.label > 0])  # tumour inside the brain
    # BraTS convention of the tissue classes: 1 necrosis + non-enhancing, 2 oedema, 4 enhancing.
    assert np.array_equal(case.label == 1, np.isin(case.tissue, [NECROSIS, NON_ENHANCING]))
    assert np.array_equal(case.label == 2, case.tissue == EDEMA)
    assert np.array_equal(case.label == 4, case.tissue == ENHANCING)
    assert np.allclose(np.diag(case.affine)[:3], [-7.5, -7.5, 7.5])
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")  # BraTS voxel order


def test_make_case_is_deterministic_and_seeded():
    first, again = make_case(2, 32, seed=5), make_case(2, 32, seed=5)
    other_seed, other_index = make_case(2, 32, seed=6), make_case(3, 32, seed=5)
    for name in BRATS_MODALITIES:
        assert np.array_equal(first.images[name], again.images[name])
        assert not np.array_equal(first.images[name], other_seed.images[name])
        assert not np.array_equal(first.images[name], other_index.images[name])
    assert np.array_equal(first.label, again.label)


def test_anatomy_does_not_depend_on_resolution():
    """Random fields live on a millimetre grid: the tumour sits in the same place at any size."""
    centres = []
    for size in (32, 64):
        case = make_case(4, size, seed=0)
        voxels = np.argwhere(case.label > 0)
        centres.append(nib.affines.apply_affine(case.affine, voxels).mean(axis=0))
    assert np.linalg.norm(centres[0] - centres[1]) < 6.0  # mm; one coarse voxel is 7.5 mm


def moment_ellipsoid_dice(mask: np.ndarray) -> float:
    """Dice between a region and the ellipsoid with the same centre and second moments.

    A solid ellipsoid equals its moment ellipsoid scaled by sqrt(5), so this is ~1 for a
    (voxelised) sphere or ellipsoid and lower the more irregular the region is.
    """
    points = np.argwhere(mask).astype(float)
    centre = points.mean(axis=0)
    covariance = np.cov(points, rowvar=False) * 5.0
    grid = np.indices(mask.shape).reshape(3, -1).T - centre
    inside = np.einsum("ni,ij,nj->n", grid, np.linalg.inv(covariance), grid) <= 1.0
    inside = inside.reshape(mask.shape)
    return float(2 * np.sum(inside & mask) / (inside.sum() + mask.sum()))


def test_moment_ellipsoid_dice_recognises_an_ellipsoid():
    x, y, z = np.ogrid[:48, :48, :40]
    ellipsoid = ((x - 24) / 15.0) ** 2 + ((y - 22) / 9.0) ** 2 + ((z - 20) / 12.0) ** 2 <= 1
    assert moment_ellipsoid_dice(ellipsoid) > 0.95


def test_tumours_are_irregular_varied_and_structured():
    cases = [make_case(i, 48, seed=0) for i in range(8)]
    whole = [c.label > 0 for c in cases]
    assert max(m.sum() for m in whole) > 3 * min(m.sum() for m in whole)  # varied size
    assert np.median([moment_ellipsoid_dice(m) for m in whole]) < 0.9  # not spheres/ellipsoids
    positions = [nib.affines.apply_affine(c.affine, np.argwhere(m)) for c, m in zip(cases, whole)]
    assert all(abs(np.sign(p[:, 0]).mean()) > 0.6 for p in positions)  # mostly one hemisphere
    assert len({np.sign(p[:, 0].mean()) for p in positions}) == 2  # both hemispheres occur
    # Oedema usually exceeds the core; necrosis, when present, sits inside the enhancing ring.
    assert sum((c.label == 2).sum() > np.isin(c.label, [1, 4]).sum() for c in cases) >= 5
    ringed = [c for c in cases if (c.tissue == NECROSIS).sum() > 20 and (c.tissue == ENHANCING).sum() > 20]
    assert len(ringed) >= 2
    for case in ringed:
        depth = ndimage.distance_transform_edt(case.label > 0)  # distance to the lesion's margin
        assert np.median(depth[case.tissue == NECROSIS]) > np.median(depth[case.tissue == ENHANCING])


def test_grades_and_enhancement_are_mixed():
    cases = [make_case(i, 32, seed=0) for i in range(24)]
    grades = [c.grade for c in cases]
    assert 2 <= grades.count("LGG") <= 12  # about one in four, as in BraTS 2018 (75 of 285)
    with_enhancing = [bool(np.any(c.tissue == ENHANCING)) for c in cases]
    assert 12 <= sum(with_enhancing) < 24  # in most cases, not all
    assert sum(e for e, g in zip(with_enhancing, grades) if g == "LGG") < grades.count("LGG")


# ---------------------------------------------------------------------------------------------
# information content (DESIGN.md section 4)


@pytest.fixture(scope="module")
def pooled_intensities():
    """Per-case z-scored intensities (inside the brain) of tissue groups, pooled over cases."""
    groups = {
        "edema": [EDEMA],
        "normal": [WM, GM],
        "enhancing": [ENHANCING],
        "other_tumour": [EDEMA, NECROSIS, NON_ENHANCING],
    }
    pooled = {}
    for index in range(4):
        case = make_case(index, 64, seed=0)
        brain = case.brain_mask
        for name, image in case.images.items():
            z = (image - image[brain].mean()) / image[brain].std()
            for group, tissues in groups.items():
                pooled.setdefault((group, name), []).append(z[np.isin(case.tissue, tissues)])
    pooled = {key: np.concatenate(values) for key, values in pooled.items()}
    assert min(len(pooled[group, "t1"]) for group in groups) > 200  # enough voxels of each group
    return pooled


def test_edema_is_nearly_invisible_on_t1ce_but_clear_on_flair(pooled_intensities):
    p = pooled_intensities
    separability = {m: auc(p["edema", m], p["normal", m]) for m in BRATS_MODALITIES}
    # Measured at this seed: t1ce 0.57, flair 0.986, t2 0.97 (t1 0.61).
    assert separability["t1ce"] < 0.70
    assert separability["flair"] > 0.95
    assert separability["t2"] > 0.90
    assert separability["flair"] - separability["t1ce"] > 0.3


def test_enhancing_tumour_stands_out_only_on_t1ce(pooled_intensities):
    p = pooled_intensities
    separability = {m: auc(p["enhancing", m], p["other_tumour", m]) for m in BRATS_MODALITIES}
    # Measured at this seed: t1ce 0.998, t1 0.59 (t2 0.81, flair 0.72).
    assert separability["t1ce"] > 0.97
    assert separability["t1"] < 0.80
    # Enhancing tumour is brighter, not darker, than the rest of the tumour on T1ce.
    assert np.median(p["enhancing", "t1ce"]) > np.percentile(p["other_tumour", "t1ce"], 95)


# ---------------------------------------------------------------------------------------------
# on-disk layouts


def brats_names(case_id: str, separator: str, suffixes, labeled: bool) -> list[str]:
    names = [f"{case_id}{separator}{s}.nii.gz" for s in suffixes]
    return names + ([f"{case_id}{separator}seg.nii.gz"] if labeled else [])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Each layout written once: 3 labeled + 1 unlabeled cases."""
    written = {}
    for layout in phantom.LAYOUTS:
        out = tmp_path_factory.mktemp(layout)
        written[layout] = (out, write_dataset(out, layout=layout, cases=3, unlabeled=1, size=SIZE, seed=1))
    return written


@pytest.fixture(scope="module")
def reference_cases():
    return [make_case(i, SIZE, seed=1) for i in range(4)]


def test_reference_cases_contain_every_label(reference_cases):
    # The label-mapping checks below are only meaningful if every value occurs.
    assert set(np.unique(np.concatenate([c.label.ravel() for c in reference_cases[:3]]))) == {0, 1, 2, 4}


def test_brats2021_layout(datasets, reference_cases):
    out, ids = datasets["brats2021"]
    assert ids == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    expected = []
    for i, case_id in enumerate(ids):
        expected += [f"{case_id}/{n}" for n in brats_names(case_id, "_", BRATS_MODALITIES, labeled=i < 3)]
    assert relative_files(out) == sorted(expected)
    for case_id, case in zip(ids, reference_cases):
        for modality in BRATS_MODALITIES:
            image = load(out / case_id / f"{case_id}_{modality}.nii.gz")
            assert image.get_data_dtype() == np.int16
            assert np.array_equal(np.asarray(image.dataobj), case.images[modality])
            assert np.array_equal(image.affine, case.affine)
    seg = load(out / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")
    assert seg.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(seg.dataobj), reference_cases[0].label)


def test_brats2023_layout_uses_label_3_for_enhancing(datasets, reference_cases):
    out, ids = datasets["brats2023"]
    assert ids == [f"BraTS-GLI-0000{i}-000" for i in range(4)]
    expected = []
    for i, case_id in enumerate(ids):
        expected += [f"{case_id}/{n}" for n in brats_names(case_id, "-", ("t1n", "t1c", "t2w", "t2f"), labeled=i < 3)]
    assert relative_files(out) == sorted(expected)
    for case_id, case in zip(ids[:3], reference_cases):
        seg = np.asarray(load(out / case_id / f"{case_id}-seg.nii.gz").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        assert np.array_equal(seg == 3, case.label == 4)
        assert np.array_equal(seg == 2, case.label == 2) and np.array_equal(seg == 1, case.label == 1)
        for modality, suffix in {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}.items():
            image = np.asarray(load(out / case_id / f"{case_id}-{suffix}.nii.gz").dataobj)
            assert np.array_equal(image, case.images[modality])


def test_brats2018_layout_sorts_cases_by_grade(datasets, reference_cases):
    out, ids = datasets["brats2018"]
    pattern = re.compile(r"Brats18_(2013|TCIA\d\d|CBICA)_[A-Z0-9]+_1")
    assert len(set(ids)) == 4 and all(pattern.fullmatch(i) for i in ids)
    expected = []
    for i, (case_id, case) in enumerate(zip(ids, reference_cases)):
        folder = f"{case.grade}/{case_id}"
        expected += [f"{folder}/{n}" for n in brats_names(case_id, "_", BRATS_MODALITIES, labeled=i < 3)]
    assert relative_files(out) == sorted(expected)
    case_id, case = ids[0], reference_cases[0]
    seg = np.asarray(load(out / case.grade / case_id / f"{case_id}_seg.nii.gz").dataobj)
    assert np.array_equal(seg, case.label)


def test_msd_layout(datasets, reference_cases):
    out, ids = datasets["msd"]
    assert ids == ["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004"]
    expected = ["dataset.json", "imagesTs/BRATS_004.nii.gz"]
    expected += [f"{folder}/BRATS_00{i}.nii.gz" for folder in ("imagesTr", "labelsTr") for i in (1, 2, 3)]
    assert relative_files(out) == sorted(expected)
    for case_id, case in zip(ids, reference_cases):
        folder = "imagesTr" if case.index < 3 else "imagesTs"
        image = load(out / folder / f"{case_id}.nii.gz")
        data = np.asarray(image.dataobj)
        assert data.shape == case.label.shape + (4,)
        for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            assert np.array_equal(data[..., channel], case.images[modality])
        assert np.array_equal(image.affine, case.affine)
    for case_id, case in zip(ids[:3], reference_cases):
        label = np.asarray(load(out / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        assert np.array_equal(label == 1, case.tissue == EDEMA)  # MSD 1 = oedema
        assert np.array_equal(label == 2, case.label == 1)  # MSD 2 = non-enhancing / necrotic
        assert np.array_equal(label == 3, case.label == 4)  # MSD 3 = enhancing
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"]["1"] == "edema" and meta["labels"]["3"] == "enhancing tumour"
    assert meta["numTraining"] == 3 and len(meta["training"]) == 3
    assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert meta["test"] == ["./imagesTs/BRATS_004.nii.gz"]


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "brats2023"])
def test_modalities_of_a_case_share_shape_and_affine(datasets, layout):
    out, _ = datasets[layout]
    for folder in {p.parent for p in out.rglob("*.nii.gz")}:
        images = [load(p) for p in sorted(folder.glob("*.nii.gz"))]
        assert len(images) in (4, 5)
        assert len({img.shape for img in images}) == 1
        assert all(np.array_equal(img.affine, images[0].affine) for img in images)


# ---------------------------------------------------------------------------------------------
# reproducibility and safe writing


def test_files_are_byte_identical_and_prefix_stable(tmp_path, monkeypatch):
    a = write_dataset(tmp_path / "a", layout="brats2021", cases=3, size=SIZE, seed=3)
    later = time.time() + 3600.0  # files written an hour later must not differ (gzip mtime)
    monkeypatch.setattr(time, "time", lambda: later)
    b = write_dataset(tmp_path / "b", layout="brats2021", cases=3, size=SIZE, seed=3)
    c = write_dataset(tmp_path / "c", layout="brats2021", cases=5, size=SIZE, seed=3)
    d = write_dataset(tmp_path / "d", layout="brats2021", cases=3, size=SIZE, seed=4)
    assert a == b == c[:3] and d == a
    files = relative_files(tmp_path / "a")
    assert files == relative_files(tmp_path / "b")
    assert set(files) < set(relative_files(tmp_path / "c"))
    for name in files:
        content = (tmp_path / "a" / name).read_bytes()
        assert content == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
        assert content != (tmp_path / "d" / name).read_bytes()


def test_every_file_is_renamed_into_place(tmp_path, monkeypatch):
    """Atomic writes: each final file appears through os.replace from a temp file beside it."""
    replaced = []
    original = os.replace

    def recording_replace(source, target):
        replaced.append((Path(source), Path(target)))
        original(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path / "msd"
    write_dataset(out, layout="msd", cases=2, unlabeled=1, size=16, seed=0)
    written = relative_files(out)
    assert sorted(t.relative_to(out).as_posix() for _, t in replaced) == written
    assert all(s.parent == t.parent and s != t for s, t in replaced)
    assert not any(Path(name).name.startswith(".") for name in written)  # no temp files left


@pytest.mark.parametrize(
    "arguments",
    [{"layout": "brats2019"}, {"size": 15}, {"cases": -1}, {"unlabeled": -2}, {"seed": -1}, {"size": "96"}],
)
def test_invalid_arguments_write_nothing(tmp_path, arguments):
    out = tmp_path / "new"
    with pytest.raises(PhantomError):
        write_dataset(out, **({"cases": 1, "size": 16} | arguments))
    assert not out.exists()


def test_refuses_a_folder_that_already_has_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PhantomError, match="already contains files"):
        write_dataset(tmp_path, cases=1, size=16)
    assert relative_files(tmp_path) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_dataset(empty, cases=1, size=16) == ["BraTS2021_00000"]  # an empty folder is fine


# ---------------------------------------------------------------------------------------------
# command line


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.phantom", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_a_dataset_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "data"
    arguments = ("--cases", "2", "--unlabeled", "1", "--size", "16", "--seed", "2", "--layout", "brats2023")
    done = run_cli("--out", str(out), *arguments)
    assert done.returncode == 0, done.stderr
    files = relative_files(out)
    assert "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz" in files
    assert "BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2f.nii.gz" in files
    assert not any(name.startswith("BraTS-GLI-00002-000/") and name.endswith("-seg.nii.gz") for name in files)
    assert len(files) == 2 * 5 + 4

    refused = run_cli("--out", str(out), "--cases", "1", "--size", "16")
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "already contains files" in refused.stderr
    assert relative_files(out) == files  # untouched


@pytest.mark.parametrize("arguments", [("--size", "8"), ("--layout", "brats2017")])
def test_cli_rejects_bad_arguments_cleanly(tmp_path, arguments):
    out = tmp_path / "data"
    refused = run_cli("--out", str(out), *arguments)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists()
