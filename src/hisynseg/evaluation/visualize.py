"""Pictures of predictions: palette masks as RGB, colour overlays, comparison panels.

Everything here works on ``numpy`` arrays (``H×W×3`` ``uint8`` images, ``H×W`` index
masks) and returns new arrays; writing them is the caller's job (through the atomic
writers of :mod:`hisynseg.datasets.io`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["colorize_mask", "overlay_mask", "comparison_panel"]


def _palette_lut(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """A 256-entry lookup table; indices beyond the palette map to black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) > 256:
        raise ValueError(f"a palette has at most 256 colours, got {len(colours)}")
    lut[: len(colours)] = colours
    return lut


def colorize_mask(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Render an ``H×W`` index mask as an ``H×W×3`` ``uint8`` RGB image with ``palette``.

    Args:
        mask: Class indices (any integer dtype, values 0–255).
        palette: RGB triple of every index, in index order.

    Returns:
        The colour image; indices without a palette entry are black.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask values must lie in 0..255")
    return _palette_lut(palette)[mask.astype(np.uint8)]


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    alpha: float = 0.45,
    skip_index: int | None = None,
) -> np.ndarray:
    """Blend the colours of ``mask`` over ``image``.

    Args:
        image: ``H×W×3`` ``uint8`` RGB image.
        mask: ``H×W`` index mask of the same size.
        palette: RGB triple of every index.
        alpha: Weight of the mask colour (0 shows the image only, 1 the mask only).
        skip_index: Pixels with this index keep the plain image (e.g. background, whose
            white would only wash the tissue out).

    Returns:
        The blended ``H×W×3`` ``uint8`` image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {image.shape}")
    if image.shape[:2] != np.shape(mask):
        raise ValueError(f"image {image.shape[:2]} and mask {np.shape(mask)} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mask = np.asarray(mask)
    out = np.empty(image.shape, np.uint8)
    # In bands of rows: float copies of a whole slide thumbnail would take ~16 bytes per
    # pixel and channel at once.
    for top in range(0, image.shape[0], 256):
        rows = slice(top, top + 256)
        colours = colorize_mask(mask[rows], palette).astype(np.float32)
        blend = (1.0 - alpha) * image[rows].astype(np.float32) + alpha * colours
        if skip_index is not None:
            keep = mask[rows] == skip_index
            blend[keep] = image[rows][keep]
        out[rows] = np.clip(np.rint(blend), 0, 255)
    return out


def comparison_panel(
    image: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    palette: Sequence[Sequence[int]],
    gap: int = 4,
    gap_colour: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Side by side: the image | its ground truth | the prediction, separated by ``gap`` px.

    Returns:
        An ``H×(3W+2·gap)×3`` ``uint8`` image.
    """
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    for name, m in (("ground truth", ground_truth), ("prediction", prediction)):
        if np.shape(m) != (h, w):
            raise ValueError(f"{name} {np.shape(m)} and image {(h, w)} differ in size")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    panel = np.empty((h, 3 * w + 2 * gap, 3), dtype=np.uint8)
    panel[:] = np.asarray(gap_colour, dtype=np.uint8)
    panel[:, :w] = image
    panel[:, w + gap : 2 * w + gap] = colorize_mask(ground_truth, palette)
    panel[:, 2 * w + 2 * gap :] = colorize_mask(prediction, palette)
    return panel
