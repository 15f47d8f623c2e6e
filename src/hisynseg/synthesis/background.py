"""White non-tissue background of training patches (WSSS4LUAD), found by thresholding.

A pixel is background when its grey level is above a threshold and it belongs to a bright
4-connected region of at least a minimum number of pixels; smaller bright specks (lumen,
fat droplets, glare inside tissue) stay tissue. This is the reference implementation's
``cv2.threshold`` + ``skimage.morphology.remove_small_objects(connectivity=1)`` recipe,
done with OpenCV's connected components so that the synthesis needs no scikit-image.
"""

from __future__ import annotations

import cv2
import numpy as np

from hisynseg.datasets.spec import DatasetSpec

__all__ = ["background_mask", "spec_background_mask"]


def background_mask(image: np.ndarray, grey_threshold: int, min_size: int) -> np.ndarray:
    """Boolean map of the background pixels of an RGB image.

    Args:
        image: ``H×W×3`` ``uint8`` RGB image.
        grey_threshold: Pixels whose grey level (ITU-R 601 luma, as ``cv2.COLOR_RGB2GRAY``)
            is strictly above this may be background.
        min_size: Bright 4-connected regions with fewer pixels than this stay tissue.

    Returns:
        An ``H×W`` ``bool`` array, true on background.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    bright = (grey > grey_threshold).astype(np.uint8)
    if not bright.any():
        return np.zeros(bright.shape, dtype=bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # component 0 is the non-bright remainder
    return keep[labels]


def spec_background_mask(image: np.ndarray, spec: DatasetSpec) -> np.ndarray | None:
    """:func:`background_mask` with the dataset's thresholds, or ``None`` when there is no
    background: the dataset's training patches have none (``spec.background_in_train``
    false) or this image has no background pixel. ``None`` lets the source pool skip
    storing and consulting all-false maps."""
    if not spec.background_in_train:
        return None
    mask = background_mask(image, spec.background_grey_threshold, spec.background_min_size)
    return mask if mask.any() else None
