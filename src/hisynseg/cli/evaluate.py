"""``hisynseg evaluate``: score a trained checkpoint on a dataset's val or test split."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hisynseg.cli.arg_types import positive_int
from hisynseg.datasets.spec import DATASET_NAMES

_EPILOG = """\
Metrics come from one confusion matrix over the whole split; ground-truth background /
exclude pixels are not scored. Images of the training patch size are predicted whole.
Large images (WSSS4LUAD, or any run given --window/--stride/--scales) are predicted by
sliding windows at several scales; defaults: window = the checkpoint's training patch
size, stride = window/2 and scales 1,1.25,1.5,1.75,2 at test, stride = window and scale 1
at validation (the paper's settings).

The output folder (default: eval-<split> next to the checkpoint) receives metrics.json
and evaluation.json (the resolved settings); with --save-masks also masks/ (palette PNGs
of the predictions) and overlays/ (prediction over the image, and image | ground truth |
prediction panels).

examples:
  hisynseg evaluate runs/luad-s1/checkpoints/best.ckpt data/LUAD-HistoSeg \\
      --dataset luad-histoseg --split test --tta d4
  hisynseg evaluate best.ckpt data/WSSS4LUAD --dataset wsss4luad --split test --tta d4 \\
      --save-masks --device cuda
"""


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scales must be comma-separated numbers such as 1,1.25,1.5; got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers; got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on the val or test split (IoU per class, mIoU, FwIoU)",
        description="Evaluate a trained segmenter on a dataset's val or test split: prints "
        "per-class IoU, mIoU and FwIoU, writes metrics.json, and optionally the predicted "
        "masks and overlays.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt from 'hisynseg train')")
    p.add_argument("root", help="dataset root folder")
    p.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="dataset layout and classes ('generic' reads ROOT/classes.yaml); default: the "
        "dataset the checkpoint was trained on",
    )
    p.add_argument("--split", choices=("val", "test"), default="test", help="default: test")
    p.add_argument(
        "--tta",
        choices=("none", "d4"),
        help="test-time augmentation: d4 averages the logits over 8 flips/rotations "
        "(default: d4 on the test split, the paper's setting; none on val)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: CKPT_DIR/eval-SPLIT)")
    p.add_argument(
        "--save-masks",
        action="store_true",
        help="also write predicted palette masks (DIR/masks) and overlays (DIR/overlays)",
    )
    p.add_argument("--window", type=positive_int, metavar="N", help="sliding-window side")
    p.add_argument("--stride", type=positive_int, metavar="N", help="step between windows")
    p.add_argument(
        "--scales", type=_scales, metavar="S,S,...", help="scales, e.g. 1,1.25,1.5,1.75,2"
    )
    p.add_argument(
        "--gate-absent-classes",
        action="store_true",
        help="validation only: the reference code's gating (classes absent from an image's "
        "ground truth cannot be predicted there); inflates scores, refused with --split test",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        metavar="N",
        help="images (or windows) per forward pass (default 16)",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def _patch_size(meta: dict[str, Any]) -> int | None:
    """The training patch size a checkpoint records, if any."""
    config = meta.get("config") or {}
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("patch_size") if isinstance(data, dict) else None
    return int(size) if size else None


def _trained_on(meta: dict[str, Any], checkpoint: Path, root: Path) -> str:
    """The dataset to evaluate on when ``--dataset`` is left out: the checkpoint's.

    A benchmark is recorded by name; a generic dataset by the name in its classes.yaml,
    so for one of those the data root's own classes.yaml is read (and its classes are
    checked against the checkpoint's).
    """
    from hisynseg.cli import CommandError
    from hisynseg.datasets.spec import GENERIC_CLASSES_FILE

    name = (meta.get("dataset") or {}).get("name")
    if name in DATASET_NAMES:
        return str(name)
    if name and (root / GENERIC_CLASSES_FILE).is_file():
        return "generic"
    raise CommandError(
        f"{checkpoint}: trained on {name!r}, which is no benchmark, and {root} has no "
        f"{GENERIC_CLASSES_FILE}; pass --dataset"
    )


def run(args: argparse.Namespace) -> int:
    from hisynseg.cli import CommandError
    from hisynseg.datasets.io import atomic_write_json
    from hisynseg.datasets.layouts import list_split
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.evaluation.evaluate import evaluate, resolve_settings
    from hisynseg.evaluation.metrics import compute_scores, format_table
    from hisynseg.models.checkpoint import check_checkpoint_classes, load_segmenter

    checkpoint = Path(args.checkpoint)
    # Without --dataset the checkpoint says which one: it is read once, now.
    loaded = None if args.dataset else load_segmenter(checkpoint)
    dataset = args.dataset or _trained_on(loaded[1], checkpoint, Path(args.root))
    try:
        spec = resolve_dataset_spec(dataset, args.root)
    except (KeyError, ValueError) as exc:
        raise CommandError(str(exc.args[0] if exc.args else exc)) from None
    chosen = args.tta or ("d4" if args.split == "test" else "none")
    tta = None if chosen == "none" else chosen
    out = Path(args.out) if args.out else checkpoint.parent / f"eval-{args.split}"
    options = {
        "tta": tta,
        "window": args.window,
        "stride": args.stride,
        "scales": args.scales,
        "gate_absent_classes": args.gate_absent_classes,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    # Settings are checked before the (possibly large) checkpoint is read.
    resolve_settings(spec, args.split, **options)
    if loaded is None:
        loaded = load_segmenter(checkpoint, expected_spec=spec)
    else:
        check_checkpoint_classes(loaded[1], spec, checkpoint)
    model, meta = loaded
    patch_size = _patch_size(meta)
    settings = resolve_settings(spec, args.split, **options, patch_size=patch_size)
    options["device"] = settings.device
    header = {
        "checkpoint": str(checkpoint.resolve()),
        "root": str(Path(args.root).resolve()),
        "dataset": spec.to_dict(),
        "model": meta.get("model"),
        "checkpoint_kind": meta.get("kind"),
        "epoch": meta.get("epoch"),
        "patch_size": patch_size,
        "settings": settings.to_dict(),
    }
    # A metrics.json, masks or overlays left by an earlier run must not pass for this
    # run's results (only the files an evaluation of this split writes are removed).
    (out / "metrics.json").unlink(missing_ok=True)
    for pair in list_split(args.root, spec, args.split):
        stem = pair.image.stem
        for old in (f"masks/{stem}.png", f"overlays/{stem}.png", f"overlays/{stem}_panel.png"):
            (out / old).unlink(missing_ok=True)
    for folder in (out / "masks", out / "overlays"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    atomic_write_json(out / "evaluation.json", header)
    result = evaluate(
        model,
        args.root,
        spec,
        args.split,
        **options,
        patch_size=patch_size,
        save_masks_dir=out if args.save_masks else None,
        progress=not args.no_progress,
    )
    result["checkpoint"] = header["checkpoint"]
    result["root"] = header["root"]
    atomic_write_json(out / "metrics.json", result)
    scores = compute_scores(result["confusion_matrix"])
    mode = (
        f"sliding windows {settings.window}/{settings.stride}, scales "
        + ",".join(f"{s:g}" for s in settings.scales)
        if settings.sliding
        else "whole images"
    )
    print(
        f"{spec.name} {args.split}: {result['num_images']} images, {mode}, "
        f"TTA {tta or 'none'}, {result['seconds']:.1f} s"
    )
    print(format_table(scores, spec.class_names))
    print(f"wrote {out / 'metrics.json'}")
    return 0
