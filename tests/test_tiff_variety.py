"""TIFF layouts met in the wild: irregular pyramids, overview pages, resolution metadata
in its various dialects, colour interpretations, single-strip images, damaged files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hisynseg.inference.tile_loading import TileGeometry, read_tile
from hisynseg.inference.wsi import plan_tiles
from hisynseg.slides import SlideReadError, TiffSlideReader, best_level, open_slide
from hisynseg.slides.tiff import tiff_mpp

tifffile = pytest.importorskip("tifffile")

TILED: dict = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reduced(image: np.ndarray, factor: int) -> np.ndarray:
    return np.ascontiguousarray(image[::factor, ::factor])


@pytest.mark.parametrize("as_subifds", [True, False], ids=["subifds", "reduced-pages"])
def test_levels_at_uneven_steps_are_all_found(tmp_path: Path, as_subifds: bool) -> None:
    # tifffile groups only levels at one steady step of 2, 3 or 4 into its series.
    image = _image(512, 768)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2 if as_subifds else 0, **TILED)
        for factor in (8, 32):
            tif.write(_reduced(image, factor), subfiletype=1, **TILED)
    with TiffSlideReader(path) as reader:
        assert reader.level_dimensions == ((768, 512), (96, 64), (24, 16))
        assert reader.level_downsamples == (1.0, 8.0, 32.0)
        np.testing.assert_array_equal(
            reader.read_region(1, 10, 20, 30, 40), _reduced(image, 8)[20:60, 10:40]
        )
        np.testing.assert_array_equal(reader.read_region(2, 0, 0, 24, 16), _reduced(image, 32))


def test_unrelated_pages_are_not_taken_for_levels(tmp_path: Path) -> None:
    # A label of another shape, and a page of the right shape not marked "reduced".
    image = _image(256, 256)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, **TILED)
        tif.write(_image(40, 100, seed=1), subfiletype=1, **TILED)
        tif.write(_reduced(image, 4), **TILED)
    with TiffSlideReader(path) as reader:
        assert reader.level_dimensions == ((256, 256),)


def test_an_overview_stored_first_does_not_stand_for_the_slide(tmp_path: Path) -> None:
    image = _image(200, 260)
    path = tmp_path / "overview-first.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_reduced(image, 10), photometric="rgb")
        tif.write(image, **TILED)
    with TiffSlideReader(path) as reader:
        assert reader.dimensions == (260, 200)
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 260, 200), image)


def test_a_truncated_file_is_refused_at_opening(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _image(256, 256), tile=(64, 64), photometric="rgb", compression="jpeg")
    data = path.read_bytes()
    # tifffile writes the IFD first, so the tags survive and the tiles do not.
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"cut\.tif: the file is truncated: it has \d+ bytes"):
        TiffSlideReader(path)


def _tags(**values: object) -> dict:
    return {name: SimpleNamespace(value=value) for name, value in values.items()}


def _ome(*pixels: str) -> str:
    images = "".join(
        f'<Image ID="Image:{i}"><Pixels ID="Pixels:{i}" {attrs}/></Image>'
        for i, attrs in enumerate(pixels)
    )
    return f'<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">{images}</OME>'


def test_mpp_from_ome_xml_reads_the_image_of_the_slides_size() -> None:
    overview_first = _ome(
        'SizeX="260" SizeY="200" PhysicalSizeX="10"',
        'SizeX="2600" SizeY="2000" PhysicalSizeX="1.0"',
    )
    assert tiff_mpp(overview_first, {}, (2600, 2000)) == pytest.approx(1.0)
    assert tiff_mpp(overview_first, {}, (999, 999)) == pytest.approx(10.0)  # the first


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        (_ome('PhysicalSizeX="0.25"'), 0.25),
        (_ome('PhysicalSizeX="250" PhysicalSizeXUnit="nm"'), 0.25),
        (_ome("PhysicalSizeX='0.5' PhysicalSizeXUnit='\u03bcm'"), 0.5),  # Greek mu
        # The first image has no size: the macro image's 16.5 µm/px is not the slide's.
        (_ome('SizeX="100"', 'PhysicalSizeX="16.5"'), None),
        (_ome('PhysicalSizeX="0.25"', 'PhysicalSizeX="16.5" PhysicalSizeXUnit="nm"'), 0.25),
        (_ome('PhysicalSizeX="0.25" PhysicalSizeXUnit="pixel"'), None),
    ],
)
def test_mpp_from_ome_xml_reads_the_first_images_pixels(
    description: str, expected: float | None
) -> None:
    assert tiff_mpp(description, {}) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("description", "tags", "expected"),
    [
        ("ImageJ=1.54f\nunit=micron\n", _tags(XResolution=(4, 1), ResolutionUnit=1), 0.25),
        ("ImageJ=1.54f\nunit=\\u00B5m\n", _tags(XResolution=(2, 1), ResolutionUnit=1), 0.5),
        ("ImageJ=1.54f\nunit=pixel\n", _tags(XResolution=(2, 1), ResolutionUnit=1), None),
        ("", _tags(XResolution=(4, 1), ResolutionUnit=5), 0.25),  # pixels per µm
        ("", _tags(XResolution=(4000, 1), ResolutionUnit=4), 0.25),  # pixels per mm
        ("", _tags(XResolution=(101600, 1)), 0.25),  # no unit tag: TIFF's default, inch
        ("", _tags(XResolution=(4, 1), ResolutionUnit=1), None),  # unit-less, no ImageJ unit
    ],
)
def test_mpp_from_resolution_tags_in_every_unit(
    description: str, tags: dict, expected: float | None
) -> None:
    assert tiff_mpp(description, tags) == (None if expected is None else pytest.approx(expected))


def test_colour_interpretations_are_shown_as_displayed(tmp_path: Path) -> None:
    grey = _image(32, 48)[:, :, 0]
    tifffile.imwrite(tmp_path / "white.tif", grey, photometric="miniswhite")
    with TiffSlideReader(tmp_path / "white.tif") as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 48, 32)[..., 0], 255 - grey)

    palette = np.zeros((3, 256), np.uint16)
    palette[:, 1] = (65535, 0, 0)  # index 1: red
    palette[:, 2] = (0, 0, 65535)  # index 2: blue
    indices = (np.arange(32 * 48).reshape(32, 48) % 3).astype(np.uint8)
    tifffile.imwrite(tmp_path / "palette.tif", indices, photometric="palette", colormap=palette)
    with TiffSlideReader(tmp_path / "palette.tif") as reader:
        rgb = reader.read_region(0, 0, 0, 48, 32)
    np.testing.assert_array_equal(rgb[indices == 1], [[255, 0, 0]] * int((indices == 1).sum()))
    np.testing.assert_array_equal(rgb[indices == 2], [[0, 0, 255]] * int((indices == 2).sum()))
    assert (rgb[indices == 0] == 0).all()

    rgba = np.concatenate([_image(32, 48), np.full((32, 48, 1), 255, np.uint8)], axis=2)
    rgba[:10] = 0  # transparent black: an area the scanner did not capture
    rgba[10:12, :, 3] = 128  # half transparent
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with TiffSlideReader(tmp_path / "rgba.tif") as reader:
        rgb = reader.read_region(0, 0, 0, 48, 32)
    assert (rgb[:10] == 255).all()
    expected = (rgba[10:12, :, :3].astype(int) * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(rgb[10:12], expected)
    np.testing.assert_array_equal(rgb[12:], rgba[12:, :, :3])

    tifffile.imwrite(
        tmp_path / "cmyk.tif", _image(8, 8)[..., :1].repeat(4, 2), photometric="separated"
    )
    with pytest.raises(SlideReadError, match=r"cmyk\.tif: CMYK"):
        TiffSlideReader(tmp_path / "cmyk.tif")


def test_a_transparent_png_reads_white(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut-out.png")
    with open_slide(tmp_path / "cut-out.png") as reader:
        rgb = reader.read_region(0, 0, 0, 8, 8)
    assert (rgb[:, :4] == 255).all() and (rgb[:, 4:] == (10, 20, 30)).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_single_strip_image_is_read_by_rows_not_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: type
) -> None:
    image = _image(300, 200).astype(dtype) * (257 if dtype is np.uint16 else 1)
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=300, byteorder=">")
    reader = TiffSlideReader(path)

    def no_decoding(*args: object) -> None:
        raise AssertionError("the strip was decoded whole")

    monkeypatch.setattr(reader, "_segments", no_decoding)
    expected = (image >> 8).astype(np.uint8) if dtype is np.uint16 else image
    np.testing.assert_array_equal(reader.read_region(0, 50, 120, 64, 64), expected[120:184, 50:114])
    # A narrow region: its columns of each row only.
    np.testing.assert_array_equal(reader.read_region(0, 70, 10, 20, 30), expected[10:40, 70:90])
    region = reader.read_region(0, 180, 290, 40, 20)  # over the corner: white outside
    np.testing.assert_array_equal(region[:10, :20], expected[290:, 180:])
    assert (region[10:] == 255).all() and (region[:, 20:] == 255).all()
    reader.close()


def test_an_svs_openslide_refuses_is_read_with_tifffile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.slides.open as opening
    import hisynseg.slides.openslide_reader as openslide_reader

    class Refusing:
        def __init__(self, path: Path) -> None:
            raise SlideReadError(f"{path}: OpenSlide cannot open it")

    monkeypatch.setattr(opening, "_has_openslide", lambda: True)
    monkeypatch.setattr(openslide_reader, "OpenSlideReader", Refusing)
    image = _image(64, 64)
    tifffile.imwrite(tmp_path / "stripped.svs", image, photometric="rgb")
    with open_slide(tmp_path / "stripped.svs") as reader:
        assert isinstance(reader, TiffSlideReader)
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 64, 64), image)
    (tmp_path / "junk.svs").write_bytes(b"not a slide")
    with pytest.raises(SlideReadError, match="OpenSlide cannot open it"):
        open_slide(tmp_path / "junk.svs")


def test_a_level_a_little_coarser_than_asked_is_read_and_enlarged(tmp_path: Path) -> None:
    # Aperio's 0.252 µm/px with a ×4 level (1.008 µm/px), predicted at 1.0 µm/px.
    yy, xx = np.mgrid[:1024, :1024]
    smooth = np.stack([yy // 4, xx // 4, (yy + xx) // 8], axis=2).astype(np.uint8)
    path = tmp_path / "aperio-like.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(smooth, subifds=1, description="Aperio |MPP = 0.252", **TILED)
        tif.write(_reduced(smooth, 4), subfiletype=1, **TILED)
    with TiffSlideReader(path) as reader:
        assert best_level(reader, 1.0 / 0.252) == 1 and best_level(reader, 3.8) == 0
        plan = plan_tiles(reader, tile=64, overlap=0, target_mpp=1.0)
        assert plan.level == 1 and plan.level_scale == pytest.approx(1 / 1.008)
        tile = read_tile(reader, plan, 64, 128)
        # The same tile read from level 0 and shrunk: on a smooth image they agree closely.
        from_level0 = read_tile(reader, TileGeometry(0, plan.scale, 64, 1), 64, 128)
    assert tile.shape == (64, 64, 3)
    assert np.abs(tile.astype(int) - from_level0.astype(int)).mean() < 2.0


def test_openslide_reads_the_resolution_it_misses_with_tifffile(tmp_path: Path) -> None:
    # A tiled TIFF whose resolution only an Aperio-style description gives: OpenSlide's
    # generic-TIFF driver does not read it.
    pytest.importorskip("openslide")
    from hisynseg.slides.openslide_reader import OpenSlideReader

    path = tmp_path / "generic.tif"
    tifffile.imwrite(path, _image(256, 256), description="Scanner v1|MPP = 0.4990", **TILED)
    with OpenSlideReader(path) as reader:
        assert reader.mpp == pytest.approx(0.499)


def test_the_automatic_output_downsample_divides_any_tile_and_overlap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Huge:  # a slide's geometry, nothing to read
        path = Path("huge.svs")
        dimensions = (100_000, 80_000)
        level_dimensions = ((100_000, 80_000),)
        level_downsamples = (1.0,)
        mpp = 0.5

    plan = plan_tiles(Huge(), tile=500, overlap=50)  # type: ignore[arg-type]
    assert plan.output_downsample == 25  # 4000×3200 px; 10 would leave 80 Mpx
    assert not caplog.records
    plan = plan_tiles(Huge(), tile=512, overlap=30)  # type: ignore[arg-type]
    assert plan.output_downsample == 2  # the largest that divides both
    assert "huge.svs: the output at 50000×40000 px stays above 64 Mpx" in caplog.text


def test_extra_samples_are_read_as_their_tag_says(tmp_path: Path) -> None:
    colour = np.full((16, 16, 3), (180, 60, 150), np.uint8)
    unspecified = np.concatenate([colour, np.zeros((16, 16, 1), np.uint8)], axis=2)
    tifffile.imwrite(tmp_path / "rgbx.tif", unspecified, photometric="rgb", extrasamples=[0])
    with TiffSlideReader(tmp_path / "rgbx.tif") as reader:  # not alpha: dropped
        assert (reader.read_region(0, 0, 0, 16, 16) == (180, 60, 150)).all()
    premultiplied = np.concatenate(
        [(colour.astype(int) * 128 // 255).astype(np.uint8), np.full((16, 16, 1), 128, np.uint8)],
        axis=2,
    )
    tifffile.imwrite(
        tmp_path / "assoc.tif", premultiplied, photometric="rgb", extrasamples=["assocalpha"]
    )
    with TiffSlideReader(tmp_path / "assoc.tif") as reader:  # c·α + 255·(1 − α)
        assert (reader.read_region(0, 0, 0, 16, 16) == (217, 157, 202)).all()


def _drop_first_tile(path: Path) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        tag.overwrite((0, *tag.value[1:]))


def test_tiles_a_file_leaves_out_read_as_glass_whatever_the_colours(tmp_path: Path) -> None:
    palette = np.zeros((3, 256), np.uint16)  # every index black but 1
    palette[:, 1] = (50000, 10000, 40000)
    files = {
        "white.tif": {"data": np.full((64, 64), 30, np.uint8), "photometric": "miniswhite"},
        "palette.tif": {
            "data": np.ones((64, 64), np.uint8),
            "photometric": "palette",
            "colormap": palette,
        },
    }
    for name, options in files.items():
        tifffile.imwrite(tmp_path / name, tile=(32, 32), **options)
        _drop_first_tile(tmp_path / name)
        with TiffSlideReader(tmp_path / name) as reader:
            rgb = reader.read_region(0, 0, 0, 64, 64)
        assert (rgb[:32, :32] == 255).all(), name
        assert (rgb[32:, 32:] < 255).any(axis=-1).all(), name  # the tiles present show


def test_uncompressed_ycbcr_is_converted_to_rgb(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (180, 60, 150)
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycc.tif")  # no compression
    with TiffSlideReader(tmp_path / "ycc.tif") as reader:
        read = reader.read_region(0, 0, 0, 16, 16).astype(int)
    assert np.abs(read - rgb).max() <= 2  # one rounding each way
