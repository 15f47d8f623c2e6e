"""Writing synthesized sets: layouts, labels, determinism, resume, refusal, filter, CLI."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hisynseg.cli import main
from hisynseg.datasets.io import ImageReadError, read_mask, read_rgb
from hisynseg.datasets.layouts import list_synthetic
from hisynseg.datasets.toy import ToyDataset, make_toy_dataset
from hisynseg.synthesis.bezier import BezierParams
from hisynseg.synthesis.generate import (
    FILTERED_STREAM,
    JOURNAL_FILE,
    MANIFEST_FILE,
    SETTINGS_FILE,
    encode_image_png,
    generate_one,
    synthesize,
)
from hisynseg.synthesis.mosaic import MosaicParams
from hisynseg.synthesis.pool import SourcePool, SynthesisError

LAYOUTS = ("luad-histoseg", "bcss-wsss", "wsss4luad", "generic")
SMALL = {
    "mosaic": MosaicParams(tile_size=32, output_size=64),
    "bezier": BezierParams(output_size=64),
}


def small(method: str, toy: ToyDataset) -> MosaicParams | BezierParams:
    if method == "bezier" and toy.spec.name == "wsss4luad":
        return BezierParams(output_size=64, pairs=((0, 1), (1, 0)))
    return SMALL[method]


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ToyDataset]:
    return {
        name: make_toy_dataset(
            tmp_path_factory.mktemp(name),
            name,
            single_per_class=3,
            multi_train=2,
            num_val=0,
            num_test=0,
            patch_size=64,
            seed=1,
        )
        for name in LAYOUTS
    }


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for sub in ("img", "mask")
        for p in sorted((out / sub).iterdir())
    }


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with open(out / MANIFEST_FILE, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["mosaic", "bezier"])
def test_outputs_read_back_with_truthful_labels(
    toys: dict[str, ToyDataset], layout: str, method: str, tmp_path: Path
) -> None:
    toy = toys[layout]
    spec = toy.spec
    out = tmp_path / "syn"
    summary = synthesize(toy.root, spec, method, 6, out, params=small(method, toy), progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (6, 0, [])

    items = list_synthetic(out, spec)  # labels parsed back from names (or labels.csv)
    assert len(items) == 6
    rows = {r["image"]: r for r in manifest_rows(out)}
    for sample, mask_path in items:
        name = sample.path.name
        assert name.startswith(f"{method}_")
        if spec.codec is not None:
            assert (spec.parse_label(name) == sample.label).all()
        with Image.open(mask_path) as m:
            assert m.mode == "P"
            assert m.getpalette()[: 3 * len(spec.palette)] == [
                c for rgb in spec.palette for c in rgb
            ]
        mask = read_mask(mask_path)
        image = read_rgb(sample.path)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert (spec.labels_from_mask(mask) == sample.label).all()
        assert sample.label.sum() >= 1
        row = rows[name]
        assert row["label"] == "".join(str(v) for v in sample.label)
        sources = row["sources"].split(";")
        assert len(sources) == (16 if method == "mosaic" else 2)
        assert all((toy.root / s).is_file() for s in sources)
        assert row["seed"] == "0" and row["score"] == ""
    assert sorted(int(r["index"]) for r in rows.values()) == list(range(6))
    assert (out / "labels.csv").is_file() == (spec.codec is None)

    meta = json.loads((out / SETTINGS_FILE).read_text())
    assert meta["settings"]["method"] == method
    assert meta["settings"]["dataset"]["name"] == spec.name
    assert meta["settings"]["params"]["output_size"] == 64
    assert {"numpy", "opencv", "pillow", "hisynseg"} <= set(meta["versions"])
    assert meta["num"] == 6


@pytest.mark.parametrize("method", ["mosaic", "bezier"])
def test_worker_count_does_not_change_a_byte(
    toys: dict[str, ToyDataset], method: str, tmp_path: Path
) -> None:
    toy = toys["wsss4luad"]
    params = small(method, toy)
    one = synthesize(
        toy.root,
        toy.spec,
        method,
        10,
        tmp_path / "w1",
        seed=3,
        workers=1,
        params=params,
        progress=False,
    )
    two = synthesize(
        toy.root,
        toy.spec,
        method,
        10,
        tmp_path / "w2",
        seed=3,
        workers=2,
        params=params,
        progress=False,
    )
    assert one.written == two.written == 10
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")
    assert (tmp_path / "w1" / MANIFEST_FILE).read_bytes() == (
        tmp_path / "w2" / MANIFEST_FILE
    ).read_bytes()
    other = synthesize(
        toy.root, toy.spec, method, 10, tmp_path / "s4", seed=4, params=params, progress=False
    )
    assert other.written == 10
    assert folder_bytes(tmp_path / "s4") != folder_bytes(tmp_path / "w1")


def test_resume_regenerates_exactly_what_is_missing(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    toy = toys["luad-histoseg"]
    out = tmp_path / "syn"
    params = small("bezier", toy)
    synthesize(toy.root, toy.spec, "bezier", 8, out, params=params, progress=False)
    before = folder_bytes(out)
    manifest_before = (out / MANIFEST_FILE).read_bytes()
    images = sorted((out / "img").iterdir())
    masks = sorted((out / "mask").iterdir())
    images[1].unlink()  # image gone, mask left
    masks[4].unlink()  # mask gone, image left
    images[6].unlink()
    masks[6].unlink()
    gone = {images[1].name, images[4].name, images[6].name}
    mtimes = {
        p: p.stat().st_mtime_ns
        for sub in ("img", "mask")
        for p in (out / sub).iterdir()
        if p.name not in gone
    }
    (out / JOURNAL_FILE).unlink()  # records of untouched images are recomputed, not rewritten

    summary = synthesize(
        toy.root, toy.spec, "bezier", 8, out, params=params, workers=2, progress=False
    )
    assert (summary.written, summary.skipped, summary.failed) == (3, 5, [])
    assert folder_bytes(out) == before
    assert (out / MANIFEST_FILE).read_bytes() == manifest_before
    for path, mtime in mtimes.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"

    again = synthesize(toy.root, toy.spec, "bezier", 10, out, params=params, progress=False)
    assert (again.written, again.skipped) == (2, 8)
    assert len(manifest_rows(out)) == 10


def test_other_settings_are_refused(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    toy = toys["bcss-wsss"]
    out = tmp_path / "syn"
    params = small("mosaic", toy)
    synthesize(toy.root, toy.spec, "mosaic", 3, out, params=params, progress=False)
    with pytest.raises(SynthesisError, match="different settings.*seed"):
        synthesize(toy.root, toy.spec, "mosaic", 3, out, seed=1, params=params, progress=False)
    with pytest.raises(SynthesisError, match="different settings.*flip_p"):
        synthesize(
            toy.root,
            toy.spec,
            "mosaic",
            3,
            out,
            params=MosaicParams(tile_size=32, output_size=64, flip_p=0.5),
            progress=False,
        )
    with pytest.raises(SynthesisError, match="different settings.*method"):
        synthesize(toy.root, toy.spec, "bezier", 3, out, params=SMALL["bezier"], progress=False)
    with pytest.raises(SynthesisError, match="compress_level"):
        synthesize(
            toy.root, toy.spec, "mosaic", 3, out, params=params, progress=False, compress_level=1
        )
    # Same settings, more images: fine.
    assert (
        synthesize(toy.root, toy.spec, "mosaic", 4, out, params=params, progress=False).written == 1
    )

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthesisError, match="not empty"):
        synthesize(toy.root, toy.spec, "mosaic", 3, foreign, params=params, progress=False)


def test_changed_sources_are_refused(tmp_path: Path) -> None:
    toy = make_toy_dataset(
        tmp_path / "data",
        "luad-histoseg",
        single_per_class=2,
        multi_train=0,
        num_val=0,
        num_test=0,
        patch_size=64,
    )
    out = tmp_path / "syn"
    synthesize(toy.root, toy.spec, "bezier", 2, out, params=SMALL["bezier"], progress=False)
    extra = next((toy.root / "train").iterdir())
    (toy.root / "train" / extra.name.replace("-", "-9", 1)).write_bytes(extra.read_bytes())
    with pytest.raises(SynthesisError, match="sources"):
        synthesize(toy.root, toy.spec, "bezier", 2, out, params=SMALL["bezier"], progress=False)


def test_corrupt_source_is_named(tmp_path: Path) -> None:
    toy = make_toy_dataset(
        tmp_path / "data",
        "wsss4luad",
        single_per_class=2,
        multi_train=0,
        num_val=0,
        num_test=0,
        patch_size=64,
    )
    victim = sorted((toy.root / "1.training").iterdir())[2]
    intact = victim.read_bytes()
    victim.write_bytes(intact[:100])
    out = tmp_path / "syn"
    with pytest.raises(ImageReadError, match=victim.name.replace("[", r"\[")):
        synthesize(toy.root, toy.spec, "mosaic", 2, out, params=SMALL["mosaic"], progress=False)
    # The output folders made before decoding do not make the folder "not empty" later.
    victim.write_bytes(intact)
    s = synthesize(toy.root, toy.spec, "mosaic", 2, out, params=SMALL["mosaic"], progress=False)
    assert s.written == 2


def test_unusable_output_folder_is_one_error_before_decoding(
    toys: dict[str, ToyDataset],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    toy = toys["luad-histoseg"]
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "syn"

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sources were decoded before the output folder was checked")

    monkeypatch.setattr(SourcePool, "build", no_decoding)
    with pytest.raises(SynthesisError, match="afile/syn: cannot create the output folder"):
        synthesize(toy.root, toy.spec, "mosaic", 1, out, params=SMALL["mosaic"], progress=False)
    argv = ["synthesize", str(toy.root), "--dataset", "luad-histoseg", "--method", "bezier"]
    assert main([*argv, "--num", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot create the output folder" in err


def test_failed_items_are_reported_and_the_rest_written(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    toy = toys["luad-histoseg"]
    # One shape per draw; those below 30 % foreground fail, the others are written.
    params = BezierParams(output_size=64, foreground_share=(0.3, 1.0), max_shape_draws=1)
    summary = synthesize(
        toy.root, toy.spec, "bezier", 20, tmp_path / "syn", params=params, workers=2, progress=False
    )
    assert summary.failed and summary.written
    assert summary.written + len(summary.failed) == 20
    assert all("foreground share" in message for _, message in summary.failed)
    failed = {draw for draw, _ in summary.failed}
    assert {int(r["index"]) for r in manifest_rows(tmp_path / "syn")} == set(range(20)) - failed


def test_keep_filter_with_a_predicate(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    toy = toys["luad-histoseg"]
    calls = []

    def has_tumour(images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        assert images.shape[1:] == (64, 64, 3) and masks.shape[1:] == (64, 64)
        return labels[:, 0] == 1

    params = small("bezier", toy)
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        s = synthesize(
            toy.root,
            toy.spec,
            "bezier",
            12,
            out,
            params=params,
            keep=has_tumour,
            batch_size=8,
            workers=workers,
            progress=False,
        )
        runs.append(s)
        assert s.kept == s.written == 12 and s.stopped is None
        assert max(calls) <= 8 and sum(calls) >= s.draws
        rows = manifest_rows(out)
        assert [int(r["index"]) for r in rows] == list(range(12))
        # The kept draws are exactly the first 12 draws the predicate accepts.
        draws = [int(r["draw"]) for r in rows]
        accepted = [
            j
            for j in range(s.draws)
            if toy.spec.labels_from_mask(
                generate_one(pool, "bezier", params, 0, j, FILTERED_STREAM).mask
            )[0]
        ]
        assert draws == accepted and s.draws == draws[-1] + 1
        assert s.acceptance_rate == pytest.approx(12 / s.draws) and s.acceptance_rate < 1
        calls.clear()
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")
    meta = json.loads((tmp_path / "w1" / SETTINGS_FILE).read_text())
    assert meta["settings"]["filter"]["keep"].endswith("has_tumour")
    assert meta["filter_stats"]["kept"] == 12

    # Resume: a deleted kept image comes back byte-identical from its recorded draw.
    before = folder_bytes(tmp_path / "w1")
    victim = sorted((tmp_path / "w1" / "img").iterdir())[5]
    victim.unlink()
    s = synthesize(
        toy.root,
        toy.spec,
        "bezier",
        12,
        tmp_path / "w1",
        params=params,
        keep=has_tumour,
        batch_size=8,
        progress=False,
    )
    assert (s.written, s.skipped) == (1, 11)
    assert folder_bytes(tmp_path / "w1") == before


def test_filtered_set_survives_delete_shrink_regrow(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    """A kept image deleted beyond a smaller --num still comes back from its own draw."""
    toy = toys["luad-histoseg"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    out = tmp_path / "f"

    def run(num: int) -> None:
        synthesize(
            None,
            toy.spec,
            "mosaic",
            num,
            out,
            params=small("mosaic", toy),
            pool=pool,
            keep=lambda images, masks, labels: labels[:, 0] == 1,
            batch_size=4,
            progress=False,
        )

    run(12)
    before, rows_before = folder_bytes(out), manifest_rows(out)
    assert [int(r["draw"]) for r in rows_before] != list(range(12))  # some draws dropped
    for sub in ("img", "mask"):
        next((out / sub).glob("mosaic_000010*")).unlink()
    run(5)
    run(12)
    assert manifest_rows(out) == rows_before
    assert folder_bytes(out) == before


def test_filtered_images_are_fresh_draws_not_the_unfiltered_ones(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    """The discriminator learnt the unfiltered set of a seed: filtering must not reuse it."""
    toy = toys["luad-histoseg"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    params = small("mosaic", toy)
    common = dict(seed=3, params=params, pool=pool, progress=False)
    synthesize(None, toy.spec, "mosaic", 16, tmp_path / "plain", **common)
    synthesize(
        None,
        toy.spec,
        "mosaic",
        16,
        tmp_path / "kept",
        keep=lambda images, masks, labels: np.ones(len(images), dtype=bool),
        batch_size=8,
        **common,
    )
    plain = {p.read_bytes() for p in (tmp_path / "plain" / "img").iterdir()}
    kept = {p.read_bytes() for p in (tmp_path / "kept" / "img").iterdir()}
    assert len(plain) == len(kept) == 16
    assert not plain & kept


def test_keep_filter_scores_threshold_and_max_draws(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    toy = toys["generic"]

    def p_real(images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return (masks == 0).mean(axis=(1, 2))  # share of class 0 as a stand-in score

    out = tmp_path / "scored"
    s = synthesize(
        toy.root,
        toy.spec,
        "mosaic",
        5,
        out,
        params=small("mosaic", toy),
        keep=p_real,
        keep_threshold=0.3,
        batch_size=4,
        progress=False,
    )
    assert s.kept == 5
    for row in manifest_rows(out):
        mask = read_mask(out / "mask" / row["image"])
        assert float(row["score"]) == pytest.approx((mask == 0).mean(), abs=1e-6)
        assert float(row["score"]) > 0.3
    assert len(list_synthetic(out, toy.spec)) == 5

    def never(images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.zeros(len(images), bool)

    s = synthesize(
        toy.root,
        toy.spec,
        "mosaic",
        5,
        tmp_path / "never",
        params=small("mosaic", toy),
        keep=never,
        batch_size=4,
        max_draws=10,
        progress=False,
    )
    assert s.kept == 0 and s.draws == 10 and "max_draws" in (s.stopped or "")

    def wrong_shape(images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.ones(3)

    with pytest.raises(SynthesisError, match="one boolean or score per image"):
        synthesize(
            toy.root,
            toy.spec,
            "mosaic",
            5,
            tmp_path / "bad",
            params=small("mosaic", toy),
            keep=wrong_shape,
            batch_size=4,
            progress=False,
        )


def test_prebuilt_pool_and_bad_arguments(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    toy = toys["luad-histoseg"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    s = synthesize(
        None,
        toy.spec,
        "mosaic",
        2,
        tmp_path / "a",
        params=SMALL["mosaic"],
        pool=pool,
        progress=False,
    )
    assert s.written == 2
    with pytest.raises(SynthesisError, match="method"):
        synthesize(toy.root, toy.spec, "cutmix", 2, tmp_path / "b", progress=False)
    with pytest.raises(SynthesisError, match="BezierParams"):
        synthesize(
            toy.root, toy.spec, "bezier", 2, tmp_path / "c", params=SMALL["mosaic"], progress=False
        )
    with pytest.raises(SynthesisError, match="outside"):
        synthesize(
            toy.root,
            toy.spec,
            "bezier",
            2,
            tmp_path / "d",
            params=BezierParams(output_size=64, pairs=((0, 7),)),
            progress=False,
        )


def test_synthesis_does_not_import_torch() -> None:
    code = (
        "import sys, hisynseg.synthesis, hisynseg.synthesis.generate, hisynseg.cli.synthesize;"
        "bad = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli(toys: dict[str, ToyDataset], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toy = toys["wsss4luad"]
    out = tmp_path / "cli"
    argv = [
        "synthesize",
        str(toy.root),
        "--dataset",
        "wsss4luad",
        "--method",
        "bezier",
        "--num",
        "4",
        "--out",
        str(out),
        "--output-size",
        "64",
        "--pairs",
        "0,1;1,0",
        "--rad",
        "0.3",
        "--no-progress",
        "--workers",
        "2",
        "--compress-level",
        "1",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 written, 0 skipped (already present), 0 failed" in text
    params = json.loads((out / SETTINGS_FILE).read_text())["settings"]["params"]
    assert params["rad"] == 0.3 and params["pairs"] == [[0, 1], [1, 0]]
    assert main(argv) == 0
    assert "0 written, 4 skipped" in capsys.readouterr().out
    fewer = [*argv[: argv.index("--num") + 1], "2", *argv[argv.index("--num") + 2 :]]
    assert main(fewer) == 0
    assert f"{out} holds 4 images (more than --num 2" in capsys.readouterr().out

    assert main([*argv, "--seed", "9"]) == 2
    assert "different settings" in capsys.readouterr().err
    default_png = tmp_path / "default-png"
    assert main([*argv, "--out", str(default_png), "--png-strategy", "default"]) == 0
    capsys.readouterr()
    assert json.loads((default_png / SETTINGS_FILE).read_text())["settings"]["png_strategy"] == (
        "default"
    )
    bad = [
        "synthesize",
        str(toy.root),
        "--dataset",
        "wsss4luad",
        "--method",
        "mosaic",
        "--num",
        "1",
        "--out",
        str(tmp_path / "x"),
        "--rad",
        "0.3",
    ]
    assert main(bad) == 2
    assert "--rad applies to --method bezier only" in capsys.readouterr().err
    bad = [
        "synthesize",
        str(toy.root),
        "--dataset",
        "nope",
        "--method",
        "mosaic",
        "--num",
        "1",
        "--out",
        str(tmp_path / "y"),
    ]
    assert main(bad) == 2
    assert "unknown dataset" in capsys.readouterr().err
    bad = [
        "synthesize",
        str(toy.root),
        "--dataset",
        "wsss4luad",
        "--method",
        "mosaic",
        "--num",
        "1",
        "--out",
        str(tmp_path / "z"),
        "--tile-size",
        "10",
    ]
    assert main(bad) == 2
    assert "output_size" in capsys.readouterr().err


def test_spawn_workers_give_the_same_bytes(
    toys: dict[str, ToyDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fork is unavailable, spawned workers rebuild the pool and match byte for byte."""
    import hisynseg.synthesis.generate as generate

    toy = toys["generic"]
    params = small("mosaic", toy)
    synthesize(toy.root, toy.spec, "mosaic", 4, tmp_path / "fork", params=params, progress=False)
    monkeypatch.setattr(generate.mp, "get_all_start_methods", lambda: ["spawn"])
    s = synthesize(
        toy.root,
        toy.spec,
        "mosaic",
        4,
        tmp_path / "spawn",
        params=params,
        workers=2,
        progress=False,
    )
    assert s.written == 4
    assert folder_bytes(tmp_path / "spawn") == folder_bytes(tmp_path / "fork")


def test_written_pixels_are_the_generated_ones(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    """Both PNG strategies store exactly the in-memory sample."""
    toy = toys["bcss-wsss"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    params = small("mosaic", toy)
    for strategy in ("rle", "default"):
        out = tmp_path / strategy
        synthesize(
            None,
            toy.spec,
            "mosaic",
            3,
            out,
            seed=2,
            params=params,
            pool=pool,
            png_strategy=strategy,
            progress=False,
        )
        for row in manifest_rows(out):
            sample = generate_one(pool, "mosaic", params, 2, int(row["draw"]))
            assert (read_rgb(out / "img" / row["image"]) == sample.image).all()
            assert (read_mask(out / "mask" / row["image"]) == sample.mask).all()
    with pytest.raises(SynthesisError, match="png_strategy"):
        synthesize(
            None,
            toy.spec,
            "mosaic",
            3,
            tmp_path / "rle",
            seed=2,
            params=params,
            pool=pool,
            png_strategy="default",
            progress=False,
        )
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for strategy in ("rle", "default"):
        png = encode_image_png(image, 6, strategy)
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "RGB" and (np.asarray(im) == image).all()


def test_max_draws_stop_advises_what_works(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    """The stop message's advice holds: a higher max_draws continues the same set, and a
    lower threshold (another set) is refused in that folder, so it asks for a new one."""
    toy = toys["generic"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    out = tmp_path / "strict"

    def share_of_class_0(images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return (masks == 0).mean(axis=(1, 2))

    def run(max_draws: int, threshold: float = -1.0, folder: Path = out):
        return synthesize(
            None,
            toy.spec,
            "mosaic",
            3,
            folder,
            params=small("mosaic", toy),
            pool=pool,
            keep=share_of_class_0,
            keep_threshold=threshold,
            batch_size=4,
            max_draws=max_draws,
            progress=False,
        )

    stopped = run(2).stopped or ""  # every draw is kept (share > -1), but only 2 are made
    assert "stopped after 2 draws" in stopped and "with 2 of 3 images kept" in stopped
    assert "re-run the same command with a higher --max-draws" in stopped
    assert "--keep-threshold" in stopped and "new --out folder" in stopped
    assert "lower the threshold and re-run" not in stopped
    assert run(10).draws == 3  # the same command with more draws goes on where it stopped
    with pytest.raises(SynthesisError, match="different settings.*threshold"):
        run(10, threshold=0.1)
    # A filter that keeps nothing: more draws would be wasted, and the advice says so.
    stopped = run(6, threshold=2.0, folder=tmp_path / "none").stopped or ""
    assert "with 0 of 3 images kept" in stopped and "more draws will hardly help" in stopped
    assert "higher --max-draws" not in stopped


def test_settings_record_what_the_folder_holds(toys: dict[str, ToyDataset], tmp_path: Path) -> None:
    toy = toys["luad-histoseg"]
    out = tmp_path / "n"
    params = small("bezier", toy)
    synthesize(toy.root, toy.spec, "bezier", 8, out, params=params, progress=False)
    again = synthesize(toy.root, toy.spec, "bezier", 3, out, params=params, progress=False)
    assert (again.written, again.skipped) == (0, 3)
    meta = json.loads((out / SETTINGS_FILE).read_text())
    # The smaller request leaves all 8 images, which train and train-filter then use.
    assert len(manifest_rows(out)) == len(list((out / "img").iterdir())) == 8
    assert (meta["num"], meta["requested"]) == (8, 3)


def test_a_second_writer_is_refused_and_killed_writes_are_cleared(
    toys: dict[str, ToyDataset], tmp_path: Path
) -> None:
    import fcntl

    from hisynseg.synthesis.generate import LOCK_FILE

    toy = toys["luad-histoseg"]
    pool = SourcePool.build(toy.root, toy.spec, progress=False)
    out = tmp_path / "syn"
    common = dict(params=small("mosaic", toy), pool=pool, progress=False)
    synthesize(None, toy.spec, "mosaic", 3, out, **common)
    # What a worker killed mid-write leaves: atomic_path's temporary files.
    leftovers = [out / "img" / ".mosaic_000009.png.abc123.tmp", out / "mask" / ".x.png.q.tmp"]
    leftovers.append(out / ".manifest.csv.z9.tmp")
    for path in leftovers:
        path.write_bytes(b"partial")
    with open(out / LOCK_FILE, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SynthesisError, match="another synthesis is writing"):
            synthesize(None, toy.spec, "mosaic", 4, out, **common)
        assert all(path.exists() for path in leftovers)  # not another run's to remove
    summary = synthesize(None, toy.spec, "mosaic", 4, out, **common)
    assert summary.written == 1 and summary.skipped == 3
    assert not any(path.exists() for path in leftovers)
    # A folder it cannot write the lock in (read-only; here: the name is taken) is one line.
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).mkdir()
    with pytest.raises(SynthesisError, match="cannot write in the output folder"):
        synthesize(None, toy.spec, "mosaic", 4, out, **common)
