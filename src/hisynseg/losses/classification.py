"""Image-level classification loss ``L_cls = BCEWithLogits(GAP(A), y)`` (METHOD §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassificationLoss", "classification_loss"]


def classification_loss(cls_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over images and classes.

    Args:
        cls_logits: Image-level logits ``B×C`` (the global average of the CAM).
        target: Multi-hot labels ``B×C`` (any numeric dtype; converted to the logits' dtype).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: The shapes differ.
    """
    if cls_logits.shape != target.shape:
        raise ValueError(
            f"classification_loss: logits {tuple(cls_logits.shape)} and target "
            f"{tuple(target.shape)} must have the same shape"
        )
    return F.binary_cross_entropy_with_logits(cls_logits, target.to(cls_logits.dtype))


class ClassificationLoss(nn.Module):
    """Module form of :func:`classification_loss`."""

    def forward(self, cls_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return classification_loss(cls_logits, target)
