"""An interrupted slide prediction goes on from its saved progress, to the same outputs."""

from __future__ import annotations

import copy
import csv
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.inference.canvas import DiskCanvas
from hisynseg.inference.outputs import ClassLabels
from hisynseg.inference.predict import PredictOptions, predict_inputs
from hisynseg.inference.resume import PROGRESS_SUFFIX, SlideProgress
from hisynseg.inference.scratch import SCRATCH_PREFIX, claim_ended_scratch
from hisynseg.inference.wsi import plan_tiles, predict_slide
from hisynseg.slides import PlainImageReader

tifffile = pytest.importorskip("tifffile")

SPEC = get_dataset_spec("luad-histoseg")
LABELS = ClassLabels.from_dataset_dict(SPEC.to_dict())
BG = SPEC.background_index


def _image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    small = rng.integers(40, 220, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((16, 16, 1), np.uint8))[:height, :width]
    return (big // 2 + np.array([90, 20, 80], np.uint8)).astype(np.uint8)


class _Backend:
    """Class probabilities from each pixel's colour (so every tile matters); raises
    KeyboardInterrupt on call ``stop_at``, like Ctrl-C during the network."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.calls, self.tiles = stop_at, 0, 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.tiles += len(tiles)
        x = tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        logits = np.concatenate([x, x.mean(1, keepdims=True) ** 2], axis=1) * 6.0
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def _canvases(folder: Path, size: tuple[int, int]) -> tuple[DiskCanvas, DiskCanvas]:
    folder.mkdir(exist_ok=True)
    mask = DiskCanvas.create(folder / "mask.raw", size, np.uint8)
    probs = DiskCanvas.create(folder / "probs.npy", (*size, 4), np.float32, npy=True)
    return mask, probs


def test_predict_slide_goes_on_from_saved_progress_to_the_same_result(tmp_path: Path) -> None:
    reader = PlainImageReader("mem", image=_image(300, 220))
    plan = plan_tiles(reader, tile=64, overlap=16, output_downsample=2)
    size = plan.output_size[::-1]
    mask, probs = _canvases(tmp_path / "whole", size)
    predict_slide(reader, _Backend(), plan, 4, BG, mask, probs, batch_size=3)

    mask2, probs2 = _canvases(tmp_path / "cut", size)
    saved: list[SlideProgress] = []

    def save(progress: SlideProgress) -> None:
        saved.append(copy.deepcopy(progress))  # its arrays are live

    with pytest.raises(KeyboardInterrupt):
        predict_slide(
            reader,
            _Backend(stop_at=7),
            plan,
            4,
            BG,
            mask2,
            probs2,
            batch_size=3,
            save_progress=save,
            progress_every=0,
        )
    last = saved[-1]
    assert 0 < last.next_tile < plan.num_tiles and last.next_tile % 3 == 0
    assert 0 < last.band_top < size[0]  # rows above the band are written, below are not
    backend = _Backend()
    stats = predict_slide(reader, backend, plan, 4, BG, mask2, probs2, batch_size=3, resume=last)
    assert stats.tiles_resumed == last.next_tile and stats.tiles_predicted == plan.num_tiles
    assert backend.tiles == plan.num_tiles - last.next_tile
    np.testing.assert_array_equal(mask2.read_all(), mask.read_all())
    np.testing.assert_array_equal(probs2.read_all(), probs.read_all())

    # Progress saved for another tile list, or a band of another shape, is not applied.
    mask3, probs3 = _canvases(tmp_path / "other", size)
    other_tiles = copy.deepcopy(last)
    other_tiles.tiles = "0" * 16
    other_band = copy.deepcopy(last)
    other_band.sums = other_band.sums[:, :-1]
    for other in (other_tiles, other_band):
        backend = _Backend()
        stats = predict_slide(
            reader, backend, plan, 4, BG, mask3, probs3, batch_size=3, resume=other
        )
        assert stats.tiles_resumed == 0 and backend.tiles == plan.num_tiles
        np.testing.assert_array_equal(mask3.read_all(), mask.read_all())
        np.testing.assert_array_equal(probs3.read_all(), probs.read_all())


def _slide(path: Path) -> None:
    from test_slides import write_pyramid

    image = _image(256, 224)
    image[:, 180:] = 242  # glass: skipped tiles and background pixels
    write_pyramid(path, image, mpp=0.5, tile=64)


def _options(**changes: object) -> PredictOptions:
    base = {"tile": 64, "overlap": 16, "batch_size": 2, "save_probs": True}
    return PredictOptions(**{**base, "progress": False, "progress_every": 0.0, **changes})


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def _outputs(out: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    with open(out / "slide.areas.csv", newline="") as fh:
        areas = list(csv.DictReader(fh))
    return tifffile.imread(out / "slide.mask.tif"), np.load(out / "slide.probs.npy"), areas


def test_predict_resumes_after_ctrl_c_only_with_the_same_model_and_options(
    tmp_path: Path,
) -> None:
    slide = tmp_path / "slide.tif"
    _slide(slide)
    (reference,) = predict_inputs(
        [slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m"
    )
    expected = _outputs(tmp_path / "ref")
    tiles = reference.details["tiles_predicted"]
    out = tmp_path / "out"

    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=6), 4, LABELS, out, _options(), model_key="m")
    (kept,) = _hidden(out)
    assert kept.name.startswith(SCRATCH_PREFIX) and (kept / f"slide{PROGRESS_SUFFIX}").is_file()
    assert not (out / "slide.mask.tif").exists()

    backend = _Backend()
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, _options(), model_key="m")
    resumed = result.details["tiles_resumed"]
    assert result.status == "ok" and 0 < resumed < tiles
    assert backend.tiles == tiles - resumed
    mask, probs, areas = _outputs(out)
    np.testing.assert_array_equal(mask, expected[0])
    np.testing.assert_array_equal(probs, expected[1])
    assert areas == expected[2]
    assert _hidden(out) == []

    # Other options (or another model) cannot use the progress: predicted from the start,
    # and the progress that can never be resumed is deleted.
    with pytest.raises(KeyboardInterrupt):
        predict_inputs(
            [slide], _Backend(stop_at=6), 4, LABELS, out, _options(overwrite=True), model_key="m"
        )
    assert len(_hidden(out)) == 1
    backend = _Backend()
    (result,) = predict_inputs(
        [slide], backend, 4, LABELS, out, _options(overwrite=True, blend="cosine"), model_key="m"
    )
    assert result.details["tiles_resumed"] == 0 and backend.tiles == tiles
    assert _hidden(out) == []

    # Without a model key nothing is saved, so an interruption leaves nothing behind.
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=6), 4, LABELS, out, _options(overwrite=True))
    assert _hidden(out) == []


def test_progress_waits_for_its_input_and_goes_when_the_input_is_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hisynseg.datasets.io import write_rgb_png

    slide, pic, out = tmp_path / "slide.tif", tmp_path / "pic.png", tmp_path / "out"
    _slide(slide)
    write_rgb_png(pic, _image(64, 64))
    predict_inputs([slide], _Backend(), 4, LABELS, out, _options(), model_key="m")
    with pytest.raises(KeyboardInterrupt):  # predicting it again, cut short
        predict_inputs(
            [slide], _Backend(stop_at=6), 4, LABELS, out, _options(overwrite=True), model_key="m"
        )
    (kept,) = _hidden(out)
    # Another input's run keeps the progress, and says so; it does not hold it meanwhile,
    # so a run of the slide at the same time could resume it.
    claimable: list[list[Path]] = []

    class Watching(_Backend):
        def __call__(self, tiles: np.ndarray) -> np.ndarray:
            with claim_ended_scratch(out) as claims:
                claimable.append(claims.folders)
            return super().__call__(tiles)

    with caplog.at_level(logging.WARNING, logger="hisynseg.inference.predict"):
        predict_inputs([pic], Watching(), 4, LABELS, out, _options(), model_key="m")
    assert claimable and all(folders == [kept] for folders in claimable)
    assert "progress of an interrupted prediction of slide: predicting it again" in caplog.text
    assert _hidden(out) == [kept]
    # A run that skips the slide (its outputs exist) deletes it: it can never be resumed.
    (result,) = predict_inputs([slide], _Backend(), 4, LABELS, out, _options(), model_key="m")
    assert result.status == "skipped" and _hidden(out) == []


def test_damaged_saved_files_mean_predicting_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    _slide(slide)
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=6), 4, LABELS, out, _options(), model_key="m")
    (kept,) = _hidden(out)
    with open(kept / "slide.mask.raw", "r+b") as fh:
        fh.truncate(100)  # a full disk, say
    backend = _Backend()
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, _options(), model_key="m")
    assert result.status == "ok" and result.details["tiles_resumed"] == 0
    assert backend.tiles == result.details["tiles_predicted"]
    assert "slide.mask.raw: not a canvas of" in caplog.text
    predict_inputs([slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m")
    np.testing.assert_array_equal(_outputs(out)[0], _outputs(tmp_path / "ref")[0])
    assert _hidden(out) == []


def test_progress_whose_canvases_are_gone_is_never_resumed(tmp_path: Path) -> None:
    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    _slide(slide)
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=6), 4, LABELS, out, _options(), model_key="m")
    (kept,) = _hidden(out)
    (kept / "slide.probs.npy").unlink()
    # The next run starts afresh and is stopped before it saves anything of its own: the
    # old progress must not survive beside the new, nearly empty canvases.
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=1), 4, LABELS, out, _options(), model_key="m")
    assert not any((p / f"slide{PROGRESS_SUFFIX}").exists() for p in _hidden(out))
    backend = _Backend()
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, _options(), model_key="m")
    assert result.details["tiles_resumed"] == 0
    predict_inputs([slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m")
    np.testing.assert_array_equal(_outputs(out)[0], _outputs(tmp_path / "ref")[0])


# Predicts with progress saved after every batch and hangs in its fourth batch until
# killed: a node lost or an out-of-memory kill in the middle of a slide.
_KILLED_PREDICTION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from test_resume import LABELS, _Backend, _options
    from hisynseg.inference.predict import predict_inputs

    class Hanging(_Backend):
        def __call__(self, tiles):
            if self.calls == 3:
                Path(sys.argv[3]).touch()
                time.sleep(600)
            return super().__call__(tiles)

    predict_inputs([sys.argv[1]], Hanging(), 4, LABELS, sys.argv[2], _options(), model_key="m")
    """
)


def test_predict_resumes_after_the_process_was_killed(tmp_path: Path) -> None:
    slide, out, hanging = tmp_path / "slide.tif", tmp_path / "out", tmp_path / "hanging"
    _slide(slide)
    (reference,) = predict_inputs(
        [slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PREDICTION, str(slide), str(out), str(hanging)],
        cwd=Path(__file__).parent,
    )
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            assert child.poll() is None, "the prediction ended before its fourth batch"
            assert time.monotonic() < deadline, "the prediction never reached its fourth batch"
            time.sleep(0.05)
        time.sleep(0.3)  # the batches before it are blended and saved by then
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    backend = _Backend()
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, _options(), model_key="m")
    assert result.details["tiles_resumed"] > 0
    assert backend.tiles == reference.details["tiles_predicted"] - result.details["tiles_resumed"]
    expected = _outputs(tmp_path / "ref")
    np.testing.assert_array_equal(_outputs(out)[0], expected[0])
    np.testing.assert_array_equal(_outputs(out)[1], expected[1])
    assert _hidden(out) == []


def test_resuming_with_reader_processes_gives_the_same_outputs(tmp_path: Path) -> None:
    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    _slide(slide)
    options = _options(tile_loader="processes", workers=2)
    predict_inputs([slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m")
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=5), 4, LABELS, out, options, model_key="m")
    backend = _Backend()
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, options, model_key="m")
    assert result.details["tile_loader"] == "processes"
    assert 0 < result.details["tiles_resumed"] < result.details["tiles_predicted"]
    assert backend.tiles == result.details["tiles_predicted"] - result.details["tiles_resumed"]
    expected = _outputs(tmp_path / "ref")
    np.testing.assert_array_equal(_outputs(out)[0], expected[0])
    np.testing.assert_array_equal(_outputs(out)[1], expected[1])


def test_of_several_saved_progresses_the_furthest_is_resumed_and_restart_discards_all(
    tmp_path: Path,
) -> None:
    import shutil

    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    _slide(slide)
    with pytest.raises(KeyboardInterrupt):
        predict_inputs([slide], _Backend(stop_at=6), 4, LABELS, out, _options(), model_key="m")
    (furthest,) = _hidden(out)
    done = SlideProgress.load(furthest / f"slide{PROGRESS_SUFFIX}").next_tile
    # An earlier run of the same input, killed sooner (its folder sorts first).
    behind = out / f"{SCRATCH_PREFIX}aaa.1.aaaaaaaa"
    shutil.copytree(furthest, behind)
    earlier = SlideProgress.load(behind / f"slide{PROGRESS_SUFFIX}")
    earlier.next_tile = 2
    earlier.save(behind / f"slide{PROGRESS_SUFFIX}")
    predict_inputs([slide], _Backend(), 4, LABELS, tmp_path / "ref", _options(), model_key="m")

    (result,) = predict_inputs([slide], _Backend(), 4, LABELS, out, _options(), model_key="m")
    assert result.details["tiles_resumed"] == done > 2
    np.testing.assert_array_equal(_outputs(out)[0], _outputs(tmp_path / "ref")[0])
    assert _hidden(out) == []  # the other one is deleted: it could never be resumed

    with pytest.raises(KeyboardInterrupt):
        predict_inputs(
            [slide], _Backend(stop_at=6), 4, LABELS, out, _options(overwrite=True), model_key="m"
        )
    backend = _Backend()
    restart = _options(overwrite=True, resume=False)
    (result,) = predict_inputs([slide], backend, 4, LABELS, out, restart, model_key="m")
    assert result.details["tiles_resumed"] == 0
    assert backend.tiles == result.details["tiles_predicted"]
    assert _hidden(out) == []
