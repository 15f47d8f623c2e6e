"""Whole-slide formats through OpenSlide (an optional extra: ``hisynseg[slides]``).

OpenSlide reads the vendor formats tifffile cannot (MIRAX ``.mrxs``, Ventana, Hamamatsu
``.vms``, ...) and is preferred for ``.svs``/``.ndpi`` when installed. Transparent parts
of a slide (outside its scanned area) are composited onto white.
"""

from __future__ import annotations

import os
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

__all__ = ["OpenSlideReader", "import_openslide"]


def import_openslide(path: str | os.PathLike[str] | None = None) -> Any:
    """The ``openslide`` module, or an error that says how to install it."""
    try:
        import openslide
    except ImportError as exc:
        where = f"{path}: " if path is not None else ""
        raise SlideReadError(
            f"{where}this slide format needs OpenSlide: "
            f'pip install "hisynseg[slides]" (installs openslide-python and openslide-bin) '
            f"[{exc}]"
        ) from None
    return openslide


def _tiff_mpp_of(path: Path) -> float | None:
    """The resolution tifffile finds in a TIFF-based slide's first page, if any: OpenSlide
    reads an SVS it classes as generic TIFF without the Aperio ``MPP``, for instance."""
    try:
        import tifffile

        from hisynseg.slides.tiff import tiff_mpp

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return tiff_mpp(page.description, page.tags)
    except Exception:  # not a TIFF (MIRAX, VMS), or tifffile missing: no resolution
        return None


class OpenSlideReader(LevelledReader):
    """A slide read with OpenSlide.

    Args:
        path: The slide file (for MIRAX, the ``.mrxs`` beside its data folder).

    Raises:
        SlideReadError: OpenSlide is not installed, or cannot open the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        openslide = import_openslide(self.path)
        if not self.path.is_file():
            raise SlideReadError(f"{self.path}: file not found")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise SlideReadError(f"{self.path}: OpenSlide cannot open it ({exc})") from None
        props = self._slide.properties
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                values.append(float(props[key]))
            except (KeyError, TypeError, ValueError):
                pass
        self._mpp = plausible_mpp(sum(values) / len(values)) if values else None
        if self._mpp is None and props.get("openslide.vendor") == "generic-tiff":
            # Its level 0 is the file's first page, whose description tifffile reads.
            self._mpp = _tiff_mpp_of(self.path)
        self._dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    def reopener(self) -> type[OpenSlideReader]:
        return OpenSlideReader

    @property
    def is_slide(self) -> bool:
        return True

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height×width×3`` ``uint8`` RGB at ``(x, y)`` of ``level`` (white outside)."""
        canvas, inside = fill_region(height, width, x, y, self._dims[level])
        if inside is None:
            return canvas
        x0, y0, x1, y1 = inside
        ds = self._downsamples[level]
        try:
            region = self._slide.read_region(
                (int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0)
            )
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot read level {level} at ({x0}, {y0}): {exc}"
            ) from None
        # openslide-python hands back straight (not premultiplied) RGBA.
        canvas[y0 - y : y1 - y, x0 - x : x1 - x] = to_rgb_uint8(np.asarray(region), self.path)
        return canvas

    def close(self) -> None:
        self._slide.close()
