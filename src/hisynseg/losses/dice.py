"""Multiclass soft Dice loss over softmax probabilities (METHOD §5, ``L_seg``).

It reproduces ``segmentation_models_pytorch.losses.DiceLoss(mode="multiclass",
from_logits=True, ignore_index=...)`` (smp 0.5+):

* ``p = softmax_c(S)``, ``g`` the one-hot mask; ignored pixels are removed from both;
* per class ``c``, summed over the whole batch and all pixels:
  ``I_c = Σ p·g``, ``dice_c = (I_c + smooth) / max(½·Σ(p + g) + smooth, eps)``, which is
  ``2Σpg / Σ(p+g)`` for ``smooth = 0`` (smp writes Dice as a Tversky score with
  α = β = ½, hence the ½ and where ``eps`` clamps);
* ``loss_c = 1 − dice_c``, set to 0 for classes absent from the batch's ground truth;
* the loss is the mean of ``loss_c`` over all ``C`` classes (absent ones count as 0).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DiceLoss", "dice_loss"]


def dice_loss(
    seg_logits: torch.Tensor,
    mask: torch.Tensor,
    ignore_index: int | None = None,
    eps: float = 1e-7,
    smooth: float = 0.0,
) -> torch.Tensor:
    """Multiclass soft Dice loss of segmentation logits against an index mask.

    Args:
        seg_logits: Logits ``B×C×H×W``.
        mask: Class indices ``B×H×W`` (or ``B×1×H×W``); values in ``[0, C)`` except
            ``ignore_index``.
        ignore_index: Mask value of pixels left out of the loss (the background/exclude
            index; it may be ``C`` or any other value), or ``None``.
        eps: Lower bound of the denominator (smp's default).
        smooth: Added to numerator and denominator (smp's default 0).

    Returns:
        A scalar tensor (float32 for half-precision logits); 0 when no pixel is labelled.

    Raises:
        ValueError: Shapes disagree or the mask holds a value outside ``[0, C)`` that is
            not ``ignore_index``.
    """
    if seg_logits.ndim != 4:
        raise ValueError(f"dice_loss: seg_logits must be B×C×H×W, got {tuple(seg_logits.shape)}")
    b, c = seg_logits.shape[:2]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != (b, *seg_logits.shape[2:]):
        raise ValueError(
            f"dice_loss: mask {tuple(mask.shape)} does not match seg_logits "
            f"{tuple(seg_logits.shape)}"
        )
    if seg_logits.dtype in (torch.float16, torch.bfloat16):
        # Half-precision sums over a batch of pixels overflow or lose all precision.
        seg_logits = seg_logits.float()
    # log_softmax().exp() as smp does: no vanishing gradient at saturated probabilities.
    probs = seg_logits.log_softmax(dim=1).exp().reshape(b, c, -1)
    target = mask.reshape(b, -1).long()
    if ignore_index is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= c))
    # One host sync: an out-of-range index would otherwise be a CUDA device-side assert.
    if bool(out_of_range.any()):
        bad = torch.unique(target[out_of_range])[:5].tolist()
        raise ValueError(
            f"dice_loss: mask values {bad} are not classes 0..{c - 1}"
            + ("" if ignore_index is None else f" nor the ignore index {ignore_index}")
        )
    weight = valid.unsqueeze(1).to(probs.dtype)
    probs = probs * weight
    onehot = torch.zeros_like(probs).scatter_(1, torch.where(valid, target, 0).unsqueeze(1), 1.0)
    onehot = onehot * weight
    intersection = (probs * onehot).sum(dim=(0, 2))
    cardinality = probs.sum(dim=(0, 2)) + onehot.sum(dim=(0, 2))
    dice = (intersection + smooth) / (0.5 * cardinality + smooth).clamp_min(eps)
    present = onehot.sum(dim=(0, 2)) > 0
    return ((1.0 - dice) * present.to(dice.dtype)).mean()


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`.

    Args:
        ignore_index: Mask value left out of the loss, or ``None``.
        eps: Lower bound of the denominator.
        smooth: Added to numerator and denominator.
    """

    def __init__(self, ignore_index: int | None = None, eps: float = 1e-7, smooth: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.eps = eps
        self.smooth = smooth

    def forward(self, seg_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return dice_loss(seg_logits, mask, self.ignore_index, eps=self.eps, smooth=self.smooth)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, eps={self.eps}, smooth={self.smooth}"
