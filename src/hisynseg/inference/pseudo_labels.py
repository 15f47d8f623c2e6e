"""Stage-2 pseudo-masks for the real training images (METHOD.md §6).

Every training image is predicted with d4 test-time augmentation at the training patch
size. A single-label image gets a constant mask of its class; a multi-label image gets the
argmax over its own classes only (logits of absent classes suppressed). Datasets whose
training patches hold white background (WSSS4LUAD) get the background index there.

The output folder is a training set in the synthetic layout (``img/`` + ``mask/``, the
label in the file name), so stage 2 reads it with the same reader as synthetic sets.

``pseudo_labels.json`` in the output folder records the checkpoint and the settings the
masks were made with, before the first mask is written. A re-run with the same ones
resumes (writes only the missing masks); one with another checkpoint or other settings is
refused unless told to overwrite, so that masks of two models are never mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hisynseg.datasets.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    encode_mask_png,
    read_rgb,
    sha256_of,
)
from hisynseg.datasets.labels import write_label_csv
from hisynseg.datasets.layouts import SYNTHETIC_LABELS_FILE, LabelledImage, list_train
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError

__all__ = [
    "OtherMasksError",
    "PseudoLabelError",
    "PseudoLabelSummary",
    "TTA_CHOICES",
    "checkpoint_record",
    "clear_pseudo_labels",
    "constrain_to_label",
    "pseudo_label_dataset",
]

RECORD_FILE = "pseudo_labels.json"

# What ``tta`` may be; ``None`` is the same as ``"none"``.
TTA_CHOICES = ("none", "d4")


class PseudoLabelError(HisynsegError, ValueError):
    """Pseudo-labelling cannot start: a bad setting, or an output folder that holds masks
    made by another checkpoint or with other settings."""


class OtherMasksError(PseudoLabelError):
    """The output folder holds masks that this run would not make (another checkpoint,
    other settings, or no record of either)."""


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


def checkpoint_record(path: str | Path) -> dict[str, Any]:
    """Identify a checkpoint file: resolved path, size, modification time and SHA-256.

    The hash decides whether two runs used the same model (the same file copied or moved
    elsewhere is the same model; a checkpoint rewritten in place by a new training is not);
    path and time are there for the reader.

    Raises:
        PseudoLabelError: The file cannot be read.
    """
    path = Path(path)
    try:
        stat = path.stat()
        digest = sha256_of(path)
    except OSError as exc:
        raise PseudoLabelError(f"{path}: cannot read the checkpoint: {exc.strerror}") from None
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds"),
        "sha256": digest,
    }


def _normalise_tta(tta: str | None) -> str | None:
    if tta is None or tta == "none":
        return None
    if tta == "d4":
        return tta
    # Anything else used to mean "no TTA" without a word, e.g. a typo such as "D4".
    raise PseudoLabelError(
        f"unknown test-time augmentation {tta!r}; expected one of {', '.join(TTA_CHOICES)} "
        "(or None)"
    )


def _same_model(then: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    if then is None or now is None:
        return then is now
    return then.get("sha256") == now.get("sha256")


def _describe_model(record: dict[str, Any] | None) -> str:
    if record is None:
        return "an unrecorded model"
    return f"{record.get('path')} (sha256 {str(record.get('sha256'))[:12]})"


def _existing_outputs(out: Path) -> list[Path]:
    return [p for p in (out / "mask", out / "img") if p.is_dir() and any(p.iterdir())]


def _check_resumable(
    out: Path, checkpoint: dict[str, Any] | None, settings: dict[str, Any]
) -> None:
    """Refuse to add masks to an output folder whose masks came from another model or
    other settings (a resume would keep them, giving a mixed training set)."""
    if not _existing_outputs(out):
        return  # nothing to mix with
    record_path = out / RECORD_FILE
    hint = "use a new --out, or --overwrite to delete the old masks first"
    if not record_path.is_file():
        raise OtherMasksError(
            f"{out}: holds img/ and mask/ but no {RECORD_FILE} saying which checkpoint "
            "made them (an older hisynseg's output, or not pseudo-label output at all); "
            "use a new --out, or delete those folders yourself"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OtherMasksError(f"{record_path}: cannot be read ({exc}); {hint}") from None
    if not isinstance(record, dict) or "settings" not in record:
        raise OtherMasksError(
            f"{record_path}: does not record the checkpoint and settings of its masks "
            f"(made by an older version?); {hint}"
        )
    then_ckpt = record.get("checkpoint")
    if not _same_model(then_ckpt, checkpoint):
        raise OtherMasksError(
            f"{out}: its masks were made by {_describe_model(then_ckpt)}, not by "
            f"{_describe_model(checkpoint)}; {hint}"
        )
    then_settings = record.get("settings") or {}
    changed = [
        f"{key} {then_settings.get(key)!r} then, {value!r} now"
        for key, value in settings.items()
        if then_settings.get(key) != value
    ]
    if changed:
        raise OtherMasksError(
            f"{out}: its masks were made with other settings ({'; '.join(changed)}); {hint}"
        )


def clear_pseudo_labels(out: str | Path, require_record: bool = True) -> None:
    """Delete what a pseudo-labelling run wrote into ``out``.

    Args:
        out: The output folder.
        require_record: Refuse a folder with ``img/`` or ``mask/`` but no
            ``pseudo_labels.json``, which may be something else (a dataset split); the
            pipeline, which owns its stage folders, passes ``False``.

    The record goes last, so that a deletion cut short still leaves a folder that
    identifies itself as pseudo-label output and can be overwritten again.

    Raises:
        PseudoLabelError: ``require_record`` and the folder has no record.
    """
    out = Path(out)
    if require_record and _existing_outputs(out) and not (out / RECORD_FILE).is_file():
        # Without the record this may be some other folder with img/ and mask/ (a split
        # of the dataset itself): deleting it is left to the user.
        raise PseudoLabelError(
            f"{out}: has img/ or mask/ but no {RECORD_FILE}, so it does not look like "
            "pseudo-label output; not deleting it (remove it yourself or use a new --out)"
        )
    for folder in (out / "img", out / "mask", out / "entropy"):
        if folder.is_dir():
            shutil.rmtree(folder)
    (out / SYNTHETIC_LABELS_FILE).unlink(missing_ok=True)
    (out / RECORD_FILE).unlink(missing_ok=True)


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
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
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
        tta: ``"d4"`` (eight flips/rotations, mean of logits), or ``None``/``"none"``.
        device: Torch device.
        batch_size: Images per forward pass.
        save_entropy: Also write the entropy maps.
        progress: Show a progress bar.
        checkpoint: The file ``model`` was loaded from; recorded (path, size, time,
            SHA-256) in ``pseudo_labels.json`` so that a re-run with another one is refused.
        overwrite: Delete an earlier run's outputs in ``out`` first, instead of resuming.

    Returns:
        Counts of written, already present and failed images. A failed image (unreadable,
        or a label with no class) is reported and the others go on; a re-run with the
        same checkpoint and settings writes only what is missing.

    Raises:
        PseudoLabelError: An unknown ``tta``; or ``out`` holds masks made by another
            checkpoint or with other settings, and ``overwrite`` is not set.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from hisynseg.inference.tta import predict_d4
    from hisynseg.normalization import normalise_unit
    from hisynseg.synthesis.background import background_mask

    out = Path(out)
    tta = _normalise_tta(tta)
    size = int(patch_size or spec.patch_size or 224)
    samples = list_train(root, spec)
    # What decides the content of a mask, besides the model.
    settings = {
        "dataset": spec.name,
        "classes": list(spec.class_names),
        "patch_size": size,
        "tta": tta or "none",
        "background_in_train": spec.background_in_train,
        "background_grey_threshold": spec.background_grey_threshold,
        "background_min_size": spec.background_min_size,
    }
    ckpt_record = None if checkpoint is None else checkpoint_record(checkpoint)
    if overwrite:
        clear_pseudo_labels(out)
    else:
        _check_resumable(out, ckpt_record, settings)
    img_dir, mask_dir, ent_dir = out / "img", out / "mask", out / "entropy"
    mask_dir.mkdir(parents=True, exist_ok=True)
    # Written before the first mask, so that an interrupted run is still identified.
    record = {"checkpoint": ckpt_record, "settings": settings}
    atomic_write_json(out / RECORD_FILE, {**record, "complete": False})
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
            if not sample.label.any():
                # Neither branch below applies (no class to fill or to constrain to); one
                # such image must not end the run.
                failed.append(
                    f"{sample.path}: label has no positive class, so it gets no pseudo-mask"
                )
                images.append(None)
                continue
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
        out / RECORD_FILE,
        {
            **summary.to_dict(),
            "patch_size": size,
            "tta": tta,
            "dataset": spec.name,
            **record,
            "complete": True,
        },
    )
    return summary


def _entropy(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    present = np.asarray(label, dtype=bool)
    z = logits[present]
    z = z - z.max(axis=0, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=0, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=0).astype(np.float32)
