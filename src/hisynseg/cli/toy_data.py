"""``hisynseg toy-data``: write a tiny generated dataset in one of the real layouts."""

from __future__ import annotations

import argparse

from hisynseg.datasets.spec import DATASET_NAMES

# What `hisynseg train` accepts as data.patch_size (config.validate_config).
_PATCH_MULTIPLE = 32

_EPILOG = """\
OUT must be new or empty, so that it holds exactly the dataset reported. --overwrite
replaces a toy dataset written there before (a folder with toy.json and only toy-data's
files); any other folder is left alone.

The dataset is meant for every command: --patch-size is a multiple of 32 (what `train`
accepts), each class has at least one single-label image (the synthesis sources), and
there is at least one validation and one test image. `train-filter` also needs two or more
multi-label images (--multi).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "toy-data",
        help="write a tiny generated dataset (textured classes) in a benchmark's layout",
        description="Write a tiny generated dataset whose classes are distinct textures, "
        "in the exact layout and label encoding of a benchmark (or the generic layout). "
        "Useful to try every command without real data.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="folder to write the dataset into (new or empty)")
    p.add_argument(
        "--dataset",
        default="luad-histoseg",
        choices=DATASET_NAMES,
        help="layout and label encoding to imitate (default luad-histoseg)",
    )
    p.add_argument(
        "--single-per-class",
        type=int,
        default=6,
        help="single-label training images per class, at least 1 (default 6)",
    )
    p.add_argument(
        "--multi", type=int, default=12, help="training images with several classes (default 12)"
    )
    p.add_argument("--val", type=int, default=4, help="validation images, at least 1 (default 4)")
    p.add_argument("--test", type=int, default=4, help="test images, at least 1 (default 4)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=64,
        help="training patch side, a multiple of 32 (default 64)",
    )
    p.add_argument("--style", choices=("texture", "flat"), default="texture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a toy dataset already in OUT first (other folders are refused)",
    )
    p.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse settings that make a dataset the other commands cannot use.

    Raises:
        ToyDataError: The first unusable setting, named by its option.
    """
    from hisynseg.datasets.toy import MIN_PATCH_SIZE, ToyDataError

    if args.patch_size < MIN_PATCH_SIZE or args.patch_size % _PATCH_MULTIPLE:
        raise ToyDataError(
            f"--patch-size must be a multiple of {_PATCH_MULTIPLE} and at least "
            f"{MIN_PATCH_SIZE} (what train accepts), got {args.patch_size}"
        )
    minimum = {
        "--single-per-class": (args.single_per_class, 1, " (synthesis needs a source per class)"),
        "--multi": (args.multi, 0, ""),
        "--val": (args.val, 1, " (training validates on it)"),
        "--test": (args.test, 1, " (evaluate scores it)"),
    }
    for option, (value, least, why) in minimum.items():
        if value < least:
            raise ToyDataError(f"{option} must be at least {least}{why}, got {value}")


def run(args: argparse.Namespace) -> int:
    from hisynseg.datasets.toy import make_toy_dataset

    check_arguments(args)
    toy = make_toy_dataset(
        args.out,
        args.dataset,
        single_per_class=args.single_per_class,
        multi_train=args.multi,
        num_val=args.val,
        num_test=args.test,
        patch_size=args.patch_size,
        style=args.style,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"wrote a {toy.spec.name} toy dataset to {toy.root}: {toy.num_train} training images "
        f"({toy.num_single_label} single-label), {args.val} val, {args.test} test"
    )
    return 0
