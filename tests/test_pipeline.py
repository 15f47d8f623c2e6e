"""The whole pipeline on tiny generated datasets: every stage, resume, report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hisynseg.cli import main
from hisynseg.config import ConfigError
from hisynseg.datasets.toy import make_toy_dataset
from hisynseg.pipeline.config import (
    ABLATIONS,
    apply_pipeline_overrides,
    load_pipeline_config,
)
from hisynseg.pipeline.run import PipelineError, build_stages, run_pipeline
from hisynseg.pipeline.stages import STAGE_MARKER

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# CPU-sized settings: 64 px patches, a few images, one-epoch models.
TINY = [
    "device=cpu",
    "synthesis.unfiltered=16",
    "synthesis.num=12",
    "synthesis.workers=1",
    "synthesis.mosaic.tile_size=32",
    "synthesis.mosaic.output_size=64",
    "synthesis.bezier.output_size=64",
    "filter.epochs=1",
    "filter.batch_size=16",
    "filter.image_size=32",
    "filter.keep_threshold=0",
    "train.data.patch_size=64",
    "train.model.encoder=resnet18",
    "train.model.encoder_weights=null",
    "train.trainer.epochs=1",
    "train.trainer.accelerator=cpu",
    "train.trainer.progress_bar=false",
    "train.trainer.channels_last=false",
    "train.data.batch_size_synthetic=4",
    "train.data.batch_size_real=4",
    "train.data.val_batch_size=2",
    "train.data.num_workers=0",
    "stage2.epochs=1",
    "evaluation.tta=null",
    "evaluation.scales=[1.0]",
    "evaluation.save_masks=false",
]


def _toy(tmp_path: Path, dataset: str) -> Path:
    root = tmp_path / f"data-{dataset}"
    make_toy_dataset(root, dataset, single_per_class=4, multi_train=6, num_val=2, num_test=2)
    return root


@pytest.mark.parametrize("dataset", ["luad-histoseg", "bcss-wsss", "wsss4luad"])
def test_whole_pipeline_on_each_layout(tmp_path: Path, dataset: str) -> None:
    root = _toy(tmp_path, dataset)
    out = tmp_path / "run"
    # The WSSS4LUAD recipe has no stage 2 (as in the paper); run it anyway to cover the
    # background handling of its pseudo-masks.
    cfg = load_pipeline_config(CONFIGS / f"{dataset}.yaml", [*TINY, "stage2.enabled=true"])
    summary = run_pipeline(cfg, root, out)

    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [
        "01-synth-unfiltered-mosaic",
        "02-synth-unfiltered-bezier",
        "03-filter-mosaic",
        "04-filter-bezier",
        "05-synth-mosaic",
        "06-synth-bezier",
        "07-train-stage1",
        "08-eval-stage1",
        "09-pseudo-label",
        "10-train-stage2",
        "11-eval-stage2",
    ]
    assert all((out / f / STAGE_MARKER).is_file() for f in folders)
    assert set(summary["metrics"]) == {"stage1", "stage2"}
    for m in summary["metrics"].values():
        assert 0.0 <= m["miou"] <= 1.0
        assert set(m["iou"]) == set(cfg.train.data.classes or summary["classes"])
    for method in ("mosaic", "bezier"):
        assert summary["synthesis"][method]["images"] == 12
        assert summary["synthesis"][method]["acceptance_rate"] == pytest.approx(1.0)
        assert "val_accuracy" in summary["filters"][method]
    report = (out / "report.md").read_text()
    assert "| stage1 | test |" in report and "## Filters" in report
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (summary["status"], summary["stages_left"]) == ("complete", [])
    assert "Incomplete" not in report and "Total:" in report
    assert (out / "pipeline.yaml").is_file() and "torch" in (out / "versions.json").read_text()
    # Stage 2 trains on the pseudo-masks and the filtered synthetic sets.
    cfg2 = (out / "10-train-stage2" / "config.yaml").read_text()
    assert "09-pseudo-label" in cfg2 and "05-synth-mosaic" in cfg2 and "stage: 2" in cfg2


def test_rerun_skips_completed_stages(tmp_path: Path) -> None:
    root = _toy(tmp_path, "luad-histoseg")
    out = tmp_path / "run"
    cfg = load_pipeline_config(CONFIGS / "luad-histoseg.yaml", [*TINY, *ABLATIONS["no-stage2"]])
    run_pipeline(cfg, root, out)
    markers = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{STAGE_MARKER}")}
    summary = run_pipeline(cfg, root, out)
    assert all(s["skipped"] for s in summary["stages"])
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"*/{STAGE_MARKER}")} == markers
    # A different recipe in the same folder is refused rather than mixed in.
    other = apply_pipeline_overrides(cfg, ["synthesis.num=13"])
    with pytest.raises(PipelineError, match=r"another recipe \(synthesis\.num \d+ → 13\)"):
        run_pipeline(other, root, out)
    # So is another dataset folder: its completed stages would report the first one's scores.
    shutil.copytree(root, tmp_path / "copy")
    with pytest.raises(PipelineError, match=r"made from the data in .*; use a new --out"):
        run_pipeline(cfg, tmp_path / "copy", out)


def test_training_interrupted_mid_stage_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.training.run as training_run

    root = _toy(tmp_path, "luad-histoseg")
    out = tmp_path / "run"
    cfg = load_pipeline_config(
        CONFIGS / "luad-histoseg.yaml",
        [*TINY, *ABLATIONS["no-stage2"], *ABLATIONS["no-filter"], "train.trainer.epochs=2"],
    )
    real_train = training_run.train

    def killed_after_one_epoch(train_cfg):
        # Train one epoch of the two (its last.ckpt is written), then die as if killed.
        train_cfg.trainer.epochs = 1
        real_train(train_cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "train", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, root, out)
    stage = out / "03-train-stage1"
    assert (stage / "checkpoints" / "last.ckpt").is_file()
    assert not (stage / STAGE_MARKER).exists()
    synth_markers = {p: p.stat().st_mtime_ns for p in out.glob(f"0[12]-*/{STAGE_MARKER}")}

    monkeypatch.setattr(training_run, "train", real_train)
    summary = run_pipeline(cfg, root, out)
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(stage / "checkpoints" / "last.ckpt")
    assert metrics["epochs"] == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"0[12]-*/{STAGE_MARKER}")} == synth_markers
    assert [s["skipped"] for s in summary["stages"]] == [True, True, False, False]


def test_pipeline_killed_during_synthesis_resumes(tmp_path: Path) -> None:
    root = _toy(tmp_path, "luad-histoseg")
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "hisynseg",
        "pipeline",
        "--config",
        str(CONFIGS / "luad-histoseg.yaml"),
        "--data",
        str(root),
        "--out",
        str(out),
        "--ablation",
        "no-filter",
        "--ablation",
        "no-stage2",
        "--ablation",
        "mosaic-only",
        *TINY,
        "synthesis.num=3000",
        "train.trainer.limit_train_batches=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    img_dir = out / "01-synth-mosaic" / "img"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if img_dir.is_dir() and sum(1 for _ in img_dir.glob("*.png")) >= 50:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mask_dir = img_dir.parent / "mask"
    # An image counts as done when its mask is there too; a lone image is redone.
    before = {
        p.name: p.stat().st_mtime_ns for p in img_dir.glob("*.png") if (mask_dir / p.name).exists()
    }
    assert 40 <= len(before) < 3000, "the kill should land mid-stage"
    assert not (out / "01-synth-mosaic" / STAGE_MARKER).exists()
    # Files under their final names are whole: writes go to a temporary name first.
    for path in img_dir.glob("*.png"):
        with Image.open(path) as image:
            image.load()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in img_dir.glob("*.png")}
    assert len(after) == 3000
    # Images finished before the kill were kept as they were, not rewritten.
    assert all(after[name] == mtime for name, mtime in before.items())
    assert (out / "02-train-stage1" / STAGE_MARKER).is_file()


def test_ablations_remove_stages(tmp_path: Path) -> None:
    root = _toy(tmp_path, "luad-histoseg")
    from hisynseg.datasets.spec import get_dataset_spec

    spec = get_dataset_spec("luad-histoseg")
    base = load_pipeline_config(CONFIGS / "luad-histoseg.yaml")
    names = [s.name for s in build_stages(base, spec, root)]
    assert len(names) == 11
    for ablation, gone in [
        ("no-filter", {"synth-unfiltered-mosaic", "filter-mosaic", "filter-bezier"}),
        ("mosaic-only", {"synth-bezier", "filter-bezier", "synth-unfiltered-bezier"}),
        ("bezier-only", {"synth-mosaic", "filter-mosaic", "synth-unfiltered-mosaic"}),
        ("no-stage2", {"pseudo-label", "train-stage2", "eval-stage2"}),
    ]:
        cfg = apply_pipeline_overrides(base, ABLATIONS[ablation])
        assert gone.isdisjoint(s.name for s in build_stages(cfg, spec, root)), ablation
    cfg = apply_pipeline_overrides(base, ABLATIONS["no-consistency"])
    assert cfg.train.loss.w3 == 0 and cfg.train.data.real_unlabeled is False


def test_recipes_hold_the_paper_settings() -> None:
    luad = load_pipeline_config(CONFIGS / "luad-histoseg.yaml")
    bcss = load_pipeline_config(CONFIGS / "bcss-wsss.yaml")
    wsss = load_pipeline_config(CONFIGS / "wsss4luad.yaml")
    assert (luad.synthesis.num, bcss.synthesis.num, wsss.synthesis.num) == (3600, 7200, 3600)
    assert luad.synthesis.unfiltered == 10000
    assert luad.train.model.encoder == "efficientnet-b6"
    assert luad.train.model.encoder_weights == "imagenet"
    assert (luad.train.trainer.epochs, wsss.train.trainer.epochs) == (25, 60)
    assert (luad.train.optim.lr, luad.train.optim.weight_decay) == (1e-4, 0.05)
    assert (luad.train.data.batch_size_synthetic, luad.train.data.batch_size_real) == (32, 32)
    assert (luad.filter.epochs, luad.filter.lr, luad.filter.batch_size) == (5, 1e-3, 256)
    assert (luad.filter.cap, wsss.filter.cap) == (5000, None)
    assert wsss.synthesis.bezier["pairs"] == [[0, 1], [1, 0]]
    assert luad.stage2.enabled and bcss.stage2.enabled and not wsss.stage2.enabled


def test_shipped_recipes_are_found_by_name_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hisynseg.recipes import RECIPE_NAMES, recipe_path

    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in RECIPE_NAMES:
        path = recipe_path(name)
        assert path.is_file() and recipe_path(f"{name}.yaml") == path
        # The source tree's configs/ are the same files.
        assert (CONFIGS / f"{name}.yaml").read_text() == path.read_text()
    assert load_pipeline_config(recipe_path("toy")).train.data.patch_size == 64
    (tmp_path / "toy.yaml").write_text("dataset: bcss-wsss\n")
    assert recipe_path("toy.yaml") == Path("toy.yaml")  # an existing file comes first
    assert recipe_path("missing.yaml") == Path("missing.yaml")
    from hisynseg.config import ConfigError
    from hisynseg.recipes import find_recipe

    with pytest.raises(ConfigError, match=r"missing\.yaml: no such .*shipped: luad-histoseg"):
        find_recipe("missing.yaml")
    (tmp_path / "luad-histoseg").mkdir()  # a dataset folder named like a recipe
    assert (
        recipe_path("luad-histoseg") == recipe_path("luad-histoseg.yaml") != Path("luad-histoseg")
    )
    assert recipe_path("sub/toy.yaml") == Path("sub/toy.yaml")  # a path is never a name


def test_bad_override_and_bad_synthesis_parameter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid keys of filter"):
        load_pipeline_config(CONFIGS / "luad-histoseg.yaml", ["filter.epoch=3"])
    root = _toy(tmp_path, "luad-histoseg")
    code = main(
        [
            "pipeline",
            "--config",
            str(CONFIGS / "luad-histoseg.yaml"),
            "--data",
            str(root),
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "synthesis.mosaic.tile_sise=32",
        ]
    )
    assert code == 2


def test_an_interrupted_run_says_so_in_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.training.run as training_run

    root = _toy(tmp_path, "luad-histoseg")
    out = tmp_path / "run"
    cfg = load_pipeline_config(
        CONFIGS / "luad-histoseg.yaml",
        [*TINY, *ABLATIONS["no-stage2"], *ABLATIONS["no-filter"], *ABLATIONS["mosaic-only"]],
    )

    def interrupted(train_cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, root, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "incomplete"
    assert summary["stages_left"] == ["02-train-stage1", "03-eval-stage1"]
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("**Incomplete:** stages 2–3 not run yet")
    assert "re-run the same command to continue" in report[2]
    assert any(line.startswith("Total so far:") for line in report)


def test_a_finished_run_is_reported_complete(tmp_path: Path) -> None:
    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.pipeline.report import write_report
    from hisynseg.pipeline.stages import StageRecord

    cfg = load_pipeline_config(CONFIGS / "luad-histoseg.yaml")
    spec = get_dataset_spec("luad-histoseg")
    planned = ["01-synth-mosaic", "02-train-stage1", "03-eval-stage1"]
    records = [
        StageRecord(name.split("-", 1)[1], tmp_path / name, {}, 1.0, False) for name in planned
    ]
    done = write_report(tmp_path, cfg, spec, records, planned=planned)
    assert (done["status"], done["stages_left"]) == ("complete", [])
    assert "Incomplete" not in (tmp_path / "report.md").read_text()
    one_left = write_report(tmp_path, cfg, spec, records[:2], planned=planned)
    assert (one_left["status"], one_left["stages_left"]) == ("incomplete", ["03-eval-stage1"])
    assert "**Incomplete:** stage 3 not run yet" in (tmp_path / "report.md").read_text()


def test_filtered_synthesis_stopped_by_max_draws_gives_advice_that_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.synthesis.discriminator as disc
    from hisynseg.datasets.spec import get_dataset_spec

    root = _toy(tmp_path, "luad-histoseg")
    cfg = load_pipeline_config(
        CONFIGS / "luad-histoseg.yaml",
        [*TINY, *ABLATIONS["mosaic-only"], "synthesis.num=2", "synthesis.max_draws_factor=2"],
    )

    def keeps_nothing(path, **kwargs):
        return lambda images, masks, labels: np.zeros(len(images), dtype=bool)

    monkeypatch.setattr(disc, "load_filter", keeps_nothing)
    stage = next(
        s
        for s in build_stages(cfg, get_dataset_spec("luad-histoseg"), root)
        if s.name == "synth-mosaic"
    )
    folder = tmp_path / "03-synth-mosaic"
    with pytest.raises(PipelineError) as info:
        stage.run(folder, {"filter-mosaic": {"checkpoint": "unused.pt"}})
    message = str(info.value)
    # synthesize's flags (--max-draws, --keep-threshold) are not the pipeline's.
    assert "kept 0 of 2 images in 4 draws" in message
    assert "synthesis.max_draws_factor" in message and "new --out" in message
    assert "--max-draws" not in message


def test_filter_stage_replaces_an_outdated_filter_in_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hisynseg.synthesis.discriminator as disc
    from hisynseg.datasets.spec import get_dataset_spec

    calls: list[bool] = []

    def train_filter(root, spec, synthetic, out, *, method, config, overwrite=False):
        calls.append(overwrite)
        if not overwrite:
            raise disc.FilterExistsError(f"{out}: holds a filter trained for something else")
        return disc.FilterTrainResult(out, out / "filter.pt", [], 1, {}, {})

    monkeypatch.setattr(disc, "train_filter", train_filter)
    cfg = load_pipeline_config(CONFIGS / "luad-histoseg.yaml", [*TINY, *ABLATIONS["mosaic-only"]])
    spec = get_dataset_spec("luad-histoseg")
    stage = next(s for s in build_stages(cfg, spec, tmp_path) if s.name == "filter-mosaic")
    summary = stage.run(tmp_path / "02-filter-mosaic", {"synth-unfiltered-mosaic": {"out": "x"}})
    assert calls == [False, True] and summary["best_epoch"] == 1
