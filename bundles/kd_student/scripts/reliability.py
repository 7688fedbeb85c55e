"""Training that can be killed at any moment and resumed, and that stops loudly on a bad loss.

MONAI's ``CheckpointSaver`` writes non-atomically and Ignite deletes the previous file before
writing the next, so a crash at the wrong moment leaves a truncated or missing checkpoint.
Ignite's ``TerminateOnNan`` ends the run gracefully (exit code 0), which a pipeline would take
for success, and a NaN gradient under a finite loss poisons the weights without any warning. The
two handlers here close those gaps.

Kept byte-identical in every trainable bundle (a bundle must stay self-contained);
``tests/test_bundle_copies.py`` guards against drift.
"""

from __future__ import annotations

import glob
import math
import os
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

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

    The temporary file is ``.<filename>.<random>.tmp`` (Ignite's is an anonymous ``tmpXXXX``): a
    save killed half-way leaves one, and the next successful save of that file removes it. The
    data is fsync'ed before the rename, and a failed write (e.g. a full disk) raises an error that
    names the file and says that the previous one is unchanged.
    """

    def __init__(self, dirname: str, filename: str | None = None, key: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.key = key

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if self.key is not None:
            checkpoint = {self.key: checkpoint}
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as err:
            raise _write_error(path, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                func(checkpoint, f, **self.kwargs)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
            os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, Exception):
                raise _write_error(path, err) from err
            raise
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by an earlier save that was killed half-way

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


def _write_error(path: Path, err: BaseException) -> OSError:
    """A clear error for a failed checkpoint write: the cause (e.g. a full disk) and what survived."""
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__  # torch.save reports a full disk as a RuntimeError raised from the OSError
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else f"{type(err).__name__}: {err}"
    message = (
        f"could not write checkpoint '{path}': {reason}. The previous '{path.name}' (if any) is unchanged "
        "and complete; free disk space or choose another ckpt_dir, then resume."
    )
    return OSError(cause.errno, message) if isinstance(cause, OSError) and cause.errno else OSError(message)


def _check_writable_folder(folder: str) -> None:
    """Fail at start-up, not after the first epoch, when checkpoints cannot be written to ``folder``."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(
            f"checkpoint folder '{folder}' is not a folder (a file of that name exists): set ckpt_dir to a folder."
        )
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        message = f"cannot write checkpoints to '{folder}': {err.strerror}; set ckpt_dir to a writable folder."
        raise OSError(err.errno, message) from err


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
        _check_writable_folder(self.save_dir)
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
