"""KD-Net losses (brats_kd/losses.py) against independent float64 formulas."""

import math

import pytest
import torch
from monai.losses import DiceCELoss

import brats_kd.losses as losses


# ---- reference formulas, written out with plain float64 torch (no MONAI, no code under test) ----
def _log_sigmoid(z):
    # log(1 / (1 + e^-z)) without forming 1 - sigmoid(z), which is exactly 0 in floating point at z = 50
    return -torch.log1p(torch.exp(-z))


def reference_kd(student, teacher, temperature, student_temperature=1.0):
    x = student.double() / student_temperature
    t = teacher.double()
    s = 1.0 / (1.0 + torch.exp(-t / temperature))
    p = 1.0 / (1.0 + torch.exp(-x))
    b = (t > 0).double()
    spatial = tuple(range(2, x.ndim))
    dice = 1.0 - (2.0 * (p * s).sum(spatial) + 1e-5) / (p.sum(spatial) + s.sum(spatial) + 1e-5)
    bce = -(b * _log_sigmoid(x) + (1.0 - b) * _log_sigmoid(-x))
    return dice.mean() + bce.mean()


def _log_normalise(v):
    # log(e^v_j / sum_k e^v_k), shifted by the max so that e^50 does not dominate the rounding
    shifted = v - v.max(1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(1, keepdim=True))


def reference_kl(student, teacher):
    log_p = _log_normalise(student.double().flatten(1))
    log_q = _log_normalise(teacher.double().flatten(1))
    return (torch.exp(log_q) * (log_q - log_p)).sum(1).mean()


def _assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)


# ---- KDLoss (Eq. 1-2) ----
@pytest.mark.parametrize("temperature,student_temperature", [(5.0, 1.0), (1.0, 1.0), (2.5, 2.5)])
@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 6), (3, 3, 4, 4, 4), (2, 2, 7, 5)])
def test_kd_loss_matches_formula(temperature, student_temperature, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    student = torch.randn(shape, generator=gen) * 3
    teacher = torch.randn(shape, generator=gen) * 3
    loss = losses.KDLoss(temperature, student_temperature)(student, teacher)
    _assert_close(loss, reference_kd(student, teacher, temperature, student_temperature))


def test_kd_loss_extreme_logits_stay_finite():
    gen = torch.Generator().manual_seed(0)
    student = (torch.randint(0, 2, (2, 3, 4, 4, 4), generator=gen).float() * 2 - 1) * 50
    teacher = (torch.randint(0, 2, (2, 3, 4, 4, 4), generator=gen).float() * 2 - 1) * 50
    student.requires_grad_(True)
    for temperature in (1.0, 5.0):
        loss = losses.KDLoss(temperature)(student, teacher)
        assert torch.isfinite(loss)
        _assert_close(loss, reference_kd(student.detach(), teacher, temperature))
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("teacher_value", [0.0, -50.0])
def test_kd_loss_empty_teacher(teacher_value):
    # 0: every soft label is 0.5 and (strictly "> 0") the binary target is all background;
    # -50: a teacher that predicts no tumour anywhere
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 4, 4, 4, generator=gen)
    teacher = torch.full_like(student, teacher_value)
    loss = losses.KDLoss(5.0)(student, teacher)
    _assert_close(loss, reference_kd(student, teacher, 5.0))


def test_kd_loss_hand_computed():
    # T = 2, teacher logits (2 ln 3, -2 ln 3) -> s = (0.75, 0.25), s* = (1, 0); student (ln 3, 0) -> p = (0.75, 0.5)
    # Dice = (2 * (0.5625 + 0.125) + 1e-5) / (1.25 + 1 + 1e-5) -> 1 - Dice = 0.3888872
    # BCE  = (-ln 0.75 - ln 0.5) / 2 = 0.4904146
    teacher = torch.tensor([[[2 * math.log(3), -2 * math.log(3)]]])
    student = torch.tensor([[[math.log(3), 0.0]]])
    _assert_close(losses.KDLoss(temperature=2.0)(student, teacher), 0.8793018)


def test_kd_loss_teacher_is_a_fixed_target():
    student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    losses.KDLoss()(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_loss_argument_checks():
    for bad in (0, -1.0, float("inf"), "5"):
        with pytest.raises(ValueError, match="temperature"):
            losses.KDLoss(temperature=bad)
        with pytest.raises(ValueError, match="student_temperature"):
            losses.KDLoss(student_temperature=bad)
    with pytest.raises(ValueError, match="shapes differ"):
        losses.KDLoss()(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 3"):
        losses.KDLoss()(torch.zeros(2, 3), torch.zeros(2, 3))


# ---- BottleneckKLLoss (Eq. 3) ----
@pytest.mark.parametrize("shape", [(1, 8), (3, 4, 2, 2, 2), (2, 16, 3, 3)])
def test_kl_matches_formula(shape):
    gen = torch.Generator().manual_seed(len(shape))
    student = torch.randn(shape, generator=gen) * 2
    teacher = torch.randn(shape, generator=gen) * 2
    _assert_close(losses.BottleneckKLLoss()(student, teacher), reference_kl(student, teacher))


def test_kl_extreme_values_and_hand_case():
    student = torch.tensor([[50.0, -50.0, 0.0], [-50.0, 50.0, 50.0]])
    teacher = torch.tensor([[-50.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    loss = losses.BottleneckKLLoss()(student, teacher)
    assert torch.isfinite(loss)
    _assert_close(loss, reference_kl(student, teacher))
    # student (0, 0) -> p = (0.5, 0.5); teacher (ln 3, 0) -> q = (0.75, 0.25):
    # 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.1308120
    _assert_close(losses.BottleneckKLLoss()(torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]])), 0.1308120)


def test_kl_properties():
    kl = losses.BottleneckKLLoss()
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 3, 3, 3, generator=gen)
    b = torch.randn(2, 4, 3, 3, 3, generator=gen) * 2
    assert kl(a, a).abs() < 1e-6
    assert kl(a, b) > 0 and kl(b, a) > 0
    assert not torch.isclose(kl(a, b), kl(b, a), rtol=1e-3)  # KL(q||p) != KL(p||q)
    # the argument order is (student, teacher) = KL(teacher || student), not the reverse
    _assert_close(kl(a, b), reference_kl(a, b))
    student = a.clone().requires_grad_(True)
    teacher = b.clone().requires_grad_(True)
    kl(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_kl_argument_checks():
    with pytest.raises(ValueError, match="shapes differ"):
        losses.BottleneckKLLoss()(torch.zeros(2, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        losses.BottleneckKLLoss()(torch.zeros(8), torch.zeros(8))


# ---- KDNetObjective (Eq. 5) ----
def _objective_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 3, 4, 4, 4, generator=gen, requires_grad=True)
    label = (torch.rand(2, 3, 4, 4, 4, generator=gen) > 0.5).float()
    teacher = torch.randn(2, 3, 4, 4, 4, generator=gen) * 4
    s_feat = torch.randn(2, 8, 2, 2, 2, generator=gen, requires_grad=True)
    t_feat = torch.randn(2, 8, 2, 2, 2, generator=gen)
    return student, label, teacher, s_feat, t_feat


def test_objective_combines_terms_as_eq5():
    student, label, teacher, s_feat, t_feat = _objective_inputs()
    gt, kd, kl = DiceCELoss(sigmoid=True), losses.KDLoss(5.0), losses.BottleneckKLLoss()
    out = losses.KDNetObjective(gt, kd, kl, lambda_kd=0.75, alpha_kl=10.0)(student, label, teacher, s_feat, t_feat)
    assert set(out) == {"loss", "loss_gt", "loss_kd", "loss_kl"}
    expected = {"loss_gt": gt(student, label), "loss_kd": kd(student, teacher), "loss_kl": kl(s_feat, t_feat)}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)
        assert value > 0
    total = 0.75 * expected["loss_kd"] + 0.25 * expected["loss_gt"] + 10.0 * expected["loss_kl"]
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    assert student.grad.abs().sum() > 0 and s_feat.grad.abs().sum() > 0


def test_objective_gt_only_needs_no_teacher_and_equals_gt_loss():
    student, label, *_ = _objective_inputs(1)
    gt = DiceCELoss(sigmoid=True)
    out = losses.KDNetObjective(gt, losses.KDLoss(), losses.BottleneckKLLoss(), lambda_kd=0.0, alpha_kl=0.0)(
        student, label
    )
    assert torch.equal(out["loss"], gt(student, label))
    assert out["loss_kd"] == 0 and out["loss_kl"] == 0
    # the terms are optional when their weight is 0
    losses.KDNetObjective(gt, None, None, lambda_kd=0.0, alpha_kl=0.0)(student, label)


def test_objective_skips_zero_weight_terms():
    student, label, teacher, *_ = _objective_inputs(2)

    def must_not_run(*_):
        raise AssertionError("a term with weight 0 was evaluated")

    kd = losses.KDLoss()
    out = losses.KDNetObjective(must_not_run, kd, must_not_run, lambda_kd=1.0, alpha_kl=0.0)(student, label, teacher)
    torch.testing.assert_close(out["loss"], kd(student, teacher))
    assert out["loss_gt"] == 0


def test_objective_missing_teacher_tensors():
    student, label, teacher, s_feat, t_feat = _objective_inputs(3)
    objective = losses.KDNetObjective(DiceCELoss(sigmoid=True), losses.KDLoss(), losses.BottleneckKLLoss())
    with pytest.raises(ValueError, match="teacher_logits"):
        objective(student, label, None, s_feat, t_feat)
    with pytest.raises(ValueError, match="teacher_bottleneck"):
        objective(student, label, teacher, s_feat, None)
    with pytest.raises(ValueError, match="student_bottleneck"):
        objective(student, label, teacher, None, t_feat)


def test_objective_argument_checks():
    gt, kd, kl = DiceCELoss(sigmoid=True), losses.KDLoss(), losses.BottleneckKLLoss()
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="lambda_kd"):
            losses.KDNetObjective(gt, kd, kl, lambda_kd=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha_kl"):
            losses.KDNetObjective(gt, kd, kl, alpha_kl=bad)
    with pytest.raises(TypeError, match="kl_loss"):
        losses.KDNetObjective(gt, kd, None, alpha_kl=1.0)
    with pytest.raises(TypeError, match="gt_loss"):
        losses.KDNetObjective(None, kd, kl, lambda_kd=0.5)
