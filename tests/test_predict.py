"""Tiled, streaming prediction of images and slides, its outputs, and ``hisynseg predict``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hisynseg.cli import main
from hisynseg.datasets.io import read_mask, write_rgb_png
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.inference.backends import Backend
from hisynseg.inference.canvas import DiskCanvas
from hisynseg.inference.outputs import (
    ClassLabels,
    area_table,
    write_mask_tiff,
)
from hisynseg.inference.pseudo_labels import checkpoint_record
from hisynseg.inference.wsi import MissingMPPError, plan_tiles, predict_slide, read_tile
from hisynseg.models import build_segmenter
from hisynseg.models.checkpoint import export_segmenter
from hisynseg.slides import PlainImageReader, open_slide

tifffile = pytest.importorskip("tifffile")

SPEC = get_dataset_spec("luad-histoseg")
LABELS = ClassLabels.from_dataset_dict(SPEC.to_dict())
BG = SPEC.background_index


class _ConvNet(nn.Module):
    """A small fully-convolutional "segmenter" with a known receptive field."""

    def __init__(self, kernel: int, layers: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Conv2d(3 if i == 0 else 8, 8, kernel, padding=kernel // 2))
            mods.append(nn.Tanh())
        mods.append(nn.Conv2d(8, 4, 1))
        self.net = nn.Sequential(*mods).eval()
        self.input_divisor = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 4.0


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(big.astype(int) + rng.integers(-20, 20, big.shape), 0, 255).astype(np.uint8)


def _predict_tiled(
    image: np.ndarray, backend: Backend, tmp_path: Path, tile: int, overlap: int, d: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    reader = PlainImageReader("mem", image=image)
    plan = plan_tiles(reader, tile=tile, overlap=overlap, output_downsample=d)
    wo, ho = plan.output_size
    mask = DiskCanvas.create(tmp_path / "mask.raw", (ho, wo), np.uint8)
    probs = DiskCanvas.create(tmp_path / "probs.npy", (ho, wo, 4), np.float32, npy=True)
    stats = predict_slide(reader, backend, plan, 4, BG, mask, probs, batch_size=3)
    assert stats.tiles_predicted == plan.num_tiles > 1
    return mask.read_all(), np.load(tmp_path / "probs.npy")


def test_tiled_equals_whole_image_with_pointwise_model(tmp_path: Path) -> None:
    image = _texture(128, 160)
    backend = Backend(_ConvNet(kernel=1, layers=2), 4)
    whole = backend(image[None])[0]  # the image fits in one pass
    mask, probs = _predict_tiled(image, backend, tmp_path, tile=64, overlap=16)
    np.testing.assert_allclose(probs, whole.transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_array_equal(mask, whole.argmax(0))


def test_tiled_equals_whole_image_away_from_seams(tmp_path: Path) -> None:
    image = _texture(128, 160, seed=1)
    backend = Backend(_ConvNet(kernel=3, layers=2), 4)  # receptive field 5×5
    whole = backend(image[None])[0].transpose(1, 2, 0)
    mask, probs = _predict_tiled(image, backend, tmp_path, tile=64, overlap=32)
    plan = plan_tiles(PlainImageReader("mem", image=image), tile=64, overlap=32)
    # Pixels within 2 px of a tile edge inside the image see that tile's zero padding.
    near = np.zeros(image.shape[:2], bool)
    for starts, axis, size in ((plan.tops, 0, 128), (plan.lefts, 1, 160)):
        for s in starts:
            for edge in (s, s + 64):
                if 0 < edge < size:
                    sl = [slice(None), slice(None)]
                    sl[axis] = slice(max(0, edge - 2), edge + 2)
                    near[tuple(sl)] = True
    assert 0.5 < (~near).mean() < 0.95
    np.testing.assert_allclose(probs[~near], whole[~near], atol=1e-5)
    np.testing.assert_array_equal(mask[~near], whole.argmax(-1)[~near])
    assert np.abs(probs[near] - whole[near]).max() > 1e-4  # the seams do differ


def test_output_downsample_pools_the_probabilities(tmp_path: Path) -> None:
    image = _texture(96, 128, seed=2)
    backend = Backend(_ConvNet(kernel=1, layers=1), 4)
    whole = backend(image[None])[0]
    _, probs = _predict_tiled(image, backend, tmp_path, tile=64, overlap=16, d=4)
    pooled = whole.reshape(4, 24, 4, 32, 4).mean(axis=(2, 4)).transpose(1, 2, 0)
    np.testing.assert_allclose(probs, pooled, atol=1e-5)


def test_target_resolution_reads_the_matching_level(tmp_path: Path) -> None:
    from test_slides import write_pyramid

    image = _texture(512, 512)
    write_pyramid(tmp_path / "s.tif", image, mpp=0.5)
    with open_slide(tmp_path / "s.tif") as reader:
        plan = plan_tiles(reader, tile=128, overlap=32, target_mpp=1.0)
        assert (plan.level, plan.scale, plan.level_scale) == (1, 2.0, 1.0)
        assert plan.model_size == (256, 256) and plan.output_mpp == pytest.approx(1.0)
        tile = read_tile(reader, plan, 96, 32)
        np.testing.assert_array_equal(tile, image[::2, ::2][96:224, 32:160])
        # Between levels: read level 0, shrink by 4/3.
        plan = plan_tiles(reader, tile=128, overlap=0, target_mpp=0.75 * 0.5 / 0.5 * 1.0)
        assert plan.level == 0 and plan.level_scale == pytest.approx(1.5)
        small = cv2.resize(image, (341, 341), interpolation=cv2.INTER_AREA)
        diff = np.abs(read_tile(reader, plan, 0, 0).astype(int) - small[:128, :128]).mean()
        assert diff < 20  # same picture, up to resampling of a random texture


def test_missing_mpp_is_a_clear_error() -> None:
    reader = PlainImageReader("scan.png", image=np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(MissingMPPError, match=r"scan\.png.*--mpp"):
        plan_tiles(reader, tile=32, overlap=0, target_mpp=1.0)
    plan = plan_tiles(reader, tile=32, overlap=0, target_mpp=1.0, mpp=0.5)
    assert plan.model_size == (32, 32)


def _blobs() -> np.ndarray:
    mask = np.full((120, 160), BG, np.uint8)
    cv2.circle(mask, (40, 40), 30, 0, -1)
    cv2.circle(mask, (40, 40), 10, 1, -1)  # class 1 inside a hole of class 0
    cv2.rectangle(mask, (90, 10), (150, 50), 2, -1)
    cv2.rectangle(mask, (90, 80), (110, 110), 2, -1)  # class 2: two regions
    cv2.ellipse(mask, (60, 95), (25, 15), 0, 0, 360, 3, -1)
    return mask


def test_pyramidal_mask_tiff_and_area_table(tmp_path: Path) -> None:
    mask = _blobs()
    canvas = DiskCanvas.create(tmp_path / "m.raw", mask.shape, np.uint8)
    for top in range(0, 120, 50):
        canvas.write_rows(top, mask[top : top + 50])
    levels = write_mask_tiff(
        tmp_path / "m.tif", canvas, SPEC.palette, mpp=2.0, tile=64, min_side=40
    )
    assert levels == 3
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        page = tif.pages[0]
        assert page.photometric == 3 and page.is_tiled  # palette
        np.testing.assert_array_equal(page.asarray(), mask)
        np.testing.assert_array_equal(page.colormap[:, 2] // 257, SPEC.palette[2])
        reduced = [lvl.asarray() for lvl in tif.series[0].levels[1:]]
        np.testing.assert_array_equal(reduced[0], mask[::2, ::2])
        np.testing.assert_array_equal(reduced[1], mask[::2, ::2][::2, ::2])
        assert page.resolution[0] == pytest.approx(5000.0)
        # Each reduced level records its own pixel size (4 and 8 µm/px; 160 = 2 * 80).
        widths = [lvl.keyframe.imagewidth for lvl in tif.series[0].levels]
        assert widths == [160, 80, 40]
        per_cm = [lvl.keyframe.resolution[0] for lvl in tif.series[0].levels]
        assert per_cm == pytest.approx([5000.0, 2500.0, 1250.0])
    counts = np.bincount(mask.ravel(), minlength=256)
    rows = area_table(counts, LABELS, output_mpp=2.0, level0_per_output=4.0)
    assert [r["class"] for r in rows] == [*SPEC.class_names, "background"]
    assert rows[2]["pixels"] == counts[2] and rows[2]["area_um2"] == pytest.approx(4 * counts[2])
    tissue = counts[:4].sum()
    assert sum(r["tissue_fraction"] for r in rows[:4]) == pytest.approx(1.0)
    assert rows[1]["tissue_fraction"] == pytest.approx(counts[1] / tissue, abs=1e-6)


def test_glass_tiles_are_skipped_and_marked_background(tmp_path: Path) -> None:
    from hisynseg.inference.tissue import TissueDetector

    image = np.full((128, 256, 3), 245, np.uint8)
    image[:, :96] = _texture(128, 96, seed=3) // 2 + np.array([100, 20, 90], np.uint8)
    reader = PlainImageReader("mem", image=image)
    plan = plan_tiles(reader, tile=64, overlap=0)
    mask = DiskCanvas.create(tmp_path / "m.raw", (128, 256), np.uint8)
    calls: list[int] = []

    def backend(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        out = np.zeros((len(tiles), 4, 64, 64), np.float32)
        out[:, 1] = 1.0
        return out

    stats = predict_slide(
        reader, backend, plan, 4, BG, mask, tissue=TissueDetector.fit(reader), batch_size=4
    )
    assert stats.tiles_total == 8 and stats.tiles_predicted == stats.tiles_with_tissue == 4
    assert sum(calls) == 4
    result = mask.read_all()
    assert (result[:, :90] == 1).mean() > 0.95 and (result[:, 100:] == BG).all()


def test_an_image_smaller_than_one_tile_is_judged_by_its_own_pixels(tmp_path: Path) -> None:
    """A 64 px patch of tissue in a 512 px tile is all tissue, not 1.6 % of the tile."""
    from hisynseg.inference.tissue import TissueDetector

    image = _texture(64, 64, seed=4) // 2 + np.array([100, 20, 90], np.uint8)
    reader = PlainImageReader("mem", image=image)
    mask = DiskCanvas.create(tmp_path / "m.raw", (64, 64), np.uint8)

    def backend(tiles: np.ndarray) -> np.ndarray:
        out = np.zeros((len(tiles), 4, *tiles.shape[1:3]), np.float32)
        out[:, 2] = 1.0
        return out

    stats = predict_slide(
        reader,
        backend,
        plan_tiles(reader, tile=512, overlap=64),
        4,
        BG,
        mask,
        tissue=TissueDetector.fit(reader),
        min_tissue=0.02,
    )
    assert stats.tiles_with_tissue == stats.tiles_predicted == 1
    assert (mask.read_all() == 2).mean() > 0.9


def test_an_image_without_any_tissue_is_reported(tmp_path: Path, caplog) -> None:
    ckpt = _checkpoint(tmp_path)
    grey = _texture(64, 64, seed=2).mean(axis=2).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    args = ["predict", str(ckpt), str(tmp_path / "grey.png"), "--out", str(tmp_path / "out")]
    with caplog.at_level("WARNING"):
        assert main([*args, "--tile", "64", "--overlap", "0", "--no-progress"]) == 0
    assert "grey.png: tissue detection found no tissue" in caplog.text
    assert "--no-tissue-detection" in caplog.text


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_segmenter("resnet18", num_classes=4)
    path = tmp_path / "model.pt"
    export_segmenter(model, SPEC, path)
    return path


def test_cli_predicts_skips_corrupt_inputs_and_resumes(tmp_path: Path) -> None:
    from test_slides import write_pyramid

    ckpt = _checkpoint(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    slide = _texture(256, 256) // 2 + np.array([90, 30, 80], np.uint8)
    slide[:, 200:] = 240
    write_pyramid(inputs / "slide.tif", slide, mpp=0.5, tile=64)
    write_rgb_png(inputs / "pic.png", slide[:96, :96])
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a picture")
    out = tmp_path / "out"
    args = ["predict", str(ckpt), str(inputs), "--out", str(out), "--tile", "64"]
    args += ["--overlap", "16", "--no-progress", "--target-mpp", "1.0", "--mpp", "1.0"]
    assert main(args) == 1
    record = json.loads((out / "predict.json").read_text())
    status = {Path(r["input"]).name: r for r in record["inputs"]}
    assert status["corrupt.png"]["status"] == "failed"
    assert "corrupt.png" in status["corrupt.png"]["error"]
    assert status["slide.tif"]["status"] == status["pic.png"]["status"] == "ok"
    assert record["summary"] == {"inputs": 3, "done": 3, "ok": 2, "skipped": 0, "failed": 1}
    assert record["options"]["tile"] == 64 and record["versions"]["torch"]
    for name in ("slide.mask.tif", "slide.overlay.png", "slide.areas.csv", "slide.geojson"):
        assert (out / name).is_file()
    pic = read_mask(out / "pic.mask.png")
    assert pic.shape == (96, 96) and set(np.unique(pic)) <= set(range(5))
    assert not list(out.glob(".*"))  # no temporary file left behind
    # --mpp overrides the slide's 0.5 µm/px: the 256 px slide is predicted at 256 px.
    assert status["slide.tif"]["details"]["plan"]["model_size"] == [256, 256]
    mtime = (out / "slide.mask.tif").stat().st_mtime_ns
    assert main(args[:2] + [str(inputs / "slide.tif"), str(inputs / "pic.png")] + args[3:]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert [r["status"] for r in record["inputs"]] == ["skipped", "skipped"]
    assert (out / "slide.mask.tif").stat().st_mtime_ns == mtime
    # The folder's index still describes the outputs of the first run's inputs.
    assert set(record["outputs"]) == {"slide", "pic"}

    # Outputs made otherwise are not skipped as done: another blending, another model.
    assert main([*args[:2], str(inputs / "pic.png"), *args[3:], "--blend", "constant"]) == 1
    record = json.loads((out / "predict.json").read_text())
    assert (
        "made from other options (blend 'gaussian' then, 'constant' now)"
        in record["inputs"][0]["error"]
    )
    # The same model run another way (TTA) is named as such.
    assert main([*args[:2], str(inputs / "pic.png"), *args[3:], "--tta", "d4"]) == 1
    record = json.loads((out / "predict.json").read_text())
    assert "made from the same model run another way (tta" in record["inputs"][0]["error"]
    # A copy of the checkpoint elsewhere, with a new time, is the same model: skipped.
    copy = tmp_path / "copy" / "model.pt"
    copy.parent.mkdir()
    shutil.copyfile(ckpt, copy)
    assert main([*args[:1], str(copy), str(inputs / "pic.png"), *args[3:]]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert record["inputs"][0]["status"] == "skipped"
    # Another model's outputs are not this one's.
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    export_segmenter(build_segmenter("resnet18", num_classes=4), SPEC, other)
    assert main([*args[:1], str(other), str(inputs / "pic.png"), *args[3:]]) == 1
    record = json.loads((out / "predict.json").read_text())
    assert "made from another model" in record["inputs"][0]["error"]
    assert (out / "slide.mask.tif").stat().st_mtime_ns == mtime
    # --overwrite replaces them, and the index then names the new model.
    assert main([*args[:1], str(other), str(inputs / "pic.png"), *args[3:], "--overwrite"]) == 0
    record = json.loads((out / "predict.json").read_text())
    sha = checkpoint_record(other)["sha256"]
    assert json.loads(record["outputs"]["pic"]["model"])["model_sha256"] == sha
    assert set(record["outputs"]) == {"slide", "pic"}


def test_cli_reports_missing_mpp_per_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _checkpoint(tmp_path)
    write_rgb_png(tmp_path / "pic.png", _texture(64, 64))
    out = tmp_path / "out"
    args = ["predict", str(ckpt), str(tmp_path / "pic.png"), "--out", str(out)]
    assert (
        main([*args, "--tile", "64", "--overlap", "16", "--target-mpp", "0.5", "--no-progress"])
        == 1
    )
    err = capsys.readouterr().err
    assert "pic.png" in err and "--mpp" in err
    assert main([*args, "--tile", "32", "--overlap", "5", "--output-downsample", "2"]) == 2


def test_automatic_output_downsample_bounds_the_canvas() -> None:
    reader = PlainImageReader("big", image=np.zeros((1000, 1200, 3), np.uint8))
    plan = plan_tiles(reader, tile=128, overlap=32, max_output_pixels=100_000)
    assert plan.output_downsample == 4 and plan.output_size == (300, 250)
    assert plan.level0_per_output == 4.0
    # Only powers of two dividing tile and overlap keep tiles on the output grid.
    plan = plan_tiles(reader, tile=96, overlap=8, max_output_pixels=1000)
    assert plan.output_downsample == 8
    assert all(t % 8 == 0 for t in plan.tops) and plan.tops[-1] + 96 >= 1000


def test_batched_normalisation_matches_the_per_image_one() -> None:
    from hisynseg.evaluation.evaluate import normalise_image

    tiles = np.random.default_rng(4).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    backend = Backend(_ConvNet(kernel=1, layers=1), 4)
    expected = torch.stack([normalise_image(t, "cpu") for t in tiles])
    assert torch.equal(backend.normalise(tiles), expected)
    probs = backend(tiles)
    pooled = backend.pooled(tiles, 4)
    assert pooled.shape == (3, 4, 10, 12)
    np.testing.assert_allclose(
        pooled, probs.reshape(3, 4, 10, 4, 12, 4).mean(axis=(3, 5)), atol=1e-6
    )
    # On the CPU a launched batch is computed before launch returns.
    started = backend.launch(tiles, 4)
    assert started.done()
    np.testing.assert_array_equal(started.result(), pooled)


def test_cuda_launches_overwrite_a_staging_buffer_only_after_its_upload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA path of ``Backend.launch`` on CPU tensors, with events that log what waits
    for what: two staging buffers in turn, the third batch waits for the first upload."""
    import hisynseg.inference.backends as backends

    log: list[tuple[str, int]] = []

    class Event:
        made = 0

        def __init__(self) -> None:
            self.id, self.finished = Event.made, False
            Event.made += 1

        def record(self, stream: object) -> None:
            log.append(("record", self.id))

        def query(self) -> bool:
            return self.finished

        def synchronize(self) -> None:
            log.append(("wait", self.id))
            self.finished = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(
        backends, "_page_locked", lambda shape, dtype: torch.empty(shape, dtype=dtype)
    )
    backend = Backend(_ConvNet(kernel=3, layers=1), 4)
    backend._cuda = True
    reference = Backend(_ConvNet(kernel=3, layers=1), 4)
    rng = np.random.default_rng(9)
    batches = [rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8) for _ in range(3)]
    started = [backend.launch(tiles, 2) for tiles in batches]
    # Events 0/1: upload and copy back of batch 0; 2/3 of batch 1; batch 2 reuses batch
    # 0's buffer, so it waits for event 0 before its own upload (event 4).
    expected = [("record", 0), ("record", 1), ("record", 2), ("record", 3), ("wait", 0)]
    assert log == [*expected, ("record", 4), ("record", 5)]
    assert backend._staging[0] is not backend._staging[1]
    assert not any(s.done() for s in started)
    for tiles, pending in zip(batches, started, strict=True):
        np.testing.assert_allclose(pending.result(), reference.pooled(tiles, 2), atol=1e-6)
        assert pending.done()
    assert log[-3:] == [("wait", 1), ("wait", 3), ("wait", 5)]


def test_reader_threads_and_device_pooling_give_the_same_masks(tmp_path: Path) -> None:
    from hisynseg.inference.tissue import TissueDetector

    image = _texture(200, 264, seed=6) // 2 + np.array([100, 20, 90], np.uint8)
    image[:, 200:] = 245  # glass: skipped tiles and glass pixels
    reader = PlainImageReader("mem", image=image)
    net = Backend(_ConvNet(kernel=3, layers=2), 4)
    tissue = TissueDetector.fit(reader)

    def plain(tiles: np.ndarray) -> np.ndarray:  # no ``pooled``: pooled on the host
        return net(tiles)

    results = []
    for backend, workers, batch in ((plain, 1, 1), (plain, 3, 2), (net, 2, 3), (net, 4, 5)):
        plan = plan_tiles(reader, tile=64, overlap=16, output_downsample=4)
        wo, ho = plan.output_size
        mask = DiskCanvas.create(tmp_path / f"m{workers}.raw", (ho, wo), np.uint8)
        probs = DiskCanvas.create(tmp_path / f"p{workers}.npy", (ho, wo, 4), np.float32, npy=True)
        stats = predict_slide(
            reader,
            backend,
            plan,
            4,
            BG,
            mask,
            probs,
            batch_size=batch,
            tissue=tissue,
            workers=workers,
        )
        assert 0 < stats.tiles_predicted < plan.num_tiles
        results.append((mask.read_all(), np.load(tmp_path / f"p{workers}.npy"), stats.counts))
    first_mask, first_probs, first_counts = results[0]
    assert len(np.unique(first_mask)) >= 3 and (first_mask == BG).any()
    for mask, probs, counts in results[1:]:
        np.testing.assert_array_equal(mask, first_mask)
        np.testing.assert_allclose(probs, first_probs, atol=1e-6)
        np.testing.assert_array_equal(counts, first_counts)


def test_backend_says_whether_its_network_runs_on_an_accelerator() -> None:
    net = _ConvNet(kernel=1, layers=1)
    assert not Backend(net, 4).accelerated

    class GpuOnnxLike(nn.Module):  # what OnnxNetwork says when onnxruntime runs it on CUDA
        input_divisor = 1
        uses_gpu = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x)

    assert Backend(GpuOnnxLike(), 4, name="onnxruntime").accelerated


def test_rows_no_tile_reaches_are_background_with_zero_probabilities(tmp_path: Path) -> None:
    from hisynseg.inference.tissue import TissueDetector

    image = np.full((320, 192, 3), 245, np.uint8)  # glass below row 96
    image[:96] = _texture(96, 192, seed=7) // 2 + np.array([100, 20, 90], np.uint8)
    reader = PlainImageReader("mem", image=image)
    backend = Backend(_ConvNet(kernel=1, layers=1), 4)
    plan = plan_tiles(reader, tile=64, overlap=16, output_downsample=2)
    wo, ho = plan.output_size
    results = {}
    for name, max_tiles in (("all", None), ("first", 2)):
        mask = DiskCanvas.create(tmp_path / f"{name}.raw", (ho, wo), np.uint8)
        probs = DiskCanvas.create(tmp_path / f"{name}.npy", (ho, wo, 4), np.float32, npy=True)
        probs.write_rows(0, np.full((ho, wo, 4), 7.0, np.float32))  # stale values to clear
        stats = predict_slide(
            reader,
            backend,
            plan,
            4,
            BG,
            mask,
            probs,
            batch_size=2,
            tissue=TissueDetector.fit(reader),
            max_tiles=max_tiles,
        )
        m, p = mask.read_all(), np.load(tmp_path / f"{name}.npy")
        np.testing.assert_array_equal(stats.counts, np.bincount(m.ravel(), minlength=256))
        results[name] = (m, p)
    m, p = results["all"]
    assert (m[60:] == BG).all() and (p[60:] == 0).all()  # glass rows, never reached
    assert (m[:40] != BG).mean() > 0.9
    first_m, first_p = results["first"]
    assert (first_m[40:] == BG).all() and (first_p[40:] == 0).all()
    np.testing.assert_array_equal(first_m[:24, :40], m[:24, :40])  # away from the cut-off


def test_predict_json_is_rewritten_seldom_but_complete_at_the_end_and_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.inference.predict as predict_module
    from hisynseg.inference.predict import PredictOptions, predict_inputs

    pictures = []
    for i in range(5):
        pictures.append(tmp_path / f"p{i}.png")
        write_rgb_png(pictures[-1], _texture(64, 64, seed=i))
    writes: list[dict] = []
    write_json = predict_module.atomic_write_json

    def counting_write(path: Path, obj: dict) -> None:
        writes.append(json.loads(json.dumps(obj, default=str)))
        write_json(path, obj)

    monkeypatch.setattr(predict_module, "atomic_write_json", counting_write)
    monkeypatch.setattr(predict_module, "RECORD_EVERY_SECONDS", 3600.0)
    calls = []

    def backend(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        if len(calls) == 4:
            raise KeyboardInterrupt
        probs = np.zeros((len(tiles), 4, *tiles.shape[1:3]), np.float32)
        probs[:, 1] = 1.0
        return probs

    options = PredictOptions(tile=64, overlap=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict_inputs(pictures, backend, 4, LABELS, tmp_path / "out", options)
    # Written when the run started, then (an hour not being up) only when interrupted:
    # with the three pictures done, and the run not finished.
    assert len(writes) == 2
    assert writes[1]["summary"] == {"inputs": 5, "done": 3, "ok": 3, "skipped": 0, "failed": 0}
    assert writes[1]["finished"] is None
    saved = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert [Path(r["input"]).name for r in saved["inputs"]] == ["p0.png", "p1.png", "p2.png"]

    writes.clear()
    calls.clear()
    calls.append(0)  # no more interruptions
    predict_inputs(pictures, backend, 4, LABELS, tmp_path / "out", options)
    assert len(writes) == 2 and writes[1]["finished"] is not None
    assert writes[1]["summary"] == {"inputs": 5, "done": 5, "ok": 2, "skipped": 3, "failed": 0}


def test_cli_over_many_inputs_prints_only_failures_and_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from hisynseg.cli.predict import LINES_UP_TO

    ckpt = _checkpoint(tmp_path)
    folder = tmp_path / "patches"
    folder.mkdir()
    for i in range(LINES_UP_TO):
        write_rgb_png(folder / f"p{i:03d}.png", _texture(32, 32, seed=i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    args = ["predict", str(ckpt), str(folder), "--out", str(tmp_path / "out")]
    assert main([*args, "--tile", "32", "--overlap", "0", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith(f"predicted {LINES_UP_TO}, skipped 0, failed 1 of")
    assert len(out.splitlines()) == 1  # no line per patch
    assert "broken.png" in err
    # With fewer inputs, each gets its line.
    again = [*args[:2], str(folder / "p000.png"), *args[3:], "--tile", "32", "--overlap", "0"]
    assert main([*again, "--no-progress"]) == 0
    assert "p000.png: skipped, outputs exist" in capsys.readouterr().out
