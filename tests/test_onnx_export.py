"""ONNX export: metadata, and the same masks from onnxruntime as from torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hisynseg.cli import main
from hisynseg.datasets.io import read_mask, write_rgb_png
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.inference.backends import load_backend
from hisynseg.models import build_segmenter
from hisynseg.models.checkpoint import export_segmenter

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SPEC = get_dataset_spec("bcss-wsss")


def _image(size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(60, 220, (size // 8, size // 8, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), np.uint8))
    return np.clip(image.astype(int) + rng.integers(-25, 25, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_segmenter("resnet18", num_classes=SPEC.num_classes)
    ckpt = tmp / "model.pt"
    export_segmenter(model, SPEC, ckpt)
    onnx_path = tmp / "model.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path)]) == 0
    return ckpt, onnx_path


def test_export_stores_classes_and_runs_with_any_size(exported: tuple[Path, Path]) -> None:
    ckpt, onnx_path = exported
    backend, labels, meta = load_backend(onnx_path)
    assert backend.name == "onnxruntime" and backend.num_classes == SPEC.num_classes
    assert labels.names == SPEC.class_names and labels.palette == SPEC.palette
    assert meta["model"]["encoder"] == "resnet18" and meta["input_divisor"] == 16
    torch_backend, _, _ = load_backend(ckpt)
    # 80×112: not the traced size, and 80 is padded to 80, 112 to 112 (multiples of 16);
    # 72 needs padding to 80 inside the shared preprocessing.
    for h, w in ((80, 112), (72, 72)):
        tiles = _image(128)[None, :h, :w]
        a, b = backend(tiles), torch_backend(tiles)
        assert a.shape == (1, SPEC.num_classes, h, w)
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_array_equal(a.argmax(1), b.argmax(1))


def test_predict_from_onnx_gives_the_torch_masks(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, onnx_path = exported
    write_rgb_png(tmp_path / "img.png", _image(96))
    masks = {}
    for name, model in (("torch", ckpt), ("onnx", onnx_path)):
        out = tmp_path / name
        args = ["predict", str(model), str(tmp_path / "img.png"), "--out", str(out)]
        args += ["--tile", "64", "--overlap", "32", "--tta", "d4", "--no-progress"]
        args += ["--no-tissue-detection"]
        assert main(args) == 0
        masks[name] = read_mask(out / "img.mask.png")
        record = json.loads((out / "predict.json").read_text())
        assert record["backend"] == ("onnxruntime" if name == "onnx" else "torch")
    assert masks["torch"].shape == (96, 96)
    assert len(np.unique(masks["torch"])) > 1  # a mask worth comparing
    np.testing.assert_array_equal(masks["onnx"], masks["torch"])


def test_export_of_a_corrupt_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()
