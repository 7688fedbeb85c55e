"""Stop training loudly on a bad loss or poisoned weights.

Ignite's ``TerminateOnNan`` ends the run gracefully (exit code 0), which a pipeline would take for
success, and a NaN gradient under a finite loss poisons the weights without any warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys


class StopOnNonFiniteLoss:
    """Raise on a NaN or infinite training loss or network weight, before a checkpoint could be written.

    Raising (rather than Ignite's graceful ``TerminateOnNan``) makes the run exit non-zero, so a
    script or experiment runner cannot mistake the failure for a finished training. The weights of
    the engine's ``network`` are checked after every iteration too: a NaN gradient under a finite
    loss (e.g. the derivative of ``sqrt`` at 0) turns them into NaN silently, and an epoch ending
    there would otherwise save them into ``checkpoint.pt`` and, as their all-empty predictions can
    score well on cases without some region, even into the best ``model.pt``.
    """

    def __init__(self, output_transform: Callable = lambda output: output[CommonKeys.LOSS]) -> None:
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        where = f"at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            loss = self.output_transform(output)
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                raise RuntimeError(
                    f"training loss is {value} {where}: stopping; the checkpoints on disk are those of the last "
                    "completed epoch."
                )
        network = getattr(engine, "network", None)
        if isinstance(network, torch.nn.Module):
            bad = next((name for name, p in network.named_parameters() if not bool(torch.isfinite(p).all())), None)
            if bad is not None:
                raise RuntimeError(
                    f"network weight '{bad}' became NaN or infinite {where} although the loss was finite (a NaN or "
                    "infinite gradient): stopping; the checkpoints on disk are those of the last completed epoch."
                )
