"""Segmentation metrics from one confusion matrix over a whole split (METHOD §7).

Conventions:

* Rows are ground-truth tissue classes ``0..C-1``; ground-truth pixels equal to the
  ignore (background/exclude) index are skipped. Any other ground-truth value outside
  ``0..C-1`` is an error.
* Columns are predicted tissue classes ``0..C-1`` plus one last column, "other", for
  every prediction that is not a tissue class (the background index, typically). Such a
  prediction on a tissue pixel is a false negative of the pixel's class and a false
  positive of no class.
* ``IoU_c = TP / (TP + FP + FN)``. A class that is neither in the ground truth nor
  predicted has no IoU: it is NaN and left out of the mIoU (``nanmean``), as in the
  reference code. A class predicted but absent from the ground truth has IoU 0 and
  counts.
* ``mIoU`` = mean IoU over the tissue classes; ``FwIoU = Σ_c freq_c · IoU_c`` with
  ``freq_c`` the share of class ``c`` among the scored (non-background) ground-truth
  pixels. Both are NaN when nothing was scored.

Scores are fractions in ``[0, 1]``; :func:`format_table` prints percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ConfusionMatrix",
    "SegmentationScores",
    "compute_scores",
    "format_table",
    "scores_from_confusion",
    "scores_to_dict",
]


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix.

    Attributes:
        iou: Per-class IoU, shape ``(C,)``; NaN for a class neither in the ground truth
            nor predicted.
        miou: Mean IoU over the classes that have one.
        fwiou: Frequency-weighted IoU.
        pixel_accuracy: Share of scored pixels predicted right.
        frequency: Share of each class among the scored ground-truth pixels, ``(C,)``.
        confusion: The matrix, ``C×(C+1)`` int64 (last column: predictions that are not a
            tissue class).
    """

    iou: np.ndarray
    miou: float
    fwiou: float
    pixel_accuracy: float
    frequency: np.ndarray
    confusion: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.iou.shape[0])


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a)


class ConfusionMatrix:
    """Accumulates a ``C×(C+1)`` int64 confusion matrix over label maps.

    Args:
        num_classes: Number of tissue classes ``C``.
        ignore_index: Ground-truth value of pixels that are not scored (the background /
            exclude index), or ``None``.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.matrix[:] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add one label map (or a batch of them) to the matrix.

        Args:
            pred: Predicted indices, numpy array or torch tensor, any integer dtype.
            target: Ground-truth indices of the same shape.

        Raises:
            ValueError: Shapes differ, or the ground truth holds a value that is neither
                a class nor the ignore index.
        """
        p = _to_numpy(pred)
        t = _to_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {t.shape} differ in shape")
        t = t.ravel().astype(np.int64, copy=False)
        p = p.ravel().astype(np.int64, copy=False)
        if self.ignore_index is not None:
            keep = t != self.ignore_index
            t, p = t[keep], p[keep]
        if t.size == 0:
            return
        c = self.num_classes
        if t.min() < 0 or t.max() >= c:
            bad = np.unique(t[(t < 0) | (t >= c)])[:5].tolist()
            raise ValueError(
                f"ground truth holds {bad}, which are neither classes 0..{c - 1} "
                f"nor the ignore index {self.ignore_index}"
            )
        p = np.where((p >= 0) & (p < c), p, c)
        counts = np.bincount(t * (c + 1) + p, minlength=c * (c + 1))
        self.matrix += counts.reshape(c, c + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same classes (e.g. from another worker)."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError("cannot merge confusion matrices of different class counts")
        self.matrix += other.matrix

    def compute(self) -> SegmentationScores:
        """Per-class IoU, mIoU, FwIoU and pixel accuracy of what was accumulated."""
        return compute_scores(self.matrix)


def compute_scores(matrix: np.ndarray) -> SegmentationScores:
    """Scores of a confusion matrix (rows: ground truth, columns: prediction).

    Args:
        matrix: ``C×C`` or ``C×(C+1)`` counts; an extra last column holds predictions
            that are not a tissue class.

    Raises:
        ValueError: Another shape.
    """
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[1] not in (m.shape[0], m.shape[0] + 1):
        raise ValueError(f"confusion matrix must be C×C or C×(C+1), got {m.shape}")
    c = m.shape[0]
    if m.shape[1] == c:
        m = np.concatenate([m, np.zeros((c, 1), np.int64)], axis=1)
    tp = np.diag(m[:, :c]).astype(np.float64)
    gt = m.sum(axis=1).astype(np.float64)
    predicted = m[:, :c].sum(axis=0).astype(np.float64)
    union = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    scored = gt.sum()
    have = ~np.isnan(iou)
    miou = float(iou[have].mean()) if have.any() else math.nan
    if scored > 0:
        frequency = gt / scored
        present = frequency > 0  # such classes have union > 0, hence an IoU
        fwiou = float((frequency[present] * iou[present]).sum())
        accuracy = float(tp.sum() / scored)
    else:
        frequency = np.zeros(c)
        fwiou = accuracy = math.nan
    return SegmentationScores(
        iou=iou,
        miou=miou,
        fwiou=fwiou,
        pixel_accuracy=accuracy,
        frequency=frequency,
        confusion=m,
    )


def _num(value: float, nan_as_none: bool) -> float | None:
    value = float(value)
    return None if nan_as_none and math.isnan(value) else value


def scores_to_dict(
    scores: SegmentationScores, class_names: Sequence[str], nan_as_none: bool = False
) -> dict[str, Any]:
    """A JSON-friendly dictionary of the scores.

    Args:
        scores: From :meth:`ConfusionMatrix.compute` or :func:`compute_scores`.
        class_names: One name per tissue class.
        nan_as_none: Write NaN (a class never seen nor predicted) as ``None`` (JSON
            ``null``) instead of a float NaN, for strict JSON readers.

    Returns:
        ``{"miou", "fwiou", "pixel_accuracy", "iou": {name: value},
        "confusion_matrix": [[...]]}`` (``C`` rows of ``C+1`` counts, the last column
        counting predictions that are not a tissue class).

    Raises:
        ValueError: ``class_names`` does not have one name per class.
    """
    if len(class_names) != scores.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for {scores.num_classes} classes: {list(class_names)}"
        )
    return {
        "miou": _num(scores.miou, nan_as_none),
        "fwiou": _num(scores.fwiou, nan_as_none),
        "pixel_accuracy": _num(scores.pixel_accuracy, nan_as_none),
        "iou": {
            str(name): _num(v, nan_as_none)
            for name, v in zip(class_names, scores.iou.tolist(), strict=True)
        },
        "confusion_matrix": scores.confusion.tolist(),
    }


def scores_from_confusion(
    matrix: np.ndarray, class_names: Sequence[str], nan_as_none: bool = False
) -> dict[str, Any]:
    """:func:`scores_to_dict` of :func:`compute_scores`, for a matrix built elsewhere."""
    return scores_to_dict(compute_scores(matrix), class_names, nan_as_none=nan_as_none)


def format_table(scores: SegmentationScores, class_names: Sequence[str]) -> str:
    """A plain-text table of per-class IoU and the summary scores, in percent.

    Example::

        class              IoU %   GT share %
        tumor              81.23        52.10
        ...
        mIoU               78.40
        FwIoU              80.02
        pixel accuracy     88.91
    """
    if len(class_names) != scores.num_classes:
        raise ValueError(f"{len(class_names)} class names for {scores.num_classes} classes")

    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100.0 * v:.2f}"

    width = max([len("pixel accuracy"), *(len(str(n)) for n in class_names)]) + 2
    lines = [f"{'class':<{width}}{'IoU %':>8}{'GT share %':>13}"]
    for name, iou, freq in zip(
        class_names, scores.iou.tolist(), scores.frequency.tolist(), strict=True
    ):
        lines.append(f"{str(name):<{width}}{pct(iou):>8}{pct(freq):>13}")
    lines.append("-" * (width + 21))
    lines.append(f"{'mIoU':<{width}}{pct(scores.miou):>8}")
    lines.append(f"{'FwIoU':<{width}}{pct(scores.fwiou):>8}")
    lines.append(f"{'pixel accuracy':<{width}}{pct(scores.pixel_accuracy):>8}")
    return "\n".join(lines)
