"""Tiled, streaming prediction of whole-slide images (and of any image, the same way).

The splitter/merger design of MONAI's and TIAToolbox's sliding-window inference, made to
stream:

1. **Plan** (:func:`plan_tiles`): the network runs at a target resolution (µm/px); the
   slide is read from the coarsest pyramid level that still has that resolution and
   shrunk by the remainder. Tiles of ``tile×tile`` model pixels overlap by ``overlap``;
   starts come from :func:`hisynseg.inference.sliding.window_starts`, on a grid aligned
   to the output downsample, row by row.
2. **Skip glass**: a tile whose footprint holds less than ``min_tissue`` tissue on the
   slide's thumbnail (:class:`~hisynseg.inference.tissue.TissueDetector`) is not run.
3. **Predict** batches of tiles with a backend that maps RGB tiles to class
   probabilities (:mod:`hisynseg.inference.backends`). The next batches are read,
   decoded and given their tissue shares by a tile loader
   (:mod:`hisynseg.inference.tile_loading`: threads of this process, or worker processes
   writing into shared memory, which a fast accelerator needs because much of a tile's
   host work holds the GIL); at most ``workers + 2`` batches are in flight, so memory
   stays bounded. A blending thread merges one batch while the network runs the next,
   so reading, the network and blending all overlap.
   A backend with a ``pooled(tiles, d)`` method (:class:`~hisynseg.inference.backends.
   Backend`) reduces the probabilities to the output resolution on its device; one
   with a ``launch(tiles, d)`` method as well (the same class, on CUDA) gets the next
   batch queued while it computes one, so the device does not wait for the host
   between batches.
4. **Blend**: each tile's probabilities, reduced to the output resolution, are weighted by
   a window that falls off towards the tile's border (Gaussian by default), so seams
   vanish, and accumulated in a band of rows one tile high
   (a :class:`~hisynseg.inference.sliding.ProbabilityMerger` in memory).
5. **Stream out**: tiles come in row order, so once the first tile of a new row arrives
   every row above it is final; those rows are averaged, turned into class indices
   (glass and unpredicted pixels get the background index) and written to a disk-backed
   :class:`~hisynseg.inference.canvas.DiskCanvas` (and the probabilities to another),
   then dropped from memory. Memory follows the output's width, never its height.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hisynseg.errors import HisynsegError
from hisynseg.inference.canvas import DiskCanvas
from hisynseg.inference.resume import SlideProgress, tiles_digest
from hisynseg.inference.sliding import ProbabilityMerger, window_starts
from hisynseg.inference.tile_loading import (
    LOADER_KINDS,
    LoadedBatch,
    ProcessTileLoader,
    ReaderPool,
    SharedMemoryTooSmallError,
    ThreadTileLoader,
    TileGeometry,
    TileLoader,
    choose_loader,
    read_tile,
    reader_factory,
)
from hisynseg.inference.tissue import TissueDetector
from hisynseg.slides.base import SlideReader, best_level

__all__ = [
    "BLEND_MODES",
    "MissingMPPError",
    "PredictionError",
    "SlidePrediction",
    "TilePlan",
    "blend_weights",
    "plan_tiles",
    "predict_slide",
    "read_tile",
]

log = logging.getLogger(__name__)

BLEND_MODES = ("gaussian", "cosine", "constant")
# Weights never reach zero, so that pixels covered by one tile's rim only still count.
_MIN_WEIGHT = 1e-3
# Batches a backend with ``launch`` may have queued on its device: the one it computes
# and the next, staged while it does.
_IN_FLIGHT = 2

ProbabilityFn = Callable[[np.ndarray], np.ndarray]


class PredictionError(HisynsegError, ValueError):
    """Settings that cannot be used for a slide; the message says which and why."""


class MissingMPPError(PredictionError):
    """A target resolution was asked for, but the slide's own resolution is unknown."""


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one slide are and what resolution everything is at.

    Attributes:
        level: Pyramid level the tiles are read from.
        scale: Level-0 pixels per model pixel (1 at the native resolution).
        level_scale: Level pixels per model pixel (1 means read as is; at least
            ``1 / (1 + LEVEL_TOLERANCE)``: see :func:`~hisynseg.slides.base.best_level`).
        model_size: ``(width, height)`` of the slide at the model's resolution.
        tile: Tile side in model pixels.
        overlap: Overlap of neighbouring tiles in model pixels.
        output_downsample: Model pixels per output pixel (side).
        output_size: ``(width, height)`` of the output canvas.
        mpp: Microns per level-0 pixel used (from the slide or given), or ``None``.
        target_mpp: Microns per model pixel asked for, or ``None`` (native resolution).
        tops: Tile rows (model pixels), increasing.
        lefts: Tile columns (model pixels), increasing.
    """

    level: int
    scale: float
    level_scale: float
    model_size: tuple[int, int]
    tile: int
    overlap: int
    output_downsample: int
    output_size: tuple[int, int]
    mpp: float | None
    target_mpp: float | None
    tops: tuple[int, ...] = field(repr=False)
    lefts: tuple[int, ...] = field(repr=False)

    @property
    def num_tiles(self) -> int:
        return len(self.tops) * len(self.lefts)

    @property
    def geometry(self) -> TileGeometry:
        """What a tile reader needs of the plan."""
        return TileGeometry(self.level, self.level_scale, self.tile, self.output_downsample)

    @property
    def level0_per_output(self) -> float:
        """Level-0 pixels per output pixel (side): maps output coordinates to the slide."""
        return self.scale * self.output_downsample

    @property
    def output_mpp(self) -> float | None:
        """Microns per output pixel, when the slide's resolution is known."""
        return None if self.mpp is None else self.mpp * self.level0_per_output

    def tiles(self) -> Iterator[tuple[int, int]]:
        """``(top, left)`` of every tile in model pixels, row by row."""
        for top in self.tops:
            for left in self.lefts:
                yield top, left

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tops"], data["lefts"]
        data.update(
            tiles_down=len(self.tops),
            tiles_across=len(self.lefts),
            num_tiles=self.num_tiles,
            output_mpp=self.output_mpp,
            level0_per_output=self.level0_per_output,
        )
        return data


def plan_tiles(
    reader: SlideReader,
    tile: int = 512,
    overlap: int = 64,
    target_mpp: float | None = None,
    mpp: float | None = None,
    output_downsample: int | None = None,
    max_output_pixels: int = 2**26,
) -> TilePlan:
    """The tiling of ``reader``'s slide.

    Args:
        reader: The slide.
        tile: Tile side in model pixels.
        overlap: Overlap between neighbouring tiles in model pixels (``< tile``).
        target_mpp: Resolution the network runs at, µm per pixel (the resolution of its
            training images); ``None`` runs at the slide's native resolution (level 0).
        mpp: The slide's level-0 resolution, overriding (or standing in for) what the
            file records.
        output_downsample: Model pixels per output pixel; ``None`` picks the smallest
            common divisor of ``tile`` and ``overlap`` that keeps the output within
            ``max_output_pixels`` (the largest, with a warning, when none does).
        max_output_pixels: Cap on the output canvas for the automatic downsample.

    Raises:
        MissingMPPError: ``target_mpp`` given, and neither the slide nor ``mpp`` says
            the slide's resolution.
        PredictionError: Inconsistent tile, overlap or downsample.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise PredictionError(f"need tile >= 1 and 0 <= overlap < tile; got {tile}, {overlap}")
    slide_mpp = mpp if mpp is not None else reader.mpp
    if mpp is not None and mpp <= 0:
        raise PredictionError(f"--mpp must be positive, got {mpp}")
    scale = 1.0
    if target_mpp is not None:
        if target_mpp <= 0:
            raise PredictionError(f"the target resolution must be positive, got {target_mpp} µm/px")
        if slide_mpp is None:
            raise MissingMPPError(
                f"{reader.path}: the file does not record its resolution (µm per pixel), "
                f"so it cannot be brought to the target {target_mpp:g} µm/px; pass --mpp "
                "with the slide's µm per pixel, or leave out --target-mpp to predict at "
                "the native resolution"
            )
        scale = target_mpp / slide_mpp
    w0, h0 = reader.dimensions
    level = best_level(reader, scale)
    level_scale = scale / reader.level_downsamples[level]
    wm, hm = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    if output_downsample is None:
        # The smallest common divisor of tile and overlap (so tiles stay on the output
        # grid) that keeps the output within the cap: a power of two for the defaults.
        common = math.gcd(tile, overlap)  # its divisors are the common divisors
        divisors = [k for k in range(1, common + 1) if common % k == 0]
        fits = [k for k in divisors if math.ceil(wm / k) * math.ceil(hm / k) <= max_output_pixels]
        d = fits[0] if fits else divisors[-1]
        if not fits:
            log.warning(
                "%s: the output at %d×%d px stays above %d Mpx with every downsample that "
                "divides --tile %d and --overlap %d (the largest is %d); pass "
                "--output-downsample, or a tile and overlap with larger common divisors",
                reader.path,
                math.ceil(wm / d),
                math.ceil(hm / d),
                max_output_pixels // 2**20,
                tile,
                overlap,
                d,
            )
    else:
        d = int(output_downsample)
    if d < 1 or tile % d or overlap % d:
        raise PredictionError(
            f"the output downsample ({d}) must divide the tile ({tile}) and the overlap "
            f"({overlap}); choose --output-downsample among their common divisors"
        )
    wo, ho = math.ceil(wm / d), math.ceil(hm / d)
    step = (tile - overlap) // d
    tops = tuple(s * d for s in window_starts(ho, tile // d, step))
    lefts = tuple(s * d for s in window_starts(wo, tile // d, step))
    return TilePlan(
        level=level,
        scale=scale,
        level_scale=level_scale,
        model_size=(wm, hm),
        tile=tile,
        overlap=overlap,
        output_downsample=d,
        output_size=(wo, ho),
        mpp=slide_mpp,
        target_mpp=target_mpp,
        tops=tops,
        lefts=lefts,
    )


def blend_weights(size: int, mode: str = "gaussian") -> np.ndarray:
    """``size×size`` ``float32`` weights of a tile's pixels, highest at the centre.

    ``gaussian``: σ = size/8 (MONAI's default); ``cosine``: a Hann window; ``constant``:
    plain averaging. All are floored at 1e-3 of the peak.
    """
    if mode not in BLEND_MODES:
        raise PredictionError(
            f"unknown blending {mode!r}; expected one of {', '.join(BLEND_MODES)}"
        )
    pos = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    if mode == "constant":
        line = np.ones(size)
    elif mode == "gaussian":
        line = np.exp(-0.5 * (pos / (size / 8)) ** 2)
    else:
        line = np.cos(np.pi * pos / size) ** 2
    w = np.outer(line, line)
    return np.maximum(w / w.max(), _MIN_WEIGHT).astype(np.float32)


def _pool(x: np.ndarray, d: int) -> np.ndarray:
    """Mean over ``d×d`` blocks of the last two axes (sides divisible by ``d``)."""
    if d == 1:
        return x
    *lead, h, w = x.shape
    return x.reshape(*lead, h // d, d, w // d, d).mean(axis=(-3, -1))


def default_workers() -> int:
    """Tile readers for :func:`predict_slide`: one per CPU core, at most eight."""
    return max(1, min(8, os.cpu_count() or 1))


class _BandAccumulator:
    """Blended sums of a band of output rows one tile high, sliding down the canvas."""

    def __init__(self, channels: int, rows: int, width: int) -> None:
        self.merger = ProbabilityMerger(channels, rows, width)
        self.rows = rows
        self.top = 0

    def add(self, probs: np.ndarray, top: int, left: int, weight: np.ndarray) -> None:
        if top < self.top or top + probs.shape[1] > self.top + self.rows:
            raise AssertionError(f"tile at row {top} outside the band at {self.top}")
        self.merger.add(probs, top - self.top, left, weight)

    def flush(self, until: int) -> Iterator[tuple[int, int, np.ndarray | None, np.ndarray | None]]:
        """Finish rows up to ``until``: ``(top, n, averages C×n×W, covered n×W)`` per
        chunk; ``(top, n, None, None)`` for a stretch of rows no tile reached."""
        m = self.merger
        while self.top < until:
            if not m.weights.any():
                # Nothing blended at or below the band's top: every row up to ``until`` is
                # uncovered (glass below the tissue, or the rest after --max-tiles), so
                # there is nothing to average or to slide.
                yield self.top, until - self.top, None, None
                self.top = until
                return
            n = min(until - self.top, self.rows)
            yield self.top, n, m.region(0, 0, n, m.width), m.weights[:n] > 0
            if n < self.rows:
                m.sums[:, : self.rows - n] = m.sums[:, n:]
                m.weights[: self.rows - n] = m.weights[n:]
            m.sums[:, self.rows - n :] = 0
            m.weights[self.rows - n :] = 0
            self.top += n

    def restore(self, top: int, sums: np.ndarray, weights: np.ndarray) -> None:
        """Continue from a saved band (its top row, sums and weights)."""
        m = self.merger
        if sums.shape != m.sums.shape or weights.shape != m.weights.shape:
            raise ValueError(f"a saved band of {sums.shape} for one of {m.sums.shape}")
        m.sums[:] = sums
        m.weights[:] = weights
        self.top = top


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` did.

    Attributes:
        counts: Output pixels per mask value (256 entries).
        tiles_total: Tiles in the plan.
        tiles_with_tissue: Tiles that passed the tissue test.
        tiles_predicted: Tiles run through the network (fewer with ``max_tiles``).
        tissue_threshold: Saturation threshold of the tissue test, or ``None``.
        seconds: Wall time of the tile loop.
        predict_seconds: Time the tile loop spent in the backend: computing, or (a
            backend with ``launch``) launching batches and waiting for them.
        tile_loader: ``"threads"`` or ``"processes"``: how tiles were read.
        workers: Reader threads or processes.
        warmup_seconds: From the start until the first batch was read (the tissue test,
            starting the readers, reading the first batch): what a whole slide costs
            before its tiles flow.
        tiles_resumed: Of ``tiles_predicted``, those an interrupted earlier run had done.
    """

    counts: np.ndarray
    tiles_total: int
    tiles_with_tissue: int
    tiles_predicted: int
    tissue_threshold: float | None
    seconds: float
    predict_seconds: float
    tile_loader: str = "threads"
    workers: int = 1
    warmup_seconds: float = 0.0
    tiles_resumed: int = 0

    @property
    def tiles_run(self) -> int:
        """Tiles this run put through the network."""
        return self.tiles_predicted - self.tiles_resumed

    @property
    def steady_tiles_per_second(self) -> float | None:
        """Tiles per second once the first batch was read (the pipeline's own pace)."""
        flowing = self.seconds - self.warmup_seconds
        return self.tiles_run / flowing if flowing > 0 and self.tiles_run else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tiles_total": self.tiles_total,
            "tiles_with_tissue": self.tiles_with_tissue,
            "tiles_predicted": self.tiles_predicted,
            "tiles_resumed": self.tiles_resumed,
            "tissue_threshold": self.tissue_threshold,
            "seconds": round(self.seconds, 3),
            "predict_seconds": round(self.predict_seconds, 3),
            "tiles_per_second": round(self.tiles_run / self.seconds, 3)
            if self.seconds > 0 and self.tiles_run
            else None,
            "tile_loader": self.tile_loader,
            "workers": self.workers,
            "warmup_seconds": round(self.warmup_seconds, 3),
            "steady_tiles_per_second": None
            if self.steady_tiles_per_second is None
            else round(self.steady_tiles_per_second, 3),
        }


def _is_ready(started: Any) -> bool:
    """Whether a started batch's probabilities can be had without waiting."""
    done = getattr(started, "done", None)
    return done is None or bool(done())


def _collect(started: Any) -> np.ndarray:
    """The probabilities of a started batch (waiting for the device if need be)."""
    result = getattr(started, "result", None)
    return np.asarray(started if result is None else result(), dtype=np.float32)


def runs_on_accelerator(predict: Any) -> bool:
    """Whether a backend's network runs on an accelerator: its ``accelerated``, else its
    ``device``; a bare function runs on the CPU."""
    device = str(getattr(predict, "device", "cpu"))
    return bool(getattr(predict, "accelerated", not device.startswith("cpu")))


def open_tile_loader(
    kind: str,
    reader: SlideReader,
    plan: TilePlan,
    tissue: TissueDetector | None,
    workers: int,
    batch_size: int,
    num_tiles: int,
    accelerated: bool,
    pool: ReaderPool | None = None,
) -> TileLoader:
    """The tile loader :func:`predict_slide` reads with (see :func:`choose_loader`)."""
    threshold = None if tissue is None else tissue.threshold
    if pool is not None:
        workers = pool.workers
    if choose_loader(kind, reader, workers, num_tiles, accelerated) == "processes":
        factory = reader_factory(reader)
        assert factory is not None  # choose_loader checked
        try:
            return ProcessTileLoader(
                factory,
                reader.path,
                plan.geometry,
                threshold,
                pool,
                workers=workers,
                batch_size=batch_size,
            )
        except SharedMemoryTooSmallError as exc:
            if kind != "auto":
                raise
            log.warning("%s; reading with threads instead", exc)
    return ThreadTileLoader(reader, plan.geometry, threshold, workers)


def predict_slide(
    reader: SlideReader,
    predict: ProbabilityFn,
    plan: TilePlan,
    num_classes: int,
    background_index: int,
    mask_out: DiskCanvas,
    probs_out: DiskCanvas | None = None,
    *,
    batch_size: int = 8,
    blend: str = "gaussian",
    tissue: TissueDetector | None = None,
    min_tissue: float = 0.02,
    max_tiles: int | None = None,
    progress: bool = False,
    description: str = "tiles",
    workers: int | None = None,
    tile_loader: str = "auto",
    reader_pool: ReaderPool | None = None,
    resume: SlideProgress | None = None,
    save_progress: Callable[[SlideProgress], None] | None = None,
    progress_every: float = 60.0,
) -> SlidePrediction:
    """Predict a slide tile by tile into ``mask_out`` (and ``probs_out``).

    Args:
        reader: The slide.
        predict: Maps ``B×T×T×3`` ``uint8`` RGB tiles to ``B×C×T×T`` probabilities
            (the tiles are only valid during the call).
        plan: From :func:`plan_tiles`.
        num_classes: ``C``.
        background_index: Mask value of glass and of pixels no tile predicted.
        mask_out: ``H×W`` ``uint8`` canvas of ``plan.output_size``.
        probs_out: Optional ``H×W×C`` canvas (e.g. ``float16``) for the probabilities.
        batch_size: Tiles per ``predict`` call.
        blend: Weighting of overlapping tiles (:data:`BLEND_MODES`).
        tissue: Skip tiles with less than ``min_tissue`` tissue, and give glass pixels
            the background index; ``None`` predicts every tile and every pixel.
        min_tissue: Least tissue share of a tile's footprint for it to be predicted.
        max_tiles: Stop after this many tiles (quick checks; the rest stays background).
        progress: Show a progress bar over the tiles.
        description: Progress bar label.
        workers: Reader threads or processes (``None``: :func:`default_workers`); at
            most ``workers + 2`` batches are read or held at once.
        tile_loader: ``threads``, ``processes`` (spawned workers reading into shared
            memory, free of this process's GIL) or ``auto`` (processes for large slides
            whose reader can be reopened, with a backend on an accelerator: one whose
            ``accelerated`` is true, or whose ``device`` is not the CPU;
            :func:`~hisynseg.inference.tile_loading.choose_loader`).
        reader_pool: Reader processes started beforehand (and kept for other slides);
            its size replaces ``workers``. ``None``: processes, when chosen, are started
            for this slide.
        resume: Progress saved by an interrupted run with these canvases: its tiles are
            not predicted again (ignored, with a warning, if its tile list differs).
        save_progress: Called between batches, at most every ``progress_every`` seconds,
            and once at the end, with the loop's progress (its arrays are live: save
            them before returning).
        progress_every: Seconds between two saves of the progress.

    Returns:
        Counts per class and tile statistics.
    """
    from tqdm.auto import tqdm

    wo, ho = plan.output_size
    if mask_out.shape != (ho, wo):
        raise ValueError(f"mask canvas {mask_out.shape} for an output of {(ho, wo)}")
    if probs_out is not None and probs_out.shape != (ho, wo, num_classes):
        raise ValueError(f"probability canvas {probs_out.shape} for {(ho, wo, num_classes)}")
    if batch_size < 1:
        raise PredictionError(f"batch size must be at least 1, got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise PredictionError(f"need at least one tile reader, got {workers}")
    if tile_loader not in LOADER_KINDS:
        raise PredictionError(
            f"unknown tile loader {tile_loader!r}; expected one of {', '.join(LOADER_KINDS)}"
        )
    t, d, s = plan.tile, plan.output_downsample, plan.scale
    start = time.perf_counter()
    tiles = list(plan.tiles())
    if tissue is not None:
        tiles = [
            (top, left)
            for top, left in tiles
            if tissue.fraction(left * s, top * s, t * s, t * s) >= min_tissue
        ]
    with_tissue = len(tiles)
    if max_tiles is not None:
        tiles = tiles[: max(0, max_tiles)]
    weight = _pool(blend_weights(t, blend), d)
    channels = num_classes + (1 if tissue is not None else 0)
    band = _BandAccumulator(channels, t // d, wo)
    counts = np.zeros(256, np.int64)
    digest = tiles_digest(tiles) if resume is not None or save_progress is not None else ""
    first = 0
    reject_resume = False
    if resume is not None:
        try:
            if resume.tiles != digest or not 0 <= resume.next_tile <= len(tiles):
                raise ValueError("it is for other tiles")
            band.restore(resume.band_top, resume.sums, resume.weights)
            counts[:] = resume.counts
            first = resume.next_tile
        except ValueError as exc:
            band = _BandAccumulator(channels, t // d, wo)
            counts[:] = 0
            reject_resume = True
            log.warning(
                "%s: saved progress unusable (%s); predicting from the start", description, exc
            )
    last_save = time.perf_counter()
    saves = 0

    def save_now(next_tile: int) -> None:
        nonlocal last_save, saves
        if save_progress is None:
            return
        m = band.merger
        save_progress(SlideProgress(next_tile, band.top, m.sums, m.weights, counts, digest))
        last_save = time.perf_counter()
        saves += 1

    if reject_resume:
        # Replace the unusable progress at once: if this run stops before its first save,
        # the next must not take it for a description of the canvases.
        save_now(0)

    pooled = getattr(predict, "pooled", None)
    launch = getattr(predict, "launch", None)

    def emit(top: int, n: int, averages: np.ndarray | None, covered: np.ndarray | None) -> None:
        if averages is None or covered is None:
            emit_uncovered(top, n)
            return
        labels = averages[:num_classes].argmax(axis=0).astype(np.uint8)
        glass = ~covered
        if tissue is not None:
            glass |= averages[num_classes] < 0.5
        labels[glass] = background_index
        mask_out.write_rows(top, labels)
        counts[:] += np.bincount(labels.ravel(), minlength=256)
        if probs_out is not None:
            p = averages[:num_classes].transpose(1, 2, 0).astype(probs_out.dtype)
            p[~covered] = 0
            probs_out.write_rows(top, p)

    def emit_uncovered(top: int, n: int) -> None:
        """Background (and zero probabilities) for ``n`` rows no tile reached."""
        for start in range(top, top + n, 256):
            rows = min(256, top + n - start)
            mask_out.write_rows(start, np.full((rows, wo), background_index, np.uint8))
            if probs_out is not None:
                probs_out.write_rows(start, np.zeros((rows, wo, num_classes), probs_out.dtype))
        counts[background_index] += n * wo

    def start_batch(images: np.ndarray) -> Any:
        """Start a batch: its output-resolution probabilities, or a pending result
        (a backend's ``launch``) the device is still computing."""
        if launch is not None:
            return launch(images, d)
        if pooled is not None:
            return np.asarray(pooled(images, d), dtype=np.float32)
        probs = np.asarray(predict(images), dtype=np.float32)
        check_shape(probs, len(images), t)
        return _pool(probs, d)

    def check_shape(probs: np.ndarray, n: int, side: int) -> None:
        expected = (n, num_classes, side, side)
        if probs.shape != expected:
            raise PredictionError(
                f"the model returned {probs.shape} for {n} tiles; expected {expected}"
            )

    def blend_batch(
        batch: Sequence[tuple[int, int]], probs: np.ndarray, loaded: LoadedBatch, end: int
    ) -> None:
        """Blend a batch; ``end``: index after its last tile in ``tiles``."""
        shares = loaded.shares
        for i, (top, left) in enumerate(batch):
            p = probs[i]
            if shares is not None:
                p = np.concatenate([p, shares[i][None]], axis=0)
            for chunk in band.flush(top // d):
                emit(*chunk)
            band.add(p, top // d, left // d, weight)
        loaded.release()
        # Here, in the one blending thread, every tile before ``end`` and none after it
        # is in the band or the canvases: a consistent point to save.
        if time.perf_counter() - last_save >= progress_every:
            save_now(end)

    batches = [tiles[i : i + batch_size] for i in range(first, len(tiles), batch_size)]
    predict_seconds = 0.0
    warmup: float | None = None
    accelerated = runs_on_accelerator(predict)
    loader = open_tile_loader(
        tile_loader,
        reader,
        plan,
        tissue,
        workers,
        batch_size,
        len(tiles),
        accelerated,
        reader_pool,
    )
    # One batch is over before a bar could say anything (a folder of patches would print
    # a bar per patch); the caller's line or bar reports it.
    bar = tqdm(
        total=len(tiles),
        initial=first,
        desc=description,
        unit="tile",
        disable=not progress or len(batches) < 2,
        leave=False,
    )
    try:
        # The loader keeps batches read ahead; its depth bounds those plus the batches
        # held here (launched, or blending). The network runs in this thread (its large
        # allocations stay in one malloc arena). A backend with ``launch`` (CUDA) keeps
        # up to _IN_FLIGHT batches queued on the device, so that it computes one while
        # this thread collects the previous one and stages the next. A second thread
        # blends batch i while the network runs later ones, so the device never waits
        # for the blending; one blend at a time keeps the rows in order.
        with ThreadPoolExecutor(max_workers=1) as blender:
            reads: deque[Future[LoadedBatch]] = deque()
            launched: deque[tuple[Sequence[tuple[int, int]], LoadedBatch, Any]] = deque()
            queued = 0
            blended_to = first  # index after the last tile handed to the blending thread
            blending: Future[None] | None = None

            def read_ahead(holding: int = 0) -> None:
                """Queue reads while fewer than the loader's depth batches are in hand."""
                nonlocal queued
                blend_held = 1 if blending is not None and not blending.done() else 0
                in_hand = len(reads) + len(launched) + blend_held + holding
                while queued < len(batches) and in_hand < loader.depth:
                    reads.append(loader.submit(batches[queued]))
                    queued += 1
                    in_hand += 1

            def finish_oldest() -> None:
                """Collect the oldest launched batch and hand it to the blending thread."""
                nonlocal blending, blended_to, predict_seconds
                batch, loaded, started = launched.popleft()
                t0 = time.perf_counter()
                probs = _collect(started)
                predict_seconds += time.perf_counter() - t0
                check_shape(probs, len(batch), t // d)
                if blending is not None:
                    blending.result()
                blended_to += len(batch)
                blending = blender.submit(blend_batch, batch, probs, loaded, blended_to)
                bar.update(len(batch))

            read_ahead()
            for batch in batches:
                # Never empty here: at most one batch is launched and one blending at
                # this point, and a loader's depth is its readers + CALLER_HELD_BATCHES (2).
                loaded = reads.popleft().result()
                if warmup is None:
                    warmup = time.perf_counter() - start
                read_ahead(holding=1)
                t0 = time.perf_counter()
                launched.append((batch, loaded, start_batch(loaded.images)))
                predict_seconds += time.perf_counter() - t0
                while launched and (len(launched) >= _IN_FLIGHT or _is_ready(launched[0][2])):
                    finish_oldest()
                read_ahead()
            while launched:
                finish_oldest()
            if blending is not None:
                blending.result()
        for chunk in band.flush(ho):
            emit(*chunk)
        # A finished loop is saved too (its outputs are still to be written), unless it
        # was too short to have saved before: then redoing it costs little, and a folder of
        # small images is spared a file per image.
        if saves or first:
            save_now(len(tiles))
    finally:
        bar.close()
        loader.close()
    return SlidePrediction(
        counts=counts,
        tiles_total=plan.num_tiles,
        tiles_with_tissue=with_tissue,
        tiles_predicted=len(tiles),
        tissue_threshold=None if tissue is None else tissue.threshold,
        seconds=time.perf_counter() - start,
        warmup_seconds=warmup or 0.0,
        predict_seconds=predict_seconds,
        tile_loader=loader.kind,
        workers=loader.workers,
        tiles_resumed=first,
    )
