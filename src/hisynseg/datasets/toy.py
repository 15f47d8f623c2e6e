"""Tiny generated look-alikes of each dataset layout, for tests, benchmarks and first runs.

Every class is drawn as its own texture (or flat colour), so a model can learn it and a
test can tell, pixel by pixel, which class a colour came from. Multi-class images are
partitioned into classes by smooth random fields, which gives natural, non-rectangular
boundaries. The files are written in the exact layout of the chosen dataset, with labels
encoded the way that dataset encodes them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hisynseg.datasets.io import (
    atomic_write_json,
    atomic_write_text,
    is_atomic_temp,
    write_mask_png,
    write_rgb_png,
)
from hisynseg.datasets.labels import write_label_csv
from hisynseg.datasets.spec import (
    DATASETS,
    GENERIC_CLASSES_FILE,
    GENERIC_LABELS_FILE,
    DatasetSpec,
    get_dataset_spec,
    load_generic_spec,
)
from hisynseg.errors import HisynsegError

__all__ = [
    "ToyDataError",
    "ToyDataset",
    "TOY_MARKER",
    "MIN_PATCH_SIZE",
    "make_toy_dataset",
    "class_colours",
    "render_texture",
    "region_map",
]

# Written into every toy dataset's root: what tells a folder that --overwrite may empty
# from a real dataset in the same layout, which must never be deleted.
TOY_MARKER = "toy.json"
_TOY_KIND = "hisynseg-toy-dataset"
# Below this, images are too small for the training crops and the textures to mean much.
MIN_PATCH_SIZE = 32
_STYLES = ("texture", "flat")


def _top_level(relative: str) -> str:
    return relative.split("/", 1)[0]


# Every top-level name a toy dataset of any layout can have: what --overwrite may delete.
# (The generic layout is LUAD-HistoSeg's, plus classes.yaml and train.csv.)
_TOY_ENTRIES = frozenset(
    {TOY_MARKER, GENERIC_CLASSES_FILE, GENERIC_LABELS_FILE}
    | {
        _top_level(part)
        for spec in DATASETS.values()
        for part in (spec.layout.train, *spec.layout.val, *spec.layout.test)
    }
)


class ToyDataError(HisynsegError):
    """Toy data cannot be written as asked (bad argument, or a folder in use)."""


# Distinct, stain-like colours; flat-style images use exactly these, which lets tests map
# every pixel back to its class.
_CLASS_COLOURS = np.array(
    [
        (200, 60, 120),  # deep pink
        (120, 40, 170),  # purple
        (40, 70, 200),  # blue
        (230, 150, 60),  # orange
        (60, 170, 90),  # green
        (150, 110, 70),  # brown
    ],
    dtype=np.uint8,
)
_WHITE = 245

GENERIC_TOY_CLASSES = {
    "name": "toy-generic",
    "classes": ["tumour", "stroma", "lymphocytes"],
    "short_names": ["TUM", "STR", "LYM"],
    "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
    "background_index": 3,
    "patch_size": 224,
}


@dataclass(frozen=True)
class ToyDataset:
    """What :func:`make_toy_dataset` wrote."""

    root: Path
    spec: DatasetSpec
    num_train: int
    num_single_label: int


def class_colours(num_classes: int) -> np.ndarray:
    """The flat colour of each class (``num_classes×3`` ``uint8``)."""
    if num_classes > len(_CLASS_COLOURS):
        raise ValueError(f"toy data supports at most {len(_CLASS_COLOURS)} classes")
    return _CLASS_COLOURS[:num_classes].copy()


def render_texture(
    class_index: int, shape: tuple[int, int], rng: np.random.Generator, style: str = "texture"
) -> np.ndarray:
    """An ``H×W×3`` image of one class.

    ``"flat"`` is the class colour alone. ``"texture"`` adds a class-specific oriented
    stripe pattern and blotchy noise, so that classes differ in texture as well as hue and
    a crop of a few pixels still identifies its class.
    """
    h, w = shape
    base = _CLASS_COLOURS[class_index].astype(np.float32)
    if style == "flat":
        return np.broadcast_to(base.astype(np.uint8), (h, w, 3)).copy()
    if style != "texture":
        raise ValueError(f"unknown toy style {style!r}; expected 'flat' or 'texture'")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * class_index / 3.0 + rng.uniform(-0.15, 0.15)
    period = 4.0 + 3.0 * class_index
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
    blotch = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 2.0)
    blotch /= blotch.std() + 1e-6
    shade = 25.0 * stripes + 12.0 * blotch
    image = base[None, None, :] + shade[..., None] * np.array([0.8, 1.0, 0.7], np.float32)
    image += rng.normal(0, 6.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def region_map(
    classes: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, smooth: float = 0.0
) -> np.ndarray:
    """Partition an image among ``classes`` by the argmax of smooth random fields.

    Returns an ``H×W`` array of class indices drawn from ``classes``; the boundaries are
    curved, like tissue boundaries. Every listed class is present.
    """
    h, w = shape
    sigma = smooth or max(h, w) / 6.0
    for _ in range(50):
        fields = np.stack(
            [ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in classes]
        )
        owner = fields.argmax(axis=0)
        counts = np.bincount(owner.ravel(), minlength=len(classes))
        # Each class needs a visible share, or the image-level label would lie.
        if counts.min() >= 0.05 * h * w:
            return np.asarray(classes)[owner]
    # Fall back to vertical bands, which always show every class.
    bands = np.minimum((np.arange(w) * len(classes)) // w, len(classes) - 1)
    return np.asarray(classes)[np.broadcast_to(bands, (h, w))]


def _compose(
    owner: np.ndarray, rng: np.random.Generator, style: str, num_classes: int
) -> np.ndarray:
    h, w = owner.shape
    image = np.zeros((h, w, 3), dtype=np.uint8)
    for c in np.unique(owner):
        if c >= num_classes:
            continue
        sel = owner == c
        image[sel] = render_texture(int(c), (h, w), rng, style)[sel]
    return image


def _add_background(
    owner: np.ndarray, image: np.ndarray, background_index: int, rng: np.random.Generator
) -> None:
    """Paint a white blob (background) into a corner region, in place."""
    h, w = owner.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.choice([0, h - 1]), rng.choice([0, w - 1])
    radius = rng.uniform(0.25, 0.45) * min(h, w)
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    owner[blob] = background_index
    image[blob] = _WHITE + rng.integers(-4, 5, size=(int(blob.sum()), 1))


def _choose_classes(rng: np.random.Generator, num_classes: int, max_classes: int) -> np.ndarray:
    k = int(rng.integers(2, min(max_classes, num_classes) + 1))
    return np.sort(rng.choice(num_classes, size=k, replace=False))


# What toy-data writes: images and masks, label CSVs, classes.yaml, its marker.
_TOY_FILE_SUFFIXES = frozenset({".png", ".csv", ".yaml", ".json"})


def _is_toy_root(root: Path) -> bool:
    try:
        marker = json.loads((root / TOY_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("kind") == _TOY_KIND


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Make sure ``root`` is new or empty; with ``overwrite``, empty a toy dataset there.

    A toy dataset written over another one would mix the two, and the counts reported
    would be those of the new one only.
    """
    if root.exists() and not root.is_dir():
        raise ToyDataError(f"{root}: exists and is not a folder")
    if not root.is_dir():
        return
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    if not overwrite:
        raise ToyDataError(
            f"{root}: folder is not empty ({shown}); toy data goes into a new or empty "
            "folder, so that it holds exactly what is reported. Choose another folder, or "
            "pass --overwrite to replace a toy dataset written there before"
        )
    if not _is_toy_root(root):
        raise ToyDataError(
            f"{root}: not a toy dataset (no {TOY_MARKER} from toy-data), so --overwrite "
            "leaves it alone; choose another folder, or delete this one yourself"
        )
    foreign = [e for e in entries if e not in _TOY_ENTRIES and not is_atomic_temp(e)]
    # Inside toy-data's own folders too: only the kinds of file it writes may go.
    foreign += [
        str(f.relative_to(root))
        for e in entries
        if e in _TOY_ENTRIES and (root / e).is_dir()
        for f in sorted((root / e).rglob("*"))
        if not f.is_dir()
        and f.suffix.lower() not in _TOY_FILE_SUFFIXES
        and not is_atomic_temp(f.name)
    ]
    if foreign:
        raise ToyDataError(
            f"{root}: holds {', '.join(foreign[:5])} besides the toy dataset; --overwrite "
            "deletes only what toy-data writes, so move these away or choose another folder"
        )
    for name in entries:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_arguments(
    counts: dict[str, int],
    patch_size: int,
    eval_size: tuple[int, int] | None,
    style: str,
    seed: int,
) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ToyDataError(f"{name} must be 0 or more, got {value}")
    if patch_size < MIN_PATCH_SIZE:
        raise ToyDataError(f"patch size must be at least {MIN_PATCH_SIZE} pixels, got {patch_size}")
    if eval_size is not None and min(eval_size) < 1:
        raise ToyDataError(f"evaluation image size must be positive, got {eval_size}")
    if style not in _STYLES:
        raise ToyDataError(f"unknown toy style {style!r}; expected one of {', '.join(_STYLES)}")
    if seed < 0:
        raise ToyDataError(f"seed must be 0 or more, got {seed}")


def make_toy_dataset(
    root: str | Path,
    dataset: str | DatasetSpec = "luad-histoseg",
    *,
    single_per_class: int = 6,
    multi_train: int = 12,
    num_val: int = 4,
    num_test: int = 4,
    patch_size: int = 64,
    eval_size: tuple[int, int] | None = None,
    style: str = "texture",
    seed: int = 0,
    overwrite: bool = False,
) -> ToyDataset:
    """Write a tiny dataset in the layout of ``dataset`` under ``root``.

    The root also receives :data:`TOY_MARKER`, which records what was written and lets a
    later ``overwrite`` recognise the folder as a toy dataset.

    Args:
        root: Folder to create; an existing one must be empty (see ``overwrite``).
        dataset: A registered benchmark name, ``"generic"`` (a 3-class dataset with
            ``classes.yaml`` and ``train.csv``), or a :class:`DatasetSpec`.
        single_per_class: Single-label training images per class (the synthesis pool).
        multi_train: Training images with two or more classes.
        num_val: Validation images with masks.
        num_test: Test images with masks.
        patch_size: Side of training patches (WSSS4LUAD-style data varies it ±25 %).
        eval_size: ``(height, width)`` of validation/test images; defaults to the patch size,
            or 2.5× it for datasets with large evaluation images (WSSS4LUAD).
        style: ``"texture"`` or ``"flat"`` (one constant colour per class).
        seed: Makes the dataset reproducible.
        overwrite: Delete a toy dataset already in ``root`` first. Only a folder with
            :data:`TOY_MARKER` holding nothing but toy-data's files is emptied.

    Returns:
        A :class:`ToyDataset` naming the root and the spec to read it with.

    Raises:
        ToyDataError: A negative count, a patch smaller than :data:`MIN_PATCH_SIZE`, an
            unknown style, a negative seed; ``root`` not empty (without ``overwrite``),
            or, with it, not a toy dataset or holding other files too.
    """
    root = Path(root)
    counts = {
        "single-label images per class": single_per_class,
        "multi-label training images": multi_train,
        "validation images": num_val,
        "test images": num_test,
    }
    _check_arguments(counts, patch_size, eval_size, style, seed)
    _prepare_root(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    marker: dict[str, Any] = {
        "kind": _TOY_KIND,
        "dataset": dataset.name if isinstance(dataset, DatasetSpec) else dataset,
        "single_per_class": single_per_class,
        "multi_train": multi_train,
        "num_val": num_val,
        "num_test": num_test,
        "patch_size": patch_size,
        "style": style,
        "seed": seed,
        "complete": False,
    }
    # The marker goes first, so that a run cut short can still be replaced with overwrite.
    atomic_write_json(root / TOY_MARKER, marker)
    if isinstance(dataset, DatasetSpec):
        spec = dataset
    elif dataset.lower() == "generic":
        import yaml

        atomic_write_text(
            root / GENERIC_CLASSES_FILE, yaml.safe_dump(GENERIC_TOY_CLASSES, sort_keys=False)
        )
        spec = load_generic_spec(root / GENERIC_CLASSES_FILE)
    else:
        spec = get_dataset_spec(dataset)
    rng = np.random.default_rng(seed)
    num_classes = spec.num_classes
    varying = spec.patch_size is None
    if eval_size is None:
        side = int(patch_size * 2.5) if varying else patch_size
        eval_size = (side, side + (patch_size // 2 if varying else 0))

    def patch_shape() -> tuple[int, int]:
        if not varying:
            return patch_size, patch_size
        lo, hi = int(patch_size * 0.75), int(patch_size * 1.25)
        return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))

    train_dir = root / spec.layout.train
    csv_labels: dict[str, np.ndarray] = {}
    count = 0

    def write_train(owner: np.ndarray, image: np.ndarray) -> None:
        nonlocal count
        label = spec.labels_from_mask(owner.astype(np.uint8))
        stem = f"{100000 + count}-{int(rng.integers(0, 30000))}-{int(rng.integers(0, 30000))}"
        if spec.name == "bcss-wsss":
            stem = f"TCGA-XX-{count:04d}-DX1_xmin{count * 224}_ymin0_MPP-0.2500+0"
        name = spec.format_name(stem, label)
        write_rgb_png(train_dir / name, image)
        csv_labels[name] = label
        count += 1

    for c in range(num_classes):
        for _ in range(single_per_class):
            shape = patch_shape()
            owner = np.full(shape, c, dtype=np.int64)
            image = _compose(owner, rng, style, num_classes)
            if spec.background_in_train and rng.random() < 0.5:
                _add_background(owner, image, spec.background_index, rng)
            write_train(owner, image)
    for _ in range(multi_train):
        shape = patch_shape()
        owner = region_map(_choose_classes(rng, num_classes, 3), shape, rng)
        image = _compose(owner, rng, style, num_classes)
        if spec.background_in_train and rng.random() < 0.5:
            _add_background(owner, image, spec.background_index, rng)
        write_train(owner, image)
    if spec.labels_csv:
        write_label_csv(root / spec.labels_csv, csv_labels, spec.class_names)

    for split, n in (("val", num_val), ("test", num_test)):
        img_dir, mask_dir = spec.layout.split_dirs(split)
        for i in range(n):
            owner = region_map(_choose_classes(rng, num_classes, 3), eval_size, rng)
            image = _compose(owner, rng, style, num_classes)
            if i % 2 == 1:
                _add_background(owner, image, spec.background_index, rng)
            stem = f"{split}-{i:03d}"
            write_rgb_png(root / img_dir / f"{stem}.png", image)
            write_mask_png(root / mask_dir / f"{stem}.png", owner.astype(np.uint8), spec.palette)

    marker.update(dataset=spec.name, complete=True, num_train=count)
    atomic_write_json(root / TOY_MARKER, marker)
    return ToyDataset(root, spec, count, single_per_class * num_classes)
