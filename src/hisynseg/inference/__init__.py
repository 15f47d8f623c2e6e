"""Inference primitives: d4 test-time augmentation and sliding-window prediction.

The names below are loaded on first use, so that importing a torch-free submodule (slide
tile loading, tissue detection, canvases) never pulls in torch: tile reader processes
import those alone.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ProbabilityMerger": "hisynseg.inference.sliding",
    "Window": "hisynseg.inference.sliding",
    "predict_sliding": "hisynseg.inference.sliding",
    "sliding_windows": "hisynseg.inference.sliding",
    "window_starts": "hisynseg.inference.sliding",
    "D4_TRANSFORMS": "hisynseg.inference.tta",
    "D4Transform": "hisynseg.inference.tta",
    "predict_d4": "hisynseg.inference.tta",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hisynseg.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
