"""``hisynseg export``: a trained checkpoint as a self-described ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

_EPILOG = """\
--onnx writes the segmentation branch as an ONNX graph (input 'image': ImageNet-normalised
float32 B×3×H×W, sides multiples of 16; output 'logits' B×C×H×W) with the classes,
palette and normalisation stored in its metadata, so 'hisynseg predict FILE.onnx ...'
runs it through onnxruntime with the same outputs as the checkpoint. After writing,
onnxruntime's logits are compared with torch's on a random input and the largest
difference printed. Needs pip install "hisynseg[onnx]".

example:
  hisynseg export runs/luad/stage2/checkpoints/best.ckpt --onnx luad.onnx
"""


# The network's bilinear upsampling (Resize with align_corners) needs opset 11 or newer;
# older ones fail deep inside torch.onnx after printing the whole graph.
MIN_OPSET = 11


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < MIN_OPSET:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_OPSET}, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (for onnxruntime and 'hisynseg predict')",
        description="Export a trained segmenter to ONNX, with its classes and palette.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="checkpoint (.ckpt from 'hisynseg train', or a model saved with "
        "hisynseg.models.export_segmenter)",
    )
    p.add_argument("--onnx", metavar="FILE", required=True, help="write the ONNX model here")
    p.add_argument(
        "--opset",
        type=_opset,
        default=17,
        help=f"ONNX opset version, at least {MIN_OPSET} (default 17)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip comparing onnxruntime's output with torch's on a random input",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hisynseg.inference.export_onnx import export_onnx, verify_onnx
    from hisynseg.models.checkpoint import load_segmenter

    model, meta = load_segmenter(args.checkpoint)
    export_onnx(model, args.onnx, dataset=meta.get("dataset"), opset=args.opset)
    size = Path(args.onnx).stat().st_size / 2**20
    line = f"wrote {args.onnx} ({size:.1f} MiB)"
    if not args.no_verify:
        diff = verify_onnx(model, args.onnx)
        line += f"; onnxruntime vs torch on a random input: max |logit difference| {diff:.2e}"
    print(line)
    return 0
