"""Distillation methods beside KD-Net, as extra terms of :class:`~brats_kd.losses.KDNetObjective`.

- :class:`HintonKDLoss` -- logit distillation (Hinton et al. 2015): KL between the softened
  distributions of teacher and student at temperature ``T``, times ``T**2``.
- :class:`PrototypeKDLoss` -- ProtoKD's prototype term (Wang et al., ICASSP 2023): the similarity of every
  voxel's feature to each class prototype, matched between teacher and student.
- :class:`FeatureDistillationLoss` -- feature distillation on several decoder levels: MSE between the
  student's and the teacher's feature maps (FitNets' hint loss, Romero et al. 2015, without the regressor
  since both networks have the same widths).
- :class:`FeatureHooks` -- the outputs of named submodules (decoder blocks) from the latest forward pass,
  so that the unchanged :class:`~brats_kd.networks.EncoderDecoder` provides the features these terms need
  (``"decoder.0"`` is the coarsest decoder block, ``"decoder.{len(filters) - 2}"`` the finest, full resolution).

``bundles/kd_student/configs/method_*.json`` select them (docs/README.md, *Distillation methods*).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from .bottleneck import BottleneckHook
from .regions import CLASS_LABELS, check_activation, regions_to_classes

__all__ = ["FeatureDistillationLoss", "FeatureHooks", "HintonKDLoss", "PrototypeKDLoss"]


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(f"{what}: expected two tensors, got {type(student).__name__} and {type(teacher).__name__}.")
    if student.shape != teacher.shape or student.ndim < 3:
        raise ValueError(
            f"{what}: student and teacher tensors must have the same shape [B, C, *spatial], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}; the networks must share the architecture."
        )


class HintonKDLoss(_Loss):
    """Hinton et al.'s logit distillation (Distilling the knowledge in a neural network, 2015).

    With teacher logits ``f_t``, student logits ``f_s`` and temperature ``T``, ``w = T**2`` (or 1 with
    ``temperature_squared=False``), ``activation="softmax"`` (exclusive classes) -- one categorical
    distribution per voxel, KL summed over the classes, averaged over batch and voxels::

        q = softmax(f_t / T),  p = softmax(f_s / T)          over the class axis
        L = w * mean_{b, voxels} sum_c q_c (log q_c - log p_c)

    ``activation="sigmoid"`` (overlapping TC/WT/ET regions) -- one Bernoulli distribution per region and
    voxel, KL over the pair (region, not region), averaged over batch, regions and voxels::

        q = sigmoid(f_t / T),  p = sigmoid(f_s / T)
        L = w * mean_{b, c, voxels} [q (log q - log p) + (1 - q) (log(1 - q) - log(1 - p))]

    ``T**2`` keeps the gradient's scale independent of ``T`` (the gradient of the softened KL scales as
    ``1 / T**2``). This is not KD-Net's Eq. 2 (a Dice on soft labels plus a BCE / CE on the teacher's
    hard prediction, :class:`~brats_kd.losses.KDLoss`). Computed with ``log_softmax`` / ``logsigmoid``
    (``log(1 - sigmoid(z)) = logsigmoid(-z)``), so saturated logits stay finite; the teacher is detached.

    Args:
        temperature: ``T > 0``.
        temperature_squared: multiply by ``T**2`` (Hinton et al.); ``False`` gives the plain softened KL.
        activation: ``"sigmoid"`` or ``"softmax"``, the network head.
    """

    def __init__(self, temperature: float = 4.0, temperature_squared: bool = True, activation: str = "sigmoid") -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite positive number, got {temperature!r}.")
        self.temperature = float(temperature)
        self.weight = self.temperature**2 if temperature_squared else 1.0
        self.activation = check_activation(activation)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_pair(student_logits, teacher_logits, "HintonKDLoss")
        s = student_logits.float() / self.temperature
        t = teacher_logits.detach().float() / self.temperature
        if self.activation == "softmax":
            log_q, log_p = F.log_softmax(t, dim=1), F.log_softmax(s, dim=1)
            kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
        else:
            log_q, log_p = F.logsigmoid(t), F.logsigmoid(s)
            log_q0, log_p0 = F.logsigmoid(-t), F.logsigmoid(-s)
            kl = log_q.exp() * (log_q - log_p) + log_q0.exp() * (log_q0 - log_p0)
        return self.weight * kl.mean()


class PrototypeKDLoss(_Loss):
    """ProtoKD's prototype distillation (Wang et al., "Prototype knowledge distillation for medical
    segmentation with missing modality", ICASSP 2023; code github.com/SakurajimaMaiii/ProtoKD, ``prototype_loss``).

    With a decoder feature map ``F`` (``[B, D, *spatial]``) of each network and the reference classes
    ``y`` (0 background, 1 necrosis / non-enhancing core, 2 edema, 3 enhancing; read from the TC/WT/ET
    region label with :func:`~brats_kd.regions.regions_to_classes` and resampled to the feature grid by
    nearest neighbour), for sample ``b`` and class ``k`` the prototype is the masked mean of the features::

        P_k = sum_i F_i [y_i = k] / (sum_i [y_i = k] + eps)                  eps = 1e-5

    and every voxel's relation to every prototype is its cosine similarity::

        M_k(i) = <F_i, P_k> / max(||F_i|| ||P_k||, eps)

    ``M_{y_i}(i)`` is the intra-class relation (a voxel to its own class's prototype), ``M_k(i)`` for
    ``k != y_i`` the inter-class relations. Teacher (``F^t``, prototypes ``P^t`` from its own features) and
    student (``F^s``, ``P^s``) are matched by the mean squared difference of the maps::

        L_proto = mean_{b, k in K, i} (M^s_k(i) - M^t_k(i))^2

    over the classes ``K`` present in every sample of the batch (the authors' code skips a class absent from
    any sample; with none, ``L_proto = 0``). ``eps`` in the cosine is the authors' ``cosine_similarity(...,
    eps=1e-5)``, which clamps the product of the norms.

    What is implemented as written, and where it departs from the paper / its code:

    - the same prototype definition, similarity maps, class rule and MSE as the authors' ``prototype_loss``;
    - the features are a named decoder level of :class:`~brats_kd.networks.EncoderDecoder` (default the finest,
      full resolution, before the output convolution), the authors' V-Net feature before its output layer;
      a coarser level takes the label by nearest-neighbour down-sampling, which the paper does not use;
    - the classes come from the nested region label (4 classes, as the paper's BraTS labels), for either head;
    - the paper's complete objective (segmentation + 10 x pixel-wise KL at T = 10 + 0.1 x L_proto) is
      composed in ``configs/method_protokd.json`` with this project's L_GT (Dice + BCE / CE) instead of the
      authors' Dice + class-weighted CE.

    The teacher's features are detached.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)

    def similarity_maps(self, features: torch.Tensor, classes: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        """``M`` of the docstring: ``[B, len(present), *spatial]`` cosine similarities to each class prototype."""
        maps = []
        for k in present:
            mask = (classes == k).to(features.dtype)  # [B, 1, *spatial]
            dims = tuple(range(2, features.ndim))
            prototype = (features * mask).sum(dims) / (mask.sum(dims) + self.eps)  # [B, D]
            prototype = prototype.reshape(*prototype.shape, *([1] * len(dims)))
            maps.append(F.cosine_similarity(features, prototype, dim=1, eps=self.eps))
        return torch.stack(maps, dim=1)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_features, teacher_features: ``[B, D, *spatial]`` feature maps of the same level.
            label: the TC/WT/ET region channels ``[B, 3, *spatial']`` (or class indices ``[B, 1, *spatial']``).
        """
        _check_pair(student_features, teacher_features, "PrototypeKDLoss")
        classes = regions_to_classes(label, dim=1) if label.shape[1] == 3 else label.long()
        if classes.shape[2:] != student_features.shape[2:]:
            classes = F.interpolate(classes.float(), size=student_features.shape[2:], mode="nearest").long()
        dims = tuple(range(1, classes.ndim))
        present = [k for k in range(len(CLASS_LABELS)) if bool(((classes == k).sum(dims) > 0).all())]
        if not present:
            return student_features.new_zeros(())
        student = self.similarity_maps(student_features.float(), classes, present)
        teacher = self.similarity_maps(teacher_features.detach().float(), classes, present)
        return ((student - teacher) ** 2).mean()


class FeatureDistillationLoss(_Loss):
    """Feature distillation on several decoder levels: for levels ``l`` in ``levels``, feature maps
    ``F_l^s`` (student) and ``F_l^t`` (teacher) of the same shape::

        L_feat = 1/|levels| sum_l mean_{b, channels, voxels} (F_l^s - F_l^t)^2

    FitNets' hint loss (Romero et al., ICLR 2015) at every chosen level, without FitNets' regressor: the
    student has the teacher's architecture (only the input channels differ), so the maps already align.
    Averaged over the levels so that the weight does not grow with their number. The teacher is detached.

    Args:
        levels: the submodule names whose outputs are compared (e.g. ``["decoder.0", ..., "decoder.3"]``).
    """

    def __init__(self, levels: Sequence[str]) -> None:
        super().__init__()
        if isinstance(levels, str) or not levels:
            raise ValueError(f"levels must be a non-empty list of submodule names, got {levels!r}.")
        self.levels = list(levels)

    def forward(self, student_features: Mapping[str, torch.Tensor], teacher_features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [lv for lv in self.levels if lv not in student_features or lv not in teacher_features]
        if missing:
            raise KeyError(
                f"FeatureDistillationLoss: no features for levels {missing} (student has {sorted(student_features)}, "
                f"teacher has {sorted(teacher_features)})."
            )
        total = None
        for level in self.levels:
            s, t = student_features[level], teacher_features[level]
            _check_pair(s, t, f"FeatureDistillationLoss[{level}]")
            term = F.mse_loss(s.float(), t.detach().float())
            total = term if total is None else total + term
        return total / len(self.levels)


class FeatureHooks:
    """The outputs of several named submodules of ``network`` from its latest forward pass, as a dict.

    One :class:`~brats_kd.bottleneck.BottleneckHook` per name (dotted paths, DDP-wrapped networks). The
    tensors are live activations (a loss on the student's back-propagates into it).
    """

    def __init__(self, network: nn.Module, names: Sequence[str]) -> None:
        self.hooks = {name: BottleneckHook(network, name) for name in names}

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        return {name: hook.output for name, hook in self.hooks.items()}

    def clear(self) -> None:
        for hook in self.hooks.values():
            hook.clear()

    def remove(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
