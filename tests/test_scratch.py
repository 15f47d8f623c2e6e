"""Scratch folders of a prediction: where its large temporary files live, and their removal
after a prediction killed outright."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.inference.outputs import ClassLabels
from hisynseg.inference.predict import PredictOptions, predict_inputs
from hisynseg.inference.scratch import (
    SCRATCH_PREFIX,
    _host,
    remove_stale_scratch,
    scratch_folder,
)

pytest.importorskip("tifffile")

SPEC = get_dataset_spec("luad-histoseg")
LABELS = ClassLabels.from_dataset_dict(SPEC.to_dict())


def _ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(parent: Path, host: str, pid: int, size: int = 0) -> Path:
    folder = parent / f"{SCRATCH_PREFIX}{host}.{pid}.k3j_x9"
    folder.mkdir()
    (folder / "slide.mask.raw").write_bytes(b"\0" * size)
    return folder


def test_only_folders_of_ended_processes_of_this_host_are_removed(tmp_path: Path) -> None:
    dead = _folder(tmp_path, _host(), _ended_pid(), size=3000)
    alive = _folder(tmp_path, _host(), os.getppid())
    mine = _folder(tmp_path, _host(), os.getpid())  # this process's, no longer used
    elsewhere = _folder(tmp_path, "another.host", _ended_pid())
    # The same host name in another container (PID namespace): its pids are not ours.
    container = _folder(tmp_path, f"{socket.gethostname()}-1", _ended_pid())
    unrelated = tmp_path / ".hisynseg-scratch.notes"
    unrelated.mkdir()
    with scratch_folder(tmp_path) as in_use:
        removed = remove_stale_scratch(tmp_path)
        assert in_use.is_dir()
    assert sorted((r.path, r.size) for r in removed) == sorted([(dead, 3000), (mine, 0)])
    assert {r.pid for r in removed} == {int(dead.name.split(".")[-2]), os.getpid()}
    assert not dead.exists() and not mine.exists()
    assert alive.is_dir() and elsewhere.is_dir() and unrelated.is_dir()
    assert container.is_dir()
    assert remove_stale_scratch(tmp_path / "missing") == []


def test_a_scratch_folder_is_removed_when_its_block_ends_even_by_an_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError), scratch_folder(tmp_path) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(SCRATCH_PREFIX)
        assert f".{os.getpid()}." in folder.name
        (folder / "big.raw").write_bytes(b"x" * 100)
        raise RuntimeError("prediction failed")
    assert not folder.exists()
    # Unless it holds what a later run wants, and the block was cut short.
    worth_keeping = lambda folder: (folder / "progress").exists()  # noqa: E731
    with pytest.raises(KeyboardInterrupt), scratch_folder(tmp_path, worth_keeping) as kept:
        (kept / "progress").touch()
        raise KeyboardInterrupt
    assert kept.is_dir()
    with scratch_folder(tmp_path, worth_keeping) as done:
        (done / "progress").touch()
    assert not done.exists()


def _slide(path: Path) -> None:
    from test_slides import write_pyramid

    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (192, 192, 3), dtype=np.uint8)
    write_pyramid(path, image, mpp=0.5, tile=64)


# Predicts a slide with a backend that reports its first batch, then hangs there until
# killed: the moment an out-of-memory kill would strike, with every temporary file open.
_HANGING_PREDICTION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.inference.outputs import ClassLabels
    from hisynseg.inference.predict import PredictOptions, predict_inputs

    def backend(tiles):
        Path(sys.argv[3]).touch()
        time.sleep(600)

    labels = ClassLabels.from_dataset_dict(get_dataset_spec("luad-histoseg").to_dict())
    options = PredictOptions(tile=64, overlap=16, save_probs=True, progress=False)
    predict_inputs([sys.argv[1]], backend, 4, labels, sys.argv[2], options)
    """
)


def test_the_next_prediction_removes_what_a_killed_one_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slide, out, started = tmp_path / "slide.tif", tmp_path / "out", tmp_path / "started"
    _slide(slide)
    child = subprocess.Popen(
        [sys.executable, "-c", _HANGING_PREDICTION, str(slide), str(out), str(started)]
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None, "the prediction ended before its first batch"
            assert time.monotonic() < deadline, "the prediction never reached its first batch"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # Every temporary file of the killed prediction is in its scratch folder.
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(f"{SCRATCH_PREFIX}{_host()}.{child.pid}.")
    left = sorted(p.name for p in (out / hidden[0]).iterdir())
    assert left == ["slide.mask.raw", "slide.probs.npy"]
    assert (out / hidden[0] / "slide.mask.raw").stat().st_size == 192 * 192

    def backend(tiles: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(tiles), 4, *tiles.shape[1:3]), np.float32)
        probs[:, 2] = 1.0
        return probs

    options = PredictOptions(tile=64, overlap=16, save_probs=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="hisynseg.inference.predict"):
        (result,) = predict_inputs([slide], backend, 4, LABELS, out, options)
    assert result.status == "ok"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert f"(process {child.pid}) that was killed" in caplog.text
    assert hidden[0] in caplog.text
    assert np.load(out / "slide.probs.npy").shape == (192, 192, 4)
