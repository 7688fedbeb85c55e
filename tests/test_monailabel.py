"""The students served by a real MONAI Label 0.8.5 server (its ``monaibundle`` sample app).

MONAI Label lives in its own virtual environment (``tools/monailabel_env.sh`` makes
``.venv-monailabel``; ``MONAILABEL_VENV`` points elsewhere). Without it the test is skipped, unless
the environment variable ``CI`` is set, where a missing venv is a failure.

Each bundle is served from the zip ``tools.package`` makes (``brats_kd`` vendored inside: the MONAI
Label venv does not install it). One server serves every student bundle present (kd_student, omni_student once it has
``inference.json`` and ``metadata.json``), each with a randomly initialised ``{"model": state_dict}``
checkpoint: the test checks the protocol, not accuracy. A phantom case is POSTed to
``/infer/<bundle>``; the returned label map must use only the label values named by the bundle's
``network_data_format.outputs.pred.channel_def``, keep the input's shape and affine, and equal what
the bundle's own ``inference.json`` writes for the same image and weights.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_runner import BUNDLES, ROOT, bundle_config, kill_group, log_tail
from tests.conftest import python_of_venv
from tools.package import build

pytestmark = pytest.mark.slow

VENV = Path(os.environ.get("MONAILABEL_VENV", ROOT / ".venv-monailabel"))
#: served name -> (bundle, the modalities its weights record; None: the bundle's default) (docs/monailabel.md); a missing
#: config fails the test, never drops the bundle. kd_student_flair: a KD student trained on FLAIR, packaged from its
#: weights' record, must be fed the FLAIR image and give what its own packaged inference.json gives.
SERVED = {"kd_student": ("kd_student", None), "omni_student": ("omni_student", None),
          "kd_student_flair": ("kd_student", ["flair"])}
STUDENTS = list(SERVED)
BRATS_VALUES = {0, 1, 2, 4}
#: metadata channel names -> phantom (BraTS 2021) file suffixes
MODALITY_FILES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
START_TIMEOUT_S = 240
#: servers started before giving up, each on a newly chosen port (another process may take a free port first)
START_ATTEMPTS = 3
INFER_TIMEOUT_S = 300


def served_bundle(server: dict, name: str) -> Path:
    """The unpacked zip MONAI Label serves as ``name``."""
    return server["app"] / "model" / name


def metadata(server: dict, name: str) -> dict:
    return json.loads((served_bundle(server, name) / "configs" / "metadata.json").read_text())


def expected_labels(server: dict, name: str) -> dict[str, int]:
    """What MONAI Label's BundleInferTask derives from channel_def: lower-cased name -> value, no background."""
    channel_def = metadata(server, name)["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_file(url: str, path: Path, timeout: float) -> tuple[str, bytes]:
    """POST ``path`` as the multipart field ``file`` (what the 3D Slicer plugin does); (content type, body)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n".encode(),
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n".encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            path.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.headers["Content-Type"], response.read()


def parse_multipart(content_type: str, body: bytes) -> dict[str, email.message.EmailMessage]:
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    assert message.is_multipart(), f"expected a multipart answer, got {content_type}"
    return {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    return python_of_venv(VENV, "MONAI Label", "monailabel_env.sh", "MONAILABEL_VENV")


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory) -> Path:
    """One BraTS 2021-layout phantom case folder (32×32×21 voxels, 7.5 mm, oblique-free LPS affine)."""
    from tools.phantom import write_dataset

    root = tmp_path_factory.mktemp("ml_phantom") / "cases"
    write_dataset(root, layout="brats2021", cases=1, unlabeled=0, size=32, seed=3)
    (case,) = [p for p in root.iterdir() if p.is_dir()]
    return case


def input_image(server: dict, name: str, case: Path, out_dir: Path) -> Path:
    """The file MONAI Label receives for ``name``: the one modality, or the modalities stacked as a 4-D NIfTI."""
    channels = metadata(server, name)["network_data_format"]["inputs"]["image"]["channel_def"]
    files = [case / f"{case.name}_{MODALITY_FILES[channels[str(i)].lower()]}.nii.gz" for i in range(len(channels))]
    if len(files) == 1:
        return files[0]
    images = [nib.load(f) for f in files]
    stacked = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in images], axis=-1)
    path = out_dir / f"{name}_{case.name}_{len(files)}ch.nii.gz"
    nib.save(nib.Nifti1Image(stacked, images[0].affine), path)
    return path


@pytest.fixture(scope="module")
def server(monailabel_python, tmp_path_factory):
    """A MONAI Label server on 127.0.0.1 serving every student bundle; always stopped afterwards."""
    for bundle, _ in SERVED.values():
        for config in ("inference.json", "metadata.json"):
            assert (BUNDLES / bundle / "configs" / config).is_file(), f"{bundle} has no configs/{config} to serve"
    work = tmp_path_factory.mktemp("monailabel")
    prefix = subprocess.run(
        [str(monailabel_python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    sample_app = Path(prefix) / "monailabel" / "sample-apps" / "monaibundle"
    assert (sample_app / "main.py").is_file(), f"no monaibundle sample app in {sample_app}"
    app = work / "app"
    shutil.copytree(sample_app, app)
    for name, (source, modalities) in SERVED.items():
        # randomly initialised weights; a student on other modalities records them, as its training's model.pt does
        torch.manual_seed(0)
        settings = {"student_modalities": modalities} if modalities else {}
        network = bundle_config(BUNDLES / source, "inference.json", **settings).get_parsed_content("network_def")
        weights = work / "weights" / name / "model.pt"
        weights.parent.mkdir(parents=True)
        record = {"record": {"activation": "sigmoid", "modalities": modalities}} if modalities else {}
        torch.save({"model": network.state_dict(), **record}, weights)
        # the zip tools.package makes, brats_kd vendored inside: .venv-monailabel does not have brats_kd installed
        zip_path = work / "dist" / f"{name}.zip"
        build(BUNDLES / source, zip_path, weights)  # returns the zip's member names
        zipfile.ZipFile(zip_path).extractall(app / "model")
        bundle = app / "model" / name
        assert (bundle / "brats_kd" / "__init__.py").is_file() and (bundle / "models" / "model.pt").is_file()
    studies = work / "studies"
    studies.mkdir()
    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=str(home), MONAI_LABEL_SESSION_PATH=str(work / "sessions"), PYTHONUNBUFFERED="1")
    log_path = work / "server.log"
    process = None
    try:
        # The port is free when chosen, but another process may take it before the server binds it: a server
        # that exits with "address already in use" is started again on another port; and /info is trusted only
        # once this server's own log says it listens on the port (never another process's server).
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            command = [
                str(monailabel_python), "-m", "monailabel.main", "start_server",
                "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
                "--conf", "models", ",".join(STUDENTS),
                # no network at start: no zoo look-up, no SAM2 weights, no trainers (a KD student trains with its teacher)
                "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--conf", "skip_trainers", "true",
            ]  # fmt: skip
            with log_path.open("w") as log:  # its own process group: stopped whole, with any worker it started
                process = subprocess.Popen(
                    command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            base = f"http://127.0.0.1:{port}"
            listening = f"Uvicorn running on {base}"
            deadline = time.monotonic() + START_TIMEOUT_S
            info = None
            while time.monotonic() < deadline and info is None:
                if process.poll() is not None:
                    break
                if listening in log_path.read_text():
                    try:
                        info = http_get_json(f"{base}/info/")
                        continue
                    except (urllib.error.URLError, ConnectionError, TimeoutError):
                        pass
                time.sleep(1)
            if info is not None:
                break
            text = log_path.read_text()
            if process.poll() is not None and "address already in use" in text.lower() and attempt < START_ATTEMPTS:
                continue  # lost the race for the port: another one
            if process.poll() is not None:
                pytest.fail(f"MONAI Label exited with {process.returncode}:\n{log_tail(text)}")
            pytest.fail(f"MONAI Label did not answer within {START_TIMEOUT_S} s:\n{log_tail(text)}")
        yield {"base": base, "info": info, "log": log_path, "work": work, "app": app}
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(process)
                process.wait(timeout=30)
            kill_group(process)  # whatever the server started and left behind


@pytest.mark.parametrize("name", STUDENTS)
def test_info_lists_the_bundle_with_labels_from_channel_def(server, name):
    models = server["info"]["models"]
    assert name in models, f"{name} not served; models: {sorted(models)}\n{log_tail(server['log'].read_text())}"
    assert models[name]["type"] == "segmentation"
    assert models[name]["dimension"] == 3
    assert models[name]["labels"] == expected_labels(server, name)
    assert set(expected_labels(server, name).values()) == BRATS_VALUES - {0}, "channel_def must name the BraTS labels 1, 2, 4"
    modalities = SERVED[name][1]
    if modalities:  # the packaged metadata describes the weights' inputs, not the bundle's default T1ce
        channels = metadata(server, name)["network_data_format"]["inputs"]["image"]["channel_def"]
        assert channels == {str(i): m.upper() for i, m in enumerate(modalities)}


@pytest.mark.parametrize("name", STUDENTS)
def test_infer_returns_the_bundles_label_map_in_the_input_geometry(server, name, phantom_case, tmp_path):
    image_path = input_image(server, name, phantom_case, tmp_path)
    try:
        content_type, body = post_file(f"{server['base']}/infer/{name}?output=all", image_path, INFER_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        pytest.fail(f"/infer/{name} answered {err.code}: {err.read()[:2000]!r}\n{log_tail(server['log'].read_text())}")
    parts = parse_multipart(content_type, body)
    params = json.loads(parts["params"].get_content())
    assert params["label_names"] == expected_labels(server, name)

    label_path = tmp_path / "served.nii.gz"
    label_path.write_bytes(parts["image"].get_content())
    served, reference = nib.load(label_path), nib.load(image_path)
    labels = np.asarray(served.dataobj)
    assert labels.shape == reference.shape[:3], "the label map must have the input's grid"
    np.testing.assert_allclose(served.affine, reference.affine, atol=1e-4)
    values = set(np.unique(labels).astype(int).tolist())
    assert values <= BRATS_VALUES, f"label values {sorted(values)} outside BraTS 0/1/2/4"
    assert values - {0}, "an untrained network still paints some tumour; an empty map hides a broken pipeline"

    # the same weights through the bundle's own inference.json (in this process: no second interpreter start)
    out = tmp_path / "bundle_output"
    bundle_inference(served_bundle(server, name), input_dir=phantom_case.parent, out=out)
    offline = nib.load(out / f"{phantom_case.name}.nii.gz")
    np.testing.assert_array_equal(np.asarray(offline.dataobj), labels)
    np.testing.assert_allclose(offline.affine, served.affine, atol=1e-4)


def bundle_inference(root: Path, input_dir: Path, out: Path) -> None:
    """Run the bundle folder ``root``'s inference.json with its own ``models/model.pt``, as ``monai.bundle run`` would,
    on a folder of case folders (one file per modality, stacked in the model's order by the bundle)."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(root),
        input_dir=str(input_dir),
        output_dir=str(out),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
