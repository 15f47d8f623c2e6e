"""Image-level label codecs: the three file-name encodings of the benchmarks and a CSV reader.

A label is a 1-D ``numpy`` array of 0/1 (``uint8``), one entry per tissue class in the
dataset's class order.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from hisynseg.errors import HisynsegError

__all__ = [
    "LabelError",
    "LabelCodec",
    "LUAD_CODEC",
    "BCSS_CODEC",
    "WSSS4LUAD_CODEC",
    "CODECS",
    "read_label_csv",
    "write_label_csv",
    "label_to_str",
    "CSV_ENCODING",
]

# "utf-8-sig" reads plain UTF-8 and also skips the byte-order mark that Excel's "CSV UTF-8"
# puts first, which would otherwise glue itself to the first column name ("\ufeffimage").
CSV_ENCODING = "utf-8-sig"


class LabelError(HisynsegError, ValueError):
    """An image-level label could not be read; the message names the file."""


def label_to_str(label: Sequence[int] | np.ndarray) -> str:
    """Compact ``"1010"`` rendering used in manifests and logs."""
    return "".join(str(int(v)) for v in label)


@dataclass(frozen=True)
class LabelCodec:
    """Reads and writes the multi-hot label carried at the end of a file name.

    Attributes:
        name: Registry name of the codec.
        separator: What stands between the digits inside the brackets (``" "``, ``""``
            or ``", "``).
        joiner: What :meth:`format` puts between the stem and the bracket.
    """

    name: str
    separator: str
    joiner: str = "-"

    @property
    def _pattern(self) -> re.Pattern[str]:
        digit_sep = re.escape(self.separator)
        return re.compile(r"\[([01](?:" + digit_sep + r"[01])*)\]$")

    def parse(self, filename: str | Path, num_classes: int) -> np.ndarray:
        """Return the label encoded in ``filename``.

        Args:
            filename: A path or bare file name such as ``"a-[1 0 0 1].png"``.
            num_classes: The number of tissue classes the label must have.

        Raises:
            LabelError: The name carries no label in this encoding, or one of the wrong
                length.
        """
        stem = Path(filename).stem
        match = self._pattern.search(stem)
        if match is None:
            raise LabelError(
                f"{filename}: file name does not end with a {self.name} label such as "
                f"'{self.example(num_classes)}'"
            )
        digits = match.group(1).split(self.separator) if self.separator else list(match.group(1))
        if len(digits) != num_classes:
            raise LabelError(
                f"{filename}: label has {len(digits)} entries, the dataset has {num_classes} classes"
            )
        return np.array([int(d) for d in digits], dtype=np.uint8)

    def format(self, stem: str, label: Sequence[int] | np.ndarray, suffix: str = ".png") -> str:
        """Return the file name ``stem-[label]suffix`` in this encoding."""
        inner = self.separator.join(str(int(v)) for v in label)
        return f"{stem}{self.joiner}[{inner}]{suffix}"

    def example(self, num_classes: int) -> str:
        inner = self.separator.join(["1"] + ["0"] * (num_classes - 1))
        return f"[{inner}]"


LUAD_CODEC = LabelCodec("luad", " ")
BCSS_CODEC = LabelCodec("bcss", "", joiner="")
WSSS4LUAD_CODEC = LabelCodec("wsss4luad", ", ")
CODECS: dict[str, LabelCodec] = {c.name: c for c in (LUAD_CODEC, BCSS_CODEC, WSSS4LUAD_CODEC)}


def read_label_csv(path: str | Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Read per-image labels from a CSV with a column ``image`` and one 0/1 column per class.

    The file is read as UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is skipped.

    Returns:
        A map from the ``image`` value (a path relative to the CSV's image folder) to its label.

    Raises:
        LabelError: A missing or unreadable file, missing columns, a value other than 0/1, or
            a repeated image; the message names the file (and the row).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding=CSV_ENCODING) as fh:
            return _read_label_rows(fh, path, class_names)
    except FileNotFoundError:
        raise LabelError(
            f"{path}: not found; it must list every training image with its labels "
            f"(columns: image, {', '.join(class_names)})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: cannot be read: {exc}") from None


def _read_label_rows(fh: TextIO, path: Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    labels: dict[str, np.ndarray] = {}
    reader = csv.DictReader(fh)
    fields = reader.fieldnames or []
    missing = [c for c in ("image", *class_names) if c not in fields]
    if missing:
        raise LabelError(f"{path}: missing column(s) {missing}; columns are {fields}")
    for row_no, row in enumerate(reader, start=2):
        try:
            values = [int(row[c]) for c in class_names]
        except (TypeError, ValueError):
            raise LabelError(f"{path}:{row_no}: class values must be 0 or 1: {row}") from None
        if any(v not in (0, 1) for v in values):
            raise LabelError(f"{path}:{row_no}: class values must be 0 or 1: {row}")
        image = row["image"]
        if image in labels:
            raise LabelError(f"{path}:{row_no}: image {image!r} is listed twice")
        labels[image] = np.array(values, dtype=np.uint8)
    return labels


def write_label_csv(
    path: str | Path, labels: dict[str, np.ndarray], class_names: Sequence[str]
) -> None:
    """Write labels in the format :func:`read_label_csv` reads, atomically."""
    from hisynseg.datasets.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *class_names])
        for image in sorted(labels):
            writer.writerow([image, *(int(v) for v in labels[image])])
