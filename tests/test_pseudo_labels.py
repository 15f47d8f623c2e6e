"""Stage-2 pseudo-masks: label constraint, single-label images, background, resume, CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from hisynseg.cli import main
from hisynseg.datasets.io import read_mask, read_rgb
from hisynseg.datasets.layouts import list_synthetic, list_train
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.datasets.toy import make_toy_dataset
from hisynseg.inference.pseudo_labels import (
    PseudoLabelError,
    constrain_to_label,
    pseudo_label_dataset,
)
from hisynseg.models import SegmenterOutput, build_segmenter
from hisynseg.models.checkpoint import export_segmenter


class FavouringModel(nn.Module):
    """Scores class c as 0.1·c everywhere, and one class far above the rest.

    Constrained to an image's label, the argmax is the favoured class when the label has
    it, else the highest-numbered class of the label, so every pseudo-mask is known.
    """

    def __init__(self, num_classes: int, favoured: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.favoured = favoured
        self.sizes: list[tuple[int, int]] = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        self.sizes.append(tuple(x.shape[-2:]))
        b, _, h, w = x.shape
        scores = 0.1 * torch.arange(self.num_classes, dtype=torch.float32)
        scores[self.favoured] = 5.0
        logits = scores.view(1, -1, 1, 1).expand(b, -1, h, w) + 0 * self.anchor
        return SegmenterOutput(logits, logits[..., ::16, ::16], logits.mean((2, 3)))


def expected_class(label: np.ndarray, favoured: int) -> int:
    present = np.flatnonzero(label)
    return favoured if favoured in present else int(present.max())


def test_constrain_to_label_takes_the_argmax_over_present_classes() -> None:
    logits = np.array([[[0.0, 3.0]], [[2.0, 1.0]], [[9.0, 9.0]]], dtype=np.float32)  # C=3, H=1, W=2
    np.testing.assert_array_equal(constrain_to_label(logits, np.array([1, 1, 0])), [[1, 0]])
    np.testing.assert_array_equal(constrain_to_label(logits, np.array([1, 0, 0])), [[0, 0]])
    with pytest.raises(ValueError):
        constrain_to_label(logits, np.array([0, 0, 0]))


def test_pseudo_masks_follow_labels_and_read_back_as_a_training_set(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "luad-histoseg", single_per_class=2, multi_train=8)
    model = FavouringModel(toy.spec.num_classes, favoured=0)
    out = tmp_path / "pseudo"
    summary = pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    samples = list_train(toy.root, toy.spec)
    assert summary.written == len(samples) and summary.single_label == 8 and not summary.failed

    back = {s.path.name: (s, m) for s, m in list_synthetic(out, toy.spec)}
    assert set(back) == {s.path.name for s in samples}
    for sample in samples:
        mask = read_mask(back[sample.path.name][1])
        assert mask.shape == (64, 64)
        if sample.is_single_label:
            assert (mask == sample.single_class).all()
        else:
            assert (mask == expected_class(sample.label, 0)).all()
        # The label carried by the output name is the original image-level label.
        np.testing.assert_array_equal(back[sample.path.name][0].label, sample.label)
    # Only multi-label images go through the network, with d4's eight views.
    assert len(model.sizes) == 8 and set(model.sizes) == {(64, 64)}


def test_wsss4luad_background_and_training_patch_size(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "wsss4luad", single_per_class=3, multi_train=10)
    model = FavouringModel(toy.spec.num_classes, favoured=2)
    out = tmp_path / "pseudo"
    pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, tta=None, progress=False)
    # Patches of varying size are predicted at the training patch size, not their own.
    assert set(model.sizes) == {(64, 64)}
    found_background = False
    for sample, mask_path in list_synthetic(out, toy.spec):
        mask = read_mask(mask_path)
        assert mask.shape == read_rgb(sample.path).shape[:2]
        values = set(np.unique(mask).tolist())
        allowed = set(np.flatnonzero(sample.label).tolist()) | {toy.spec.background_index}
        assert values <= allowed
        found_background |= toy.spec.background_index in values
    assert found_background, "the toy's white blobs must become background"


def test_rerun_writes_only_missing_masks(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "bcss-wsss", single_per_class=2, multi_train=4)
    model = FavouringModel(toy.spec.num_classes, favoured=1)
    out = tmp_path / "pseudo"
    pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    masks = sorted((out / "mask").glob("*.png"))
    kept = {p: p.stat().st_mtime_ns for p in masks[1:]}
    masks[0].unlink()
    summary = pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    assert (summary.written, summary.skipped) == (1, len(masks) - 1)
    assert masks[0].is_file()
    assert {p: p.stat().st_mtime_ns for p in masks[1:]} == kept


def test_cli_with_a_real_checkpoint(tmp_path, capsys) -> None:
    toy = make_toy_dataset(tmp_path / "data", "generic", single_per_class=2, multi_train=3)
    ckpt = tmp_path / "model.pt"
    export_segmenter(build_segmenter("resnet18", num_classes=3), toy.spec, ckpt)
    out = tmp_path / "pseudo"
    code = main(
        [
            "pseudo-label",
            str(ckpt),
            str(toy.root),
            "--dataset",
            "generic",
            "--out",
            str(out),
            "--patch-size",
            "64",
            "--tta",
            "none",
            "--entropy",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "9 written (6 single-label" in capsys.readouterr().out
    assert len(list((out / "mask").glob("*.png"))) == 9
    assert len(list((out / "entropy").glob("*.png"))) == 9
    # A generic set keeps its labels in labels.csv, which the reader uses.
    assert len(list_synthetic(out, toy.spec)) == 9

    # Another stage-1 model into the same folder: refused, unless told to overwrite.
    torch.manual_seed(1)
    retrained = tmp_path / "retrained.pt"
    export_segmenter(build_segmenter("resnet18", num_classes=3), toy.spec, retrained)
    again = ["pseudo-label", str(retrained), str(toy.root), "--dataset", "generic"]
    again += ["--out", str(out), "--patch-size", "64", "--tta", "none", "--no-progress"]
    again += ["--device", "cpu"]
    assert main(again) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert "9 written" in capsys.readouterr().out
    assert not (out / "entropy").exists()  # the old run's entropy maps went with its masks

    other = tmp_path / "other.pt"
    export_segmenter(
        build_segmenter("resnet18", num_classes=4), get_dataset_spec("luad-histoseg"), other
    )
    assert (
        main(["pseudo-label", str(other), str(toy.root), "--dataset", "generic", "--out", str(out)])
        == 2
    )


def test_an_image_labelled_with_no_class_fails_alone(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "luad-histoseg", single_per_class=1, multi_train=2)
    victim = next(s.path for s in list_train(toy.root, toy.spec) if s.is_single_label)
    empty_name = toy.spec.format_name(victim.stem.split("-[")[0], np.zeros(4, np.uint8))
    victim.rename(victim.with_name(empty_name))
    out = tmp_path / "pseudo"
    model = FavouringModel(toy.spec.num_classes, favoured=0)
    summary = pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    assert len(summary.failed) == 1
    assert empty_name in summary.failed[0] and "label has no positive class" in summary.failed[0]
    assert summary.written == toy.num_train - 1
    assert not (out / "mask" / (victim.with_name(empty_name).stem + ".png")).exists()


def test_unknown_tta_is_refused(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "bcss-wsss", single_per_class=1, multi_train=1)
    model = FavouringModel(toy.spec.num_classes, favoured=0)
    with pytest.raises(PseudoLabelError, match="'D4'"):
        pseudo_label_dataset(model, toy.root, toy.spec, tmp_path / "p", tta="D4", progress=False)
    # "none" is the same as None (the pipeline's configuration spells it so).
    pseudo_label_dataset(
        model, toy.root, toy.spec, tmp_path / "p", patch_size=64, tta="none", progress=False
    )
    assert model.sizes and len(model.sizes) == 1  # one multi-label image, one view


def test_rerun_with_another_checkpoint_or_settings_is_refused(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "bcss-wsss", single_per_class=1, multi_train=2)
    model = FavouringModel(toy.spec.num_classes, favoured=1)
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    first.write_bytes(b"weights of stage 1, first try")
    second.write_bytes(b"weights of stage 1, second try")
    out = tmp_path / "pseudo"

    def run(ckpt, **kwargs):
        options = {"patch_size": 64, "progress": False, "checkpoint": ckpt, **kwargs}
        return pseudo_label_dataset(model, toy.root, toy.spec, out, **options)

    run(first)
    record = json.loads((out / "pseudo_labels.json").read_text())
    assert record["complete"] is True
    assert record["checkpoint"]["path"] == str(first.resolve())
    assert record["checkpoint"]["size"] == first.stat().st_size
    assert record["checkpoint"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert record["settings"]["tta"] == "d4" and record["settings"]["patch_size"] == 64

    masks = sorted((out / "mask").glob("*.png"))
    masks[0].unlink()
    assert run(first).written == 1  # the same checkpoint resumes
    with pytest.raises(PseudoLabelError, match=r"first\.pt.*second\.pt.*--overwrite"):
        run(second)
    with pytest.raises(PseudoLabelError, match=r"patch_size 64 then, 32 now"):
        run(first, patch_size=32)
    # A copy of the same file elsewhere is the same model.
    copy = tmp_path / "moved" / "first.pt"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    assert run(copy).skipped == len(masks)

    stale = out / "mask" / "stale-from-an-old-image.png"
    stale.write_bytes(masks[0].read_bytes())
    summary = run(second, overwrite=True)
    assert summary.written == len(masks) and summary.skipped == 0
    assert not stale.exists()
    record = json.loads((out / "pseudo_labels.json").read_text())
    assert record["checkpoint"]["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()


def test_masks_without_a_record_are_neither_resumed_nor_deleted(tmp_path) -> None:
    toy = make_toy_dataset(tmp_path / "data", "bcss-wsss", single_per_class=1, multi_train=1)
    model = FavouringModel(toy.spec.num_classes, favoured=1)
    out = tmp_path / "pseudo"
    pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    (out / "pseudo_labels.json").unlink()  # as left by an older version, or not ours at all
    for overwrite in (False, True):
        with pytest.raises(PseudoLabelError, match="pseudo_labels.json"):
            pseudo_label_dataset(
                model, toy.root, toy.spec, out, patch_size=64, progress=False, overwrite=overwrite
            )
    assert list((out / "mask").glob("*.png"))
    # The pipeline owns its stage folder: it clears it without a record, then labels.
    from hisynseg.inference.pseudo_labels import clear_pseudo_labels

    clear_pseudo_labels(out, require_record=False)
    summary = pseudo_label_dataset(model, toy.root, toy.spec, out, patch_size=64, progress=False)
    assert summary.written and (out / "pseudo_labels.json").is_file()


def test_cli_generic_dataset_without_classes_yaml_is_one_line(tmp_path, capsys) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"never read")
    (tmp_path / "empty").mkdir()
    argv = ["pseudo-label", str(ckpt), str(tmp_path / "empty"), "--dataset", "generic"]
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "classes.yaml: not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
