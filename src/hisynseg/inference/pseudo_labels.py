"""Stage-2 pseudo-masks for the real training images (METHOD.md §6).

Every training image is predicted with d4 test-time augmentation at the training patch
size. A single-label image gets a constant mask of its class; a multi-label image gets the
argmax over its own classes only (logits of absent classes suppressed). Datasets whose
training patches hold white background (WSSS4LUAD) get the background index there.

The output folder is a training set in the synthetic layout (``img/`` + ``mask/``, the
label in the file name), so stage 2 reads it with the same reader as synthetic sets.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hisynseg.datasets.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    encode_mask_png,
    read_rgb,
)
from hisynseg.datasets.labels import write_label_csv
from hisynseg.datasets.layouts import SYNTHETIC_LABELS_FILE, LabelledImage, list_train
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError

__all__ = ["PseudoLabelSummary", "constrain_to_label", "pseudo_label_dataset"]


@dataclass(frozen=True)
class PseudoLabelSummary:
    """What :func:`pseudo_label_dataset` did."""

    out: Path
    written: int
    skipped: int
    single_label: int
    failed: list[str]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "written": self.written,
            "skipped_existing": self.skipped,
            "single_label": self.single_label,
            "failed": self.failed,
        }


def constrain_to_label(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Argmax over the classes present in the image-level label.

    Args:
        logits: ``C×H×W`` class scores.
        label: Multi-hot label of length ``C`` with at least one positive entry.

    Returns:
        ``H×W`` ``uint8`` class indices, each one of the label's classes.
    """
    present = np.asarray(label, dtype=bool)
    if not present.any():
        raise ValueError("an image-level label needs at least one class")
    masked = np.where(present[:, None, None], logits, -np.inf)
    return masked.argmax(axis=0).astype(np.uint8)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put the source image in the output set without duplicating bytes where possible."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def pseudo_label_dataset(
    model,
    root: str | Path,
    spec: DatasetSpec,
    out: str | Path,
    *,
    patch_size: int | None = None,
    tta: str | None = "d4",
    device: str = "cpu",
    batch_size: int = 16,
    save_entropy: bool = False,
    progress: bool = True,
) -> PseudoLabelSummary:
    """Write pseudo-masks for every training image of ``root`` into ``out``.

    Args:
        model: A segmenter returning ``SegmenterOutput`` (see :mod:`hisynseg.models`).
        root: Dataset root in ``spec``'s layout.
        spec: The dataset description.
        out: Output folder; gets ``img/``, ``mask/`` (palette PNG), optionally ``entropy/``
            (per-pixel entropy of the prediction, 8-bit PNG scaled to ``log C``).
        patch_size: Side the images are predicted at (the training patch size; default
            ``spec.patch_size`` or 224). Predictions are resized back to each image's size.
        tta: ``"d4"`` (eight flips/rotations, mean of logits) or ``None``.
        device: Torch device.
        batch_size: Images per forward pass.
        save_entropy: Also write the entropy maps.
        progress: Show a progress bar.

    Returns:
        Counts of written, already present and failed images. A failed image is reported
        and the others go on; a re-run writes only what is missing.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from hisynseg.inference.tta import predict_d4
    from hisynseg.normalization import normalise_unit
    from hisynseg.synthesis.background import background_mask

    out = Path(out)
    size = int(patch_size or spec.patch_size or 224)
    samples = list_train(root, spec)
    img_dir, mask_dir, ent_dir = out / "img", out / "mask", out / "entropy"
    mask_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()

    def seg_logits(x: torch.Tensor) -> torch.Tensor:
        return model(x).seg_logits

    todo: list[LabelledImage] = []
    skipped = single = 0
    for sample in samples:
        if (mask_dir / (sample.path.stem + ".png")).exists() and (
            img_dir / sample.path.name
        ).exists():
            skipped += 1
        else:
            todo.append(sample)

    failed: list[str] = []
    written = 0
    bar = tqdm(total=len(todo), desc="pseudo-label", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images: list[np.ndarray | None] = []
        for sample in batch:
            try:
                images.append(read_rgb(sample.path))
            except HisynsegError as exc:
                failed.append(str(exc))
                images.append(None)
        need_model = [
            i
            for i, (s, im) in enumerate(zip(batch, images, strict=False))
            if im is not None and s.label.sum() > 1
        ]
        logits_by_index: dict[int, np.ndarray] = {}
        if need_model:
            tensors = []
            for i in need_model:
                t = torch.from_numpy(np.array(images[i])).permute(2, 0, 1).float().div(255.0)[None]
                tensors.append(
                    F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
                )
            x = normalise_unit(torch.cat(tensors).to(device))
            with torch.no_grad():
                logits = predict_d4(seg_logits, x) if tta == "d4" else seg_logits(x)
            for k, i in enumerate(need_model):
                h, w = images[i].shape[:2]
                resized = F.interpolate(
                    logits[k : k + 1], size=(h, w), mode="bilinear", align_corners=False
                )
                logits_by_index[i] = resized[0].float().cpu().numpy()
        for i, (sample, image) in enumerate(zip(batch, images, strict=False)):
            bar.update(1)
            if image is None:
                continue
            h, w = image.shape[:2]
            if i in logits_by_index:
                logits = logits_by_index[i]
                mask = constrain_to_label(logits, sample.label)
                entropy = _entropy(logits, sample.label) if save_entropy else None
            else:
                single += 1
                mask = np.full((h, w), sample.single_class, dtype=np.uint8)
                entropy = np.zeros((h, w), np.float32) if save_entropy else None
            if spec.background_in_train:
                bg = background_mask(
                    image, spec.background_grey_threshold, spec.background_min_size
                )
                mask[bg] = spec.background_index
            _link_or_copy(sample.path, img_dir / sample.path.name)
            if entropy is not None:
                scale = 255.0 / max(np.log(max(int(sample.label.sum()), 2)), 1e-6)
                ent_png = np.clip(entropy * scale, 0, 255).astype(np.uint8)
                from PIL import Image

                ent_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(ent_dir / (sample.path.stem + ".png")) as tmp:
                    Image.fromarray(ent_png, "L").save(tmp, format="PNG")
            atomic_write_bytes(
                mask_dir / (sample.path.stem + ".png"), encode_mask_png(mask, spec.palette)
            )
            written += 1
    bar.close()
    if spec.codec is None:
        labels = {s.path.name: s.label for s in samples if (img_dir / s.path.name).exists()}
        write_label_csv(out / SYNTHETIC_LABELS_FILE, labels, spec.class_names)
    summary = PseudoLabelSummary(out, written, skipped, single, failed)
    atomic_write_json(
        out / "pseudo_labels.json",
        {**summary.to_dict(), "patch_size": size, "tta": tta, "dataset": spec.name},
    )
    return summary


def _entropy(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    present = np.asarray(label, dtype=bool)
    z = logits[present]
    z = z - z.max(axis=0, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=0, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=0).astype(np.float32)
