"""Checking a dataset folder the way training and evaluation will read it, before they do.

:func:`validate_dataset` walks the training folder and the val/test image and mask folders
of a dataset in its own layout (and, optionally, synthesized ``img/`` + ``mask/`` sets),
decodes every image and mask, and collects *every* problem rather than stopping at the
first, so that one run lists all that must be fixed. It also counts what is there: images
per split and per class, the single-label images per class (the synthesis pool), the mask
values seen and the image sizes.

Files are checked in a thread pool: PIL decodes with the GIL released, so threads overlap
the zlib work of many small PNGs without the cost of processes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageFile

from hisynseg.datasets.io import (
    ImageReadError,
    MaskColourError,
    _open_image,
    list_images,
    read_image_size,
    read_mask,
)
from hisynseg.datasets.labels import CSV_ENCODING, LabelError, label_to_str
from hisynseg.datasets.layouts import SYNTHETIC_LABELS_FILE
from hisynseg.datasets.spec import DatasetSpec

__all__ = [
    "PROBLEM_KINDS",
    "PUBLISHED_COUNTS",
    "Problem",
    "SplitSummary",
    "ValidationReport",
    "validate_dataset",
    "validate_synthetic",
]

SPLITS = ("train", "val", "test")

PROBLEM_KINDS: dict[str, str] = {
    "missing-folder": "a folder (or the label file) the layout requires is missing",
    "empty": "a folder holds no images",
    "unreadable": "an image or mask cannot be decoded (corrupt or truncated)",
    "size-mismatch": "a mask's size differs from its image's",
    "mask-value": "a mask holds a value that is neither a class nor the background index",
    "label-mismatch": "an image's label disagrees with the classes in its mask",
    "bad-label": "a file name (or label-file row) carries no valid label",
    "missing-mask": "an image has no mask",
    "missing-image": "a mask (or label-file row) has no image",
    "duplicate": "two masks (or two images) share a file stem, so the pairing is ambiguous",
    "no-single-label": "a class has no single-label training image to synthesize from",
}

# Split sizes of the datasets as published (METHOD.md section 2); shown beside the counts
# found, so that an incomplete download stands out.
PUBLISHED_COUNTS: dict[str, dict[str, int]] = {
    "luad-histoseg": {"train": 16678, "val": 300, "test": 307},
    "bcss-wsss": {"train": 23422, "val": 3418, "test": 4986},
    "wsss4luad": {"train": 10091, "val": 40, "test": 80},
}

# Pixels of a PNG can decode completely while the file lacks its last bytes; only the
# closing IEND chunk tells a complete file from a cut one.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK_HEADER = struct.Struct(">I4s")  # data length, chunk type
_PNG_CRC_BYTES = 4

# Below this many files a progress bar is clutter.
_PROGRESS_MIN_FILES = 200


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        kind: One of :data:`PROBLEM_KINDS`.
        path: The file or folder at fault.
        message: What is wrong, naming the file.
    """

    kind: str
    path: Path
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "path": str(self.path), "message": self.message}


@dataclass
class SplitSummary:
    """What was found in one split (or one synthesized set).

    Attributes:
        name: ``"train"``, ``"val"``, ``"test"`` or ``"synthetic:<folder>"``.
        image_dir: Folder of the images.
        mask_dir: Folder of the masks, or ``None`` for the training split.
        num_images: Image files found.
        num_masks: Mask files found.
        num_readable: Images that decoded.
        min_size: Smallest height and smallest width over the readable images.
        max_size: Largest height and largest width.
        class_images: For each class, how many images carry it: from the labels for
            labelled splits (train, synthetic), from the masks for val/test.
        single_label: For labelled splits, the single-label images of each class.
        unlabelled: Labelled-split images whose label has no class at all.
        mask_values: Every value seen in the masks.
        uniform_size: Whether all readable images have one size.
    """

    name: str
    image_dir: Path
    mask_dir: Path | None
    num_images: int = 0
    num_masks: int = 0
    num_readable: int = 0
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    class_images: list[int] = field(default_factory=list)
    single_label: list[int] | None = None
    unlabelled: int = 0
    mask_values: list[int] = field(default_factory=list)
    uniform_size: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_dir": str(self.image_dir),
            "mask_dir": None if self.mask_dir is None else str(self.mask_dir),
            "num_images": self.num_images,
            "num_masks": self.num_masks,
            "num_readable": self.num_readable,
            "min_size": None if self.min_size is None else list(self.min_size),
            "max_size": None if self.max_size is None else list(self.max_size),
            "class_images": list(self.class_images),
            "single_label": None if self.single_label is None else list(self.single_label),
            "unlabelled": self.unlabelled,
            "mask_values": list(self.mask_values),
        }


@dataclass
class ValidationReport:
    """Everything :func:`validate_dataset` found.

    Attributes:
        root: The dataset root.
        spec: The dataset description it was checked against.
        splits: Summary per split checked, in order (synthesized sets last).
        problems: Every problem, each naming its file; empty when the data is usable.
        warnings: Oddities that do not stop training (e.g. images of mixed sizes).
    """

    root: Path
    spec: DatasetSpec
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def problems_of(self, kind: str) -> list[Problem]:
        """The problems of one kind."""
        return [p for p in self.problems if p.kind == kind]

    def merge(self, other: ValidationReport) -> None:
        """Append another report's splits, problems and warnings to this one."""
        self.splits.update(other.splits)
        self.problems.extend(other.problems)
        self.warnings.extend(other.warnings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form of the report."""
        return {
            "root": str(self.root),
            "dataset": self.spec.name,
            "classes": list(self.spec.class_names),
            "short_names": list(self.spec.short_names),
            "background_index": self.spec.background_index,
            "ok": self.ok,
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "problems": [p.to_dict() for p in self.problems],
            "warnings": list(self.warnings),
        }

    def format(self, max_problems: int | None = None) -> str:
        """A human-readable report: counts per split and class, then warnings and problems.

        Args:
            max_problems: List at most this many problems (``None``: all of them).

        Raises:
            ValueError: A negative ``max_problems`` (a slice would silently drop problems
                from the end).
        """
        if max_problems is not None and max_problems < 0:
            raise ValueError(f"max_problems must be at least 0 or None, got {max_problems}")
        spec = self.spec
        lines = [
            f"dataset {spec.name} at {self.root}: {spec.num_classes} classes "
            f"({', '.join(spec.short_names)}), background index {spec.background_index}"
        ]
        published = PUBLISHED_COUNTS.get(spec.name, {})
        for summary in self.splits.values():
            lines.extend(_format_split(summary, spec, published.get(summary.name)))
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines.extend(f"  {w}" for w in self.warnings)
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            shown = self.problems if max_problems is None else self.problems[:max_problems]
            lines.extend(f"  [{p.kind}] {p.message}" for p in shown)
            if len(shown) < len(self.problems):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
            counts: dict[str, int] = {}
            for p in self.problems:
                counts[p.kind] = counts.get(p.kind, 0) + 1
            detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
            lines.append(f"FAILED: {len(self.problems)} problem(s): {detail}")
        else:
            lines.append("OK: no problems found")
        return "\n".join(lines)


def _size_text(size: tuple[int, int] | None) -> str:
    return "-" if size is None else f"{size[0]}x{size[1]}"


def _format_split(summary: SplitSummary, spec: DatasetSpec, published: int | None) -> list[str]:
    where = str(summary.image_dir)
    if summary.mask_dir is not None:
        where += f" + {summary.mask_dir}"
    count = f"{summary.num_images} images"
    if summary.mask_dir is not None:
        count += f", {summary.num_masks} masks"
    if published is not None:
        count += f" (published: {published:,})"
    lines = [f"{summary.name}: {count}  [{where}]"]
    if summary.num_readable:
        lines.append(
            f"  sizes (HxW): min {_size_text(summary.min_size)}, max {_size_text(summary.max_size)}"
        )
    if summary.mask_dir is not None and summary.num_masks:
        values = ", ".join(str(v) for v in summary.mask_values) or "-"
        lines.append(f"  mask values: {{{values}}}")
    if summary.class_images:
        source = "labels" if summary.single_label is not None else "masks"
        header = f"  {'class':<28} {'images':>8}"
        if summary.single_label is not None:
            header += f" {'single-label':>13}"
        lines.append(header + f"   (from {source})")
        for c, name in enumerate(spec.class_names):
            row = f"  {spec.short_names[c] + ' ' + name:<28} {summary.class_images[c]:>8}"
            if summary.single_label is not None:
                row += f" {summary.single_label[c]:>13}"
            lines.append(row)
    return lines


@dataclass(frozen=True)
class _Item:
    """One file to check: an image, its mask if any, its label if any."""

    image: Path
    mask: Path | None = None
    label: np.ndarray | None = None
    label_source: str = "file-name label"


@dataclass
class _ItemResult:
    size: tuple[int, int] | None = None
    present: np.ndarray | None = None  # bool[256]: mask values present
    problems: list[Problem] = field(default_factory=list)


@dataclass
class _Context:
    spec: DatasetSpec
    decode_images: bool
    valid_values: np.ndarray  # bool[256]


def _check_complete(path: Path) -> None:
    """Fail on a PNG that ends before its IEND chunk (PIL decodes such files without a word).

    The chunk headers are walked from the signature on, seeking past each chunk's data and
    CRC, so nothing is decoded and bytes that some tools append after IEND do not matter
    (searching only the file's tail for IEND called such complete files truncated).
    """
    truncated = ImageReadError(f"{path}: truncated PNG (the file ends before its IEND chunk)")
    # Unbuffered: each step reads one 8-byte header, not a buffer's worth of pixel data.
    with open(path, "rb", buffering=0) as fh:
        if fh.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
            return
        size = os.fstat(fh.fileno()).st_size
        pos = len(_PNG_SIGNATURE)
        while True:
            header = fh.read(_PNG_CHUNK_HEADER.size)
            if len(header) < _PNG_CHUNK_HEADER.size:
                raise truncated
            length, kind = _PNG_CHUNK_HEADER.unpack(header)
            pos += _PNG_CHUNK_HEADER.size + length + _PNG_CRC_BYTES
            if pos > size:
                raise truncated
            if kind == b"IEND":
                return
            fh.seek(pos)


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """``(height, width)`` of an image, decoding all of it when ``decode`` is set."""
    if not decode:
        return read_image_size(path)
    img = _open_image(path)
    w, h = img.size
    img.close()
    _check_complete(path)
    return h, w


def _read_mask(path: Path, spec: DatasetSpec) -> np.ndarray:
    mask = read_mask(path, spec.palette)
    _check_complete(path)
    return mask


def _class_text(label: np.ndarray, spec: DatasetSpec) -> str:
    names = [spec.short_names[c] for c in np.flatnonzero(label)]
    return f"[{label_to_str(label)}] ({', '.join(names) or 'no class'})"


def _check_item(item: _Item, ctx: _Context) -> _ItemResult:
    """Decode one image (and its mask) and list what is wrong with them."""
    result = _ItemResult()
    try:
        result.size = _image_size(item.image, ctx.decode_images)
    except ImageReadError as exc:
        result.problems.append(Problem("unreadable", item.image, str(exc)))
    except Exception as exc:  # one odd file must not end the whole run
        result.problems.append(Problem("unreadable", item.image, f"{item.image}: {exc!r}"))
    if item.mask is None:
        return result
    try:
        mask = _read_mask(item.mask, ctx.spec)
    except MaskColourError as exc:
        result.problems.append(Problem("mask-value", item.mask, str(exc)))
        return result
    except ImageReadError as exc:
        result.problems.append(Problem("unreadable", item.mask, str(exc)))
        return result
    except Exception as exc:
        result.problems.append(Problem("unreadable", item.mask, f"{item.mask}: {exc!r}"))
        return result
    if mask.ndim != 2:
        result.problems.append(
            Problem("unreadable", item.mask, f"{item.mask}: mask is not a single-channel image")
        )
        return result
    present = np.bincount(mask.ravel(), minlength=256) > 0
    result.present = present
    if result.size is not None and mask.shape != result.size:
        result.problems.append(
            Problem(
                "size-mismatch",
                item.mask,
                f"{item.mask}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                f"{item.image.name} is {result.size[0]}x{result.size[1]}",
            )
        )
    bad = np.flatnonzero(present & ~ctx.valid_values)
    if bad.size:
        spec = ctx.spec
        result.problems.append(
            Problem(
                "mask-value",
                item.mask,
                f"{item.mask}: mask values {bad.tolist()} are not classes of {spec.name} "
                f"(valid: 0..{spec.num_classes - 1} and background {spec.background_index})",
            )
        )
    if item.label is not None:
        in_mask = present[: ctx.spec.num_classes].astype(np.uint8)
        if not np.array_equal(in_mask, item.label):
            result.problems.append(
                Problem(
                    "label-mismatch",
                    item.image,
                    f"{item.image}: {item.label_source} {_class_text(item.label, ctx.spec)} "
                    f"but its mask {item.mask.name} holds {_class_text(in_mask, ctx.spec)}",
                )
            )
    return result


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    # Some libraries switch PIL to accepting truncated files process-wide; a validator
    # must not, so the flag is forced off for the run and restored afterwards.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _run_items(
    items: Sequence[_Item],
    ctx: _Context,
    desc: str,
    workers: int,
    progress: bool | None,
) -> list[_ItemResult]:
    from tqdm import tqdm

    if progress is None:
        progress = len(items) >= _PROGRESS_MIN_FILES and sys.stderr.isatty()
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        results = []
        for result in pool.map(lambda item: _check_item(item, ctx), items):
            results.append(result)
            bar.update()
    return results


def _summarise(
    summary: SplitSummary, items: Sequence[_Item], results: Sequence[_ItemResult], spec: DatasetSpec
) -> list[Problem]:
    """Fold per-file results into ``summary``; return the per-file problems in file order."""
    problems: list[Problem] = []
    sizes = []
    values = np.zeros(256, dtype=bool)
    class_images = np.zeros(spec.num_classes, dtype=np.int64)
    for result in results:
        problems.extend(result.problems)
        if result.size is not None:
            sizes.append(result.size)
        if result.present is not None:
            values |= result.present
            if summary.single_label is None:
                class_images += result.present[: spec.num_classes]
    summary.num_readable = len(sizes)
    if sizes:
        arr = np.asarray(sizes)
        summary.min_size = (int(arr[:, 0].min()), int(arr[:, 1].min()))
        summary.max_size = (int(arr[:, 0].max()), int(arr[:, 1].max()))
        summary.uniform_size = summary.min_size == summary.max_size
    summary.mask_values = np.flatnonzero(values).tolist()
    if summary.single_label is not None:
        single = np.zeros(spec.num_classes, dtype=np.int64)
        for item in items:
            if item.label is None:
                continue
            class_images += item.label
            if item.label.sum() == 1:
                single += item.label
            elif item.label.sum() == 0:
                summary.unlabelled += 1
        summary.single_label = single.tolist()
    summary.class_images = class_images.tolist()
    return problems


def _missing_folder(path: Path, what: str, spec: DatasetSpec) -> Problem:
    layout = spec.layout
    return Problem(
        "missing-folder",
        path,
        f"{path}: missing {what} folder of the {spec.name} layout (expected "
        f"'{layout.train}/', '{layout.val[0]}/', '{layout.val[1]}/', "
        f"'{layout.test[0]}/', '{layout.test[1]}/')",
    )


def _non_images(folder: Path, images: Sequence[Path]) -> list[str]:
    found = {p.name for p in images}
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in found
    )


def _warn_non_images(folder: Path, images: Sequence[Path], warnings: list[str]) -> None:
    others = _non_images(folder, images)
    if others:
        warnings.append(
            f"{folder}: {len(others)} file(s) that are not images were skipped "
            f"(e.g. {', '.join(others[:3])})"
        )


@dataclass
class _CsvLabels:
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    bad_rows: set[str] = field(default_factory=set)  # images whose row is at fault
    usable: bool = True  # False when the file is missing or lacks columns


def _binary_values(raw: Sequence[str | None]) -> list[int] | None:
    """The 0/1 values of one CSV row, or ``None``; accepts what ``read_label_csv`` accepts."""
    try:
        values = [int(v) for v in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return values if all(v in (0, 1) for v in values) else None


def _read_labels_tolerant(csv_path: Path, spec: DatasetSpec) -> _CsvLabels:
    """Read a label CSV, reporting every bad row instead of stopping at the first."""
    out = _CsvLabels()
    if not csv_path.is_file():
        out.usable = False
        out.problems.append(
            Problem(
                "missing-folder",
                csv_path,
                f"{csv_path}: missing; {spec.name} keeps its image-level labels in this file "
                f"(columns: image, {', '.join(spec.class_names)})",
            )
        )
        return out
    try:
        # Read whole (a label file is small) so that a decoding error surfaces here, as one
        # problem, rather than from inside the row loop.
        text = csv_path.read_text(encoding=CSV_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        out.usable = False
        out.problems.append(Problem("bad-label", csv_path, f"{csv_path}: cannot be read: {exc}"))
        return out
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in ("image", *spec.class_names) if c not in fields]
        if missing:
            out.usable = False
            out.problems.append(
                Problem(
                    "bad-label",
                    csv_path,
                    f"{csv_path}: missing column(s) {missing}; columns are {fields}",
                )
            )
            return out
        for row_no, row in enumerate(reader, start=2):
            image = row["image"] or ""
            raw = [row[c] for c in spec.class_names]
            values = _binary_values(raw)
            if values is None:
                out.bad_rows.add(image)
                out.problems.append(
                    Problem(
                        "bad-label",
                        csv_path,
                        f"{csv_path}:{row_no}: {image or '(no image name)'}: class values must "
                        f"be 0 or 1, got {raw}",
                    )
                )
            elif image in out.labels:
                out.problems.append(
                    Problem("bad-label", csv_path, f"{csv_path}:{row_no}: {image} is listed twice")
                )
            else:
                out.labels[image] = np.array(values, dtype=np.uint8)
    return out


def _labelled_items(
    folder: Path,
    images: Sequence[Path],
    spec: DatasetSpec,
    csv_path: Path | None,
    problems: list[Problem],
) -> list[_Item]:
    """Training-style items: every image, with its label where one could be read."""
    if csv_path is None:
        items = []
        for path in images:
            try:
                label = spec.parse_label(path)
            except LabelError as exc:
                problems.append(Problem("bad-label", path, str(exc)))
                label = None
            items.append(_Item(path, label=label))
        return items
    table = _read_labels_tolerant(csv_path, spec)
    problems.extend(table.problems)
    if not table.usable:
        return [_Item(path) for path in images]
    names = {p.name for p in images}
    for name in sorted(set(table.labels) - names):
        problems.append(
            Problem("missing-image", csv_path, f"{csv_path}: lists {name}, not found in {folder}")
        )
    items = []
    for path in images:
        label = table.labels.get(path.name)
        if label is None and path.name not in table.bad_rows:
            problems.append(Problem("bad-label", path, f"{path}: has no row in {csv_path}"))
        items.append(_Item(path, label=label, label_source=f"label in {csv_path.name}"))
    return items


def _pair_masks(
    images: Sequence[Path], mask_dir: Path, problems: list[Problem]
) -> tuple[list[tuple[Path, Path | None]], int]:
    """Match images to masks by file stem, reporting unmatched files and shared stems."""
    first_image: dict[str, Path] = {}
    for image in images:
        if image.stem in first_image:
            # Both would be scored against the one mask (its pixels counted twice), and
            # saved predictions of both go to one file name.
            problems.append(
                Problem(
                    "duplicate",
                    image,
                    f"{image}: two images share the stem {image.stem!r} "
                    f"({first_image[image.stem].name}); each mask pairs with one image",
                )
            )
        else:
            first_image[image.stem] = image
    masks = list_images(mask_dir)
    by_stem: dict[str, Path] = {}
    for mask in masks:
        if mask.stem in by_stem:
            problems.append(
                Problem(
                    "duplicate",
                    mask,
                    f"{mask}: two masks share the stem {mask.stem!r} "
                    f"({by_stem[mask.stem].name}); which one is meant is ambiguous",
                )
            )
            continue
        by_stem[mask.stem] = mask
    image_stems = {p.stem for p in images}
    pairs = []
    for image in images:
        mask = by_stem.get(image.stem)
        if mask is None:
            problems.append(
                Problem("missing-mask", image, f"{image}: no mask with the same name in {mask_dir}")
            )
        pairs.append((image, mask))
    for stem, mask in sorted(by_stem.items()):
        if stem not in image_stems:
            problems.append(
                Problem("missing-image", mask, f"{mask}: mask without an image of the same name")
            )
    return pairs, len(masks)


def _eval_label(image: Path, spec: DatasetSpec) -> np.ndarray | None:
    """The label in an evaluation image's name, if it carries one (the benchmarks' don't)."""
    if spec.codec is None:
        return None
    try:
        return spec.parse_label(image.name)
    except LabelError:
        return None


def _default_workers() -> int:
    return min(8, (os.cpu_count() or 1) * 2)


def _valid_values(spec: DatasetSpec) -> np.ndarray:
    valid = np.zeros(256, dtype=bool)
    valid[: spec.num_classes] = True
    valid[spec.background_index] = True
    return valid


def _check_split(
    root: Path,
    spec: DatasetSpec,
    split: str,
    ctx: _Context,
    report: ValidationReport,
    workers: int,
    progress: bool | None,
) -> None:
    problems: list[Problem] = []
    if split == "train":
        folder = root / spec.layout.train
        summary = SplitSummary("train", folder, None, single_label=[])
        report.splits[split] = summary
        if not folder.is_dir():
            report.problems.append(_missing_folder(folder, "training", spec))
            return
        images = list_images(folder)
        _warn_non_images(folder, images, report.warnings)
        summary.num_images = len(images)
        if not images:
            report.problems.append(Problem("empty", folder, f"{folder}: no training images"))
            return
        csv_path = root / spec.labels_csv if spec.labels_csv else None
        items = _labelled_items(folder, images, spec, csv_path, problems)
    else:
        img_rel, mask_rel = spec.layout.split_dirs(split)
        img_dir, mask_dir = root / img_rel, root / mask_rel
        summary = SplitSummary(split, img_dir, mask_dir)
        report.splits[split] = summary
        if not img_dir.is_dir():
            report.problems.append(_missing_folder(img_dir, f"{split} image", spec))
        if not mask_dir.is_dir():
            report.problems.append(_missing_folder(mask_dir, f"{split} mask", spec))
        if not img_dir.is_dir():
            return
        images = list_images(img_dir)
        _warn_non_images(img_dir, images, report.warnings)
        summary.num_images = len(images)
        if not images:
            report.problems.append(Problem("empty", img_dir, f"{img_dir}: no {split} images"))
        if mask_dir.is_dir():
            pairs, summary.num_masks = _pair_masks(images, mask_dir, problems)
        else:
            pairs = [(image, None) for image in images]
        items = [
            _Item(image, mask, None if mask is None else _eval_label(image, spec))
            for image, mask in pairs
        ]
    results = _run_items(items, ctx, split, workers, progress)
    report.problems.extend(problems)
    report.problems.extend(_summarise(summary, items, results, spec))
    _split_warnings(summary, spec, report.warnings)


def _split_warnings(summary: SplitSummary, spec: DatasetSpec, warnings: list[str]) -> None:
    if summary.name == "train" and spec.patch_size is not None and not summary.uniform_size:
        warnings.append(
            f"{summary.image_dir}: training images vary in size (min "
            f"{_size_text(summary.min_size)}, max {_size_text(summary.max_size)}) although "
            f"{spec.name} patches are all one size"
        )
    if summary.single_label is not None and summary.unlabelled:
        warnings.append(
            f"{summary.image_dir}: {summary.unlabelled} image(s) carry no class at all "
            "(all-zero label); they give the classifier nothing to learn"
        )


def _check_train_pool(summary: SplitSummary, spec: DatasetSpec) -> list[Problem]:
    if summary.single_label is None or not summary.num_images:
        return []
    return [
        Problem(
            "no-single-label",
            summary.image_dir,
            f"{summary.image_dir}: class {c} {spec.short_names[c]} ({spec.class_names[c]}) "
            "has no single-label training image; synthesis needs at least one per class",
        )
        for c, n in enumerate(summary.single_label)
        if n == 0
    ]


def validate_synthetic(
    folder: str | Path,
    spec: DatasetSpec,
    *,
    decode_images: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
) -> ValidationReport:
    """Check a synthesized set: ``img/`` + ``mask/``, labels in the file names.

    Besides what :func:`validate_dataset` checks for val/test, every image's label (from
    its name, or from ``labels.csv`` for a generic dataset) must equal the set of classes
    present in its mask.

    Args:
        folder: The synthesized set's folder.
        spec: The dataset it was synthesized from.
        decode_images: Decode images fully (catches truncation) rather than read headers.
        workers: Threads reading files (default: twice the CPUs, at most 8).
        progress: Show a progress bar (``None``: only on a terminal and for large sets).

    Returns:
        A report with one split, ``"synthetic:<folder name>"``.
    """
    folder = Path(folder)
    report = ValidationReport(folder, spec)
    ctx = _Context(spec, decode_images, _valid_values(spec))
    img_dir, mask_dir = folder / "img", folder / "mask"
    name = f"synthetic:{folder.name}"
    summary = SplitSummary(name, img_dir, mask_dir, single_label=[])
    report.splits[name] = summary
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            report.problems.append(
                Problem("missing-folder", d, f"{d}: missing; a synthesized set has img/ and mask/")
            )
    if not img_dir.is_dir():
        return report
    images = list_images(img_dir)
    _warn_non_images(img_dir, images, report.warnings)
    summary.num_images = len(images)
    if not images:
        report.problems.append(Problem("empty", img_dir, f"{img_dir}: no synthesized images"))
        return report
    problems: list[Problem] = []
    csv_path = folder / SYNTHETIC_LABELS_FILE if spec.codec is None else None
    labelled = _labelled_items(img_dir, images, spec, csv_path, problems)
    if mask_dir.is_dir():
        pairs, summary.num_masks = _pair_masks(images, mask_dir, problems)
    else:
        pairs = [(image, None) for image in images]
    items = [
        _Item(item.image, mask, item.label, item.label_source)
        for item, (_, mask) in zip(labelled, pairs, strict=True)
    ]
    with _strict_truncation():
        results = _run_items(items, ctx, name, workers or _default_workers(), progress)
    report.problems.extend(problems)
    report.problems.extend(_summarise(summary, items, results, spec))
    return report


def validate_dataset(
    root: str | Path,
    spec: DatasetSpec,
    splits: Sequence[str] = SPLITS,
    *,
    synthetic: Sequence[str | Path] = (),
    decode_images: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
) -> ValidationReport:
    """Check a dataset folder in ``spec``'s layout and list every problem found.

    For the training split: every image decodes, every name (or ``train.csv`` row) holds a
    valid label, and every class has at least one single-label image. For val and test:
    every image and mask decodes, every image has a mask of its size and every mask a
    matching image, and mask values are classes or the background index (an image whose
    name carries a label must also agree with its mask). Missing folders are problems too.

    Args:
        root: The dataset root.
        spec: The dataset description (see :func:`~hisynseg.datasets.spec.resolve_dataset_spec`).
        splits: Which of ``"train"``, ``"val"``, ``"test"`` to check.
        synthetic: Synthesized ``img/`` + ``mask/`` folders to check as well
            (see :func:`validate_synthetic`).
        decode_images: Decode images fully (catches truncation) rather than read headers;
            masks are always decoded.
        workers: Threads reading files (default: twice the CPUs, at most 8).
        progress: Show progress bars (``None``: only on a terminal and for large sets).

    Returns:
        The report; ``report.ok`` is false when a problem was found.

    Raises:
        ValueError: An unknown split name.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected some of {list(SPLITS)}")
    root = Path(root)
    report = ValidationReport(root, spec)
    workers = workers or _default_workers()
    ctx = _Context(spec, decode_images, _valid_values(spec))
    if splits and not root.is_dir():
        report.problems.append(
            Problem("missing-folder", root, f"{root}: dataset root folder does not exist")
        )
    else:
        with _strict_truncation():
            for split in SPLITS:
                if split in splits:
                    _check_split(root, spec, split, ctx, report, workers, progress)
        if "train" in report.splits:
            report.problems.extend(_check_train_pool(report.splits["train"], spec))
    for folder in synthetic:
        report.merge(
            validate_synthetic(
                folder, spec, decode_images=decode_images, workers=workers, progress=progress
            )
        )
    return report
