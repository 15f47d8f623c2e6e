"""Where the files of each layout live, and listing them as labelled samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hisynseg.datasets.io import list_images
from hisynseg.datasets.labels import LabelError, read_label_csv
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError

__all__ = [
    "LabelledImage",
    "MaskedImage",
    "DatasetLayoutError",
    "list_train",
    "list_split",
    "list_synthetic",
    "single_label_pool",
    "SYNTHETIC_LABELS_FILE",
]

SYNTHETIC_LABELS_FILE = "labels.csv"


class DatasetLayoutError(HisynsegError, FileNotFoundError):
    """A folder or file the layout requires is missing, or images and masks cannot be paired
    unambiguously; the message names the files and says what is expected."""


@dataclass(frozen=True)
class LabelledImage:
    """A training image with its image-level label."""

    path: Path
    label: np.ndarray

    @property
    def is_single_label(self) -> bool:
        return int(self.label.sum()) == 1

    @property
    def single_class(self) -> int:
        """Index of the one positive class (only for single-label images)."""
        return int(np.flatnonzero(self.label)[0])


@dataclass(frozen=True)
class MaskedImage:
    """An evaluation image and its pixel mask."""

    image: Path
    mask: Path


def _require_dir(root: Path, sub: str, what: str, spec: DatasetSpec) -> Path:
    if not root.is_dir():
        # Say that the dataset root is not there, not which of its subfolders is missing.
        raise DatasetLayoutError(f"{root}: no such dataset folder")
    path = root / sub
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{path}: missing {what} folder of the {spec.name} layout "
            f"(expected train '{spec.layout.train}/', val '{spec.layout.val[0]}', "
            f"'{spec.layout.val[1]}', test '{spec.layout.test[0]}', '{spec.layout.test[1]}')"
        )
    return path


def _labelled_images(folder: Path, spec: DatasetSpec, csv_path: Path | None) -> list[LabelledImage]:
    images = list_images(folder)
    if csv_path is None:
        return [LabelledImage(p, spec.parse_label(p)) for p in images]
    labels = read_label_csv(csv_path, spec.class_names)
    by_name = {p.name: p for p in images}
    missing = sorted(set(labels) - set(by_name))
    if missing:
        raise LabelError(f"{csv_path}: lists images not in {folder}: {missing[:5]}")
    unlabelled = sorted(set(by_name) - set(labels))
    if unlabelled:
        raise LabelError(f"{csv_path}: has no label for {unlabelled[:5]} in {folder}")
    return [LabelledImage(by_name[name], labels[name]) for name in sorted(labels)]


def list_train(root: str | Path, spec: DatasetSpec) -> list[LabelledImage]:
    """All training images of a dataset root with their image-level labels.

    Raises:
        DatasetLayoutError: The training folder is missing.
        LabelError: A file name (or CSV row) carries no valid label.
    """
    root = Path(root)
    folder = _require_dir(root, spec.layout.train, "training", spec)
    csv_path = root / spec.labels_csv if spec.labels_csv else None
    return _labelled_images(folder, spec, csv_path)


def _by_unique_stem(paths: list[Path], what: str) -> dict[str, Path]:
    """Map file stems to files, refusing two files with one stem.

    Pairing is by stem, so two masks with one stem (``a.png``, ``a.tif``) would leave the
    choice to sort order, and two images with one stem would both be scored against one
    mask and their saved predictions would overwrite each other.
    """
    by_stem: dict[str, Path] = {}
    for path in paths:
        if path.stem in by_stem:
            raise DatasetLayoutError(
                f"{by_stem[path.stem]} and {path}: two {what} share the stem {path.stem!r}; "
                "images and masks are paired by stem, so keep only one of them"
            )
        by_stem[path.stem] = path
    return by_stem


def list_split(root: str | Path, spec: DatasetSpec, split: str) -> list[MaskedImage]:
    """Image/mask pairs of the ``val`` or ``test`` split, matched by file stem.

    Raises:
        DatasetLayoutError: A folder is missing, an image has no mask, or two images (or two
            masks) share a file stem, so that the pairing would be ambiguous.
    """
    root = Path(root)
    img_dir, mask_dir = spec.layout.split_dirs(split)
    images = list_images(_require_dir(root, img_dir, f"{split} image", spec))
    _by_unique_stem(images, "images")
    masks = _by_unique_stem(
        list_images(_require_dir(root, mask_dir, f"{split} mask", spec)), "masks"
    )
    pairs = []
    for image in images:
        mask = masks.get(image.stem)
        if mask is None:
            raise DatasetLayoutError(f"{image}: no mask with the same name in {root / mask_dir}")
        pairs.append(MaskedImage(image, mask))
    return pairs


def list_synthetic(folder: str | Path, spec: DatasetSpec) -> list[tuple[LabelledImage, Path]]:
    """A synthesized set (``img/`` + ``mask/``) as labelled images with their masks.

    Labels come from the file names in the dataset's encoding, or from ``labels.csv`` for
    a generic dataset.
    """
    folder = Path(folder)
    img_dir = folder / "img"
    mask_dir = folder / "mask"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DatasetLayoutError(f"{d}: missing; a synthetic set has img/ and mask/")
    csv_path = folder / SYNTHETIC_LABELS_FILE if spec.codec is None else None
    samples = _labelled_images(img_dir, spec, csv_path)
    out = []
    for sample in samples:
        mask = mask_dir / (sample.path.stem + ".png")
        if not mask.is_file():
            raise DatasetLayoutError(f"{sample.path}: no mask {mask}")
        out.append((sample, mask))
    return out


def single_label_pool(samples: list[LabelledImage], num_classes: int) -> list[list[LabelledImage]]:
    """Single-label images grouped by class: ``pool[c]`` lists the images of class ``c``."""
    pool: list[list[LabelledImage]] = [[] for _ in range(num_classes)]
    for sample in samples:
        if sample.is_single_label:
            pool[sample.single_class].append(sample)
    return pool
