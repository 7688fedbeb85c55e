"""TorchScript (``monai.bundle ckpt_export``) and ONNX (``monai.bundle onnx_export``) exports of every
bundle's inference network(s) give the PyTorch model's outputs.

Each network is built from the bundle's ``inference.json`` with small sizes where the config has them
(a randomly initialised model saved as ``{"model": state_dict}``, the bundles' checkpoint format),
exported through MONAI's bundle API and run again: TorchScript on the export shape and on a larger
one (the traced graph must not freeze the input size), ONNX with onnxruntime on the export shape.

TorchScript is MONAI's default ``torch.jit.script`` where the network allows it; the encoder-decoder
of teacher/kd_student is not scriptable (its input-size check builds a tuple from ``x.shape``), so it
is traced (``use_trace``): its control flow depends on its configuration only, and the traced graph
is checked at a second input size too.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.bundle_runner import bundle_config
from tests.test_zoo_conformance import (
    BUNDLE_NAMES,
    bundle_path,
    fake_spatial_shape,
    inference_networks,
    needs_trace,
    read_metadata,
)

pytestmark = pytest.mark.slow

#: small widths for the networks, applied only where a bundle's config has the key: exports compare outputs,
#: which does not depend on the width (tests/test_zoo_conformance.py checks the configs' own sizes)
SMALL_NETWORKS = {
    "filters": [4, 8, 16, 32, 64],
    "teacher_filters": [4, 8, 16, 32, 64],
    "init_filters": 8,
    "resunet_init_filters": 8,
    "unet_features": [4, 4, 8, 8, 16, 4],
    "cascade_features": [4, 8],
}

TS_ATOL = 1e-5
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-4


def _cases():
    return [
        pytest.param(name, label, id=f"{name}-{label}")
        for name in BUNDLE_NAMES
        if (bundle_path(name) / "configs" / "inference.json").is_file()
        for label in inference_networks(name)
    ]


def export(
    name: str, label: str, out_dir, dynamo: bool = False, dynamic_axes: bool = False, torchscript: bool = True
) -> tuple[torch.nn.Module, dict, list[int]]:
    """Build, save and export one inference network; (PyTorch network, its data format, export input shape)."""
    from monai.bundle import ckpt_export, onnx_export

    format_key, config, net_id = inference_networks(name)[label]
    root = bundle_path(name)
    content = bundle_config(root, config).get()
    overrides = {k: v for k, v in SMALL_NETWORKS.items() if k in content}
    fmt = read_metadata(name)[format_key]
    image = fmt["inputs"]["image"]
    input_shape = [1, image["num_channels"], *fake_spatial_shape(image["spatial_shape"])]
    common = dict(
        net_id=net_id,
        ckpt_file=str(out_dir / "model.pt"),
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / config),
        key_in_ckpt="model",
        input_shape=input_shape,
        bundle_root=str(root),
        **overrides,
    )
    torch.manual_seed(0)
    network = bundle_config(root, config, **overrides).get_parsed_content(net_id).eval()
    torch.save({"model": network.state_dict()}, out_dir / "model.pt")
    if torchscript:  # MONAI's default torch.jit.script (any input size); the encoder-decoder is traced, explicitly
        ckpt_export(filepath=str(out_dir / "model.ts"), use_trace=needs_trace(network), **common)
    onnx_export(
        filepath=str(out_dir / "model.onnx"),
        use_trace=True,
        converter_kwargs=onnx_converter_kwargs(dynamo, dynamic_axes),
        **common,
    )
    return network, fmt, input_shape


def onnx_converter_kwargs(dynamo: bool, dynamic_axes: bool = False) -> dict:
    """``convert_to_onnx`` arguments: tensors named ``image`` and ``pred``.

    ``dynamo=False`` selects torch's TorchScript-based ONNX exporter: it handles every network here
    (the dynamo exporter has no ONNX translation of ``adaptive_avg_pool3d``, used by the ensemble's
    cascade) and exports in about a second instead of tens of seconds on CPU. ``dynamic_axes`` frees
    the batch and spatial sizes (not possible for the cascade, whose adaptive pooling needs them).
    """
    kwargs = {"input_names": ["image"], "output_names": ["pred"], "dynamo": dynamo}
    if dynamic_axes:
        axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
        kwargs["dynamic_axes"] = {"image": axes, "pred": axes}
    return kwargs


@pytest.mark.parametrize("name, label", _cases())
def test_torchscript_and_onnx_exports_match_pytorch(name, label, tmp_path):
    from monai.data import load_net_with_metadata

    network, fmt, input_shape = export(name, label, tmp_path)
    out_channels = fmt["outputs"]["pred"]["num_channels"]

    # TorchScript: the bundle's metadata and config travel inside the file
    scripted, meta, extra = load_net_with_metadata(str(tmp_path / "model.ts"), more_extra_files=("inference.json",))
    assert meta["version"] == read_metadata(name)["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    larger = [*input_shape[:2], *fake_spatial_shape(fmt["inputs"]["image"]["spatial_shape"], n=2)]  # the next valid size
    for shape in (input_shape, larger):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, got = network(x), scripted(x)
        assert got.shape == expected.shape == (shape[0], out_channels, *shape[2:])
        torch.testing.assert_close(got, expected, rtol=0, atol=TS_ATOL)

    # ONNX in onnxruntime, at the (static) export shape
    assert_onnx_matches(tmp_path / "model.onnx", network, input_shape)


def assert_onnx_matches(path, network: torch.nn.Module, shape) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {onnx_input.name: x.numpy()})
    with torch.no_grad():
        expected = network(x)
    assert got.shape == tuple(expected.shape)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=ONNX_RTOL, atol=ONNX_ATOL)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "dynamic-axes"])
def test_kd_student_onnx_with_the_dynamo_exporter_and_with_dynamic_axes(dynamo, tmp_path):
    """torch's default (dynamo) ONNX exporter, and a TorchScript-based export whose sizes are free."""
    network, _, input_shape = export(
        "kd_student", "network_def", tmp_path, dynamo=dynamo, dynamic_axes=not dynamo, torchscript=False
    )
    shapes = [input_shape] if dynamo else [input_shape, [2, input_shape[1], 48, 64, 32]]
    for shape in shapes:
        assert_onnx_matches(tmp_path / "model.onnx", network, shape)
