"""MONAI model-zoo conformance of every bundle under ``bundles/``, offline.

What the zoo's CI (``ci/verify_bundle.py``) checks, without its network access: the metadata keys
its JSON schema requires (``verify_metadata`` downloads the schema, so the keys are checked here),
``network_data_format`` and one ``<name>_data_format`` per secondary network, the networks' input and
output channels (``monai.bundle.verify_net_in_out``), ``large_files.yml`` and the README sections.

Bundles are discovered, not listed: a new folder under ``bundles/`` with a ``configs`` folder is
checked as soon as it exists. The helpers at the top are shared with ``test_export.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.bundle_runner import BUNDLES, ROOT, bundle_config, bundle_scripts_on_path

BUNDLE_NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir())

#: metadata.json keys required by the zoo's schema (meta_schema_20240725) and by the project
REQUIRED_META_KEYS = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "name",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
    "intended_use",
    "references",
)
TENSOR_FORMAT_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data")
#: metadata "<x>_version" field -> requirements.txt package name
PINNED_VERSIONS = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}
#: the zoo README template's sections (model-zoo/docs/readme_template.md), matched case-insensitively
README_SECTIONS = ("model overview", "data", "training configuration", "performance", "limitations", "references")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
#: small widths for the networks, applied only where a bundle's config has the key: channel counts and
#: shapes, which the checks compare with the metadata, do not depend on them
SMALL_NETWORKS = {
    "filters": [4, 8, 16, 32, 64],
    "teacher_filters": [4, 8, 16, 32, 64],
    "init_filters": 8,
    "resunet_init_filters": 8,
    "unet_features": [4, 4, 8, 8, 16, 4],
    "cascade_features": [4, 8],
}


def bundle_path(name: str) -> Path:
    return BUNDLES / name


def read_metadata(name: str) -> dict:
    path = bundle_path(name) / "configs" / "metadata.json"
    assert path.is_file(), f"{name}: no configs/metadata.json (every bundle needs one)"
    return json.loads(path.read_text())


def read_config(name: str, config: str) -> dict:
    path = bundle_path(name) / "configs" / config
    return json.loads(path.read_text()) if path.is_file() else {}


def data_formats(meta: dict) -> dict[str, dict]:
    """``network_data_format`` and every secondary ``<name>_data_format`` of a metadata dict."""
    return {key: value for key, value in meta.items() if key.endswith("_data_format")}


def network_for_format(name: str, format_key: str) -> tuple[str, str]:
    """(config file, network id) that ``format_key`` describes.

    ``network_data_format`` is ``network_def`` of ``inference.json``; ``<x>_data_format`` is
    ``<x>_network_def`` or ``<x>_def``, looked up in ``inference.json`` then ``train.json``.
    """
    if format_key == "network_data_format":
        return "inference.json", "network_def"
    prefix = format_key[: -len("_data_format")]
    for config in ("inference.json", "train.json"):
        content = read_config(name, config)
        for net_id in (f"{prefix}_network_def", f"{prefix}_def"):
            if net_id in content:
                return config, net_id
    raise AssertionError(
        f"{name}: metadata declares {format_key!r} but no config defines {prefix}_network_def or {prefix}_def"
    )


def fake_spatial_shape(shape, n: int = 2, p: int = 1, any_size: int = 32) -> tuple[int, ...]:
    """Concrete sizes for a metadata ``spatial_shape`` such as ``["16*n", "16*n", "16*n"]``.

    ``n = 2`` by default: ``16*n`` with ``n = 1`` leaves a 1-voxel bottleneck, on which instance norm
    is undefined, so 2 is the smallest valid multiple for the encoder-decoders here.
    """
    sizes = []
    for dim in shape:
        if isinstance(dim, int):
            sizes.append(dim)
        elif dim == "*":
            sizes.append(any_size)
        else:
            if not re.fullmatch(r"[0-9np*+ ]+", str(dim)):
                raise ValueError(f"unsupported spatial_shape entry {dim!r}")
            sizes.append(int(eval(str(dim), {"__builtins__": {}}, {"n": n, "p": p})))
    return tuple(sizes)


def requirement_pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            package, version = line.split("==", 1)
            pins[package.strip().lower()] = version.strip()
    return pins


def inference_networks(name: str) -> dict[str, tuple[str, str, str]]:
    """Networks that inference runs: ``{label: (format key, config, net id)}``.

    ``network_def`` itself, or, when it is a container of members (the ensemble's ``ModuleDict``),
    each member through its own ``<member>_data_format``.
    """
    meta = read_metadata(name)
    config = read_config(name, "inference.json")
    network_def = config.get("network_def", {})
    if isinstance(network_def, dict) and network_def.get("_target_", "").endswith("ModuleDict"):
        members = network_def.get("modules", {})
        return {member: (f"{member}_data_format", *network_for_format(name, f"{member}_data_format")) for member in members}
    assert "network_data_format" in meta
    return {"network_def": ("network_data_format", "inference.json", "network_def")}


# ---------------------------------------------------------------------------------------------
# metadata.json


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_metadata_has_the_zoo_schema_keys(name):
    meta = read_metadata(name)
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    assert not missing, f"{name}: metadata.json lacks {missing}"
    for key in ("name", "task", "description", "authors", "copyright", "intended_use"):
        assert isinstance(meta[key], str) and meta[key].strip(), f"{name}: {key} must be a non-empty string"
    assert SEMVER.match(meta["version"]), f"{name}: version {meta['version']!r} is not MAJOR.MINOR.PATCH"
    assert isinstance(meta["changelog"], dict) and meta["version"] in meta["changelog"], (
        f"{name}: changelog has no entry for the current version {meta['version']}"
    )
    assert all(SEMVER.match(v) for v in meta["changelog"]), f"{name}: changelog keys must be versions"
    assert isinstance(meta["required_packages_version"], dict)
    assert isinstance(meta["references"], list) and meta["references"], f"{name}: references must be a non-empty list"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_metadata_versions_match_the_pinned_requirements(name):
    """A bundle must state the versions the project actually pins, or the zoo entry lies about them."""
    meta, pins = read_metadata(name), requirement_pins()
    for field, package in PINNED_VERSIONS.items():
        assert meta[field] == pins[package], f"{name}: {field} {meta[field]} but requirements.txt pins {package}=={pins[package]}"
    for package, version in meta["required_packages_version"].items():
        assert package.lower() in pins, f"{name}: required package {package} is not pinned in requirements.txt"
        assert version == pins[package.lower()], f"{name}: {package} {version} vs requirements.txt {pins[package.lower()]}"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_every_data_format_describes_image_in_and_pred_out(name):
    formats = data_formats(read_metadata(name))
    assert "network_data_format" in formats, f"{name}: no network_data_format"
    for key, fmt in formats.items():
        assert "image" in fmt.get("inputs", {}), f"{name}: {key}.inputs has no 'image'"
        assert "pred" in fmt.get("outputs", {}), f"{name}: {key}.outputs has no 'pred'"
        for side, tensor in (("inputs.image", fmt["inputs"]["image"]), ("outputs.pred", fmt["outputs"]["pred"])):
            missing = [k for k in TENSOR_FORMAT_KEYS if k not in tensor]
            assert not missing, f"{name}: {key}.{side} lacks {missing}"
            assert isinstance(tensor["num_channels"], int) and tensor["num_channels"] > 0
        image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
        assert len(image.get("channel_def", {})) == image["num_channels"], (
            f"{name}: {key}.inputs.image.channel_def must name each of its {image['num_channels']} channels"
        )
        assert pred.get("channel_def"), f"{name}: {key}.outputs.pred needs a channel_def"
        assert all(k.isdigit() for k in pred["channel_def"]), f"{name}: channel_def keys must be integers"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_secondary_networks_declare_their_data_format(name):
    """Every ``<x>_network_def`` of any config, and every member of a container network, has ``<x>_data_format``."""
    formats = data_formats(read_metadata(name))
    declared = set()
    for config in sorted((bundle_path(name) / "configs").glob("*.json")):
        content = json.loads(config.read_text())
        if not isinstance(content, dict):
            continue
        declared |= {key[: -len("_network_def")] for key in content if key.endswith("_network_def")}
    declared |= {label for label in inference_networks(name) if label != "network_def"}
    missing = sorted(f"{x}_data_format" for x in declared if f"{x}_data_format" not in formats)
    assert not missing, f"{name}: metadata.json lacks {missing}"
    for key in formats:
        network_for_format(name, key)  # each declared format names a network that exists


def test_kd_student_declares_its_t1ce_input_and_the_four_modality_teacher():
    meta = read_metadata("kd_student")
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["channel_def"]) == (1, {"0": "T1ce"})
    teacher = meta["teacher_data_format"]
    assert teacher["inputs"]["image"]["num_channels"] == 4
    assert list(teacher["inputs"]["image"]["channel_def"].values()) == ["T1", "T1ce", "T2", "FLAIR"]
    assert teacher["outputs"]["pred"]["num_channels"] == meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3


# ---------------------------------------------------------------------------------------------
# networks against their metadata


def _format_cases():
    cases = []
    for name in BUNDLE_NAMES:
        meta_file = bundle_path(name) / "configs" / "metadata.json"
        if not meta_file.is_file():
            cases.append(pytest.param(name, "network_data_format", id=f"{name}-no-metadata"))
            continue
        meta = json.loads(meta_file.read_text())
        config = read_config(name, "inference.json").get("network_def", {})
        for key in data_formats(meta):
            if key == "network_data_format" and isinstance(config, dict) and config.get("_target_", "").endswith("ModuleDict"):
                continue  # a container has no forward(); its members are verified through their own formats
            cases.append(pytest.param(name, key, id=f"{name}-{key}"))
    return cases


@pytest.mark.parametrize("name, format_key", _format_cases())
def test_verify_net_in_out(name, format_key):
    """``monai.bundle.verify_net_in_out`` on every network a data format describes, plus the spatial shape."""
    from monai.bundle import verify_net_in_out

    meta = read_metadata(name)
    fmt = meta[format_key]
    config, net_id = network_for_format(name, format_key)
    root = bundle_path(name)
    small = {k: v for k, v in SMALL_NETWORKS.items() if k in read_config(name, config)}
    with bundle_scripts_on_path(root):
        verify_net_in_out(
            net_id=net_id,
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / config),
            device="cpu",
            n=2,
            any=32,
            bundle_root=str(root),
            **{"_meta_#network_data_format": fmt},
            **small,
        )
        net = bundle_config(root, config, **small).get_parsed_content(net_id).eval()
    shape = fake_spatial_shape(fmt["inputs"]["image"]["spatial_shape"])
    with torch.no_grad():
        out = net(torch.rand(1, fmt["inputs"]["image"]["num_channels"], *shape))
    assert tuple(out.shape) == (1, fmt["outputs"]["pred"]["num_channels"], *shape), f"{name}: {net_id} output shape"


def test_container_networks_match_their_members_formats():
    """A ``ModuleDict`` network (the ensemble) is described by its members: same input and output channels."""
    checked = 0
    for name in BUNDLE_NAMES:
        networks = inference_networks(name)
        if "network_def" in networks:
            continue
        meta = read_metadata(name)
        top = meta["network_data_format"]
        for label, (format_key, _, _) in networks.items():
            member = meta[format_key]
            assert member["inputs"]["image"]["num_channels"] == top["inputs"]["image"]["num_channels"], label
            assert member["outputs"]["pred"]["num_channels"] == top["outputs"]["pred"]["num_channels"], label
            checked += 1
    if not checked:
        pytest.skip("no bundle has a container network_def")


# ---------------------------------------------------------------------------------------------
# large_files.yml and docs


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_large_files_lists_the_weights_produced_by_training(name):
    path = bundle_path(name) / "large_files.yml"
    assert path.is_file(), f"{name}: no large_files.yml"
    text = path.read_text()
    entries = yaml.safe_load(text)["large_files"]
    assert isinstance(entries, list) and entries
    paths = [entry["path"] for entry in entries]
    assert all(p.startswith("models/") and p.endswith(".pt") for p in paths), paths
    assert len(set(paths)) == len(paths)
    for entry in entries:
        assert not entry.get("url"), f"{name}: {entry['path']} has a url, but no weights are published"
    weights = {network: f"models/{network}/model.pt" for network in inference_networks(name)}
    weights["network_def"] = "models/model.pt"
    for network in inference_networks(name):
        assert weights[network] in paths, f"{name}: large_files.yml does not list {weights[network]}"
    assert "configs/train.json" in text, f"{name}: large_files.yml must say the weights come from configs/train.json"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_readme_has_the_zoo_template_sections(name):
    path = bundle_path(name) / "docs" / "README.md"
    assert path.is_file(), f"{name}: no docs/README.md"
    headings, in_code = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            headings.append(line.lstrip("#").strip().lower())
    missing = [s for s in README_SECTIONS if not any(re.search(rf"\b{s}\b", h) for h in headings)]
    assert not missing, f"{name}: docs/README.md lacks sections {missing}; headings: {headings}"
    assert any("command" in h or "usage" in h for h in headings), f"{name}: docs/README.md has no commands section"
    assert (bundle_path(name) / "LICENSE").is_file(), f"{name}: no LICENSE"
