"""The networks' input convention: RGB scaled to [0, 1], then ImageNet mean and std.

Training (albumentations ``Normalize``), evaluation, pseudo-labelling, slide prediction
and the exported ONNX models all take images this way; this module is the one place
that says how. Importing it costs nothing: torch is imported by the functions, which
are only called where torch is already loaded.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalise_unit", "normalise_uint8"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: prediction calls this once per batch, and building the tensors
    # on a GPU costs a host-to-device copy each time.
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return mean, std


def normalise_unit(x: torch.Tensor) -> torch.Tensor:
    """``(…)×3×H×W`` float RGB in [0, 1] → ImageNet-normalised, on ``x``'s device."""
    mean, std = _statistics(x.device)
    return (x - mean) / std


def normalise_uint8(x: torch.Tensor) -> torch.Tensor:
    """``(…)×H×W×3`` ``uint8`` RGB → ``(…)×3×H×W`` float, ImageNet-normalised."""
    return normalise_unit(x.movedim(-1, -3).float().div_(255.0))
