"""d4 test-time augmentation and sliding-window prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hisynseg.inference import (
    D4_TRANSFORMS,
    ProbabilityMerger,
    Window,
    predict_d4,
    predict_sliding,
    sliding_windows,
    window_starts,
)

# ------------------------------------------------------------------------------------ d4


def test_d4_has_eight_distinct_transforms() -> None:
    assert len(D4_TRANSFORMS) == 8 and len(set(D4_TRANSFORMS)) == 8
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = {tuple(t.apply(x).flatten().tolist()) for t in D4_TRANSFORMS}
    assert len(images) == 8
    assert D4_TRANSFORMS[0].rotations == 0 and not D4_TRANSFORMS[0].flip


@pytest.mark.parametrize("t", D4_TRANSFORMS, ids=str)
def test_inverse_undoes_transform_on_non_square_input(t) -> None:
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(t.invert(t.apply(x)), x)
    y = t.apply(x)
    assert torch.equal(t.apply(t.invert(y)), y)


def test_predict_d4_with_equivariant_fn_equals_plain_prediction() -> None:
    # A d4-symmetric 3×3 kernel with zero padding commutes with flips and quarter turns.
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    weight = torch.stack([kernel, -kernel]).reshape(2, 1, 3, 3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, padding=1)

    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(predict_d4(fn, x), fn(x))
    # Non-square works too (turns swap the sides, inverses swap them back).
    x = torch.randn(1, 1, 8, 11)
    torch.testing.assert_close(predict_d4(fn, x), fn(x))


def test_predict_d4_averages_logits_mapped_back() -> None:
    # fn returns the row index of every pixel, whatever the input: averaged over the
    # group, each pixel's row/column/mirrored coordinates average to (n - 1) / 2.
    def rows(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        return torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(x.shape[0], 1, n, n)

    x = torch.zeros(1, 3, 6, 6)
    torch.testing.assert_close(predict_d4(rows, x), torch.full((1, 1, 6, 6), 2.5))
    # With the identity alone it is plain prediction.
    torch.testing.assert_close(predict_d4(rows, x, D4_TRANSFORMS[:1]), rows(x))
    # The identity network comes back unchanged from every transform.
    y = torch.randn(2, 4, 6, 9)
    torch.testing.assert_close(predict_d4(lambda t: t, y), y)


def test_predict_d4_keeps_the_output_dtype() -> None:
    x = torch.randn(1, 2, 4, 4).half()
    assert predict_d4(lambda t: t * 2, x).dtype == torch.float16
    with pytest.raises(ValueError):
        predict_d4(lambda t: t, x, ())


# ------------------------------------------------------------------------------- windows


def test_window_starts() -> None:
    assert window_starts(500, 224, 112) == [0, 112, 224, 276]
    assert window_starts(224, 224, 112) == [0]
    assert window_starts(100, 224, 112) == [0]
    assert window_starts(448, 224, 224) == [0, 224]
    assert window_starts(449, 224, 224) == [0, 224, 225]
    for bad_stride in (0, 225):
        with pytest.raises(ValueError):
            window_starts(500, 224, bad_stride)


@pytest.mark.parametrize(("h", "w", "stride"), [(500, 300, 112), (448, 449, 224), (100, 700, 150)])
def test_windows_cover_every_pixel_and_stay_on_the_canvas(h: int, w: int, stride: int) -> None:
    covered = np.zeros((max(h, 224), max(w, 224)), np.int32)
    for win in sliding_windows(h, w, 224, stride):
        assert isinstance(win, Window) and win.size == 224
        assert win.top + win.size <= max(h, 224) and win.left + win.size <= max(w, 224)
        covered[win.top : win.top + win.size, win.left : win.left + win.size] += 1
    assert covered[:h, :w].min() >= 1


# ------------------------------------------------------------------------------- merger


def test_merger_averages_overlaps_by_hand() -> None:
    m = ProbabilityMerger(1, 4, 6)
    m.add(np.ones((1, 4, 4)), 0, 0)
    m.add(np.zeros((1, 4, 4)), 0, 2)
    np.testing.assert_allclose(m.result()[0, 0], [1, 1, 0.5, 0.5, 0, 0])
    assert m.uncovered() == 0
    m.add(np.ones((1, 4, 4)), 2, 4)  # reaches past the bottom-right corner: clipped
    np.testing.assert_allclose(m.result()[0, 3], [1, 1, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(m.result()[0, 0, 4:], [0, 0])


def test_merger_weights_and_uncovered_pixels() -> None:
    m = ProbabilityMerger(2, 2, 4)
    assert m.uncovered() == 8
    p = np.stack([np.full((2, 2), 0.2), np.full((2, 2), 0.8)])
    m.add(p, 0, 0, weight=3.0)
    m.add(1 - p, 0, 0, weight=np.array([[1.0, 1.0], [0.0, 0.0]]))
    out = m.result()
    np.testing.assert_allclose(out[0, 0, :2], (3 * 0.2 + 0.8) / 4)
    np.testing.assert_allclose(out[0, 1, :2], 0.2)
    assert m.uncovered() == 4 and np.all(out[:, :, 2:] == 0)
    with pytest.raises(ValueError):
        m.add(np.zeros((3, 2, 2)), 0, 0)


def test_memmap_merger_matches_memory_and_cleans_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    windows = list(sliding_windows(40, 30, 16, 8))
    probs = rng.random((len(windows), 3, 16, 16)).astype(np.float32)
    ram = ProbabilityMerger(3, 40, 30)
    ram.add_batch(probs, windows)
    with ProbabilityMerger(3, 40, 30, directory=tmp_path / "acc") as disk:
        assert disk.is_memmap and len(list((tmp_path / "acc").iterdir())) == 2
        disk.add_batch(probs, windows)
        out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float32, (3, 40, 30))
        disk.result(out=out, rows_per_chunk=7)
        np.testing.assert_allclose(out, ram.result(), rtol=1e-6)
    assert list((tmp_path / "acc").iterdir()) == []


# ---------------------------------------------------------------------- sliding prediction


def _coordinate_image(h: int, w: int) -> torch.Tensor:
    """Two channels: row and column position, each ramping from 0 to 1."""
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return torch.stack([ys, xs])


def _position_probs(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3-class probabilities, a linear function of the pixel's position."""
    a, b = 0.5 * x[:, 0], 0.4 * x[:, 1]
    return torch.stack([a, b, 1 - a - b], dim=1)


@pytest.mark.parametrize("stride", [224, 112])
def test_stitched_probabilities_equal_the_position_function(stride: int) -> None:
    image = _coordinate_image(300, 500)
    calls: list[int] = []

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        assert x.shape[1:] == (2, 224, 224)
        return _position_probs(x)

    out = predict_sliding(prob_fn, image, 3, window=224, stride=stride, batch_size=4)
    assert out.shape == (3, 300, 500) and out.dtype == np.float32
    np.testing.assert_allclose(out, _position_probs(image[None])[0].numpy(), atol=1e-6)
    expected_windows = len(list(sliding_windows(300, 500, 224, stride)))
    assert sum(calls) == expected_windows and max(calls) <= 4


def test_multiscale_prediction_returns_full_size_average() -> None:
    image = _coordinate_image(260, 230)
    scales = (1.0, 1.25, 1.5, 1.75, 2.0)
    sizes: list[tuple[int, ...]] = []

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape))
        return _position_probs(x)

    out = predict_sliding(prob_fn, image, 3, stride=112, scales=scales, batch_size=16)
    assert out.shape == (3, 260, 230)
    # Bilinear resizing keeps a linear ramp except within a pixel of the borders.
    expected = _position_probs(image[None])[0].numpy()
    np.testing.assert_allclose(out, expected, atol=0.01)
    np.testing.assert_allclose(out[:, 4:-4, 4:-4], expected[:, 4:-4, 4:-4], atol=1e-4)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    # Scale 2 (520×460) needs 4×4 windows at stride 112; scale 1 needs 2×1.
    per_scale = [
        len(list(sliding_windows(int(260 * s + 0.5), int(230 * s + 0.5), 224, 112))) for s in scales
    ]
    assert sum(s[0] for s in sizes) == sum(per_scale)


def test_multiscale_with_a_scale_dependent_fn_averages_the_scales() -> None:
    # prob_fn answers a constant per window (alternating 0, 1, ...), so the value at a
    # pixel is known from which window of which scale covers it.
    image = torch.zeros(1, 224, 224)
    seen: list[float] = []

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        value = float(len(seen) % 2)  # scale 1 -> 0, scale 2's windows -> 1, 0, 1, 0
        seen.append(value)
        p = torch.full((x.shape[0], 1, 224, 224), value)
        return torch.cat([p, 1 - p], dim=1)

    out = predict_sliding(prob_fn, image, 2, stride=224, scales=(1.0, 2.0), batch_size=1)
    # Scale 1: one window (0). Scale 2: 448×448, four windows 1, 0, 1, 0 by quadrant.
    assert seen == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert out[0, 5, 5] == pytest.approx(0.5)  # (0 + 1) / 2, top-left quadrant
    assert out[0, 5, 200] == pytest.approx(0.0)  # (0 + 0) / 2, top-right quadrant


def test_small_images_are_padded_and_cropped_back() -> None:
    image = _coordinate_image(100, 150)

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (1, 2, 224, 224)
        assert torch.all(x[:, :, 100:] == -7) and torch.all(x[:, :, :, 150:] == -7)
        return _position_probs(x)

    out = predict_sliding(prob_fn, image, 3, pad_value=-7.0)
    assert out.shape == (3, 100, 150)
    np.testing.assert_allclose(out, _position_probs(image[None])[0].numpy(), atol=1e-6)


def test_numpy_hwc_input_and_per_channel_padding() -> None:
    image = _coordinate_image(64, 80)
    array = image.permute(1, 2, 0).numpy().copy()

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        assert torch.all(x[:, 0, 64:] == 1) and torch.all(x[:, 1, 64:] == 2)
        return _position_probs(x)

    out = predict_sliding(prob_fn, array, 3, pad_value=(1.0, 2.0))
    np.testing.assert_allclose(out, _position_probs(image[None])[0].numpy(), atol=1e-6)


def test_memmap_backed_sliding_prediction(tmp_path: Path) -> None:
    image = _coordinate_image(250, 240)
    out = predict_sliding(_position_probs, image, 3, memmap_dir=tmp_path)
    np.testing.assert_allclose(out, _position_probs(image[None])[0].numpy(), atol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_prob_fn_of_the_wrong_shape_is_reported() -> None:
    with pytest.raises(ValueError, match="prob_fn returned"):
        predict_sliding(lambda x: x[:, :1], _coordinate_image(50, 50), 3)
    with pytest.raises(ValueError, match="stride"):
        predict_sliding(_position_probs, _coordinate_image(50, 50), 3, stride=300)
