"""Stop training loudly on a bad loss, poisoned weights or a collapsing mixed-precision loss scale.

Ignite's ``TerminateOnNan`` ends the run gracefully (exit code 0), which a pipeline would take for
success, and a NaN gradient under a finite loss poisons the weights without any warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

__all__ = ["StopOnNonFiniteLoss", "all_finite"]


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor on the tensors' device: every element of every tensor is finite.

    ``torch._foreach_norm`` computes all L2 norms in a few fused kernels; a norm is NaN or infinite
    exactly when its tensor holds a NaN or an infinity (or values near float32's maximum, which a
    healthy network never has). Nothing is read on the host here: the caller decides when to sync.
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


class StopOnNonFiniteLoss:
    """Raise on a NaN or infinite training loss or network weight, before a checkpoint could be written.

    Raising (rather than Ignite's graceful ``TerminateOnNan``) makes the run exit non-zero, so a
    script or experiment runner cannot mistake the failure for a finished training. The weights of
    the engine's ``network`` are checked too: a NaN gradient under a finite loss (e.g. the derivative
    of ``sqrt`` at 0) turns them into NaN silently, and an epoch ending there would otherwise save
    them into ``checkpoint.pt`` and, as their all-empty predictions can score well on cases without
    some region, even into the best ``model.pt``.

    Cost: after every iteration the loss and one fused norm over all weights (:func:`all_finite`)
    are folded into a flag on the training device; the flag is read on the host (one sync) every
    ``check_interval`` iterations and after the last iteration of every epoch, i.e. before the epoch's
    ``EPOCH_COMPLETED`` handlers (validation, which writes the best ``model.pt``, and the checkpoint
    savers) run. With ``check_interval > 1`` a failure is reported up to that many iterations late,
    never after a checkpoint. (An ``EPOCH_COMPLETED`` check remains for loaders without a length.)

    Float16 mixed precision (a ``GradScaler`` in ``engine.scaler``): on an overflow step the scaler
    finds infinite *gradients* on purpose, skips the optimizer step and halves its scale; the weights
    and the (unscaled) loss stay finite, so such steps pass. What the weight check cannot see is a
    run whose every step overflows: the weights freeze while the scale shrinks toward zero. The
    guard stops when the scale falls below ``min_loss_scale`` (from 65536, that is 16 halvings more
    than growths; bfloat16 needs no scaler).
    """

    def __init__(
        self,
        output_transform: Callable = lambda output: output[CommonKeys.LOSS],
        check_interval: int = 1,
        min_loss_scale: float = 1.0,
    ) -> None:
        if isinstance(check_interval, bool) or int(check_interval) != check_interval or check_interval < 1:
            raise ValueError(f"check_interval must be a positive integer, got {check_interval!r}")
        self.output_transform = output_transform
        self.check_interval = int(check_interval)
        self.min_loss_scale = float(min_loss_scale)
        self._loss_ok: torch.Tensor | None = None
        self._weights_ok: torch.Tensor | None = None
        self._first_unchecked = 1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def _parameters(self, engine: Engine) -> list[torch.Tensor]:
        network = getattr(engine, "network", None)
        return list(network.parameters()) if isinstance(network, torch.nn.Module) else []

    def __call__(self, engine: Engine) -> None:
        """``ITERATION_COMPLETED``: fold this step's loss and weights into the flags; check every ``check_interval``."""
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        losses = [self.output_transform(output) for output in outputs]
        loss_ok = torch.stack(
            [torch.isfinite(torch.as_tensor(loss).detach().float()).all() for loss in losses]
        ).all()
        weights_ok = all_finite(self._parameters(engine)).to(loss_ok.device)
        self._loss_ok = loss_ok if self._loss_ok is None else self._loss_ok & loss_ok.to(self._loss_ok.device)
        self._weights_ok = weights_ok if self._weights_ok is None else self._weights_ok & weights_ok.to(self._weights_ok.device)
        epoch_length = getattr(engine.state, "epoch_length", None)
        last_of_epoch = bool(epoch_length) and engine.state.iteration % epoch_length == 0
        # the last iteration of an epoch is always read: its EPOCH_COMPLETED runs validation and the model savers
        if engine.state.iteration % self.check_interval == 0 or last_of_epoch:
            self.check(engine)

    def _loss_value(self, engine: Engine) -> float:
        """The current iteration's loss (the first item's, mean over its elements) as a float, for the message."""
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        values = [float(torch.as_tensor(self.output_transform(o)).detach().float().mean()) for o in outputs]
        return next((v for v in values if not math.isfinite(v)), values[0])

    def check(self, engine: Engine) -> None:
        """Read the flags on the host (one synchronisation) and raise if anything went non-finite."""
        first, last = self._first_unchecked, engine.state.iteration
        where = f"at epoch {engine.state.epoch}, iteration {last}" if first >= last else (
            f"at epoch {engine.state.epoch}, between iterations {first} and {last}"
        )
        self._first_unchecked = last + 1
        loss_ok, weights_ok = self._loss_ok, self._weights_ok
        self._loss_ok = self._weights_ok = None
        if loss_ok is not None and not bool(loss_ok):
            value = self._loss_value(engine) if first >= last else "NaN or infinite"
            raise RuntimeError(
                f"training loss is {value} {where}: stopping; the checkpoints on disk are those of the last "
                "completed epoch."
            )
        if weights_ok is not None and not bool(weights_ok):
            params = getattr(engine, "network", None)
            bad = next((n for n, p in params.named_parameters() if not bool(torch.isfinite(p).all())), "?")
            raise RuntimeError(
                f"network weight '{bad}' became NaN or infinite {where} although the loss was finite (a NaN or "
                "infinite gradient): stopping; the checkpoints on disk are those of the last completed epoch."
            )
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
            if scale < self.min_loss_scale:
                raise RuntimeError(
                    f"the mixed-precision loss scale fell to {scale:g} {where} (below {self.min_loss_scale:g}): "
                    "nearly every step overflows in float16 and is skipped, so the weights no longer change. "
                    "Stopping; train in bfloat16 or float32, or lower the learning rate."
                )
