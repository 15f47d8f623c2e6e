"""Plain and pyramidal TIFF files (and TIFF-based slide formats such as SVS) via tifffile.

Only the tiles or strips a region touches are read and decoded, so a region of a huge
slide costs what its pixels cost. Decoded tiles are kept in a small least-recently-used
cache (:data:`DEFAULT_CACHE_BYTES`): overlapping prediction tiles that straddle the
file's tiles would otherwise decode each stored tile up to four times. Reading is safe
from several threads at once: only the file reads are serialised, decoding runs in
parallel (tifffile's codecs release the GIL). Uncompressed strips are read as byte ranges
of the rows needed, however tall the strip. The pyramid is the largest image of the file
with every reduced copy of it found: tifffile's levels, SubIFDs, pages marked "reduced"
(see :func:`_pyramid_pages`). The resolution comes from, in order: an Aperio
``MPP = x`` in the image description, the first image's OME-XML ``PhysicalSizeX``, or
the XResolution/ResolutionUnit tags (with an ImageJ ``unit=`` for unit-less ones), each
kept only when believable (see :data:`hisynseg.slides.base.MPP_RANGE`). Min-is-white and
palette images are shown as displayed, alpha over white; CMYK is refused, as is a file
cut short.
"""

from __future__ import annotations

import contextlib
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
_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "\\u00b5m": 1.0,  # ImageJ escapes the micro sign in its description
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


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


def _unit_to_um(unit: str | None) -> float | None:
    """Microns per ``unit`` (µm when ``None``), or ``None`` for a unit not of length."""
    if unit is None:
        return 1.0
    key = unit.strip().lower().replace("\u03bc", "\u00b5")  # Greek mu -> micro sign
    return _UNIT_TO_UM.get(key)


def _ome_mpp(description: str, size: tuple[int, int] | None = None) -> float | None:
    """``PhysicalSizeX`` in µm of the OME-XML image of ``size = (width, height)`` (the
    first image when none has that size, or no size is given), if it says."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    # Each image (slide, label, macro, overview) has its own Pixels and resolution.
    all_pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not all_pixels:
        return None
    pixels = all_pixels[0]
    if size is not None:
        pixels = next(
            (
                el
                for el in all_pixels
                if (el.get("SizeX"), el.get("SizeY")) == (str(size[0]), str(size[1]))
            ),
            pixels,
        )
    if pixels.get("PhysicalSizeX") is None:
        return None
    factor = _unit_to_um(pixels.get("PhysicalSizeXUnit"))
    try:
        value = float(pixels.get("PhysicalSizeX", ""))
    except ValueError:
        return None
    return None if factor is None else plausible_mpp(value * factor)


def tiff_mpp(
    description: str | None, tags: Any, size: tuple[int, int] | None = None
) -> float | None:
    """Microns per pixel from a TIFF page's description and resolution tags, if believable.

    In order: an Aperio ``MPP = x``; the ``PhysicalSizeX`` in OME-XML of the image of
    ``size = (width, height)`` (or of the first image); the
    XResolution tag in pixels per inch, centimetre, millimetre or micron (ResolutionUnit
    2-5), or, with ResolutionUnit "none", per the ``unit=`` an ImageJ description names.
    """
    desc = description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if match:
        try:
            return plausible_mpp(float(match.group(1)))
        except ValueError:
            pass
    if desc.lstrip().startswith("<") and "PhysicalSizeX" in desc:
        ome = _ome_mpp(desc, size)
        if ome is not None:
            return ome
    try:
        xres = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        if xres is None:
            return None
        value = xres.value
        per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
        unit = 2 if unit is None else int(unit.value)  # the TIFF default unit is the inch
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    if per_unit <= 0:
        return None
    um_per_unit = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)
    if unit == 1:
        # ImageJ keeps the calibration unit in its description and the tag unit-less.
        named = re.search(r"^unit=(.+)$", desc, re.MULTILINE)
        um_per_unit = _unit_to_um(named.group(1)) if named else None
    return None if um_per_unit is None else plausible_mpp(um_per_unit / per_unit)


# Pages of a multi-page TIFF looked at for reduced levels (a slide has a handful; a
# long image stack is not a pyramid).
_MAX_SCANNED_PAGES = 64
_PHOTOMETRIC_SUPPORTED = {0: "min-is-white", 1: "min-is-black", 2: "RGB", 3: "palette", 6: "YCbCr"}


_VENDOR_LAYOUTS = ("svs", "ndpi", "scn", "philips", "bif")


def _area(page: Any) -> int:
    return int(page.imagewidth) * int(page.imagelength)


def _pyramid_pages(tif: Any, path: Path) -> list[Any]:
    """Level 0 and the reduced copies of it found in ``tif``, largest first.

    Level 0 is the largest image among tifffile's series (an overview stored first must
    not win). Reduced levels are the levels tifffile groups with it plus any SubIFD of
    level 0 and any page marked "reduced" with level 0's shape: tifffile groups only
    levels at one steady step of 2, 3 or 4, and without the others every read at a low
    resolution would decode level 0. Files of the vendors tifffile knows (Aperio,
    Hamamatsu, Leica, Philips, Ventana) keep tifffile's levels only.
    """
    keyframes = [s.keyframe for s in tif.series if s.keyframe is not None]
    if not keyframes:
        raise SlideReadError(f"{path}: the TIFF holds no image")
    base = max(keyframes, key=_area)  # max keeps the first of equals
    if base.imagedepth > 1:
        raise SlideReadError(f"{path}: volumetric (3-D) TIFF tiles are not supported")
    candidates: list[Any] = []
    for series in tif.series:
        if series.keyframe is base:
            candidates += [level.keyframe for level in series.levels[1:]]
    if any(getattr(tif, f"is_{vendor}", False) for vendor in _VENDOR_LAYOUTS):
        # tifffile knows these vendors' pyramids; their label and macro pages may be
        # marked "reduced" too.
        reduced = [p for p in candidates if int(p.imagewidth) < int(base.imagewidth)]
        return [base, *sorted(reduced, key=lambda p: -int(p.imagewidth))]
    for i, offset in enumerate(base.subifds or ()):
        if offset >= 8:
            with contextlib.suppress(Exception):  # a damaged SubIFD is no level
                tif.filehandle.seek(offset)
                candidates.append(type(base)(tif, (base.index, i)))
    for index in range(min(len(tif.pages), _MAX_SCANNED_PAGES)):
        with contextlib.suppress(Exception):
            page = tif.pages[index]
            if getattr(page, "is_reduced", False):
                candidates.append(page)
    levels = {int(base.imagewidth): base}
    for page in candidates:
        if _is_reduced_copy(page, base) and int(page.imagewidth) not in levels:
            levels[int(page.imagewidth)] = page
    return [levels[w] for w in sorted(levels, reverse=True)]


def _is_reduced_copy(page: Any, base: Any) -> bool:
    """Whether ``page`` can be a reduced level of ``base``: smaller, the same samples and
    colour, and the same aspect ratio to within a pixel's rounding."""
    try:
        w, h = int(page.imagewidth), int(page.imagelength)
        w0, h0 = int(base.imagewidth), int(base.imagelength)
        same_kind = (
            page.samplesperpixel == base.samplesperpixel
            and page.dtype == base.dtype
            and page.photometric == base.photometric
            and page.imagedepth == 1
        )
    except Exception:
        return False
    if not same_kind or not 0 < w < w0 or not 0 < h < h0:
        return False
    return abs(h - h0 * w / w0) <= 1 + 0.005 * h


def _check_colour(page: Any, path: Path) -> None:
    photometric = int(page.photometric)
    if photometric == 5:
        raise SlideReadError(
            f"{path}: CMYK (separated) colour is not supported; convert the file to RGB"
        )
    if (
        photometric == 6
        and int(page.compression) not in _JPEG_COMPRESSIONS
        and tuple(page.subsampling or (1, 1)) != (1, 1)
    ):
        raise SlideReadError(
            f"{path}: chroma-subsampled YCbCr without JPEG compression is not supported"
        )
    if photometric not in _PHOTOMETRIC_SUPPORTED:
        raise SlideReadError(
            f"{path}: photometric interpretation {photometric} is not supported (expected "
            + ", ".join(_PHOTOMETRIC_SUPPORTED.values())
            + ")"
        )


def _check_complete(pages: list[Any], path: Path) -> None:
    """Refuse a truncated file at opening, not with a decode error (or, for JPEG, a
    silently grey tile) at the first read past its end."""
    size = int(pages[0].parent.filehandle.size)
    for level, page in enumerate(pages):
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        present = counts > 0
        if not present.any():
            continue
        end = int((offsets[present] + counts[present]).max())
        if end > size:
            raise SlideReadError(
                f"{path}: the file is truncated: it has {size} bytes, but the image data "
                f"of level {level} runs to byte {end}"
            )


def _rows_addressable(page: Any) -> bool:
    """Whether any rows of ``page`` can be read straight from the file: uncompressed,
    stripped, interleaved, in whole bytes per sample, one strip after another."""
    return (
        not page.is_tiled
        and int(page.compression) == 1
        and int(page.planarconfig) == 1
        and int(page.bitspersample) in (8, 16)
        and int(getattr(page, "fillorder", 1)) == 1
        and min(page.databytecounts, default=0) > 0
        and len(page.dataoffsets)
        == math.ceil(
            int(page.imagelength)
            / min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
        )
    )


_JPEG_COMPRESSIONS = (6, 7)  # old-style and new-style JPEG: tifffile decodes to RGB


def _colour_samples(page: Any) -> int:
    return 3 if int(page.photometric) in (2, 6) else 1


def _alpha_kind(page: Any) -> str:
    """What the first extra sample of ``page`` is, as :func:`to_rgb_uint8` names it."""
    if int(page.samplesperpixel) <= _colour_samples(page):
        return "none"
    extra = tuple(page.extrasamples or (0,))
    return {1: "premultiplied", 2: "straight"}.get(int(extra[0]), "none")


def _as_shown(data: np.ndarray, page: Any, path: Path) -> np.ndarray:
    """Colour samples as displayed (min-is-white inverted, palette indices looked up,
    uncompressed YCbCr converted), extra samples (alpha) as they are."""
    photometric = int(page.photometric)
    colour = _colour_samples(page)
    shown, extra = data[..., :colour], data[..., colour:]
    if photometric == 0 and data.dtype.kind == "u":
        shown = np.iinfo(data.dtype).max - shown
    elif photometric == 3 and page.colormap is not None:
        colormap = np.asarray(page.colormap)  # 3×2**bits, 16-bit
        if colormap.max() < 256:  # some writers store 8-bit values
            colormap = colormap * 257
        index = shown[..., 0]
        if index.size and int(index.max()) >= colormap.shape[1]:
            raise SlideReadError(
                f"{path}: palette index {int(index.max())} beyond the colour map's "
                f"{colormap.shape[1]} entries"
            )
        shown = np.moveaxis(colormap[:, index], 0, -1).astype(np.uint16)
        if extra.dtype == np.uint8:
            extra = extra.astype(np.uint16) * 257
    elif photometric == 6 and int(page.compression) not in _JPEG_COMPRESSIONS:
        import cv2

        if data.dtype != np.uint8:
            raise SlideReadError(f"{path}: YCbCr of {data.dtype} samples is not supported")
        # TIFF's default YCbCr is full-range BT.601, as OpenCV's YCrCb (Cr, Cb swapped).
        shown = cv2.cvtColor(np.ascontiguousarray(shown[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    if extra.shape[-1] == 0:
        return shown
    return np.concatenate([shown, extra.astype(shown.dtype)], axis=-1)


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
            self._pages = _pyramid_pages(self._tif, self.path)
            _check_colour(self._pages[0], self.path)
            _check_complete(self._pages, self.path)
            base = self._pages[0]
            # OME-XML, on the first page only, describes every image of the file.
            description = self._tif.pages.first.description if self._tif.is_ome else ""
            self._mpp = tiff_mpp(
                description or base.description,
                base.tags,
                (int(base.imagewidth), int(base.imagelength)),
            )
        except SlideReadError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise SlideReadError(f"{self.path}: unusable TIFF structure ({exc})") from None
        self._alpha = _alpha_kind(self._pages[0])
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
        missing: list[tuple[int, int, int, int]] = []
        try:
            if _rows_addressable(page):
                data = self._read_rows(page, x0, y0, x1, y1)
            else:
                data = self._read_segments(level, page, x0, y0, x1, y1, missing)
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
        shown = _as_shown(data, page, self.path)
        canvas[y0 - y : y1 - y, x0 - x : x1 - x] = to_rgb_uint8(shown, self.path, self._alpha)
        for ya, yb, xa, xb in missing:  # tiles the file leaves out: glass
            canvas[ya - y : yb - y, xa - x : xb - x] = 255
        return canvas

    def _read_segments(
        self,
        level: int,
        page: Any,
        x0: int,
        y0: int,
        x1: int,
        y1: int,
        missing: list[tuple[int, int, int, int]],
    ) -> np.ndarray:
        """The pixels ``[y0, y1)×[x0, x1)`` of ``page``, decoding only the segments needed.

        The level-pixel boxes ``(y0, y1, x0, x1)`` of tiles the file does not hold are
        added to ``missing`` (their samples are left at 0).
        """
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
        out = np.zeros((y1 - y0, x1 - x0, samples), dtype=np.dtype(page.dtype))
        for index, segment in self._segments(level, page, indices):
            plane, rest = divmod(index, per_plane)
            sy, sx = (rest // across) * seg_h, (rest % across) * seg_w
            if segment is None:  # a missing tile, whitened once the colours are shown
                box = (max(sy, y0), min(sy + seg_h, y1), max(sx, x0), min(sx + seg_w, x1))
                if box[1] > box[0] and box[3] > box[2]:
                    missing.append(box)
                continue
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

    def _read_rows(self, page: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The pixels ``[y0, y1)×[x0, x1)`` of an uncompressed stripped page, read as
        byte ranges of just those rows: ImageJ and many converters write the whole image
        as one strip, which decoding a strip at a time would read whole for every tile."""
        width, length = int(page.imagewidth), int(page.imagelength)
        rows_per_strip = min(int(page.rowsperstrip or length), length)
        samples = int(page.samplesperpixel)
        dtype = np.dtype(page.dtype).newbyteorder(page.parent.byteorder)
        row_bytes = width * samples * dtype.itemsize
        pixel_bytes = samples * dtype.itemsize
        # A narrow region of a wide image reads its columns of each row, not whole rows.
        by_row = 4 * (x1 - x0) < width
        cols = x1 - x0 if by_row else width
        out = np.empty((y1 - y0, cols, samples), dtype)
        for strip in range(y0 // rows_per_strip, (y1 - 1) // rows_per_strip + 1):
            top = strip * rows_per_strip
            ra, rb = max(top, y0), min(top + rows_per_strip, y1)
            offset = int(page.dataoffsets[strip]) + (ra - top) * row_bytes
            with self._lock:
                fh = self._tif.filehandle
                if by_row:
                    raw = bytearray()
                    for row in range(rb - ra):
                        fh.seek(offset + row * row_bytes + x0 * pixel_bytes)
                        raw += fh.read(cols * pixel_bytes)
                else:
                    fh.seek(offset)
                    raw = fh.read((rb - ra) * row_bytes)
            if len(raw) != (rb - ra) * cols * pixel_bytes:
                raise SlideReadError(f"{self.path}: rows {ra}-{rb} lie past the end of the file")
            out[ra - y0 : rb - y0] = np.frombuffer(raw, dtype).reshape(rb - ra, cols, samples)
        region = out if by_row else out[:, x0:x1]
        return region.astype(dtype.newbyteorder("="), copy=False)

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
