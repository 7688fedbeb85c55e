"""Distillation methods beside KD-Net (issue 15 item 3): each loss against a hand computation (explicit
loops over tiny arrays, in numpy), their composition in KDNetObjective, the features the trainer and the
frozen teacher hook, and the method_*.json overrides of kd_student.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Events

import brats_kd.losses as losses
import brats_kd.teacher as teacher_mod
import brats_kd.trainer as trainer_mod
from brats_kd.distillation import FeatureDistillationLoss, FeatureHooks, HintonKDLoss, PrototypeKDLoss
from brats_kd.networks import EncoderDecoder
from tests.bundle_runner import BUNDLES, TINY, bundle_config

STUDENT = BUNDLES / "kd_student"


def _logits(seed: int, shape=(2, 4, 2, 2, 1), scale=3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------
# Hinton


def _hand_kl_softmax(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """mean over samples and voxels of sum_c q_c log(q_c / p_c), q = softmax(t / T), p = softmax(s / T)."""
    B, C = s.shape[:2]
    total, count = 0.0, 0
    for b in range(B):
        for idx in np.ndindex(*s.shape[2:]):
            zs = [s[(b, c, *idx)] / T for c in range(C)]
            zt = [t[(b, c, *idx)] / T for c in range(C)]
            p = [math.exp(z) / sum(math.exp(w) for w in zs) for z in zs]
            q = [math.exp(z) / sum(math.exp(w) for w in zt) for z in zt]
            total += sum(q[c] * math.log(q[c] / p[c]) for c in range(C))
            count += 1
    return total / count


def _hand_kl_bernoulli(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """mean over every (sample, region, voxel) of the KL between Bernoulli(sigmoid(t/T)) and Bernoulli(sigmoid(s/T))."""
    values = []
    for index in np.ndindex(*s.shape):
        q = 1 / (1 + math.exp(-t[index] / T))
        p = 1 / (1 + math.exp(-s[index] / T))
        values.append(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
    return sum(values) / len(values)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_hinton_softmax_is_t_squared_times_the_per_voxel_kl(T):
    s, t = _logits(0), _logits(1)
    got = HintonKDLoss(T, activation="softmax")(s, t).item()
    assert got == pytest.approx(T * T * _hand_kl_softmax(s.numpy(), t.numpy(), T), rel=1e-6)
    plain = HintonKDLoss(T, temperature_squared=False, activation="softmax")(s, t).item()
    assert plain == pytest.approx(_hand_kl_softmax(s.numpy(), t.numpy(), T), rel=1e-6)


def test_hinton_sigmoid_is_the_kl_of_each_regions_bernoulli_pair():
    s, t = _logits(2, (2, 3, 2, 1, 2)), _logits(3, (2, 3, 2, 1, 2))
    got = HintonKDLoss(4.0, activation="sigmoid")(s, t).item()
    assert got == pytest.approx(16.0 * _hand_kl_bernoulli(s.numpy(), t.numpy(), 4.0), rel=1e-6)


def test_hinton_gradient_reaches_the_student_only_and_vanishes_at_the_teacher():
    s, t = _logits(4).requires_grad_(), _logits(5).requires_grad_()
    HintonKDLoss(2.0, activation="softmax")(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    same = t.detach().clone()
    assert HintonKDLoss(2.0, activation="softmax")(same, t.detach()).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        HintonKDLoss(2.0)(s[:, :3], t)


# ---------------------------------------------------------------------------------------------
# ProtoKD


def _hand_prototype_loss(fs: np.ndarray, ft: np.ndarray, classes: np.ndarray, eps=1e-5) -> float:
    """ProtoKD's L_proto with loops: masked-mean prototypes per sample and class present in every sample,
    cosine of every voxel to every prototype, mean squared difference of the teacher's and student's maps."""
    B, D = fs.shape[:2]
    voxels = list(np.ndindex(*fs.shape[2:]))
    present = [k for k in range(4) if all(any(classes[b][v] == k for v in voxels) for b in range(B))]
    diffs = []
    for b in range(B):
        for k in present:
            maps = []
            for f in (fs, ft):
                members = [v for v in voxels if classes[b][v] == k]
                proto = [sum(f[(b, d, *v)] for v in members) / (len(members) + eps) for d in range(D)]
                row = []
                for v in voxels:
                    x = [f[(b, d, *v)] for d in range(D)]
                    dot = sum(a * c for a, c in zip(x, proto))
                    norms = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(c * c for c in proto))
                    row.append(dot / max(norms, eps))
                maps.append(row)
            diffs += [(a - c) ** 2 for a, c in zip(*maps)]
    return sum(diffs) / len(diffs)


def _regions(classes: np.ndarray) -> torch.Tensor:
    """TC/WT/ET channels [B, 3, ...] of class indices [B, ...] (1 necrosis, 2 edema, 3 enhancing)."""
    c = torch.as_tensor(classes)
    return torch.stack([(c == 1) | (c == 3), c > 0, c == 3], dim=1).double()


def test_prototype_loss_matches_the_hand_computation_and_skips_a_class_missing_from_a_sample():
    # sample 0 has classes 0, 1, 2, 3; sample 1 has 0, 2, 3 -> necrosis (1) is not in every sample: skipped
    classes = np.array([[[[0], [1]], [[2], [3]], [[2], [0]]], [[[0], [2]], [[3], [3]], [[0], [2]]]])  # [B=2, 3, 2, 1]
    fs, ft = _logits(6, (2, 3, 3, 2, 1), 1.0), _logits(7, (2, 3, 3, 2, 1), 1.0)
    got = PrototypeKDLoss()(fs, ft, _regions(classes)).item()
    expected = _hand_prototype_loss(fs.numpy(), ft.numpy(), classes)
    assert got == pytest.approx(expected, rel=1e-6)
    # with class 1 in both samples the loss changes (it is no longer skipped)
    classes2 = classes.copy()
    classes2[1, 0, 0, 0] = 1
    with_one = PrototypeKDLoss()(fs, ft, _regions(classes2)).item()
    assert with_one == pytest.approx(_hand_prototype_loss(fs.numpy(), ft.numpy(), classes2), rel=1e-6)
    assert with_one != pytest.approx(got, rel=1e-3)


def test_prototype_loss_is_zero_for_the_teachers_own_features_and_reads_a_coarser_grid():
    classes = np.array([[[[0, 0], [1, 1]], [[2, 2], [3, 3]]]])  # [1, 2, 2, 2]
    ft = _logits(8, (1, 3, 2, 2, 2), 1.0)
    assert PrototypeKDLoss()(ft.clone(), ft, _regions(classes)).item() == pytest.approx(0.0, abs=1e-12)
    # a label at twice the feature resolution is taken by nearest neighbour (every other voxel)
    fine = np.repeat(np.repeat(np.repeat(classes, 2, axis=1), 2, axis=2), 2, axis=3)
    fs = _logits(9, (1, 3, 2, 2, 2), 1.0)
    coarse = PrototypeKDLoss()(fs, ft, _regions(fine)).item()
    assert coarse == pytest.approx(_hand_prototype_loss(fs.numpy(), ft.numpy(), classes), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# feature distillation


def test_feature_loss_is_the_mean_over_levels_of_each_levels_mse():
    fs = {"a": _logits(10, (2, 2, 2, 2, 2)), "b": _logits(11, (2, 4, 1, 1, 1))}
    ft = {"a": _logits(12, (2, 2, 2, 2, 2)), "b": _logits(13, (2, 4, 1, 1, 1))}
    expected = []
    for level in ("a", "b"):
        s, t = fs[level].numpy(), ft[level].numpy()
        expected.append(sum((s[i] - t[i]) ** 2 for i in np.ndindex(*s.shape)) / s.size)
    got = FeatureDistillationLoss(["a", "b"])(fs, ft).item()
    assert got == pytest.approx(sum(expected) / 2, rel=1e-6)
    with pytest.raises(KeyError, match=r"\['c'\]"):
        FeatureDistillationLoss(["a", "c"])(fs, ft)


# ---------------------------------------------------------------------------------------------
# the objective


def _gt(logits, label):
    return ((torch.sigmoid(logits) - label) ** 2).mean()


def test_objective_adds_the_method_terms_with_their_weights_and_keeps_kd_net_unchanged():
    s, t, label = _logits(14, (2, 3, 2, 2, 2)), _logits(15, (2, 3, 2, 2, 2)), (_logits(16, (2, 3, 2, 2, 2)) > 0).double()
    feats_s = {"decoder.0": _logits(17, (2, 2, 2, 2, 2)), "decoder.1": _logits(18, (2, 2, 2, 2, 2))}
    feats_t = {"decoder.0": _logits(19, (2, 2, 2, 2, 2)), "decoder.1": _logits(20, (2, 2, 2, 2, 2))}
    hinton, proto, feat = HintonKDLoss(4.0), PrototypeKDLoss(), FeatureDistillationLoss(["decoder.0", "decoder.1"])
    objective = losses.KDNetObjective(
        _gt, None, None, lambda_kd=0.0, alpha_kl=0.0, logit_loss=hinton, beta_logit=2.0, prototype_loss=proto,
        beta_prototype=0.5, prototype_level="decoder.1", feature_loss=feat, beta_feature=3.0,
    )
    assert objective.feature_levels == ["decoder.1", "decoder.0"] and objective.needs_teacher_logits
    terms = objective(s, label, teacher_logits=t, student_features=feats_s, teacher_features=feats_t)
    expected = {
        "loss_gt": _gt(s, label).item(),
        "loss_logit": hinton(s, t).item(),
        "loss_proto": proto(feats_s["decoder.1"], feats_t["decoder.1"], label).item(),
        "loss_feat": feat(feats_s, feats_t).item(),
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-6)
    total = expected["loss_gt"] + 2.0 * expected["loss_logit"] + 0.5 * expected["loss_proto"] + 3.0 * expected["loss_feat"]
    assert terms["loss"].item() == pytest.approx(total, rel=1e-6)
    with pytest.raises(ValueError, match="student_features"):
        objective(s, label, teacher_logits=t, teacher_features=feats_t)

    kd_net = losses.KDNetObjective(_gt, losses.KDLoss(5.0), None, lambda_kd=0.75, alpha_kl=0.0, logit_loss=hinton)
    assert kd_net.feature_levels == [] and set(kd_net(s, label, teacher_logits=t)) == {"loss", "loss_gt", "loss_kd", "loss_kl"}


def test_objective_refuses_a_method_without_its_loss_or_levels():
    with pytest.raises(TypeError, match="logit_loss"):
        losses.KDNetObjective(_gt, None, None, lambda_kd=0.0, alpha_kl=0.0, beta_logit=1.0)
    with pytest.raises(ValueError, match="prototype_level"):
        losses.KDNetObjective(_gt, None, None, lambda_kd=0.0, alpha_kl=0.0, prototype_loss=PrototypeKDLoss(), beta_prototype=1.0)
    with pytest.raises(ValueError, match="beta_feature"):
        losses.KDNetObjective(_gt, None, None, lambda_kd=0.0, alpha_kl=0.0, beta_feature=-1.0)


# ---------------------------------------------------------------------------------------------
# trainer and frozen teacher: the decoder features of both networks reach the objective


def _net(in_channels: int, seed: int) -> EncoderDecoder:
    torch.manual_seed(seed)
    return EncoderDecoder(in_channels, 3, filters=(2, 4, 8), skip_connections=2)


def test_feature_hooks_return_the_decoder_blocks_outputs():
    net = _net(1, 0).eval()
    hooks = FeatureHooks(net, ["decoder.0", "decoder.1"])
    x = torch.randn(1, 1, 8, 8, 8)
    net(x)
    feats = hooks.outputs
    assert tuple(feats["decoder.0"].shape) == (1, 4, 4, 4, 4) and tuple(feats["decoder.1"].shape) == (1, 2, 8, 8, 8)
    # the finest decoder block's output is what the head convolves
    torch.testing.assert_close(net.head(feats["decoder.1"]), net(x))


def test_kd_trainer_feeds_both_networks_features_to_the_method_terms(tmp_path):
    teacher_net, student = _net(4, 1), _net(1, 2)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher_net.state_dict()}, ckpt)
    levels = ["decoder.0", "decoder.1"]
    objective = losses.KDNetObjective(
        _gt, None, None, lambda_kd=0.0, alpha_kl=0.0, feature_loss=FeatureDistillationLoss(levels), beta_feature=1.0,
        prototype_loss=PrototypeKDLoss(), beta_prototype=1.0, prototype_level="decoder.1",
    )
    frozen = teacher_mod.FrozenTeacher(teacher_net, ckpt, bottleneck=None, feature_levels=objective.feature_levels)
    gen = torch.Generator().manual_seed(3)
    four = torch.randn(2, 4, 8, 8, 8, generator=gen)
    label = (torch.rand(2, 3, 8, 8, 8, generator=gen) > 0.5).float()
    batch = {"image": four[:, 1:2].clone(), "teacher_image": four, "label": label}
    trainer = trainer_mod.KDTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0), loss_function=objective, train_handlers=[frozen],
    )
    seen = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.update(trainer_mod.loss_terms(e.state.output)))
    trainer.run()

    # the same terms computed by hand from the two networks' decoder outputs
    student_hooks, teacher_hooks = FeatureHooks(student, levels), FeatureHooks(teacher_net, levels)
    with torch.no_grad():
        student(batch["image"]), teacher_net(four)
        fs, ft = student_hooks.outputs, teacher_hooks.outputs
        expected_feat = FeatureDistillationLoss(levels)(fs, ft).item()
        expected_proto = PrototypeKDLoss()(fs["decoder.1"], ft["decoder.1"], batch["label"]).item()
    assert seen["loss_feat"] == pytest.approx(expected_feat, rel=1e-5) and expected_feat > 0
    assert seen["loss_proto"] == pytest.approx(expected_proto, rel=1e-5) and expected_proto > 0
    assert seen["loss_kd"] == 0.0 and seen["loss_kl"] == 0.0


def test_kd_trainer_without_teacher_features_says_to_run_the_teacher_online():
    student = _net(1, 2)
    objective = losses.KDNetObjective(
        _gt, None, None, lambda_kd=0.0, alpha_kl=0.0, feature_loss=FeatureDistillationLoss(["decoder.0"]), beta_feature=1.0
    )
    batch = {"image": torch.randn(1, 1, 8, 8, 8), "label": torch.zeros(1, 3, 8, 8, 8)}
    trainer = trainer_mod.KDTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0), loss_function=objective,
    )
    with pytest.raises(KeyError, match="teacher_mode online"):
        trainer.run()


# ---------------------------------------------------------------------------------------------
# the override files


METHODS = {
    # file: (lambda_kd, alpha_kl, beta_logit, beta_prototype, beta_feature)
    "method_hinton.json": (0.0, 0.0, 1.0, 0.0, 0.0),
    "method_protokd.json": (0.0, 0.0, 2.5, 0.1, 0.0),
    "method_features.json": (0.0, 0.0, 0.0, 0.0, 1.0),
}


@pytest.mark.parametrize("override", sorted(METHODS))
def test_method_overrides_select_their_terms_and_the_teacher_hooks_the_same_levels(override, tmp_path):
    parser = bundle_config(STUDENT, ["train.json", override], teacher_ckpt=str(tmp_path / "model.pt"), **TINY)
    objective = parser.get_parsed_content("loss")
    lambda_kd, alpha_kl, beta_logit, beta_prototype, beta_feature = METHODS[override]
    assert (objective.lambda_kd, objective.alpha_kl) == (lambda_kd, alpha_kl)
    weights = {"logit": beta_logit, "prototype": beta_prototype, "feature": beta_feature}
    assert objective.extra == {k: v for k, v in weights.items() if v}
    handlers = parser.get_parsed_content("train#teacher_handlers")
    assert len(handlers) == 1, "every method needs the online teacher"
    hooked = list(handlers[0].feature_hooks.hooks) if handlers[0].feature_hooks else []
    assert hooked == objective.feature_levels
    if override == "method_protokd.json":
        assert hooked == ["decoder.3"] and objective.logit_loss.temperature == 10.0 and objective.logit_loss.weight == 1.0
    if override == "method_features.json":
        assert hooked == ["decoder.0", "decoder.1", "decoder.2", "decoder.3"]


def test_the_default_objective_has_no_method_terms_and_hooks_no_features(tmp_path):
    parser = bundle_config(STUDENT, "train.json", teacher_ckpt=str(tmp_path / "model.pt"), **TINY)
    objective = parser.get_parsed_content("loss")
    assert objective.extra == {} and objective.feature_levels == []
    assert parser.get_parsed_content("train#frozen_teacher").feature_hooks is None
