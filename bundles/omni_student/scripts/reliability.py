"""Training that can be killed at any moment and resumed, and that stops loudly on a bad loss.

MONAI's ``CheckpointSaver`` writes non-atomically and Ignite deletes the previous file before
writing the next, so a crash at the wrong moment leaves a truncated or missing checkpoint.
Ignite's ``TerminateOnNan`` ends the run gracefully (exit code 0), which a pipeline would take
for success. The two handlers here close those gaps.

Kept byte-identical in every trainable bundle (a bundle must stay self-contained);
``tests/test_bundle_copies.py`` guards against drift.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver
from monai.utils import CommonKeys


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes through a temporary file and ``os.replace``.

    With a fixed ``filename`` the old file is never deleted first: the atomic replace swaps it, so
    a reader always finds either the previous checkpoint or the new one. Ignite saves the bare
    state dict when ``save_dict`` holds one object; ``key`` puts it back under its name (e.g.
    ``{"model": state_dict}``), the format the bundles document and load.
    """

    def __init__(self, dirname: str, filename: str | None = None, key: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.key = key

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if self.key is not None:
            checkpoint = {self.key: checkpoint}
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` with atomic writes and a resumable best-metric record.

    Arguments are those of ``CheckpointSaver``, plus ``interval_filename``: a fixed file name for the
    interval (resume) checkpoint, atomically replaced at every save. ``state_dict`` / ``load_state_dict`` carry the
    best key-metric score, so put this handler into the full (resume) checkpoint's ``save_dict``:
    after a resume, ``model.pt`` is only replaced by a model that beats the best one so far.
    Files always map names to state dicts, even for one object: ``{"model": state_dict}``.
    """

    def __init__(self, *args, interval_filename: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        key = next(iter(self.save_dict)) if len(self.save_dict) == 1 else None
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint):
            if checkpoint is not None:
                filename = checkpoint.save_handler.filename
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=filename, key=key)
        if self._interval_checkpoint is not None:
            # A fixed name (e.g. "checkpoint.pt") lets a resume find the latest state without a search.
            self._interval_checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=interval_filename, key=key)

    def state_dict(self) -> OrderedDict:
        if self._key_metric_checkpoint is None:
            return OrderedDict()
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class StopOnNonFiniteLoss:
    """Raise on a NaN or infinite training loss, before the epoch's checkpoint could be written.

    Raising (rather than Ignite's graceful ``TerminateOnNan``) makes the run exit non-zero, so a
    script or experiment runner cannot mistake the failure for a finished training.
    """

    def __init__(self, output_transform: Callable = lambda output: output[CommonKeys.LOSS]) -> None:
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            loss = self.output_transform(output)
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                raise RuntimeError(
                    f"training loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                    "stopping; the checkpoints on disk are those of the last completed epoch."
                )
