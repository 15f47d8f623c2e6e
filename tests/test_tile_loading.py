"""Reading prediction tiles in threads or in worker processes (shared memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest

from hisynseg.errors import HisynsegError
from hisynseg.inference.tile_loading import (
    ProcessTileLoader,
    TileGeometry,
    choose_loader,
    pool_mask,
    read_tile,
)
from hisynseg.inference.tissue import pixel_tissue_mask
from hisynseg.slides import PlainImageReader, TiffSlideReader, open_slide
from hisynseg.slides.base import SlideReadError

tifffile = pytest.importorskip("tifffile")


def _stained(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Tissue-coloured texture with a band of glass on the right."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) // 2
    image = image + np.array([100, 20, 90], np.uint8)
    image[:, width * 3 // 4 :] = 244
    return image


def _write_slide(path: Path, image: np.ndarray) -> None:
    from test_slides import write_pyramid

    write_pyramid(path, image, mpp=0.5, tile=64)


def _die(path: str) -> None:
    """A reader factory whose worker process dies at once."""
    os._exit(3)


def _pixel_softmax(tiles: np.ndarray) -> np.ndarray:
    """Four class probabilities per pixel; they depend on every pixel, so a misplaced or
    stale tile changes the output."""
    x = tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    logits = np.concatenate([x, x.mean(1, keepdims=True) ** 2], axis=1) * 6.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class _QueuedDevice:
    """A backend with ``launch`` whose batches stay pending until collected, like batches
    queued on a GPU; it records how many were pending at once and in what order they were
    collected."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.most_pending = 0
        self.collected: list[int] = []
        self.launches = 0

    def pooled(self, tiles: np.ndarray, factor: int) -> np.ndarray:
        return self.launch(tiles, factor).result()

    def launch(self, tiles: np.ndarray, factor: int) -> object:
        device, staged, ticket = self, tiles.copy(), self.launches  # staged, as Backend does
        self.launches += 1
        self.pending.append(ticket)
        self.most_pending = max(self.most_pending, len(self.pending))

        class Pending:
            def done(self) -> bool:
                return False

            def result(self) -> np.ndarray:
                device.pending.remove(ticket)
                device.collected.append(ticket)
                n, c, h, w = len(staged), 4, staged.shape[1], staged.shape[2]
                probs = _pixel_softmax(staged).reshape(
                    n, c, h // factor, factor, w // factor, factor
                )
                return probs.mean(axis=(3, 5))

        return Pending()


def test_pool_mask_equals_the_block_mean() -> None:
    mask = np.random.default_rng(0).random((64, 96)) > 0.6
    for d in (1, 2, 4, 8):
        expected = mask.reshape(64 // d, d, 96 // d, d).mean(axis=(1, 3))
        result = pool_mask(mask, d)
        assert result.dtype == np.float32 and result.shape == (64 // d, 96 // d)
        np.testing.assert_array_equal(result, expected.astype(np.float32))


def _predict_slide_file(
    slide: Path,
    backend: object,
    loader: str,
    workers: int,
    batch_size: int,
    target_mpp: float | None = None,
) -> tuple[np.ndarray, np.ndarray, object, object]:
    """Mask, probabilities, stats and plan of ``predict_slide`` on a TIFF file (4 classes,
    background index 5, output downsample 2, tissue detection on)."""
    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.tissue import TissueDetector
    from hisynseg.inference.wsi import plan_tiles, predict_slide

    with open_slide(slide) as reader:
        plan = plan_tiles(reader, tile=64, overlap=16, target_mpp=target_mpp, output_downsample=2)
        wo, ho = plan.output_size
        out = slide.parent / f"{loader}-{workers}-{batch_size}-{type(backend).__name__}"
        mask = DiskCanvas.create(out.with_suffix(".raw"), (ho, wo), np.uint8)
        probs = DiskCanvas.create(out.with_suffix(".npy"), (ho, wo, 4), np.float32)
        stats = predict_slide(
            reader,
            backend,
            plan,
            4,
            5,
            mask,
            probs,
            batch_size=batch_size,
            tissue=TissueDetector.fit(reader),
            workers=workers,
            tile_loader=loader,
        )
    return mask.read_all(), probs.read_all(), stats, plan


@pytest.mark.parametrize("target_mpp", [None, 0.75])
def test_processes_predict_what_threads_predict(tmp_path: Path, target_mpp: float | None) -> None:
    _write_slide(tmp_path / "s.tif", _stained(320, 384))
    results = []
    for loader in ("threads", "processes"):
        mask, probs, stats, plan = _predict_slide_file(
            tmp_path / "s.tif", _pixel_softmax, loader, 2, 3, target_mpp
        )
        assert (plan.level_scale != 1.0) == (target_mpp is not None)
        assert stats.tile_loader == loader and stats.workers == 2
        assert 0 < stats.warmup_seconds < stats.seconds
        assert stats.steady_tiles_per_second > stats.tiles_predicted / stats.seconds
        assert 4 < stats.tiles_predicted < plan.num_tiles  # glass tiles skipped
        results.append((mask, probs, stats.counts))
    (m1, p1, c1), (m2, p2, c2) = results
    assert len(np.unique(m1)) >= 3 and (m1 == 5).any()
    np.testing.assert_array_equal(m2, m1)
    np.testing.assert_array_equal(p2, p1)
    np.testing.assert_array_equal(c2, c1)


def test_batches_queued_on_a_device_predict_what_a_synchronous_backend_predicts(
    tmp_path: Path,
) -> None:
    _write_slide(tmp_path / "s.tif", _stained(320, 384, seed=3))
    results, devices = [], []
    # One reader is the tightest case: the slots must cover the batch being read, the
    # two queued on the device and the one blending.
    for loader, workers, asynchronous in [
        ("threads", 2, False),
        ("threads", 1, True),
        ("processes", 1, True),
    ]:
        backend = _QueuedDevice() if asynchronous else _pixel_softmax
        mask, probs, stats, _ = _predict_slide_file(tmp_path / "s.tif", backend, loader, workers, 2)
        assert stats.tile_loader == loader and stats.tiles_predicted > 6
        results.append((mask, probs, stats.counts))
        if asynchronous:
            devices.append(backend)
    for device in devices:
        assert device.most_pending == 2 and not device.pending
        assert device.collected == list(range(device.launches))
    (m1, p1, c1), *others = results
    assert len(np.unique(m1)) >= 3
    for m, p, c in others:
        np.testing.assert_array_equal(m, m1)
        np.testing.assert_allclose(p, p1, atol=1e-6)
        np.testing.assert_array_equal(c, c1)


_CTRL_C_DURING_START_UP = """
import os, signal, sys, time
from hisynseg.inference.tile_loading import ReaderPool

if __name__ == "__main__":
    pool = ReaderPool(2).start()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    pids = list(pool._executor._processes)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # Ctrl-C, again and again, while they import
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:  # it died of it
                pass
        time.sleep(0.005)
    answers = {pool._executor.submit(os.getpid).result(timeout=60) for _ in range(8)}
    print("ALIVE", answers <= set(pids))
    pool.close()
"""


def test_reader_processes_ignore_ctrl_c_from_their_start(tmp_path: Path) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_DURING_START_UP)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert "KeyboardInterrupt" not in done.stderr
    assert done.returncode == 0 and "ALIVE True" in done.stdout, done.stderr


_PARENT_KILLED = """
import os, sys
from hisynseg.inference.tile_loading import ReaderPool

if __name__ == "__main__":
    pool = ReaderPool(2).start()
    pool._executor.submit(os.getpid).result(timeout=60)  # they run
    print(*pool._executor._processes, flush=True)
    os._exit(0)  # no clean-up, as when killed outright
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an ended child nobody reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_reader_processes_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    import time

    script = tmp_path / "parent.py"
    script.write_text(_PARENT_KILLED)
    # Output to a file: a pipe would stay open as long as any reader process lives.
    with open(tmp_path / "pids.txt", "w") as out:
        subprocess.run([sys.executable, str(script)], stdout=out, timeout=120, check=True)
    pids = [int(pid) for pid in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, pids))


def test_process_loader_fills_slots_and_frees_its_memory(tmp_path: Path) -> None:
    image = _stained(192, 192, seed=1)
    _write_slide(tmp_path / "s.tif", image)
    geometry = TileGeometry(level=0, level_scale=1.0, tile=64, output_downsample=4)
    positions = [[(0, 0), (0, 48), (100, 150)], [(128, 128)], [(10, 20), (64, 64)]]
    padded = np.full((256, 256, 3), 255, np.uint8)  # beyond the slide: white
    padded[:192, :192] = image
    with open_slide(tmp_path / "s.tif") as reader:
        loader = ProcessTileLoader(
            reader.reopener(), reader.path, geometry, 20.0, workers=2, batch_size=3
        )
        name = loader._memory.name
        try:
            assert loader.depth == 4
            futures = [loader.submit(batch) for batch in positions]
            for batch, future in zip(positions, futures, strict=True):
                loaded = future.result(timeout=60)
                assert loaded.images.shape == (len(batch), 64, 64, 3)
                assert loaded.shares is not None and loaded.shares.shape == (len(batch), 16, 16)
                for i, (top, left) in enumerate(batch):
                    expected = padded[top : top + 64, left : left + 64]
                    np.testing.assert_array_equal(loaded.images[i], expected)
                    np.testing.assert_array_equal(
                        loaded.images[i], read_tile(reader, geometry, top, left)
                    )
                    shares = pool_mask(pixel_tissue_mask(expected, 20.0), 4)
                    np.testing.assert_array_equal(loaded.shares[i], shares)
                loaded.release()
        finally:
            loader.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)


def test_a_corrupt_tile_read_in_a_worker_names_the_file(tmp_path: Path) -> None:
    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.wsi import plan_tiles, predict_slide

    path = tmp_path / "s.tif"
    _write_slide(path, _stained(256, 256, seed=2))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # not a zlib stream any more
    path.write_bytes(bytes(data))
    with open_slide(path) as reader:
        plan = plan_tiles(reader, tile=64, overlap=0)
        mask = DiskCanvas.create(tmp_path / "m.raw", plan.output_size[::-1], np.uint8)
        with pytest.raises(SlideReadError, match="s.tif.*cannot decode"):
            predict_slide(
                reader,
                lambda t: np.ones((len(t), 4, 64, 64), np.float32) / 4,
                plan,
                4,
                5,
                mask,
                batch_size=2,
                workers=2,
                tile_loader="processes",
            )


def test_a_dead_worker_is_an_actionable_error(tmp_path: Path) -> None:
    geometry = TileGeometry(level=0, level_scale=1.0, tile=32, output_downsample=1)
    loader = ProcessTileLoader(_die, tmp_path / "x.tif", geometry, None, workers=1, batch_size=1)
    try:
        with pytest.raises(HisynsegError, match="x.tif: a tile reader process died.*threads"):
            loader.submit([(0, 0)]).result(timeout=60)
    finally:
        loader.close()


def test_auto_chooses_processes_only_where_they_pay(tmp_path: Path) -> None:
    _write_slide(tmp_path / "s.tif", _stained(128, 128))
    with TiffSlideReader(tmp_path / "s.tif") as slide:
        assert choose_loader("auto", slide, workers=8, num_tiles=1000) == "processes"
        assert choose_loader("auto", slide, 8, 1000, accelerated=False) == "threads"
        assert choose_loader("auto", slide, workers=2, num_tiles=1000) == "threads"
        assert choose_loader("auto", slide, workers=8, num_tiles=20) == "threads"
        assert choose_loader("threads", slide, workers=8, num_tiles=1000) == "threads"
        assert choose_loader("processes", slide, workers=1, num_tiles=1) == "processes"
    picture = PlainImageReader("pic.png", image=np.zeros((8, 8, 3), np.uint8))
    assert choose_loader("auto", picture, workers=8, num_tiles=1000) == "threads"
    # A picture, decoded whole in this process, is not decoded again by every worker.
    assert choose_loader("processes", picture, workers=8, num_tiles=1000) == "threads"
    with pytest.raises(HisynsegError, match="unknown tile reader"):
        choose_loader("fibres", picture, workers=8, num_tiles=1000)


def test_tile_loading_does_not_import_torch() -> None:
    code = (
        "import sys, hisynseg.inference.tile_loading, hisynseg.slides; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_cli_records_the_tile_loader(tmp_path: Path) -> None:
    import torch

    from hisynseg.cli import main
    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.models import build_segmenter
    from hisynseg.models.checkpoint import export_segmenter

    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    export_segmenter(
        build_segmenter("resnet18", num_classes=4), get_dataset_spec("luad-histoseg"), ckpt
    )
    _write_slide(tmp_path / "slide.tif", _stained(128, 192))
    cv2.imwrite(str(tmp_path / "pic.png"), _stained(64, 64))
    masks = {}
    for loader in ("threads", "processes"):
        out = tmp_path / loader
        args = ["predict", str(ckpt), str(tmp_path / "slide.tif"), str(tmp_path / "pic.png")]
        args += ["--out", str(out), "--tile", "64", "--overlap", "16", "--no-progress"]
        args += ["--workers", "2", "--tile-loader", loader]
        rc = main(args)
        record = json.loads((out / "predict.json").read_text())
        status = {Path(r["input"]).name: r for r in record["inputs"]}
        assert record["options"]["tile_loader"] == loader
        assert status["slide.tif"]["details"]["tile_loader"] == loader
        masks[loader] = tifffile.imread(out / "slide.mask.tif")
        # A picture is read by threads whatever was asked.
        assert rc == 0 and status["pic.png"]["details"]["tile_loader"] == "threads"
    np.testing.assert_array_equal(masks["processes"], masks["threads"])


def test_auto_reads_with_processes_only_for_an_accelerated_backend(tmp_path: Path) -> None:
    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.wsi import plan_tiles, predict_slide

    _write_slide(tmp_path / "s.tif", _stained(256, 320))

    class Uniform:
        def __init__(self, device: str) -> None:
            self.device = device

        def __call__(self, tiles: np.ndarray) -> np.ndarray:
            return np.full((len(tiles), 4, 16, 16), 0.25, np.float32)

    chosen = {}
    for device in ("cpu", "cuda:0"):
        with open_slide(tmp_path / "s.tif") as reader:
            plan = plan_tiles(reader, tile=16, overlap=0)
            assert plan.num_tiles == 320  # enough tiles for processes to pay
            mask = DiskCanvas.create(tmp_path / f"{device}.raw", plan.output_size[::-1], np.uint8)
            stats = predict_slide(
                reader, Uniform(device), plan, 4, 5, mask, batch_size=32, workers=4
            )
        chosen[device] = stats.tile_loader
    assert chosen == {"cpu": "threads", "cuda:0": "processes"}


def test_short_shared_memory_is_an_error_or_a_fallback_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import hisynseg.inference.tile_loading as tile_loading
    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.wsi import plan_tiles, predict_slide

    # A default Docker container has 64 MiB of /dev/shm; workers writing past it would die
    # of SIGBUS mid-slide, so the shortage must show before any worker starts.
    monkeypatch.setattr(tile_loading, "shared_memory_free_bytes", lambda: 2**16)
    _write_slide(tmp_path / "s.tif", _stained(256, 320))

    def backend(tiles: np.ndarray) -> np.ndarray:
        return np.full((len(tiles), 4, 16, 16), 0.25, np.float32)

    backend.device = "cuda"  # type: ignore[attr-defined]
    with open_slide(tmp_path / "s.tif") as reader:
        plan = plan_tiles(reader, tile=16, overlap=0)
        mask = DiskCanvas.create(tmp_path / "m.raw", plan.output_size[::-1], np.uint8)
        with pytest.raises(tile_loading.SharedMemoryTooSmallError, match="s.tif.*--shm-size"):
            predict_slide(
                reader, backend, plan, 4, 5, mask, batch_size=64, workers=4, tile_loader="processes"
            )
        with caplog.at_level("WARNING"):
            stats = predict_slide(reader, backend, plan, 4, 5, mask, batch_size=64, workers=4)
    assert stats.tile_loader == "threads" and stats.tiles_predicted == 320
    assert "reading with threads instead" in caplog.text


def test_one_reader_pool_serves_slide_after_slide_and_survives_a_dead_worker(
    tmp_path: Path,
) -> None:
    import multiprocessing

    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.tile_loading import ReaderPool
    from hisynseg.inference.wsi import plan_tiles, predict_slide

    def backend(tiles: np.ndarray) -> np.ndarray:
        x = tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return np.concatenate([x, 1 - x.mean(1, keepdims=True)], axis=1) / 2

    def predict(path: Path, loader: str, pool: ReaderPool | None = None) -> np.ndarray:
        with open_slide(path) as reader:
            plan = plan_tiles(reader, tile=32, overlap=8)
            mask = DiskCanvas.create(tmp_path / "m.raw", plan.output_size[::-1], np.uint8)
            stats = predict_slide(
                reader,
                backend,
                plan,
                4,
                5,
                mask,
                batch_size=4,
                workers=2,
                tile_loader=loader,
                reader_pool=pool,
            )
        assert stats.tile_loader == loader
        return mask.read_all()

    slides = []
    for seed in (3, 4):
        slides.append(tmp_path / f"s{seed}.tif")
        _write_slide(slides[-1], _stained(96, 128, seed=seed))
    geometry = TileGeometry(level=0, level_scale=1.0, tile=32, output_downsample=1)
    with ReaderPool(2).start() as pool:
        for path in slides:
            np.testing.assert_array_equal(
                predict(path, "processes", pool), predict(path, "threads")
            )
        doomed = ProcessTileLoader(_die, tmp_path / "x.tif", geometry, None, pool, batch_size=1)
        with pytest.raises(HisynsegError, match="died"):
            doomed.submit([(0, 0)]).result(timeout=60)
        doomed.close()
        # New processes for the next slide.
        np.testing.assert_array_equal(
            predict(slides[0], "processes", pool), predict(slides[0], "threads")
        )
    assert not multiprocessing.active_children()


def test_a_run_starts_reader_processes_only_where_they_will_be_used(tmp_path: Path) -> None:
    from hisynseg.inference.predict import PredictOptions, start_reader_pool

    class Backend:
        def __init__(self, accelerated: bool) -> None:
            self.accelerated = accelerated

    slide, picture = [tmp_path / "a.svs"], [tmp_path / "a.png"]
    for inputs, backend, loader, workers, started in [
        (slide, Backend(True), "auto", 4, True),
        (slide, Backend(True), "auto", 2, False),  # too few readers to pay
        (slide, Backend(False), "auto", 8, False),  # the network sets the pace
        (slide, Backend(True), "threads", 8, False),
        (slide, Backend(False), "processes", 2, True),
        (picture, Backend(True), "processes", 8, False),  # pictures are read by threads
    ]:
        options = PredictOptions(tile_loader=loader, workers=workers)
        pool = start_reader_pool(inputs, backend, options)
        assert (pool is not None) == started, (inputs, loader, workers)
        if pool is not None:
            assert pool.workers == workers
            pool.close()


def test_closing_a_loader_on_a_shared_pool_drops_unstarted_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hisynseg.inference.tile_loading import ReaderPool

    _write_slide(tmp_path / "s.tif", _stained(256, 256, seed=5))
    geometry = TileGeometry(level=0, level_scale=1.0, tile=64, output_downsample=1)
    with ReaderPool(1) as pool, open_slide(tmp_path / "s.tif") as reader:
        loader = ProcessTileLoader(
            reader.reopener(), reader.path, geometry, None, pool, batch_size=4
        )
        futures = [loader.submit([(0, 64 * i)] * 4) for i in range(3)]
        with caplog.at_level("ERROR"):
            loader.close()  # some batches have not started: they are dropped
        assert all(f.done() for f in futures)
        assert "exception calling callback" not in caplog.text
        # The pool still serves a new loader.
        again = ProcessTileLoader(
            reader.reopener(), reader.path, geometry, None, pool, batch_size=1
        )
        try:
            batch = again.submit([(64, 64)]).result(timeout=60)
            np.testing.assert_array_equal(batch.images[0], read_tile(reader, geometry, 64, 64))
            batch.release()
        finally:
            again.close()


def test_openslide_slides_are_read_by_processes_too(tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    from hisynseg.inference.canvas import DiskCanvas
    from hisynseg.inference.wsi import plan_tiles, predict_slide
    from hisynseg.slides.openslide_reader import OpenSlideReader

    image = _stained(192, 256, seed=6)
    path = tmp_path / "generic.tif"
    options: dict = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)

    def backend(tiles: np.ndarray) -> np.ndarray:
        x = tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return np.concatenate([x, 1 - x.mean(1, keepdims=True)], axis=1) / 2

    masks = {}
    for loader in ("threads", "processes"):
        with OpenSlideReader(path) as reader:
            plan = plan_tiles(reader, tile=32, overlap=8, target_mpp=1.0)
            assert plan.level == 1  # 0.5 µm/px slide read from its halved level
            mask = DiskCanvas.create(tmp_path / f"{loader}.raw", plan.output_size[::-1], np.uint8)
            stats = predict_slide(
                reader, backend, plan, 4, 5, mask, batch_size=4, workers=2, tile_loader=loader
            )
        assert stats.tile_loader == loader
        masks[loader] = mask.read_all()
    np.testing.assert_array_equal(masks["processes"], masks["threads"])
    assert len(np.unique(masks["threads"])) >= 2
