"""``hisynseg toy-data``: write a tiny generated dataset in one of the real layouts."""

from __future__ import annotations

import argparse

from hisynseg.datasets.spec import DATASET_NAMES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "toy-data",
        help="write a tiny generated dataset (textured classes) in a benchmark's layout",
        description="Write a tiny generated dataset whose classes are distinct textures, "
        "in the exact layout and label encoding of a benchmark (or the generic layout). "
        "Useful to try every command without real data.",
    )
    p.add_argument("out", help="folder to write the dataset into")
    p.add_argument("--dataset", default="luad-histoseg", choices=DATASET_NAMES)
    p.add_argument(
        "--single-per-class",
        type=int,
        default=6,
        help="single-label training images per class (default 6)",
    )
    p.add_argument(
        "--multi", type=int, default=12, help="training images with several classes (default 12)"
    )
    p.add_argument("--val", type=int, default=4, help="validation images (default 4)")
    p.add_argument("--test", type=int, default=4, help="test images (default 4)")
    p.add_argument("--patch-size", type=int, default=64, help="training patch side (default 64)")
    p.add_argument("--style", choices=("texture", "flat"), default="texture")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.datasets.toy import make_toy_dataset

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
    )
    print(
        f"wrote a {toy.spec.name} toy dataset to {toy.root}: {toy.num_train} training images "
        f"({toy.num_single_label} single-label), {args.val} val, {args.test} test"
    )
    return 0
