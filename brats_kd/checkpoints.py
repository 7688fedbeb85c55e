"""Checkpoints that survive a kill at any moment, for training that can be resumed.

MONAI's ``CheckpointSaver`` writes non-atomically and Ignite deletes the previous file before
writing the next, so a crash at the wrong moment leaves a truncated or missing checkpoint.
:class:`AtomicCheckpointSaver` closes that gap (writes go through :func:`brats_kd.io.atomic_write`).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from .io import atomic_write


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes through a temporary file and ``os.replace``.

    With a fixed ``filename`` the old file is never deleted first: the atomic replace swaps it, so
    a reader always finds either the previous checkpoint or the new one. Ignite saves the bare
    state dict when ``save_dict`` holds one object; ``key`` puts it back under its name (e.g.
    ``{"model": state_dict}``), the format the bundles document and load.

    The write follows :mod:`brats_kd.io`'s policy (``.<filename>.<random>.tmp``, fsync, rename; a
    temporary file left by a killed save is removed by the next one), and a failed write (e.g. a
    full disk) raises an error that names the file and says that the previous one is unchanged.
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
            atomic_write(path, lambda handle: func(checkpoint, handle, **self.kwargs))
        except Exception as err:
            raise _write_error(path, err) from err

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
    """Fail at start-up, not after the first epoch, when checkpoints cannot be written to ``folder``.

    The folder is created here, on every rank: Ignite's ``DiskSaver`` creates it on rank 0 only, so
    under torchrun a rank > 0 that got here first found no folder and failed (1 run in 3 of an
    ensemble member on 2 gloo processes).
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(
            f"checkpoint folder '{folder}' is not a folder (a file of that name exists): set ckpt_dir to a folder."
        )
    try:
        os.makedirs(folder, exist_ok=True)
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
