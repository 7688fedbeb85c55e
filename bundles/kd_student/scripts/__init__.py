"""KD-Net plugin of the ``kd_student`` bundle (Hu et al., MICCAI 2020, Eq. 1--5).

- ``losses``: :class:`KDLoss` (Eq. 1--2), :class:`BottleneckKLLoss` (Eq. 3), :class:`KDNetObjective` (Eq. 5).
- ``bottleneck``: :class:`BottleneckHook`, the latent code of any encoder--decoder by submodule name.
- ``teacher``: :class:`FrozenTeacher`, an Ignite handler adding the frozen Teacher's outputs to each batch.
- ``network``, ``brats``, ``reliability``: the teacher bundle's network, BraTS conventions and
  resumable-training handlers (copies: a bundle must stay self-contained).
- ``trainer``: :class:`KDTrainer`, a ``SupervisedTrainer`` with the KD-Net objective, and :func:`loss_terms`.
- ``teacher_cache``: ``teacher_mode: cached``: :class:`TeacherTargetCache` (the cache step, flip-averaged
  Teacher targets stored per case) and :class:`LoadTeacherTargetsd` (loads them into the training data).

``monai.bundle run`` imports this package as ``scripts`` (configs use e.g. ``scripts.trainer.KDTrainer``),
so the modules import each other relatively and nothing outside the bundle.
"""

from . import brats, network, reliability
from .bottleneck import BottleneckHook
from .losses import BottleneckKLLoss, KDLoss, KDNetObjective
from .teacher import FrozenTeacher, load_teacher_weights
from .teacher_cache import LoadTeacherTargetsd, TeacherTargetCache
from .trainer import LOSS_TERMS, KDTrainer, loss_terms

__all__ = [
    "BottleneckHook",
    "BottleneckKLLoss",
    "FrozenTeacher",
    "KDLoss",
    "KDNetObjective",
    "KDTrainer",
    "LOSS_TERMS",
    "LoadTeacherTargetsd",
    "TeacherTargetCache",
    "load_teacher_weights",
    "loss_terms",
]
