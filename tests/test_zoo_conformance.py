"""MONAI model-zoo conformance of every bundle under ``bundles/``, offline.

What the zoo's CI (``ci/verify_bundle.py``) checks, without its network access: the metadata keys
its JSON schema requires (``verify_metadata`` downloads the schema, so the keys are checked here),
``network_data_format`` and one ``<name>_data_format`` per secondary network, ``large_files.yml`` and
the README sections; and, called exactly as ``ci/verify_bundle.py`` calls them (default ``n``/``p``/``any``,
the configs' own network sizes), ``monai.bundle.verify_net_in_out`` on ``network_def`` of
``inference.json`` and ``monai.bundle.ckpt_export`` to TorchScript.

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

from tests.bundle_runner import BUNDLES, ROOT, bundle_config

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
def needs_trace(network: torch.nn.Module) -> bool:
    """Whether ``ckpt_export`` must trace ``network``: only the encoder–decoder, whose ``forward`` checks
    the input size with Python TorchScript cannot compile; every other network here is scripted."""
    from brats_kd.networks import EncoderDecoder

    return isinstance(network, EncoderDecoder)


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


def fake_spatial_shape(shape, n: int = 1, p: int = 1, any_size: int = 1) -> tuple[int, ...]:
    """Concrete sizes for a metadata ``spatial_shape`` such as ``["32*n", "32*n", "32*n"]``, with the
    defaults of ``monai.bundle.verify_net_in_out`` (``n = p = any = 1``)."""
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

    ``network_def`` itself and, for an ensemble (``MeanEnsemble``), each member through its own
    ``<member>_data_format``.
    """
    meta = read_metadata(name)
    assert "network_data_format" in meta
    networks = {"network_def": ("network_data_format", "inference.json", "network_def")}
    for member in ensemble_members(name):
        networks[member] = (f"{member}_data_format", *network_for_format(name, f"{member}_data_format"))
    return networks


def ensemble_members(name: str) -> list[str]:
    """Member names when ``inference.json``'s ``network_def`` is a ``MeanEnsemble``, else ``[]``."""
    network_def = read_config(name, "inference.json").get("network_def", {})
    if isinstance(network_def, dict) and network_def.get("_target_", "").endswith("MeanEnsemble"):
        return list(network_def.get("members", {}))
    return []


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


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_verify_net_in_out_as_the_zoo_ci_calls_it(name):
    """``ci/verify_bundle.py``: ``verify_net_in_out(net_id="network_def", meta_file, config_file, bundle_root)``
    with the defaults (``n = p = any = 1``) and the configs' own network sizes."""
    from monai.bundle import verify_net_in_out

    root = bundle_path(name)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        bundle_root=str(root),
    )


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_ckpt_export_scripts_network_def_as_the_zoo_ci_calls_it(name, tmp_path):
    """``ci/verify_bundle.py``'s export check: ``ckpt_export`` of ``network_def`` to TorchScript, scripted
    (``use_trace=False``) where the network scripts; the encoder–decoder (``EncoderDecoder``, its
    ``forward`` checks input sizes with Python that TorchScript rejects) is traced, on its metadata's input."""
    from monai.bundle import ckpt_export

    root = bundle_path(name)
    meta_file, config_file = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
    network = bundle_config(root, "inference.json").get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save({"model": network.state_dict()}, ckpt)
    traced = needs_trace(network)
    fmt = read_metadata(name)["network_data_format"]
    shape = (1, fmt["inputs"]["image"]["num_channels"], *fake_spatial_shape(fmt["inputs"]["image"]["spatial_shape"]))
    extra = {"input_shape": list(shape)} if traced else {}
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(ckpt),
        meta_file=meta_file,
        config_file=config_file,
        bundle_root=str(root),
        key_in_ckpt="model",
        use_trace=traced,
        **extra,
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    assert isinstance(exported, torch.jit.ScriptModule)
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), network.eval()(x), rtol=1e-4, atol=1e-5)


def test_the_ensemble_network_is_the_mean_of_its_members_probabilities():
    """``network_def`` of the ensemble (what the zoo's tools and MONAI Label call) averages the members'
    sigmoid outputs, the same mean ``MeanEnsembled`` computes in evaluation."""
    network = bundle_config(bundle_path("ensemble"), "inference.json").get_parsed_content("network_def").eval()
    members = ensemble_members("ensemble")
    assert members and list(network.keys()) == members
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(network[m](x)) for m in members]).mean(0)
        torch.testing.assert_close(network(x), expected)


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
    members = ensemble_members(name)
    weights = [f"models/{m}/model.pt" for m in members] if members else ["models/model.pt"]
    for weight in weights:
        assert weight in paths, f"{name}: large_files.yml does not list {weight}"
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
