"""``hisynseg synthesize``: write Mosaic or Bézier images with masks from single-label patches."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from hisynseg.datasets.spec import DATASET_NAMES

# flag destination -> (parameter name, methods it applies to)
_PARAM_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "output_size": ("output_size", ("mosaic", "bezier")),
    "tiles_per_side": ("tiles_per_side", ("mosaic",)),
    "tile_size": ("tile_size", ("mosaic",)),
    "anchor_range": ("anchor_range", ("mosaic",)),
    "flip_p": ("flip_p", ("mosaic",)),
    "ssr_p": ("ssr_p", ("mosaic",)),
    "shift_limit": ("shift_limit", ("mosaic",)),
    "scale_limit": ("scale_limit", ("mosaic",)),
    "rotate_limit": ("rotate_limit", ("mosaic",)),
    "tile_sampling": ("tile_sampling", ("mosaic",)),
    "max_background_share": ("max_background_share", ("mosaic",)),
    "bezier_points": ("num_points", ("bezier",)),
    "min_distance": ("min_distance", ("bezier",)),
    "rad": ("rad", ("bezier",)),
    "edgy": ("edgy", ("bezier",)),
    "points_per_segment": ("points_per_segment", ("bezier",)),
    "pairs": ("pairs", ("bezier",)),
    "foreground_share": ("foreground_share", ("bezier",)),
    "resize_interpolation": ("resize_interpolation", ("bezier",)),
}


def _float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'LOW,HIGH', got {text!r}") from None
    return lo, hi


def _pairs(text: str) -> str | tuple[tuple[int, int], ...]:
    if text.strip().lower() == "random":
        return "random"
    try:
        pairs = tuple(
            (int(a), int(b))
            for a, b in (item.split(",") for item in text.replace(" ", "").split(";") if item)
        )
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'random' or class-index pairs 'BG,FG;BG,FG' (e.g. '0,1;1,0'), got {text!r}"
        ) from None
    return pairs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synthesize",
        help="synthesize Mosaic or Bézier images with pixel masks from single-label patches",
        description="Synthesize training images with exact pixel masks by mixing the "
        "single-label training patches of a dataset (HisynSeg, METHOD.md §3). Output: "
        "OUT/img, OUT/mask (palette PNG), manifest.csv, synthesis.json. The images depend "
        "only on the seed, the method and their index, whatever --workers; re-running the "
        "same command writes only missing images.",
    )
    p.add_argument("root", help="dataset root (in the layout of --dataset)")
    p.add_argument(
        "--dataset",
        required=True,
        help=f"dataset name: {', '.join(DATASET_NAMES)} (generic reads ROOT/classes.yaml)",
    )
    p.add_argument("--method", required=True, choices=("mosaic", "bezier"))
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes; 0 = all cores (default 1)"
    )
    p.add_argument(
        "--compress-level",
        type=int,
        default=6,
        help="PNG compression 0-9 (default 6; lower is faster, files larger)",
    )
    p.add_argument(
        "--png-strategy",
        choices=("rle", "default"),
        default="rle",
        help="zlib strategy of the RGB PNGs: rle (default; about as small on tissue, several times faster) "
        "or default (PIL, as the reference)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--output-size", type=int, help="side of the synthesized images (default 224)")

    m = p.add_argument_group("mosaic")
    m.add_argument("--tiles-per-side", type=int, help="tiles per grid side (default 2)")
    m.add_argument("--tile-size", type=int, help="tile side in pixels (default 112)")
    m.add_argument(
        "--anchor-range", type=_float_pair, help="anchor range 'LOW,HIGH' (default 0.2,0.8)"
    )
    m.add_argument("--flip-p", type=float, help="flip probability (default 0.8)")
    m.add_argument("--ssr-p", type=float, help="shift-scale-rotate probability (default 0.8)")
    m.add_argument("--shift-limit", type=float, help="shift limit (default 0.0625)")
    m.add_argument("--scale-limit", type=float, help="scale limit (default 0.2)")
    m.add_argument("--rotate-limit", type=float, help="rotation limit in degrees (default 45)")
    m.add_argument(
        "--tile-sampling",
        choices=("image", "class"),
        help="tile sources uniform over images (default, reference) or over classes",
    )
    m.add_argument(
        "--max-background-share",
        type=float,
        help="redraw a tile with more background than this fraction (default 0.8; the "
        "reference's effective limit was ~0.267)",
    )

    b = p.add_argument_group("bezier")
    b.add_argument("--bezier-points", type=int, help="points of the closed curve (default 5)")
    b.add_argument(
        "--min-distance", type=float, help="min point distance in the unit square (0.7/n)"
    )
    b.add_argument("--rad", type=float, help="control-point distance (default 0.2)")
    b.add_argument("--edgy", type=float, help="tangent blend (default 0.05)")
    b.add_argument("--points-per-segment", type=int, help="curve samples per segment (100)")
    b.add_argument(
        "--pairs",
        type=_pairs,
        help="'random' or (background,foreground) class pairs 'BG,FG;BG,FG' "
        "(default: random; WSSS4LUAD: '0,1;1,0')",
    )
    b.add_argument(
        "--foreground-share",
        type=_float_pair,
        help="redraw shapes whose area share is outside 'LOW,HIGH' (default 0.05,0.95)",
    )
    b.add_argument(
        "--resize-interpolation",
        choices=("auto", "nearest", "linear", "cubic", "area"),
        help="how sources are resized to the output size (default auto)",
    )

    f = p.add_argument_group("filter (image filtering module, METHOD.md §4)")
    f.add_argument(
        "--filter",
        metavar="CKPT",
        help="keep only images this discriminator (filter.pt from hisynseg train-filter, "
        "same dataset and method) finds real: p(real) > --keep-threshold; p(real) of each "
        "kept image goes in manifest.csv",
    )
    f.add_argument(
        "--keep-threshold",
        type=float,
        help="keep an image when p(real) exceeds this (default 0.5)",
    )
    f.add_argument(
        "--max-draws",
        type=int,
        help="give up after this many draws, keeping what was made, exit status 1 "
        "(default 20 x --num)",
    )
    f.add_argument(
        "--filter-device", default="auto", help="device of the filter (default auto: CUDA if any)"
    )
    p.set_defaults(func=run)


def _params(args: argparse.Namespace, spec: Any) -> Any:
    from hisynseg.synthesis.generate import default_params
    from hisynseg.synthesis.pool import SynthesisError

    overrides: dict[str, Any] = {}
    for dest, (name, methods) in _PARAM_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.method not in methods:
            flag = "--" + dest.replace("_", "-")
            raise SynthesisError(f"{flag} applies to --method {' or '.join(methods)} only")
        overrides[name] = value
    try:
        return dataclasses.replace(default_params(args.method, spec), **overrides)
    except ValueError as exc:
        raise SynthesisError(str(exc)) from None


def _held(out: Path) -> int | None:
    """The number of images ``synthesis.json`` says the folder holds."""
    import json

    try:
        return int(json.loads((out / "synthesis.json").read_text())["num"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(args: argparse.Namespace) -> int:
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.synthesis.generate import synthesize
    from hisynseg.synthesis.pool import SynthesisError

    try:
        spec = resolve_dataset_spec(args.dataset, args.root)
    except (KeyError, ValueError) as exc:
        raise SynthesisError(str(exc).strip("'\"")) from None
    params = _params(args, spec)
    keep = _load_filter(args, spec)
    summary = synthesize(
        args.root,
        spec,
        args.method,
        args.num,
        args.out,
        seed=args.seed,
        workers=args.workers,
        params=params,
        progress=not args.no_progress,
        compress_level=args.compress_level,
        png_strategy=args.png_strategy,
        keep=keep,
        keep_threshold=0.5 if args.keep_threshold is None else args.keep_threshold,
        max_draws=args.max_draws,
    )
    rate = summary.written / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"synthesize: {args.method} -> {summary.out}: {summary.written} written, "
        f"{summary.skipped} skipped (already present), {len(summary.failed)} failed, "
        f"{summary.seconds:.1f} s ({rate:.1f} images/s)"
    )
    held = _held(summary.out)
    if held is not None and held > summary.requested:
        print(
            f"  {summary.out} holds {held} images (more than --num {summary.requested}, from an "
            "earlier run); training and train-filter use them all"
        )
    for draw, message in summary.failed[:10]:
        print(f"  failed: image {draw}: {message}")
    if len(summary.failed) > 10:
        print(f"  ... and {len(summary.failed) - 10} more failures")
    if keep is not None:
        rate = summary.acceptance_rate
        print(
            f"filter: kept {summary.kept} of {summary.draws} draws "
            f"(acceptance rate {'n/a' if rate is None else f'{rate:.1%}'})"
        )
        if summary.stopped:
            print(f"hisynseg synthesize: {summary.stopped}", file=sys.stderr)
            return 1
    return 1 if summary.failed else 0


def _load_filter(args: argparse.Namespace, spec: Any) -> Any:
    """The discriminator scorer named by --filter (torch is imported only then), or None."""
    from hisynseg.synthesis.pool import SynthesisError

    if args.filter is None:
        for flag in ("keep_threshold", "max_draws"):
            if getattr(args, flag) is not None:
                raise SynthesisError(f"--{flag.replace('_', '-')} needs --filter")
        return None
    if args.keep_threshold is not None and not 0.0 <= args.keep_threshold <= 1.0:
        raise SynthesisError(f"--keep-threshold must be in [0, 1], got {args.keep_threshold}")
    if args.max_draws is not None and args.max_draws < 1:
        raise SynthesisError(f"--max-draws must be at least 1, got {args.max_draws}")
    from hisynseg.synthesis.discriminator import load_filter

    return load_filter(
        args.filter, dataset=spec, method=args.method, root=args.root, device=args.filter_device
    )
