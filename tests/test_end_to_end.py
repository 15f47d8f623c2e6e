"""Command line end to end: toy data → synthesize → train a few steps → evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from hisynseg.cli import main


def test_synthesize_train_evaluate_from_the_command_line(tmp_path: Path) -> None:
    data, synth, run = tmp_path / "data", tmp_path / "mosaic", tmp_path / "run"
    assert main(["toy-data", str(data), "--dataset", "bcss-wsss", "--patch-size", "64"]) == 0
    assert (
        main(
            [
                "synthesize",
                str(data),
                "--dataset",
                "bcss-wsss",
                "--method",
                "mosaic",
                "--num",
                "16",
                "--out",
                str(synth),
                "--tile-size",
                "32",
                "--output-size",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--dataset",
                "bcss-wsss",
                "--synthetic",
                str(synth),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(run),
                "data.patch_size=64",
                "data.num_workers=0",
                "data.val_batch_size=4",
                "trainer.accelerator=cpu",
                "trainer.limit_train_batches=3",
                "trainer.progress_bar=false",
            ]
        )
        == 0
    )
    ckpt = run / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and (run / "config.yaml").is_file() and (run / "versions.json").is_file()
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                str(data),
                "--dataset",
                "bcss-wsss",
                "--split",
                "test",
                "--tta",
                "d4",
                "--out",
                str(out),
                "--save-masks",
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["iou"]) == {"tumor", "stroma", "lymphocytic infiltrate", "necrosis"}
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["fwiou"] <= 1.0
    assert len(list((out / "masks").glob("*.png"))) == 4
