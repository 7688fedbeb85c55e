"""``KDTrainer``: MONAI's ``SupervisedTrainer`` with the KD-Net objective (Eq. 5).

``SupervisedTrainer`` calls ``loss_function(pred, label)``; KD-Net's loss also needs the Teacher's
logits and bottleneck and the Student's bottleneck. The Teacher's tensors come from the batch
(written by :class:`~.teacher.FrozenTeacher`, or precomputed in cached mode), the Student's
bottleneck from a forward hook, and each term of the objective is put into
``engine.state.output`` so that the stats handlers can log it (see :func:`loss_terms`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer

from .bottleneck import BottleneckHook
from .distillation import FeatureHooks
from .losses import KDNetObjective

__all__ = ["KDTrainer", "loss_terms", "LOSS_TERMS", "METHOD_TERMS"]

#: keys of ``engine.state.output`` holding the total loss (``CommonKeys.LOSS``) and each term of Eq. 5;
#: plain strings so that loggers and TensorBoard tags see ``loss``, not an enum member
LOSS_TERMS = (str(Keys.LOSS), "loss_gt", "loss_kd", "loss_kl")
#: the terms of the other distillation methods (``configs/method_*.json``), logged when the objective uses them
METHOD_TERMS = ("loss_logit", "loss_proto", "loss_feat")


def loss_terms(output: Mapping | list) -> dict[str, float]:
    """``output_transform`` for ``StatsHandler`` / ``TensorBoardStatsHandler``: each loss term as a float.

    Accepts ``engine.state.output`` as a dict or decollated into a list of dicts (where MONAI
    replicates scalars into every item, so the first item is used).
    """
    if isinstance(output, (list, tuple)):
        if not output:
            return {}
        output = output[0]
    return {key: float(output[key]) for key in LOSS_TERMS + tuple(k for k in METHOD_TERMS if k in output)}


class KDTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration computes KD-Net's objective (Eq. 5)::

        L = lambda * L_KD(f_s(x_k), f_t(x)) + (1 - lambda) * L_GT(f_s(x_k), y) + alpha * L_KL(E_s(x_k), E_t(x))

    The iteration follows ``SupervisedTrainer._iteration`` (same events, AMP ``GradScaler``,
    ``optim_set_to_none``, gradient accumulation) with a different loss call. The Teacher's
    logits and bottleneck are read from the batch dictionary at ``teacher_logits_key`` /
    ``teacher_bottleneck_key`` and moved to the trainer's device if they are not already there;
    only the ones whose weight is non-zero are required. The Student's bottleneck is captured by
    a forward hook on the submodule named ``student_bottleneck``, installed only when ``alpha > 0``.

    ``engine.state.output`` holds ``image``, ``label``, ``pred``, ``loss`` (the total, as in
    ``SupervisedTrainer``) and the detached terms ``loss_gt``, ``loss_kd``, ``loss_kl``.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as for ``SupervisedTrainer``.
        loss_function: a :class:`~.losses.KDNetObjective`.
        student_bottleneck: name of the Student's bottleneck submodule (dotted path allowed).
        teacher_logits_key: batch key of the Teacher's logits.
        teacher_bottleneck_key: batch key of the Teacher's bottleneck.
        kwargs: any other ``SupervisedTrainer`` argument (``amp``, ``train_handlers``, ``inferer``, ...),
            except ``compile=True``, which is not supported.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: KDNetObjective,
        student_bottleneck: str = "bottleneck",
        teacher_logits_key: str = "teacher_logits",
        teacher_bottleneck_key: str = "teacher_bottleneck",
        teacher_features_key: str = "teacher_features",
        **kwargs: Any,
    ) -> None:
        if not isinstance(loss_function, KDNetObjective):
            raise TypeError(
                f"KDTrainer needs a KDNetObjective as loss_function, got {type(loss_function).__name__}; "
                "use SupervisedTrainer for a plain (pred, label) loss."
            )
        if kwargs.get("compile", False):
            # the MetaTensor workaround of SupervisedTrainer and the bottleneck hook are untested under torch.compile
            raise ValueError("KDTrainer does not support compile=True; train the student uncompiled.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.teacher_logits_key = teacher_logits_key
        self.teacher_bottleneck_key = teacher_bottleneck_key
        self.teacher_features_key = teacher_features_key
        self.student_hook = BottleneckHook(network, student_bottleneck) if loss_function.needs_bottlenecks else None
        # the decoder levels other distillation methods compare; none for KD-Net's own terms
        levels = loss_function.feature_levels
        self.student_features = FeatureHooks(network, levels) if levels else None

    def _teacher_features(self, engine: KDTrainer, batchdata: Any) -> dict[str, torch.Tensor] | None:
        """``batchdata[teacher_features_key]`` (``{level: tensor}``) on the trainer's device, when the objective needs it."""
        if self.student_features is None:
            return None
        features = batchdata.get(self.teacher_features_key) if isinstance(batchdata, Mapping) else None
        if not isinstance(features, Mapping):
            raise KeyError(
                f"the batch has no {self.teacher_features_key!r} (the teacher's features at "
                f"{list(self.student_features.hooks)}), which this distillation method needs: run the teacher online "
                "(teacher_mode online; the cache holds logits and bottleneck only) with FrozenTeacher's feature_levels."
            )
        device = engine.state.device
        return {k: v if v.device == device else v.to(device, non_blocking=engine.non_blocking) for k, v in features.items()}

    def _teacher_tensor(self, engine: KDTrainer, batchdata: Any, key: str, needed: bool) -> torch.Tensor | None:
        """``batchdata[key]`` on the trainer's device, or ``None`` when the objective does not need it."""
        if not needed:
            return None
        if not isinstance(batchdata, Mapping) or key not in batchdata:
            found = sorted(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
            raise KeyError(
                f"the batch has no {key!r} (found: {found}), which the KD-Net objective needs: attach "
                "scripts.teacher.FrozenTeacher to the trainer's train_handlers, or load cached teacher outputs."
            )
        value = batchdata[key]
        if value.device != engine.state.device:
            value = value.to(engine.state.device, non_blocking=engine.non_blocking)
        return value

    @staticmethod
    def _accumulation_flags(engine: KDTrainer) -> tuple[bool, bool]:
        """(zero the gradients before this step, step the optimizer after it), as in ``SupervisedTrainer``."""
        acc = engine.accumulation_steps
        if acc == 1:
            return True, True
        epoch_length = engine.state.epoch_length
        local_iter = engine.state.iteration - 1
        if epoch_length is not None:
            local_iter %= epoch_length
        last_of_epoch = epoch_length is not None and local_iter + 1 == epoch_length
        return local_iter % acc == 0, (local_iter + 1) % acc == 0 or last_of_epoch

    def _iteration(self, engine: KDTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One KD-Net training step; returns ``engine.state.output`` (see the class docstring).

        Raises:
            ValueError: ``batchdata`` is None.
            KeyError: a Teacher tensor needed by the objective is not in the batch.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        objective: KDNetObjective = engine.loss_function
        teacher_logits = self._teacher_tensor(
            engine, batchdata, self.teacher_logits_key, objective.needs_teacher_logits
        )
        teacher_bottleneck = self._teacher_tensor(
            engine, batchdata, self.teacher_bottleneck_key, objective.needs_bottlenecks
        )
        teacher_features = self._teacher_features(engine, batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        def _compute_pred_loss() -> None:
            if self.student_hook is not None:
                self.student_hook.clear()  # never reuse the previous step's bottleneck
            if self.student_features is not None:
                self.student_features.clear()
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = objective(
                engine.state.output[Keys.PRED],
                targets,
                teacher_logits=teacher_logits,
                student_bottleneck=self.student_hook.output if self.student_hook is not None else None,
                teacher_bottleneck=teacher_bottleneck,
                **(
                    {"student_features": self.student_features.outputs, "teacher_features": teacher_features}
                    if self.student_features is not None
                    else {}
                ),
            )
            engine.state.output[Keys.LOSS] = terms[Keys.LOSS].mean()
            for key in LOSS_TERMS[1:] + tuple(k for k in METHOD_TERMS if k in terms):
                engine.state.output[key] = terms[key].detach()  # for logging only: no graph, no host sync
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        should_zero_grad, should_step = self._accumulation_flags(engine)
        acc = engine.accumulation_steps
        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
