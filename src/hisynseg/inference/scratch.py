"""Scratch folders for the large temporary files of a prediction, and their clean-up.

Predicting a slide keeps files of up to several GiB beside its outputs while it runs: the
mask canvas, the reduced levels of the pyramidal mask, a TIFF, GeoJSON or probability map
being written, the saved progress. They are removed when prediction ends, even by an
exception or Ctrl-C, but not when the process is killed outright (SIGKILL, the
out-of-memory killer, a lost node). So they all live in one folder per prediction, and a
later run into the same output folder *claims* the folders nobody uses any more: it
resumes their progress or deletes them.

Who uses a folder: its prediction holds an exclusive lock on the folder's ``.owner`` file
for as long as it runs, and the kernel releases the lock when the process ends, however it
ends. A folder is created under another name and renamed once its lock is held, so no run
ever sees a live folder unlocked. Locks are exact within one kernel (containers included,
and after a container restarts), so there a free lock is enough. Some shared file systems
keep locks on each host (BeeGFS by default, NFS mounted without locking): a folder made
under another kernel must also have stopped its heartbeat (the owner touches ``.owner``
every :data:`HEARTBEAT_SECONDS`) for :data:`STALE_SECONDS`. A folder without ``.owner``
(where locks fail, or not made by a prediction) is never touched, and where there are no
file locks at all (Windows) nothing is claimed, and so nothing is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CAN_CLAIM",
    "HEARTBEAT_SECONDS",
    "SCRATCH_PREFIX",
    "STALE_SECONDS",
    "ScratchClaims",
    "StaleScratch",
    "claim_ended_scratch",
    "remove_folder",
    "resumable_folder",
    "scratch_folder",
    "scratch_size",
]

SCRATCH_PREFIX = ".hisynseg-scratch."
# Where a folder is made, before its lock is held (never claimed).
_NEW_PREFIX = ".hisynseg-new."
OWNER_FILE = ".owner"
# Whether ended folders can be told from live ones (and so kept for a later run).
CAN_CLAIM = fcntl is not None
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 10 * HEARTBEAT_SECONDS


def _host() -> str:
    # For people reading folder names only.
    return socket.gethostname().replace(os.sep, "_").replace(".", "_") or "localhost"


def _kernel() -> str:
    """What identifies the running kernel (within it, file locks are exact): Linux's boot
    id, the same in every container of a machine; elsewhere the host name."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"host:{socket.gethostname()}"


def _lock(path: Path, create: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` when the
    lock is held elsewhere (or locks do not work there, or the file is gone)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Locked, but maybe a file its owner deleted meanwhile (a folder being removed
        # at the end of its prediction): that is no folder to claim.
        st = os.fstat(fd)
        now = os.stat(path)
        if st.st_nlink == 0 or (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise OSError("the file was replaced or removed")
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_folder(folder: Path) -> None:
    """Delete a scratch folder, its ``.owner`` file last: killed half-way, what is left
    still has its owner file, so a later run can claim and finish it."""
    with contextlib.suppress(OSError):
        for entry in list(folder.iterdir()):
            if entry.name == OWNER_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
    with contextlib.suppress(OSError):
        (folder / OWNER_FILE).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _heartbeat(owner: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):
            os.utime(owner)


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
            asked where the folder could not be locked (:func:`resumable_folder`).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=parent))
    owner = None
    try:
        owner = _lock(new / OWNER_FILE, create=True)
        if owner is None:
            # No lock here (Windows, a file system without them): without its .owner file
            # no run will ever take the folder for abandoned, nor is it kept for one.
            (new / OWNER_FILE).unlink(missing_ok=True)
        else:
            os.write(owner, f"{_kernel()}\n{_host()}\n{os.getpid()}\n".encode())
        suffix = new.name[len(_NEW_PREFIX) :]
        folder = parent / f"{SCRATCH_PREFIX}{_host()}.{os.getpid()}.{suffix}"
        os.rename(new, folder)
    except BaseException:
        # Never seen by a claim (not a scratch name yet): nothing else would remove it.
        if owner is not None:
            os.close(owner)
        remove_folder(new)
        raise
    stop = threading.Event()
    try:
        if owner is not None:
            threading.Thread(
                target=_heartbeat,
                args=(folder / OWNER_FILE, stop),
                name="scratch-heartbeat",
                daemon=True,
            ).start()
        yield folder
    except BaseException:
        if owner is None or keep is None or not keep(folder):
            remove_folder(folder)
        raise
    else:
        remove_folder(folder)
    finally:
        stop.set()
        if owner is not None:
            os.close(owner)


def resumable_folder(folder: Path) -> bool:
    """Whether a later run could claim this scratch folder (its owner holds a lock)."""
    return (folder / OWNER_FILE).is_file()


def _abandoned(folder: Path, fd: int) -> bool:
    """With its lock held by us: whether the folder's owner has surely ended (see the
    module docstring)."""
    try:
        with open(folder / OWNER_FILE, encoding="utf-8", errors="replace") as fh:
            kernel = fh.readline().strip()
        age = time.time() - os.fstat(fd).st_mtime
    except OSError:
        return False
    return kernel == _kernel() or age > STALE_SECONDS


class ScratchClaims:
    """Scratch folders this process has claimed (locked), released by :meth:`release` or
    at the end of :func:`claim_ended_scratch`'s block.

    Attributes:
        folders: The claimed folders still held, in name order.
    """

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}

    @property
    def folders(self) -> list[Path]:
        return sorted(self._held)

    def hold(self, folder: Path, fd: int) -> None:
        self._held[folder] = fd

    def release(self, folders: Sequence[Path]) -> None:
        """Let other runs claim these folders again."""
        for folder in folders:
            fd = self._held.pop(folder, None)
            if fd is not None:
                os.close(fd)

    def release_all(self) -> None:
        self.release(list(self._held))


@contextlib.contextmanager
def claim_ended_scratch(parent: str | os.PathLike[str]) -> Iterator[ScratchClaims]:
    """The scratch folders in ``parent`` that no process uses, locked by this one until the
    block ends (or :meth:`ScratchClaims.release`), so that no other run resumes or deletes
    them meanwhile."""
    claims = ScratchClaims()
    parent = Path(parent)
    try:
        if CAN_CLAIM and parent.is_dir():
            for entry in sorted(parent.iterdir()):
                if not entry.name.startswith(SCRATCH_PREFIX) or entry.is_symlink():
                    continue
                if not entry.is_dir():
                    continue
                fd = _lock(entry / OWNER_FILE, create=False)
                if fd is None:
                    continue
                if _abandoned(entry, fd):
                    claims.hold(entry, fd)
                else:
                    os.close(fd)
        yield claims
    finally:
        claims.release_all()


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


def remove_scratch(claimed: Sequence[Path]) -> list[StaleScratch]:
    """Delete claimed scratch folders (:func:`claim_ended_scratch`).

    Args:
        claimed: Folders this process holds the lock of.

    Returns:
        What was removed.
    """
    removed = []
    for folder in claimed:
        size = scratch_size(folder)
        remove_folder(folder)
        if not folder.exists():
            removed.append(StaleScratch(folder, _pid(folder.name), size))
    return removed
