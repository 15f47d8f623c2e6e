"""Scratch folders for the large temporary files of a prediction, and their clean-up.

Predicting a slide keeps files of up to several GiB beside its outputs while it runs: the
mask canvas, the reduced levels of the pyramidal mask, a TIFF, GeoJSON or probability map
being written, the saved progress. They are removed when prediction ends, even by an
exception or Ctrl-C, but not when the process is killed outright (SIGKILL, the
out-of-memory killer, a lost node). So they all live in one folder per prediction, whose
process holds an exclusive lock on the folder's ``.owner`` file for as long as it uses
it. The kernel releases the lock when the process ends, however it ends, so a folder
whose lock can be taken belongs to no one: a later run *claims* it (takes the lock),
resumes its progress or deletes it. Unlike process ids, the lock means the same in
another container on the same host, and after a container restarts. A folder whose lock
is held (a live prediction, here or on another host of a shared file system with working
locks), or that has no ``.owner`` file, is never touched.

Where file locks are missing (Windows) folders are never claimed, and so never kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CAN_CLAIM",
    "SCRATCH_PREFIX",
    "StaleScratch",
    "claim_ended_scratch",
    "remove_scratch",
    "resumable_folder",
    "scratch_folder",
    "scratch_size",
]

SCRATCH_PREFIX = ".hisynseg-scratch."
OWNER_FILE = ".owner"
# Whether ended folders can be told from live ones (and so kept for a later run).
CAN_CLAIM = fcntl is not None


def _host() -> str:
    # For people reading folder names only: ownership is the lock.
    return socket.gethostname().replace(os.sep, "_").replace(".", "_") or "localhost"


def _lock(path: Path, create: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` when the
    lock is held elsewhere (or locks do not work there, or the file is missing)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def scratch_folder(
    parent: str | os.PathLike[str], keep: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """A new folder in ``parent`` for this process's temporary files, removed on exit.

    Being in ``parent`` keeps it on the outputs' file system, so files finished in it can
    be renamed into place.

    Args:
        parent: The output folder.
        keep: Asked when the block ends with an exception (Ctrl-C included): whether the
            folder holds something worth keeping for a later run (saved progress). Never
            asked where folders cannot be claimed (:data:`CAN_CLAIM`).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host()}.{os.getpid()}.", dir=parent))
    owner = _lock(folder / OWNER_FILE, create=True)
    if owner is None:
        # No lock here (a file system without them): without its .owner file no run will
        # ever take the folder for abandoned, and it is not kept for one either.
        (folder / OWNER_FILE).unlink(missing_ok=True)
    try:
        yield folder
    except BaseException:
        if owner is None or keep is None or not keep(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if owner is not None:
            os.close(owner)


def resumable_folder(folder: Path) -> bool:
    """Whether a later run could claim this scratch folder (its owner holds a lock)."""
    return (folder / OWNER_FILE).is_file()


@contextlib.contextmanager
def claim_ended_scratch(parent: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """The scratch folders in ``parent`` that no process uses, locked by this one until the
    block ends, so that no other run resumes or deletes them meanwhile."""
    held: list[tuple[Path, int]] = []
    parent = Path(parent)
    try:
        if CAN_CLAIM and parent.is_dir():
            for entry in sorted(parent.iterdir()):
                if not entry.name.startswith(SCRATCH_PREFIX) or entry.is_symlink():
                    continue
                if not entry.is_dir():
                    continue
                fd = _lock(entry / OWNER_FILE, create=False)
                if fd is not None:
                    held.append((entry, fd))
        yield [folder for folder, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)


class StaleScratch(NamedTuple):
    """A scratch folder removed because no process used it.

    Attributes:
        path: The folder.
        pid: The process that had made it (from its name), if known.
        size: Bytes it held.
    """

    path: Path
    pid: int | None
    size: int


def _pid(name: str) -> int | None:
    """The process id in a scratch folder's name (``PREFIX.host.pid.random``)."""
    parts = name[len(SCRATCH_PREFIX) :].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def scratch_size(folder: Path) -> int:
    """Bytes of the files in a folder."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def remove_scratch(
    claimed: list[Path], keep: Callable[[Path], bool] | None = None
) -> list[StaleScratch]:
    """Delete claimed scratch folders (:func:`claim_ended_scratch`).

    Args:
        claimed: Folders this process holds the lock of.
        keep: Folders for which this is true stay (saved progress a later run resumes).

    Returns:
        What was removed.
    """
    removed = []
    for folder in claimed:
        if keep is not None and keep(folder):
            continue
        size = scratch_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(StaleScratch(folder, _pid(folder.name), size))
    return removed
