"""The image filtering module: metrics, split, best epoch, training, checkpoints, scoring,
and the filter plugged into ``hisynseg synthesize``.

Everything runs on the CPU at 32 px on a toy dataset: a ResNet-18 trains for two epochs
on a few dozen images in a couple of seconds.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hisynseg.cli import main
from hisynseg.datasets.io import list_images, read_rgb
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.datasets.toy import make_toy_dataset
from hisynseg.synthesis import discriminator as disc
from hisynseg.synthesis.bezier import BezierParams
from hisynseg.synthesis.discriminator import (
    FilterError,
    FilterFileError,
    FilterTrainConfig,
    RealnessScorer,
    binary_metrics,
    load_filter,
    preprocess_images,
    save_filter,
    select_best_epoch,
    split_real_fake,
    train_filter,
)
from hisynseg.synthesis.generate import FILTERED_STREAM, generate_one, synthesize
from hisynseg.synthesis.mosaic import MosaicParams
from hisynseg.synthesis.pool import SourcePool

SIZE = 32
TINY = MosaicParams(tile_size=SIZE // 2, output_size=SIZE)


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy LUAD-layout dataset and an unfiltered Mosaic set made from it."""
    base = tmp_path_factory.mktemp("filter")
    toy = make_toy_dataset(
        base / "data",
        "luad-histoseg",
        single_per_class=3,
        multi_train=10,
        num_val=1,
        num_test=1,
        patch_size=SIZE,
    )
    synthesize(toy.root, toy.spec, "mosaic", 12, base / "syn", seed=0, params=TINY, progress=False)
    return {"base": base, "root": toy.root, "syn": base / "syn"}


@pytest.fixture(scope="module")
def trained(problem: dict[str, Path]) -> Path:
    """A filter trained for two epochs through the command line; returns its folder."""
    out = problem["base"] / "filter"
    rc = main(
        [
            "train-filter",
            str(problem["root"]),
            "--dataset",
            "luad-histoseg",
            "--synthetic",
            str(problem["syn"]),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--image-size",
            str(SIZE),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- pure parts


def test_binary_metrics_match_hand_counts() -> None:
    # 4 real, 6 synthetic; predicted: 2 real right, 2 real missed, 1 synthetic called real.
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    m = binary_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    # With synthetic as the positive class: tp 5, fp 2, fn 1.
    m0 = binary_metrics(y_true, y_pred, positive=0)
    assert m0["precision"] == pytest.approx(5 / 7)
    assert m0["recall"] == pytest.approx(5 / 6)


def test_binary_metrics_without_predicted_positives_are_zero_not_nan() -> None:
    m = binary_metrics([1, 0, 0], [0, 0, 0])
    assert m == {"accuracy": pytest.approx(2 / 3), "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_select_best_epoch_takes_highest_val_accuracy_earliest_on_ties() -> None:
    history = [
        {"epoch": 1, "val_accuracy": 0.61, "val_loss": 0.2},
        {"epoch": 2, "val_accuracy": 0.83, "val_loss": 0.9},
        {"epoch": 3, "val_accuracy": 0.55, "val_loss": 0.1},
        {"epoch": 4, "val_accuracy": 0.83, "val_loss": 0.5},
    ]
    assert select_best_epoch(history) == 1
    assert select_best_epoch(history, key="val_loss") == 1
    assert select_best_epoch(history[2:]) == 1
    with pytest.raises(ValueError):
        select_best_epoch([])


def test_split_is_stratified_seeded_and_capped() -> None:
    s = split_real_fake(10, 20, val_fraction=0.2, cap=5, seed=3)
    assert (len(s.val_real), len(s.val_fake)) == (2, 4)
    assert (len(s.train_real), len(s.train_fake)) == (5, 5)
    assert not set(s.train_real) & set(s.val_real)
    assert not set(s.train_fake) & set(s.val_fake)
    again = split_real_fake(10, 20, val_fraction=0.2, cap=5, seed=3)
    assert np.array_equal(s.val_fake, again.val_fake)
    other = split_real_fake(10, 20, val_fraction=0.2, cap=5, seed=4)
    assert not np.array_equal(s.val_fake, other.val_fake)
    uncapped = split_real_fake(10, 20, val_fraction=0.2, cap=None, seed=3)
    assert (len(uncapped.train_real), len(uncapped.train_fake)) == (8, 16)
    with pytest.raises(FilterError, match="at least 2 real"):
        split_real_fake(1, 20)


# ----------------------------------------------------------------------------- training


def test_train_filter_writes_every_file(trained: Path, problem: dict[str, Path]) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"filter.pt", "metrics.csv", "metrics.json", "metrics.png", "filter_config.json"} <= (
        names
    )
    assert not [n for n in names if n.endswith(".tmp")]
    with open(trained / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for key in ("val_accuracy", "val_precision", "val_recall", "val_f1"):
            assert 0.0 <= float(r[key]) <= 1.0
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["positive_class"] == "real"
    assert len(summary["epochs"]) == 2
    assert summary["best_epoch"] == select_best_epoch(summary["epochs"]) + 1
    config = json.loads((trained / "filter_config.json").read_text())
    assert config["method"] == "mosaic"  # read from the set's synthesis.json
    assert config["settings"]["image_size"] == SIZE
    assert config["settings"]["cap"] == 5000  # the paper's cap for LUAD-HistoSeg
    assert config["counts"]["real_total"] == 10  # the multi-label training images
    assert config["counts"]["synthetic_total"] == 12
    assert {"torch", "timm", "hisynseg"} <= set(config["versions"])
    assert (trained / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(trained / "filter.pt", weights_only=True)
    assert ckpt["epoch"] == summary["best_epoch"]
    assert ckpt["dataset"]["name"] == "luad-histoseg"
    assert ckpt["method"] == "mosaic"
    assert ckpt["image_size"] == SIZE
    best = summary["epochs"][summary["best_epoch"] - 1]
    assert ckpt["val_metrics"]["val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_checkpoint_is_the_best_epoch_not_the_last(
    problem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force epoch 1 to look best, so that "keep the last epoch" would be caught.
    accuracies = iter([0.9, 0.4])

    def fake_metrics(y_true, y_pred, positive=1):
        return {"accuracy": next(accuracies), "precision": 0.5, "recall": 0.5, "f1": 0.5}

    monkeypatch.setattr(disc, "binary_metrics", fake_metrics)
    spec = get_dataset_spec("luad-histoseg")
    config = FilterTrainConfig(epochs=2, batch_size=8, image_size=SIZE, device="cpu")
    result = train_filter(
        problem["root"],
        spec,
        problem["syn"],
        tmp_path,
        method="mosaic",
        config=config,
        progress=False,
    )
    assert [e["val_accuracy"] for e in result.history] == [0.9, 0.4]
    assert result.best_epoch == 1
    assert torch.load(tmp_path / "filter.pt", weights_only=True)["epoch"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == 1


def test_train_filter_refuses_a_set_of_another_dataset(
    problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bcss = make_toy_dataset(tmp_path / "bcss", "bcss-wsss", single_per_class=2, multi_train=4)
    rc = main(
        [
            "train-filter",
            str(bcss.root),
            "--dataset",
            "bcss-wsss",
            "--synthetic",
            str(problem["syn"]),
            "--out",
            str(tmp_path / "f"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    assert "luad-histoseg" in capsys.readouterr().err
    assert not (tmp_path / "f" / "filter.pt").exists()


def test_training_images_are_flipped_and_validation_ones_are_not(
    problem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[disc._FileDataset] = []

    class Recording(disc._FileDataset):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    class DatasetsMade(Exception):
        pass

    def stop() -> nn.Module:
        raise DatasetsMade  # the datasets are all this test needs; skip the training

    monkeypatch.setattr(disc, "_FileDataset", Recording)
    monkeypatch.setattr(disc, "build_discriminator", stop)
    config = FilterTrainConfig(epochs=1, batch_size=8, image_size=SIZE, device="cpu")
    spec = get_dataset_spec("luad-histoseg")
    with pytest.raises(DatasetsMade):
        train_filter(
            problem["root"],
            spec,
            problem["syn"],
            tmp_path,
            method="mosaic",
            config=config,
            progress=False,
        )
    train, val = made
    assert set(train.paths).isdisjoint(val.paths)

    def seen_variants(dataset: disc._FileDataset) -> set[str]:
        # A synthetic image whose four flips differ, so each item tells which one it got.
        i = next(k for k, t in enumerate(dataset.targets) if t == disc.FAKE_INDEX)
        plain = preprocess_images([read_rgb(dataset.paths[i])], SIZE)[0]
        variants = {
            "none": plain,
            "horizontal": plain.flip(2),
            "vertical": plain.flip(1),
            "both": plain.flip(1).flip(2),
        }
        assert all(
            not torch.equal(a, b)
            for a in variants.values()
            for b in variants.values()
            if a is not b
        )
        seen = set()
        for _ in range(40):
            x, target, error = dataset[i]
            assert error == "" and target == disc.FAKE_INDEX
            seen |= {name for name, v in variants.items() if torch.equal(x, v)}
        return seen

    assert seen_variants(train) == {"none", "horizontal", "vertical", "both"}
    assert seen_variants(val) == {"none"}


def _train_cli(problem: dict[str, Path], synthetic: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train-filter",
            str(problem["root"]),
            "--dataset",
            "luad-histoseg",
            "--synthetic",
            str(synthetic),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            str(SIZE),
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


# ----------------------------------------------------------------------------- an existing --out


def test_existing_filter_of_another_method_or_settings_is_refused(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "filter"
    shutil.copytree(trained, out)
    before = (out / "filter.pt").read_bytes()
    bezier = tmp_path / "syn-bezier"
    spec = get_dataset_spec("luad-histoseg")
    params = BezierParams(output_size=SIZE)
    synthesize(problem["root"], spec, "bezier", 12, bezier, params=params, progress=False)

    assert _train_cli(problem, bezier, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{out}: holds a filter trained for something else" in err
    assert "method: 'mosaic' -> 'bezier'" in err and "use a new --out" in err
    assert (out / "filter.pt").read_bytes() == before
    # Other settings on the same images are refused as well (the trained one had 2 epochs).
    assert _train_cli(problem, problem["syn"], out) == 2
    assert "epochs: 2 -> 1" in capsys.readouterr().err
    assert (out / "filter.pt").read_bytes() == before

    assert _train_cli(problem, bezier, out, "--overwrite") == 0
    assert torch.load(out / "filter.pt", weights_only=True)["method"] == "bezier"
    assert json.loads((out / "metrics.json").read_text())["method"] == "bezier"


def test_existing_filter_of_another_synthetic_set_is_refused(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "filter"
    shutil.copytree(trained, out)
    other = tmp_path / "syn-seed1"  # same method, other images
    spec = get_dataset_spec("luad-histoseg")
    synthesize(problem["root"], spec, "mosaic", 12, other, seed=1, params=TINY, progress=False)
    assert _train_cli(problem, other, out, "--epochs", "2") == 2
    assert "synthetic images: same count, other files" in capsys.readouterr().err


def test_rerun_with_the_same_settings_keeps_a_finished_filter(
    trained: Path,
    problem: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "filter"
    shutil.copytree(trained, out)
    stamp = (out / "filter.pt").stat().st_mtime_ns
    # Same command; --device and --workers do not change what the filter is.
    assert _train_cli(problem, problem["syn"], out, "--epochs", "2", "--workers", "1") == 0
    assert "already trained with these settings and images" in capsys.readouterr().out
    assert (out / "filter.pt").stat().st_mtime_ns == stamp

    # Interrupted after epoch 1 of 2: trained again from scratch, the old filter.pt gone
    # first (stop at the network's construction: whether it trains is all this asks).
    class TrainingStarted(Exception):
        pass

    def started() -> nn.Module:
        raise TrainingStarted

    metrics = json.loads((out / "metrics.json").read_text())
    metrics["epochs"] = metrics["epochs"][:1]
    (out / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(disc, "build_discriminator", started)
    spec = get_dataset_spec("luad-histoseg")
    config = FilterTrainConfig(epochs=2, batch_size=8, image_size=SIZE, device="cpu")
    with pytest.raises(TrainingStarted):
        train_filter(problem["root"], spec, problem["syn"], out, method="mosaic", config=config)
    assert not (out / "filter.pt").exists() and (out / "filter_config.json").is_file()


def test_existing_filter_without_its_config_is_judged_by_its_metadata(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "filter"
    out.mkdir()
    shutil.copy(trained / "filter.pt", out / "filter.pt")
    assert _train_cli(problem, problem["syn"], out, "--epochs", "2", "--lr", "0.01") == 2
    assert "lr: 0.001 -> 0.01" in capsys.readouterr().err


def test_damaged_images_are_named_in_one_line_before_training(
    problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    syn = tmp_path / "syn"
    shutil.copytree(problem["syn"], syn)
    images = list_images(syn / "img")
    images[0].write_bytes(b"garbage")
    images[3].write_bytes(images[3].read_bytes()[:-30])  # truncated: pixels, no IEND
    assert _train_cli(problem, syn, tmp_path / "f", "--workers", "1") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "2 of the filter's" in err and images[0].name in err and images[3].name in err
    assert not (tmp_path / "f").exists()  # refused before anything was written


def _png_with_broken_pixel_data(size: int) -> bytes:
    """A PNG whose chunks and checksums are intact but whose pixel stream does not inflate:
    it passes the structural check and fails only when decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, "PNG")
    data, out, pos = buf.getvalue(), buf.getvalue()[:8], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x9c" + b"\xff" * 20
        crc = struct.pack(">I", zlib.crc32(kind + body))
        out += struct.pack(">I", len(body)) + kind + body + crc
        pos += 12 + length
    return out


def test_an_image_that_fails_to_decode_in_a_worker_is_one_line(
    problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    syn = tmp_path / "syn"
    shutil.copytree(problem["syn"], syn)
    victim = list_images(syn / "img")[0]
    victim.write_bytes(_png_with_broken_pixel_data(SIZE))
    assert _train_cli(problem, syn, tmp_path / "f", "--workers", "1") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert f"{victim}: corrupt or truncated image" in err


# ----------------------------------------------------------------------------- scoring


def _tiny_scorer(batch_size: int = 64) -> RealnessScorer:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    return RealnessScorer(model, 16, device="cpu", batch_size=batch_size)


def test_scorer_returns_one_probability_per_image() -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 30), (16, 16), (40, 8)]
    ]
    p = _tiny_scorer()(images)
    assert p.shape == (3,)
    assert np.all((p >= 0) & (p <= 1))
    # Batching does not change the scores (eval mode, no cross-image state).
    assert np.allclose(_tiny_scorer(batch_size=2)(images), p)
    stack = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    assert _tiny_scorer()(stack).shape == (5,)
    assert _tiny_scorer()([]).shape == (0,)
    with pytest.raises(ValueError, match="batch"):
        _tiny_scorer()(stack[0])


def test_loaded_filter_scores_images(trained: Path, problem: dict[str, Path]) -> None:
    scorer = load_filter(
        trained / "filter.pt", dataset="luad-histoseg", method="mosaic", device="cpu"
    )
    assert scorer.image_size == SIZE
    assert scorer.method == "mosaic"
    assert not scorer.model.training
    images = [read_rgb(p) for p in list_images(problem["syn"] / "img")[:4]]
    p = scorer(images)
    assert p.shape == (4,)
    assert np.all((p >= 0) & (p <= 1))
    assert "sha256:" in scorer.description


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "not-a-filter", "wrong-weights"],
)
def test_corrupt_filter_file_is_refused(trained: Path, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "filter.pt"
    good = (trained / "filter.pt").read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not-a-filter":
        torch.save({"state_dict": {}}, path)
    else:
        ckpt = torch.load(trained / "filter.pt", weights_only=True)
        ckpt["state_dict"] = {"fc.weight": torch.zeros(2, 3)}
        torch.save(ckpt, path)
    with pytest.raises(FilterFileError, match=str(path).replace("\\", "\\\\")):
        load_filter(path, device="cpu")


def test_filter_of_another_dataset_or_method_is_refused(trained: Path) -> None:
    with pytest.raises(FilterFileError, match="trained on dataset 'luad-histoseg'"):
        load_filter(trained / "filter.pt", dataset="bcss-wsss", device="cpu")
    with pytest.raises(FilterFileError, match="'mosaic' images, not 'bezier'"):
        load_filter(trained / "filter.pt", method="bezier", device="cpu")
    with pytest.raises(FilterFileError, match="not found"):
        load_filter(trained / "missing.pt", device="cpu")


def test_save_then_load_round_trips_the_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = disc.build_discriminator()
    spec = get_dataset_spec("wsss4luad")
    save_filter(
        tmp_path / "f.pt",
        model,
        spec=spec,
        method="bezier",
        image_size=SIZE,
        epoch=3,
        val_metrics={"val_accuracy": 0.5},
    )
    scorer = load_filter(tmp_path / "f.pt", dataset=spec, method="bezier", device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    direct = RealnessScorer(model, SIZE, device="cpu")(images)
    assert np.allclose(scorer(images), direct, atol=1e-6)
    assert scorer.metadata["epoch"] == 3


# ----------------------------------------------------------------------------- synthesize --filter


def _synthesize_cli(
    problem: dict[str, Path], out: Path, *extra: str, method: str = "mosaic"
) -> int:
    size_flags = ["--output-size", str(SIZE)]
    if method == "mosaic":
        size_flags += ["--tile-size", str(SIZE // 2)]
    return main(
        [
            "synthesize",
            str(problem["root"]),
            "--dataset",
            "luad-histoseg",
            "--method",
            method,
            "--out",
            str(out),
            "--no-progress",
            "--filter-device",
            "cpu",
            *size_flags,
            *extra,
        ]
    )


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_synthesize_with_a_filter_that_keeps_everything(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kept"
    rc = _synthesize_cli(
        problem, out, "--num", "5", "--filter", str(trained / "filter.pt"), "--keep-threshold", "0"
    )
    assert rc == 0
    assert "kept 5 of " in capsys.readouterr().out
    rows = _manifest(out)
    assert [int(r["index"]) for r in rows] == list(range(5))
    scorer = load_filter(trained / "filter.pt", device="cpu")
    images = [read_rgb(out / "img" / r["image"]) for r in rows]
    recorded = np.array([float(r["score"]) for r in rows])
    # The manifest records each kept image's p(real), as the filter scores the written file.
    assert np.allclose(recorded, scorer(images), atol=2e-6)
    stats = json.loads((out / "synthesis.json").read_text())["filter_stats"]
    assert stats["kept"] == 5
    assert stats["acceptance_rate"] == pytest.approx(5 / stats["draws"])


def test_synthesize_keeps_only_images_above_the_threshold(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = get_dataset_spec("luad-histoseg")
    pool = SourcePool.build(problem["root"], spec, progress=False)
    scorer = load_filter(trained / "filter.pt", device="cpu")
    draws = [generate_one(pool, "mosaic", TINY, 0, j, FILTERED_STREAM).image for j in range(12)]
    scores = scorer(draws)
    ranked = np.sort(scores)
    assert ranked[6] - ranked[5] > 1e-4  # a threshold clear of every score
    threshold = float(ranked[5] + ranked[6]) / 2
    expected = [j for j in range(12) if scores[j] > threshold]
    assert len(expected) == 6 and expected != list(range(6))  # some draws must be dropped
    out = tmp_path / "half"
    rc = _synthesize_cli(
        problem,
        out,
        "--num",
        "6",
        "--filter",
        str(trained / "filter.pt"),
        "--keep-threshold",
        str(threshold),
        "--max-draws",
        "12",
    )
    assert rc == 0
    assert f"kept 6 of {expected[-1] + 1} draws" in capsys.readouterr().out
    rows = _manifest(out)
    assert [int(r["draw"]) for r in rows] == expected
    assert np.allclose([float(r["score"]) for r in rows], scores[expected], atol=2e-6)


def test_synthesize_with_a_filter_that_keeps_nothing_stops_at_max_draws(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "none"
    rc = _synthesize_cli(
        problem,
        out,
        "--num",
        "4",
        "--filter",
        str(trained / "filter.pt"),
        "--keep-threshold",
        "1",
        "--max-draws",
        "10",
    )
    assert rc != 0
    captured = capsys.readouterr()
    assert "kept 0 of 10 draws" in captured.out
    assert "stopped after 10 draws" in captured.err
    assert _manifest(out) == []
    assert list_images(out / "img") == []
    assert json.loads((out / "synthesis.json").read_text())["filter_stats"]["draws"] == 10


def test_synthesize_refuses_a_bad_filter(
    trained: Path, problem: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    assert _synthesize_cli(problem, tmp_path / "a", "--num", "2", "--filter", str(corrupt)) == 2
    assert "corrupt.pt: not a readable filter checkpoint" in capsys.readouterr().err
    # A Mosaic filter does not judge Bézier images.
    rc = _synthesize_cli(
        problem,
        tmp_path / "b",
        "--num",
        "2",
        "--filter",
        str(trained / "filter.pt"),
        method="bezier",
    )
    assert rc == 2
    assert "not 'bezier'" in capsys.readouterr().err
    assert _synthesize_cli(problem, tmp_path / "c", "--num", "2", "--max-draws", "5") == 2
    assert "--max-draws needs --filter" in capsys.readouterr().err
