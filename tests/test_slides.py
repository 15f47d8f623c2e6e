"""Slide readers: pyramidal and plain TIFF through tifffile, pictures, dispatch, tissue."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hisynseg.datasets.io import write_rgb_png
from hisynseg.inference.tissue import TissueDetector
from hisynseg.slides import (
    PlainImageReader,
    SlideReadError,
    TiffSlideReader,
    best_level,
    list_inputs,
    open_slide,
    read_thumbnail,
)

tifffile = pytest.importorskip("tifffile")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None = 0.5, tile: int = 128) -> None:
    """A two-level tiled TIFF: level 1 (a SubIFD) is level 0 halved."""
    options: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        extra = {}
        if mpp is not None:
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(image, subifds=1, **options, **extra)
        tif.write(image[::2, ::2], subfiletype=1, **options)


def test_pyramidal_tiff_levels_mpp_and_regions(tmp_path: Path) -> None:
    image = _image(512, 384)
    path = tmp_path / "slide.tif"
    write_pyramid(path, image)
    with open_slide(path) as reader:
        assert isinstance(reader, TiffSlideReader)
        assert reader.dimensions == (384, 512)
        assert reader.level_dimensions == ((384, 512), (192, 256))
        assert reader.level_downsamples == (1.0, 2.0)
        assert reader.mpp == pytest.approx(0.5)
        assert reader.is_slide
        # A region across four tiles, one inside a single tile, one on the second level.
        np.testing.assert_array_equal(
            reader.read_region(0, 100, 120, 60, 50), image[120:170, 100:160]
        )
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 10, 7), image[:7, :10])
        np.testing.assert_array_equal(
            reader.read_region(1, 30, 90, 100, 40), image[::2, ::2][90:130, 30:130]
        )
        # Past the edges: white.
        region = reader.read_region(0, 370, -5, 30, 20)
        np.testing.assert_array_equal(region[5:, :14], image[:15, 370:384])
        assert (region[:5] == 255).all() and (region[:, 14:] == 255).all()
        assert best_level(reader, 2.0) == 1 and best_level(reader, 1.9) == 0


def test_strip_tiff_grey_and_no_resolution(tmp_path: Path) -> None:
    grey = _image(100, 70)[:, :, 0]
    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, grey, rowsperstrip=16)
    reader = TiffSlideReader(path)
    assert reader.mpp is None and not reader.is_slide and len(reader.level_dimensions) == 1
    region = reader.read_region(0, 5, 30, 40, 40)
    np.testing.assert_array_equal(region, np.repeat(grey[30:70, 5:45, None], 3, axis=2))
    reader.close()


def test_mpp_from_aperio_description_and_placeholder_dpi(tmp_path: Path) -> None:
    image = _image(64, 64)
    svs_like = tmp_path / "a.tif"
    tifffile.imwrite(
        svs_like, image, description="Aperio Image Library v12 |AppMag = 40|MPP = 0.2520"
    )
    assert TiffSlideReader(svs_like).mpp == pytest.approx(0.252)
    dpi72 = tmp_path / "b.tif"
    tifffile.imwrite(dpi72, image, resolution=(72, 72), resolutionunit="INCH")
    assert TiffSlideReader(dpi72).mpp is None  # 353 µm/px: a placeholder, not a scan
    dpi = tmp_path / "c.tif"
    tifffile.imwrite(dpi, image, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    assert TiffSlideReader(dpi).mpp == pytest.approx(0.5)


def test_plain_picture_and_dispatch_errors(tmp_path: Path) -> None:
    image = _image(40, 50)
    write_rgb_png(tmp_path / "pic.png", image)
    reader = open_slide(tmp_path / "pic.png")
    assert isinstance(reader, PlainImageReader) and not reader.is_slide and reader.mpp is None
    np.testing.assert_array_equal(reader.read_region(0, 0, 0, 50, 40), image)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(SlideReadError, match="broken.tif"):
        open_slide(tmp_path / "broken.tif")
    with pytest.raises(SlideReadError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SlideReadError, match="unsupported"):
        open_slide(tmp_path / "notes.txt")


def test_openslide_formats_name_the_extra_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes ``import openslide`` fail as if not installed.
    monkeypatch.setitem(sys.modules, "openslide", None)
    (tmp_path / "x.mrxs").write_bytes(b"\x00")
    with pytest.raises(SlideReadError, match=r"hisynseg\[slides\]"):
        open_slide(tmp_path / "x.mrxs")


def test_openslide_reader_reads_a_generic_tiled_tiff(tmp_path: Path) -> None:
    """OpenSlide's generic-TIFF driver: tiled levels in successive directories, the
    reduced ones marked as such."""
    pytest.importorskip("openslide")
    from hisynseg.slides.openslide_reader import OpenSlideReader

    image = _image(512, 384, seed=3)
    path = tmp_path / "generic.tif"
    options: dict = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            image, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", **options
        )
        tif.write(image[::2, ::2], subfiletype=1, **options)
    with OpenSlideReader(path) as reader:
        assert reader.dimensions == (384, 512)
        assert reader.level_dimensions == ((384, 512), (192, 256))
        assert reader.level_downsamples == pytest.approx((1.0, 2.0))
        np.testing.assert_array_equal(
            reader.read_region(0, 100, 120, 60, 50), image[120:170, 100:160]
        )
        np.testing.assert_array_equal(
            reader.read_region(1, 30, 90, 100, 40), image[::2, ::2][90:130, 30:130]
        )
        region = reader.read_region(0, 370, -5, 30, 20)
        np.testing.assert_array_equal(region[5:, :14], image[:15, 370:384])
        assert (region[:5] == 255).all()


def test_banded_thumbnail_matches_whole_resize(tmp_path: Path) -> None:
    import cv2

    yy, xx = np.mgrid[:300, :200]
    image = np.stack([yy % 256, xx % 256, (yy + xx) % 256], axis=2).astype(np.uint8)
    reader = PlainImageReader("mem", image=image)
    whole = cv2.resize(image, (50, 75), interpolation=cv2.INTER_AREA)
    banded = read_thumbnail(reader, (50, 75), band_rows=32)
    assert banded.shape == (75, 50, 3)
    assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2.0


def test_list_inputs_reads_folders_and_keeps_missing_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.svs", ".hidden.png", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    found = list_inputs([tmp_path / "d", tmp_path / "gone.tif", tmp_path / "d" / "b.png"])
    assert [p.name for p in found] == ["a.svs", "b.png", "gone.tif"]


def test_tissue_detector_separates_glass_from_stain() -> None:
    rng = np.random.default_rng(1)
    image = np.full((200, 400, 3), 240, np.uint8)
    image += rng.integers(0, 8, image.shape, dtype=np.uint8)  # glass noise
    image[:, :200] = (rng.random((200, 200, 3)) * 50 + [170, 80, 160]).astype(np.uint8)
    reader = PlainImageReader("mem", image=image)
    det = TissueDetector.fit(reader, max_side=100)
    assert det.fraction(0, 0, 180, 200) > 0.95
    assert det.fraction(220, 0, 180, 200) < 0.05
    assert det.fraction(1000, 1000, 50, 50) == 0.0
    # Only the part inside the image counts: a tile hanging over the edge, or a tile far
    # larger than the image, is judged by the pixels it actually covers.
    assert det.fraction(-300, 0, 480, 200) > 0.95
    assert det.fraction(0, 0, 2048, 2048) == pytest.approx(0.5, abs=0.05)
    pixels = det.pixel_mask(image)
    assert pixels[:, 10:190].mean() > 0.95 and pixels[:, 210:].mean() < 0.05


def test_tile_cache_returns_what_uncached_reads_return(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    image = _image(300, 420, seed=5)
    path = tmp_path / "cached.tif"
    write_pyramid(path, image, tile=64)
    rng = np.random.default_rng(0)
    boxes = [
        (
            int(rng.integers(0, 2)),
            *map(int, rng.integers(-20, 300, 2)),
            *map(int, rng.integers(1, 150, 2)),
        )
        for _ in range(60)
    ]
    plain = TiffSlideReader(path, cache_bytes=0)
    # A budget of a few tiles: evictions happen all the time.
    small = TiffSlideReader(path, cache_bytes=5 * 64 * 64 * 3)
    big = TiffSlideReader(path)
    expected = [plain.read_region(*b) for b in boxes]
    assert plain.cache_hits == 0
    for reader in (small, big):
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda b, r=reader: r.read_region(*b), boxes))
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_array_equal(have, want)
        assert reader.cache_hits > 0 and reader._cache_size <= reader._cache_limit
    assert big.cache_hits > small.cache_hits
    # A region straddling four stored tiles twice: the second read decodes nothing.
    before = big.cache_misses
    big.read_region(0, 100, 100, 60, 60)
    big.read_region(0, 100, 100, 60, 60)
    np.testing.assert_array_equal(big.read_region(0, 100, 100, 60, 60), image[100:160, 100:160])
    assert big.cache_misses - before <= 4
    for reader in (plain, small, big):
        reader.close()
