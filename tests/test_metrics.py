"""Confusion matrix and scores against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hisynseg.evaluation import (
    ConfusionMatrix,
    compute_scores,
    format_table,
    scores_from_confusion,
    scores_to_dict,
)

NAMES = ["tumor", "stroma", "normal"]

# Ground truth with background index 3; prediction 3 on tissue is an error.
GT = np.array([[0, 0, 1, 1], [2, 3, 0, 1]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [3, 0, 0, 2]], dtype=np.uint8)
# (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,3) [ignored] (0,0) (1,2)
MATRIX = np.array([[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 1]])


def test_matrix_and_scores_by_hand() -> None:
    cm = ConfusionMatrix(3, ignore_index=3)
    cm.update(PRED, GT)
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    assert cm.matrix.dtype == np.int64
    s = cm.compute()
    # IoU: 2/(3+2-2), 2/(3+3-2), 0/(1+1-0)
    np.testing.assert_allclose(s.iou, [2 / 3, 0.5, 0.0])
    assert s.miou == pytest.approx((2 / 3 + 0.5) / 3)
    np.testing.assert_allclose(s.frequency, [3 / 7, 3 / 7, 1 / 7])
    assert s.fwiou == pytest.approx(3 / 7 * 2 / 3 + 3 / 7 * 0.5)
    assert s.pixel_accuracy == pytest.approx(4 / 7)


def test_torch_inputs_batches_and_accumulation() -> None:
    cm = ConfusionMatrix(3, ignore_index=3)
    cm.update(torch.from_numpy(PRED[:1]).long(), torch.from_numpy(GT[:1]))
    cm.update(PRED[1:], GT[1:])
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    batch = ConfusionMatrix(3, ignore_index=3)
    batch.update(np.stack([PRED, PRED]), np.stack([GT, GT]))
    np.testing.assert_array_equal(batch.matrix, 2 * MATRIX)
    other = ConfusionMatrix(3, ignore_index=3)
    other.update(PRED, GT)
    cm.merge(other)
    np.testing.assert_array_equal(cm.matrix, 2 * MATRIX)
    cm.reset()
    assert cm.matrix.sum() == 0


def test_any_non_tissue_prediction_is_a_false_negative() -> None:
    cm = ConfusionMatrix(2, ignore_index=2)
    cm.update(np.array([2, 255, -1, 0]), np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(cm.matrix, [[0, 0, 2], [1, 0, 1]])
    s = cm.compute()
    np.testing.assert_allclose(s.iou, [0.0, 0.0])


def test_class_absent_everywhere_is_nan_and_left_out() -> None:
    cm = ConfusionMatrix(3, ignore_index=3)
    cm.update(np.array([0, 1, 0]), np.array([0, 1, 1]))
    s = cm.compute()
    assert s.iou[0] == pytest.approx(0.5) and s.iou[1] == pytest.approx(0.5)
    assert math.isnan(s.iou[2])
    assert s.miou == pytest.approx(0.5)
    assert s.fwiou == pytest.approx(0.5)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1]), np.array([0, 0]))
    s = cm.compute()
    np.testing.assert_allclose(s.iou, [0.5, 0.0])
    assert s.miou == pytest.approx(0.25)
    assert s.fwiou == pytest.approx(0.5)  # class 1 has no ground-truth weight


def test_nothing_scored() -> None:
    cm = ConfusionMatrix(2, ignore_index=2)
    cm.update(np.array([0, 1]), np.array([2, 2]))
    s = cm.compute()
    assert cm.matrix.sum() == 0
    assert math.isnan(s.miou) and math.isnan(s.fwiou) and math.isnan(s.pixel_accuracy)


def test_bad_inputs() -> None:
    cm = ConfusionMatrix(2, ignore_index=4)
    with pytest.raises(ValueError, match=r"\[3\]"):
        cm.update(np.array([0, 0]), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        compute_scores(np.zeros((2, 4)))


def test_square_matrix_from_elsewhere() -> None:
    square = MATRIX[:, :3]  # without the "other" column: row 2 no longer counts
    d = scores_from_confusion(square, NAMES)
    assert [d["iou"][n] for n in NAMES] == pytest.approx([2 / 3, 0.5, 0.0])
    assert d["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0]]
    d = scores_from_confusion(np.array([[2, 1, 0], [0, 2, 0], [0, 0, 0]]), NAMES)
    assert math.isnan(d["iou"]["normal"])  # neither in ground truth nor predicted
    assert d["miou"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_scores_to_dict_and_json() -> None:
    cm = ConfusionMatrix(3, ignore_index=3)
    cm.update(PRED, GT)
    d = scores_to_dict(cm.compute(), NAMES)
    assert set(d) == {"miou", "fwiou", "pixel_accuracy", "iou", "confusion_matrix"}
    assert list(d["iou"]) == NAMES
    assert d["confusion_matrix"] == MATRIX.tolist()
    assert d["fwiou"] == pytest.approx(0.5)
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(ValueError, match="class names"):
        scores_to_dict(cm.compute(), NAMES[:2])

    absent = ConfusionMatrix(3)
    absent.update(np.array([0]), np.array([0]))
    strict = scores_to_dict(absent.compute(), NAMES, nan_as_none=True)
    assert strict["iou"]["stroma"] is None
    json.dumps(strict, allow_nan=False)  # strict JSON


def test_format_table() -> None:
    cm = ConfusionMatrix(3, ignore_index=3)
    cm.update(PRED, GT)
    table = format_table(cm.compute(), NAMES)
    lines = table.splitlines()
    assert lines[1].split() == ["tumor", "66.67", "42.86"]
    assert lines[3].split() == ["normal", "0.00", "14.29"]
    assert "mIoU" in table and "38.89" in table
    assert any(line.split() == ["FwIoU", "50.00"] for line in lines)
