"""Consistency regularisation between segmentation output and CAM (METHOD §5).

``L_reg = mean |softmax_c(resize_bilinear(S → size of A)) − softmax_c(A)|``: the
segmentation logits are resized to the CAM's size, both are turned into class
distributions, and their absolute difference is averaged over every element
(batch, class and position). Gradients flow into both branches (no stop-gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConsistencyLoss", "consistency_loss"]


def consistency_loss(seg_logits: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the class distributions of ``S`` and ``A``.

    Args:
        seg_logits: Segmentation logits ``B×C×H×W``.
        cam: Class activation map ``B×C×h×w``.

    Returns:
        A scalar tensor in ``[0, 2/C]`` (each position's L1 distance is at most 2).

    Raises:
        ValueError: Batch size or class count differ.
    """
    if seg_logits.ndim != 4 or cam.ndim != 4 or seg_logits.shape[:2] != cam.shape[:2]:
        raise ValueError(
            f"consistency_loss: seg_logits {tuple(seg_logits.shape)} and cam "
            f"{tuple(cam.shape)} must both be B×C×H×W with the same B and C"
        )
    if seg_logits.shape[-2:] != cam.shape[-2:]:
        seg_logits = F.interpolate(
            seg_logits, size=cam.shape[-2:], mode="bilinear", align_corners=False
        )
    return (seg_logits.softmax(dim=1) - cam.softmax(dim=1)).abs().mean()


class ConsistencyLoss(nn.Module):
    """Module form of :func:`consistency_loss`."""

    def forward(self, seg_logits: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        return consistency_loss(seg_logits, cam)
