"""Training: transforms, data module, loss combination, runs, checkpoints, resume, refusals.

Everything runs on the CPU with a ResNet-18 encoder (random weights) at 64 px on a toy
LUAD-HistoSeg look-alike and a small synthetic set written here.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import hisynseg.cli
from hisynseg.config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from hisynseg.datasets.io import write_mask_png, write_rgb_png
from hisynseg.datasets.layouts import LabelledImage
from hisynseg.datasets.spec import DatasetSpec, get_dataset_spec
from hisynseg.datasets.toy import make_toy_dataset, region_map, render_texture
from hisynseg.losses import classification_loss, consistency_loss, dice_loss
from hisynseg.models.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    export_segmenter,
    load_segmenter,
)
from hisynseg.training.data import HisynSegDataModule, LabelledSamples, seed_worker_transform
from hisynseg.training.module import HisynSegModule, gate_absent_classes
from hisynseg.training.run import changed_settings, train
from hisynseg.training.transforms import eval_transform, train_transform

SIZE = 64


def main(argv: list[str]) -> int:
    """``hisynseg`` with only the train subcommand registered (the CLI's own error handling
    and dispatch, independent of the other subcommands' modules)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hisynseg.cli, "COMMANDS", {"train": "train"})
        return hisynseg.cli.main(argv)


def write_synthetic_set(folder: Path, spec: DatasetSpec, count: int, seed: int = 0) -> Path:
    """A synthetic set in the layout ``list_synthetic`` reads: two textured classes per
    image, with a background (ignored) corner in every other mask."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        classes = np.sort(rng.choice(spec.num_classes, size=2, replace=False))
        owner = region_map(classes, (SIZE, SIZE), rng).astype(np.uint8)
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        for c in classes:
            sel = owner == c
            image[sel] = render_texture(int(c), (SIZE, SIZE), rng)[sel]
        if i % 2:
            owner[:8, :8] = spec.background_index
            image[:8, :8] = 245
        name = spec.format_name(f"syn_{i:04d}", spec.labels_from_mask(owner))
        write_rgb_png(folder / "img" / name, image)
        write_mask_png(folder / "mask" / f"{Path(name).stem}.png", owner, spec.palette)
    return folder


def base_overrides(root: Path, synthetic: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"data.synthetic=[{synthetic}]",
        f"data.patch_size={SIZE}",
        "data.batch_size_synthetic=2",
        "data.batch_size_real=2",
        "data.val_batch_size=2",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"out={out}",
    ]


@pytest.fixture(scope="module")
def luad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("luad")
    toy = make_toy_dataset(
        base / "data",
        "luad-histoseg",
        patch_size=SIZE,
        single_per_class=2,
        multi_train=4,
        num_val=2,
        num_test=1,
    )
    synthetic = write_synthetic_set(base / "syn", toy.spec, 6)
    return {"base": base, "root": toy.root, "syn": synthetic}


def train_one_epoch_cli(luad: dict[str, Path], out: Path, *extra: str) -> int:
    """One short epoch (3 steps) through the ``train`` CLI, seed 3; ``extra`` words last."""
    return main(
        [
            "train",
            "--data",
            str(luad["root"]),
            "--dataset",
            "luad-histoseg",
            "--synthetic",
            str(luad["syn"]),
            "--encoder",
            "resnet18",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--seed",
            "3",
            f"data.patch_size={SIZE}",
            "data.num_workers=0",
            "data.val_batch_size=2",
            "trainer.limit_train_batches=3",
            "trainer.progress_bar=false",
            "trainer.log_every_n_steps=1",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(luad: dict[str, Path]) -> dict[str, Path]:
    """One epoch through the CLI, then a resumed second epoch through :func:`train`."""
    out = luad["base"] / "run"
    code = train_one_epoch_cli(luad, out)
    assert code == 0
    first = json.loads((out / "metrics.json").read_text())
    shutil.copy(out / "checkpoints" / "last.ckpt", luad["base"] / "epoch1.ckpt")
    resumed = train(apply_overrides(load_config(out / "config.yaml"), ["trainer.epochs=2"]))
    return {
        "out": out,
        "first": first,
        "second": resumed.metrics,
        "epoch1": luad["base"] / "epoch1.ckpt",
    }


def make_module(spec: DatasetSpec, overrides: list[str] = ()) -> HisynSegModule:
    cfg = apply_overrides(Config(), [f"data.patch_size={SIZE}", *overrides])
    return HisynSegModule(
        model={"encoder": "resnet18", "num_classes": spec.num_classes},
        dataset=spec.to_dict(),
        config=config_to_dict(cfg),
    )


# ---------------------------------------------------------------- transforms


def test_train_transform_fills_masks_with_the_ignore_index() -> None:
    t = train_transform(SIZE, fill_index=4)
    image = np.full((80, 80, 3), 120, np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    seen: set[int] = set()
    for _ in range(40):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (SIZE, SIZE, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (SIZE, SIZE)
        seen |= set(np.unique(out["mask"]).tolist())
    # Rotations and distortions bring in border pixels: they are 4, never a made-up class 0.
    assert seen == {0, 4}


def test_train_transform_fills_images_with_white() -> None:
    """Pixels brought in from outside are white slide background in every transform."""
    import albumentations as A

    t = train_transform(SIZE, fill_index=4)
    image = np.full((80, 80, 3), 120, np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    white = (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225]
    grey = (120 / 255 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225]
    filled = 0
    t.set_random_seed(0)
    for _ in range(60):
        out = t(image=image, mask=mask)
        fill = out["image"][out["mask"] == 4]
        filled += len(fill)
        # Each pixel lies between grey and white on every channel alike: no colour cast.
        share = (fill - grey) / (white - grey)
        assert np.ptp(share, axis=1).max(initial=0) < 0.02
    assert filled > 0
    assert any(isinstance(x, A.OpticalDistortion) for x in t.transforms)
    reflect = train_transform(SIZE, fill_index=4, border="reflect")
    assert all(set(np.unique(reflect(image=image, mask=mask)["mask"])) == {0} for _ in range(20))


def test_eval_transform_normalises_only() -> None:
    image = np.full((50, 70, 3), 255, np.uint8)
    out = eval_transform()(image=image)["image"]
    assert out.shape == (50, 70, 3)
    np.testing.assert_allclose(
        out[0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-5
    )


# ---------------------------------------------------------------- data module


def test_combined_loader_cycles_the_shorter_set(luad: dict[str, Path], tmp_path: Path) -> None:
    spec = get_dataset_spec("luad-histoseg")
    cfg = apply_overrides(Config(), base_overrides(luad["root"], luad["syn"], tmp_path))
    dm = HisynSegDataModule(cfg, spec)
    assert len(dm.labelled_items) == 6 and len(dm.real_items) == 12
    steps, labelled_seen, real_seen = 0, 0, 0
    for batch, _, _ in dm.train_dataloader():
        steps += 1
        assert set(batch) == {"labelled", "real"}
        lab, real = batch["labelled"], batch["real"]
        assert lab["image"].shape == (2, 3, SIZE, SIZE) and lab["mask"].shape == (2, SIZE, SIZE)
        assert real["image"].shape == (2, 3, SIZE, SIZE) and real["label"].shape == (2, 4)
        # The label of a synthetic image is the set of classes in its augmented mask.
        for mask, label in zip(lab["mask"], lab["label"], strict=True):
            present = [int((mask == c).any()) for c in range(4)]
            assert label.tolist() == present
        labelled_seen += lab["image"].shape[0]
        real_seen += real["image"].shape[0]
    # The epoch follows the longer (real) loader; the synthetic one restarts once.
    assert steps == 6 and real_seen == 12 and labelled_seen == 12


def test_stage2_and_no_unlabeled_batches(luad: dict[str, Path], tmp_path: Path) -> None:
    spec = get_dataset_spec("luad-histoseg")
    pseudo = write_synthetic_set(tmp_path / "pseudo", spec, 4, seed=9)
    over = base_overrides(luad["root"], luad["syn"], tmp_path)
    dm2 = HisynSegDataModule(
        apply_overrides(Config(), [*over, "stage=2", f"data.pseudo_masks={pseudo}"]), spec
    )
    assert len(dm2.labelled_items) == 10 and dm2.real_items == []
    batches = [b for b, _, _ in dm2.train_dataloader()]
    assert all(set(b) == {"labelled"} for b in batches)
    assert batches[0]["labelled"]["image"].shape[0] == 4  # synthetic + real batch sizes
    dm1 = HisynSegDataModule(apply_overrides(Config(), [*over, "data.real_unlabeled=false"]), spec)
    assert [set(b) for b, _, _ in dm1.train_dataloader()] == [{"labelled"}] * 3
    with pytest.raises(ConfigError, match="pseudo"):
        HisynSegDataModule(apply_overrides(Config(), [*over, "stage=2"]), spec)
    with pytest.raises(ConfigError, match="synthetic"):
        HisynSegDataModule(apply_overrides(Config(), [*over, "data.synthetic=[]"]), spec)


def _first_batches(dm: HisynSegDataModule, count: int) -> list[torch.Tensor]:
    """The augmented images of the first ``count`` stage-1 steps (both sets), after the
    global seeding a training run does."""
    L.seed_everything(dm.cfg.trainer.seed, workers=True, verbose=False)
    out = []
    for step, (batch, _, _) in enumerate(dm.train_dataloader()):
        if step == count:
            break
        out.append(torch.cat([batch["labelled"]["image"], batch["real"]["image"]]))
    return out


def test_the_seed_makes_augmentation_repeatable(luad: dict[str, Path], tmp_path: Path) -> None:
    spec = get_dataset_spec("luad-histoseg")
    over = base_overrides(luad["root"], luad["syn"], tmp_path)

    def batches(seed: int) -> list[torch.Tensor]:
        cfg = apply_overrides(Config(), [*over, f"trainer.seed={seed}"])
        return _first_batches(HisynSegDataModule(cfg, spec), 3)

    first, again, other = batches(5), batches(5), batches(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_loader_workers_augment_differently_and_repeatably(tmp_path: Path) -> None:
    """Forked workers inherit one albumentations generator; each must get its own stream."""
    spec = get_dataset_spec("luad-histoseg")
    image = render_texture(0, (SIZE, SIZE), np.random.default_rng(0))
    write_rgb_png(tmp_path / "same.png", image)
    item = LabelledImage(path=tmp_path / "same.png", label=np.array([1, 0, 0, 0], np.uint8))

    def epoch() -> list[torch.Tensor]:
        torch.manual_seed(3)
        transform = train_transform(SIZE, spec.background_index)
        transform.set_random_seed(3)
        loader = DataLoader(
            LabelledSamples([item] * 8, transform),
            batch_size=1,
            num_workers=2,
            worker_init_fn=seed_worker_transform,
        )
        return [b["image"][0] for b in loader]

    first, again = epoch(), epoch()
    # Batches alternate between the two workers: items 0 and 1 come from different ones.
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# ---------------------------------------------------------------- losses


def _fixed_batch(n_syn: int = 2, n_real: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 5, (n_syn, SIZE, SIZE), generator=g)  # 4 = background (ignored)
    label = torch.stack([torch.bincount(m[m < 4], minlength=4) > 0 for m in mask]).float()
    return {
        "labelled": {
            "image": torch.randn(n_syn, 3, SIZE, SIZE, generator=g),
            "mask": mask,
            "label": label,
        },
        "real": {
            "image": torch.randn(n_real, 3, SIZE, SIZE, generator=g),
            "label": torch.randint(0, 2, (n_real, 4), generator=g).float(),
        },
    }


def test_stage1_loss_is_the_weighted_sum_of_the_three_losses() -> None:
    torch.manual_seed(0)
    spec = get_dataset_spec("luad-histoseg")
    module = make_module(spec, ["loss.w1=0.3", "loss.w2=0.7", "loss.w3=1.9"]).eval()
    batch = _fixed_batch()
    with torch.no_grad():
        terms = module.compute_losses(batch)
        # By hand, with each batch through the network on its own (eval-mode BatchNorm
        # uses running statistics, so one concatenated pass must give the same numbers).
        syn = module.model(batch["labelled"]["image"])
        real = module.model(batch["real"]["image"])
        cls_syn = classification_loss(syn.cls_logits, batch["labelled"]["label"])
        seg = dice_loss(syn.seg_logits, batch["labelled"]["mask"], 4)
        cls_real = classification_loss(real.cls_logits, batch["real"]["label"])
        reg = consistency_loss(real.seg_logits, real.cam)
    expected = 0.3 * cls_syn + 0.7 * seg + 0.3 * cls_real + 1.9 * reg
    for name, value in (("cls_syn", cls_syn), ("seg", seg), ("cls_real", cls_real), ("reg", reg)):
        torch.testing.assert_close(terms[name], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-4, atol=1e-5)
    assert all(float(v) > 0 for v in (cls_syn, seg, cls_real, reg))


def test_split_forward_runs_each_batch_on_its_own() -> None:
    """In training mode (batch statistics, dropout) the split step equals two separate
    passes by hand, and differs from the joint pass, whose BatchNorm sees both batches."""
    torch.manual_seed(0)
    spec = get_dataset_spec("luad-histoseg")
    split = make_module(spec).train()  # the default, as the reference
    assert split.cfg.trainer.split_forward
    joint = make_module(spec, ["trainer.split_forward=false"]).train()
    joint.load_state_dict(split.state_dict())
    batch = _fixed_batch()
    with torch.no_grad():
        torch.manual_seed(1)
        terms = split.compute_losses(batch)
        torch.manual_seed(1)
        syn = split.model(batch["labelled"]["image"])
        real = split.model(batch["real"]["image"])
        torch.manual_seed(1)
        joint_terms = joint.compute_losses(batch)
    expected = (
        classification_loss(syn.cls_logits, batch["labelled"]["label"])
        + dice_loss(syn.seg_logits, batch["labelled"]["mask"], 4)
        + classification_loss(real.cls_logits, batch["real"]["label"])
        + consistency_loss(real.seg_logits, real.cam)
    )
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(terms["loss"], joint_terms["loss"], rtol=1e-4, atol=1e-5)


def test_stage2_loss_and_switches() -> None:
    torch.manual_seed(0)
    spec = get_dataset_spec("luad-histoseg")
    batch = _fixed_batch()
    labelled_only = {"labelled": batch["labelled"]}
    stage2 = make_module(spec, ["stage=2", "loss.w1=2", "loss.w2=0.5"]).eval()
    no_reg = make_module(spec, ["loss.w3=0"]).eval()
    no_reg.load_state_dict(stage2.state_dict())
    with torch.no_grad():
        t2 = stage2.compute_losses(labelled_only)
        t0 = no_reg.compute_losses(batch)
    assert set(t2) == {"loss", "cls_syn", "seg"}
    torch.testing.assert_close(t2["loss"], 2 * t2["cls_syn"] + 0.5 * t2["seg"])
    torch.testing.assert_close(t0["loss"], t0["cls_syn"] + t0["seg"] + t0["cls_real"])


def test_gating_removes_classes_absent_from_the_ground_truth() -> None:
    logits = torch.zeros(2, 4, 2, 2)
    logits[:, 3] = 5.0  # class 3 wins everywhere before gating
    mask = torch.tensor([[[0, 1], [4, 4]], [[4, 4], [4, 4]]])
    pred = gate_absent_classes(logits, mask, 4).argmax(1)
    assert set(pred[0].flatten().tolist()) <= {0, 1}
    assert set(pred[1].flatten().tolist()) == {3}  # background only: left unconstrained


def test_large_validation_images_use_sliding_windows() -> None:
    spec = get_dataset_spec("wsss4luad")
    module = make_module(spec).eval()
    with torch.no_grad():
        probs = module.predict_logits(torch.randn(1, 3, 100, 150))
    assert probs.shape == (1, 3, 100, 150)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 100, 150), rtol=1e-4, atol=1e-4)
    # A validation step scores every pixel that is not background (index 3).
    mask = torch.randint(0, 4, (1, 100, 150))
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step({"image": torch.randn(1, 3, 100, 150), "mask": mask}, 0)
    assert int(module._confusion.sum()) == int((mask < 3).sum())


# ---------------------------------------------------------------- runs and checkpoints


def test_training_run_writes_its_directory(trained: dict) -> None:
    out = trained["out"]
    for name in (
        "config.yaml",
        "versions.json",
        "metrics.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "logs" / "csv").glob("version_*/metrics.csv"))) == 2
    cfg = load_config(out / "config.yaml")
    assert cfg.trainer.precision == "32-true" and cfg.trainer.seed == 3
    versions = json.loads((out / "versions.json").read_text())
    for key in (
        "python",
        "torch",
        "lightning",
        "segmentation-models-pytorch",
        "timm",
        "albumentations",
        "hisynseg",
        "git",
    ):
        assert key in versions
    first = trained["first"]
    assert first["epochs"] == 1 and first["global_step"] == 3
    for name in ("train/loss", "train/cls_syn", "train/seg", "train/cls_real", "train/reg"):
        assert math.isfinite(first["final"][name]), name
    assert 0.0 <= first["best_val_miou"] <= 1.0
    assert set(first["best_val"]["iou"]) == set(get_dataset_spec("luad").class_names)


def test_the_same_seed_trains_the_same_weights(trained: dict, luad: dict[str, Path]) -> None:
    assert train_one_epoch_cli(luad, luad["base"] / "again") == 0
    before = torch.load(trained["epoch1"], map_location="cpu", weights_only=False)["state_dict"]
    after = torch.load(
        luad["base"] / "again" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )["state_dict"]
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.allclose(value.float(), after[name].float(), rtol=1e-5, atol=1e-6), name


def test_resume_continues_from_the_last_checkpoint(trained: dict) -> None:
    second = trained["second"]
    assert second["resumed_from"].endswith("last.ckpt")
    assert second["epochs"] == 2 and second["global_step"] == 6
    assert checkpoint_meta(trained["out"] / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert second["best_val"]["epoch"] in (0, 1)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    trained: dict, tmp_path: Path
) -> None:
    """The resumed epoch gets its own shuffle, augmentations and dropout, not epoch 0's."""
    cfg = load_config(trained["out"] / "config.yaml")
    straight = train(apply_overrides(cfg, ["trainer.epochs=2", f"out={tmp_path / 'straight'}"]))
    resumed = torch.load(trained["out"] / "checkpoints" / "last.ckpt", weights_only=False)
    uninterrupted = torch.load(straight.last_checkpoint, weights_only=False)
    assert resumed["global_step"] == uninterrupted["global_step"] == 6
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)


def test_resuming_into_another_folder_keeps_the_best_epoch(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch worse than the resumed run's best must not replace best.ckpt."""
    import hisynseg.evaluation.metrics as metrics

    old_best = trained["out"] / "checkpoints" / "best.ckpt"
    old = torch.load(old_best, weights_only=False)
    real_scores = metrics.scores_from_confusion

    def worse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        scores = real_scores(*args, **kwargs)
        scores["miou"] = -1.0
        return scores

    monkeypatch.setattr(metrics, "scores_from_confusion", worse)
    copy = tmp_path / "elsewhere.ckpt"
    shutil.copy(trained["out"] / "checkpoints" / "last.ckpt", copy)
    cfg = load_config(trained["out"] / "config.yaml")
    result = train(
        apply_overrides(
            cfg, ["trainer.epochs=3", f"trainer.resume={copy}", f"out={tmp_path / 'next'}"]
        )
    )
    assert result.best_checkpoint == tmp_path / "next" / "checkpoints" / "best.ckpt"
    best = torch.load(result.best_checkpoint, weights_only=False)
    assert best["epoch"] == old["epoch"]
    assert result.metrics["best_val"]["epoch"] == trained["second"]["best_val"]["epoch"]
    assert result.metrics["best_val_miou"] == trained["second"]["best_val_miou"]


def _run_holding_epoch1(trained: dict, out: Path) -> Path:
    """A run directory whose last.ckpt is the fixture's first epoch (seed 3, lr 1e-4)."""
    (out / "checkpoints").mkdir(parents=True)
    return Path(shutil.copy(trained["epoch1"], out / "checkpoints" / "last.ckpt"))


def test_resume_with_other_settings_is_refused(
    trained: dict, luad: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Lightning would go on with the checkpoint's optimizer (lr 1e-4) while config.yaml
    said 0.5: a resume with settings that change the training is refused, before it starts."""
    out = tmp_path / "run"
    last = _run_holding_epoch1(trained, out)
    before = last.read_bytes()
    assert train_one_epoch_cli(luad, out, "--epochs", "2", "optim.lr=0.5", "loss.w3=0") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "use a new --out" in err
    assert "optim.lr 0.0001 → 0.5" in err and "loss.w3 1.0 → 0.0" in err
    assert "trainer.epochs" not in err  # more epochs is what a resume is for
    assert last.read_bytes() == before and not (out / "config.yaml").exists()

    cfg = apply_overrides(load_config(trained["out"] / "config.yaml"), ["trainer.seed=4"])
    named = [f"trainer.resume={trained['epoch1']}", f"out={tmp_path / 'fresh'}"]
    with pytest.raises(ConfigError, match=r"trainer\.seed 3 → 4.*leave out trainer\.resume"):
        train(apply_overrides(cfg, named))


def test_resume_may_change_run_control_settings(
    trained: dict, luad: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _run_holding_epoch1(trained, out)
    # Only how long, how often and how it is shown: the same training goes on.
    extra = ["--epochs", "2", "data.val_batch_size=1", "trainer.log_every_n_steps=2"]
    assert train_one_epoch_cli(luad, out, *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert metrics["epochs"] == 2 and metrics["global_step"] == 6


def test_changed_settings_ignores_run_control_keys_and_path_spelling() -> None:
    stored = config_to_dict(apply_overrides(Config(), ["data.root=toy", "data.synthetic=[s/a]"]))
    same = apply_overrides(
        Config(),
        [
            "data.root=./toy/",
            "data.synthetic=[s/a/]",
            "trainer.epochs=60",
            "trainer.devices=2",
            "data.num_workers=0",
            "trainer.limit_val_batches=2",
            "out=elsewhere",
        ],
    )
    assert changed_settings(stored, config_to_dict(same)) == {}
    other = apply_overrides(same, ["data.synthetic=[s/a, s/b]", "data.patch_size=64"])
    assert changed_settings(stored, config_to_dict(other)) == {
        "data.patch_size": (224, 64),
        "data.synthetic": (["s/a"], ["s/a", "s/b"]),
    }
    # A checkpoint from a version without some setting: only the common keys count.
    del stored["trainer"]["split_forward"]
    assert changed_settings(stored, config_to_dict(same)) == {}
    # The same folder, relative or absolute, is one folder.
    absolute = apply_overrides(same, [f"data.root={Path('toy').resolve()}"])
    assert changed_settings(stored, config_to_dict(absolute)) == {}


def test_ctrl_c_during_a_fit_exits_130_as_interrupted(
    luad: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Lightning catches the KeyboardInterrupt and calls sys.exit(1); the CLI still reports
    an interruption with the shell's status for SIGINT."""
    import os
    import signal

    step = HisynSegModule.training_step

    def interrupted_step(self: HisynSegModule, batch: Any, batch_idx: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the first step
        return step(self, batch, batch_idx)

    monkeypatch.setattr(HisynSegModule, "training_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    assert train_one_epoch_cli(luad, tmp_path / "run") == 130
    assert "train: interrupted; re-run the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # Lightning's SIG_IGN is not left behind


def test_load_segmenter_rebuilds_the_trained_network(trained: dict) -> None:
    path = trained["out"] / "checkpoints" / "best.ckpt"
    spec = get_dataset_spec("luad-histoseg")
    model, meta = load_segmenter(path, expected_spec=spec)
    assert not model.training
    assert meta["kind"] == "lightning" and meta["dataset"]["classes"] == list(spec.class_names)
    assert meta["config"]["data"]["patch_size"] == SIZE
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{key}"])
    out = model(torch.zeros(1, 3, SIZE, SIZE))
    assert out.seg_logits.shape == (1, 4, SIZE, SIZE)


def test_exports_and_bare_state_dicts_load(trained: dict, tmp_path: Path) -> None:
    spec = get_dataset_spec("luad-histoseg")
    model, meta = load_segmenter(trained["out"] / "checkpoints" / "best.ckpt")
    export = tmp_path / "model.pt"
    export_segmenter(model, spec, export, config=meta["config"])
    again, meta2 = load_segmenter(export, expected_spec=spec)
    assert meta2["kind"] == "export"
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="model_config"):
        load_segmenter(bare)
    third, meta3 = load_segmenter(bare, model_config=model.config())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x).seg_logits
        torch.testing.assert_close(again(x).seg_logits, ref)
        torch.testing.assert_close(third(x).seg_logits, ref)
    assert meta3["kind"] == "state_dict"


def test_corrupt_and_foreign_checkpoints_are_refused(trained: dict, tmp_path: Path) -> None:
    good = trained["out"] / "checkpoints" / "best.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_segmenter(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_segmenter(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "missing.ckpt")
    bcss = get_dataset_spec("bcss-wsss")
    with pytest.raises(CheckpointError) as err:
        load_segmenter(good, expected_spec=bcss)
    message = str(err.value)
    assert "tumor epithelium" in message and "lymphocytic infiltrate" in message


def test_a_dataset_with_other_classes_is_refused_before_training(
    trained: dict, tmp_path: Path
) -> None:
    toy = make_toy_dataset(
        tmp_path / "bcss",
        "bcss-wsss",
        patch_size=SIZE,
        single_per_class=1,
        multi_train=2,
        num_val=1,
        num_test=1,
    )
    syn = write_synthetic_set(tmp_path / "bcss-syn", toy.spec, 2)
    out = tmp_path / "run"
    over = [*base_overrides(toy.root, syn, out), "data.dataset=bcss-wsss"]
    with pytest.raises(CheckpointError, match="lymphocytic infiltrate"):
        train(apply_overrides(Config(), [*over, f"trainer.resume={trained['epoch1']}"]))
    expected = "data.classes=[tumor epithelium, necrosis, lymphocyte, tumor-associated stroma]"
    with pytest.raises(ConfigError, match="expects classes"):
        train(apply_overrides(Config(), [*over, expected]))
    assert not out.exists()  # nothing was started


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "nowhere"),
            "--synthetic",
            str(tmp_path),
            "trainer.epoch=1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "trainer.epoch" in err and "epochs" in err


def test_lightning_messages_print_once_under_the_cli_logging() -> None:
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO, format='ROOT %(message)s')\n"
        "import lightning.pytorch\n"
        "from hisynseg.training.run import route_lightning_logs_to_root\n"
        "route_lightning_logs_to_root()\n"
        "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('GPU available: no')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.count("GPU available: no") == 1
    assert "ROOT GPU available: no" in proc.stderr


def test_lightning_product_tips_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from hisynseg.training.run import route_lightning_logs_to_root

    route_lightning_logs_to_root()
    with caplog.at_level("INFO"):
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("💡 Tip: try installing something")
        rank_zero.info("GPU available: False, used: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_resuming_a_finished_run_says_there_is_nothing_to_train(
    trained: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "done.ckpt"
    shutil.copy(trained["out"] / "checkpoints" / "last.ckpt", copy)
    cfg = load_config(trained["out"] / "config.yaml")
    with caplog.at_level("WARNING"):
        train(apply_overrides(cfg, [f"trainer.resume={copy}", f"out={tmp_path / 'again'}"]))
    assert "already trained 2 epoch(s) and trainer.epochs is 2" in caplog.text
