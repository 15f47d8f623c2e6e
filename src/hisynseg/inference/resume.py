"""Picking up a slide's prediction where an interrupted run left it.

A large slide on a CPU takes hours, and a batch scheduler's time limit, Ctrl-C or a killed
node would otherwise throw all of it away. Every so often, between two batches, the tile
loop saves its progress (:class:`SlideProgress`: the next tile, the blended sums of the
band of rows still open, the class counts of the rows written) beside the mask canvas
in the prediction's scratch folder (:mod:`hisynseg.inference.scratch`). The rows above
the band are already in the canvas files. A later prediction of the same input into the
same folder, with the same model, options and tile plan (the :func:`fingerprint`),
adopts those files (:func:`adopt_progress`) and goes on from the next tile; the blending
sums are restored exactly, so the outputs equal an uninterrupted run's. Only folders no
process holds can be adopted (:func:`~hisynseg.inference.scratch.claim_ended_scratch`),
which rules out Windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hisynseg.inference.scratch import remove_folder

__all__ = [
    "PROGRESS_SUFFIX",
    "SlideProgress",
    "adopt_progress",
    "discard_progress",
    "find_saved_progress",
    "fingerprint",
    "has_progress",
    "saved_progress_names",
    "tiles_digest",
]

log = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress.npz"


def tiles_digest(tiles: Sequence[tuple[int, int]]) -> str:
    """A short hash of a tile list (positions, in order)."""
    data = np.asarray(tiles, dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(**parts: Any) -> str:
    """A hash of everything a saved progress must agree with (JSON-serialisable parts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass
class SlideProgress:
    """Where a slide's tile loop stands, between two batches.

    Attributes:
        next_tile: Tiles before this index (of the loop's tile list) are blended.
        band_top: First output row not yet written to the canvases.
        sums: ``C×R×W`` blended sums of the band of rows from ``band_top``.
        weights: ``R×W`` blending weights of that band.
        counts: Output pixels per mask value in the rows written (256 entries).
        tiles: :func:`tiles_digest` of the loop's tile list.
        fingerprint: What the prediction must agree with to go on from here.
    """

    next_tile: int
    band_top: int
    sums: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    tiles: str
    fingerprint: str = ""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` atomically (a kill mid-write leaves the previous one) and
        durably (the rows it describes must be made durable first)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {
            "next_tile": self.next_tile,
            "band_top": self.band_top,
            "tiles": self.tiles,
            "fingerprint": self.fingerprint,
        }
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
                sums=self.sums,
                weights=self.weights,
                counts=self.counts,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SlideProgress:
        """Read what :meth:`save` wrote.

        Raises:
            ValueError, OSError: The file is not a saved progress.
        """
        with np.load(path) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8"))
            return cls(
                next_tile=int(meta["next_tile"]),
                band_top=int(meta["band_top"]),
                sums=np.array(data["sums"], np.float32),
                weights=np.array(data["weights"], np.float32),
                counts=np.array(data["counts"], np.int64),
                tiles=str(meta["tiles"]),
                fingerprint=str(meta["fingerprint"]),
            )


def saved_progress_names(folder: Path) -> list[str]:
    """The inputs (output base names) whose progress a scratch folder holds."""
    try:
        return [p.name[: -len(PROGRESS_SUFFIX)] for p in folder.glob(f"*{PROGRESS_SUFFIX}")]
    except OSError:
        return []


def has_progress(folder: Path) -> bool:
    """Whether a scratch folder holds a slide's saved progress."""
    return bool(saved_progress_names(folder))


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path) as data:
            return dict(json.loads(data["meta"].tobytes().decode("utf-8")))
    except Exception:  # a damaged file is simply not resumable
        return None


def find_saved_progress(claimed: Sequence[Path]) -> dict[str, list[Path]]:
    """The claimed scratch folders (:func:`~hisynseg.inference.scratch.claim_ended_scratch`)
    that hold saved progress, by input (output base name)."""
    found: dict[str, list[Path]] = {}
    for folder in claimed:
        for name in saved_progress_names(folder):
            found.setdefault(name, []).append(folder)
    return found


def discard_progress(folders: Sequence[Path]) -> None:
    """Delete claimed scratch folders whose progress no prediction will resume."""
    for folder in folders:
        remove_folder(folder)


def adopt_progress(
    folders: Sequence[Path], name: str, expected: str, scratch: Path
) -> tuple[SlideProgress, Path] | None:
    """Take over the saved progress of ``name`` that one of ``folders`` (scratch folders
    of ended predictions, claimed by this process) holds.

    The files of the folder whose progress of ``name`` has the ``expected`` fingerprint
    and got furthest are moved into ``scratch``; every folder is then removed (progress
    for other options or models, or superseded), since this prediction could never
    resume it.

    Args:
        folders: Claimed scratch folders holding progress of ``name``
            (:func:`find_saved_progress`).
        name: The input's output base name.
        expected: :func:`fingerprint` of this prediction.
        scratch: This prediction's scratch folder.

    Returns:
        The progress and the folder it came from, or ``None``.
    """
    # Of several runs of this input killed in turn, the one that got furthest.
    best: tuple[int, Path] | None = None
    for folder in folders:
        meta = _read_meta(folder / f"{name}{PROGRESS_SUFFIX}")
        if meta is not None and meta.get("fingerprint") == expected:
            done = int(meta.get("next_tile", 0))
            if best is None or done > best[0]:
                best = (done, folder)
    adopted: tuple[SlideProgress, Path] | None = None
    if best is not None:
        folder = best[1]
        try:
            progress = SlideProgress.load(folder / f"{name}{PROGRESS_SUFFIX}")
            # The canvases first, the progress last: cut short, the move leaves no
            # progress without its canvases.
            items = sorted(folder.iterdir(), key=lambda p: p.name.endswith(PROGRESS_SUFFIX))
            for item in items:
                if item.name.startswith(f"{name}."):
                    os.replace(item, scratch / item.name)
            adopted = (progress, folder)
        except Exception as exc:  # damaged, or taken meanwhile: predict from the start
            log.warning("%s: saved progress unusable (%s); predicting from the start", folder, exc)
    discard_progress(folders)
    return adopted
