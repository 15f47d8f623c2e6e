"""What every slide reader offers, and helpers shared by the readers.

A reader gives access to an image pyramid: level 0 is the full resolution, each further
level a reduced copy (``downsample`` level-0 pixels per level pixel). Regions are read in
the level's own pixel coordinates and come back as ``h×w×3`` ``uint8`` RGB; whatever lies
outside the image is white (glass), so tiles that hang over an edge need no special case.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np

from hisynseg.errors import HisynsegError

__all__ = [
    "LEVEL_TOLERANCE",
    "MPP_RANGE",
    "LevelledReader",
    "SlideReadError",
    "SlideReader",
    "best_level",
    "fill_region",
    "plausible_mpp",
    "read_thumbnail",
    "to_rgb_uint8",
]

# Resolutions outside this range (µm per pixel) are taken for placeholder metadata: a
# TIFF written at 72 or 300 dpi by a generic tool claims 353 or 85 µm/px, which no
# microscope scan has at level 0.
MPP_RANGE = (0.01, 20.0)


class SlideReadError(HisynsegError, OSError):
    """A slide or image could not be opened or read; the message names the file and why."""


@runtime_checkable
class SlideReader(Protocol):
    """An image pyramid, read region by region.

    Attributes:
        path: The file.
        dimensions: ``(width, height)`` of level 0.
        level_dimensions: ``(width, height)`` of every level, level 0 first.
        level_downsamples: Level-0 pixels per pixel of every level (1.0 first).
        mpp: Microns per level-0 pixel, or ``None`` when the file does not say.
        is_slide: Whether this is a whole-slide image (a pyramid or a slide format), as
            opposed to a plain picture; decides the default mask format.
    """

    path: Path

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp(self) -> float | None: ...

    @property
    def is_slide(self) -> bool: ...

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height×width×3`` ``uint8`` RGB whose top-left pixel is ``(x, y)`` of ``level``."""
        ...

    def close(self) -> None: ...


class LevelledReader:
    """What every reader shares: the pyramid's geometry, kept in ``_dims`` (``(width,
    height)`` per level), ``_downsamples`` and ``_mpp`` by the subclass's constructor, and
    use as a context manager that calls the subclass's ``close``."""

    path: Path
    _dims: tuple[tuple[int, int], ...]
    _downsamples: tuple[float, ...]
    _mpp: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def reopener(self) -> Callable[[str], SlideReader] | None:
        """A picklable callable that opens this reader's file again (in a worker process),
        or ``None`` when reopening would cost too much (a plain picture decoded whole)."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plausible_mpp(value: float | None) -> float | None:
    """``value`` if it is a believable level-0 resolution in µm/px, else ``None``."""
    if value is None or not math.isfinite(value):
        return None
    return float(value) if MPP_RANGE[0] <= value <= MPP_RANGE[1] else None


def to_rgb_uint8(
    array: np.ndarray, path: str | os.PathLike[str], alpha: str = "straight"
) -> np.ndarray:
    """``h×w×3`` ``uint8`` RGB from grey, grey+alpha, RGB or RGBA data of 8 or 16 bits.

    An alpha sample is composited over white, the colour of glass: transparent parts of
    an image (areas a scanner did not capture, often stored as transparent black) read as
    background. 16-bit samples keep their 8 high bits.

    Args:
        array: ``h×w`` or ``h×w×c`` samples, ``c`` in 1-4.
        path: The file, for error messages.
        alpha: What a 2nd/4th sample is: ``"straight"`` alpha, ``"premultiplied"``
            alpha (colours already multiplied by it), or ``"none"`` (not alpha: dropped).

    Raises:
        SlideReadError: Another sample layout or type.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise SlideReadError(f"{path}: unsupported sample type {a.dtype} (expected 8 or 16 bit)")
    channels = a.shape[2]
    if channels not in (1, 2, 3, 4):
        raise SlideReadError(f"{path}: unsupported image with {channels} samples per pixel")
    rgb = np.repeat(a[:, :, :1], 3, axis=2) if channels < 3 else a[:, :, :3]
    if channels in (2, 4) and alpha != "none":
        opacity = a[:, :, -1:]
        if opacity.min() < 255:
            clear = 255 - opacity.astype(np.uint16)
            if alpha == "premultiplied":  # c·α is stored: add white·(1 − α)
                return np.minimum(rgb.astype(np.uint16) + clear, 255).astype(np.uint8)
            # rgb·α + white·(1 − α), rounded, in integers.
            mixed = rgb.astype(np.uint16) * opacity + 255 * clear
            return ((mixed + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


# A level this much coarser than asked is still read (and enlarged by at most this
# much): scanners' reduced levels are seldom an exact multiple of the target, and a
# 0.252 µm/px slide would otherwise be read at level 0 for 1.0 µm/px, 16× the pixels of
# its ×4 level at 1.008 µm/px.
LEVEL_TOLERANCE = 0.03


def best_level(reader: SlideReader, downsample: float) -> int:
    """The coarsest level that still has about the resolution of ``downsample``.

    Reading there and shrinking by the remaining factor gives the requested resolution
    from the fewest pixels; a level up to :data:`LEVEL_TOLERANCE` coarser counts (it is
    then enlarged by that little).
    """
    best = 0
    for i, ds in enumerate(reader.level_downsamples):
        if ds <= downsample * (1 + LEVEL_TOLERANCE) and ds >= reader.level_downsamples[best]:
            best = i
    return best


def read_thumbnail(reader: SlideReader, size: tuple[int, int], band_rows: int = 1024) -> np.ndarray:
    """The whole image shrunk to ``size = (width, height)``, ``height×width×3`` ``uint8``.

    Read from the best level in bands of rows, each shrunk on its own, so that a slide
    without a usable pyramid never has its full-resolution image in memory.
    """
    import cv2

    out_w, out_h = max(1, int(size[0])), max(1, int(size[1]))
    w0, h0 = reader.dimensions
    level = best_level(reader, min(w0 / out_w, h0 / out_h))
    lw, lh = reader.level_dimensions[level]
    if lw * lh <= 4 * band_rows * band_rows:
        region = reader.read_region(level, 0, 0, lw, lh)
        interp = cv2.INTER_AREA if lw >= out_w else cv2.INTER_LINEAR
        return cv2.resize(region, (out_w, out_h), interpolation=interp)
    out = np.empty((out_h, out_w, 3), np.uint8)
    # Output rows [r0, r1) come from level rows [r0·fy, r1·fy): bands of whole output rows.
    fy = lh / out_h
    rows_per_band = max(1, int(band_rows / fy))
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0, y1 = int(round(r0 * fy)), min(lh, max(int(round(r1 * fy)), int(round(r0 * fy)) + 1))
        band = reader.read_region(level, 0, y0, lw, y1 - y0)
        out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
    return out


def fill_region(
    height: int,
    width: int,
    x: int,
    y: int,
    bounds: tuple[int, int],
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """A white ``height×width×3`` canvas and the part of it inside the image.

    Args:
        height: Requested region height.
        width: Requested region width.
        x: Region's left column in level pixels (may be negative).
        y: Region's top row in level pixels (may be negative).
        bounds: ``(width, height)`` of the level.

    Returns:
        ``(canvas, (x0, y0, x1, y1))`` where ``[x0, x1)×[y0, y1)`` is the intersection in
        level pixels, or ``None`` when the region lies wholly outside.
    """
    canvas = np.full((max(height, 0), max(width, 0), 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, bounds[0]), min(y + height, bounds[1])
    if x1 <= x0 or y1 <= y0:
        return canvas, None
    return canvas, (x0, y0, x1, y1)
