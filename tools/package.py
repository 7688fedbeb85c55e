"""Package a bundle as a model-zoo zip and check that MONAI loads it offline.

    python -m tools.package --bundle bundles/kd_student --out dist/kd_student.zip [--weights PATH] [--check true]
        [--student_modalities flair]

The zip holds one folder named after the zip (``kd_student/``, the layout ``monai.bundle.download``
and ``load_bundle_config`` expect) with the bundle's ``configs``, ``docs``, ``LICENSE``,
``large_files.yml``, a copy of the ``brats_kd`` package (``<bundle>/brats_kd/``, so that the zip runs
where the package is not installed: run it from the bundle folder, as the zoo's commands do, and
Python finds the copy there) and its weights: ``models/model.pt`` (or ``--weights PATH`` copied there) and,
for a bundle of several networks, ``models/<member>/model.pt``. Training outputs (``runs``,
``eval``, ``predictions``, resumable ``checkpoint.pt``), ``__pycache__`` and a local
``configs/datalist.json`` (it holds a user's data paths) are left out. The zipped ``metadata.json``
records the copy under the custom key ``"vendored_packages": {"brats_kd": "<version>"}``
(``required_packages_version`` names packages to install from an index, which ``brats_kd`` is not).

A KD student trained on other modalities than the default T1ce (``student_modalities``) is packaged as
what it is: its ``model.pt`` records its input modalities, and the zip's configs (every one that sets
``student_modalities``) and ``metadata.json`` (input channels, ``channel_def``, ``image_classes``:
:func:`brats_kd.modalities.metadata_overrides`) are written for them, so MONAI Label and the zoo tools
feed it the right images. ``--student_modalities`` names them for weights that do not record them, and
is refused when it contradicts the record.

The check runs in a fresh interpreter, as a user of the zip would: ``monai.bundle.load_bundle_config``
reads the metadata and ``inference.json`` from the zip, ``monai.bundle.download`` unpacks it from its
``file://`` URL (MONAI's offline route; ``load`` has no "disk" source), the network is built from the
unpacked ``inference.json`` and ``monai.bundle.load`` loads every packaged checkpoint into it; every
parameter must then equal the checkpoint's, and a forward pass must give the channels of
``network_data_format``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from brats_kd.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
INCLUDED = ("configs", "scripts", "docs", "LICENSE", "large_files.yml")
VENDORED = "brats_kd"
VENDORED_KEY = "vendored_packages"
METADATA = "configs/metadata.json"
EXCLUDED_NAMES = {"__pycache__", ".ipynb_checkpoints"}
EXCLUDED_FILES = {"configs/datalist.json"}
WEIGHTS_NAME = "model.pt"


class PackageError(RuntimeError):
    """The bundle cannot be packaged, or the package does not load."""


def recorded_modalities(weights: Path) -> list[str] | None:
    """The input modalities a checkpoint records (``{"model": ..., "record": {"modalities": [...]}}``), or None."""
    import torch

    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    record = checkpoint.get("record") if isinstance(checkpoint, dict) else None
    modalities = record.get("modalities") if isinstance(record, dict) else None
    return list(modalities) if modalities else None


def student_inputs(bundle: Path, weight_files: list[tuple[Path, str]], requested=None) -> list[str] | None:
    """The modalities to package a student bundle for: the weights' record, else ``requested`` (a list or a
    comma-separated string), else None (the bundle's own configs unchanged). Only for bundles whose
    ``inference.json`` sets ``student_modalities``."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    if isinstance(requested, str):
        requested = [m.strip() for m in requested.split(",") if m.strip()]
    if "student_modalities" not in config:
        if requested:
            raise PackageError(f"--student_modalities: {bundle.name} has no student_modalities config value")
        return None
    recorded = recorded_modalities(weight_files[0][0]) if len(weight_files) == 1 else None
    if recorded is not None and requested and list(requested) != recorded:
        raise PackageError(
            f"--student_modalities {list(requested)} contradicts the weights {weight_files[0][0]}, which record "
            f"{recorded}: the network was trained on those"
        )
    chosen = recorded or (list(requested) if requested else None)
    if chosen is None or chosen == config["student_modalities"]:
        return None
    from brats_kd.modalities import metadata_overrides

    try:
        metadata_overrides(chosen)  # names every modality it knows; refuses anything else
    except ValueError as err:
        raise PackageError(str(err)) from None
    return chosen


def _with_student_modalities(path: Path, modalities: list[str]) -> bytes | None:
    """``path``'s JSON with its ``student_modalities`` set to ``modalities``; None when it does not set it."""
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or "student_modalities" not in content:
        return None
    content["student_modalities"] = list(modalities)
    return (json.dumps(content, indent=4) + "\n").encode("utf-8")


def _bundle_files(bundle: Path) -> Iterator[tuple[Path, str]]:
    """(source file, path inside the bundle) for the code, configs and docs of ``bundle``."""
    for name in INCLUDED:
        top = bundle / name
        if top.is_file():
            yield top, name
        elif top.is_dir():
            for path in sorted(top.rglob("*")):
                rel = path.relative_to(bundle).as_posix()
                if path.is_file() and not EXCLUDED_NAMES.intersection(path.parts) and path.suffix != ".pyc":
                    if rel not in EXCLUDED_FILES:
                        yield path, rel


def _vendored_files() -> Iterator[tuple[Path, str]]:
    """(source file, path inside the bundle) of the ``brats_kd`` package's Python files."""
    package = ROOT / VENDORED
    for path in sorted(package.rglob("*.py")):
        if not EXCLUDED_NAMES.intersection(path.parts):
            yield path, path.relative_to(ROOT).as_posix()


def _packaged_metadata(bundle: Path, modalities: list[str] | None = None) -> bytes:
    """The bundle's metadata.json with the vendored package recorded under ``vendored_packages`` and, for a
    student on other ``modalities``, their input description."""
    from monai.bundle import ConfigParser

    import brats_kd

    parser = ConfigParser()
    parser.read_meta(str(bundle / METADATA))
    if modalities is not None:
        from brats_kd.modalities import metadata_overrides

        for key, value in metadata_overrides(modalities).items():  # "_meta_#a#b" ids, as monai.bundle's --args_file
            parser[key] = value
    meta = parser.get("_meta_")
    meta[VENDORED_KEY] = {VENDORED: brats_kd.__version__}
    return (json.dumps(meta, indent=4) + "\n").encode("utf-8")


def _network_members(bundle: Path) -> list[str]:
    """Member names when ``inference.json``'s ``network_def`` is an ensemble (``MeanEnsemble``), else ``[]``."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    network_def = config.get("network_def", {})
    if isinstance(network_def, dict) and str(network_def.get("_target_", "")).endswith("MeanEnsemble"):
        return list(network_def.get("members", {}))
    return []


def _weight_files(bundle: Path, weights: str | os.PathLike | None) -> list[tuple[Path, str]]:
    members = _network_members(bundle)
    if weights is not None:
        weights = Path(weights)
        if members:
            raise PackageError(
                f"{bundle.name} has several networks ({', '.join(members)}): put their weights in "
                f"models/<member>/{WEIGHTS_NAME} instead of passing --weights"
            )
        if not weights.is_file():
            raise PackageError(f"--weights {weights}: no such file")
        return [(weights, f"models/{WEIGHTS_NAME}")]
    names = [f"models/{m}/{WEIGHTS_NAME}" for m in members] if members else [f"models/{WEIGHTS_NAME}"]
    return [(bundle / name, name) for name in names if (bundle / name).is_file()]


def build(
    bundle: str | os.PathLike, out: str | os.PathLike, weights: str | os.PathLike | None = None, student_modalities=None
) -> list[str]:
    """Write the zip atomically; returns the archive's member names."""
    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE"):
        if not (bundle / required).is_file():
            raise PackageError(f"{bundle} is not a complete bundle: {required} is missing")
    if out.suffix != ".zip":
        raise PackageError(f"--out must end in .zip (MONAI names the bundle after it), got {out}")
    name = out.stem
    files = [f for f in _bundle_files(bundle) if f[1] != METADATA] + list(_vendored_files())
    weight_files = _weight_files(bundle, weights)
    files += weight_files
    modalities = student_inputs(bundle, weight_files, student_modalities)
    rewritten = {}  # configs that set student_modalities, rewritten for the weights' modalities
    if modalities is not None:
        for source, rel in files:
            if rel.startswith("configs/") and rel.endswith(".json"):
                content = _with_student_modalities(source, modalities)
                if content is not None:
                    rewritten[rel] = content
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_zip(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{name}/{METADATA}", _packaged_metadata(bundle, modalities))
            for source, rel in files:
                if rel in rewritten:
                    archive.writestr(f"{name}/{rel}", rewritten[rel])
                else:
                    archive.write(source, f"{name}/{rel}")

    atomic_write(out, write_zip)
    return [f"{name}/{METADATA}"] + [f"{name}/{rel}" for _, rel in files]


def _fake_input_shape(fmt: dict) -> list[int]:
    """(1, C, *spatial) for a data format; ``k*n`` dimensions at n = 2, ``*`` as 32."""
    sizes = []
    for dim in fmt["inputs"]["image"]["spatial_shape"]:
        if isinstance(dim, int):
            sizes.append(dim)
        elif dim == "*":
            sizes.append(32)
        else:
            factor, _, var = str(dim).partition("*")
            sizes.append(int(factor) * (2 if var.strip() == "n" else 1))
    return [1, fmt["inputs"]["image"]["num_channels"], *sizes]


def verify_in_this_process(zip_path: str | os.PathLike, workdir: str | os.PathLike) -> dict:
    """Load the packaged bundle with MONAI's bundle API and check its weights; see the module docstring.

    Builds the bundle's networks from its configs; run it in a fresh interpreter (:func:`verify`).
    """
    import torch
    from monai.bundle import ConfigParser, download, load, load_bundle_config

    zip_path, workdir = Path(zip_path).resolve(), Path(workdir).resolve()
    name = zip_path.stem
    parser = load_bundle_config(str(zip_path), "inference.json")  # straight from the zip
    meta = parser.get("_meta_")
    if "network_def" not in parser.get():
        raise PackageError(f"{zip_path}: inference.json has no network_def")
    download(name=name, url=zip_path.as_uri(), bundle_dir=str(workdir), progress=False)
    bundle = workdir / name

    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "inference.json"))
    config.read_meta(str(bundle / "configs" / "metadata.json"))
    config["bundle_root"] = str(bundle)
    members = _network_members(bundle)
    networks = (
        {m: (config.get_parsed_content(f"{m}_def"), f"models/{m}/{WEIGHTS_NAME}", f"{m}_data_format") for m in members}
        if members
        else {"network_def": (config.get_parsed_content("network_def"), f"models/{WEIGHTS_NAME}", "network_data_format")}
    )
    report = {"name": name, "version": meta["version"], "networks": {}}
    for label, (network, model_file, format_key) in networks.items():
        entry = {"weights": None}
        checkpoint = bundle / model_file
        if checkpoint.is_file():  # load() would try to download a missing file: only call it on a present one
            network = load(
                name=name, model=network, bundle_dir=str(workdir), model_file=model_file, key_in_ckpt="model", device="cpu"
            )
            expected = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
            state = network.state_dict()
            if set(state) != set(expected):
                raise PackageError(
                    f"{model_file} does not match {label}: missing {sorted(set(state) - set(expected))[:5]}, "
                    f"unexpected {sorted(set(expected) - set(state))[:5]}"
                )
            different = [k for k in state if not torch.equal(state[k], expected[k].to(state[k].dtype))]
            if different:
                raise PackageError(f"{model_file}: {len(different)} tensors were not loaded, e.g. {different[:3]}")
            entry["weights"] = model_file
            entry["tensors"] = len(state)
        fmt = meta[format_key]
        shape = _fake_input_shape(fmt)
        network.eval()
        with torch.no_grad():
            out = network(torch.rand(*shape))
        if out.shape[1] != fmt["outputs"]["pred"]["num_channels"]:
            raise PackageError(f"{label}: {out.shape[1]} output channels, metadata says {fmt['outputs']['pred']['num_channels']}")
        entry["input"], entry["output"] = shape, list(out.shape)
        report["networks"][label] = entry
    return report


def verify(zip_path: str | os.PathLike) -> dict:
    """:func:`verify_in_this_process` in a fresh interpreter (as a user of the zip would load it); its report."""
    with tempfile.TemporaryDirectory(prefix="bundle-check-") as workdir:
        code = (
            "import json, sys\n"
            "from tools.package import verify_in_this_process\n"
            "print('BUNDLE-CHECK ' + json.dumps(verify_in_this_process(sys.argv[1], sys.argv[2])))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(zip_path).resolve()), workdir],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            capture_output=True,
            text=True,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BUNDLE-CHECK ")]
    if proc.returncode != 0 or not lines:
        raise PackageError(f"{zip_path} does not load:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BUNDLE-CHECK ") :])


def package(bundle: str, out: str, weights: str | None = None, check: bool = True, student_modalities=None) -> dict:
    """Zip ``bundle`` into ``out`` (optionally with ``weights`` as models/model.pt) and check it loads.

    Returns ``{"zip", "bytes", "files", "weights", "check"}`` (``check``: :func:`verify`'s report).
    """
    if isinstance(check, str):  # fire passes `--check false` through as a string
        check = check.strip().lower() not in ("false", "0", "no", "off")
    if isinstance(student_modalities, tuple):  # fire reads `--student_modalities t1,t2` as a tuple
        student_modalities = list(student_modalities)
    members = build(bundle, out, weights, student_modalities)
    result = {"zip": str(Path(out).resolve()), "bytes": Path(out).stat().st_size, "files": len(members)}
    result["weights"] = [m.split("/", 1)[1] for m in members if m.endswith(f"/{WEIGHTS_NAME}")]
    if check:
        result["check"] = verify(out)
    return result


def main(bundle: str, out: str, weights: str | None = None, check: bool = True, student_modalities=None) -> None:
    """CLI: :func:`package`, its result printed as JSON; exit status 1 with the reason on failure."""
    try:
        print(json.dumps(package(bundle, out, weights, check, student_modalities), indent=2))
    except PackageError as err:
        sys.exit(f"tools.package: {err}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
