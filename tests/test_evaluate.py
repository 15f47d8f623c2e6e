"""Evaluation of a model over a split: exact scores for models whose predictions are known,
sliding windows vs whole images, gating, saved masks/overlays, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hisynseg.cli import main
from hisynseg.datasets.io import read_mask, write_mask_png
from hisynseg.datasets.layouts import list_split
from hisynseg.datasets.spec import DatasetSpec, get_dataset_spec
from hisynseg.datasets.toy import class_colours
from hisynseg.evaluation.evaluate import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEST_SCALES,
    EvaluationError,
    evaluate,
    resolve_settings,
)
from hisynseg.evaluation.visualize import colorize_mask, comparison_panel, overlay_mask
from hisynseg.models import SegmenterOutput, build_segmenter
from hisynseg.models.checkpoint import export_segmenter

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest single-threaded; on a busy 2-core machine several
    threads per process contend badly (measured 40× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PixelModel(nn.Module):
    """A per-pixel (1×1 convolution) segmenter with the real model's output type."""

    input_divisor = 1

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        seg = self.conv(x)
        cam = nn.functional.avg_pool2d(seg, 1)
        return SegmenterOutput(seg, cam, cam.mean(dim=(2, 3)))


def colour_model(colours: np.ndarray) -> PixelModel:
    """Logits ``-|rgb − colour_c|²`` (up to a per-pixel constant and a scale): the nearest
    class colour wins. Linear in the pixel's RGB, so a 1×1 convolution of the normalised
    input computes it exactly."""
    c = torch.as_tensor(colours, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255.0
    scale = 1e-3
    # rgb = std·x + mean  =>  2c·rgb − |c|² = (2c·std)·x + (2c·mean − |c|²)
    weight = 2.0 * c * std * scale
    bias = (2.0 * (c * mean).sum(1) - (c * c).sum(1)) * scale
    conv = nn.Conv2d(3, len(colours), 1)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None].float())
        conv.bias.copy_(bias.float())
    return PixelModel(conv)


def constant_model(num_classes: int) -> PixelModel:
    """Logits ``C-1, C-2, …, 0`` everywhere: class 0 wins, then class 1, and so on."""
    conv = nn.Conv2d(3, num_classes, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.arange(num_classes - 1, -1, -1, dtype=torch.float32))
    return PixelModel(conv)


def random_pixel_model(num_classes: int, seed: int = 0) -> PixelModel:
    torch.manual_seed(seed)
    return PixelModel(nn.Conv2d(3, num_classes, 1))


def gt_masks(root: Path, spec: DatasetSpec, split: str) -> list[np.ndarray]:
    return [read_mask(p.mask, spec.palette) for p in list_split(root, spec, split)]


def gt_counts(masks: list[np.ndarray], spec: DatasetSpec) -> np.ndarray:
    return sum(np.bincount(m.ravel(), minlength=256)[: spec.num_classes] for m in masks)


def run_eval(model: nn.Module, toy, split: str = "test", **kwargs) -> dict:
    return evaluate(model, toy.root, toy.spec, split, progress=False, **kwargs)


# ----------------------------------------------------------------------------- exact scores


def test_perfect_model_scores_exactly_one(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg", style="flat", num_test=4)
    spec = toy.spec
    result = run_eval(colour_model(class_colours(spec.num_classes)), toy)
    counts = gt_counts(gt_masks(toy.root, spec, "test"), spec)
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (spec.num_classes, spec.num_classes + 1)
    np.testing.assert_array_equal(cm[:, : spec.num_classes], np.diag(counts))
    assert cm[:, -1].sum() == 0
    assert result["miou"] == 1.0 and result["fwiou"] == 1.0
    for name, n in zip(spec.class_names, counts, strict=True):
        # A class neither in the ground truth nor predicted has no IoU.
        assert result["iou"][name] == (1.0 if n else None)
    # Background pixels (present in every other toy image) are not scored.
    masks = gt_masks(toy.root, spec, "test")
    assert any((m == spec.background_index).any() for m in masks)
    assert result["scored_pixels"] == int(counts.sum())
    assert result["num_images"] == 4 and result["split"] == "test"


def test_swapped_classes_give_hand_computed_ious(toy_dataset) -> None:
    toy = toy_dataset("bcss-wsss", style="flat", num_test=6, seed=3)
    spec = toy.spec
    colours = class_colours(spec.num_classes)
    colours[[0, 1]] = colours[[1, 0]]  # pixels of class 0 look like class 1 and vice versa
    result = run_eval(colour_model(colours), toy)
    n = gt_counts(gt_masks(toy.root, spec, "test"), spec)
    assert n[0] > 0 and n[1] > 0, "the toy split should hold both swapped classes"
    expected = {0: 0.0, 1: 0.0}
    for c in range(2, spec.num_classes):
        expected[c] = 1.0 if n[c] else None
    assert [result["iou"][name] for name in spec.class_names] == [
        expected[c] for c in range(spec.num_classes)
    ]
    have = [v for v in expected.values() if v is not None]
    assert result["miou"] == pytest.approx(sum(have) / len(have))
    assert result["fwiou"] == pytest.approx(n[2:].sum() / n.sum())
    cm = np.array(result["confusion_matrix"])
    assert cm[0, 1] == n[0] and cm[1, 0] == n[1]


def test_constant_prediction_gives_hand_computed_ious(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg", num_test=4, seed=5)
    spec = toy.spec
    result = run_eval(constant_model(spec.num_classes), toy, tta="d4")
    n = gt_counts(gt_masks(toy.root, spec, "test"), spec)
    total = n.sum()
    # Everything predicted as class 0: IoU_0 = n0 / N; other classes present score 0.
    assert result["iou"][spec.class_names[0]] == pytest.approx(n[0] / total)
    for c in range(1, spec.num_classes):
        assert result["iou"][spec.class_names[c]] == (0.0 if n[c] else None)
    present = 1 + int((n[1:] > 0).sum())
    assert result["miou"] == pytest.approx(n[0] / total / present)
    assert result["fwiou"] == pytest.approx((n[0] / total) ** 2)
    assert result["pixel_accuracy"] == pytest.approx(n[0] / total)


# ----------------------------------------------------------------------------- gating


def test_gating_restricts_each_image_to_its_ground_truth_classes(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg", num_val=4, seed=2)
    spec = toy.spec
    c = spec.num_classes
    masks = gt_masks(toy.root, spec, "val")
    # The constant model prefers lower indices; gated, each image gets its lowest class.
    expected = np.zeros((c, c + 1), dtype=np.int64)
    for m in masks:
        scored = m[m != spec.background_index]
        lowest = int(scored.min())
        for gt in range(c):
            expected[gt, lowest] += int((scored == gt).sum())
    gated = run_eval(constant_model(c), toy, "val", gate_absent_classes=True)
    np.testing.assert_array_equal(np.array(gated["confusion_matrix"]), expected)
    assert gated["settings"]["gate_absent_classes"] is True
    plain = run_eval(constant_model(c), toy, "val")
    assert np.array(plain["confusion_matrix"])[:, 1:].sum() == 0  # ungated: all class 0


def test_gating_is_refused_on_test(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    with pytest.raises(EvaluationError, match="validation-only"):
        run_eval(constant_model(4), toy, "test", gate_absent_classes=True)


# ----------------------------------------------------------------------------- sliding windows


def test_sliding_windows_match_whole_images_for_a_per_pixel_model(toy_dataset) -> None:
    toy = toy_dataset("wsss4luad", num_test=3, seed=1)
    h, w = np.asarray(Image.open(list_split(toy.root, toy.spec, "test")[0].image)).shape[:2]
    assert h > 32 and w > 32, "toy WSSS4LUAD evaluation images are larger than a window"
    model = random_pixel_model(toy.spec.num_classes)
    whole = run_eval(model, toy, sliding=False)
    assert whole["settings"]["sliding"] is False
    assert len(np.unique(np.argmax(np.array(whole["confusion_matrix"]), axis=1))) > 1
    for tta in (None, "d4"):
        windows = run_eval(model, toy, window=32, stride=16, scales=[1.0], tta=tta, batch_size=5)
        assert windows["settings"]["sliding"] is True
        assert windows["confusion_matrix"] == whole["confusion_matrix"]
        assert windows["miou"] == whole["miou"]


def test_multiscale_windows_on_flat_images_are_nearly_perfect(toy_dataset) -> None:
    toy = toy_dataset("wsss4luad", style="flat", num_test=2)
    model = colour_model(class_colours(toy.spec.num_classes))
    exact = run_eval(model, toy, window=32, stride=16, scales=[1.0])
    assert exact["miou"] == 1.0
    # Resizing blends colours along class boundaries, so a few boundary pixels may flip.
    multi = run_eval(model, toy, window=32, scales=[1.0, 1.5, 2.0])
    assert multi["settings"]["stride"] == 16 and multi["settings"]["scales"] == [1.0, 1.5, 2.0]
    assert multi["miou"] > 0.95


def test_windows_are_averaged_as_probabilities(toy_dataset, monkeypatch) -> None:
    """METHOD §7 averages softmax probabilities over overlaps and scales, not logits."""
    import hisynseg.inference.sliding as sliding

    real = sliding.predict_sliding
    seen = []

    def checking(prob_fn, image, num_classes, **kwargs):
        def checked(crops: torch.Tensor) -> torch.Tensor:
            probs = prob_fn(crops)
            seen.append(probs.shape)
            assert probs.min() >= 0 and probs.max() <= 1
            torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
            return probs

        return real(checked, image, num_classes, **kwargs)

    monkeypatch.setattr(sliding, "predict_sliding", checking)
    toy = toy_dataset("wsss4luad", num_test=1)
    run_eval(random_pixel_model(toy.spec.num_classes), toy, window=32, scales=[1.0, 1.25])
    assert seen and all(s[1:] == (toy.spec.num_classes, 32, 32) for s in seen)


class CountingModel(nn.Module):
    """Wraps a model and counts the images it is shown."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_divisor = getattr(model, "input_divisor", 1)
        self.images = 0

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        self.images += x.shape[0]
        return self.model(x)


def test_d4_shows_the_network_eight_views_of_every_image(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg", num_test=3)
    plain = CountingModel(random_pixel_model(toy.spec.num_classes))
    run_eval(plain, toy)
    d4 = CountingModel(random_pixel_model(toy.spec.num_classes))
    run_eval(d4, toy, tta="d4")
    assert plain.images == 3 and d4.images == 8 * plain.images


@pytest.mark.parametrize(
    ("split", "expected"), [("test", (224, 112, TEST_SCALES)), ("val", (224, 224, (1.0,)))]
)
def test_large_images_get_the_papers_windows(toy_dataset, monkeypatch, split, expected) -> None:
    """WSSS4LUAD's defaults reach the sliding-window predictor unchanged (METHOD §7)."""
    import hisynseg.inference.sliding as sliding

    real = sliding.predict_sliding
    seen = []

    def recording(prob_fn, image, num_classes, **kwargs):
        seen.append((kwargs["window"], kwargs["stride"], tuple(kwargs["scales"])))
        return real(prob_fn, image, num_classes, **kwargs)

    monkeypatch.setattr(sliding, "predict_sliding", recording)
    toy = toy_dataset("wsss4luad", num_test=1, num_val=1)
    run_eval(random_pixel_model(toy.spec.num_classes), toy, split=split)
    assert seen == [expected]


def test_settings_defaults_follow_the_paper() -> None:
    luad, wsss = get_dataset_spec("luad-histoseg"), get_dataset_spec("wsss4luad")
    whole = resolve_settings(luad, "test", tta="d4")
    assert (whole.sliding, whole.window, whole.stride, whole.scales) == (False, None, None, (1.0,))
    test = resolve_settings(wsss, "test")
    assert (test.sliding, test.window, test.stride, test.scales) == (True, 224, 112, TEST_SCALES)
    val = resolve_settings(wsss, "val", patch_size=256)
    assert (val.window, val.stride, val.scales) == (256, 256, (1.0,))
    forced = resolve_settings(luad, "val", window=64, scales=[1, 2])
    assert (forced.sliding, forced.stride, forced.scales) == (True, 64, (1.0, 2.0))
    assert resolve_settings(luad, "test", tta="none").tta is None
    with pytest.raises(EvaluationError, match="stride"):
        resolve_settings(wsss, "test", window=32, stride=64)
    with pytest.raises(EvaluationError, match="whole-image"):
        resolve_settings(luad, "test", sliding=False, window=32)
    with pytest.raises(EvaluationError, match="scales"):
        resolve_settings(wsss, "test", scales=[1.0, 0.0])
    with pytest.raises(EvaluationError, match="test-time"):
        resolve_settings(luad, "test", tta="d8")
    with pytest.raises(EvaluationError, match="split"):
        resolve_settings(luad, "train")


def test_masks_that_do_not_fit_are_reported(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    pair = list_split(toy.root, toy.spec, "test")[0]
    write_mask_png(pair.mask, np.zeros((8, 8), np.uint8), toy.spec.palette)
    with pytest.raises(EvaluationError, match=pair.mask.name):
        run_eval(constant_model(4), toy)
    h, w = np.asarray(Image.open(pair.image)).shape[:2]
    write_mask_png(pair.mask, np.full((h, w), 7, np.uint8), toy.spec.palette)
    with pytest.raises(EvaluationError, match=r"values \[7\]"):
        run_eval(constant_model(4), toy)


# ----------------------------------------------------------------------------- saved outputs


def test_saved_masks_and_overlays(toy_dataset, tmp_path: Path) -> None:
    toy = toy_dataset("wsss4luad", style="flat", num_test=2)
    spec = toy.spec
    out = tmp_path / "out"
    run_eval(
        colour_model(class_colours(spec.num_classes)),
        toy,
        window=32,
        stride=16,
        scales=[1.0],
        save_masks_dir=out,
    )
    for pair in list_split(toy.root, spec, "test"):
        image = np.asarray(Image.open(pair.image).convert("RGB"))
        h, w = image.shape[:2]
        saved = Image.open(out / "masks" / f"{pair.image.stem}.png")
        assert saved.mode == "P" and saved.size == (w, h)
        palette = np.array(saved.getpalette()[: 3 * len(spec.palette)]).reshape(-1, 3)
        np.testing.assert_array_equal(palette, spec.palette_array)
        pred = np.asarray(saved)
        gt = read_mask(pair.mask, spec.palette)
        tissue = gt != spec.background_index
        np.testing.assert_array_equal(pred[tissue], gt[tissue])
        assert pred.max() < spec.num_classes  # tissue classes only
        overlay = np.asarray(Image.open(out / "overlays" / f"{pair.image.stem}.png"))
        np.testing.assert_array_equal(overlay, overlay_mask(image, pred, spec.palette))
        panel = Image.open(out / "overlays" / f"{pair.image.stem}_panel.png")
        assert panel.mode == "RGB" and panel.size == (3 * w + 8, h)
    assert not list(out.rglob(".*.tmp"))


def test_visualize_helpers() -> None:
    palette = [(10, 20, 30), (200, 100, 0), (255, 255, 255)]
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    rgb = colorize_mask(mask, palette)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[1, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [200, 100, 0]
    image = np.full((2, 2, 3), 100, np.uint8)
    np.testing.assert_array_equal(overlay_mask(image, mask, palette, alpha=0.0), image)
    np.testing.assert_array_equal(overlay_mask(image, mask, palette, alpha=1.0), rgb)
    half = overlay_mask(image, mask, palette, alpha=0.5, skip_index=2)
    assert half[0, 0].tolist() == [55, 60, 65] and half[1, 0].tolist() == [100, 100, 100]
    panel = comparison_panel(image, mask, mask, palette, gap=1)
    assert panel.shape == (2, 8, 3)
    np.testing.assert_array_equal(panel[:, 3:5], rgb)
    with pytest.raises(ValueError, match="differ"):
        overlay_mask(image, mask[:1], palette)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def tiny_checkpoint(tmp_path: Path):
    def make(spec: DatasetSpec) -> Path:
        torch.manual_seed(0)
        model = build_segmenter("resnet18", spec.num_classes)
        path = tmp_path / "run" / f"{spec.name}.pt"
        export_segmenter(model, spec, path, config={"data": {"patch_size": 32}})
        return path

    return make


def test_cli_end_to_end(toy_dataset, tiny_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    toy = toy_dataset("luad-histoseg", num_test=3)
    ckpt = tiny_checkpoint(toy.spec)
    # No --dataset: the checkpoint says what it was trained on.
    argv = ["evaluate", str(ckpt), str(toy.root)]
    rc = main([*argv, "--split", "test", "--save-masks", "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "FwIoU" in printed and "whole images" in printed
    out = ckpt.parent / "eval-test"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "fwiou", "iou", "confusion_matrix", "split", "tta", "checkpoint"):
        assert key in metrics
    assert metrics["split"] == "test" and metrics["tta"] == "d4"  # the paper's test setting
    assert list(metrics["iou"]) == list(toy.spec.class_names)
    assert metrics["checkpoint"] == str(ckpt.resolve())
    assert metrics["settings"]["sliding"] is False
    settings = json.loads((out / "evaluation.json").read_text())
    assert settings["settings"] == metrics["settings"] and settings["patch_size"] == 32
    assert len(list((out / "masks").glob("*.png"))) == 3
    assert len(list((out / "overlays").glob("*_panel.png"))) == 3
    # Evaluated again without --save-masks: the earlier run's masks do not stay behind
    # next to the new metrics (another file in the folder does).
    (out / "masks" / "mine.txt").write_text("keep")
    assert main([*argv, "--split", "test", "--no-progress", "--device", "cpu"]) == 0
    assert [p.name for p in (out / "masks").iterdir()] == ["mine.txt"]
    assert not (out / "overlays").exists()


def test_cli_finds_a_generic_checkpoints_dataset_without_dataset(
    toy_dataset, tiny_checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = toy_dataset("generic", num_test=1)
    ckpt = tiny_checkpoint(toy.spec)
    argv = ["evaluate", str(ckpt), str(toy.root), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--tta", "none"]) == 0
    assert f"{toy.spec.name} test: 1 images" in capsys.readouterr().out


def test_cli_large_images_with_tta_and_windows(
    toy_dataset, tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = toy_dataset("wsss4luad", num_val=1)
    ckpt = tiny_checkpoint(toy.spec)
    out = tmp_path / "eval"
    rc = main(
        ["evaluate", str(ckpt), str(toy.root), "--dataset", "wsss4luad", "--split", "val"]
        + ["--tta", "d4", "--scales", "1,1.5", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The window defaults to the checkpoint's training patch size; at validation the
    # stride defaults to the window.
    assert metrics["settings"]["window"] == 32 and metrics["settings"]["stride"] == 32
    assert metrics["settings"]["scales"] == [1.0, 1.5] and metrics["tta"] == "d4"
    assert metrics["split"] == "val" and metrics["num_images"] == 1
    assert "sliding windows 32/32, scales 1,1.5" in capsys.readouterr().out


def test_cli_refuses_a_checkpoint_for_other_classes(
    toy_dataset, tiny_checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = toy_dataset("luad-histoseg")
    ckpt = tiny_checkpoint(get_dataset_spec("bcss-wsss"))  # also 4 classes, other names
    rc = main(["evaluate", str(ckpt), str(toy.root), "--dataset", "luad-histoseg"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "classes" in err and str(ckpt) in err
    assert not (ckpt.parent / "eval-test").exists()


def test_cli_refuses_gating_on_test(
    toy_dataset, tiny_checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = toy_dataset("luad-histoseg")
    ckpt = tiny_checkpoint(toy.spec)
    argv = ["evaluate", str(ckpt), str(toy.root), "--dataset", "luad-histoseg"]
    assert main([*argv, "--split", "test", "--gate-absent-classes"]) == 2
    assert "validation-only" in capsys.readouterr().err
    assert main([*argv, "--split", "val", "--gate-absent-classes", "--no-progress"]) == 0
    metrics = json.loads((ckpt.parent / "eval-val" / "metrics.json").read_text())
    assert metrics["settings"]["gate_absent_classes"] is True
