"""One experiment runner per output folder.

Two ``tools.experiment`` runs on the same ``--out`` would train the same checkpoints twice and
interleave their writes. The runner holds an advisory lock (``flock``) on ``<out>/.runner.lock`` for
its whole life; the file names the holder. The kernel releases the lock when the holding process
dies, however it dies, so a lock left by a killed runner is simply taken over by the next one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import IO

LOCK_NAME = ".runner.lock"
_held: dict[Path, IO] = {}  # open lock files of this process: closing one would release its lock


class FolderBusy(RuntimeError):
    """Another live runner holds the folder's lock."""


def runner_command() -> str:
    """This runner's command line, shell-quoted so that an argument with spaces (``--subsets "flair t1,t2"``)
    reruns as given."""
    return shlex.join([Path(sys.executable).name, "-m", "tools.experiment", *sys.argv[1:]])


def acquire_folder(folder: Path) -> str | None:
    """Lock ``folder`` for this process until it exits.

    Returns the previous holder's line when a lock left by a runner that is gone was taken over
    (``None`` for a fresh folder). Raises :class:`FolderBusy`, naming the holder, when a live
    runner holds it.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 -- kept open: the lock lives as long as the file
    handle.seek(0)
    previous = handle.read().strip() or None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FolderBusy(
            f"another experiment runner is using {folder}: {previous or 'a process that has not written its name yet'}. "
            "Wait for it to finish or stop it, or choose another --out."
        ) from None
    handle.seek(0)
    handle.truncate()
    started = dt.datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {runner_command()}\n")
    handle.flush()
    _held[folder] = handle
    return previous
