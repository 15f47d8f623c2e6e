"""Bézier synthesis (METHOD.md §3): a random smooth closed shape pastes one class onto another.

One sample is made as follows (reference settings, "bezier224_5_0.2_0.05", in brackets):

1. A pair of distinct classes, A (background) and B (foreground): uniformly random among
   the classes that have sources (LUAD-HistoSeg, BCSS-WSSS), or drawn from an explicit
   list of ``(A, B)`` pairs [WSSS4LUAD: tumor/stroma in both orders, ``((0, 1), (1, 0))``].
2. One single-label source of A and one of B, each resized to ``output_size`` [224].
3. A random closed shape: ``num_points`` [5] points in the unit square, redrawn (at most
   ``max_point_retries`` [200] times) until consecutive points — in counter-clockwise
   order, including the closing pair — are at least ``min_distance`` [0.7/n] apart; scaled
   to the output size; joined by a closed, C1-smooth piecewise cubic Bézier curve (see
   :func:`closed_bezier_curve`) sampled with ``points_per_segment`` [100] points per
   segment; filled as a polygon (``cv2.fillPoly``) → binary shape M.
4. ``image = M·fg + (1−M)·bg`` and ``mask = M·B + (1−M)·A`` (hard paste). For datasets
   with white background in their training patches, background pixels of either source
   get the background index in the mask.

Deviations from the reference, both deliberate:

* The reference's minimum-distance test summed coordinate differences instead of
  measuring Euclidean distance, and skipped the closing pair; here it is the Euclidean
  distance between consecutive counter-clockwise points, closing pair included.
* ``foreground_share`` (default ``(0.05, 0.95)``): the shape is redrawn while its share
  of the image lies outside this range, so that both classes are visibly present and the
  label is truthful. ``(0.0, 1.0)`` disables the guard.

Note: the reference notebooks name their output "bezier224_5_…" but call their
``synthesize_one`` with its default ``n=12``; this package follows METHOD.md (n = 5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from hisynseg.synthesis.pool import INTERPOLATIONS, SourcePool, SynthesisError, Synthesized

__all__ = [
    "BezierParams",
    "BezierParamsError",
    "bezier",
    "ccw_sort",
    "closed_bezier_curve",
    "random_points",
    "shape_mask",
    "choose_pair",
    "check_sources",
]


class BezierParamsError(SynthesisError, ValueError):
    """Bézier parameters that cannot work."""


Pairs = str | tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class BezierParams:
    """Settings of the Bézier synthesis (defaults: the paper's ``bezier224_5_0.2_0.05``).

    Attributes:
        output_size: Side of the synthesized image; sources are resized to it.
        num_points: Points the closed curve passes through (at least 3).
        min_distance: Minimum distance between consecutive points in the unit square;
            ``None`` means ``0.7 / num_points``.
        max_point_retries: Redraws of the points when they are too close; after that the
            last draw is used (as the reference does).
        rad: Control-point distance as a fraction of each segment's length.
        edgy: Blends the tangent directions at each point; 0 is smoothest.
        points_per_segment: Curve samples per cubic segment.
        pairs: ``"random"`` (any two distinct classes with sources, uniformly), or a tuple
            of ``(background class, foreground class)`` pairs to draw from uniformly.
        foreground_share: The shape is redrawn while its area share is outside this
            closed range; ``(0.0, 1.0)`` disables the guard.
        max_shape_draws: Give up (error) after this many shapes outside the range.
        resize_interpolation: How sources are resized: ``"auto"`` (area when shrinking,
            bicubic when enlarging) or one of ``"nearest"``, ``"linear"``, ``"cubic"``,
            ``"area"``.
    """

    output_size: int = 224
    num_points: int = 5
    min_distance: float | None = None
    max_point_retries: int = 200
    rad: float = 0.2
    edgy: float = 0.05
    points_per_segment: int = 100
    pairs: Pairs = "random"
    foreground_share: tuple[float, float] = (0.05, 0.95)
    max_shape_draws: int = 1000
    resize_interpolation: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, str):
            try:
                pairs = tuple((int(a), int(b)) for a, b in self.pairs)
            except (TypeError, ValueError):
                raise BezierParamsError(
                    f"bezier: pairs must be 'random' or (background, foreground) class "
                    f"pairs, got {self.pairs!r}"
                ) from None
            object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "foreground_share", tuple(float(v) for v in self.foreground_share))
        if self.output_size < 8:
            raise BezierParamsError("bezier: output_size must be at least 8")
        if self.num_points < 3:
            raise BezierParamsError("bezier: num_points must be at least 3")
        if self.min_distance is not None and not 0.0 <= self.min_distance < 1.5:
            raise BezierParamsError("bezier: min_distance must be in [0, 1.5)")
        if self.max_point_retries < 0 or self.max_shape_draws < 1:
            raise BezierParamsError(
                "bezier: max_point_retries must be >= 0 and max_shape_draws >= 1"
            )
        if self.rad < 0 or self.points_per_segment < 2:
            raise BezierParamsError("bezier: rad must be >= 0 and points_per_segment >= 2")
        if isinstance(self.pairs, str):
            if self.pairs != "random":
                raise BezierParamsError(
                    f"bezier: pairs must be 'random' or a list of class pairs, not {self.pairs!r}"
                )
        else:
            if not self.pairs:
                raise BezierParamsError("bezier: the list of class pairs is empty")
            for a, b in self.pairs:
                if a == b or a < 0 or b < 0:
                    raise BezierParamsError(
                        f"bezier: pair ({a}, {b}) must name two distinct class indices"
                    )
        if len(self.foreground_share) != 2:
            raise BezierParamsError("bezier: foreground_share must be (low, high)")
        lo, hi = self.foreground_share
        if not 0.0 <= lo < hi <= 1.0:
            raise BezierParamsError(
                f"bezier: foreground_share {self.foreground_share} must satisfy 0 <= low < high <= 1"
            )
        if self.resize_interpolation != "auto" and self.resize_interpolation not in INTERPOLATIONS:
            raise BezierParamsError(
                f"bezier: resize_interpolation {self.resize_interpolation!r} must be 'auto' or "
                f"one of {sorted(INTERPOLATIONS)}"
            )

    @property
    def effective_min_distance(self) -> float:
        """``min_distance``, or its default ``0.7 / num_points``."""
        return 0.7 / self.num_points if self.min_distance is None else float(self.min_distance)

    def check_classes(self, num_classes: int) -> None:
        """Raise :class:`BezierParamsError` if a listed pair names a class the dataset lacks."""
        if isinstance(self.pairs, str):
            if num_classes < 2:
                raise BezierParamsError("bezier: needs at least two classes")
            return
        for a, b in self.pairs:
            if a >= num_classes or b >= num_classes:
                raise BezierParamsError(
                    f"bezier: pair ({a}, {b}) names a class outside 0..{num_classes - 1}"
                )


def check_sources(params: BezierParams, pool: SourcePool) -> None:
    """Refuse, before any draw, class pairs that the pool cannot serve.

    Without this, every draw that picks such a pair fails on its own: one error per image
    and a set with holes instead of one message.

    Raises:
        SynthesisError: Random pairs with fewer than two classes that have sources, or a
            listed pair naming a class without sources; the message names the class(es)
            and where the sources came from.
    """
    present = set(pool.present_classes)
    names = pool.spec.class_names
    if isinstance(params.pairs, str):
        if len(present) < 2:
            have = ", ".join(f"{c} ({names[c]})" for c in sorted(present))
            raise SynthesisError(
                f"{pool.origin}: bezier random class pairs need single-label source images "
                f"of at least two classes; only class {have} has any"
            )
        return
    missing = sorted({c for pair in params.pairs for c in pair} - present)
    if missing:
        listed = ", ".join(f"{c} ({names[c]})" for c in missing)
        raise SynthesisError(
            f"{pool.origin}: the bezier class pairs {list(params.pairs)} name classes "
            f"without any single-label source image: {listed}; add such images or drop "
            "the pairs that use them"
        )


# ------------------------------------------------------------------------------ geometry


def ccw_sort(points: np.ndarray) -> np.ndarray:
    """Points ordered by angle around their centroid (counter-clockwise in x-right,
    y-up axes; the order is what matters, not the handedness)."""
    d = points - points.sum(axis=0) / len(points)
    return points[np.argsort(np.arctan2(d[:, 1], d[:, 0]), kind="stable")]


def _next(a: np.ndarray) -> np.ndarray:
    """``a`` shifted by one along axis 0, cyclically (``np.roll(a, -1, 0)``, faster)."""
    return np.concatenate((a[1:], a[:1]))


def _consecutive_distances(points: np.ndarray) -> np.ndarray:
    """Euclidean distance from each point to the next one, the last to the first included."""
    d = _next(points) - points
    return np.hypot(d[:, 0], d[:, 1])


def random_points(
    rng: np.random.Generator, n: int, min_distance: float, max_retries: int = 200
) -> np.ndarray:
    """``n`` random points in the unit square, counter-clockwise sorted.

    The points are redrawn until every pair of consecutive sorted points (the closing pair
    included) is at least ``min_distance`` apart, at most ``max_retries`` times; then the
    last draw is returned anyway (as the reference does).

    Returns:
        An ``n×2`` float array of ``(x, y)`` in ``[0, 1)``.
    """
    for _ in range(max_retries + 1):
        points = ccw_sort(rng.random((n, 2)))
        if np.all(_consecutive_distances(points) >= min_distance):
            break
    return points


def closed_bezier_curve(
    points: np.ndarray, rad: float = 0.2, edgy: float = 0.05, points_per_segment: int = 100
) -> np.ndarray:
    """A closed C1-smooth piecewise cubic Bézier curve through ``points``.

    The points are sorted counter-clockwise. Segment ``i`` joins point ``i`` to point
    ``i + 1`` (the last joins the first); ``θ_i`` is its direction in ``[0, 2π)``. The
    tangent direction at point ``i`` blends the directions of the segments that meet there:
    ``φ_i = p·θ_i + (1−p)·θ_{i−1}`` with ``p = arctan(edgy)/π + 1/2``, plus ``π`` when
    ``|θ_i − θ_{i−1}| > π`` (the two directions straddle 0, so their plain average points
    the wrong way). Segment ``i`` is the cubic Bézier with control points ``P_i``,
    ``P_i + r_i·(cos φ_i, sin φ_i)``, ``P_{i+1} − r_i·(cos φ_{i+1}, sin φ_{i+1})``,
    ``P_{i+1}``, where ``r_i = rad·|P_{i+1} − P_i|``; consecutive segments share a tangent
    direction at their common point, so the curve is C1 in direction.

    Args:
        points: ``n×2`` array of ``(x, y)``.
        rad: Control-point distance as a fraction of the segment length.
        edgy: 0 gives the smoothest blend of tangents; larger values lean on the outgoing
            segment's direction.
        points_per_segment: Samples per segment, both end points included.

    Returns:
        An ``(n·points_per_segment)×2`` array of curve points, in order.
    """
    pts = ccw_sort(np.asarray(points, dtype=np.float64))
    nxt = _next(pts)
    seg = nxt - pts
    theta = np.mod(np.arctan2(seg[:, 1], seg[:, 0]), 2 * np.pi)
    prev = np.concatenate((theta[-1:], theta[:-1]))
    p = math.atan(edgy) / math.pi + 0.5
    phi = p * theta + (1 - p) * prev + (np.abs(prev - theta) > np.pi) * np.pi
    r = rad * np.hypot(seg[:, 0], seg[:, 1])
    unit = np.stack((np.cos(phi), np.sin(phi)), axis=1)  # tangent direction at each point
    rr = r[:, None]
    ctrl = np.stack((pts, pts + rr * unit, nxt - rr * _next(unit), nxt), axis=1)  # n×4×2
    # (T×4) @ (n×4×2) -> n×T×2: every segment evaluated at once.
    return (_bernstein(points_per_segment) @ ctrl).reshape(-1, 2)


@functools.lru_cache(maxsize=8)
def _bernstein(samples: int) -> np.ndarray:
    """The cubic Bernstein basis at ``samples`` equally spaced ``t`` in [0, 1] (T×4)."""
    t = np.linspace(0.0, 1.0, samples)
    u = 1.0 - t
    basis = np.stack([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], axis=1)
    basis.setflags(write=False)
    return basis


def shape_mask(rng: np.random.Generator, params: BezierParams) -> np.ndarray:
    """A random filled Bézier shape, ``output_size×output_size`` ``uint8`` of 0/1.

    Raises:
        SynthesisError: ``max_shape_draws`` shapes all had a foreground share outside
            ``params.foreground_share``.
    """
    size = params.output_size
    lo, hi = params.foreground_share
    for _ in range(params.max_shape_draws):
        points = random_points(
            rng, params.num_points, params.effective_min_distance, params.max_point_retries
        )
        curve = closed_bezier_curve(
            points * size, params.rad, params.edgy, params.points_per_segment
        )
        mask = np.zeros((size, size), dtype=np.uint8)
        cv2.fillPoly(mask, [np.round(curve).astype(np.int32)], 1)
        share = np.count_nonzero(mask) / mask.size
        if lo <= share <= hi:
            return mask
    raise SynthesisError(
        f"bezier: no shape with a foreground share in [{lo:g}, {hi:g}] in "
        f"{params.max_shape_draws} draws; widen foreground_share"
    )


# ------------------------------------------------------------------------------ sample


def choose_pair(
    rng: np.random.Generator, params: BezierParams, present: Sequence[int]
) -> tuple[int, int]:
    """The ``(background, foreground)`` classes of one sample.

    Raises:
        SynthesisError: Fewer than two classes have sources (random pairs), or a listed
            pair names a class without sources.
    """
    if isinstance(params.pairs, str):
        if len(present) < 2:
            raise SynthesisError(
                "bezier: random class pairs need single-label sources of at least two "
                f"classes; only classes {list(present)} have any"
            )
        a, b = rng.choice(len(present), size=2, replace=False)
        return int(present[a]), int(present[b])
    pair = params.pairs[int(rng.integers(len(params.pairs)))]
    return int(pair[0]), int(pair[1])


def bezier(pool: SourcePool, rng: np.random.Generator, params: BezierParams) -> Synthesized:
    """Make one Bézier sample.

    Args:
        pool: Single-label sources.
        rng: The only source of randomness; the same generator state gives the same sample.
        params: Bézier settings.

    Returns:
        The image, its mask and the pool indices of the background and foreground sources.

    Raises:
        SynthesisError: No usable class pair, or no shape within ``foreground_share``.
    """
    back_class, fore_class = choose_pair(rng, params, pool.present_classes)
    back_index = pool.pick(back_class, rng)
    fore_index = pool.pick(fore_class, rng)
    size, interp = params.output_size, params.resize_interpolation
    back, back_bg = pool.resized(back_index, size, interp)
    fore, fore_bg = pool.resized(fore_index, size, interp)
    shape = shape_mask(rng, params)
    # Hard paste: copy the foreground through the shape onto a copy of the background.
    image = cv2.copyTo(fore, shape, back.copy())
    mask = _mask_array(pool.class_mask(back_index, back_bg), size)
    cv2.copyTo(_mask_array(pool.class_mask(fore_index, fore_bg), size), shape, mask)
    return Synthesized(image, mask, (back_index, fore_index))


def _mask_array(values: np.ndarray | int, size: int) -> np.ndarray:
    """A writable ``size×size`` ``uint8`` mask from a class value or a class map."""
    if isinstance(values, np.ndarray):
        return np.ascontiguousarray(values, dtype=np.uint8)
    return np.full((size, size), values, dtype=np.uint8)
