"""``hisynseg pipeline``: every stage of HisynSeg in order, resumable, with a report."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from hisynseg.pipeline.config import ABLATIONS

    p = subparsers.add_parser(
        "pipeline",
        help="run the whole method: synthesis, filters, stage 1, pseudo-masks, stage 2, evaluation",
        description="Run every stage of HisynSeg in order inside one run directory: unfiltered "
        "synthesis, filter training and filtered synthesis (both methods), stage-1 training, "
        "evaluation, pseudo-labelling, stage-2 training, evaluation. Each stage writes its own "
        "folder and marks itself complete; re-running the same command skips completed stages "
        "and resumes an interrupted one. Ends with report.md and summary.json.",
        epilog="Overrides take the dotted form at any depth, e.g. train.trainer.epochs=3 "
        "filter.enabled=false synthesis.num=500 synthesis.mosaic.tile_size=64.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="recipe YAML, or the name of a shipped recipe: luad-histoseg, bcss-wsss, "
        "wsss4luad, toy, demo (the files in configs/)",
    )
    p.add_argument("--data", required=True, help="dataset root in the recipe's layout")
    p.add_argument("--out", required=True, help="run directory (created, or resumed)")
    p.add_argument(
        "--ablation",
        action="append",
        default=[],
        choices=sorted(ABLATIONS),
        help="apply one of the paper's ablations (repeatable)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.pipeline.config import ABLATIONS, load_pipeline_config
    from hisynseg.pipeline.run import run_pipeline
    from hisynseg.recipes import find_recipe

    overrides = [o for name in args.ablation for o in ABLATIONS[name]] + list(args.overrides)
    cfg = load_pipeline_config(find_recipe(args.config), overrides)
    summary = run_pipeline(cfg, args.data, args.out)
    for stage, m in summary["metrics"].items():
        print(f"{stage}: mIoU {m['miou']:.4f}  FwIoU {m['fwiou']:.4f} ({m['split']})")
    print(f"report: {args.out}/report.md")
    return 0
