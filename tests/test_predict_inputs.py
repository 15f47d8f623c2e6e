"""What ``hisynseg predict`` takes as inputs and where it may write: output names, the
output folder, folders listed as inputs, replaced inputs, and the tile loader of pictures."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hisynseg.cli import CommandError, main
from hisynseg.datasets.io import read_mask, write_rgb_png
from hisynseg.inference.predict import (
    OUTPUT_SUFFIXES,
    PredictOptions,
    output_names,
    output_paths,
    predict_inputs,
)
from hisynseg.slides.open import list_inputs, scan_inputs
from test_predict import LABELS, _checkpoint, _texture


def _backend(tiles: np.ndarray) -> np.ndarray:
    """Class 1 everywhere (a network is beside the point here)."""
    probs = np.zeros((len(tiles), 4, *tiles.shape[1:3]), np.float32)
    probs[:, 1] = 1.0
    return probs


def _options(**changes: object) -> PredictOptions:
    base = {"tile": 32, "overlap": 0, "progress": False, "tissue_detection": False}
    return PredictOptions(**{**base, **changes})


class _ModelLoaded(Exception):
    """Raised instead of loading a model: the command got that far."""


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model stop the command with exit status 2 and a marker line."""
    import hisynseg.inference.backends as backends

    def load_backend(*args: object, **kwargs: object) -> None:
        raise CommandError("model loaded")

    monkeypatch.setattr(backends, "load_backend", load_backend)


# 1. Output names.


def test_output_names_are_unique_and_stems_where_they_can_be() -> None:
    def names(*paths: str) -> list[str]:
        return output_names([Path(p) for p in paths])

    assert names("d/x.png", "d/y.tif") == ["x", "y"]
    # Same stem, other suffix: the full names (as before).
    assert names("d/x.png", "d/x.tif") == ["x.png", "x.tif"]
    # Same file name in two folders: the folder's name in front.
    assert names("r/a/x.png", "r/b/x.png", "r/b/y.png") == ["a_x", "b_x", "y"]
    # Folders of the same name too: a counter, skipping names that are taken.
    assert names("r1/a/x.png", "r2/a/x.png", "r3/a_x_2.png") == ["a_x", "a_x_3", "a_x_2"]
    # OME-TIFF: the stem without ".ome".
    assert names("d/x.ome.tif", "d/y.OME.TIFF", "d/z.ome.png") == ["x", "y", "z.ome"]
    # Names differing only in case would be one file on macOS and Windows.
    assert names("d/X.png", "d/x.png") == ["d_X", "d_x_2"]
    paths = [Path(f"r/{d}/x.png") for d in "abc"]
    assert len(set(output_names(paths))) == 3
    # The same inputs in another order keep their names.
    assert output_names(paths[::-1]) == output_names(paths)[::-1]


def test_inputs_sharing_a_file_name_get_outputs_of_their_own(tmp_path: Path) -> None:
    for folder, size in (("a", (64, 64)), ("b", (96, 80))):
        (tmp_path / folder).mkdir()
        write_rgb_png(tmp_path / folder / "x.png", _texture(*size))
    inputs = list_inputs([tmp_path / "a", tmp_path / "b"])
    out = tmp_path / "out"
    for _ in range(2):  # again with --overwrite: neither replaces the other's outputs
        results = predict_inputs(inputs, _backend, 4, LABELS, out, _options(overwrite=True))
        assert [r.status for r in results] == ["ok", "ok"]
        assert [r.name for r in results] == ["a_x", "b_x"]
    assert read_mask(out / "a_x.mask.png").shape == (64, 64)
    assert read_mask(out / "b_x.mask.png").shape == (96, 80)
    # Without --overwrite, both are done.
    results = predict_inputs(inputs, _backend, 4, LABELS, out, _options())
    assert [r.status for r in results] == ["skipped", "skipped"]


def test_outputs_made_under_an_older_naming_rule_keep_their_name(tmp_path: Path) -> None:
    # Earlier versions named x.ome.tif's outputs x.ome: a re-run skips them rather than
    # predicting x.* beside them.
    import tifffile

    slide = tmp_path / "x.ome.tif"
    tifffile.imwrite(slide, _texture(64, 64), photometric="rgb")
    out = tmp_path / "out"
    (result,) = predict_inputs([slide], _backend, 4, LABELS, out, _options())
    assert result.name == "x"
    record = json.loads((out / "predict.json").read_text())
    record["outputs"] = {"x.ome": record["outputs"]["x"]}
    (out / "predict.json").write_text(json.dumps(record))
    for path in out.glob("x.*"):
        path.rename(out / path.name.replace("x.", "x.ome.", 1))
    (result,) = predict_inputs([slide], _backend, 4, LABELS, out, _options())
    assert (result.status, result.name) == ("skipped", "x.ome")
    assert not list(out.glob("x.mask*"))
    # A recorded name another input of the run takes stays that input's.
    from hisynseg.inference.predict import _recorded_names

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    recorded = {"b": {"input": str(a.resolve())}}
    assert _recorded_names([a, b], ["a", "b"], recorded) == ["a", "b"]
    assert _recorded_names([a], ["a"], recorded) == ["b"]


def test_output_suffixes_cover_every_output() -> None:
    options = _options(save_probs=True, geojson=True)
    for path in (Path("x.png"), Path("x.tif")):
        for output in output_paths(path, "x", Path("out"), options).values():
            assert output.name.endswith(OUTPUT_SUFFIXES)


# 2, 3. An output folder that cannot be used: one line, exit status 2, no model loaded.


def _predict_args(tmp_path: Path, out: Path) -> list[str]:
    write_rgb_png(tmp_path / "pic.png", _texture(32, 32))
    return ["predict", str(tmp_path / "model.pt"), str(tmp_path / "pic.png"), "--out", str(out)]


def test_out_that_is_a_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert main(_predict_args(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hisynseg predict: error: --out {out}: not a folder (a file is there)"
    # A folder that cannot be made, under a file.
    assert main(_predict_args(tmp_path, out / "sub")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--out {out / 'sub'}: cannot make the folder" in err


def test_out_where_no_file_can_be_made_is_a_one_line_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    no_model: None,
) -> None:
    out = tmp_path / "read-only"
    out.mkdir()
    if os.geteuid() == 0:  # root writes in read-only folders: refuse like a file system
        mkstemp = tempfile.mkstemp

        def refusing(*args: object, **kwargs: object) -> tuple[int, str]:
            if Path(str(kwargs.get("dir"))).resolve() == out.resolve():
                raise PermissionError(13, "Permission denied", str(out / ".x.tmp"))
            return mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refusing)
    else:
        out.chmod(0o555)
    try:
        assert main(_predict_args(tmp_path, out)) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert err == f"hisynseg predict: error: --out {out}: cannot write in it (Permission denied)"
    assert list(out.iterdir()) == []


# 4, 5. Folders listed as inputs.


def test_a_rerun_into_the_input_folder_leaves_its_own_outputs_out(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = _checkpoint(tmp_path)
    folder = tmp_path / "pics"
    folder.mkdir()
    write_rgb_png(folder / "tiny.png", _texture(48, 48))
    args = ["predict", str(ckpt), str(folder), "--out", str(folder), "--tile", "32"]
    args += ["--overlap", "0", "--no-progress"]
    assert main(args) == 0
    assert (folder / "tiny.mask.png").is_file() and (folder / "tiny.overlay.png").is_file()
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"hisynseg predict: {folder}: left out 2 files that predict wrote" in err
    record = json.loads((folder / "predict.json").read_text())
    assert record["summary"]["inputs"] == 1 and record["summary"]["skipped"] == 1
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "tiny.mask.png",
        "tiny.overlay.png",
        "tiny.png",
    ]
    # Named one by one, an output is an input like any other.
    assert main([*args[:2], str(folder / "tiny.mask.png"), *args[3:]]) == 0


def test_scan_inputs_counts_the_subfolders_it_does_not_search(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    for sub in ("s1", "s2", ".hidden", "out"):
        (folder / sub).mkdir(parents=True)
    for name in ("a.png", "a.mask.png", "s1/b.png"):
        write_rgb_png(folder / name, _texture(16, 16))
    listing = scan_inputs([folder, tmp_path / "gone.png"])
    assert [p.name for p in listing.files] == ["a.mask.png", "a.png", "gone.png"]
    assert listing.unsearched == {folder: 3} and listing.left_out == {}
    assert list_inputs([folder]) == listing.files[:2]  # unchanged, no notice
    listing = scan_inputs([folder], leave_out=lambda p: p.name in ("out", "a.mask.png"))
    assert [p.name for p in listing.files] == ["a.png"]
    assert listing.unsearched == {folder: 2} and listing.left_out == {folder: 1}


def test_cli_says_how_many_subfolders_it_did_not_search(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    folder = tmp_path / "d"
    for sub in ("s1", "s2", "out"):
        (folder / sub).mkdir(parents=True)
    write_rgb_png(folder / "top.png", _texture(32, 32))
    (folder / "s3").mkdir()
    args = ["predict", str(tmp_path / "model.pt"), str(folder), "--out", str(folder / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    # The output folder is no forgotten input.
    assert err[0] == f"hisynseg predict: {folder}: 3 subfolders not searched (give them as inputs)"
    assert err[1] == "hisynseg predict: error: model loaded"
    (folder / "s2").rmdir()
    (folder / "s3").rmdir()
    assert main(args) == 2
    assert f"{folder}: 1 subfolder not searched (give it as an input)" in capsys.readouterr().err


# 6. A replaced input.


def test_a_replaced_input_is_not_skipped_with_stale_outputs(tmp_path: Path) -> None:
    pic = tmp_path / "x.png"
    write_rgb_png(pic, _texture(64, 64))
    out = tmp_path / "out"
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "ok"
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "skipped"

    write_rgb_png(pic, _texture(96, 80, seed=3))  # new content at the same path
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "failed"
    assert "outputs exist, made from another version of this input (size" in result.error
    assert "use --overwrite" in result.error
    assert read_mask(out / "x.mask.png").shape == (64, 64)  # left as they were
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options(overwrite=True))
    assert result.status == "ok" and read_mask(out / "x.mask.png").shape == (96, 80)
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "skipped"
    made = json.loads((out / "predict.json").read_text())["outputs"]["x"]
    assert (made["input_size"], made["input_mtime_ns"]) == (
        pic.stat().st_size,
        pic.stat().st_mtime_ns,
    )

    # The same size, but written again since.
    mtime = pic.stat().st_mtime_ns
    os.utime(pic, ns=(mtime, mtime + 5 * 10**9))
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "failed"
    assert "another version of this input (modified " in result.error
    os.utime(pic, ns=(mtime, mtime))

    # A record of an older version, naming the input only, still counts.
    record = json.loads((out / "predict.json").read_text())
    del record["outputs"]["x"]["input_size"], record["outputs"]["x"]["input_mtime_ns"]
    (out / "predict.json").write_text(json.dumps(record))
    (result,) = predict_inputs([pic], _backend, 4, LABELS, out, _options())
    assert result.status == "skipped"


# 7. Reader processes and pictures.


def test_reader_processes_read_pictures_with_threads(tmp_path: Path) -> None:
    from test_slides import write_pyramid

    write_rgb_png(tmp_path / "pic.png", _texture(64, 64))
    write_pyramid(tmp_path / "slide.tif", _texture(128, 128, seed=1), mpp=0.5, tile=64)
    inputs = [tmp_path / "pic.png", tmp_path / "slide.tif"]
    options = _options(tile_loader="processes", workers=2)
    results = predict_inputs(inputs, _backend, 4, LABELS, tmp_path / "out", options)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert [r.details["tile_loader"] for r in results] == ["threads", "processes"]
