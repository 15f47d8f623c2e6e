"""Finding tissue on a slide, so that tiles of bare glass are never sent to the network.

Stained tissue is coloured, glass is white or grey: the saturation channel separates
them. A threshold is chosen once per slide by Otsu's method on a low-resolution thumbnail
and kept within ``[min_threshold, max_threshold]``: an image that is all tissue has no
glass mode, and Otsu would then split pale from dark tissue; an image of bare glass would
have its noise called tissue. The thumbnail mask (smoothed, specks removed) decides which
tiles are worth predicting; the same threshold applied to each tile's own pixels marks
glass inside predicted tiles, which the network (trained on tissue classes only) cannot
label itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from hisynseg.slides.base import SlideReader, read_thumbnail

__all__ = ["TissueDetector", "pixel_tissue_mask", "saturation"]


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0–255, ``uint8``) of an ``h×w×3`` ``uint8`` RGB image."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]


def pixel_tissue_mask(rgb: np.ndarray, threshold: float) -> np.ndarray:
    """Tissue (``True``) per pixel of an RGB tile: smoothed saturation above ``threshold``."""
    sat = cv2.GaussianBlur(saturation(rgb), (0, 0), 1.0)
    return sat > threshold


@dataclass
class TissueDetector:
    """Tissue mask of one slide, from a thumbnail.

    Build it with :meth:`fit`. Attributes:
        threshold: Saturation above which a pixel is tissue.
        mask: Thumbnail tissue mask (``bool``), ``mask.shape = (th, tw)``.
        scale: Level-0 pixels per thumbnail pixel, ``(sx, sy)``.
    """

    threshold: float
    mask: np.ndarray
    scale: tuple[float, float]
    # Summed-area table of ``mask``: a box's tissue count in four look-ups.
    _integral: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def fit(
        cls,
        reader: SlideReader,
        max_side: int = 2048,
        min_threshold: float = 15.0,
        max_threshold: float = 40.0,
    ) -> TissueDetector:
        """Threshold and thumbnail mask of ``reader``'s image.

        Args:
            reader: The slide.
            max_side: Longest side of the thumbnail.
            min_threshold: Lowest saturation threshold (keeps glass noise out).
            max_threshold: Highest threshold (keeps pale tissue in on all-tissue images).
        """
        w0, h0 = reader.dimensions
        f = max(1.0, max(w0, h0) / max_side)
        tw, th = max(1, round(w0 / f)), max(1, round(h0 / f))
        thumb = read_thumbnail(reader, (tw, th))
        sat = cv2.GaussianBlur(saturation(thumb), (0, 0), 1.0)
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, min_threshold, max_threshold))
        mask = (sat > threshold).astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        return cls(threshold, mask.astype(bool), (w0 / tw, h0 / th))

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Share of tissue in the part of the level-0 box ``[x, x+width)×[y, y+height)``
        that lies inside the image (0 for a box wholly outside).

        Only the inside part counts: a tile hanging over the image's edge, or one larger
        than a small image, would otherwise have its tissue diluted by the empty outside
        and be skipped as background.
        """
        integral = self._integral
        if integral is None:
            integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.int64)
            self._integral = integral
        th, tw = self.mask.shape
        sx, sy = self.scale
        x0 = int(np.clip(np.floor(x / sx), 0, tw))
        y0 = int(np.clip(np.floor(y / sy), 0, th))
        x1 = int(np.clip(np.ceil((x + width) / sx), 0, tw))
        y1 = int(np.clip(np.ceil((y + height) / sy), 0, th))
        if x1 <= x0 or y1 <= y0:
            return 0.0
        inside_w = min(x + width, tw * sx) - max(x, 0.0)
        inside_h = min(y + height, th * sy) - max(y, 0.0)
        area = max(1.0, (inside_w / sx) * (inside_h / sy))
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return float(min(1.0, inside / area))

    def pixel_mask(self, rgb: np.ndarray) -> np.ndarray:
        """Tissue (``True``) per pixel of an RGB tile, by the slide's threshold."""
        return pixel_tissue_mask(rgb, self.threshold)
