"""KD-Net losses (Hu et al., MICCAI 2020, "Knowledge distillation from multi-modal to mono-modal
segmentation networks"), Eq. 1--5.

- :class:`GTLoss` -- the reference-segmentation loss ``L_GT`` (Eq. 4; also the teacher's training loss).
- :class:`KDLoss` -- the Teacher's soft labels distilled into the Student (Eq. 1--2).
- :class:`BottleneckKLLoss` -- Kullback--Leibler divergence between the bottlenecks (Eq. 3).
- :class:`KDNetObjective` -- the weighted sum with the reference-segmentation loss (Eq. 4--5).

``GTLoss`` and ``KDLoss`` take the network head (``activation``, see :mod:`brats_kd.regions`):
``"sigmoid"``, three overlapping region channels TC/WT/ET, or ``"softmax"``, four exclusive classes
(background, necrosis / non-enhancing core, edema, enhancing), the paper's softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from torch import nn
from torch.nn.modules.loss import _Loss

from .regions import REGION_CLASSES, check_activation, head_channels, regions_to_classes

__all__ = ["GTLoss", "KDLoss", "BottleneckKLLoss", "KDNetObjective"]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}.")
    return float(value)


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str, min_ndim: int) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(
            f"{what}: expected two tensors, got {type(student).__name__} and {type(teacher).__name__}."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student and teacher shapes differ ({tuple(student.shape)} vs {tuple(teacher.shape)}); "
            "the two networks must share the architecture (only the number of input channels may differ)."
        )
    if student.ndim < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dimensions, got shape {tuple(student.shape)}.")


class GTLoss(_Loss):
    """``L_GT`` of KD-Net (Eq. 4): Dice + cross-entropy against the reference segmentation, for either head.

    ``label`` is the bundles' label format, the binary region channels ``y = [TC, WT, ET]``
    (``[B, 3, *spatial]``); with ``activation="softmax"`` a one-channel label of class indices 0-3
    (``[B, 1, *spatial]``) is accepted too. With network logits ``f``, ``eps = 1e-5`` and spatial sums::

        sigmoid:  p = sigmoid(f)                                  # [B, 3, ...], one Bernoulli per region
                  L_GT = mean_{b,c}(1 - (2 sum(p_c y_c) + eps) / (sum(p_c) + sum(y_c) + eps))
                         + mean_{b,c,voxels}(-y log p - (1 - y) log(1 - p))
        softmax:  k = regions_to_classes(y)                       # ET -> 3, else TC -> 1, else WT -> 2, else 0
                  q = one_hot(k, 4), p = softmax(f, over the channels)
                  L_GT = mean_{b,c}(1 - (2 sum(p_c q_c) + eps) / (sum(p_c) + sum(q_c) + eps))
                         + mean_{b,voxels}(-log p_k)

    The sigmoid form is MONAI's ``DiceFocalLoss(sigmoid=True, gamma=0)`` (focal loss with gamma 0 is the
    BCE), as the bundles used before the softmax head; the softmax form is ``DiceCELoss(softmax=True,
    to_onehot_y=True)``. Both Dice terms include every channel (the background class too). The class of a
    voxel is determined by the nested regions (BraTS labels 0/1/2/4 → classes 0/1/2/3), so the label
    pipeline is the same for both heads.

    Why not ``DiceCELoss`` for the sigmoid head: with several channels it uses the softmax cross-entropy,
    wrong for overlapping regions.

    With ``batch=True`` (nnU-Net's "batch Dice") the Dice sums run over the batch and the voxels, one Dice
    per channel: ``mean_c(1 - (2 sum_{b,voxels}(p_c y_c) + eps) / (sum_{b,voxels} p_c + sum_{b,voxels} y_c + eps))``.
    Why: with the per-sample form, a case without a region (e.g. no enhancing tumour, as in many lower-grade
    gliomas) has an empty ``y_c``: its Dice is ``eps / (sum(p_c) + eps) ≈ 0`` whatever is predicted, a
    constant loss without gradient, so only the cross-entropy discourages false positives there; summed
    over the batch, false positives on that case lower the Dice of the region like any other.

    Args:
        activation: ``"sigmoid"`` (3 region channels) or ``"softmax"`` (4 classes).
        smooth_nr, smooth_dr: ``eps`` of the Dice numerator and denominator.
        batch: Dice over the whole batch (``True``) or per sample, then averaged (``False``, MONAI's default).
    """

    def __init__(
        self, activation: str = "sigmoid", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False
    ) -> None:
        super().__init__()
        self.activation = check_activation(activation)
        common = {"smooth_nr": smooth_nr, "smooth_dr": smooth_dr, "batch": bool(batch)}
        if self.activation == "sigmoid":
            self.loss = DiceFocalLoss(sigmoid=True, gamma=0.0, **common)
        else:
            self.loss = DiceCELoss(softmax=True, to_onehot_y=True, **common)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: network outputs ``[B, C, *spatial]``, ``C`` = 3 (sigmoid) or 4 (softmax).
            label: region channels ``[B, 3, *spatial]`` (softmax also: class indices ``[B, 1, *spatial]``).

        Returns:
            the scalar ``L_GT``.
        """
        channels = head_channels(self.activation)
        if logits.ndim < 3 or logits.shape[1] != channels:
            raise ValueError(
                f"GTLoss({self.activation!r}) needs logits with {channels} channels, got shape {tuple(logits.shape)}: "
                "the network's out_channels and the config value `activation` disagree."
            )
        if self.activation == "softmax" and label.shape[1] == len(REGION_CLASSES):
            label = regions_to_classes(label, dim=1)
        elif label.shape[1] != (len(REGION_CLASSES) if self.activation == "sigmoid" else 1):
            raise ValueError(
                f"GTLoss({self.activation!r}): the label must be the TC/WT/ET region channels [B, 3, ...]"
                + (" or class indices [B, 1, ...]" if self.activation == "softmax" else "")
                + f", got shape {tuple(label.shape)}."
            )
        return self.loss(logits, label)


class KDLoss(_Loss):
    """Generalised knowledge-distillation loss of KD-Net (Eq. 1--2), for either head.

    With Teacher logits ``f_t(x)``, Student logits ``f_s(x_k)`` and temperature ``T``, for
    ``activation="sigmoid"`` (overlapping region channels)::

        s  = sigmoid(f_t(x) / T)                                  # soft labels, Eq. 1
        s* = [f_t(x) > 0]                                         # Teacher's binary prediction
        p  = sigmoid(f_s(x_k) / T_s)                              # Student probabilities (T_s = 1 in the paper)
        L_KD = w * (1 - Dice(s, p)) + BCE(s*, p)                  # Eq. 2; w = T * T_s with temperature_squared, else 1

    and for ``activation="softmax"`` (exclusive classes; Eq. 1 as the paper writes it, softmax over the
    class axis)::

        s  = softmax(f_t(x) / T)                                  # soft labels, Eq. 1
        s* = argmax_c f_t(x)                                      # Teacher's binarised (one-hot) prediction
        p  = softmax(f_s(x_k) / T_s)
        L_KD = w * (1 - Dice(s, p)) + CE(s*, p)                   # CE = mean over voxels of -log p_{s*}

    with one of two Dice forms (sums over the spatial axes; the Dice term is averaged over batch and
    channels -- every class, background included, in softmax mode -- the BCE/CE over all voxels)::

        classical:   Dice(s, p) = (2 sum(p * s) + 1e-5) / (sum(p) + sum(s) + 1e-5)
        soft_label:  Dice(s, p) = (sum(p) + sum(s) - sum|p - s| + 1e-5) / (sum(p) + sum(s) + 1e-5)

    Why the ``soft_label`` form exists: against soft targets the classical form is not minimised at
    ``p == s``. With ``T = 5`` every background voxel has ``s = sigmoid(f_t / 5) ≈ 0.12-0.17``, and
    over a volume that is mostly background the classical Dice is *higher* for a student that predicts
    the region on every voxel than for one that reproduces the Teacher (``tests/test_kd_loss_variants.py``):
    on a case without enhancing tumour it rewards predicting ET everywhere. The ``soft_label`` form
    (Wang et al., "Dice semimetric losses", MICCAI 2023; MONAI ``DiceLoss(soft_label=True)``) equals the
    classical one for binary targets and is zero exactly at ``p == s``.

    ``s*`` is the Teacher's prediction: in sigmoid mode at the usual 0.5 threshold, which is ``f_t > 0`` for
    every ``T``; in softmax mode its most probable class (the same for every ``T``; ties: the lower class).

    Why a sigmoid mode besides the paper's softmax: BraTS is evaluated on the nested regions TC, WT and
    ET, which overlap (ET is inside TC inside WT); with one sigmoid per region each output channel is an
    independent binary problem and the soft label of a region is its own sigmoid. The temperature
    softens each region's Bernoulli distribution exactly as ``softmax(z / T)`` softens a categorical one.

    The temperature is applied to the Teacher only, as Eq. 2 is written (``sigma(f_s(x_k))``);
    ``student_temperature = T`` divides the Student's logits in both terms as in Hinton et al.'s
    distillation, where ``temperature_squared`` multiplies the soft (Dice) term by ``T * T_s`` to keep
    its gradient scale independent of the temperature.

    The BCE / CE is computed from logits (``binary_cross_entropy_with_logits(f_s / T_s, s*)``,
    ``cross_entropy(f_s / T_s, s*)``) so that saturated logits (e.g. +-50) give finite values and
    gradients. Teacher tensors are detached.

    Args:
        temperature: ``T`` in Eq. 1, strictly positive; the paper uses 5.
        student_temperature: divides the Student logits; 1 reproduces Eq. 2.
        soft_label: use the soft-label Dice form (minimised at the soft target) instead of the classical one.
        temperature_squared: multiply the Dice term by ``temperature * student_temperature`` (Hinton et al.).
        activation: ``"sigmoid"`` (region channels) or ``"softmax"`` (classes, at least 2 channels).
    """

    def __init__(
        self,
        temperature: float = 5.0,
        student_temperature: float = 1.0,
        soft_label: bool = False,
        temperature_squared: bool = False,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.activation = check_activation(activation)
        self.temperature = _check_positive("temperature", temperature)
        self.student_temperature = _check_positive("student_temperature", student_temperature)
        self.soft_weight = self.temperature * self.student_temperature if temperature_squared else 1.0
        self.dice = DiceLoss(smooth_nr=1e-5, smooth_dr=1e-5, soft_label=bool(soft_label), reduction="mean")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: Student logits (before the sigmoid / softmax), ``[B, C, *spatial]``.
            teacher_logits: Teacher logits of the same shape; used as a fixed target.

        Returns:
            the scalar ``L_KD`` of Eq. 2.
        """
        _check_same_shape(student_logits, teacher_logits, "KDLoss", min_ndim=3)
        teacher_logits = teacher_logits.detach()
        student_scaled = student_logits / self.student_temperature
        if self.activation == "sigmoid":
            soft_target = torch.sigmoid(teacher_logits / self.temperature)
            hard_target = (teacher_logits > 0).to(student_logits.dtype)
            dice = self.dice(torch.sigmoid(student_scaled), soft_target)
            hard = F.binary_cross_entropy_with_logits(student_scaled, hard_target)
        else:
            if student_logits.shape[1] < 2:
                raise ValueError(
                    f"KDLoss(activation='softmax') needs at least 2 class channels, got shape {tuple(student_logits.shape)}."
                )
            soft_target = torch.softmax(teacher_logits / self.temperature, dim=1)
            dice = self.dice(torch.softmax(student_scaled, dim=1), soft_target)
            hard = F.cross_entropy(student_scaled, teacher_logits.argmax(dim=1))
        return self.soft_weight * dice + hard


#: how BottleneckKLLoss turns a bottleneck ``[B, C, *spatial]`` into distributions
KL_NORMALISATIONS = ("flat", "channel", "voxel")


class BottleneckKLLoss(_Loss):
    """Kullback--Leibler divergence between Teacher and Student bottlenecks (Eq. 3).

    ``normalisation="flat"`` is the paper's: each sample's latent tensor is flattened and normalised
    into one distribution with a softmax, ``p_i = softmax(vec(E_s(x_k^i)))`` for the Student and
    ``q_i = softmax(vec(E_t(x^i)))`` for the Teacher, and::

        L_KL(p, q) = 1/B sum_i sum_j q_i(j) * (log q_i(j) - log p_i(j))      # = KL(q_i || p_i)

    Variants (KL averaged over the distributions of a sample, then over the batch):

    - ``"channel"``: one distribution over the spatial positions per channel (``C`` per sample);
    - ``"voxel"``: one distribution over the channels per spatial position (``X*Y*Z`` per sample).

    Why variants: a flat softmax over ``C*X*Y*Z`` entries (16k at the quick preset) is dominated by the
    few largest activations, so the term matches where the Teacher's bottleneck peaks rather than its
    features; per-channel or per-voxel normalisation keeps every channel or position in the term.

    Why this order: KL(q || p) is the expectation under the Teacher's distribution, so the Student
    is penalised wherever the Teacher puts mass and it does not -- the paper chooses it "because we
    want the distribution of the Student's bottleneck to be similar to the one of the Teacher".

    The paper sums over samples; the batch mean is used here so that ``alpha`` in Eq. 5 does not
    depend on the batch size. Computed in log space (``log_softmax`` on both sides, float32) so
    that no probability underflows to ``log(0)``. The Teacher tensor is detached.
    """

    def __init__(self, normalisation: str = "flat") -> None:
        super().__init__()
        if normalisation not in KL_NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {KL_NORMALISATIONS}, got {normalisation!r}.")
        self.normalisation = normalisation

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_feat: Student bottleneck, ``[B, C, *spatial]`` (``[B, ...]`` for ``"flat"``).
            teacher_feat: Teacher bottleneck of the same shape.

        Returns:
            the scalar ``L_KL`` of Eq. 3 (batch mean), ``>= 0`` and ``0`` for identical inputs.
        """
        _check_same_shape(student_feat, teacher_feat, "BottleneckKLLoss", min_ndim=2 if self.normalisation == "flat" else 3)
        # a latent vector has thousands of entries: normalise in float32 even under mixed precision
        student, teacher = student_feat.float(), teacher_feat.detach().float()
        if self.normalisation == "flat":
            student, teacher, dim = student.flatten(1), teacher.flatten(1), 1
        else:
            student, teacher = student.flatten(2), teacher.flatten(2)
            dim = 2 if self.normalisation == "channel" else 1
        log_p = F.log_softmax(student, dim=dim)
        log_q = F.log_softmax(teacher, dim=dim)
        return (log_q.exp() * (log_q - log_p)).sum(dim).mean()


class KDNetObjective(nn.Module):
    """The complete KD-Net objective (Eq. 5)::

        L = lambda * L_KD + (1 - lambda) * L_GT + alpha * L_KL

    where ``L_GT`` (Eq. 4) is Dice + BCE (sigmoid head) or Dice + cross-entropy (softmax head) against the
    reference segmentation -- :class:`GTLoss` in the bundles -- ``L_KD`` is :class:`KDLoss` and ``L_KL`` is
    :class:`BottleneckKLLoss`.

    A term whose weight is 0 is not evaluated (and reported as 0), so the GT-only baseline and the
    ablations of the paper's Table 2 run without the tensors that term would need; with
    ``lambda = 0`` and ``alpha = 0`` the total is exactly ``gt_loss(student_logits, label)``.

    Other distillation methods (:mod:`brats_kd.distillation`, selected by ``configs/method_*.json``) add
    weighted terms; each weight is 0 by default, so the paper's objective is unchanged::

        L += beta_logit * L_logit(f_s, f_t) + beta_prototype * L_proto(F_s, F_t, y) + beta_feature * L_feat({F_s}, {F_t})

    ``L_logit`` (e.g. Hinton's softened KL) takes the logits, ``L_proto`` the student's and teacher's
    features at ``prototype_level`` and the label, ``L_feat`` the features at each of its ``levels``
    (:attr:`feature_levels` lists what the trainer and the frozen teacher must capture). A method that
    replaces KD-Net's terms sets ``lambda_kd`` and ``alpha_kl`` to 0 (then ``L_GT`` has weight 1).

    Args:
        gt_loss: ``(student_logits, label) -> loss``; ``None`` only if ``lambda_kd == 1``.
        kd_loss: ``(student_logits, teacher_logits) -> loss``; ``None`` only if ``lambda_kd == 0``.
        kl_loss: ``(student_bottleneck, teacher_bottleneck) -> loss``; ``None`` only if ``alpha_kl == 0``.
        lambda_kd: imitation weight ``lambda`` in ``[0, 1]``; the paper uses 0.75.
        alpha_kl: latent-space weight ``alpha >= 0``; the paper uses 10.
        logit_loss, beta_logit: ``(student_logits, teacher_logits) -> loss`` and its weight (logged ``loss_logit``).
        prototype_loss, beta_prototype: ``(student_features, teacher_features, label) -> loss`` and its weight
            (logged ``loss_proto``); prototype_level: the submodule whose output are the features.
        feature_loss, beta_feature: ``(student_features: dict, teacher_features: dict) -> loss`` with a
            ``levels`` attribute (the submodule names), and its weight (logged ``loss_feat``).
    """

    def __init__(
        self,
        gt_loss: Callable | None,
        kd_loss: Callable | None,
        kl_loss: Callable | None,
        lambda_kd: float = 0.75,
        alpha_kl: float = 10.0,
        logit_loss: Callable | None = None,
        beta_logit: float = 0.0,
        prototype_loss: Callable | None = None,
        beta_prototype: float = 0.0,
        prototype_level: str | None = None,
        feature_loss: Callable | None = None,
        beta_feature: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(lambda_kd, bool) or not isinstance(lambda_kd, Real) or not 0.0 <= lambda_kd <= 1.0:
            raise ValueError(f"lambda_kd must be a number in [0, 1] (Eq. 5), got {lambda_kd!r}.")
        if isinstance(alpha_kl, bool) or not isinstance(alpha_kl, Real) or not 0.0 <= alpha_kl < float("inf"):
            raise ValueError(f"alpha_kl must be a finite number >= 0 (Eq. 5), got {alpha_kl!r}.")
        self.lambda_kd = float(lambda_kd)
        self.alpha_kl = float(alpha_kl)
        for name, fn, weight in (
            ("gt_loss", gt_loss, 1.0 - self.lambda_kd),
            ("kd_loss", kd_loss, self.lambda_kd),
            ("kl_loss", kl_loss, self.alpha_kl),
        ):
            if weight > 0 and not callable(fn):
                raise TypeError(f"{name} must be a callable loss when its weight is {weight}, got {fn!r}.")
        # assigned as attributes so that nn.Module losses follow .to(device) and show in repr
        self.gt_loss = gt_loss
        self.kd_loss = kd_loss
        self.kl_loss = kl_loss
        self.extra = {}  # logged name -> weight of each method term in use (weight > 0)
        for name, fn, weight in (
            ("logit", logit_loss, beta_logit),
            ("prototype", prototype_loss, beta_prototype),
            ("feature", feature_loss, beta_feature),
        ):
            if isinstance(weight, bool) or not isinstance(weight, Real) or not 0.0 <= weight < float("inf"):
                raise ValueError(f"beta_{name} must be a finite number >= 0, got {weight!r}.")
            if weight > 0 and not callable(fn):
                raise TypeError(f"{name}_loss must be a callable loss when beta_{name} is {weight}, got {fn!r}.")
            if weight > 0:
                self.extra[name] = float(weight)
        if "prototype" in self.extra and (not isinstance(prototype_level, str) or not prototype_level):
            raise ValueError(f"beta_prototype > 0 needs prototype_level, the submodule giving the features; got {prototype_level!r}.")
        if "feature" in self.extra and (isinstance(getattr(feature_loss, "levels", None), str) or not getattr(feature_loss, "levels", None)):
            raise ValueError("beta_feature > 0 needs a feature_loss with a non-empty `levels` list of submodule names.")
        self.logit_loss = logit_loss
        self.prototype_loss = prototype_loss
        self.prototype_level = prototype_level
        self.feature_loss = feature_loss

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether ``forward`` needs ``teacher_logits`` (``lambda > 0`` or ``beta_logit > 0``)."""
        return self.lambda_kd > 0 or "logit" in self.extra

    @property
    def feature_levels(self) -> list[str]:
        """The submodules whose outputs ``forward`` needs from both networks (``student_features`` /
        ``teacher_features``), in a fixed order; empty for KD-Net's terms alone."""
        levels = [self.prototype_level] if "prototype" in self.extra else []
        levels += list(self.feature_loss.levels) if "feature" in self.extra else []
        return list(dict.fromkeys(levels))

    @property
    def needs_teacher(self) -> bool:
        """Whether any term in use needs an output of the teacher."""
        return self.needs_teacher_logits or self.needs_bottlenecks or bool(self.feature_levels)

    @property
    def needs_bottlenecks(self) -> bool:
        """Whether ``forward`` needs both bottleneck tensors (``alpha > 0``)."""
        return self.alpha_kl > 0

    def forward(
        self,
        student_logits: torch.Tensor,
        label: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        student_bottleneck: torch.Tensor | None = None,
        teacher_bottleneck: torch.Tensor | None = None,
        student_features: dict[str, torch.Tensor] | None = None,
        teacher_features: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_logits: Student outputs ``[B, C, *spatial]`` (logits, before the sigmoid / softmax).
            label: reference segmentation for ``L_GT``, e.g. the 3-channel TC/WT/ET mask.
            teacher_logits: Teacher outputs, same shape as ``student_logits``; required if ``lambda > 0``.
            student_bottleneck: Student latent tensor; required if ``alpha > 0``.
            teacher_bottleneck: Teacher latent tensor, same shape; required if ``alpha > 0``.

            student_features, teacher_features: ``{submodule name: tensor}`` for :attr:`feature_levels`.

        Returns:
            ``{"loss": L, "loss_gt": L_GT, "loss_kd": L_KD, "loss_kl": L_KL}``, scalar tensors, plus
            ``loss_logit`` / ``loss_proto`` / ``loss_feat`` for each method term in use; only ``"loss"``
            is meant for ``backward()``.
        """
        if self.needs_teacher_logits and teacher_logits is None:
            raise ValueError(
                f"lambda_kd={self.lambda_kd} (beta_logit={self.extra.get('logit', 0.0)}) needs teacher_logits, but none "
                "were given: run the frozen teacher (FrozenTeacher handler) or provide cached teacher outputs, or set "
                "lambda_kd=0 and beta_logit=0."
            )
        if self.needs_bottlenecks and (student_bottleneck is None or teacher_bottleneck is None):
            given = {"student_bottleneck": student_bottleneck, "teacher_bottleneck": teacher_bottleneck}
            missing = [name for name, value in given.items() if value is None]
            raise ValueError(
                f"alpha_kl={self.alpha_kl} needs both bottlenecks, but {missing} missing: hook the bottleneck "
                "submodules (KDTrainer / FrozenTeacher do it by name) or set alpha_kl=0."
            )
        zero = student_logits.new_zeros(())
        terms = {"loss_gt": zero, "loss_kd": zero, "loss_kl": zero}
        weighted = []
        # skip zero-weight terms entirely: 0 * L would still need L's inputs and could turn a NaN into the total
        if self.lambda_kd < 1:
            terms["loss_gt"] = self.gt_loss(student_logits, label).mean()
            weighted.append(terms["loss_gt"] if self.lambda_kd == 0 else (1.0 - self.lambda_kd) * terms["loss_gt"])
        if self.lambda_kd > 0:
            terms["loss_kd"] = self.kd_loss(student_logits, teacher_logits).mean()
            weighted.append(self.lambda_kd * terms["loss_kd"])
        if self.alpha_kl > 0:
            terms["loss_kl"] = self.kl_loss(student_bottleneck, teacher_bottleneck).mean()
            weighted.append(self.alpha_kl * terms["loss_kl"])
        levels = self.feature_levels
        if levels:
            given = {"student_features": student_features or {}, "teacher_features": teacher_features or {}}
            missing = [f"{side}[{lv!r}]" for side, feats in given.items() for lv in levels if lv not in feats]
            if missing:
                raise ValueError(
                    f"the distillation terms {sorted(self.extra)} need the features of {levels}, but {missing} missing: "
                    "KDTrainer and FrozenTeacher hook them by name (online teacher mode only)."
                )
        if "logit" in self.extra:
            terms["loss_logit"] = self.logit_loss(student_logits, teacher_logits).mean()
            weighted.append(self.extra["logit"] * terms["loss_logit"])
        if "prototype" in self.extra:
            level = self.prototype_level
            terms["loss_proto"] = self.prototype_loss(student_features[level], teacher_features[level], label).mean()
            weighted.append(self.extra["prototype"] * terms["loss_proto"])
        if "feature" in self.extra:
            terms["loss_feat"] = self.feature_loss(student_features, teacher_features).mean()
            weighted.append(self.extra["feature"] * terms["loss_feat"])
        total = weighted[0]
        for term in weighted[1:]:
            total = total + term
        return {"loss": total, **terms}
