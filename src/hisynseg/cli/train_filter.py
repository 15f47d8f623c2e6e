"""``hisynseg train-filter``: train the real-vs-synthetic discriminator of one synthetic set."""

from __future__ import annotations

import argparse

from hisynseg.datasets.spec import DATASET_NAMES

_EPILOG = """\
Real examples are the training images of ROOT with two or more labels; synthetic examples
are the (unfiltered) images in SYNTHETIC/img, made by one method (read from
SYNTHETIC/synthesis.json, or given with --method). Each side is split 80/20 (seeded), and
the training part of each side is capped (--cap; by default the paper's 5000 for
LUAD-HistoSeg, BCSS-WSSS and generic data, none for WSSS4LUAD).

OUT receives filter.pt (the epoch with the best validation accuracy, with its metadata),
metrics.csv / metrics.json / metrics.png (loss, accuracy, precision, recall, F1 per epoch;
positive class: real) and filter_config.json (resolved settings, library versions).
Use the filter with  hisynseg synthesize ... --filter OUT/filter.pt

An OUT that already holds a filter: trained for the same dataset, method, settings
(--device and --workers aside) and the same real and synthetic images, and finished, it is
kept and nothing is retrained (--overwrite retrains it); interrupted, it is trained again
from scratch. A filter trained for another method, dataset, settings or images is refused:
use a new --out, or --overwrite to delete it and train anew.

example:
  hisynseg synthesize data/LUAD-HistoSeg --dataset luad-histoseg --method mosaic \\
      --num 10000 --out syn/mosaic-unfiltered
  hisynseg train-filter data/LUAD-HistoSeg --dataset luad-histoseg \\
      --synthetic syn/mosaic-unfiltered --out filters/luad-mosaic
"""


def _cap(text: str) -> int | str | None:
    # "auto" (the default) is resolved per dataset once the dataset is known.
    if text.lower() == "auto":
        return "auto"
    if text.lower() in ("none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-filter",
        help="train the real-vs-synthetic image filter (ResNet-18) of a synthetic set",
        description="Train the image filtering module of HisynSeg: a ResNet-18 from scratch "
        "that tells real training images from synthesized ones. Its p(real) then decides "
        "which fresh synthetic images `hisynseg synthesize --filter` keeps.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="dataset root folder")
    p.add_argument(
        "--dataset",
        required=True,
        help=f"dataset layout and classes: one of {', '.join(DATASET_NAMES)} "
        "('generic' reads ROOT/classes.yaml)",
    )
    p.add_argument(
        "--synthetic",
        required=True,
        metavar="DIR",
        help="unfiltered synthesized set (DIR/img) made by one method",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--method",
        choices=("mosaic", "bezier"),
        help="synthesis method of --synthetic (default: read from DIR/synthesis.json)",
    )
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument(
        "--cap",
        type=_cap,
        default="auto",
        metavar="N",
        help="most training images per side after the split; 'none' or 0: no cap "
        "(default: 5000, none for wsss4luad, as in the paper)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each side held out for validation (default 0.2)",
    )
    p.add_argument(
        "--image-size", type=int, default=224, help="network input side in pixels (default 224)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of split, weights, shuffling")
    p.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="data-loading processes (default 0: in-process)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a filter in --out trained for something else, or retrain a finished one",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.cli import CommandError
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.synthesis.discriminator import (
        FilterTrainConfig,
        paper_cap,
        synthetic_set_method,
        train_filter,
    )

    try:
        spec = resolve_dataset_spec(args.dataset, args.root)
    except (KeyError, ValueError) as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    method = synthetic_set_method(args.synthetic, spec, args.method)
    config = FilterTrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        cap=paper_cap(spec) if args.cap == "auto" else args.cap,
        val_fraction=args.val_fraction,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
    )
    result = train_filter(
        args.root,
        spec,
        args.synthetic,
        args.out,
        method=method,
        config=config,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if result.skipped:
        print(
            f"{result.checkpoint}: already trained with these settings and images (epoch "
            f"{result.best_epoch} kept); nothing retrained (--overwrite retrains it)"
        )
        return 0
    c = result.counts
    print(
        f"trained on {c['train_real']} real + {c['train_synthetic']} synthetic images, "
        f"validated on {c['val_real']} + {c['val_synthetic']}"
    )
    print(result.history_table())
    print(f"wrote {result.checkpoint} (epoch {result.best_epoch}) and metrics to {result.out}")
    return 0
