"""The members' and the omni-student's training losses as the bundles configure them, against hand computations:
the two Dice forms (Lachinov et al. §2.1), and the residual U-Net member's VAE-regularised loss
(Myronenko 2018 §2.3: L = L_dice + 0.1 · L_L2 + 0.1 · L_KL) with its inference network free of the branch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet

from brats_kd.vae import VAE_MODULES, SegmentationWeights, SegResNetVAETerms, VAERegularisedLoss, kl_divergence_term
from tests.bundle_runner import BUNDLES, bundle_config

ENSEMBLE = BUNDLES / "ensemble"
OMNI = BUNDLES / "omni_student"
SMOOTH = 1e-5  # smooth_nr = smooth_dr of the bundles' DiceFocalLoss
RESUNET = ["train.json", "member_resunet.json"]
TINY = {"roi_size": [16, 16, 16], "resunet_init_filters": 8, "unet_features": [4, 4, 8, 8, 16, 4], "cascade_features": [4, 8]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hand_dice_bce(logits: torch.Tensor, target: torch.Tensor, squared: bool) -> torch.Tensor:
    """Mean over cases and regions of 1 − (2 Σpg + s) / (Σp² + Σg² + s) (or Σp + Σg), plus the mean binary cross-entropy."""
    p = torch.sigmoid(logits.double())
    g = target.double()
    dims = tuple(range(2, p.dim()))
    intersection = (p * g).sum(dims)
    denominator = (p**2).sum(dims) + (g**2).sum(dims) if squared else p.sum(dims) + g.sum(dims)
    dice = (1 - (2 * intersection + SMOOTH) / (denominator + SMOOTH)).mean()
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()
    return dice + bce


def batch(shape=(2, 3, 16, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(shape) * 2
    target = (torch.rand(shape) > 0.6).float()
    return logits, target


# --------------------------------------------------------------------------------------------- Dice forms


MEMBER_AND_STUDENT_CONFIGS = [
    (ENSEMBLE, ["train.json", "member_unet.json"]),
    (ENSEMBLE, ["train.json", "member_cascade.json"]),
    (OMNI, ["train.json"]),
]


@pytest.mark.parametrize("bundle, configs", MEMBER_AND_STUDENT_CONFIGS)
def test_default_loss_is_dice_with_squared_denominators_plus_bce(bundle, configs):
    loss = bundle_config(bundle, configs).get_parsed_content("loss")
    logits, target = batch()
    expected = hand_dice_bce(logits, target, squared=True)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)
    # the two forms differ on soft predictions, so the test tells them apart
    assert abs(float(hand_dice_bce(logits, target, squared=False) - expected)) > 1e-2


@pytest.mark.parametrize("value", [False, "false"])  # a command-line `--dice_squared false` arrives as a string
@pytest.mark.parametrize("bundle, configs", [(ENSEMBLE, ["train.json", "member_unet.json"]), (OMNI, ["train.json"])])
def test_dice_squared_false_selects_the_plain_dice(bundle, configs, value):
    loss = bundle_config(bundle, configs, dice_squared=value).get_parsed_content("loss")
    logits, target = batch()
    torch.testing.assert_close(loss(logits, target).double(), hand_dice_bce(logits, target, squared=False), rtol=1e-5, atol=1e-6)


def test_squared_dice_by_hand_on_four_voxels():
    """p = sigmoid(logits) = (0.5, 0.5, 0.5, 0.5), g = (1, 1, 0, 0): squared 1 − 2·1/(1 + 2) = 1/3, plain 1 − 2·1/(2 + 2) = 1/2
    (no smoothing difference at this precision); BCE = log 2."""
    logits, target = torch.zeros(1, 1, 4), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    for squared, dice in ((True, 1 / 3), (False, 1 / 2)):
        loss = bundle_config(ENSEMBLE, ["train.json", "member_unet.json"], dice_squared=squared).get_parsed_content("loss")
        torch.testing.assert_close(float(loss(logits, target)), dice + float(torch.log(torch.tensor(2.0))), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- VAE regulariser


def test_kl_term_is_twice_the_gaussian_kl_over_the_voxel_count():
    """Myronenko's L_KL = 1/N Σ (μ² + σ² − log σ² − 1) is 2/N × KL(N(μ, σ²) ‖ N(0, 1)) summed over the latent."""
    mu, sigma = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64) + 0.1
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_divergence_term(mu, sigma, 1000), 2 * kl.sum(1).mean() / 1000, rtol=1e-6, atol=1e-9)


def test_resunet_member_training_loss_is_dice_bce_plus_tenth_l2_plus_tenth_kl_by_hand():
    """The bundle's resunet member (train.json + member_resunet.json): on a fixed batch the training loss
    equals Dice + BCE + 0.1 · mean((x − x̂)²) + 0.1 · Σ(μ² + σ² − log σ² − 1) / N, each term computed here
    from the branch's own μ, σ and reconstruction (captured with hooks)."""
    parser = bundle_config(ENSEMBLE, RESUNET, **TINY)
    net = parser.get_parsed_content("network").train()
    loss = parser.get_parsed_content("loss")
    assert isinstance(net, SegResNetVAETerms) and isinstance(loss, VAERegularisedLoss)
    captured = {}
    hooks = [
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().double()))
        for name in ("vae_fc1", "vae_fc2", "vae_conv_final")
    ]
    x = torch.randn(2, 4, 16, 16, 16)
    target = (torch.rand(2, 3, 16, 16, 16) > 0.6).float()
    pred = net(x)
    total = loss(pred, target)
    for hook in hooks:
        hook.remove()
    logits = pred[0]
    mu, sigma = captured["vae_fc1"], F.softplus(captured["vae_fc2"])
    n_voxels = 4 * 16**3
    l2 = ((captured["vae_conv_final"] - x.double()) ** 2).mean()
    kl = (mu**2 + sigma**2 - torch.log(sigma**2) - 1).sum(1).mean() / n_voxels
    expected = hand_dice_bce(logits.detach(), target, squared=True) + 0.1 * l2 + 0.1 * kl
    torch.testing.assert_close(total.detach().double(), expected, rtol=1e-5, atol=1e-6)
    # both terms large enough here that a wrong weight (or a missing term) moves the total far beyond the tolerance
    assert float(l2) > 0.1 and float(kl) > 1e-3
    total.backward()
    assert net.vae_fc1.weight.grad is not None and net.vae_up_layers[0][0].conv1.conv.weight.grad.abs().sum() > 0


def test_vae_decoder_has_its_own_blocks_and_evaluation_returns_logits_only():
    net = bundle_config(ENSEMBLE, RESUNET, **TINY).get_parsed_content("network")
    assert net.vae_up_layers is not net.up_layers and net.vae_up_samples is not net.up_samples
    shared = {id(p) for p in net.up_layers.parameters()} & {id(p) for p in net.vae_up_layers.parameters()}
    assert not shared, "Myronenko's VAE decoder has its own weights, not the segmentation decoder's"
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 4, 32, 48, 16))  # any size divisible by 8: the branch is not run
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 48, 16)
    with pytest.raises(ValueError, match="input_image_size"):
        net.train()(torch.randn(1, 4, 32, 32, 32))  # a training patch other than roi_size: a clear error


def test_vae_loss_rejects_a_plain_tensor_and_negative_weights():
    loss = VAERegularisedLoss(torch.nn.MSELoss())
    with pytest.raises(ValueError, match="training output"):
        loss(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        VAERegularisedLoss(torch.nn.MSELoss(), l2_weight=-1)


def test_inference_weights_have_no_vae_keys_and_load_strictly_into_the_plain_segresnet():
    parser = bundle_config(ENSEMBLE, RESUNET, **TINY)
    trained = parser.get_parsed_content("network")
    weights = parser.get_parsed_content("inference_weights")
    assert isinstance(weights, SegmentationWeights)
    state = weights.state_dict()
    assert not [k for k in state if k.startswith("vae_")]
    assert {k.split(".", 1)[0] for k in trained.state_dict()} - {k.split(".", 1)[0] for k in state} == set(VAE_MODULES)
    plain = parser.get_parsed_content("network_def")
    assert type(plain) is SegResNet
    plain.load_state_dict(state, strict=True)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), trained.eval()(x))
    # and back: model.pt's weights go into the training network (the branch keeps its own), VAE keys refused
    SegmentationWeights(trained).load_state_dict(state)
    with pytest.raises(ValueError, match="VAE"):
        SegmentationWeights(trained).load_state_dict(trained.state_dict())


def test_unet_and_cascade_train_and_save_their_inference_network():
    for member in ("unet", "cascade"):
        parser = bundle_config(ENSEMBLE, ["train.json", f"member_{member}.json"], **TINY)
        assert parser.get_parsed_content("train_net_def") is parser.get_parsed_content("network_def")
        assert parser.get_parsed_content("inference_weights") is parser.get_parsed_content("network")


def test_resunet_evaluation_runs_the_network_without_vae_branch():
    parser = bundle_config(ENSEMBLE, RESUNET + ["evaluate.json"], **TINY)
    network = parser.get_parsed_content("network")
    assert type(network) is SegResNet and not any(name.startswith("vae_") for name, _ in network.named_modules())


def test_verify_net_in_out_passes_for_the_resunet_inference_network():
    """The zoo CI's call (defaults n = p = any = 1) on the resunet member's ``network_def``."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(ENSEMBLE / "configs" / "metadata.json"),
        config_file=[str(ENSEMBLE / "configs" / c) for c in RESUNET],
        bundle_root=str(ENSEMBLE),
    )
