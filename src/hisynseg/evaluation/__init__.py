"""Evaluation: confusion matrix and the segmentation scores (IoU, mIoU, FwIoU)."""

from hisynseg.evaluation.metrics import (
    ConfusionMatrix,
    SegmentationScores,
    compute_scores,
    format_table,
    scores_from_confusion,
    scores_to_dict,
)

__all__ = [
    "ConfusionMatrix",
    "SegmentationScores",
    "compute_scores",
    "format_table",
    "scores_from_confusion",
    "scores_to_dict",
]
