"""File-name label codecs of the three benchmarks and the generic layout's label CSV."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from hisynseg.datasets.labels import (
    BCSS_CODEC,
    CODECS,
    LUAD_CODEC,
    WSSS4LUAD_CODEC,
    LabelCodec,
    LabelError,
    label_to_str,
    read_label_csv,
    write_label_csv,
)
from hisynseg.errors import HisynsegError

# (codec, real file name from the dataset's own readme, its label)
REAL_NAMES = [
    (LUAD_CODEC, "1031280-2300-27920-[1 0 0 1].png", [1, 0, 0, 1]),
    (BCSS_CODEC, "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),
    (WSSS4LUAD_CODEC, "1003370-11223-11698-[1, 1, 0].png", [1, 1, 0]),
]

# A stem as each dataset names its patches (format appends the label).
STEMS = {
    "luad": "1031280-2300-27920",
    "bcss": "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0",
    "wsss4luad": "1003370-11223-11698",
}


def all_labels(num_classes: int) -> list[np.ndarray]:
    return [
        np.array(bits, dtype=np.uint8) for bits in itertools.product((0, 1), repeat=num_classes)
    ]


@pytest.mark.parametrize(
    ("codec", "name", "label"), REAL_NAMES, ids=lambda v: getattr(v, "name", None)
)
def test_real_names_parse(codec: LabelCodec, name: str, label: list[int]) -> None:
    parsed = codec.parse(name, len(label))
    assert parsed.dtype == np.uint8
    assert parsed.tolist() == label


@pytest.mark.parametrize(
    ("codec", "name", "label"), REAL_NAMES, ids=lambda v: getattr(v, "name", None)
)
def test_format_reproduces_real_names(codec: LabelCodec, name: str, label: list[int]) -> None:
    assert codec.format(STEMS[codec.name], label) == name


@pytest.mark.parametrize("codec", list(CODECS.values()), ids=list(CODECS))
@pytest.mark.parametrize("num_classes", [3, 4])
def test_round_trip_every_label(codec: LabelCodec, num_classes: int) -> None:
    labels = all_labels(num_classes)
    assert len(labels) == 2**num_classes
    for label in labels:
        name = codec.format(STEMS[codec.name], label)
        assert codec.parse(name, num_classes).tolist() == label.tolist(), name
        # A full path parses the same as the bare name.
        assert codec.parse(Path("/data/train") / name, num_classes).tolist() == label.tolist()


def test_codecs_use_the_documented_separators() -> None:
    label = [1, 0, 1, 1]
    assert LUAD_CODEC.format("a", label) == "a-[1 0 1 1].png"
    assert BCSS_CODEC.format("a", label) == "a[1011].png"
    assert WSSS4LUAD_CODEC.format("a", label[:3]) == "a-[1, 0, 1].png"
    assert LUAD_CODEC.format("a", label, suffix=".jpg").endswith(".jpg")


MALFORMED = [
    # (codec, num_classes, file name, why)
    (LUAD_CODEC, 4, "1031280-2300-27920.png", "no bracket"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1 0 0 1.png", "unclosed bracket"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1,0,0,1].png", "wrong separator"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1001].png", "no separator"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1 0 1].png", "too short"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1 0 2 1].png", "non-binary digit"),
    (LUAD_CODEC, 4, "1031280-2300-27920-[1 0 0 1]-copy.png", "label not at the end"),
    (BCSS_CODEC, 4, "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0.png", "no bracket"),
    (BCSS_CODEC, 4, "TCGA-A1-A0SK-DX1_MPP-0.2500+0[1 1 0 1].png", "wrong separator"),
    (BCSS_CODEC, 4, "TCGA-A1-A0SK-DX1_MPP-0.2500+0[11011].png", "too long"),
    (BCSS_CODEC, 4, "TCGA-A1-A0SK-DX1_MPP-0.2500+0[11x1].png", "non-binary digit"),
    (WSSS4LUAD_CODEC, 3, "1003370-11223-11698.png", "no bracket"),
    (WSSS4LUAD_CODEC, 3, "1003370-11223-11698-[1 1 0].png", "wrong separator"),
    (WSSS4LUAD_CODEC, 3, "1003370-11223-11698-[1,1,0].png", "comma without space"),
    (WSSS4LUAD_CODEC, 3, "1003370-11223-11698-[1, 1, 0, 0].png", "too long"),
    (WSSS4LUAD_CODEC, 3, "1003370-11223-11698-[1, 3, 0].png", "non-binary digit"),
]


@pytest.mark.parametrize(
    ("codec", "num_classes", "name", "why"), MALFORMED, ids=[m[3] for m in MALFORMED]
)
def test_malformed_name_is_a_label_error_naming_the_file(
    codec: LabelCodec, num_classes: int, name: str, why: str
) -> None:
    with pytest.raises(LabelError) as info:
        codec.parse(Path("/data/train") / name, num_classes)
    assert name in str(info.value)


def test_label_error_is_a_user_error() -> None:
    assert issubclass(LabelError, HisynsegError)
    assert issubclass(LabelError, ValueError)


def test_wrong_length_message_names_both_lengths() -> None:
    with pytest.raises(LabelError, match=r"3 entries.*4 classes"):
        LUAD_CODEC.parse("x-[1 0 1].png", 4)


def test_label_to_str() -> None:
    assert label_to_str(np.array([1, 0, 1], dtype=np.uint8)) == "101"
    assert label_to_str([0, 0]) == "00"


CLASSES = ("tumour", "stroma", "lymphocytes")


def test_label_csv_round_trip(tmp_path: Path) -> None:
    labels = {
        f"img-{i}.png": np.array(bits, dtype=np.uint8)
        for i, bits in enumerate(itertools.product((0, 1), repeat=3))
    }
    path = tmp_path / "train.csv"
    write_label_csv(path, labels, CLASSES)
    assert path.read_text().splitlines()[0] == "image,tumour,stroma,lymphocytes"
    back = read_label_csv(path, CLASSES)
    assert set(back) == set(labels)
    for name, label in labels.items():
        assert back[name].tolist() == label.tolist()
    assert not [p for p in tmp_path.iterdir() if p.name != "train.csv"], "temporary file left"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("image,tumour,stroma\na.png,1,0\n", r"missing column.*lymphocytes"),
        ("image,tumour,stroma,lymphocytes\na.png,1,2,0\n", r"train\.csv:2: class values"),
        (
            "image,tumour,stroma,lymphocytes\na.png,1,0,0\nb.png,1,x,0\n",
            r"train\.csv:3: class values",
        ),
        ("image,tumour,stroma,lymphocytes\na.png,1,0,0\na.png,0,1,0\n", r"train\.csv:3:.*twice"),
    ],
    ids=["missing column", "value 2", "value x", "repeated image"],
)
def test_label_csv_errors_name_file_and_row(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(LabelError, match=pattern):
        read_label_csv(path, CLASSES)


def test_missing_label_csv_is_a_label_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    with pytest.raises(LabelError, match="not found") as info:
        read_label_csv(path, CLASSES)
    assert str(path) in str(info.value)


def test_label_csv_saved_by_excel_with_a_byte_order_mark(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts the file with a BOM, which must not become part of the
    # first column's name.
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffimage,tumour,stroma,lymphocytes\nä.png,1,0,1\n".encode())
    assert read_label_csv(path, CLASSES)["ä.png"].tolist() == [1, 0, 1]


def test_label_csv_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("image,tumour,stroma,lymphocytes\nä.png,1,0,1\n".encode("utf-16"))
    with pytest.raises(LabelError, match="cannot be read") as info:
        read_label_csv(path, CLASSES)
    assert str(path) in str(info.value)


def test_a_bad_training_file_name_is_reported_with_its_folder(tmp_path: Path) -> None:
    """As validate-data does: "scan 01.png" alone does not say which dataset it is in."""
    from hisynseg.datasets.layouts import list_train
    from hisynseg.datasets.spec import get_dataset_spec

    spec = get_dataset_spec("luad-histoseg")
    train = tmp_path / "bad" / spec.layout.train
    train.mkdir(parents=True)
    for name in ("1-2-3-[1 0 0 1].png", "scan 01.png"):
        (train / name).write_bytes(b"")  # listing reads names only
    with pytest.raises(LabelError) as info:
        list_train(tmp_path / "bad", spec)
    message = str(info.value)
    assert message.startswith(f"{train / 'scan 01.png'}: file name does not end with a luad label")
