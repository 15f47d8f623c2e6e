"""One callable for prediction, whatever runs the network: torch or onnxruntime.

A backend maps a batch of ``B×H×W×3`` ``uint8`` RGB tiles to ``B×C×H×W`` ``float32``
class probabilities. Both backends share the evaluation code's preprocessing (ImageNet
mean/std, padding to the network's input divisor, optional d4 TTA averaging logits,
then softmax): only the network call differs, so an ONNX export predicts what its
checkpoint predicts.

A batch is normalised in one go on the backend's device (a CUDA batch is uploaded as
``uint8`` through a reused page-locked buffer) by
:func:`hisynseg.normalization.normalise_uint8`, the function the evaluation code's
per-image :func:`~hisynseg.evaluation.evaluate.normalise_image` uses, so the values are
identical. :meth:`Backend.pooled` also averages the probabilities over
``d×d`` blocks on the device, so a whole-slide prediction at a reduced output resolution
copies ``d²`` times less back to the host.

:meth:`Backend.launch` starts a batch without waiting for it. On a CUDA device the
upload, the network and the copy back are queued on the stream and the call returns, so
the host can stage the next batch and blend the previous one while the device computes:
a device that waits for the host between batches idles for the staging copy, the
transfers and the Python work of every batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hisynseg.errors import HisynsegError
from hisynseg.evaluation.evaluate import score_function
from hisynseg.inference.export_onnx import ONNX_FORMAT, ONNX_METADATA_KEY, import_onnxruntime
from hisynseg.inference.outputs import ClassLabels
from hisynseg.normalization import normalise_uint8

__all__ = ["Backend", "OnnxNetwork", "PendingProbabilities", "load_backend"]

# Page-locked upload buffers used in turn: one batch can upload while the previous one
# is still in its buffer, queued behind the network.
_STAGING_BUFFERS = 2


def _page_locked(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor in page-locked memory, which CUDA copies asynchronously."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class PendingProbabilities:
    """Probabilities of a batch that the device may still be computing.

    Args:
        host: Where the probabilities are (or will be, once the device is done).
        ready: CUDA event recorded after the copy into ``host``; ``None`` when ``host``
            already holds them.
    """

    def __init__(self, host: torch.Tensor, ready: Any = None) -> None:
        self._host = host
        self._ready = ready

    def done(self) -> bool:
        """Whether :meth:`result` returns without waiting."""
        return self._ready is None or bool(self._ready.query())

    def result(self) -> np.ndarray:
        """``B×C×h×w`` ``float32`` probabilities (waits for the device if need be)."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host.numpy()


class Backend:
    """RGB tiles → class probabilities, through any network that maps normalised
    ``B×3×H×W`` tensors to ``B×C×H×W`` logits.

    Args:
        network: A segmenter (``forward`` returns ``SegmenterOutput`` or logits) or an
            :class:`OnnxNetwork`. Must have ``input_divisor`` (16 by default).
        num_classes: ``C``.
        device: Torch device the tiles are normalised on (and the network runs on).
        tta: ``"d4"`` averages the logits over the eight flips/rotations; ``None`` not.
        name: ``"torch"`` or ``"onnxruntime"`` (recorded in ``predict.json``).
    """

    def __init__(
        self,
        network: Any,
        num_classes: int,
        device: str = "cpu",
        tta: str | None = None,
        name: str = "torch",
    ) -> None:
        if tta not in (None, "none", "d4"):
            raise HisynsegError(f"unknown test-time augmentation {tta!r}; expected none or d4")
        self.network = network
        self.num_classes = int(num_classes)
        self.device = str(device)
        self.tta = None if tta == "none" else tta
        self.name = name
        # Where the network runs, which decides how tiles are best read (an ONNX network
        # on onnxruntime's CUDA provider is fed from the CPU but runs on the GPU).
        self.accelerated = not self.device.startswith("cpu") or bool(
            getattr(network, "uses_gpu", False)
        )
        self._score = score_function(network, self.tta)
        self._cuda = self.device.startswith("cuda")
        # Page-locked staging buffers and, per buffer, the event after its last upload.
        self._staging: list[torch.Tensor | None] = [None] * _STAGING_BUFFERS
        self._uploaded: list[Any] = [None] * _STAGING_BUFFERS
        self._next_staging = 0

    def normalise(self, tiles: np.ndarray) -> torch.Tensor:
        """``B×3×H×W`` float tensor on the device: ImageNet mean/std of ``uint8`` tiles."""
        array = np.ascontiguousarray(tiles, dtype=np.uint8)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise HisynsegError(f"expected B×H×W×3 RGB tiles, got an array of {array.shape}")
        if not array.flags.writeable:  # torch wants writable memory
            array = array.copy()
        x = torch.from_numpy(array)
        x = self._upload(x) if self._cuda else x.to(self.device)
        return normalise_uint8(x)

    def _upload(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the CUDA device through a page-locked buffer, without waiting for it."""
        i = self._next_staging
        self._next_staging = (i + 1) % _STAGING_BUFFERS
        buffer = self._staging[i]
        if buffer is None or buffer.shape != x.shape:
            buffer = self._staging[i] = _page_locked(x.shape, torch.uint8)
        elif self._uploaded[i] is not None:
            # The buffer's previous batch may still be queued for upload behind the
            # network; overwriting it before then would upload the wrong tiles.
            self._uploaded[i].synchronize()
        buffer.copy_(x)
        on_device = buffer.to(self.device, non_blocking=True)
        self._uploaded[i] = self._record_event()
        return on_device

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``B×C×H×W`` ``float32`` probabilities of ``B×H×W×3`` ``uint8`` RGB tiles."""
        return self.pooled(tiles, 1)

    def pooled(self, tiles: np.ndarray, factor: int) -> np.ndarray:
        """Probabilities averaged over ``factor×factor`` blocks (on the device).

        Args:
            tiles: ``B×H×W×3`` ``uint8`` RGB, ``H`` and ``W`` multiples of ``factor``.
            factor: Side of the blocks (1: the probabilities themselves).

        Returns:
            ``B×C×(H/factor)×(W/factor)`` ``float32``.
        """
        return self.launch(tiles, factor).result()

    def launch(self, tiles: np.ndarray, factor: int = 1) -> PendingProbabilities:
        """Start :meth:`pooled` on a batch and return without waiting for the device.

        On a CUDA device the tiles are copied to a page-locked buffer (so ``tiles`` may
        be reused when this returns) and everything else is queued; elsewhere the batch
        is computed before this returns. Results come back in launch order on the stream,
        so batches can be launched one after another.

        Args:
            tiles: ``B×H×W×3`` ``uint8`` RGB, ``H`` and ``W`` multiples of ``factor``.
            factor: Side of the blocks averaged on the device (1: none).

        Returns:
            The batch's probabilities, ``B×C×(H/factor)×(W/factor)`` when ready.
        """
        with torch.inference_mode():
            probs = self._score(self.normalise(tiles)).softmax(dim=1).float()
            if factor > 1:
                probs = F.avg_pool2d(probs, factor)
            if not self._cuda:
                return PendingProbabilities(probs.cpu())
            # Contiguous on the device, so the copy back is one plain transfer.
            probs = probs.contiguous()
            host = _page_locked(probs.shape, torch.float32)
            host.copy_(probs, non_blocking=True)
            return PendingProbabilities(host, self._record_event())

    def _record_event(self) -> Any:
        """A CUDA event after the work queued so far on the device's current stream
        (the stream its tensors' kernels run on, whichever device is current)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(torch.device(self.device)))
        return event

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "tta": self.tta}


class OnnxNetwork:
    """An exported segmenter run by onnxruntime, callable like the torch network.

    Args:
        path: ``.onnx`` file written by :func:`hisynseg.inference.export_onnx.export_onnx`.
        device: ``"cuda"`` uses onnxruntime's CUDA provider when it has one.

    Attributes:
        meta: The description stored in the file (``model``, ``dataset``,
            ``input_divisor``, ...); empty for a foreign ONNX file.
        input_divisor: Sides the graph accepts must be multiples of this.
        uses_gpu: Whether onnxruntime runs it with its CUDA provider.

    Raises:
        HisynsegError: onnxruntime missing, or the file cannot be loaded.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        providers = ["CPUExecutionProvider"]
        if (
            str(device).startswith("cuda")
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        if not self.path.is_file():
            raise HisynsegError(f"{self.path}: ONNX model not found")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:
            raise HisynsegError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        self.meta: dict[str, Any] = json.loads(raw) if raw else {}
        if self.meta and self.meta.get("format") != ONNX_FORMAT:
            raise HisynsegError(
                f"{self.path}: unknown hisynseg ONNX format {self.meta.get('format')!r}"
            )
        self.input_divisor = int(self.meta.get("input_divisor", 16))
        self.input_name = self.session.get_inputs()[0].name
        self.uses_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B×C×H×W`` of a normalised batch."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: arr})[:1]
        return torch.from_numpy(logits).to(x.device)


def load_backend(
    path: str | os.PathLike[str],
    device: str = "cpu",
    tta: str | None = None,
) -> tuple[Backend, ClassLabels, dict[str, Any]]:
    """The backend of a checkpoint, export or ``.onnx`` file, with its classes.

    Args:
        path: A ``.ckpt``/export (torch) or an ``.onnx`` file (onnxruntime).
        device: Torch device (``"cpu"``, ``"cuda"``).
        tta: ``"d4"`` or ``None``.

    Returns:
        ``(backend, labels, meta)``; ``meta`` is the stored description.

    Raises:
        CheckpointError: Unreadable or foreign checkpoint.
        HisynsegError: An ONNX file onnxruntime cannot load, or onnxruntime missing.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        net = OnnxNetwork(path, device)
        meta = dict(net.meta)
        channels = net.session.get_outputs()[0].shape[1]
        num_classes = (
            channels
            if isinstance(channels, int)
            else int((meta.get("model") or {}).get("num_classes", 0))
        )
        if num_classes < 1:
            raise HisynsegError(f"{path}: cannot tell the number of classes of this ONNX model")
        backend = Backend(net, num_classes, device="cpu", tta=tta, name="onnxruntime")
    else:
        from hisynseg.models.checkpoint import load_segmenter

        model, meta = load_segmenter(path, map_location=device)
        # Tiles arrive as B×H×W×3, so the normalised batch is already channels-last; the
        # weights in the same layout spare every convolution a reorder (about 15 % faster
        # on a CPU, the same values to float rounding).
        model = model.to(memory_format=torch.channels_last)
        num_classes = int(model.num_classes)
        backend = Backend(model, num_classes, device=device, tta=tta, name="torch")
    dataset = meta.get("dataset")
    labels = ClassLabels.from_dataset_dict(dataset) if dataset else ClassLabels.default(num_classes)
    if len(labels.names) != num_classes:
        raise HisynsegError(
            f"{path}: the model has {num_classes} outputs but its description names "
            f"{len(labels.names)} classes"
        )
    return backend, labels, meta
