"""``tools.package``: a bundle zipped in the model-zoo layout loads offline through MONAI's bundle API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.bundle_runner import BUNDLES, ROOT, TINY, bundle_config, bundle_scripts_on_path
from tools.package import PackageError, build, package

pytestmark = pytest.mark.slow

STUDENT = BUNDLES / "kd_student"


def random_weights(path, **overrides) -> dict:
    """A randomly initialised kd_student network saved as ``{"model": state_dict}``; the state dict."""
    torch.manual_seed(0)
    with bundle_scripts_on_path(STUDENT):
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
        "scripts/__init__.py",
        "scripts/losses.py",
        "docs/README.md",
        "LICENSE",
        "large_files.yml",
        "models/model.pt",
    ):
        assert f"kd_student/{required}" in names, required
    assert all(name.startswith("kd_student/") for name in names), "one top folder named after the zip"
    for unwanted in ("runs/", "eval/", "__pycache__", ".pyc", "checkpoint.pt", "datalist.json"):
        assert not [n for n in names if unwanted in n], unwanted

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
