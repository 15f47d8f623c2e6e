"""Scratch folders for the large temporary files of a prediction, and their clean-up.

Predicting a slide keeps files of up to several GiB beside its outputs while it runs: the
mask canvas, the reduced levels of the pyramidal mask, a TIFF or probability map being
written. They are removed when prediction ends, even by an exception or Ctrl-C, but not
when the process is killed outright (SIGKILL, the out-of-memory killer, a lost node). So
they all live in one folder per prediction, named after the host (and PID namespace) and
the process, and the next run into the same output folder deletes the folders of
processes of this host that no longer exist. A folder of another host or container (a
shared file system) or of a live process is never touched.
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

__all__ = [
    "SCRATCH_PREFIX",
    "StaleScratch",
    "ended_scratch_folders",
    "remove_stale_scratch",
    "scratch_folder",
    "scratch_size",
]

SCRATCH_PREFIX = ".hisynseg-scratch."


def _host() -> str:
    """Where this process's id means this process: the host name, and on Linux the PID
    namespace, since containers that share an output folder can share a host name too.

    Dots may stay in it: a folder name is parsed from its right (``.pid.random``).
    """
    host = socket.gethostname().replace(os.sep, "_") or "localhost"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return f"{host}-{''.join(c for c in namespace if c.isdigit())}"


# Scratch folders this process is using: an interrupted prediction's folder, left for a
# later one to resume, counts as ended even though its process is this one.
_ACTIVE: set[Path] = set()


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
            folder holds something worth keeping for a later run (saved progress).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host()}.{os.getpid()}.", dir=parent))
    _ACTIVE.add(folder)
    try:
        yield folder
    except BaseException:
        if keep is None or not keep(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        _ACTIVE.discard(folder)


class StaleScratch(NamedTuple):
    """A scratch folder removed because its process had ended.

    Attributes:
        path: The folder.
        pid: The process that had made it.
        size: Bytes it held.
    """

    path: Path
    pid: int
    size: int


def _owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a scratch folder's name, or ``None`` for any other name."""
    if not name.startswith(SCRATCH_PREFIX):
        return None
    parts = name[len(SCRATCH_PREFIX) :].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def scratch_size(folder: Path) -> int:
    """Bytes of the files in a folder."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def ended_scratch_folders(parent: str | os.PathLike[str]) -> list[Path]:
    """The scratch folders in ``parent`` of processes of this host that have ended (and
    this process's own that it no longer uses); none where processes cannot be probed
    safely (Windows)."""
    parent = Path(parent)
    # os.kill(pid, 0) on Windows would terminate the process rather than probe it.
    if os.name == "nt" or not parent.is_dir():
        return []
    host, ended = _host(), []
    for entry in sorted(parent.iterdir()):
        owner = _owner(entry.name)
        if owner is None or owner[0] != host or entry.is_symlink() or not entry.is_dir():
            continue
        pid = owner[1]
        if pid == os.getpid():
            if entry not in _ACTIVE:
                ended.append(entry)
        elif not _process_exists(pid):
            ended.append(entry)
    return ended


def remove_stale_scratch(
    parent: str | os.PathLike[str], keep: Callable[[Path], bool] | None = None
) -> list[StaleScratch]:
    """Delete the scratch folders in ``parent`` left by ended processes of this host.

    Args:
        parent: The output folder.
        keep: Folders for which this is true stay (saved progress a later run resumes).

    Returns:
        What was removed.
    """
    removed = []
    for folder in ended_scratch_folders(parent):
        if keep is not None and keep(folder):
            continue
        owner = _owner(folder.name)
        size = scratch_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if owner is not None and not folder.exists():
            removed.append(StaleScratch(folder, owner[1], size))
    return removed
