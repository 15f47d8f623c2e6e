"""Sliding-window prediction of large images, at one or several scales (METHOD §7).

Windows of ``window×window`` pixels step by ``stride`` and always end exactly on the
image's right and bottom edges (the last window is shifted back rather than hanging
over). An image side shorter than a window is padded (bottom/right) up to one window;
predictions on the padding are dropped. Softmax probabilities of overlapping windows are
averaged per pixel in a :class:`ProbabilityMerger`, which holds one image's sums and
counts in memory or in ``np.memmap`` files (for whole slides).

Multi-scale prediction (WSSS4LUAD test: scales 1, 1.25, …, 2, stride 112) resizes the
image for each scale, predicts it by windows, resizes the averaged probabilities back to
full size and averages them over the scales.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ProbabilityMerger",
    "Window",
    "predict_sliding",
    "sliding_windows",
    "window_starts",
]


class Window(NamedTuple):
    """A ``size×size`` window whose top-left corner is at ``(top, left)`` in image pixels.

    The window may reach past the bottom/right edge of an image smaller than it.
    """

    top: int
    left: int
    size: int


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis of ``length`` pixels.

    ``0, stride, 2·stride, …`` while a window fits, plus a last window ending exactly at
    ``length`` when the steps do not land there. A side no longer than a window has the
    single start 0.

    Raises:
        ValueError: ``stride`` outside ``[1, window]`` (windows would leave gaps).
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if length < 1:
        raise ValueError(f"cannot tile an axis of {length} pixels")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_windows(
    height: int, width: int, window: int = 224, stride: int = 112
) -> Iterator[Window]:
    """The windows covering a ``height×width`` image, row by row."""
    xs = window_starts(width, window, stride)
    for top in window_starts(height, window, stride):
        for left in xs:
            yield Window(top, left, window)


class ProbabilityMerger:
    """Per-pixel average of class probabilities predicted on overlapping windows.

    Holds a ``C×H×W`` sum and an ``H×W`` weight, in memory or in two ``np.memmap`` files.

    Args:
        num_classes: Number of channels ``C``.
        height: Image height.
        width: Image width.
        directory: Where to put the memmap files (created there with unique names and
            deleted by :meth:`close`); ``None`` keeps everything in memory.
    """

    def __init__(
        self,
        num_classes: int,
        height: int,
        width: int,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if num_classes < 1 or height < 1 or width < 1:
            raise ValueError(f"bad merger size {num_classes}×{height}×{width}")
        self.num_classes = int(num_classes)
        self.height = int(height)
        self.width = int(width)
        self._files: list[Path] = []
        if directory is None:
            self.sums: np.ndarray = np.zeros((num_classes, height, width), np.float32)
            self.weights: np.ndarray = np.zeros((height, width), np.float32)
        else:
            self.sums = self._memmap(directory, "sums", (num_classes, height, width))
            self.weights = self._memmap(directory, "weights", (height, width))

    def _memmap(self, directory: str | os.PathLike[str], tag: str, shape: tuple[int, ...]) -> Any:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"merger-{tag}-", suffix=".f32", dir=directory)
        os.close(fd)
        self._files.append(Path(name))
        # A fresh w+ memmap is zero-filled (sparse file).
        return np.memmap(name, dtype=np.float32, mode="w+", shape=shape)

    @property
    def is_memmap(self) -> bool:
        return bool(self._files)

    def add(
        self,
        probs: np.ndarray,
        top: int,
        left: int,
        weight: float | np.ndarray = 1.0,
    ) -> None:
        """Add ``C×h×w`` probabilities whose top-left pixel is at ``(top, left)``.

        Parts outside the image (padding) are dropped.

        Args:
            probs: ``C×h×w`` array.
            top: Row of ``probs[:, 0, 0]`` in the image.
            left: Column of ``probs[:, 0, 0]`` in the image.
            weight: Scalar or ``h×w`` weight of these predictions.
        """
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes}×h×w probabilities, got {probs.shape}")
        h, w = probs.shape[1:]
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + h, self.height), min(left + w, self.width)
        if y1 <= y0 or x1 <= x0:
            return
        py, px = y0 - top, x0 - left
        region = probs[:, py : py + y1 - y0, px : px + x1 - x0]
        if np.ndim(weight) == 0:
            self.sums[:, y0:y1, x0:x1] += float(weight) * region
            self.weights[y0:y1, x0:x1] += float(weight)
        else:
            wmap = np.asarray(weight, np.float32)
            if wmap.shape != (h, w):
                raise ValueError(f"weight map {wmap.shape} does not match window {(h, w)}")
            wmap = wmap[py : py + y1 - y0, px : px + x1 - x0]
            self.sums[:, y0:y1, x0:x1] += wmap * region
            self.weights[y0:y1, x0:x1] += wmap

    def add_batch(self, probs: np.ndarray, windows: Sequence[Window]) -> None:
        """Add ``B×C×s×s`` window predictions, one per window."""
        if len(probs) != len(windows):
            raise ValueError(f"{len(probs)} predictions for {len(windows)} windows")
        for p, win in zip(probs, windows, strict=True):
            self.add(p, win.top, win.left)

    def uncovered(self) -> int:
        """Number of pixels that received no prediction."""
        return int(np.count_nonzero(self.weights == 0))

    def region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Averaged probabilities of a region, ``C×height×width`` float32 (0 if uncovered)."""
        w = self.weights[top : top + height, left : left + width]
        s = self.sums[:, top : top + height, left : left + width]
        return (s / np.maximum(w, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)

    def result(self, out: np.ndarray | None = None, rows_per_chunk: int = 512) -> np.ndarray:
        """Averaged probabilities of the whole image, ``C×H×W`` float32.

        Computed a band of rows at a time, so a memmap-backed merger can write into a
        memmap ``out`` without holding the image in memory.
        """
        if out is None:
            out = np.empty((self.num_classes, self.height, self.width), np.float32)
        elif out.shape != (self.num_classes, self.height, self.width):
            raise ValueError(f"out has shape {out.shape}, expected {self.sums.shape}")
        for r in range(0, self.height, rows_per_chunk):
            n = min(rows_per_chunk, self.height - r)
            out[:, r : r + n] = self.region(r, 0, n, self.width)
        return out

    def close(self) -> None:
        """Delete the memmap files; a no-op for in-memory mergers.

        The merger is unusable afterwards. The mappings are released when the last array
        referring to them goes (unmapping them here would crash any live view).
        """
        if not self._files:
            return
        self.sums = np.zeros((self.num_classes, 0, 0), np.float32)
        self.weights = np.zeros((0, 0), np.float32)
        for f in self._files:
            f.unlink(missing_ok=True)
        self._files = []

    def __enter__(self) -> ProbabilityMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_chw_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"expected an H×W×C array, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"expected a C×H×W tensor, got shape {tuple(image.shape)}")
    return image if image.is_floating_point() else image.float()


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``C×H×W`` (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False, antialias=shrink
    )[0]


def _pad_to(
    x: torch.Tensor, height: int, width: int, value: float | Sequence[float]
) -> torch.Tensor:
    """Pad ``C×h×w`` at the bottom/right to at least ``height×width`` with ``value``."""
    c, h, w = x.shape
    if h >= height and w >= width:
        return x
    values = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1)
    if values.numel() not in (1, c):
        raise ValueError(f"pad_value needs 1 or {c} values, got {values.numel()}")
    out = values.reshape(-1, 1, 1).expand(c, max(h, height), max(w, width)).clone()
    out[:, :h, :w] = x
    return out


def _predict_scale(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int,
    pad_value: float | Sequence[float],
    memmap_dir: str | os.PathLike[str] | None,
) -> np.ndarray:
    """Window-averaged probabilities of one (already resized) image, ``C×h×w``."""
    _, h, w = image.shape
    padded = _pad_to(image, window, window, pad_value)
    windows = list(sliding_windows(h, w, window, stride))
    with ProbabilityMerger(num_classes, h, w, directory=memmap_dir) as merger:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            crops = torch.stack([padded[:, t : t + s, x : x + s] for t, x, s in chunk])
            probs = prob_fn(crops)
            if tuple(probs.shape) != (len(chunk), num_classes, window, window):
                raise ValueError(
                    f"prob_fn returned {tuple(probs.shape)} for {len(chunk)} windows; "
                    f"expected {(len(chunk), num_classes, window, window)}"
                )
            merger.add_batch(probs.detach().float().cpu().numpy(), chunk)
        return merger.result()


def predict_sliding(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor | np.ndarray,
    num_classes: int,
    window: int = 224,
    stride: int = 112,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 8,
    pad_value: float | Sequence[float] = 0.0,
    memmap_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Per-pixel class probabilities of a large image by (multi-scale) sliding windows.

    For each scale the image is resized (bilinear), cut into windows that are run through
    ``prob_fn`` ``batch_size`` at a time, the window probabilities are averaged where
    they overlap, and the result is resized back to full size; the scales are averaged.

    Args:
        prob_fn: Maps a batch ``B×C_in×window×window`` (same value space as ``image``;
            normalisation, TTA and the softmax are ``prob_fn``'s job) to per-pixel
            probabilities ``B×num_classes×window×window``. Called under ``no_grad``.
        image: ``C_in×H×W`` tensor (any device) or ``H×W×C_in`` numpy array (converted
            to a float tensor with its values unchanged).
        num_classes: Channels ``prob_fn`` returns.
        window: Window side (the training patch size).
        stride: Step between windows, at most ``window``.
        scales: Resize factors (METHOD §7 test: ``(1, 1.25, 1.5, 1.75, 2)``).
        batch_size: Windows per ``prob_fn`` call.
        pad_value: Fill (one value, or one per input channel) of the padding added when a
            (scaled) side is shorter than ``window``.
        memmap_dir: Keep the per-scale accumulators in memmap files there.

    Returns:
        ``num_classes×H×W`` float32 probabilities at the input's full size.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {list(scales)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    x = _as_chw_tensor(image)
    _, height, width = x.shape
    window_starts(max(height, 1), window, stride)  # validates window/stride early
    total = np.zeros((num_classes, height, width), np.float32)
    with torch.no_grad():
        for scale in scales:
            size = (
                max(1, math.floor(height * scale + 0.5)),
                max(1, math.floor(width * scale + 0.5)),
            )
            probs = _predict_scale(
                prob_fn,
                _resize(x, size),
                num_classes,
                window,
                stride,
                batch_size,
                pad_value,
                memmap_dir,
            )
            if size != (height, width):
                probs = _resize(torch.from_numpy(probs), (height, width)).numpy()
            total += probs
    total /= len(scales)
    return total
