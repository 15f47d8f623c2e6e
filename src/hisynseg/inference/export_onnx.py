"""Exporting a trained segmenter to ONNX, self-described for ``hisynseg predict``.

The graph takes ImageNet-normalised ``B×3×H×W`` float32 images (any batch; sides
multiples of the network's input divisor) and returns the segmentation logits
``B×C×H×W``. The model description, the dataset's classes and palette, the
normalisation and the input divisor are stored as JSON under the ``hisynseg`` metadata
key, so ``predict`` needs nothing but the ``.onnx`` file. Exporting needs the ``onnx``
package, running it ``onnxruntime`` (``pip install "hisynseg[onnx]"``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hisynseg.datasets.io import atomic_path
from hisynseg.errors import HisynsegError

__all__ = [
    "ONNX_FORMAT",
    "ONNX_METADATA_KEY",
    "export_onnx",
    "import_onnxruntime",
    "verify_onnx",
]

ONNX_FORMAT = "hisynseg-segmenter-onnx"
ONNX_METADATA_KEY = "hisynseg"


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an error that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise HisynsegError(
            'running ONNX models needs onnxruntime: pip install "hisynseg[onnx]"'
        ) from None
    return onnxruntime


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise HisynsegError('exporting to ONNX needs onnx: pip install "hisynseg[onnx]"') from None
    return onnx


def export_onnx(
    model: Any,
    path: str | os.PathLike[str],
    dataset: Mapping[str, Any] | None = None,
    opset: int = 17,
    sample_size: int = 64,
) -> dict[str, Any]:
    """Write ``model``'s segmentation branch as an ONNX graph, atomically.

    Args:
        model: A :class:`hisynseg.models.HisynSegNet` (or any module whose forward returns
            ``SegmenterOutput`` or logits); put in eval mode for the export.
        path: Destination ``.onnx`` file.
        dataset: The dataset description (``DatasetSpec.to_dict()``) to store.
        opset: ONNX opset version.
        sample_size: Side of the example input traced (a multiple of the input divisor).

    Returns:
        The metadata stored in the file.

    Raises:
        HisynsegError: onnx is missing, or the export failed.
    """
    import torch

    from hisynseg.normalization import IMAGENET_MEAN, IMAGENET_STD

    onnx = _import_onnx()
    divisor = int(getattr(model, "input_divisor", 16))
    sample_size = max(divisor, sample_size // divisor * divisor)

    class _Logits(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return out.seg_logits if hasattr(out, "seg_logits") else out

    was_training = model.training
    # The exporter restores the wrapper's mode afterwards; a wrapper left in training
    # mode would switch the network to training mode (batch-norm statistics) too.
    wrapper = _Logits(model).eval()
    meta = {
        "format": ONNX_FORMAT,
        "version": 1,
        "model": model.config() if hasattr(model, "config") else None,
        "dataset": dict(dataset) if dataset is not None else None,
        "input_divisor": divisor,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "image: ImageNet-normalised float32 B×3×H×W",
        "output": "logits: float32 B×C×H×W",
    }
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}}
    dynamic["logits"] = dynamic["image"]
    example = torch.zeros(1, 3, sample_size, sample_size)
    path = Path(path)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of torch.export,
            # which needs onnxscript; it still exports these networks exactly.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
            onnx.save(proto, str(tmp))
    except HisynsegError:
        raise
    except Exception as exc:
        raise HisynsegError(f"{path}: ONNX export failed ({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was_training)
    return meta


def verify_onnx(model: Any, path: str | os.PathLike[str], size: int = 64, seed: int = 0) -> float:
    """Largest absolute difference between torch's and onnxruntime's logits on noise.

    Args:
        model: The network that was exported (eval mode is used).
        path: The ``.onnx`` file.
        size: Side of the random test input (rounded to the input divisor).
        seed: Random seed of the input.
    """
    import numpy as np
    import torch

    ort = import_onnxruntime()
    divisor = int(getattr(model, "input_divisor", 16))
    size = max(divisor, size // divisor * divisor)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(x)
        ref = (out.seg_logits if hasattr(out, "seg_logits") else out).float().numpy()
    finally:
        model.train(was_training)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - ref).max())
