"""Losses against values computed by hand, and Dice against smp's DiceLoss."""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch

from hisynseg.losses import (
    ClassificationLoss,
    ConsistencyLoss,
    DiceLoss,
    classification_loss,
    consistency_loss,
    dice_loss,
)


def _logits_of(probs: list[list[float]], h: int = 2, w: int = 2) -> torch.Tensor:
    """``1×C×h×w`` logits whose softmax is ``probs`` (one list of C values per pixel)."""
    p = torch.tensor(probs, dtype=torch.float64).T.reshape(1, -1, h, w)
    return p.log()


# ------------------------------------------------------------------------ classification


def test_classification_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    target = torch.tensor([[1, 0], [0, 1]])
    per_element = [
        math.log(2.0),  # sigmoid(0) vs 1
        math.log(1.0 + math.exp(2.0)),  # sigmoid(2) vs 0
        math.log(1.0 + math.exp(-1.0)),  # sigmoid(-1) vs 0
        math.log(1.0 + math.exp(-3.0)),  # sigmoid(3) vs 1
    ]
    expected = sum(per_element) / 4
    assert classification_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert ClassificationLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_classification_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        classification_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------- dice


def test_dice_by_hand_with_ignored_pixel() -> None:
    # Pixels (row-major): p(class 0) = .8 .6 .3 .1; the last pixel is ignored (index 4).
    logits = _logits_of([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    mask = torch.tensor([[[0, 0], [1, 4]]])
    # class 0: p = .8 .6 .3, g = 1 1 0 -> 2·1.4 / (1.7 + 2)
    # class 1: p = .2 .4 .7, g = 0 0 1 -> 2·0.7 / (1.3 + 1)
    expected = ((1 - 2.8 / 3.7) + (1 - 1.4 / 2.3)) / 2
    assert dice_loss(logits, mask, ignore_index=4).item() == pytest.approx(expected, rel=1e-9)
    assert DiceLoss(ignore_index=4)(logits, mask).item() == pytest.approx(expected, rel=1e-9)


def test_dice_class_absent_from_batch_contributes_zero() -> None:
    logits = _logits_of([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    mask = torch.tensor([[[0, 0], [1, 255]]])  # class 2 absent; 255 ignored
    # class 0: p = .7 .5 .1, g = 1 1 0 -> 2.4 / 3.3; class 1: p = .2 .3 .6 -> 1.2 / 2.1;
    # class 2: absent -> loss 0, still counted in the mean over the 3 classes.
    expected = ((1 - 2.4 / 3.3) + (1 - 1.2 / 2.1) + 0.0) / 3
    assert dice_loss(logits, mask, ignore_index=255).item() == pytest.approx(expected, rel=1e-9)


def test_dice_sums_over_the_batch_before_dividing() -> None:
    # Two images, class 1 only in the second: one dice per class over both images.
    logits = torch.cat(
        [
            _logits_of([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]),
            _logits_of([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]),
        ]
    )
    mask = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # class 0: I = 3.6, Σp = 3.6 + 2, Σg = 4; class 1: I = 2, Σp = 0.4 + 2, Σg = 4
    expected = ((1 - 7.2 / 9.6) + (1 - 4.0 / 6.4)) / 2
    assert dice_loss(logits, mask).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("ignore_index", [None, 4, 255])
def test_dice_matches_smp(ignore_index: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=g) * 3
    mask = torch.randint(0, 4, (3, 16, 16), generator=g)
    mask[mask == 3] = 2  # class 3 absent from the batch
    if ignore_index is not None:
        mask[torch.rand(mask.shape, generator=g) < 0.3] = ignore_index
    ref = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)
    ours = dice_loss(logits, mask, ignore_index)
    torch.testing.assert_close(ours, ref(logits, mask), rtol=1e-5, atol=1e-6)
    # Same gradient too.
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    dice_loss(a, mask, ignore_index).backward()
    ref(b, mask).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_dice_matches_smp_with_smoothing() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.randint(0, 4, (2, 8, 8), generator=g)  # 3 = ignored
    ref = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=3, smooth=1.0)
    torch.testing.assert_close(dice_loss(logits, mask, 3, smooth=1.0), ref(logits, mask))


def test_dice_edge_cases() -> None:
    logits = torch.randn(1, 2, 4, 4)
    everything_ignored = torch.full((1, 4, 4), 2)
    assert dice_loss(logits, everything_ignored, ignore_index=2).item() == 0.0
    perfect = torch.zeros(1, 2, 4, 4)
    perfect[:, 0, :2] = 50.0
    perfect[:, 1, 2:] = 50.0
    mask = torch.tensor([[0] * 4] * 2 + [[1] * 4] * 2)[None]
    assert dice_loss(perfect, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(perfect, mask[:, None]).item() == pytest.approx(0.0, abs=1e-6)  # B×1×H×W
    half = dice_loss(perfect.half(), mask)
    assert half.dtype == torch.float32


def test_dice_rejects_values_outside_the_classes() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"mask values \[3\]"):
        dice_loss(logits, torch.tensor([[[0, 1], [3, 4]]]), ignore_index=4)
    with pytest.raises(ValueError, match="does not match"):
        dice_loss(logits, torch.zeros(1, 3, 3, dtype=torch.long))


# --------------------------------------------------------------------------- consistency


def test_consistency_by_hand_with_resize() -> None:
    seg = torch.zeros(1, 2, 2, 2)
    seg[0, 0] = torch.tensor([[0.0, 2.0], [4.0, 2.0]])
    cam = torch.zeros(1, 2, 1, 1)
    # Bilinear 2×2 -> 1×1 (align_corners=False) samples the centre: the mean, 2 vs 0.
    # softmax(2, 0) vs softmax(0, 0): both channels differ by e²/(1+e²) − ½.
    expected = math.exp(2) / (1 + math.exp(2)) - 0.5
    assert consistency_loss(seg, cam).item() == pytest.approx(expected, rel=1e-6)
    assert ConsistencyLoss()(seg, cam).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_same_size_and_zero_when_equal() -> None:
    seg = torch.tensor([[[[1.0]], [[0.0]], [[-1.0]]]])  # 1×3×1×1
    cam = torch.zeros(1, 3, 1, 1)
    p = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    expected = (p - 1 / 3).abs().mean().item()
    assert consistency_loss(seg, cam).item() == pytest.approx(expected, rel=1e-6)
    x = torch.randn(2, 3, 4, 4)
    assert consistency_loss(x, x).item() == 0.0


def test_consistency_gradients_reach_both_inputs() -> None:
    seg = torch.randn(2, 3, 16, 16, requires_grad=True)
    cam = torch.randn(2, 3, 4, 4, requires_grad=True)
    consistency_loss(seg, cam).backward()
    assert seg.grad is not None and seg.grad.abs().sum() > 0
    assert cam.grad is not None and cam.grad.abs().sum() > 0


def test_consistency_shape_checks() -> None:
    with pytest.raises(ValueError, match="same B and C"):
        consistency_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 2))
