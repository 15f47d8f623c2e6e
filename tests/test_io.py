"""Image and mask reading, and atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hisynseg.datasets import io as hio
from hisynseg.datasets.io import (
    ImageReadError,
    MaskColourError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    encode_rgb_png,
    list_images,
    read_image_size,
    read_mask,
    read_rgb,
    write_mask_png,
    write_rgb_png,
)
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.errors import HisynsegError

PALETTE = get_dataset_spec("luad-histoseg").palette


def random_rgb(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_mask(h: int = 40, w: int = 56, seed: int = 0, high: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- atomic
def test_atomic_path_failure_leaves_no_temp_and_keeps_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "data.bin"
    atomic_write_bytes(dest, b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".")
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]


def test_atomic_path_failure_on_rename_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(hio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_rgb_png(tmp_path / "a.png", random_rgb())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "m.png") as tmp:
        tmp.write_bytes(b"\x89PNG")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_succeed_without_leftovers(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "r.json", {"a": np.int64(3), "b": np.arange(2), "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "a": 3,
        "b": [0, 1],
        "p": str(tmp_path),
    }
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ----------------------------------------------------------------------------- read
def test_rgb_round_trip_and_size(tmp_path: Path) -> None:
    image = random_rgb(40, 56)
    write_rgb_png(tmp_path / "a.png", image)
    assert np.array_equal(read_rgb(tmp_path / "a.png"), image)
    assert read_image_size(tmp_path / "a.png") == (40, 56)


def test_read_rgb_converts_other_modes(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 9), 100, np.uint8), "L").save(tmp_path / "grey.png")
    out = read_rgb(tmp_path / "grey.png")
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8 and (out == 100).all()


def test_indexed_mask_round_trip_keeps_palette(tmp_path: Path) -> None:
    mask = random_mask()
    write_mask_png(tmp_path / "m.png", mask, PALETTE)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P"
        assert img.getpalette()[:15] == [c for colour in PALETTE for c in colour]
    out = read_mask(tmp_path / "m.png")
    assert np.array_equal(out, mask)
    out[0, 0] = 1  # callers edit masks in place: the array must be writable


def _indexed_png(path: Path, indices: np.ndarray, colours: list[list[int]]) -> None:
    img = Image.fromarray(indices, "P")
    img.putpalette([c for colour in colours for c in colour])
    img.save(path)


def test_reindexed_mask_is_read_by_its_colours(tmp_path: Path) -> None:
    # An editor that re-indexes a mask keeps the colours and renumbers them: the colour
    # is what says which class a pixel is.
    mask = random_mask()
    order = [3, 0, 4, 1, 2]  # file index i holds class order[i]
    file_indices = np.argsort(order).astype(np.uint8)[mask]
    _indexed_png(tmp_path / "m.png", file_indices, [list(PALETTE[c]) for c in order])
    assert np.array_equal(read_mask(tmp_path / "m.png", PALETTE), mask)
    # Without the dataset's palette there is nothing to compare with: raw indices.
    assert np.array_equal(read_mask(tmp_path / "m.png"), file_indices)


def test_indexed_mask_with_a_display_palette_reads_its_indices(tmp_path: Path) -> None:
    mask = random_mask()
    grey_ramp = [[v, v, v] for v in range(0, 250, 50)]
    _indexed_png(tmp_path / "m.png", mask, grey_ramp)
    assert np.array_equal(read_mask(tmp_path / "m.png", PALETTE), mask)


def test_indexed_masks_with_display_palettes_keep_their_indices(tmp_path: Path) -> None:
    """Palettes that share only a grey with the dataset (black, white) say nothing."""
    generic = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]  # black background, class 3
    only_zero = np.zeros((8, 8), np.uint8)
    _indexed_png(tmp_path / "ramp.png", only_zero, [[v, v, v] for v in range(256)])
    assert (read_mask(tmp_path / "ramp.png", generic) == 0).all()
    voc = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    mask = random_mask()
    _indexed_png(tmp_path / "voc.png", mask, voc)
    assert np.array_equal(read_mask(tmp_path / "voc.png", generic), mask)
    _indexed_png(tmp_path / "mixed.png", mask, [list(PALETTE[1]), [1, 2, 3], [4, 5, 6]] * 2)
    assert np.array_equal(read_mask(tmp_path / "mixed.png", PALETTE), mask)


def test_greyscale_mask_reads_values(tmp_path: Path) -> None:
    mask = random_mask()
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask)


def test_rgb_mask_is_mapped_through_the_palette(tmp_path: Path) -> None:
    mask = random_mask()
    rgb = np.asarray(PALETTE, dtype=np.uint8)[mask]
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb-mask.png")
    out = read_mask(tmp_path / "rgb-mask.png", PALETTE)
    assert out.dtype == np.uint8
    assert np.array_equal(out, mask)


def test_rgb_mask_with_unknown_colour_is_an_error(tmp_path: Path) -> None:
    rgb = np.asarray(PALETTE, dtype=np.uint8)[random_mask()]
    rgb[3, 4] = (1, 2, 3)
    path = tmp_path / "odd-colour.png"
    Image.fromarray(rgb, "RGB").save(path)
    with pytest.raises(MaskColourError, match=r"odd-colour\.png.*\[\[1, 2, 3\]\]"):
        read_mask(path, PALETTE)
    with pytest.raises(ImageReadError, match="no palette"):
        read_mask(path)


def test_16_bit_mask_value_above_255_is_an_error_not_a_wrap(tmp_path: Path) -> None:
    values = np.zeros((6, 6), dtype=np.uint16)
    values[0, 0] = 260  # would wrap to 4, a valid background index, if cast blindly
    path = tmp_path / "m16.png"
    Image.fromarray(values).save(path)
    with pytest.raises(MaskColourError, match=r"m16\.png.*260"):
        read_mask(path)
    values[0, 0] = 3
    Image.fromarray(values).save(path)
    assert read_mask(path)[0, 0] == 3


@pytest.mark.parametrize("reader", [read_rgb, read_mask], ids=["read_rgb", "read_mask"])
def test_truncated_file_raises_image_read_error_naming_it(tmp_path: Path, reader) -> None:
    data = encode_rgb_png(random_rgb(64, 64))
    path = tmp_path / "cut-short.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut-short\.png.*truncated"):
        reader(path)


def test_missing_and_non_image_files(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nothing\.png: file not found"):
        read_rgb(tmp_path / "nothing.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageReadError, match=r"notes\.png"):
        read_rgb(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match=r"notes\.png"):
        read_image_size(tmp_path / "notes.png")
    assert issubclass(ImageReadError, HisynsegError)


def test_failed_read_does_not_leak_file_handles(tmp_path: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to count open files")
    data = encode_rgb_png(random_rgb(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    before = len(os.listdir("/proc/self/fd"))
    errors = []
    for _ in range(20):
        try:
            read_rgb(path)
        except ImageReadError as exc:
            errors.append(exc)  # keep the exceptions alive: handles must close anyway
    assert len(errors) == 20
    assert len(os.listdir("/proc/self/fd")) - before < 5


def test_list_images_skips_hidden_temporary_and_other_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.tif", ".a.png.x1.tmp", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tif"]


def test_atomic_writes_get_the_mode_of_ordinary_new_files(tmp_path: Path) -> None:
    """Outputs must be readable as any file the user creates is, not private (mkstemp)."""
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~mask
