"""``hisynseg validate-data``: check a dataset folder before training on it."""

from __future__ import annotations

import argparse

from hisynseg.cli.arg_types import non_negative_int
from hisynseg.datasets.spec import DATASET_NAMES

SPLIT_CHOICES = ("train", "val", "test")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate-data",
        help="check a dataset's layout, labels, images and masks; list every problem",
        description="Check a dataset folder in its benchmark layout (or the generic one): "
        "every image and mask decodes, every training file name carries a valid label, every "
        "class has single-label images, masks match their images in size and hold only class "
        "or background values. Prints counts per split and per class, mask values and image "
        "sizes, then every problem found, each naming its file. Exit status: 0 when clean, "
        "1 when problems were found, 2 on a usage error.",
    )
    p.add_argument("root", help="dataset root folder")
    p.add_argument(
        "--dataset",
        required=True,
        help=f"dataset layout and classes: one of {', '.join(DATASET_NAMES)} "
        "('generic' reads ROOT/classes.yaml)",
    )
    p.add_argument(
        "--splits",
        nargs="*",
        choices=SPLIT_CHOICES,
        default=list(SPLIT_CHOICES),
        metavar="SPLIT",
        help="splits to check, some of train val test (default: all; none with --synthetic "
        "checks only the synthesized sets); put ROOT before this option",
    )
    p.add_argument(
        "--synthetic",
        action="append",
        default=[],
        metavar="DIR",
        help="also check a synthesized set (DIR/img + DIR/mask): its file-name labels must "
        "equal the classes in its masks (repeatable)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="read image headers only (masks are still decoded); misses truncated images",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="threads reading files (default: 2x CPUs, max 8)"
    )
    p.add_argument(
        "--max-problems",
        # A negative N would slice from the end and silently hide problems.
        type=non_negative_int,
        default=None,
        metavar="N",
        help="print at most N problems, N >= 0 (default: all; the JSON report always has all)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.cli import CommandError
    from hisynseg.datasets.io import atomic_write_json
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.datasets.validate import validate_dataset

    try:
        spec = resolve_dataset_spec(args.dataset, args.root)
    except KeyError as exc:
        raise CommandError(str(exc.args[0])) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.workers is not None and args.workers < 1:
        raise CommandError("--workers must be at least 1")
    if not args.splits and not args.synthetic:
        raise CommandError("nothing to check: give --splits or --synthetic DIR")
    report = validate_dataset(
        args.root,
        spec,
        splits=tuple(args.splits),
        synthetic=tuple(args.synthetic),
        decode_images=not args.quick,
        workers=args.workers,
        progress=False if args.no_progress else None,
    )
    print(report.format(max_problems=args.max_problems))
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"report written to {args.json}")
    return 0 if report.ok else 1
