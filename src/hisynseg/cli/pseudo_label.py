"""``hisynseg pseudo-label``: stage-2 pseudo-masks of a dataset's real training images."""

from __future__ import annotations

import argparse

from hisynseg.datasets.spec import DATASET_NAMES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pseudo-label",
        help="predict pseudo-masks for the real training images (stage 2)",
        description="Predict every training image of ROOT with a stage-1 checkpoint and write "
        "pseudo-masks as a training set (OUT/img, OUT/mask, labels in the file names) for "
        "stage-2 training (METHOD.md §6). Single-label images get a constant mask of their "
        "class; multi-label images the argmax over their own classes only; white background "
        "(WSSS4LUAD-style data) the background index. Images are predicted at the training "
        "patch size with d4 test-time augmentation. OUT/pseudo_labels.json records the checkpoint "
        "and settings: a re-run with the same ones writes only missing masks, one with another "
        "checkpoint or other settings is refused unless --overwrite is given.",
        epilog="example: hisynseg pseudo-label runs/s1/checkpoints/best.ckpt data/LUAD-HistoSeg "
        "--dataset luad-histoseg --out pseudo/luad",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="stage-1 checkpoint")
    p.add_argument("root", metavar="ROOT", help="dataset root")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--out", required=True, help="output folder (img/, mask/)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="prediction size (default: the checkpoint's training patch size)",
    )
    p.add_argument("--tta", choices=("d4", "none"), default="d4", help="test-time augmentation")
    p.add_argument("--entropy", action="store_true", help="also write per-pixel entropy maps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the masks of an earlier run in OUT first (needed when OUT holds masks "
        "made by another checkpoint or with other settings)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.cli import CommandError
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.devices import resolve_device
    from hisynseg.inference.pseudo_labels import pseudo_label_dataset
    from hisynseg.models.checkpoint import load_segmenter

    try:
        spec = resolve_dataset_spec(args.dataset, args.root)
    except (KeyError, ValueError) as exc:
        # A missing or invalid generic classes.yaml: one line, exit 2, like the other commands.
        raise CommandError(str(exc.args[0] if exc.args else exc)) from None
    device = resolve_device(args.device)
    model, meta = load_segmenter(args.checkpoint, expected_spec=spec, map_location=device)
    patch = args.patch_size or ((meta.get("config") or {}).get("data") or {}).get("patch_size")
    summary = pseudo_label_dataset(
        model,
        args.root,
        spec,
        args.out,
        patch_size=patch,
        tta=None if args.tta == "none" else args.tta,
        device=device,
        batch_size=args.batch_size,
        save_entropy=args.entropy,
        progress=not args.no_progress,
        checkpoint=args.checkpoint,
        overwrite=args.overwrite,
    )
    print(
        f"pseudo-masks in {summary.out}: {summary.written} written "
        f"({summary.single_label} single-label, constant), {summary.skipped} already present, "
        f"{len(summary.failed)} failed"
    )
    for message in summary.failed:
        print(f"  failed: {message}")
    return 1 if summary.failed else 0
