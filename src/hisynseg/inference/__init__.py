"""Inference primitives: d4 test-time augmentation and sliding-window prediction."""

from hisynseg.inference.sliding import (
    ProbabilityMerger,
    Window,
    predict_sliding,
    sliding_windows,
    window_starts,
)
from hisynseg.inference.tta import D4_TRANSFORMS, D4Transform, predict_d4

__all__ = [
    "D4_TRANSFORMS",
    "D4Transform",
    "ProbabilityMerger",
    "Window",
    "predict_d4",
    "predict_sliding",
    "sliding_windows",
    "window_starts",
]
