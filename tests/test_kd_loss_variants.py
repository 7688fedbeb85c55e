"""KD-Net loss variants (brats_kd.losses) against hand computations, and the defect that made the
classical soft Dice of Eq. 2 fail with soft targets."""

import math

import pytest
import torch

from brats_kd.losses import BottleneckKLLoss, KDLoss


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_soft_label_dice_by_hand():
    # one sample, one channel, two voxels: student logits (0, 2), teacher logits (5, -5), T = 5
    student = torch.tensor([0.0, 2.0]).view(1, 1, 2)
    teacher = torch.tensor([5.0, -5.0]).view(1, 1, 2)
    p = [_sigmoid(0.0), _sigmoid(2.0)]
    s = [_sigmoid(1.0), _sigmoid(-1.0)]
    # soft-label Dice (Wang et al. 2023): |p ∩ s| = (|p| + |s| - |p - s|) / 2
    l1 = sum(abs(a - b) for a, b in zip(p, s))
    dice = (sum(p) + sum(s) - l1 + 1e-5) / (sum(p) + sum(s) + 1e-5)
    # BCE to the teacher's binarised output (1, 0), on sigmoid(f_s)
    bce = -(math.log(p[0]) + math.log(1 - p[1])) / 2
    loss = KDLoss(temperature=5.0, soft_label=True)(student, teacher)
    assert loss.item() == pytest.approx((1 - dice) + bce, rel=1e-6)


def test_classical_dice_by_hand():
    student = torch.tensor([0.0, 2.0]).view(1, 1, 2)
    teacher = torch.tensor([5.0, -5.0]).view(1, 1, 2)
    p = [_sigmoid(0.0), _sigmoid(2.0)]
    s = [_sigmoid(1.0), _sigmoid(-1.0)]
    dice = (2 * sum(a * b for a, b in zip(p, s)) + 1e-5) / (sum(p) + sum(s) + 1e-5)
    bce = -(math.log(p[0]) + math.log(1 - p[1])) / 2
    loss = KDLoss(temperature=5.0, soft_label=False)(student, teacher)
    assert loss.item() == pytest.approx((1 - dice) + bce, rel=1e-6)


def test_temperature_squared_scales_the_soft_term_only():
    # Hinton et al.: both sides at T, the soft term times T², the hard term at T = 1 ... as defined here:
    # the BCE term uses the same student scaling (student_temperature) as the Dice term
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 4, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, 4, generator=gen) * 4
    plain = KDLoss(temperature=4.0, student_temperature=4.0, soft_label=True)
    squared = KDLoss(temperature=4.0, student_temperature=4.0, soft_label=True, temperature_squared=True)
    dice_plain = plain.dice(torch.sigmoid(student / 4.0), torch.sigmoid(teacher / 4.0))
    assert squared(student, teacher).item() == pytest.approx(plain(student, teacher).item() + 15 * dice_plain.item(), rel=1e-5)


def test_soft_label_dice_is_minimised_at_the_soft_target_classical_is_not():
    """The defect behind the student's false-positive ET: against soft targets sigmoid(f_t / T), the
    classical soft Dice scores a student that predicts the region on EVERY voxel better than one that
    reproduces the teacher's soft output; the soft-label Dice is zero exactly at the soft target."""
    teacher = torch.full((1, 1, 16, 16, 16), -8.0)  # a teacher sure that the region is absent
    teacher[..., 6:9, 6:9, 6:9] = 8.0
    everywhere = torch.full_like(teacher, 8.0)
    matching = teacher / 5.0  # sigmoid(matching) == sigmoid(teacher / T)
    classical = KDLoss(temperature=5.0, soft_label=False).dice
    soft = KDLoss(temperature=5.0, soft_label=True).dice
    target = torch.sigmoid(teacher / 5.0)
    assert classical(torch.sigmoid(everywhere), target) < classical(torch.sigmoid(matching), target)
    assert soft(torch.sigmoid(matching), target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft(torch.sigmoid(everywhere), target) > 0.5


@pytest.mark.parametrize("normalisation", ["flat", "channel", "voxel"])
def test_bottleneck_kl_normalisations_by_hand(normalisation):
    gen = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 3, 2, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, 2, generator=gen)
    s, t = student.double(), teacher.double()
    if normalisation == "flat":  # one distribution per sample over all C*X*Y*Z entries
        groups = [(s[b].flatten(), t[b].flatten()) for b in range(2)]
    elif normalisation == "channel":  # one distribution over space per (sample, channel)
        groups = [(s[b, c].flatten(), t[b, c].flatten()) for b in range(2) for c in range(3)]
    else:  # one distribution over channels per (sample, voxel)
        groups = [(s[b].flatten(1)[:, v], t[b].flatten(1)[:, v]) for b in range(2) for v in range(8)]
    kls = []
    for sv, tv in groups:
        p, q = torch.softmax(sv, 0), torch.softmax(tv, 0)
        kls.append(float((q * (q / p).log()).sum()))
    # averaged over the distributions of a sample, summed over none: the batch mean of the per-sample mean
    expected = sum(kls) / len(kls)
    actual = BottleneckKLLoss(normalisation=normalisation)(student, teacher)
    assert actual.item() == pytest.approx(expected, rel=1e-5)


def test_bottleneck_kl_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalisation"):
        BottleneckKLLoss(normalisation="global")
