"""Ordinary pictures (PNG, JPEG, BMP) as a one-level "slide", read whole into memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hisynseg.datasets.io import read_rgb
from hisynseg.slides.base import LevelledReader, fill_region, plausible_mpp, to_rgb_uint8

__all__ = ["PlainImageReader"]


class PlainImageReader(LevelledReader):
    """A picture held in memory, served through the :class:`SlideReader` interface.

    Args:
        path: The image file (read with :func:`hisynseg.datasets.io.read_rgb`).
        image: The pixels, when already in memory (``path`` then only names them).
        mpp: Microns per pixel, if known (pictures rarely record it believably).

    Raises:
        ImageReadError: The file is missing or not a readable image.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image: np.ndarray | None = None,
        mpp: float | None = None,
    ) -> None:
        self.path = Path(path)
        self._image = read_rgb(self.path) if image is None else to_rgb_uint8(image, self.path)
        self._mpp = plausible_mpp(mpp)
        self._dims = ((int(self._image.shape[1]), int(self._image.shape[0])),)
        self._downsamples = (1.0,)

    @property
    def is_slide(self) -> bool:
        return False

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height×width×3`` ``uint8`` RGB at ``(x, y)`` (white outside the picture)."""
        if level != 0:
            raise ValueError(f"{self.path}: a plain image has only level 0, not {level}")
        canvas, inside = fill_region(height, width, x, y, self.dimensions)
        if inside is not None:
            x0, y0, x1, y1 = inside
            canvas[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return canvas

    def close(self) -> None:
        self._image = np.zeros((0, 0, 3), np.uint8)
