"""Networks of the ``ensemble`` bundle: the cascaded multi-encoder U-Net (``brats_kd/networks/cascade.py``),
the No New-Net U-Net with strided convolutions (``brats_kd/networks/strided_unet.py``) and MONAI's
residual U-Net as the bundle configures them.

The member snippets below are written the way the bundle's JSON configs spell them (lists,
not tuples), so they double as the reference for those configs.
"""


import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import BasicUNet, SegResNet

import brats_kd.networks.cascade as cascade

MEMBER_CONFIGS = {
    "unet": {
        "_target_": "brats_kd.networks.StridedUNet",
        "spatial_dims": 3,
        "in_channels": 4,
        "out_channels": 3,
        "features": [16, 32, 64, 128, 256, 16],
        "act": ["LeakyReLU", {"negative_slope": 0.01, "inplace": True}],
        "norm": ["instance", {"affine": True}],
        "upsample": "nontrainable",
    },
    "resunet": {
        "_target_": "SegResNet",
        "spatial_dims": 3,
        "in_channels": 4,
        "out_channels": 3,
        "init_filters": 16,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
        "norm": ["GROUP", {"num_groups": 8}],
        "act": "RELU",
    },
    "cascade": {
        "_target_": "brats_kd.networks.CascadedUNet",
        "in_channels": 4,
        "out_channels": 3,
        "features": [16, 32, 64, 128],
        "coarse_scale": 2,
    },
}

TINY = (4, 8, 16)  # three levels: cheap, yet a skip level, a middle level and a bottleneck


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _build(config: dict) -> torch.nn.Module:
    return ConfigParser({"net": config}).get_parsed_content("net")


def _tiny_cascade(**kwargs) -> torch.nn.Module:
    return cascade.CascadedUNet(in_channels=4, out_channels=3, features=TINY, **kwargs)


# ----------------------------------------------------------------------------------- members


@pytest.mark.parametrize("member", ["unet", "resunet", "cascade"])
def test_member_forward_backward_shapes(member):
    net = _build(MEMBER_CONFIGS[member])
    x = torch.randn(2, 4, 32, 32, 32)
    out = net(x)
    assert out.shape == (2, 3, 32, 32, 32)
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f"{member}: parameters without gradient: {missing}"
    if member == "cascade":
        # Every parameter of both networks must be reached by the fine loss, which also
        # proves the coarse network is trained through the fine one (no detach).
        dead = [name for name, p in net.named_parameters() if not p.grad.abs().sum() > 0]
        assert not dead, f"parameters with all-zero gradient: {dead}"


def test_cascade_bundle_config_builds_the_bundle_class():
    net = _build({**MEMBER_CONFIGS["cascade"], "features": [4, 8], "coarse_scale": 4})
    assert type(net).__name__ == "CascadedUNet" and type(net).__module__ == "brats_kd.networks.cascade"
    assert net.size_multiple == 8
    assert net(torch.randn(1, 4, 16, 8, 24)).shape == (1, 3, 16, 8, 24)


def test_unet_member_upsamples_trilinearly_after_halving_width():
    """``upsample="nontrainable"`` in BasicUNet = a 1x1 ``preconv`` halving the width (nnU-Net's
    "filter reduction before up-sampling"), then ``nn.Upsample`` in trilinear mode; the last
    decoder level keeps its width (``halves=False``) and so has no pre-conv."""
    net = _build(MEMBER_CONFIGS["unet"])
    for name, in_ch in (("upcat_4", 256), ("upcat_3", 128), ("upcat_2", 64)):
        up = getattr(net, name).upsample
        assert up.preconv.kernel_size == (1, 1, 1)
        assert (up.preconv.in_channels, up.preconv.out_channels) == (in_ch, in_ch // 2)
        assert up.upsample_non_trainable.mode == "trilinear"
    assert not hasattr(net.upcat_1.upsample, "preconv")
    assert net.upcat_1.upsample.upsample_non_trainable.mode == "trilinear"
    assert isinstance(net.conv_0.conv_0.adn.A, torch.nn.LeakyReLU)
    assert net.conv_0.conv_0.adn.A.negative_slope == 0.01
    assert isinstance(net, BasicUNet)


def test_unet_member_downsamples_with_strided_convolutions_not_max_pooling():
    """Lachinov et al. Fig. 1: "Instead of max pooling we use strided convolutions." Each encoder level's
    first 3x3x3 convolution has stride 2 (and instance norm + leaky ReLU after it); no pooling layer anywhere."""
    net = _build(MEMBER_CONFIGS["unet"])
    assert not [m for m in net.modules() if isinstance(m, (torch.nn.MaxPool3d, torch.nn.AvgPool3d))]
    widths = MEMBER_CONFIGS["unet"]["features"]
    for level in range(1, 5):
        down = getattr(net, f"down_{level}")
        first, second = down.convs.conv_0, down.convs.conv_1
        assert first.conv.stride == (2, 2, 2) and first.conv.kernel_size == (3, 3, 3)
        assert (first.conv.in_channels, first.conv.out_channels) == (widths[level - 1], widths[level])
        assert second.conv.stride == (1, 1, 1)
        assert isinstance(first.adn.N, torch.nn.InstanceNorm3d) and first.adn.A.negative_slope == 0.01
    x = torch.randn(1, 4, 32, 32, 32)
    sizes = []
    record = lambda module, inputs, output: sizes.append(tuple(output.shape[2:]))  # noqa: E731
    hooks = [getattr(net, f"down_{k}").register_forward_hook(record) for k in range(1, 5)]
    assert net(x).shape == (1, 3, 32, 32, 32)
    for hook in hooks:
        hook.remove()
    assert sizes == [(16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]


def test_strided_unet_scripts_and_names_sizes_it_cannot_take():
    net = _build({**MEMBER_CONFIGS["unet"], "features": [4, 4, 8, 8, 16, 4]}).eval()
    x = torch.randn(1, 4, 16, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 4, 24, 32, 32))


def test_resunet_member_is_segresnet_without_vae():
    net = _build(MEMBER_CONFIGS["resunet"])
    assert type(net) is SegResNet  # SegResNetVAE would add the VAE branch
    res_blocks = [sum(isinstance(m, ResBlock) for m in layer) for layer in net.down_layers]
    assert res_blocks == [1, 2, 2, 4]
    assert [sum(isinstance(m, ResBlock) for m in layer) for layer in net.up_layers] == [1, 1, 1]


# ------------------------------------------------------------------------------- max fusion


def test_max_fusion_hand_made_values_and_gradient_routing():
    a = torch.tensor([[1.0, 5.0], [-3.0, 0.0]], requires_grad=True)
    b = torch.tensor([[2.0, 4.0], [-4.0, -1.0]], requires_grad=True)
    c = torch.tensor([[0.0, 0.0], [-2.0, -7.0]], requires_grad=True)
    fused = cascade.MaxFusion()([a, b, c])
    torch.testing.assert_close(fused, torch.tensor([[2.0, 5.0], [-2.0, 0.0]]))  # mean/sum differ
    fused.sum().backward()
    # Only the winner at each position receives gradient (a mean gives 1/3 to all, a sum 1).
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(c.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_max_fusion_rejects_empty_and_mismatched_inputs():
    with pytest.raises(ValueError, match="at least one"):
        cascade.MaxFusion()([])
    with pytest.raises(ValueError, match="one shape"):
        cascade.MaxFusion()([torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)])


def _output_with_last_encoder_lowered(net, x, where: str) -> tuple[torch.Tensor, float]:
    """Run ``net`` with the last modality encoder's features lowered by 5, either only where
    they are *not* the maximum over modalities or only where they are the strict maximum.
    Returns the output and the fraction of feature values that were changed."""
    others: list[list[torch.Tensor]] = []
    changed = []

    def record(module, args, output):
        others.append(output)

    def lower(module, args, output):
        lowered = []
        for level, feat in enumerate(output):
            best_other = torch.stack([o[level] for o in others]).amax(0)
            mask = feat < best_other if where == "not_max" else feat > best_other
            changed.append(mask.float().mean().item())
            lowered.append(torch.where(mask, feat - 5.0, feat))
        return lowered

    handles = [enc.register_forward_hook(record) for enc in net.encoders[:-1]]
    handles.append(net.encoders[-1].register_forward_hook(lower))
    try:
        out = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, min(changed)


def test_fusion_in_network_ignores_a_modality_except_where_it_is_the_max():
    """End-to-end: lowering one modality's encoder features where another modality wins
    leaves the network output unchanged; lowering them where they win changes it.
    With a mean or a sum fusion the first output would change too."""
    net = cascade.MultiEncoderUNet(3, num_modalities=4, out_channels=3, features=TINY).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        reference = net(x)
        unchanged, frac_not_max = _output_with_last_encoder_lowered(net, x, "not_max")
        changed, frac_max = _output_with_last_encoder_lowered(net, x, "max")
    assert frac_not_max > 0.1 and frac_max > 0.01, "the test case must exercise both branches"
    torch.testing.assert_close(unchanged, reference, rtol=0, atol=1e-6)
    assert (changed - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- cascade


def test_coarse_logits_enter_the_fine_network_and_only_as_context_channels():
    net = _tiny_cascade().eval()
    x = torch.randn(1, 4, 16, 16, 16)
    seen = {}
    hooks = [
        net.coarse.register_forward_pre_hook(lambda m, args: seen.update(coarse_in=args[0].shape)),
        net.fine.register_forward_pre_hook(lambda m, args: seen.update(context=args[1])),
    ]
    with torch.no_grad():
        fine, coarse = net.forward_with_coarse(x)
        torch.testing.assert_close(net(x), fine)
    for h in hooks:
        h.remove()
    assert seen["coarse_in"] == (1, 4, 8, 8, 8)  # the coarse network runs at half resolution
    assert coarse.shape == fine.shape == (1, 3, 16, 16, 16)
    torch.testing.assert_close(seen["context"], coarse)
    assert all(enc.stem.conv.in_channels == 1 + 3 for enc in net.fine.encoders)
    assert all(enc.stem.conv.in_channels == 1 for enc in net.coarse.encoders)

    coarse_last = net.coarse.head[-1].conv
    with torch.no_grad():
        coarse_last.weight.add_(0.5)
        assert (net(x) - fine).abs().max() > 1e-3, "changing the coarse network must change the output"
        # Cutting the context weights of the fine stems makes the output blind to the coarse net.
        for enc in net.fine.encoders:
            enc.stem.conv.weight[:, 1:] = 0
        blind = net(x)
        coarse_last.weight.sub_(0.5)
        torch.testing.assert_close(net(x), blind)


def test_each_modality_has_its_own_encoder():
    net = _tiny_cascade()
    for stage in (net.coarse, net.fine):
        assert len(stage.encoders) == 4
        storages = [{p.data_ptr() for p in enc.parameters()} for enc in stage.encoders]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not storages[i] & storages[j], f"encoders {i} and {j} share parameters"

    # Perturbing modality 2 changes the features of fine encoder 2 only.
    x = torch.randn(1, 4, 16, 16, 16)
    context = torch.randn(1, 3, 16, 16, 16)
    x_perturbed = x.clone()
    x_perturbed[:, 2] += torch.randn(16, 16, 16)
    features = {}
    hooks = [
        enc.register_forward_hook(lambda m, a, out, i=i: features.setdefault(i, []).append(out))
        for i, enc in enumerate(net.fine.encoders)
    ]
    with torch.no_grad():
        net.fine(x, context)
        net.fine(x_perturbed, context)
    for h in hooks:
        h.remove()
    for m, (before, after) in features.items():
        differs = any(not torch.equal(b, a) for b, a in zip(before, after))
        assert differs == (m == 2), f"encoder {m}: features {'changed' if differs else 'unchanged'}"

    # Every modality influences the cascade's output.
    x.requires_grad_(True)
    net(x).square().mean().backward()
    per_modality = x.grad.abs().flatten(2).sum(-1)[0]
    assert (per_modality > 0).all(), f"gradient per modality: {per_modality.tolist()}"


def test_fine_bottleneck_is_hookable():
    net = _tiny_cascade().eval()
    captured = []
    handle = net.fine.bottleneck.register_forward_hook(lambda m, a, out: captured.append(out.shape))
    with torch.no_grad():
        net(torch.randn(2, 4, 16, 24, 32))
    handle.remove()
    assert captured == [(2, TINY[-1], 4, 6, 8)]


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"coarse_scale": 1}, (1, 4, 8, 8, 8)),
        ({"coarse_scale": 3}, (1, 4, 12, 24, 12)),
        ({"spatial_dims": 2, "features": (4, 8, 16, 32)}, (2, 4, 32, 48)),
    ],
)
def test_cascade_variants_keep_input_size(kwargs, shape):
    net = cascade.CascadedUNet(**{"features": TINY, **kwargs})
    assert net(torch.randn(*shape)).shape == (shape[0], 3, *shape[2:])


def test_torchscript_matches_eager():
    """``ckpt_export`` scripts the network; the scripted copy must give the same logits."""
    net = _tiny_cascade().eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))


# ------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 4, 36, 32, 32), r"divisible by .* = 16, got spatial size \[36, 32, 32\]"),
        ((1, 4, 32, 32, 24), r"= 16, got spatial size \[32, 32, 24\]"),
        ((1, 3, 32, 32, 32), "expects 4 input channels"),
        ((4, 32, 32, 32), "3 spatial dims"),
    ],
)
def test_bad_input_raises_clear_value_error(shape, message):
    net = cascade.CascadedUNet(features=(4, 8, 16, 32))
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ({"in_channels": -2}, "in_channels must be a positive integer"),
        ({"in_channels": True}, "in_channels must be a positive integer"),
        ({"out_channels": 0}, "out_channels must be a positive integer"),
        ({"features": (16,)}, "at least two levels"),
        ({"features": (16, 0)}, r"features\[1\] must be a positive integer"),
        ({"features": 16}, "sequence of positive integers"),
        ({"coarse_scale": 0}, "coarse_scale must be a positive integer"),
        ({"coarse_scale": 1.5}, "coarse_scale must be a positive integer"),
        ({"spatial_dims": 4}, "spatial_dims must be 1, 2 or 3"),
    ],
)
def test_bad_arguments_raise_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cascade.CascadedUNet(**kwargs)


def test_stage_checks_context_and_spatial_size():
    stage = cascade.MultiEncoderUNet(3, num_modalities=2, out_channels=1, features=(2, 4), context_channels=1)
    with pytest.raises(ValueError, match="context is missing"):
        stage(torch.zeros(1, 2, 8, 8, 8))
    plain = cascade.MultiEncoderUNet(3, num_modalities=2, out_channels=1, features=(2, 4))
    with pytest.raises(ValueError, match="not used"):
        plain(torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"divisible by 2 \*\* \(levels - 1\) = 2, got spatial size \[8, 7, 8\]"):
        plain(torch.zeros(1, 2, 8, 7, 8))
