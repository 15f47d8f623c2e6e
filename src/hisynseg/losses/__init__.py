"""The HisynSeg losses (METHOD §5): classification, Dice and consistency.

Each is a plain function plus an ``nn.Module`` wrapper.
"""

from hisynseg.losses.classification import ClassificationLoss, classification_loss
from hisynseg.losses.consistency import ConsistencyLoss, consistency_loss
from hisynseg.losses.dice import DiceLoss, dice_loss

__all__ = [
    "ClassificationLoss",
    "ConsistencyLoss",
    "DiceLoss",
    "classification_loss",
    "consistency_loss",
    "dice_loss",
]
