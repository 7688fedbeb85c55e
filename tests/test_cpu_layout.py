"""The CPU speed settings of the bundles (docs/performance.md): channels-last training networks, two
validation cases per network call, four sliding windows per call. What is asserted is what a wrong
setting would break: the layout of the weights the trainer steps, equal outputs and interchangeable
checkpoints across layouts, and the batch sizes the configs resolve to."""

from __future__ import annotations

import pytest
import torch

from brats_kd.device import channels_last
from brats_kd.networks import EncoderDecoder
from tests.bundle_runner import TINY, bundle_config
from tests.test_gpu_path import ENSEMBLE_TINY, OMNI_TINY


def conv_weights(network: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in network.parameters() if p.dim() == 5]


def test_channels_last_changes_the_layout_not_the_function_and_checkpoints_move_between_layouts():
    torch.manual_seed(0)
    plain = EncoderDecoder(2, 3, (4, 8, 16), skip_connections=2)
    fast = EncoderDecoder(2, 3, (4, 8, 16), skip_connections=2)
    fast.load_state_dict(plain.state_dict())
    assert channels_last(fast) is fast
    weights = conv_weights(fast)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert not all(w.is_contiguous() for w in weights), "the 3x3x3 kernels' layout changed (1x1x1 ones read the same)"
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    # a model.pt written from the channels-last network loads strictly into a contiguous one, same numbers
    reloaded = EncoderDecoder(2, 3, (4, 8, 16), skip_connections=2)
    reloaded.load_state_dict(fast.state_dict())
    assert all(w.is_contiguous() for w in conv_weights(reloaded))
    for (name, a), b in zip(fast.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("enabled", [False, "false"])
def test_channels_last_off_leaves_the_network_contiguous(enabled):
    network = channels_last(EncoderDecoder(1, 3, (4, 8), skip_connections=1), enabled)
    assert all(w.is_contiguous() for w in conv_weights(network))


def test_a_2d_network_is_returned_unchanged():
    network = EncoderDecoder(1, 3, (4, 8), skip_connections=1, spatial_dims=2)
    assert channels_last(network) is network and all(p.is_contiguous() for p in network.parameters())


@pytest.mark.parametrize("bundle, configs, overrides", [
    ("teacher", ["train.json"], TINY),
    ("kd_student", ["train.json"], TINY),
    ("omni_student", ["train.json"], OMNI_TINY),
    ("ensemble", ["train.json", "member_unet.json"], ENSEMBLE_TINY),
    ("ensemble", ["train.json", "member_resunet.json"], ENSEMBLE_TINY),
])
def test_every_training_network_is_channels_last_and_validation_batches_several_samples(bundle, configs, overrides,
                                                                                         datalist):
    overrides = dict(overrides, datalist=str(datalist))
    parser = bundle_config(bundle, configs, **overrides)
    network = parser.get_parsed_content("network")
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights(network))
    if bundle in ("teacher", "kd_student"):
        assert parser.get_parsed_content("validate#dataloader").batch_size == 2
    else:
        assert parser.get_parsed_content("validate#inferer").sw_batch_size == 4
        assert bundle_config(bundle, ["inference.json"]).get_parsed_content("inferer").sw_batch_size == 4
    if bundle == "kd_student":
        teacher = parser.get_parsed_content("train#frozen_teacher").network
        assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights(teacher))
    parser = bundle_config(bundle, configs, **overrides, channels_last=False)
    assert all(w.is_contiguous() for w in conv_weights(parser.get_parsed_content("network")))
