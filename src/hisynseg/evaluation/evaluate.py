"""Evaluate a trained segmenter on one split of a dataset (METHOD §7).

One confusion matrix is accumulated over the whole split; ground-truth pixels with the
background/exclude index are not scored. Images are read, predicted and scored one at a
time (patch-sized images a few at a time), so memory follows one image, never the set.

Two ways to predict an image:

* **whole**: the image goes through the network as it is (padded by reflection to a side
  the network accepts, cropped back). Used for datasets of fixed-size patches
  (LUAD-HistoSeg, BCSS-WSSS), whose evaluation images have the training patch size.
* **sliding windows**: for large images of varying size (``spec.patch_size is None``,
  WSSS4LUAD), or whenever a window, stride or scale is given.
  :func:`hisynseg.inference.sliding.predict_sliding` averages the softmax probabilities
  of overlapping windows, per scale, resizes them to full size and averages the scales.
  Paper settings: window 224 (the training patch size), stride 112 and scales
  1, 1.25, 1.5, 1.75, 2 at test; stride = window and scale 1 at validation.

d4 test-time augmentation (mean of the logits over the eight flips/rotations) applies to
whatever the network sees: the whole image, or each window.

The network predicts tissue classes only; background is never predicted. The reference
code's validation-time gating (classes absent from an image's ground truth cannot be
predicted there) is available as ``gate_absent_classes`` for validation; it reads the
ground truth, so it is refused on the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hisynseg.datasets.io import read_mask, read_rgb, write_mask_png, write_rgb_png
from hisynseg.datasets.layouts import MaskedImage, list_split
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.devices import resolve_device
from hisynseg.errors import HisynsegError
from hisynseg.evaluation.metrics import ConfusionMatrix, scores_to_dict
from hisynseg.evaluation.visualize import comparison_panel, overlay_mask
from hisynseg.normalization import IMAGENET_MEAN, IMAGENET_STD, normalise_uint8

__all__ = [
    "EvaluationError",
    "EvaluationSettings",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEST_SCALES",
    "TTA_CHOICES",
    "evaluate",
    "resolve_settings",
    "resolve_device",
]

# METHOD §7: WSSS4LUAD test scales.
TEST_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0)
TTA_CHOICES = ("none", "d4")
DEFAULT_WINDOW = 224


class EvaluationError(HisynsegError, ValueError):
    """Invalid evaluation settings, or data that cannot be scored; the message says why."""


@dataclass(frozen=True)
class EvaluationSettings:
    """The resolved settings of one evaluation run (written to ``evaluation.json``).

    Attributes:
        split: ``"val"`` or ``"test"``.
        tta: ``"d4"`` or ``None``.
        sliding: Predict by sliding windows (otherwise whole images).
        window: Window side in pixels (``None`` for whole images).
        stride: Step between windows (``None`` for whole images).
        scales: Resize factors averaged over (``(1.0,)`` for whole images).
        gate_absent_classes: The reference's validation-only ground-truth gating.
        batch_size: Images (whole) or windows (sliding) per forward pass.
        device: Torch device the network runs on.
    """

    split: str
    tta: str | None
    sliding: bool
    window: int | None
    stride: int | None
    scales: tuple[float, ...]
    gate_absent_classes: bool
    batch_size: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scales"] = list(self.scales)
        return data


def resolve_settings(
    spec: DatasetSpec,
    split: str,
    *,
    tta: str | None = None,
    sliding: bool | None = None,
    window: int | None = None,
    stride: int | None = None,
    scales: Sequence[float] | None = None,
    gate_absent_classes: bool = False,
    patch_size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = "cpu",
) -> EvaluationSettings:
    """Fill in the defaults and check the combination.

    Args:
        spec: The dataset description.
        split: ``"val"`` or ``"test"``.
        tta: ``None``/``"none"`` or ``"d4"``.
        sliding: ``True``/``False`` forces the mode; ``None`` picks sliding windows for
            datasets with large evaluation images (``spec.patch_size is None``) or when
            ``window``, ``stride`` or ``scales`` is given, and whole images otherwise.
        window: Window side; default ``patch_size``, else ``spec.patch_size``, else 224.
        stride: Default: ``window // 2`` at test, ``window`` at validation.
        scales: Default: 1, 1.25, 1.5, 1.75, 2 at test, 1 at validation.
        gate_absent_classes: Reference validation gating (refused for ``"test"``).
        patch_size: The model's training patch size (from its checkpoint), if known.
        batch_size: Images or windows per forward pass.
        device: Torch device, or ``"auto"``.

    Raises:
        EvaluationError: An unknown split or TTA, gating on the test split, window options
            with ``sliding=False``, or out-of-range numbers.
    """
    if split not in ("val", "test"):
        raise EvaluationError(f"unknown split {split!r}; expected 'val' or 'test'")
    if tta == "none":
        tta = None
    if tta not in (None, "d4"):
        raise EvaluationError(f"unknown test-time augmentation {tta!r}; expected 'none' or 'd4'")
    if gate_absent_classes and split == "test":
        raise EvaluationError(
            "gating absent classes reads the ground truth of each image; it is a "
            "validation-only option (the reference code's) and is never applied on the "
            "test split"
        )
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    window_options = window is not None or stride is not None or scales is not None
    if sliding is None:
        sliding = spec.patch_size is None or window_options
    elif not sliding and window_options:
        raise EvaluationError(
            "window, stride and scales apply to sliding-window prediction; "
            "they cannot be combined with whole-image prediction"
        )
    device = resolve_device(device)
    if not sliding:
        return EvaluationSettings(
            split, tta, False, None, None, (1.0,), gate_absent_classes, batch_size, device
        )
    window = int(window or patch_size or spec.patch_size or DEFAULT_WINDOW)
    if window < 1:
        raise EvaluationError(f"window must be at least 1 pixel, got {window}")
    if stride is None:
        stride = max(1, window // 2) if split == "test" else window
    stride = int(stride)
    if not 1 <= stride <= window:
        raise EvaluationError(
            f"stride must lie between 1 and the window ({window}), got {stride}; "
            "a larger stride would leave pixels unpredicted"
        )
    if scales is None:
        scales = TEST_SCALES if split == "test" else (1.0,)
    scales = tuple(float(s) for s in scales)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise EvaluationError(f"scales must be positive numbers, got {list(scales)}")
    return EvaluationSettings(
        split, tta, True, window, stride, scales, gate_absent_classes, batch_size, device
    )


def _logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Segmentation logits of a normalised batch at the batch's own size.

    The network accepts only sides divisible by its ``input_divisor``; other sizes are
    padded at the bottom/right by reflection (edge replication when the image is too
    small to reflect) and the logits cropped back.
    """
    divisor = int(getattr(model, "input_divisor", 32))

    def fn(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % divisor, (-w) % divisor
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = model(x)
        logits = out.seg_logits if hasattr(out, "seg_logits") else out
        return logits[..., :h, :w].float()

    return fn


def score_function(
    model: torch.nn.Module, tta: str | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits with or without d4 TTA (the mean of the logits, as in the paper)."""
    logits = _logits_fn(model)
    if tta != "d4":
        return logits
    from hisynseg.inference.tta import predict_d4

    return lambda x: predict_d4(logits, x)


def normalise_image(image: np.ndarray, device: str) -> torch.Tensor:
    """``H×W×3`` ``uint8`` → ``3×H×W`` float tensor with ImageNet mean/std, on ``device``."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable
        image = image.copy()
    return normalise_uint8(torch.from_numpy(image).to(device))


def _argmax(
    scores: torch.Tensor, masks: Sequence[np.ndarray] | None, num_classes: int
) -> np.ndarray:
    """``B×H×W`` ``uint8`` argmax of ``B×C×H×W`` scores; with ``masks``, the reference
    gating: classes absent from an image's ground truth are excluded from its argmax.
    """
    if masks is not None:
        present = torch.zeros(scores.shape[:2], dtype=torch.bool, device=scores.device)
        for i, mask in enumerate(masks):
            counts = np.bincount(mask.ravel(), minlength=256)[:num_classes]
            # An image of background only has nothing to gate; keep it unconstrained.
            if counts.any():
                present[i] = torch.from_numpy(counts > 0).to(scores.device)
            else:
                present[i] = True
        scores = scores.masked_fill(~present[:, :, None, None], -torch.inf)
    return scores.argmax(dim=1).to(torch.uint8).cpu().numpy()


def _read_pair(pair: MaskedImage, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    image = read_rgb(pair.image)
    mask = read_mask(pair.mask, spec.palette)
    if mask.shape != image.shape[:2]:
        raise EvaluationError(
            f"{pair.mask}: mask is {mask.shape[1]}×{mask.shape[0]} pixels but its image "
            f"{pair.image.name} is {image.shape[1]}×{image.shape[0]}"
        )
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in values if v >= spec.num_classes and v != spec.background_index]
    if bad:
        raise EvaluationError(
            f"{pair.mask}: mask holds values {bad[:5]}, which are neither classes "
            f"0..{spec.num_classes - 1} nor the background index {spec.background_index}"
        )
    return image, mask


class _Outputs:
    """Writes predicted masks (palette PNG), overlays and comparison panels."""

    def __init__(self, directory: Path, spec: DatasetSpec) -> None:
        self.masks = directory / "masks"
        self.overlays = directory / "overlays"
        self.masks.mkdir(parents=True, exist_ok=True)
        self.overlays.mkdir(parents=True, exist_ok=True)
        self.palette = spec.palette

    def write(self, stem: str, image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> None:
        write_mask_png(self.masks / f"{stem}.png", pred, self.palette)
        write_rgb_png(self.overlays / f"{stem}.png", overlay_mask(image, pred, self.palette))
        write_rgb_png(
            self.overlays / f"{stem}_panel.png",
            comparison_panel(image, mask, pred, self.palette),
        )


def evaluate(
    model: torch.nn.Module,
    root: str | Path,
    spec: DatasetSpec,
    split: str,
    *,
    tta: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    scales: Sequence[float] | None = None,
    sliding: bool | None = None,
    gate_absent_classes: bool = False,
    patch_size: int | None = None,
    device: str | torch.device | None = "cpu",
    batch_size: int = 16,
    save_masks_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on the ``val`` or ``test`` split of the dataset at ``root``.

    Args:
        model: A segmenter whose forward returns ``SegmenterOutput`` (or plain logits
            ``B×C×H×W``) for ImageNet-normalised input.
        root: Dataset root in ``spec``'s layout.
        spec: The dataset description (class list, palette, background index).
        split: ``"val"`` or ``"test"``.
        tta: ``"d4"`` for the eight flips/rotations, ``None`` for none.
        window: Sliding-window side (see :func:`resolve_settings` for all defaults).
        stride: Step between windows.
        scales: Resize factors for multi-scale prediction.
        sliding: Force sliding windows (``True``) or whole images (``False``).
        gate_absent_classes: The reference's validation gating; refused on ``"test"``.
        patch_size: The model's training patch size, the default window.
        device: Torch device (``"cpu"``, ``"cuda"``, ``"auto"``).
        batch_size: Images (whole) or windows (sliding) per forward pass.
        save_masks_dir: When given, write ``masks/<stem>.png`` (palette PNG of the
            prediction), ``overlays/<stem>.png`` (prediction blended over the image) and
            ``overlays/<stem>_panel.png`` (image | ground truth | prediction) there.
        progress: Show a progress bar.

    Returns:
        ``{"miou", "fwiou", "pixel_accuracy", "iou": {class name: IoU}, "confusion_matrix",
        "split", "dataset", "class_names", "tta", "num_images", "scored_pixels",
        "settings", "seconds"}``. Scores are fractions; a class neither in the ground
        truth nor predicted has IoU ``None``.

    Raises:
        EvaluationError: Invalid settings, an empty split, or a mask that does not fit
            its image or the dataset's classes.
        DatasetLayoutError: The split's folders are missing.
        ImageReadError: An unreadable image or mask.
    """
    from tqdm.auto import tqdm

    settings = resolve_settings(
        spec,
        split,
        tta=tta,
        sliding=sliding,
        window=window,
        stride=stride,
        scales=scales,
        gate_absent_classes=gate_absent_classes,
        patch_size=patch_size,
        batch_size=batch_size,
        device=device,
    )
    pairs = list_split(root, spec, split)
    if not pairs:
        img_dir, _ = spec.layout.split_dirs(split)
        raise EvaluationError(f"{Path(root) / img_dir}: the {split} split has no images")
    num_classes = spec.num_classes
    dev = settings.device
    model = model.to(dev).eval()
    score = score_function(model, settings.tta)
    confusion = ConfusionMatrix(num_classes, ignore_index=spec.background_index)
    outputs = _Outputs(Path(save_masks_dir), spec) if save_masks_dir is not None else None

    def record(batch: list[tuple[MaskedImage, np.ndarray, np.ndarray]], preds: np.ndarray) -> None:
        for (pair, image, mask), pred in zip(batch, preds, strict=True):
            confusion.update(pred, mask)
            if outputs is not None:
                outputs.write(pair.image.stem, image, mask, pred)
            bar.update(1)

    def predict_whole(batch: list[tuple[MaskedImage, np.ndarray, np.ndarray]]) -> None:
        x = torch.stack([normalise_image(image, dev) for _, image, _ in batch])
        masks = [m for _, _, m in batch] if settings.gate_absent_classes else None
        record(batch, _argmax(score(x), masks, num_classes))

    def predict_windows(item: tuple[MaskedImage, np.ndarray, np.ndarray]) -> None:
        from hisynseg.inference.sliding import predict_sliding

        _, image, mask = item
        probs = predict_sliding(
            lambda crops: score(crops).softmax(dim=1),
            normalise_image(image, dev),
            num_classes,
            window=settings.window,
            stride=settings.stride,
            scales=settings.scales,
            batch_size=settings.batch_size,
        )
        masks = [mask] if settings.gate_absent_classes else None
        record([item], _argmax(torch.from_numpy(probs)[None], masks, num_classes))

    start = time.perf_counter()
    bar = tqdm(total=len(pairs), desc=f"evaluate {split}", unit="img", disable=not progress)
    try:
        with torch.inference_mode():
            pending: list[tuple[MaskedImage, np.ndarray, np.ndarray]] = []
            for pair in pairs:
                image, mask = _read_pair(pair, spec)
                if settings.sliding:
                    predict_windows((pair, image, mask))
                    continue
                # Whole images are batched while they share a size.
                if pending and (
                    len(pending) >= settings.batch_size or pending[0][1].shape != image.shape
                ):
                    predict_whole(pending)
                    pending = []
                pending.append((pair, image, mask))
            if pending:
                predict_whole(pending)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    scores = confusion.compute()
    result = scores_to_dict(scores, spec.class_names, nan_as_none=True)
    result.update(
        split=split,
        dataset=spec.name,
        class_names=list(spec.class_names),
        tta=settings.tta,
        num_images=len(pairs),
        scored_pixels=int(confusion.matrix.sum()),
        settings=settings.to_dict(),
        seconds=round(elapsed, 3),
    )
    return result
