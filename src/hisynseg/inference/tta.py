"""d4 test-time augmentation: the eight flips/rotations of the square (METHOD §6, §7).

Each transform acts on the last two dimensions of a tensor (``...×H×W``): an optional
horizontal flip (of the last axis) followed by ``k`` counter-clockwise quarter turns. Its
inverse undoes the turns, then the flip, so predictions made on a transformed image map
back onto the original pixels. Non-square inputs work too (quarter turns swap H and W,
and the inverse swaps them back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = ["D4Transform", "D4_TRANSFORMS", "predict_d4"]


class D4Transform(NamedTuple):
    """One element of the dihedral group of the square.

    Attributes:
        rotations: Counter-clockwise quarter turns, 0–3 (applied after the flip).
        flip: Whether the last axis is reversed first.
    """

    rotations: int
    flip: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the last two dimensions of ``x``."""
        if self.flip:
            x = x.flip(-1)
        if self.rotations % 4:
            x = torch.rot90(x, self.rotations, dims=(-2, -1))
        return x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` (``invert(apply(x)) == x``)."""
        if self.rotations % 4:
            x = torch.rot90(x, -self.rotations, dims=(-2, -1))
        if self.flip:
            x = x.flip(-1)
        return x


# The identity first: a one-transform TTA is plain prediction.
D4_TRANSFORMS: tuple[D4Transform, ...] = tuple(
    D4Transform(k, f) for f in (False, True) for k in range(4)
)


def predict_d4(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    transforms: Sequence[D4Transform] = D4_TRANSFORMS,
) -> torch.Tensor:
    """Mean of ``fn``'s outputs over the transformed inputs, mapped back to ``x``'s frame.

    Args:
        fn: Maps a batch ``B×3×H×W`` to dense outputs ``B×C×H×W`` (segmentation logits:
            the paper averages logits, not probabilities).
        x: The batch.
        transforms: The group elements to average over (default: all eight).

    Returns:
        ``B×C×H×W`` in ``fn``'s output dtype (accumulated in float32).
    """
    if not transforms:
        raise ValueError("predict_d4 needs at least one transform")
    total: torch.Tensor | None = None
    dtype = x.dtype
    for t in transforms:
        out = t.invert(fn(t.apply(x)))
        dtype = out.dtype
        out = out.float()
        total = out if total is None else total + out
    assert total is not None
    return (total / len(transforms)).to(dtype)
