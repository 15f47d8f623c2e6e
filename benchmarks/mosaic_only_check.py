"""Slow check outside CI: a model trained only on synthetic mosaics segments real images.

On a generated problem whose classes are distinct textures, single-label patches feed
Mosaic synthesis; a DeepLabV3+ is trained on the synthetic mosaics alone (no real-image
branch, no consistency term) and scored on held-out images whose class boundaries are
natural curves (argmax of smooth random fields), not the mosaics' straight seams.
Target: test mIoU >= 0.9.

    python benchmarks/mosaic_only_check.py [--work DIR] [--epochs 6] [--num 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--patch", type=int, default=64, help="patch side in pixels")
    parser.add_argument("--num", type=int, default=600, help="synthetic mosaics")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from hisynseg.config import Config, validate_config
    from hisynseg.datasets.toy import make_toy_dataset
    from hisynseg.evaluation.evaluate import evaluate
    from hisynseg.evaluation.metrics import compute_scores, format_table
    from hisynseg.models.checkpoint import load_segmenter
    from hisynseg.synthesis.generate import default_params, synthesize
    from hisynseg.training.run import train

    work = Path(args.work or tempfile.mkdtemp(prefix="mosaic-only-"))
    start = time.perf_counter()
    toy = make_toy_dataset(
        work / "data",
        "luad-histoseg",
        single_per_class=20,
        multi_train=0,
        num_val=8,
        num_test=24,
        patch_size=args.patch,
        eval_size=(2 * args.patch, 2 * args.patch),
        seed=args.seed,
    )
    params = dataclasses.replace(
        default_params("mosaic"), tile_size=args.patch // 2, output_size=args.patch
    )
    synthesize(
        toy.root, toy.spec, "mosaic", args.num, work / "mosaic", seed=args.seed, params=params
    )

    cfg = Config()
    cfg.out = str(work / "train")
    cfg.data.root = str(toy.root)
    cfg.data.dataset = "luad-histoseg"
    cfg.data.synthetic = [str(work / "mosaic")]
    cfg.data.real_unlabeled = False  # synthetic mosaics only
    cfg.loss.w3 = 0.0
    cfg.data.patch_size = args.patch
    cfg.data.batch_size_synthetic = 16
    cfg.data.val_batch_size = 8
    cfg.data.num_workers = 0
    cfg.model.encoder = args.encoder
    cfg.optim.lr = 1e-3
    cfg.trainer.epochs = args.epochs
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.seed = args.seed
    validate_config(cfg)
    result = train(cfg)

    model, _ = load_segmenter(result.best_checkpoint, expected_spec=toy.spec)
    metrics = evaluate(model, toy.root, toy.spec, "test", tta="d4", device="cpu")
    seconds = time.perf_counter() - start

    scores = compute_scores(np.asarray(metrics["confusion_matrix"]))
    print(format_table(scores, toy.spec.class_names))
    print(
        f"mosaic-only training: {args.num} mosaics, {args.epochs} epochs, {args.encoder}; "
        f"test mIoU {metrics['miou']:.4f} on {metrics['num_images']} held-out images with "
        f"curved boundaries (target >= 0.9): {'PASS' if metrics['miou'] >= 0.9 else 'FAIL'}; "
        f"{seconds:.0f} s in all"
    )
    (work / "result.json").write_text(json.dumps({"miou": metrics["miou"], "seconds": seconds}))
    return 0 if metrics["miou"] >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
