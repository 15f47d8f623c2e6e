"""``hisynseg demo``: CAM-to-mask, the baselines, and the whole run on a tiny fake dataset.

The fake demo dataset is built by :func:`build_demo_dataset` from two small generated
"slides" with textured classes and hand-made annotations, so that nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hisynseg.datasets import io as dataset_io
from hisynseg.datasets.io import read_mask
from hisynseg.datasets.toy import render_texture
from hisynseg.demo import baselines
from hisynseg.demo.baselines import (
    GATED_SCORE,
    BaselineError,
    BaselineSettings,
    CamPredictor,
    cam_to_scores,
    load_baseline_predictor,
    train_baseline,
)
from hisynseg.demo.build import TRAIN_MASKS_DIR, DemoSettings, build_demo_dataset
from hisynseg.demo.run import METHOD_LABELS, DemoError, run_demo
from hisynseg.models import build_segmenter
from test_demo_data import _feature, _square

CLASSES = ("tumour epithelium", "stroma", "lymphocytes", "epidermis")
SMALL = DemoSettings(patch_size=32, eval_size=64, gap=4)

# CPU-sized recipe: 32 px patches, a handful of synthetic images, one-epoch models.
TINY = [
    "synthesis.unfiltered=12",
    "synthesis.num=8",
    "synthesis.workers=1",
    "synthesis.mosaic.tile_size=16",
    "synthesis.mosaic.output_size=32",
    "synthesis.bezier.output_size=32",
    "filter.epochs=1",
    "filter.batch_size=16",
    "filter.image_size=32",
    "filter.keep_threshold=0",
    "train.data.patch_size=32",
    "train.data.batch_size_synthetic=4",
    "train.data.batch_size_real=4",
    "train.data.val_batch_size=4",
    "train.trainer.epochs=1",
    "train.trainer.progress_bar=false",
    "train.trainer.log_every_n_steps=1",
    "stage2.epochs=1",
    "stage2.tta=null",
    "evaluation.tta=null",
]


def _fake_sources() -> tuple[dict[str, np.ndarray], dict]:
    """Image "a" (224×256): TE | STR | LYM columns, val region at the bottom; image "b"
    (192×224): STR | EPI, test region at the top."""
    rng = np.random.default_rng(0)
    a = np.empty((224, 256, 3), np.uint8)
    a[:, :112] = render_texture(0, (224, 112), rng)
    a[:, 112:184] = render_texture(1, (224, 72), rng)
    a[:, 184:] = render_texture(2, (224, 72), rng)
    b = np.empty((192, 224, 3), np.uint8)
    b[:, :112] = render_texture(1, (192, 112), rng)
    b[:, 112:] = render_texture(3, (192, 112), rng)
    features = [
        _feature("a", _square(0, 0, 112, 224), **{"class": "tumour epithelium"}),
        _feature("a", _square(112, 0, 184, 224), **{"class": "stroma"}),
        _feature("a", _square(184, 0, 256, 224), **{"class": "lymphocytes"}),
        _feature("a", _square(0, 160, 256, 224), split="val"),
        _feature("b", _square(0, 0, 112, 192), **{"class": "stroma"}),
        _feature("b", _square(112, 0, 224, 192), **{"class": "epidermis"}),
        _feature("b", _square(0, 0, 224, 64), split="test"),
    ]
    return {"a": a, "b": b}, {"type": "FeatureCollection", "features": features}


@pytest.fixture(scope="module")
def fake_demo(tmp_path_factory: pytest.TempPathFactory):
    images, annotations = _fake_sources()
    root = tmp_path_factory.mktemp("demo") / "data"
    return build_demo_dataset(root, settings=SMALL, annotations=annotations, images=images)


# --------------------------------------------------------------------------- CAM to mask


def test_cam_to_scores_takes_the_argmax_of_the_upsampled_cam() -> None:
    # Class 0 strong on the left column, class 1 on the right, class 2 weak everywhere.
    cam = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]], [[-4.0, 4.0], [-4.0, 4.0]], [[1.0] * 2] * 2]])
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    scores = cam_to_scores(cam, logits, (4, 4), gate=False)
    assert scores.shape == (1, 3, 4, 4)
    expected = torch.tensor([[0, 0, 1, 1]] * 4)
    assert torch.equal(scores.argmax(1)[0], expected)
    # Bilinear, not nearest: the scores vary smoothly between the two CAM columns.
    assert scores[0, 0, 0, 0] > scores[0, 0, 0, 1] > scores[0, 0, 0, 2] > scores[0, 0, 0, 3]


def test_cam_gate_keeps_only_classes_the_classifier_predicts() -> None:
    cam = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]], [[-4.0, 4.0], [-4.0, 4.0]], [[1.0] * 2] * 2]])
    # Class 1 is ruled out by its image-level logit (sigmoid < 0.5): its column goes to
    # the next best class, 2.
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    scores = cam_to_scores(cam, logits, (2, 2), gate=True)
    assert torch.equal(scores.argmax(1)[0], torch.tensor([[0, 2], [0, 2]]))
    assert bool((scores[0, 1] == GATED_SCORE).all())
    # Nothing above 0.5: the top-scoring class is kept, so every pixel still gets a class.
    scores = cam_to_scores(cam, torch.tensor([[-3.0, -1.0, -2.0]]), (2, 2), gate=True)
    assert bool((scores.argmax(1) == 1).all())


def test_cam_predictor_gives_scores_at_the_image_size() -> None:
    net = build_segmenter("resnet18", num_classes=4).eval()
    with torch.no_grad():
        scores = CamPredictor(net)(torch.randn(2, 3, 64, 96))
    assert scores.shape == (2, 4, 64, 96)


# --------------------------------------------------------------------------- baselines


def _settings(kind: str, **kw) -> BaselineSettings:
    return BaselineSettings(kind=kind, steps=2, batch_size=4, val_every=1, patch_size=32, **kw)


def test_cam_baseline_never_reads_pixel_masks(fake_demo, tmp_path, monkeypatch) -> None:
    root = fake_demo.root
    assert any((root / TRAIN_MASKS_DIR).iterdir())  # the masks are there to be (not) read
    opened: list[Path] = []
    original = dataset_io._open_image

    def spy(path):
        opened.append(Path(path).resolve())
        return original(path)

    monkeypatch.setattr(dataset_io, "_open_image", spy)
    result = train_baseline(
        _settings("cam"), root, fake_demo.spec, tmp_path / "cam", progress=False
    )
    assert result.best_checkpoint.is_file() and result.images_seen == 8
    read = {p.parent.relative_to(root.resolve()).as_posix() for p in opened}
    # Training images and the validation split (for checkpoint choice), nothing else.
    assert read == {"train", "val/img", "val/mask"}


def test_supervised_baseline_reads_training_masks(fake_demo, tmp_path, monkeypatch) -> None:
    opened: list[str] = []
    original = dataset_io._open_image
    monkeypatch.setattr(
        dataset_io, "_open_image", lambda p: opened.append(Path(p).parent.name) or original(p)
    )
    result = train_baseline(_settings("supervised"), fake_demo.root, fake_demo.spec, tmp_path / "s")
    assert TRAIN_MASKS_DIR in opened
    rows = (result.out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,cls,seg,val_miou,val_fwiou" and len(rows) == 1 + 2 + 2
    meta = json.loads((result.out / "metrics.json").read_text())
    assert meta["steps"] == 2 and meta["best_step"] in (1, 2)
    model = load_baseline_predictor(result.best_checkpoint, fake_demo.spec, "supervised")
    assert not isinstance(model, CamPredictor)


def test_supervised_baseline_needs_train_masks(tmp_path) -> None:
    images, annotations = _fake_sources()
    demo = build_demo_dataset(
        tmp_path / "d", settings=SMALL, annotations=annotations, images=images
    )
    for path in (demo.root / TRAIN_MASKS_DIR).iterdir():
        path.unlink()
    (demo.root / TRAIN_MASKS_DIR).rmdir()
    with pytest.raises(BaselineError, match=TRAIN_MASKS_DIR):
        train_baseline(_settings("supervised"), demo.root, demo.spec, tmp_path / "s")
    with pytest.raises(BaselineError, match="unknown baseline"):
        train_baseline(_settings("pixels"), demo.root, demo.spec, tmp_path / "x")


def test_baseline_training_is_deterministic(fake_demo, tmp_path) -> None:
    states = []
    for name in ("one", "two"):
        result = train_baseline(
            _settings("cam"), fake_demo.root, fake_demo.spec, tmp_path / name, progress=False
        )
        states.append(torch.load(result.best_checkpoint, weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --------------------------------------------------------------------------- whole demo


def test_demo_end_to_end_on_fake_data(tmp_path, capsys, monkeypatch) -> None:
    images, annotations = _fake_sources()
    out = tmp_path / "run"
    kwargs = {
        "overrides": TINY,
        "images": images,
        "annotations": annotations,
        "data_settings": SMALL,
        "command": "hisynseg demo --out run",
    }
    report = run_demo(out, **kwargs)

    # report.json: every method with mIoU, FwIoU and per-class IoU.
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["methods"]) == {"hisynseg_stage1", "hisynseg", "cam", "fully_supervised"}
    for m in report["methods"].values():
        assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["fwiou"] <= 1.0
        assert set(m["iou"]) == set(CLASSES)
    # The baselines get as many steps as HisynSeg's two stages together.
    budget = report["budget"]
    assert report["methods"]["hisynseg_stage1"]["steps"] == budget["stage1_steps"] > 0
    assert report["methods"]["hisynseg"]["steps"] == budget["stage2_steps"] > 0
    assert budget["steps"] == budget["stage1_steps"] + budget["stage2_steps"]
    assert report["methods"]["cam"]["steps"] == budget["steps"]
    assert report["methods"]["fully_supervised"]["steps"] == budget["steps"]
    assert report["target"]["met"] in (True, False)
    assert set(report["timings"]["phases"]) == {"data", "hisynseg", "cam", "fully_supervised"}

    # report.md: the table with all three methods, the figures, the sources.
    text = (out / "report.md").read_text()
    for key in METHOD_LABELS:
        assert f"| {METHOD_LABELS[key]} |" in text
    assert "| method | TE | STR | LYM | EPI | mIoU | FwIoU | best val mIoU |" in text
    assert "![overlays](overlays.png)" in text and "![training curves](curves.png)" in text
    assert "Target met" in text or "Target not met" in text
    assert "hisynseg demo --out run" in text
    assert "<table>" in (out / "report.html").read_text()

    # Figures: a row per test image, all methods' predictions written.
    overlays = Image.open(out / "overlays.png")
    assert overlays.format == "PNG" and overlays.size[0] > 400
    assert Image.open(out / "curves.png").format == "PNG"
    for name in report["overlay_images"]:
        for folder in ("cam-baseline/test/masks", "fully-supervised/test/masks"):
            assert read_mask(out / folder / name).shape == (64, 64)
    assert (out / "config.yaml").is_file() and (out / "hisynseg" / "pipeline.yaml").is_file()
    assert (out / "data" / TRAIN_MASKS_DIR).is_dir()

    # A second run skips every phase and trains nothing.
    def no_training(*args, **kw):
        raise AssertionError("a completed baseline was trained again")

    monkeypatch.setattr(baselines, "train_baseline", no_training)
    marker = (out / "cam-baseline" / "best.pt").stat().st_mtime_ns
    capsys.readouterr()
    again = run_demo(out, **kwargs)
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 4
    assert again["methods"] == report["methods"]
    assert (out / "cam-baseline" / "best.pt").stat().st_mtime_ns == marker

    # Other settings in the same folder are refused rather than mixed in.
    with pytest.raises(DemoError, match="other settings"):
        run_demo(out, **{**kwargs, "cam_gate": False})


def test_demo_refuses_a_recipe_of_another_layout(tmp_path) -> None:
    with pytest.raises(DemoError, match="generic"):
        run_demo(tmp_path / "x", overrides=["dataset=luad-histoseg"])


def test_the_demo_recipe_ships_inside_the_package() -> None:
    """``hisynseg demo`` must find its recipe in any install, not only in a source tree;
    the source tree's ``configs/demo.yaml`` is the same file."""
    from hisynseg.demo.run import default_config_path, load_demo_config

    path = default_config_path()
    assert path.parent == Path(baselines.__file__).parent
    source_tree_copy = Path(__file__).parents[1] / "configs" / "demo.yaml"
    assert source_tree_copy.resolve() == path.resolve()
    assert load_demo_config() is not None
