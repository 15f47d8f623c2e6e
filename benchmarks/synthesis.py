"""Benchmark: Mosaic and Bézier synthesis speed against a naive re-implementation.

Run::

    .venv/bin/python benchmarks/synthesis.py [--seconds 3] [--workers N] [--per-class 50]

It writes a temporary LUAD-HistoSeg-layout dataset of textured single-label 224 px PNGs
(``--per-class`` per class), then measures, at 224 px output:

* **naive** (one process, in this process): the reference procedure done naively: every
  tile re-reads its source PNG from disk; each grid image is built in full and
  transformed with albumentations (PadIfNeeded + RandomCrop per tile; flip, Affine
  shift-scale-rotate and RandomCrop per quadrant, a Compose built per call as the
  reference did). Bézier: both PNGs read and resized every time, the curve built with
  per-point/per-segment Python loops and scipy Bernstein polynomials, the point sampler
  recursive, as in the reference notebooks.
* **fast**: :mod:`hisynseg.synthesis` with the pool decoded once, with 1 worker and with
  ``--workers`` processes.

Each is measured generating in memory and generating + writing the PNGs (image and palette
mask, zlib level 6; the naive side with PIL's defaults as the reference, the fast side both
with PIL's encoder and with its default run-length zlib strategy). The table gives
images/second, the ratios fast/naive and the scaling from 1 to N workers; a pure-CPU
calibration line says how much parallel speed-up the machine can give at all.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A
import cv2
import numpy as np
from PIL import Image
from scipy.special import binom

from hisynseg.datasets.io import palette_to_flat
from hisynseg.datasets.layouts import list_train, single_label_pool
from hisynseg.datasets.toy import make_toy_dataset
from hisynseg.synthesis.bezier import BezierParams
from hisynseg.synthesis.generate import generate_one, synthesize
from hisynseg.synthesis.mosaic import MosaicParams
from hisynseg.synthesis.pool import SourcePool

PARAMS = {"mosaic": MosaicParams(), "bezier": BezierParams()}
# The naive side draws from its own generator (the reference used numpy's global one).
_NAIVE_RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- naive


class NaiveMosaic:
    """The reference's CropAndConcatDataset procedure, done the straightforward way."""

    def __init__(self, by_class: list[list[Path]], patch_num: int = 2, patch_size: int = 112):
        self.files = [p for group in by_class for p in group]
        self.label_of = {p: c for c, group in enumerate(by_class) for p in group}
        self.patch_num, self.patch_size = patch_num, patch_size
        self.crop_fn = A.Compose(
            [
                A.PadIfNeeded(min_height=patch_size, min_width=patch_size),
                A.RandomCrop(height=patch_size, width=patch_size),
            ]
        )

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        side = self.patch_num * self.patch_size
        image = np.zeros((side, side, 3), np.uint8)
        mask = np.zeros((side, side), np.uint8)
        t = self.patch_size
        for i in range(self.patch_num):
            for j in range(self.patch_num):
                name = self.files[_NAIVE_RNG.integers(len(self.files))]
                tile = np.asarray(Image.open(name))
                tile_mask = np.full(tile.shape[:2], self.label_of[name], np.uint8)
                sample = self.crop_fn(image=tile, mask=tile_mask)
                image[i * t : (i + 1) * t, j * t : (j + 1) * t] = sample["image"]
                mask[i * t : (i + 1) * t, j * t : (j + 1) * t] = sample["mask"]
        return image, mask

    @staticmethod
    def transforms(height: int, width: int, p: float = 0.8) -> A.Compose:
        return A.Compose(
            [
                A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)], p=p),
                A.Affine(
                    translate_percent=(-0.0625, 0.0625),
                    scale=(0.8, 1.2),
                    rotate=(-45, 45),
                    border_mode=cv2.BORDER_REFLECT_101,
                    p=p,
                ),
                A.RandomCrop(height, width),
            ]
        )

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        side = self.patch_num * self.patch_size
        image = np.zeros((side, side, 3), np.uint8)
        mask = np.zeros((side, side), np.uint8)
        h = int(side * (random.random() * 0.6 + 0.2))
        w = int(side * (random.random() * 0.6 + 0.2))
        h += h % 2
        w += w % 2
        for y, x, qh, qw in (
            (0, 0, h, w),
            (0, w, h, side - w),
            (h, 0, side - h, w),
            (h, w, side - h, side - w),
        ):
            grid_image, grid_mask = self.grid()
            sample = self.transforms(qh, qw)(image=grid_image, mask=grid_mask)
            image[y : y + qh, x : x + qw] = sample["image"]
            mask[y : y + qh, x : x + qw] = sample["mask"]
        return image, mask


def _bernstein(n: int, k: int, t: np.ndarray) -> np.ndarray:
    return binom(n, k) * t**k * (1.0 - t) ** (n - k)


def _bezier_points(points: np.ndarray, num: int) -> np.ndarray:
    curve = np.zeros((num, 2))
    t = np.linspace(0, 1, num=num)
    for i in range(len(points)):
        curve += np.outer(_bernstein(len(points) - 1, i, t), points[i])
    return curve


def _naive_curve(a: np.ndarray, rad: float, edgy: float, numpoints: int = 100) -> np.ndarray:
    p = np.arctan(edgy) / np.pi + 0.5
    d = a - np.mean(a, axis=0)
    a = a[np.argsort(np.arctan2(d[:, 1], d[:, 0])), :]
    a = np.append(a, np.atleast_2d(a[0, :]), axis=0)
    diff = np.diff(a, axis=0)
    ang = []
    for dx, dy in diff:  # per-point loop
        angle = math.atan2(dy, dx)
        ang.append(angle if angle >= 0 else angle + 2 * np.pi)
    blended = []
    for i in range(len(ang)):
        a1, a2 = ang[i], ang[i - 1]
        blended.append(p * a1 + (1 - p) * a2 + (abs(a2 - a1) > np.pi) * np.pi)
    blended.append(blended[0])
    segments = []
    for i in range(len(a) - 1):  # per-segment Bézier with its own control points
        p1, p2 = a[i], a[i + 1]
        r = rad * math.sqrt(((p2 - p1) ** 2).sum())
        ctrl = np.zeros((4, 2))
        ctrl[0], ctrl[3] = p1, p2
        ctrl[1] = p1 + [r * math.cos(blended[i]), r * math.sin(blended[i])]
        ctrl[2] = p2 + [r * math.cos(blended[i + 1] + np.pi), r * math.sin(blended[i + 1] + np.pi)]
        segments.append(_bezier_points(ctrl, numpoints))
    return np.concatenate(segments)


def _naive_points(n: int, scale: float, mindst: float, rec: int = 0) -> np.ndarray:
    a = _NAIVE_RNG.random((n, 2))
    d = a - np.mean(a, axis=0)
    s = a[np.argsort(np.arctan2(d[:, 1], d[:, 0]))]
    closing = np.vstack([s, s[:1]])
    dist = [math.dist(closing[k], closing[k + 1]) for k in range(n)]
    if min(dist) >= mindst or rec >= 200:
        return a * scale
    return _naive_points(n, scale, mindst, rec + 1)


class NaiveBezier:
    """The reference's synthesize_one, with the same corrections as the package."""

    def __init__(self, by_class: list[list[Path]], size: int = 224):
        self.by_class, self.size = by_class, size

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        back_class, fore_class = _NAIVE_RNG.choice(len(self.by_class), size=2, replace=False)
        back_path = random.choice(self.by_class[back_class])
        fore_path = random.choice(self.by_class[fore_class])
        back = np.array(Image.open(back_path).resize((self.size, self.size)))
        fore = np.array(Image.open(fore_path).resize((self.size, self.size)))
        while True:
            points = _naive_points(5, self.size, 0.7 / 5)
            x, y = _naive_curve(points, 0.2, 0.05).T
            shape = np.zeros((self.size, self.size), np.uint8)
            cv2.fillPoly(shape, np.int32([np.stack([np.round(x), np.round(y)], axis=1)]), 1)
            if 0.05 <= shape.mean() <= 0.95:
                break
        image = shape[:, :, None] * fore + (1 - shape)[:, :, None] * back
        mask = shape * fore_class + (1 - shape) * back_class
        return image.astype(np.uint8), mask.astype(np.uint8)


def naive_save(folder: Path, i: int, image: np.ndarray, mask: np.ndarray, palette: list) -> None:
    Image.fromarray(image).save(folder / "img" / f"{i}.png")
    m = Image.fromarray(mask, mode="P")
    m.putpalette(palette)
    m.save(folder / "mask" / f"{i}.png")


# ----------------------------------------------------------------------------- timing

_POOL: SourcePool | None = None


def _fast_item(task: tuple[str, int]) -> int:
    method, i = task
    assert _POOL is not None
    return int(generate_one(_POOL, method, PARAMS[method], 0, i).mask[0, 0])


def timed_loop(fn: Callable[[int], object], seconds: float, minimum: int = 10) -> float:
    """Images/second of ``fn(i)`` called until ``seconds`` passed (and ``minimum`` calls)."""
    start = time.perf_counter()
    n = 0
    while n < minimum or time.perf_counter() - start < seconds:
        fn(n)
        n += 1
    return n / (time.perf_counter() - start)


def fast_parallel_memory(method: str, n: int, workers: int) -> float:
    ctx = mp.get_context("fork")
    tasks = [(method, i) for i in range(n)]
    with ctx.Pool(workers) as procs:
        procs.map(_fast_item, tasks[: workers * 2])  # start-up outside the timing
        start = time.perf_counter()
        procs.map(_fast_item, tasks, chunksize=16)
        return n / (time.perf_counter() - start)


def fast_written(
    root: Path, pool: SourcePool, method: str, n: int, workers: int, strategy: str, scratch: Path
) -> float:
    out = scratch / f"fast-{method}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    summary = synthesize(
        root,
        pool.spec,
        method,
        n,
        out,
        workers=workers,
        params=PARAMS[method],
        progress=False,
        pool=pool,
        png_strategy=strategy,
    )
    assert summary.written == n and not summary.failed
    shutil.rmtree(out)
    return n / summary.seconds


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_capacity(workers: int) -> float:
    """How much faster ``workers`` processes finish ``workers`` pure-CPU jobs than one
    process finishes one (``workers`` on an idle machine with that many free cores)."""
    n = 5_000_000
    start = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - start
    with mp.get_context("fork").Pool(workers) as procs:
        procs.map(_spin, [1000] * workers)
        start = time.perf_counter()
        procs.map(_spin, [n] * workers, chunksize=1)
        many = time.perf_counter() - start
    return workers * one / many


def main(argv: list[str] | None = None) -> int:
    global _POOL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=50, help="source images per class")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="hisynseg-bench-"))
    try:
        t0 = time.perf_counter()
        toy = make_toy_dataset(
            scratch / "data",
            "luad-histoseg",
            single_per_class=args.per_class,
            multi_train=0,
            num_val=0,
            num_test=0,
            patch_size=224,
            style="texture",
        )
        print(
            f"source dataset: {toy.num_single_label} textured 224 px PNGs "
            f"({args.per_class} per class), made in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        pool = SourcePool.build(toy.root, toy.spec, workers=args.workers, progress=False)
        decode = time.perf_counter() - t0
        print(f"pool: {len(pool)} sources decoded once in {decode:.2f} s ({args.workers} threads)")
        by_class = [
            [s.path for s in g]
            for g in single_label_pool(list_train(toy.root, toy.spec), toy.spec.num_classes)
        ]
        palette = palette_to_flat(toy.spec.palette)
        random.seed(0)
        naive = {"mosaic": NaiveMosaic(by_class), "bezier": NaiveBezier(by_class)}
        capacity = parallel_capacity(args.workers)
        print(
            f"machine: {os.cpu_count()} cores; {args.workers} processes of a pure-CPU loop run "
            f"{capacity:.2f}x as fast as one (the ceiling for the scaling column)"
        )
        cv2.setNumThreads(1)  # one core for the single-process measurements
        _POOL = pool
        rows = []
        for method in ("mosaic", "bezier"):
            naive_mem = timed_loop(lambda i, m=method: naive[m](), args.seconds)
            fast_mem = timed_loop(
                lambda i, m=method: generate_one(pool, m, PARAMS[m], 0, i), args.seconds
            )
            n_par = max(100, int(fast_mem * args.workers * args.seconds))
            fast_mem_n = fast_parallel_memory(method, n_par, args.workers)
            rows.append((method, "in memory", naive_mem, fast_mem, fast_mem_n))

            naive_dir = scratch / f"naive-{method}"
            for sub in ("img", "mask"):
                (naive_dir / sub).mkdir(parents=True, exist_ok=True)

            def naive_write(i: int, m: str = method, d: Path = naive_dir) -> None:
                image, mask = naive[m]()
                naive_save(d, i, image, mask, palette)

            naive_png = timed_loop(naive_write, args.seconds)
            for strategy in ("default", "rle"):
                n1 = max(20, int(naive_png * 6 * args.seconds))
                fast_png = fast_written(toy.root, pool, method, n1, 1, strategy, scratch)
                n_par = max(40, int(fast_png * args.workers * args.seconds))
                fast_png_n = fast_written(
                    toy.root, pool, method, n_par, args.workers, strategy, scratch
                )
                mode = "+ PNG (PIL)" if strategy == "default" else "+ PNG (RLE)"
                rows.append((method, mode, naive_png, fast_png, fast_png_n))
        cv2.setNumThreads(-1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    w = args.workers
    print()
    print(
        f"images/second at 224 px; naive = reference procedure, 1 process; fast = hisynseg "
        f"with 1 and {w} workers. '+ PNG': image and palette mask written as PNG, naive with "
        "PIL's defaults\n(as the reference), fast with PIL too (PIL) or with its default "
        "run-length zlib strategy (RLE); zlib level 6 everywhere"
    )
    header = (
        f"{'method':<7} {'mode':<15} {'naive':>8} {'fast 1w':>9} {f'fast {w}w':>9} "
        f"{'fast/naive 1w':>14} {f'fast/naive {w}w':>14} {f'scaling 1->{w}':>13}"
    )
    print(header)
    print("-" * len(header))
    for method, mode, nv, f1, fn in rows:
        print(
            f"{method:<7} {mode:<15} {nv:>8.1f} {f1:>9.1f} {fn:>9.1f} {f1 / nv:>13.1f}x "
            f"{fn / nv:>13.1f}x {fn / f1:>12.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
