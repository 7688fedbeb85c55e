"""``tools.package``: a bundle zipped in the model-zoo layout loads offline through MONAI's bundle API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.bundle_runner import BUNDLES, ROOT, TINY, bundle_config
from tools.package import PackageError, build, package

pytestmark = pytest.mark.slow

STUDENT = BUNDLES / "kd_student"


def random_weights(path, **overrides) -> dict:
    """A randomly initialised kd_student network saved as ``{"model": state_dict}``; the state dict."""
    torch.manual_seed(0)
    network = bundle_config(STUDENT, "inference.json", **overrides).get_parsed_content("network_def")
    state = network.state_dict()
    torch.save({"model": state}, path)
    return state


@pytest.fixture
def student_copy(tmp_path):
    """kd_student with the clutter a used checkout has: runs, eval, caches, a resumable checkpoint, a datalist."""
    bundle = tmp_path / "kd_student"
    shutil.copytree(STUDENT, bundle, ignore=shutil.ignore_patterns("__pycache__", "runs", "eval", "models"))
    for clutter in ("runs/events.out.tfevents.1", "eval/summary.json", "scripts/__pycache__/losses.cpython-311.pyc"):
        (bundle / clutter).parent.mkdir(parents=True, exist_ok=True)
        (bundle / clutter).write_text("x")
    (bundle / "configs" / "datalist.json").write_text('{"dataset_dir": "/private/data"}')
    (bundle / "models").mkdir()
    (bundle / "models" / "checkpoint.pt").write_bytes(b"optimizer state")
    return bundle


def test_package_zips_the_bundle_and_loads_its_weights_with_monai(student_copy, tmp_path):
    state = random_weights(student_copy / "models" / "model.pt")
    result = package(str(student_copy), str(tmp_path / "dist" / "kd_student.zip"))

    names = set(zipfile.ZipFile(result["zip"]).namelist())
    for required in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "brats_kd/__init__.py",
        "brats_kd/losses.py",
        "brats_kd/networks/encoder_decoder.py",
        "docs/README.md",
        "LICENSE",
        "large_files.yml",
        "models/model.pt",
    ):
        assert f"kd_student/{required}" in names, required
    assert all(name.startswith("kd_student/") for name in names), "one top folder named after the zip"
    for unwanted in ("runs/", "eval/", "__pycache__", ".pyc", "checkpoint.pt", "datalist.json"):
        assert not [n for n in names if unwanted in n], unwanted

    import brats_kd

    packaged = json.loads(zipfile.ZipFile(result["zip"]).read("kd_student/configs/metadata.json"))
    assert packaged["vendored_packages"] == {"brats_kd": brats_kd.__version__}
    assert {n[len("kd_student/"):] for n in names if n.startswith("kd_student/brats_kd/")} == {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "brats_kd").rglob("*.py")
    }, "the whole package, Python files only"

    report = result["check"]["networks"]["network_def"]
    assert report["weights"] == "models/model.pt"
    assert report["tensors"] == len(state)
    assert report["output"][:2] == [1, 3]


def test_cli_packages_given_weights_and_rejects_weights_of_another_network(tmp_path):
    good = tmp_path / "trained.pt"
    random_weights(good)
    command = [sys.executable, "-m", "tools.package", "--bundle", str(STUDENT), "--out", str(tmp_path / "kd.zip")]
    proc = subprocess.run(command + ["--weights", str(good), "--check", "false"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["weights"] == ["models/model.pt"]
    assert "kd/models/model.pt" in zipfile.ZipFile(tmp_path / "kd.zip").namelist()
    missing = subprocess.run(command + ["--weights", str(tmp_path / "none.pt")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "no such file" in missing.stderr

    # a checkpoint of a smaller network: MONAI's load() copies what fits and skips the rest silently;
    # the check must notice
    small = tmp_path / "small.pt"
    random_weights(small, filters=TINY["filters"])
    with pytest.raises(PackageError, match="does not load"):
        package(str(STUDENT), str(tmp_path / "bad.zip"), weights=str(small))


def test_build_refuses_incomplete_bundles_and_single_weights_for_an_ensemble(tmp_path):
    with pytest.raises(PackageError, match="must end in .zip"):
        build(STUDENT, tmp_path / "kd_student.tar")
    incomplete = tmp_path / "incomplete"
    (incomplete / "configs").mkdir(parents=True)
    with pytest.raises(PackageError, match="metadata.json is missing"):
        build(incomplete, tmp_path / "x.zip")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(PackageError, match="several networks"):
        build(BUNDLES / "ensemble", tmp_path / "ensemble.zip", weights=weights)
    assert not list(tmp_path.glob("*.zip")), "nothing is written when packaging fails"


# Started by PYTHONPATH in the bundle's subprocess: the installed brats_kd (site-packages, editable
# finder) becomes unimportable; only a copy inside the bundle folder can be imported, and the file
# it was imported from is written to $BRATS_KD_IMPORTED_FROM at exit.
BLOCKER = r"""
import atexit, importlib.machinery, os, sys

BUNDLE = os.environ["BRATS_KD_BUNDLE"]


class OnlyTheVendoredCopy:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "brats_kd":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, [BUNDLE])
        if spec is None:
            raise ImportError("brats_kd: the installed package is blocked and the bundle has no copy")
        return spec


sys.meta_path.insert(0, OnlyTheVendoredCopy())


@atexit.register
def record():
    module = sys.modules.get("brats_kd")
    with open(os.environ["BRATS_KD_IMPORTED_FROM"], "a") as f:
        f.write((module.__file__ if module else "not imported") + "\n")
"""


def test_a_zip_unpacked_alone_trains_and_infers_without_the_installed_package(datalist, datalist_json, tmp_path):
    """The zip of ``tools.package``, unpacked alone, trains one epoch and segments cases with ``brats_kd``
    importable only from its vendored copy (run from the bundle folder, as the zoo's commands are)."""
    build(BUNDLES / "teacher", tmp_path / "dist" / "teacher.zip")
    zipfile.ZipFile(tmp_path / "dist" / "teacher.zip").extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / "teacher"
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    imported_from = tmp_path / "imported_from.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tmp_path / "blocker"), BRATS_KD_BUNDLE=str(bundle), BRATS_KD_IMPORTED_FROM=str(imported_from))

    def run(config: str, **overrides) -> None:
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
        for key, value in {**TINY, "datalist": str(datalist), **overrides}.items():
            command += [f"--{key}", json.dumps(value) if isinstance(value, (list, bool)) else str(value)]
        proc = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    no_copy = dict(env, BRATS_KD_BUNDLE=str(tmp_path / "dist"))
    probe = subprocess.run([sys.executable, "-c", "import brats_kd"], cwd=tmp_path, env=no_copy, capture_output=True, text=True)
    assert probe.returncode != 0 and "installed package is blocked" in probe.stderr, "the blocker must work"

    run("train.json", epochs=1, val_interval=1, cache_rate=0.0)
    assert (bundle / "models" / "model.pt").is_file()
    run("inference.json", output_dir=str(tmp_path / "predictions"))
    unlabeled = sorted(c["case_id"] for c in datalist_json["unlabeled"])
    assert unlabeled and sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [f"{c}.nii.gz" for c in unlabeled]
    probe_line, *sources = imported_from.read_text().splitlines()
    assert probe_line == "not imported"
    assert len(sources) == 2 and all(Path(f).is_relative_to(bundle / "brats_kd") for f in sources), sources


def zipped_json(zip_path: Path, member: str) -> dict:
    return json.loads(zipfile.ZipFile(zip_path).read(f"{zip_path.stem}/{member}"))


def test_a_student_on_other_modalities_is_packaged_for_the_inputs_its_weights_record(tmp_path):
    """A T1+T2 student's model.pt records ["t1", "t2"]: the zip's configs and metadata follow it, and MONAI's
    bundle API then builds a 2-channel network the weights load into (the check's forward pass)."""
    weights = tmp_path / "t1_t2.pt"
    state = random_weights(weights, student_modalities=["t1", "t2"])
    torch.save({"model": state, "record": {"activation": "sigmoid", "modalities": ["t1", "t2"]}}, weights)
    result = package(str(STUDENT), str(tmp_path / "kd_t1_t2.zip"), weights=str(weights))
    zip_path = tmp_path / "kd_t1_t2.zip"
    for config in ("inference.json", "train.json", "evaluate.json"):
        assert zipped_json(zip_path, f"configs/{config}").get("student_modalities", ["t1", "t2"]) == ["t1", "t2"], config
    assert zipped_json(zip_path, "configs/inference.json")["student_modalities"] == ["t1", "t2"]
    image = zipped_json(zip_path, "configs/metadata.json")["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 2 and image["channel_def"] == {"0": "T1", "1": "T2"}
    assert result["check"]["networks"]["network_def"]["input"][1] == 2
    # the bundle in the repository is untouched: still the default T1ce student
    assert json.loads((STUDENT / "configs" / "inference.json").read_text())["student_modalities"] == ["t1ce"]


def test_student_modalities_name_the_inputs_of_weights_without_a_record_and_may_not_contradict_one(tmp_path):
    plain = tmp_path / "flair.pt"
    random_weights(plain, student_modalities=["flair"])  # {"model": ...} only, as before model.pt had a record
    build(STUDENT, tmp_path / "flair.zip", plain, "flair")
    meta = zipped_json(tmp_path / "flair.zip", "configs/metadata.json")
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "FLAIR"}
    assert zipped_json(tmp_path / "flair.zip", "configs/inference.json")["student_modalities"] == ["flair"]

    recorded = tmp_path / "recorded.pt"
    torch.save({"model": torch.load(plain, weights_only=True)["model"],
                "record": {"activation": "sigmoid", "modalities": ["flair"]}}, recorded)
    with pytest.raises(PackageError, match=r"--student_modalities \['t2'\] contradicts the weights .* record \['flair'\]"):
        build(STUDENT, tmp_path / "wrong.zip", recorded, "t2")
    assert not (tmp_path / "wrong.zip").exists()
    with pytest.raises(PackageError, match="has no student_modalities"):
        build(BUNDLES / "teacher", tmp_path / "teacher.zip", None, "flair")
