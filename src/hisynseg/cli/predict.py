"""``hisynseg predict``: segment new images and whole-slide images with a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hisynseg.cli.arg_types import fraction, non_negative_int, positive_float, positive_int

_EPILOG = """\
INPUT is an image (PNG, JPEG, BMP), a TIFF (plain or pyramidal), a whole-slide image
(.svs, .ndpi through tifffile or OpenSlide; .mrxs, .vms, .scn, .bif through OpenSlide:
pip install "hisynseg[slides]"), or a folder of them (its subfolders are not searched).

The image is cut into overlapping tiles (--tile, --overlap) at the resolution the model
was trained at (--target-mpp, in µm per pixel; default: the file's native resolution).
The slide's own resolution comes from its metadata or from --mpp; a target resolution
without either is an error. Tiles of bare glass are skipped (--no-tissue-detection to
predict everything). Overlaps are blended with smooth weights, and the probabilities
stream into a disk-backed canvas at the output resolution (--output-downsample; by
default the smallest common divisor of tile and overlap keeping the output within
64 Mpx), so memory stays bounded whatever the slide's size.

Outputs in DIR, per input NAME (the file name without its suffix; inputs of the same
name in other folders get the folder's name in front: a/x.png, b/x.png give a_x, b_x):
NAME.mask.png (pictures) or NAME.mask.tif (pyramidal palette TIFF for TIFF/slide inputs),
NAME.overlay.png, NAME.areas.csv (µm² when the resolution is known), NAME.geojson (QuPath
annotations in level-0 pixels; File > Import objects), with --save-probs NAME.probs.npy
(H×W×C float16), and DIR/predict.json (options, versions, status of every input). Inputs
whose outputs exist are skipped unless --overwrite (outputs made from another version of
the input file, by another model or with other options are an error instead). A slide's
progress is saved every minute: re-running the same command after Ctrl-C, a time limit
or a crash goes on from there (also with --overwrite; --restart starts afresh; not on
Windows). A failing input is reported and skipped; the exit status is 0 when all inputs
succeeded, 1 otherwise (2: a usage error, such as an --out that cannot be written in).
Each input gets a line; with more than 50 inputs, only failures do, and a bar counts
the inputs.

CKPT may be a torch checkpoint (.ckpt from 'hisynseg train') or an .onnx file from
'hisynseg export' (onnxruntime: pip install "hisynseg[onnx]").

examples:
  hisynseg predict runs/luad/stage2/checkpoints/best.ckpt slides/ --out predictions \\
      --target-mpp 1.0 --tta d4 --device cuda
  hisynseg predict model.onnx patch.png --out pred --tile 224 --overlap 32
"""


# Inputs up to which every input gets its own line (above: only failures do).
LINES_UP_TO = 50


def _downsample(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


def _list_inputs(paths: list[str], out_dir: Path) -> list[Path]:
    """The files to predict, saying on stderr what the folders held that is not taken.

    A folder that is also the output folder holds the outputs of earlier runs: they are
    left out, or each re-run would predict the last one's masks and overlays. The output
    folder inside a listed folder is no forgotten subfolder either.
    """
    from hisynseg.inference.predict import OUTPUT_SUFFIXES
    from hisynseg.slides.open import INPUT_SUFFIXES, scan_inputs

    out = out_dir.resolve()
    # The outputs that would pass for inputs.
    pictures = ", ".join(f"*{s}" for s in OUTPUT_SUFFIXES if s.endswith(INPUT_SUFFIXES))

    def ours(path: Path) -> bool:
        if path.is_dir():
            return path.resolve() == out
        return path.name.endswith(OUTPUT_SUFFIXES) and path.parent.resolve() == out

    listing = scan_inputs(paths, leave_out=ours)
    for folder, count in listing.left_out.items():
        files = "file" if count == 1 else "files"
        print(
            f"hisynseg predict: {folder}: left out {count} {files} that predict wrote "
            f"({pictures}; it is also the --out folder)",
            file=sys.stderr,
        )
    for folder, count in listing.unsearched.items():
        what = "subfolder not searched (give it as an input)"
        if count > 1:
            what = "subfolders not searched (give them as inputs)"
        print(f"hisynseg predict: {folder}: {count} {what}", file=sys.stderr)
    return listing.files


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment images and whole-slide images (masks, overlays, areas, QuPath GeoJSON)",
        description="Segment new images and whole-slide images with a trained model: tiled, "
        "streaming prediction with palette masks, overlays, per-class areas and QuPath GeoJSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint, export, or .onnx file")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image, slide, or folder")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument(
        "--tile", type=positive_int, default=512, metavar="N", help="tile side (default 512)"
    )
    p.add_argument(
        "--overlap",
        type=non_negative_int,
        default=64,
        metavar="N",
        help="tile overlap (default 64)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="tiles per forward pass (8)"
    )
    p.add_argument(
        "--tta", choices=("none", "d4"), default="none", help="d4: average 8 flips/rotations"
    )
    p.add_argument(
        "--target-mpp",
        type=positive_float,
        metavar="UM",
        help="resolution the model runs at, µm/px (its training data's); default: native",
    )
    p.add_argument(
        "--mpp",
        type=positive_float,
        metavar="UM",
        help="the inputs' own resolution, µm/px (overrides the file's metadata)",
    )
    p.add_argument(
        "--output-downsample",
        type=_downsample,
        default=None,
        metavar="N|auto",
        help="model pixels per output pixel (must divide tile and overlap; default auto)",
    )
    p.add_argument(
        "--blend",
        choices=("gaussian", "cosine", "constant"),
        default="gaussian",
        help="weighting of overlapping tiles (default gaussian)",
    )
    p.add_argument(
        "--no-tissue-detection",
        action="store_true",
        help="predict every tile and pixel (default: skip glass, mark it background)",
    )
    p.add_argument(
        "--min-tissue",
        type=fraction,
        default=0.02,
        metavar="F",
        help="least tissue share of a tile to predict it (default 0.02)",
    )
    p.add_argument(
        "--mask-format",
        choices=("auto", "png", "tiff"),
        default="auto",
        help="auto: PNG for pictures, pyramidal TIFF for TIFF and slide files",
    )
    p.add_argument("--save-probs", action="store_true", help="also write NAME.probs.npy")
    p.add_argument("--no-geojson", action="store_true", help="skip the QuPath GeoJSON")
    p.add_argument("--overwrite", action="store_true", help="predict inputs again")
    p.add_argument(
        "--restart",
        action="store_true",
        help="delete the saved progress of interrupted slides and predict them from the "
        "first tile (default: go on from it)",
    )
    p.add_argument(
        "--max-tiles",
        type=positive_int,
        metavar="N",
        help="stop each input after N tiles (quick checks; the rest stays background)",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="threads or processes reading and decoding tiles ahead of the network "
        "(default: one per CPU core, at most 8)",
    )
    p.add_argument(
        "--tile-loader",
        choices=("auto", "threads", "processes"),
        default="auto",
        help="read tiles in threads, or in worker processes free of the GIL (what a fast "
        "GPU needs); auto: processes on a GPU for TIFF and OpenSlide inputs of 256 tiles "
        "or more with 4+ workers, threads otherwise (default: auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.devices import resolve_device
    from hisynseg.inference.backends import load_backend
    from hisynseg.inference.predict import (
        InputResult,
        PredictOptions,
        check_out_dir,
        predict_inputs,
    )

    options = PredictOptions(
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        target_mpp=args.target_mpp,
        mpp=args.mpp,
        output_downsample=args.output_downsample,
        blend=args.blend,
        tissue_detection=not args.no_tissue_detection,
        min_tissue=args.min_tissue,
        mask_format=args.mask_format,
        save_probs=args.save_probs,
        geojson=not args.no_geojson,
        overwrite=args.overwrite,
        max_tiles=args.max_tiles,
        progress=not args.no_progress,
        workers=args.workers,
        tile_loader=args.tile_loader,
        resume=not args.restart,
    )
    # Before the (possibly large) model is loaded.
    options.check()
    inputs = _list_inputs(args.inputs, Path(args.out))
    if not inputs:
        from hisynseg.cli import CommandError

        raise CommandError(f"no images or slides in {', '.join(args.inputs)}")
    out_dir = check_out_dir(args.out)
    device = resolve_device(args.device)
    tta = None if args.tta == "none" else args.tta
    backend, labels, meta = load_backend(args.checkpoint, device=device, tta=tta)

    from tqdm.auto import tqdm

    # A line per input while lines are worth reading; over a folder of many patches only
    # the failures, beside the progress bar over the inputs (predict.json has them all).
    every_line = len(inputs) <= LINES_UP_TO

    def report(result: InputResult) -> None:
        if result.status == "failed":
            tqdm.write(f"hisynseg predict: {result.error}", file=sys.stderr)
        elif not every_line:
            return
        elif result.status == "skipped":
            tqdm.write(f"{result.input}: skipped, outputs exist")
        else:
            d = result.details
            resumed = d.get("tiles_resumed", 0)
            earlier = f", {resumed} of them from the interrupted run" if resumed else ""
            tqdm.write(
                f"{result.input}: {d['tiles_predicted']} of {d['tiles_total']} tiles "
                f"({d['tiles_with_tissue']} with tissue{earlier}), {result.seconds:.1f} s "
                f"-> {result.outputs['mask']}"
            )

    # Outputs are skipped as done, and a slide's saved progress is resumed, only for the
    # same model (its bytes: a copied or moved file is the same model) run the same way
    # (on any device: the masks differ by float rounding at most).
    from hisynseg.datasets.io import sha256_of

    how = {k: v for k, v in backend.describe().items() if k != "device"}
    model_key = json.dumps(
        {"model_sha256": sha256_of(Path(args.checkpoint)), "run": how}, sort_keys=True
    )

    results = predict_inputs(
        inputs,
        backend,
        backend.num_classes,
        labels,
        out_dir,
        options,
        run_info={
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "model": meta.get("model"),
            **backend.describe(),
        },
        report=report,
        model_key=model_key,
    )
    failed = [r for r in results if r.status == "failed"]
    ok = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(
        f"predicted {ok}, skipped {skipped}, failed {len(failed)} of {len(results)} inputs; "
        f"see {Path(args.out) / 'predict.json'}"
    )
    return 1 if failed else 0
