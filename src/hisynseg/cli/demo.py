"""``hisynseg demo``: HisynSeg on real H&E against a CAM baseline and a fully-supervised
upper bound, end to end on a CPU, with a report."""

from __future__ import annotations

import argparse
import shlex


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build the real-H&E demo dataset, run HisynSeg and two baselines, write a report",
        description="Build the real-H&E demo dataset (docs/demo-data.md), run the whole "
        "HisynSeg pipeline with a CPU-sized recipe (configs/demo.yaml), train a plain CAM "
        "baseline and a fully-supervised upper bound with the same network and budget, score "
        "all three on the held-out test images and write report.md, report.html and "
        "report.json with overlays and training curves. About 10 minutes on 2 CPU cores. "
        "Re-running the same command skips what is done.",
        epilog="Overrides change the recipe, e.g. train.trainer.epochs=3 stage2.enabled=true.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--config", default=None, help="recipe YAML (default: configs/demo.yaml)")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start every encoder from ImageNet weights (downloads them; default: random "
        "weights, works offline)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--cache-dir", default=None, help="cache of the source images (default: user cache)"
    )
    p.add_argument(
        "--no-cam-gate",
        action="store_true",
        help="CAM baseline: argmax over all classes, not only those it predicts for the image",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The command line as it would be typed, for the report."""
    words = ["hisynseg", "demo", "--out", args.out]
    if args.config:
        words += ["--config", args.config]
    if args.pretrained:
        words.append("--pretrained")
    if args.threads:
        words += ["--threads", str(args.threads)]
    if args.cache_dir:
        words += ["--cache-dir", args.cache_dir]
    if args.no_cam_gate:
        words.append("--no-cam-gate")
    return shlex.join([*words, *args.overrides])


def run(args: argparse.Namespace) -> int:
    from hisynseg.demo.run import METHOD_LABELS, run_demo

    report = run_demo(
        args.out,
        config=args.config,
        overrides=args.overrides,
        pretrained=args.pretrained,
        threads=args.threads,
        cache_dir=args.cache_dir,
        cam_gate=not args.no_cam_gate,
        command=_command(args),
    )
    for key, m in report["methods"].items():
        print(f"{METHOD_LABELS[key]}: mIoU {m['miou']:.4f}  FwIoU {m['fwiou']:.4f}")
    return 0
