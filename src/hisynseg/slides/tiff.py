"""Plain and pyramidal TIFF files (and TIFF-based slide formats such as SVS) via tifffile.

Only the tiles or strips a region touches are read and decoded, so a region of a huge
slide costs what its pixels cost. Decoded tiles are kept in a small least-recently-used
cache (:data:`DEFAULT_CACHE_BYTES`): overlapping prediction tiles that straddle the
file's tiles would otherwise decode each stored tile up to four times. Reading is safe
from several threads at once: only the file reads are serialised, decoding runs in
parallel (tifffile's codecs release the GIL). The pyramid is tifffile's view of the first image
series (SubIFDs, Aperio/SVS reduced pages, OME-TIFF levels). The resolution comes from,
in order: an Aperio ``MPP = x`` in the image description, an OME-XML ``PhysicalSizeX``,
or the XResolution/ResolutionUnit tags (centimetre or inch), each kept only when
believable (see :data:`hisynseg.slides.base.MPP_RANGE`).
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from hisynseg.slides.base import (
    LevelledReader,
    SlideReadError,
    fill_region,
    plausible_mpp,
    to_rgb_uint8,
)

__all__ = ["DEFAULT_CACHE_BYTES", "TiffSlideReader", "import_tifffile", "tiff_mpp"]

# Decoded-tile cache per reader: 170 stored 512² RGB tiles, one row of an 85,000 px wide
# level. A row-by-row prediction decodes each stored tile once while two rows fit (levels
# up to about 43,000 px wide); wider ones decode the rows that two tile rows share twice.
DEFAULT_CACHE_BYTES = 128 * 2**20

_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def import_tifffile(path: str | os.PathLike[str] | None = None) -> Any:
    """The ``tifffile`` module, or an error that says how to install it."""
    try:
        import tifffile
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise SlideReadError(
            f'{where}reading and writing TIFF slides needs tifffile: pip install "hisynseg[slides]"'
        ) from None
    return tifffile


def tiff_mpp(description: str | None, tags: Any) -> float | None:
    """Microns per pixel from a TIFF page's description and resolution tags, if believable."""
    desc = description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if match:
        try:
            return plausible_mpp(float(match.group(1)))
        except ValueError:
            pass
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', desc)
    if match:
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', desc)
        factor = _UNIT_TO_UM.get(unit.group(1) if unit else "µm")
        try:
            if factor is not None:
                return plausible_mpp(float(match.group(1)) * factor)
        except ValueError:
            pass
    try:
        xres = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        if xres is None or unit is None:
            return None
        value = xres.value
        per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
        unit = int(unit.value)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    if per_unit <= 0:
        return None
    if unit == 3:  # centimetre
        return plausible_mpp(1e4 / per_unit)
    if unit == 2:  # inch
        return plausible_mpp(25400.0 / per_unit)
    return None


class TiffSlideReader(LevelledReader):
    """A TIFF image or pyramid read region by region with tifffile.

    Args:
        path: The file.
        cache_bytes: Budget of the decoded-tile cache (0: no cache).

    Raises:
        SlideReadError: tifffile is missing, or the file is not a readable TIFF image.
    """

    def __init__(
        self, path: str | os.PathLike[str], cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_limit = max(0, int(cache_bytes))
        self._cache_size = 0
        self._cache_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        tifffile = import_tifffile(self.path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except FileNotFoundError:
            raise SlideReadError(f"{self.path}: file not found") from None
        except Exception as exc:  # tifffile signals damage with many exception types
            raise SlideReadError(f"{self.path}: not a readable TIFF ({exc})") from None
        try:
            if not self._tif.series:
                raise SlideReadError(f"{self.path}: the TIFF holds no image")
            series = self._tif.series[0]
            levels = getattr(series, "levels", None) or [series]
            pages = [lvl.keyframe for lvl in levels]
            self._pages = [pages[0]] + [p for p in pages[1:] if p.imagewidth <= pages[0].imagewidth]
            for page in self._pages:
                if page.imagedepth > 1:
                    raise SlideReadError(
                        f"{self.path}: volumetric (3-D) TIFF tiles are not supported"
                    )
            self._mpp = tiff_mpp(self._pages[0].description, self._pages[0].tags)
        except SlideReadError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise SlideReadError(f"{self.path}: unusable TIFF structure ({exc})") from None
        w0 = self._pages[0].imagewidth
        self._dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        self._downsamples = tuple(w0 / w for w, _ in self._dims)
        self._lock = threading.Lock()

    def reopener(self) -> functools.partial[TiffSlideReader]:
        # A worker process reads whole batches of neighbouring tiles, whose shared stored
        # tiles a quarter of the cache holds; the rows above its batches were mostly read
        # by other workers, so a larger cache would seldom be hit.
        return functools.partial(TiffSlideReader, cache_bytes=self._cache_limit // 4)

    @property
    def is_slide(self) -> bool:
        return len(self._pages) > 1 or self.path.suffix.lower() in _SLIDE_SUFFIXES

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height×width×3`` ``uint8`` RGB at ``(x, y)`` of ``level`` (white outside).

        Raises:
            SlideReadError: A tile cannot be decoded (damaged file, or a compression that
                needs imagecodecs).
        """
        canvas, inside = fill_region(height, width, x, y, self._dims[level])
        if inside is None:
            return canvas
        x0, y0, x1, y1 = inside
        page = self._pages[level]
        try:
            data = self._read_segments(level, page, x0, y0, x1, y1)
        except SlideReadError:
            raise
        except Exception as exc:
            hint = ""
            if "imagecodecs" in str(exc).lower() or isinstance(
                exc, (KeyError, NotImplementedError)
            ):
                hint = " (this compression needs imagecodecs: pip install imagecodecs)"
            raise SlideReadError(
                f"{self.path}: cannot decode level {level} at ({x0}, {y0}): {exc}{hint}"
            ) from None
        canvas[y0 - y : y1 - y, x0 - x : x1 - x] = to_rgb_uint8(data, self.path)
        return canvas

    def _read_segments(
        self, level: int, page: Any, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        """The pixels ``[y0, y1)×[x0, x1)`` of ``page``, decoding only the segments needed."""
        width, length = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            seg_h, seg_w = min(int(page.rowsperstrip or length), length), width
        across = math.ceil(width / seg_w)
        per_plane = across * math.ceil(length / seg_h)
        samples = int(page.samplesperpixel)
        planes = samples if page.planarconfig == 2 and samples > 1 else 1
        if len(page.dataoffsets) != planes * per_plane:
            raise SlideReadError(
                f"{self.path}: unexpected segment layout ({len(page.dataoffsets)} segments "
                f"for {planes}×{per_plane})"
            )
        indices = [
            p * per_plane + ty * across + tx
            for p in range(planes)
            for ty in range(y0 // seg_h, (y1 - 1) // seg_h + 1)
            for tx in range(x0 // seg_w, (x1 - 1) // seg_w + 1)
        ]
        dtype = np.dtype(page.dtype)
        fill = np.iinfo(dtype).max if dtype.kind in "ui" else 1
        out = np.full((y1 - y0, x1 - x0, samples), fill, dtype=dtype)
        for index, segment in self._segments(level, page, indices):
            if segment is None:  # a missing tile: leave it white
                continue
            plane, rest = divmod(index, per_plane)
            sy, sx = (rest // across) * seg_h, (rest % across) * seg_w
            ya, yb = max(sy, y0), min(sy + segment.shape[0], y1)
            xa, xb = max(sx, x0), min(sx + segment.shape[1], x1)
            if yb <= ya or xb <= xa:
                continue
            piece = segment[ya - sy : yb - sy, xa - sx : xb - sx]
            if planes > 1:
                out[ya - y0 : yb - y0, xa - x0 : xb - x0, plane] = piece[..., 0]
            else:
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = piece[..., :samples]
        return out

    def _segments(
        self, level: int, page: Any, indices: list[int]
    ) -> list[tuple[int, np.ndarray | None]]:
        """``(index, h×w×samples segment or None)`` of each segment, cached or decoded."""
        found: dict[int, np.ndarray | None] = {}
        with self._cache_lock:
            for index in indices:
                segment = self._cache.get((level, index))
                if segment is not None:
                    self._cache.move_to_end((level, index))
                    found[index] = segment
            self.cache_hits += len(found)
            self.cache_misses += len(indices) - len(found)
        missing = [i for i in indices if i not in found]
        if missing:
            offsets = [page.dataoffsets[i] for i in missing]
            counts = [page.databytecounts[i] for i in missing]
            # The file handle is shared: read under the lock, decode outside it.
            with self._lock:
                raw = list(self._tif.filehandle.read_segments(offsets, counts, indices=missing))
            for data, index in raw:
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                if segment is not None:
                    segment = segment.reshape(segment.shape[-3:])
                    segment.flags.writeable = False
                    self._remember((level, index), segment)
                found[index] = segment
        return [(i, found[i]) for i in indices]

    def _remember(self, key: tuple[int, int], segment: np.ndarray) -> None:
        if segment.nbytes > self._cache_limit:
            return
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = segment
            self._cache_size += segment.nbytes
            while self._cache_size > self._cache_limit:
                _, dropped = self._cache.popitem(last=False)
                self._cache_size -= dropped.nbytes

    def close(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._cache_size = 0
        self._tif.close()
