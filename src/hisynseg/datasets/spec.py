"""Dataset descriptions: class names and order, palette, background index, label codec, layout.

The three benchmarks of the paper are registered by name; a user's own data is described
by a ``classes.yaml`` at the root of a generic-layout folder (see :func:`load_generic_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hisynseg.datasets.labels import (
    BCSS_CODEC,
    LUAD_CODEC,
    WSSS4LUAD_CODEC,
    LabelCodec,
    LabelError,
)
from hisynseg.errors import HisynsegError

__all__ = [
    "SplitLayout",
    "DatasetSpec",
    "SpecError",
    "DATASETS",
    "DATASET_NAMES",
    "get_dataset_spec",
    "load_generic_spec",
    "resolve_dataset_spec",
    "GENERIC_CLASSES_FILE",
    "GENERIC_LABELS_FILE",
]

GENERIC_CLASSES_FILE = "classes.yaml"
GENERIC_LABELS_FILE = "train.csv"


class SpecError(HisynsegError, ValueError):
    """A dataset description (a generic layout's ``classes.yaml``) is missing or invalid.

    A ``ValueError`` too, so callers that caught the plain ``ValueError`` this used to be
    keep working.
    """


@dataclass(frozen=True)
class SplitLayout:
    """Where a dataset's files live, relative to its root.

    Attributes:
        train: Folder of training images that carry image-level labels.
        val: ``(image folder, mask folder)`` of the validation split.
        test: ``(image folder, mask folder)`` of the test split.
    """

    train: str
    val: tuple[str, str]
    test: tuple[str, str]

    def split_dirs(self, split: str) -> tuple[str, str]:
        if split == "val":
            return self.val
        if split == "test":
            return self.test
        raise ValueError(f"unknown split {split!r}; expected 'val' or 'test'")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the code needs to know about one dataset.

    Attributes:
        name: Registry name (``"luad-histoseg"``, ``"bcss-wsss"``, ``"wsss4luad"``, or the
            generic dataset's own name).
        class_names: Tissue classes in label order.
        short_names: Abbreviations, same order (used in tables).
        palette: RGB colour of every mask index, tissue classes first, then background.
        background_index: Mask index of background/exclude pixels; never a tissue class.
        codec: File-name label codec, or ``None`` when labels come from a CSV.
        layout: Where the splits live.
        patch_size: Side of the training patches, or ``None`` when they vary.
        background_in_train: Whether training patches contain white non-tissue background
            that must be found by thresholding (WSSS4LUAD).
        background_grey_threshold: Grey level above which a pixel may be background.
        background_min_size: Bright regions smaller than this many pixels stay tissue.
    """

    name: str
    class_names: tuple[str, ...]
    short_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    background_index: int
    codec: LabelCodec | None
    layout: SplitLayout
    patch_size: int | None = 224
    background_in_train: bool = False
    background_grey_threshold: int = 210
    background_min_size: int = 64
    labels_csv: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        """Number of tissue classes (background excluded)."""
        return len(self.class_names)

    @property
    def palette_array(self) -> np.ndarray:
        return np.asarray(self.palette, dtype=np.uint8)

    def parse_label(self, filename: str | Path) -> np.ndarray:
        """Label of a training image from its file name (benchmark layouts only)."""
        if self.codec is None:
            raise LabelError(
                f"{filename}: dataset {self.name!r} keeps labels in {self.labels_csv}, "
                "not in file names"
            )
        return self.codec.parse(filename, self.num_classes)

    def format_name(self, stem: str, label: np.ndarray, suffix: str = ".png") -> str:
        """File name carrying ``label`` the way this dataset encodes it (plain name if CSV)."""
        if self.codec is None:
            return f"{stem}{suffix}"
        return self.codec.format(stem, label, suffix)

    def labels_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Multi-hot label of the tissue classes present in an index mask."""
        present = np.bincount(mask.ravel(), minlength=256)[: self.num_classes] > 0
        return present.astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly description (the generic layout's ``classes.yaml`` format)."""
        return {
            "name": self.name,
            "classes": list(self.class_names),
            "short_names": list(self.short_names),
            "palette": [list(c) for c in self.palette],
            "background_index": self.background_index,
            "patch_size": self.patch_size,
            "background_in_train": self.background_in_train,
            "background_grey_threshold": self.background_grey_threshold,
            "background_min_size": self.background_min_size,
        }


_BENCHMARK_LAYOUT = SplitLayout("train", ("val/img", "val/mask"), ("test/img", "test/mask"))

LUAD_HISTOSEG = DatasetSpec(
    name="luad-histoseg",
    class_names=("tumor epithelium", "necrosis", "lymphocyte", "tumor-associated stroma"),
    short_names=("TE", "NEC", "LYM", "TAS"),
    palette=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    background_index=4,
    codec=LUAD_CODEC,
    layout=_BENCHMARK_LAYOUT,
)

BCSS_WSSS = DatasetSpec(
    name="bcss-wsss",
    class_names=("tumor", "stroma", "lymphocytic infiltrate", "necrosis"),
    short_names=("TUM", "STR", "LYM", "NEC"),
    palette=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
    background_index=4,
    codec=BCSS_CODEC,
    layout=SplitLayout("training", ("val/img", "val/mask"), ("test/img", "test/mask")),
)

WSSS4LUAD = DatasetSpec(
    name="wsss4luad",
    class_names=("tumor", "stroma", "normal"),
    short_names=("TUM", "STR", "NOM"),
    palette=((0, 64, 128), (64, 128, 0), (243, 152, 0), (255, 255, 255)),
    background_index=3,
    codec=WSSS4LUAD_CODEC,
    layout=SplitLayout(
        "1.training", ("2.validation/img", "2.validation/mask"), ("3.testing/img", "3.testing/mask")
    ),
    patch_size=None,
    background_in_train=True,
)

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (LUAD_HISTOSEG, BCSS_WSSS, WSSS4LUAD)}
DATASET_NAMES = (*DATASETS, "generic")

_ALIASES = {
    "luad": "luad-histoseg",
    "luad_histoseg": "luad-histoseg",
    "bcss": "bcss-wsss",
    "bcss_wsss": "bcss-wsss",
    "wsss4luad": "wsss4luad",
}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered benchmark called ``name`` (case-insensitive; short aliases accepted).

    Raises:
        KeyError: Unknown name; the message lists the known ones.
    """
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise KeyError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
            "(or 'generic' with a classes.yaml in the data root)"
        )
    return DATASETS[key]


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the problem and where it is (PyYAML's own text
    spans several lines with a caret drawing, which the CLI's one-line report cannot show)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


def _whole_number(value: Any) -> bool:
    # bool is an int subclass, and YAML reads ``yes``/``true`` as one; a float such as 1.5
    # would be truncated silently by int(). Neither is a colour value or a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(data: dict[str, Any], key: str, default: int, path: Path) -> int:
    value = data.get(key, default)
    if not _whole_number(value):
        raise SpecError(f"{path}: {key!r} must be a whole number, got {value!r}")
    return int(value)


def _read_palette(raw: Any, num_classes: int, path: Path) -> tuple[tuple[int, int, int], ...]:
    """The ``palette`` entry: one distinct RGB triple per class, then one for background."""
    expected = num_classes + 1
    if not isinstance(raw, list) or len(raw) != expected:
        raise SpecError(
            f"{path}: 'palette' needs {expected} RGB triples (one per class, then background), "
            f"got {raw!r}"
        )
    palette: list[tuple[int, int, int]] = []
    for i, colour in enumerate(raw):
        if (
            not isinstance(colour, list)
            or len(colour) != 3
            or not all(_whole_number(v) and 0 <= v <= 255 for v in colour)
        ):
            raise SpecError(
                f"{path}: palette entry {i} must be 3 whole numbers in 0..255 "
                f"(an RGB triple), got {colour!r}"
            )
        palette.append((int(colour[0]), int(colour[1]), int(colour[2])))
    # RGB masks are decoded by colour, so two indices with one colour cannot be told apart.
    first_at: dict[tuple[int, int, int], int] = {}
    for i, colour in enumerate(palette):
        if colour in first_at:
            raise SpecError(
                f"{path}: palette entries {first_at[colour]} and {i} are both {list(colour)}; "
                "every class and the background need their own colour"
            )
        first_at[colour] = i
    return tuple(palette)


def _read_names(raw: Any, key: str, path: Path) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character ("abc" -> a, b, c).
    if not isinstance(raw, list) or not all(
        isinstance(n, str | int) and not isinstance(n, bool) and str(n).strip() for n in raw
    ):
        raise SpecError(f"{path}: {key!r} must be a list of names, got {raw!r}")
    return tuple(str(n) for n in raw)


def load_generic_spec(path: str | Path) -> DatasetSpec:
    """Build a spec from a generic layout's ``classes.yaml``.

    The file holds ``classes`` (list of names), ``palette`` (one RGB triple per class, then
    one for background; values 0..255, all colours distinct), and optionally ``name``,
    ``short_names``, ``background_index`` (default: number of classes), ``patch_size``,
    ``background_in_train``.
    The generic layout is ``train/`` + ``train.csv``, ``val/{img,mask}``, ``test/{img,mask}``.

    Raises:
        SpecError: The file is missing, is not valid YAML, or has a missing or inconsistent
            field; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GENERIC_CLASSES_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(
            f"{path}: not found; a generic dataset needs a {GENERIC_CLASSES_FILE} "
            "with its classes and palette"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {_yaml_error_text(exc)}") from None
    if not isinstance(data, dict) or "classes" not in data or "palette" not in data:
        raise SpecError(f"{path}: must be a mapping with 'classes' and 'palette'")
    classes = _read_names(data["classes"], "classes", path)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise SpecError(f"{path}: 'classes' must list at least two distinct names")
    palette = _read_palette(data["palette"], len(classes), path)
    background_index = _int_field(data, "background_index", len(classes), path)
    if background_index != len(classes):
        raise SpecError(
            f"{path}: background_index must be {len(classes)} (tissue classes come first)"
        )
    short = _read_names(data.get("short_names", list(classes)), "short_names", path)
    if len(short) != len(classes):
        raise SpecError(f"{path}: 'short_names' must have one entry per class")
    # null is allowed: it means the training patches vary in size (as in WSSS4LUAD).
    patch_size = (
        None if data.get("patch_size", 224) is None else _int_field(data, "patch_size", 224, path)
    )
    if patch_size is not None and patch_size < 1:
        raise SpecError(f"{path}: 'patch_size' must be at least 1 (or null), got {patch_size}")
    in_train = data.get("background_in_train", False)
    if not isinstance(in_train, bool):
        raise SpecError(f"{path}: 'background_in_train' must be true or false, got {in_train!r}")
    return DatasetSpec(
        name=str(data.get("name", "generic")),
        class_names=classes,
        short_names=short,
        palette=palette,
        background_index=len(classes),
        codec=None,
        layout=_BENCHMARK_LAYOUT,
        patch_size=patch_size,
        background_in_train=in_train,
        background_grey_threshold=_int_field(data, "background_grey_threshold", 210, path),
        background_min_size=_int_field(data, "background_min_size", 64, path),
        labels_csv=GENERIC_LABELS_FILE,
    )


def resolve_dataset_spec(name: str, root: str | Path | None = None) -> DatasetSpec:
    """A registered benchmark, or, for ``"generic"``, the spec in ``root/classes.yaml``.

    Raises:
        KeyError: An unknown dataset name.
        SpecError: ``"generic"`` without a root, or a missing or invalid ``classes.yaml``.
    """
    if name.lower() == "generic":
        if root is None:
            raise SpecError("dataset 'generic' needs the data root that holds classes.yaml")
        return load_generic_spec(Path(root) / GENERIC_CLASSES_FILE)
    return get_dataset_spec(name)
