"""``hisynseg train``: train the segmentation network (stage 1 or stage 2)."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from hisynseg.datasets.spec import DATASET_NAMES

if TYPE_CHECKING:
    from hisynseg.config import Config

_EPILOG = """\
Settings come from --config (YAML; defaults for anything it leaves out), then from the
flags, then from dotted overrides such as  trainer.epochs=3  loss.w3=0  data.num_workers=8
(an unknown key is an error that lists the valid ones).

Stage 1 trains on synthetic sets (--synthetic) plus, for the consistency loss, the real
training images (--no-unlabeled drops that branch). Stage 2 trains a fresh network on the
real images with pseudo-masks (--pseudo) plus the synthetic sets.

The run directory (--out) receives config.yaml, versions.json, checkpoints/best.ckpt
(best validation mIoU) and checkpoints/last.ckpt, TensorBoard and CSV logs under logs/,
and metrics.json. Re-running the same command resumes from checkpoints/last.ckpt. A resume
whose settings change the training (lr, losses, data, seed, ...) is refused: train those in
a new --out. More --epochs, other --devices, workers or logging are fine.

GPUs: mixed precision is used automatically. Several GPUs (--devices N) or machines
(--num-nodes M, same command on each node with MASTER_ADDR, MASTER_PORT and NODE_RANK set,
or under SLURM/torchrun) train with DDP; batch sizes are per GPU.

examples:
  hisynseg train --data data/LUAD-HistoSeg --dataset luad-histoseg \\
      --synthetic syn/mosaic syn/bezier --out runs/luad-s1
  hisynseg train --config default --data toy --synthetic toy-syn \\
      --epochs 2 trainer.limit_train_batches=5
"""


# A dotted "section.key=value" override (a folder name never looks like this in practice).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?=")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the segmentation network (stage 1 or 2)",
        description="Train DeepLabV3+ with a CAM head on synthetic images with masks and "
        "real images with image-level labels (HisynSeg stage 1), or on real images with "
        "pseudo-masks plus synthetic images (stage 2).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted configuration overrides, applied last",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="configuration file, or 'default' for the shipped one (default: built-in defaults)",
    )
    p.add_argument("--data", metavar="DIR", help="dataset root (data.root)")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="dataset layout (data.dataset)")
    p.add_argument(
        "--synthetic",
        nargs="+",
        metavar="DIR",
        help="synthetic set folders with img/ and mask/ (data.synthetic)",
    )
    p.add_argument(
        "--pseudo",
        metavar="DIR",
        help="stage 2: folder of real images with pseudo-masks (data.pseudo_masks)",
    )
    p.add_argument(
        "--no-unlabeled",
        action="store_true",
        help="stage 1 without the real-image consistency branch",
    )
    p.add_argument("--stage", type=int, choices=(1, 2), help="training stage (stage)")
    p.add_argument("--encoder", help="encoder name, e.g. resnet18, efficientnet-b6 (model.encoder)")
    p.add_argument("--epochs", type=int, help="training epochs (trainer.epochs)")
    p.add_argument(
        "--batch-size", type=int, help="images per batch for both the synthetic and the real loader"
    )
    p.add_argument("--out", metavar="DIR", help="run directory (out)")
    p.add_argument("--devices", help="devices per node: 'auto', a count, or ids like 0,1")
    p.add_argument("--num-nodes", type=int, help="machines for multi-node DDP")
    p.add_argument("--resume", metavar="CKPT", help="resume from this Lightning checkpoint")
    p.add_argument("--seed", type=int, help="random seed (trainer.seed)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Config:
    """The configuration the command line describes (file, then flags, then overrides)."""
    from hisynseg.config import Config, apply_overrides, load_config
    from hisynseg.recipes import find_recipe

    cfg = load_config(find_recipe(args.config)) if args.config else Config()
    d, t = cfg.data, cfg.trainer
    if args.data is not None:
        d.root = args.data
    if args.dataset is not None:
        d.dataset = args.dataset
    if args.pseudo is not None:
        d.pseudo_masks = args.pseudo
        # Pseudo-masks are stage 2's data: --pseudo alone means stage 2.
        if args.stage is None:
            cfg.stage = 2
    if args.no_unlabeled:
        d.real_unlabeled = False
    if args.stage is not None:
        cfg.stage = args.stage
    if args.encoder is not None:
        cfg.model.encoder = args.encoder
    if args.epochs is not None:
        t.epochs = args.epochs
    if args.batch_size is not None:
        d.batch_size_synthetic = d.batch_size_real = args.batch_size
    if args.out is not None:
        cfg.out = args.out
    if args.num_nodes is not None:
        t.num_nodes = args.num_nodes
    if args.resume is not None:
        t.resume = args.resume
    if args.seed is not None:
        t.seed = args.seed
    overrides = list(args.overrides)
    if args.synthetic is not None:
        # "--synthetic a b trainer.epochs=3": the greedy list swallows trailing overrides.
        d.synthetic = [p for p in args.synthetic if not _OVERRIDE.match(p)]
        overrides = [p for p in args.synthetic if _OVERRIDE.match(p)] + overrides
    if args.devices is not None:
        # Parsed like an override so that "2" becomes a count and "0,1" stays a list of ids.
        overrides.insert(0, f"trainer.devices={args.devices}")
    return apply_overrides(cfg, overrides)


def run(args: argparse.Namespace) -> int:
    from hisynseg.training.run import train

    result = train(build_config(args))
    best = result.metrics.get("best_val_miou")
    score = f"best validation mIoU {best:.4f}" if best is not None else "no validation score"
    print(
        f"trained {result.metrics['epochs']} epoch(s), {score}; "
        f"checkpoints in {result.out / 'checkpoints'}, metrics in {result.out / 'metrics.json'}"
    )
    return 0
