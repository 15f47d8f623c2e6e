"""Scratch folders of a prediction: where its large temporary files live, and their removal
after a prediction killed outright."""

from __future__ import annotations

import logging
import os
import signal
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
    CAN_CLAIM,
    SCRATCH_PREFIX,
    STALE_SECONDS,
    _host,
    _kernel,
    claim_ended_scratch,
    remove_folder,
    remove_scratch,
    scratch_folder,
)

pytest.importorskip("tifffile")

SPEC = get_dataset_spec("luad-histoseg")
LABELS = ClassLabels.from_dataset_dict(SPEC.to_dict())


def _folder(
    parent: Path, name: str, size: int = 0, owner: bool = True, kernel: str | None = None
) -> Path:
    """A scratch folder as a killed prediction leaves it: nobody holds its lock."""
    folder = parent / f"{SCRATCH_PREFIX}{name}.123.k3j_x9"
    folder.mkdir()
    if owner:
        (folder / ".owner").write_text(f"{kernel or _kernel()}\nhost\n123\n")
    (folder / "slide.mask.raw").write_bytes(b"\0" * size)
    return folder


# Holds a scratch folder (a prediction running in another process) until killed.
_HOLDING = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hisynseg.inference.scratch import scratch_folder

    with scratch_folder(sys.argv[1]) as folder:
        Path(sys.argv[2]).write_text(str(folder))
        time.sleep(600)
    """
)


@pytest.mark.skipif(not CAN_CLAIM, reason="no file locks here")
def test_only_folders_no_process_holds_are_claimed_and_removed(tmp_path: Path) -> None:
    ended = _folder(tmp_path, "ended", size=3000)
    foreign = _folder(tmp_path, "notes", owner=False)  # not made by a prediction
    flag = tmp_path / "holding"
    child = subprocess.Popen([sys.executable, "-c", _HOLDING, str(tmp_path), str(flag)])
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() or not flag.read_text():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        theirs = Path(flag.read_text())
        with scratch_folder(tmp_path) as mine:
            with claim_ended_scratch(tmp_path) as claims:
                assert claims.folders == [ended]  # not theirs, not mine, not the foreign one
                with claim_ended_scratch(tmp_path) as again:
                    assert again.folders == []  # a claimed folder is locked too
                removed = remove_scratch(claims.folders)
            assert mine.is_dir()
        owner_bytes = len(f"{_kernel()}\nhost\n123\n")
        assert [(r.path, r.pid, r.size) for r in removed] == [(ended, 123, 3000 + owner_bytes)]
        assert not ended.exists() and foreign.is_dir() and theirs.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # Killed, the other process no longer holds its folder.
    with claim_ended_scratch(tmp_path) as claims:
        assert claims.folders == [theirs]
        claims.release([theirs])  # let go: another run may claim it now
        with claim_ended_scratch(tmp_path) as again:
            assert again.folders == [theirs]
    with claim_ended_scratch(tmp_path / "missing") as claims:
        assert claims.folders == []


@pytest.mark.skipif(not CAN_CLAIM, reason="no file locks here")
def test_a_folder_made_under_another_kernel_waits_for_its_heartbeat_to_stop(
    tmp_path: Path,
) -> None:
    # A shared file system whose locks each host keeps to itself: a free lock proves
    # nothing about a folder another machine made, an old heartbeat does.
    beating = _folder(tmp_path, "beating", kernel="another-machine")
    quiet = tmp_path / f"{SCRATCH_PREFIX}quiet.7.x"
    quiet.mkdir()
    (quiet / ".owner").write_text("another-machine\nhost\n7\n")
    old = time.time() - STALE_SECONDS - 5
    os.utime(quiet / ".owner", (old, old))
    with claim_ended_scratch(tmp_path) as claims:
        assert claims.folders == [quiet]
    assert beating.is_dir()


def test_a_folder_is_removed_with_its_owner_file_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path, "dying", size=10)
    (folder / "sub").mkdir()
    real_unlink = Path.unlink

    def killed(path: Path, missing_ok: bool = False) -> None:
        if path.name != ".owner":
            raise KeyboardInterrupt  # the process dies while removing
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_folder(folder)
    assert (folder / ".owner").is_file()  # so a later run can still claim what is left
    monkeypatch.undo()
    remove_folder(folder)
    assert not folder.exists()


def test_a_scratch_folder_is_removed_when_its_block_ends_even_by_an_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError), scratch_folder(tmp_path) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(SCRATCH_PREFIX)
        assert f".{os.getpid()}." in folder.name
        (folder / "big.raw").write_bytes(b"x" * 100)
        raise RuntimeError("prediction failed")
    assert not folder.exists()
    if not CAN_CLAIM:
        return  # nothing is kept where no later run could claim it
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
    assert left == [".owner", "slide.mask.raw", "slide.probs.npy"]
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


def test_without_file_locks_nothing_is_kept_or_taken_for_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.inference.scratch as scratch

    monkeypatch.setattr(scratch, "_lock", lambda path, create: None)  # e.g. NFS without locks
    with pytest.raises(KeyboardInterrupt), scratch_folder(tmp_path, lambda f: True) as folder:
        assert not (folder / ".owner").exists()  # so no run could take it for abandoned
        raise KeyboardInterrupt
    assert not folder.exists()  # and nothing is kept that no run could resume


def test_a_scratch_folder_that_cannot_be_set_up_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.inference.scratch as scratch

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scratch.os, "rename", full_disk)
    with pytest.raises(OSError, match="No space"), scratch_folder(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []
