"""Training and evaluation transforms (albumentations 2.x), applied jointly to image and mask.

Training follows the paper (METHOD §5): random resized crop to the patch size (scale
0.9–1), horizontal and vertical flips, shift-scale-rotate (p 0.5, shift 0.0625, scale
±0.1, rotate ±45°, as albumentations' ``ShiftScaleRotate`` defaults, written as the
equivalent ``Affine``), optical distortion (p 0.5) and ImageNet mean/std normalisation.
Evaluation normalises only.

Geometric transforms move pixels in from outside the source. With ``border="constant"``
(the default) those pixels are white in the image, like slide background, and carry the
``fill_index`` (the dataset's background/exclude index, ignored by the Dice loss) in the
mask, so invented pixels never count as class 0. ``border="reflect"`` mirrors image and
mask alike instead (what albumentations 1.x did by default), which labels the mirrored
pixels with their true class.
"""

from __future__ import annotations

import os
from typing import Any

# albumentations asks the network for a newer release at import: slow or failing offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from hisynseg.normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "train_transform",
    "eval_transform",
    "to_chw_float",
]


_BORDERS = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}


def train_transform(patch_size: int, fill_index: int, border: str = "constant") -> A.Compose:
    """The paper's training augmentation.

    Args:
        patch_size: Side of the output crop.
        fill_index: Mask value of pixels that geometric transforms create from outside the
            source (the dataset's background/ignore index).
        border: ``"constant"`` or ``"reflect"`` (see the module docstring).

    Returns:
        A composition called as ``t(image=HxWx3 uint8, mask=HxW uint8)``; it returns a
        normalised ``float32`` image and the transformed mask. Images without a mask may
        omit ``mask``.
    """
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {sorted(_BORDERS)}, got {border!r}")
    mode = _BORDERS[border]
    fill: dict[str, Any] = {"border_mode": mode}
    if mode == cv2.BORDER_CONSTANT:
        # Per channel: OpticalDistortion hands a scalar to cv2.remap, which fills only
        # the first channel with it (red, not white).
        fill.update(fill=(255, 255, 255), fill_mask=fill_index)
    return A.Compose(
        [
            A.RandomResizedCrop(size=(patch_size, patch_size), scale=(0.9, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(
                translate_percent=(-0.0625, 0.0625),
                scale=(0.9, 1.1),
                rotate=(-45, 45),
                # One scale for both axes, as ShiftScaleRotate had.
                keep_ratio=True,
                p=0.5,
                **fill,
            ),
            A.OpticalDistortion(p=0.5, **fill),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def eval_transform() -> A.Compose:
    """Evaluation transform: ImageNet normalisation only (no resizing)."""
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def to_chw_float(image: np.ndarray) -> np.ndarray:
    """``HxWx3`` float image → contiguous ``3xHxW`` ``float32`` (what the network reads)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
