"""Atomic file output, the one implementation in the project: a reader (or a run killed half-way)
sees either the old file or the complete new one, never a torn write.

Policy, the same for every file: the data goes to ``.<name>.<random>.tmp`` in the target's folder
(``os.replace`` is atomic only within one file system; the leading dot and the ``.tmp`` suffix keep
globs such as ``*.nii.gz`` from picking it up), is fsync'ed, gets the permissions a plain ``open``
would give, and is renamed over the target. On failure the temporary file is removed and the
target left untouched; one left by a killed run is removed by the next write of the same file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import nibabel as nib

__all__ = ["atomic_write", "write_bytes_atomic", "write_json_atomic", "write_nifti_atomic", "write_text_atomic"]

# nibabel's own gzip level for .nii.gz; mtime=0 keeps the bytes reproducible.
NIFTI_GZIP_LEVEL = 1


def _current_umask() -> int:
    """The process umask (reading it requires setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any]) -> None:
    """Call ``writer(handle)`` on a binary temporary file next to ``path``, then move it into place.

    ``writer`` may be anything that writes to a file object (``torch.save``, ``handle.write``...).
    Errors propagate unchanged (callers such as the checkpoint saver add their own context).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by an earlier write that was killed half-way


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically to ``path``.

    Serialising first means an unserialisable object never leaves even a temporary file behind.
    """
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_nifti_atomic(path: str | os.PathLike, image: nib.Nifti1Image) -> None:
    """Write a NIfTI image atomically, gzip-compressed when ``path`` ends in ``.gz``."""
    data = image.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=NIFTI_GZIP_LEVEL, mtime=0)
    write_bytes_atomic(path, data)
