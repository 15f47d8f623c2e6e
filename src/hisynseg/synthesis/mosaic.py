"""Mosaic synthesis (METHOD.md §3): four tiled grid images combined around a random anchor.

One sample is made as follows (reference settings in brackets):

1. A *grid image* is ``tiles_per_side × tiles_per_side`` tiles [2×2 of 112 px]. Each tile
   is a random ``tile_size`` crop of a random single-label source (reflect-padded,
   centred, when the source is smaller); its mask is that source's class. Where the dataset
   has white background in its training patches, background pixels get the background
   index and a tile is redrawn while more than ``max_background_share`` of it is
   background.
2. An anchor ``(h, w) = (S·U(a, b), S·U(a, b))`` [a, b = 0.2, 0.8] is drawn, each rounded
   up to even, splitting the ``S×S`` output [224] into four quadrants. Each quadrant takes
   a fresh grid image after a flip [p 0.8; horizontal, vertical or both, as
   albumentations' ``Flip``], a shift-scale-rotate [p 0.8; shift ±0.0625, scale ±0.2,
   rotation ±45°] and a random crop to the quadrant's size.
3. The image-level label is the set of classes present in the final mask (computed by the
   caller with ``spec.labels_from_mask``).

Speed: flip, shift-scale-rotate and crop are composed into one affine map per quadrant,
and a single ``cv2.warpAffine`` renders just the quadrant's pixels (bilinear for the image,
nearest for the mask, both with reflect-101 borders so the mask stays aligned) instead of
transforming whole grid images and cropping them. Tiles are copied from the in-memory pool.

**Pitfall of the reference** (WSSS4LUAD): its background test summed mask *values*
(``np.sum(mask[mask == 3]) < 0.8·area``), so a tile was accepted only below about 27 %
background although 80 % was meant. Here ``max_background_share`` is a true fraction of
the tile's pixels (default 0.8, as intended); set it to 0.8/3 ≈ 0.267 to reproduce the
reference's effective limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from hisynseg.synthesis.pool import SourcePool, SynthesisError, Synthesized

__all__ = [
    "MosaicParams",
    "MosaicParamsError",
    "TILE_SAMPLING",
    "mosaic",
    "quadrant_matrix",
    "anchor",
]

TILE_SAMPLING = ("image", "class")


class MosaicParamsError(SynthesisError, ValueError):
    """Mosaic parameters that cannot work together."""


@dataclass(frozen=True)
class MosaicParams:
    """Settings of the Mosaic synthesis (defaults: the paper's ``mosaic_2_112``).

    Attributes:
        tiles_per_side: Tiles along each side of a grid image.
        tile_size: Side of each tile in pixels.
        output_size: Side of the synthesized image; at most the grid side
            (``tiles_per_side·tile_size``), since each quadrant is a crop of a grid image.
        anchor_range: The anchor is drawn as ``output_size·U(*anchor_range)`` per axis,
            then rounded up to even.
        flip_p: Probability of flipping a grid image (then horizontal, vertical or both,
            each with probability 1/3).
        ssr_p: Probability of a shift-scale-rotate of a grid image.
        shift_limit: Shift as a fraction of the grid side, drawn from ``±shift_limit``.
        scale_limit: Scale drawn from ``1 ± scale_limit``.
        rotate_limit: Rotation in degrees drawn from ``±rotate_limit``.
        tile_sampling: ``"image"``: each tile's source is uniform over all single-label
            images, so classes appear in proportion to their pool size (the reference);
            ``"class"``: a class is first drawn uniformly among the classes that have
            sources, then one of its images.
        max_background_share: A tile is redrawn while more than this fraction of its
            pixels is background (datasets with background in training patches only).
        max_tile_draws: Give up (error) after this many redraws of one tile.
    """

    tiles_per_side: int = 2
    tile_size: int = 112
    output_size: int = 224
    anchor_range: tuple[float, float] = (0.2, 0.8)
    flip_p: float = 0.8
    ssr_p: float = 0.8
    shift_limit: float = 0.0625
    scale_limit: float = 0.2
    rotate_limit: float = 45.0
    tile_sampling: str = "image"
    max_background_share: float = 0.8
    max_tile_draws: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_range", tuple(float(v) for v in self.anchor_range))
        if self.tiles_per_side < 1 or self.tile_size < 1:
            raise MosaicParamsError("mosaic: tiles_per_side and tile_size must be at least 1")
        if not 2 <= self.output_size <= self.grid_size:
            raise MosaicParamsError(
                f"mosaic: output_size {self.output_size} must be between 2 and the grid side "
                f"tiles_per_side·tile_size = {self.grid_size}"
            )
        if len(self.anchor_range) != 2:
            raise MosaicParamsError("mosaic: anchor_range must be (low, high)")
        lo, hi = self.anchor_range
        if not 0.0 < lo <= hi < 1.0:
            raise MosaicParamsError(
                f"mosaic: anchor_range {self.anchor_range} must satisfy 0 < low <= high < 1"
            )
        low_h, high_h = anchor(self.output_size, lo), anchor(self.output_size, hi)
        if low_h < 1 or high_h > self.output_size - 1:
            raise MosaicParamsError(
                f"mosaic: anchor_range {self.anchor_range} leaves an empty quadrant at "
                f"output_size {self.output_size}"
            )
        for name in ("flip_p", "ssr_p", "max_background_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MosaicParamsError(f"mosaic: {name} must be in [0, 1]")
        if self.shift_limit < 0 or self.rotate_limit < 0 or not 0 <= self.scale_limit < 1:
            raise MosaicParamsError(
                "mosaic: shift_limit and rotate_limit must be >= 0, scale_limit in [0, 1)"
            )
        if self.tile_sampling not in TILE_SAMPLING:
            raise MosaicParamsError(
                f"mosaic: tile_sampling {self.tile_sampling!r} must be one of {TILE_SAMPLING}"
            )
        if self.max_tile_draws < 1:
            raise MosaicParamsError("mosaic: max_tile_draws must be at least 1")

    @property
    def grid_size(self) -> int:
        """Side of a grid image."""
        return self.tiles_per_side * self.tile_size


def anchor(size: int, fraction: float) -> int:
    """``int(size·fraction)`` rounded up to even (the reference's ``h += h % 2``)."""
    value = int(size * fraction)
    return value + value % 2


def _pad_reflect(
    image: np.ndarray, background: np.ndarray | None, side: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Centre-pad to at least ``side×side`` by reflection (albumentations' PadIfNeeded)."""
    h, w = image.shape[:2]
    ph, pw = max(0, side - h), max(0, side - w)
    pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    # numpy's "reflect" is OpenCV's REFLECT_101 and, unlike cv2, copes with pads wider
    # than the image.
    image = np.pad(image, (*pads, (0, 0)), mode="reflect")
    if background is not None:
        background = np.pad(background, pads, mode="reflect")
    return image, background


def _draw_tile(
    pool: SourcePool, rng: np.random.Generator, params: MosaicParams, present: tuple[int, ...]
) -> tuple[int, np.ndarray, np.ndarray | int]:
    """One tile: ``(pool index, image crop, mask value or crop)``."""
    t = params.tile_size
    for _ in range(params.max_tile_draws):
        if params.tile_sampling == "image":
            index = int(rng.integers(len(pool)))
        else:
            index = pool.pick(present[int(rng.integers(len(present)))], rng)
        image, bg = pool.images[index], pool.background[index]
        if image.shape[0] < t or image.shape[1] < t:
            image, bg = _pad_reflect(image, bg, t)
        y = int(rng.integers(image.shape[0] - t + 1))
        x = int(rng.integers(image.shape[1] - t + 1))
        crop_bg = None if bg is None else bg[y : y + t, x : x + t]
        if crop_bg is not None and np.count_nonzero(crop_bg) > params.max_background_share * t * t:
            continue
        return index, image[y : y + t, x : x + t], pool.class_mask(index, crop_bg)
    raise SynthesisError(
        f"mosaic: no {t}px tile with at most {params.max_background_share:.0%} background "
        f"in {params.max_tile_draws} draws; the sources are mostly background — raise "
        "max_background_share or check the dataset's background threshold"
    )


def _grid(
    pool: SourcePool,
    rng: np.random.Generator,
    params: MosaicParams,
    present: tuple[int, ...],
    used: list[int],
) -> tuple[np.ndarray, np.ndarray]:
    g, t = params.grid_size, params.tile_size
    image = np.empty((g, g, 3), dtype=np.uint8)
    mask = np.empty((g, g), dtype=np.uint8)
    for row in range(params.tiles_per_side):
        for col in range(params.tiles_per_side):
            index, tile, tile_mask = _draw_tile(pool, rng, params, present)
            ys, xs = slice(row * t, (row + 1) * t), slice(col * t, (col + 1) * t)
            image[ys, xs] = tile
            mask[ys, xs] = tile_mask
            used.append(index)
    return image, mask


def quadrant_matrix(
    rng: np.random.Generator, params: MosaicParams, height: int, width: int
) -> np.ndarray:
    """The ``2×3`` affine map from grid-image pixels to one ``height×width`` quadrant.

    It composes, in this order, the random flip, the random shift-scale-rotate (about the
    grid centre, as albumentations' ShiftScaleRotate) and the random crop offset, so that
    one ``cv2.warpAffine`` gives what flip → shift-scale-rotate → crop would.
    """
    g = params.grid_size
    matrix = np.eye(3)
    if rng.random() < params.flip_p:
        mode = int(rng.integers(3))  # 0: vertical, 1: horizontal, 2: both (albu.Flip)
        flip = np.eye(3)
        if mode in (1, 2):
            flip[0, 0], flip[0, 2] = -1.0, g - 1.0
        if mode in (0, 2):
            flip[1, 1], flip[1, 2] = -1.0, g - 1.0
        matrix = flip @ matrix
    if rng.random() < params.ssr_p:
        angle = math.radians(rng.uniform(-params.rotate_limit, params.rotate_limit))
        scale = rng.uniform(1.0 - params.scale_limit, 1.0 + params.scale_limit)
        dx = rng.uniform(-params.shift_limit, params.shift_limit) * g
        dy = rng.uniform(-params.shift_limit, params.shift_limit) * g
        # cv2.getRotationMatrix2D about the pixel-grid centre, then the shift.
        a, b = scale * math.cos(angle), scale * math.sin(angle)
        c = (g - 1) / 2.0
        ssr = np.array(
            [[a, b, (1 - a) * c - b * c + dx], [-b, a, b * c + (1 - a) * c + dy], [0, 0, 1]]
        )
        matrix = ssr @ matrix
    y0 = int(rng.integers(g - height + 1))
    x0 = int(rng.integers(g - width + 1))
    crop = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
    return (crop @ matrix)[:2]


def mosaic(pool: SourcePool, rng: np.random.Generator, params: MosaicParams) -> Synthesized:
    """Make one Mosaic sample.

    Args:
        pool: Single-label sources.
        rng: The only source of randomness; the same generator state gives the same sample.
        params: Mosaic settings.

    Returns:
        The image, its mask and the pool indices of the 4·tiles_per_side² tiles' sources.

    Raises:
        SynthesisError: No acceptable tile in ``max_tile_draws`` draws.
    """
    s = params.output_size
    h = anchor(s, rng.uniform(*params.anchor_range))
    w = anchor(s, rng.uniform(*params.anchor_range))
    present = pool.present_classes
    image = np.empty((s, s, 3), dtype=np.uint8)
    mask = np.empty((s, s), dtype=np.uint8)
    used: list[int] = []
    for y, x, qh, qw in ((0, 0, h, w), (0, w, h, s - w), (h, 0, s - h, w), (h, w, s - h, s - w)):
        grid_image, grid_mask = _grid(pool, rng, params, present, used)
        matrix = quadrant_matrix(rng, params, qh, qw)
        image[y : y + qh, x : x + qw] = cv2.warpAffine(
            grid_image, matrix, (qw, qh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        mask[y : y + qh, x : x + qw] = cv2.warpAffine(
            grid_mask, matrix, (qw, qh), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
        )
    return Synthesized(image, mask, tuple(used))
