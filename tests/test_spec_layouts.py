"""Dataset specs (classes, palettes, folders) and listing each layout's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from hisynseg.datasets.io import list_images, write_mask_png, write_rgb_png
from hisynseg.datasets.labels import LabelError
from hisynseg.datasets.layouts import (
    DatasetLayoutError,
    list_split,
    list_synthetic,
    list_train,
    single_label_pool,
)
from hisynseg.datasets.spec import (
    DATASET_NAMES,
    SpecError,
    get_dataset_spec,
    load_generic_spec,
    resolve_dataset_spec,
)
from hisynseg.datasets.toy import GENERIC_TOY_CLASSES
from hisynseg.errors import HisynsegError


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("name", "short", "background", "train", "val", "test"),
    [
        (
            "luad-histoseg",
            ("TE", "NEC", "LYM", "TAS"),
            4,
            "train",
            ("val/img", "val/mask"),
            ("test/img", "test/mask"),
        ),
        (
            "bcss-wsss",
            ("TUM", "STR", "LYM", "NEC"),
            4,
            "training",
            ("val/img", "val/mask"),
            ("test/img", "test/mask"),
        ),
        (
            "wsss4luad",
            ("TUM", "STR", "NOM"),
            3,
            "1.training",
            ("2.validation/img", "2.validation/mask"),
            ("3.testing/img", "3.testing/mask"),
        ),
    ],
)
def test_benchmark_specs_match_the_published_datasets(
    name: str,
    short: tuple[str, ...],
    background: int,
    train: str,
    val: tuple[str, str],
    test: tuple[str, str],
) -> None:
    spec = get_dataset_spec(name)
    assert spec.short_names == short
    assert spec.num_classes == len(short) == len(spec.class_names)
    assert spec.background_index == background
    assert len(spec.palette) == spec.num_classes + 1
    assert spec.palette[spec.background_index] == (255, 255, 255)
    assert len(set(spec.palette)) == len(spec.palette), "palette colours must be distinct"
    assert spec.palette_array.shape == (spec.num_classes + 1, 3)
    assert (spec.layout.train, spec.layout.val, spec.layout.test) == (train, val, test)
    assert spec.layout.split_dirs("val") == val
    assert spec.layout.split_dirs("test") == test


def test_published_palettes() -> None:
    assert get_dataset_spec("luad-histoseg").palette[:4] == (
        (205, 51, 51),
        (0, 255, 0),
        (65, 105, 225),
        (255, 165, 0),
    )
    assert get_dataset_spec("bcss-wsss").palette[3] == (153, 0, 255)
    assert get_dataset_spec("wsss4luad").palette[:3] == ((0, 64, 128), (64, 128, 0), (243, 152, 0))
    assert get_dataset_spec("wsss4luad").background_in_train
    assert get_dataset_spec("wsss4luad").patch_size is None


def test_names_and_aliases() -> None:
    assert DATASET_NAMES == ("luad-histoseg", "bcss-wsss", "wsss4luad", "generic")
    assert get_dataset_spec("LUAD").name == "luad-histoseg"
    assert get_dataset_spec("bcss_wsss").name == "bcss-wsss"
    with pytest.raises(KeyError, match="luad-histoseg"):
        get_dataset_spec("camelyon")
    with pytest.raises(ValueError, match="unknown split"):
        get_dataset_spec("luad").layout.split_dirs("train")


def test_parse_label_and_format_name_use_the_codec() -> None:
    spec = get_dataset_spec("wsss4luad")
    name = spec.format_name("1003370-11223-11698", np.array([1, 1, 0]))
    assert name == "1003370-11223-11698-[1, 1, 0].png"
    assert spec.parse_label(name).tolist() == [1, 1, 0]
    with pytest.raises(LabelError, match=r"\[1 0 0 1\]"):
        spec.parse_label("1031280-2300-27920-[1 0 0 1].png")  # a LUAD name: 4 classes, spaces


def test_labels_from_mask_ignores_background() -> None:
    spec = get_dataset_spec("wsss4luad")
    mask = np.array([[0, 3], [3, 2]], dtype=np.uint8)
    assert spec.labels_from_mask(mask).tolist() == [1, 0, 1]
    assert spec.labels_from_mask(np.full((2, 2), 3, np.uint8)).tolist() == [0, 0, 0]


def test_generic_spec_from_classes_yaml(tmp_path: Path) -> None:
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump(GENERIC_TOY_CLASSES))
    spec = resolve_dataset_spec("generic", tmp_path)
    assert spec.class_names == tuple(GENERIC_TOY_CLASSES["classes"])
    assert spec.background_index == 3
    assert spec.codec is None and spec.labels_csv == "train.csv"
    assert spec.format_name("a", [1, 0, 0]) == "a.png"
    with pytest.raises(LabelError, match="train.csv"):
        spec.parse_label("a-[1 0 0].png")
    # to_dict is the classes.yaml format: writing it back gives the same spec.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "classes.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    again = load_generic_spec(tmp_path / "again")
    assert (again.class_names, again.palette, again.patch_size) == (
        spec.class_names,
        spec.palette,
        spec.patch_size,
    )


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"classes": ["a", "b"]}, "'classes' and 'palette'"),
        ({"classes": ["a"], "palette": [[0, 0, 0], [1, 1, 1]]}, "at least two"),
        ({"classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 1]]}, "3 RGB triples"),
        (
            {
                "classes": ["a", "b"],
                "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]],
                "background_index": 0,
            },
            "background_index",
        ),
        # A string is not a list of names (it used to become the classes a, b, c).
        ({"classes": "abc", "palette": [[0, 0, 0]] * 4}, "'classes' must be a list"),
        ({"classes": ["a", "b"], "palette": [1, 2, 3]}, "palette entry 0"),
        (
            {"classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 300], [2, 2, 2]]},
            r"palette entry 1 must be 3 whole numbers in 0\.\.255",
        ),
        (
            {"classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1], [2, 2, 2]]},
            "palette entry 1",
        ),
        (
            {"classes": ["a", "b"], "palette": [[0, 0, 0], [1.5, 1, 1], [2, 2, 2]]},
            "palette entry 1",
        ),
        (
            {"classes": ["a", "b"], "palette": [[9, 9, 9], [1, 1, 1], [9, 9, 9]]},
            r"palette entries 0 and 2 are both \[9, 9, 9\]",
        ),
        (
            {
                "classes": ["a", "b"],
                "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]],
                "patch_size": "x",
            },
            "'patch_size' must be a whole number",
        ),
        (
            {
                "classes": ["a", "b"],
                "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]],
                "short_names": "ab",
            },
            "'short_names' must be a list",
        ),
    ],
)
def test_bad_classes_yaml_names_the_file(tmp_path: Path, data: dict, pattern: str) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=pattern) as info:
        load_generic_spec(path)
    assert str(path) in str(info.value)
    # A user error (one line from the CLI), and still a ValueError for older callers.
    assert isinstance(info.value, HisynsegError) and isinstance(info.value, ValueError)


def test_malformed_classes_yaml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text("classes: [a, b\npalette: [[0, 0, 0]]\n")
    with pytest.raises(SpecError, match="not valid YAML") as info:
        load_generic_spec(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "line" in message


def test_generic_needs_a_root_and_a_classes_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="classes.yaml"):
        resolve_dataset_spec("generic")
    with pytest.raises(SpecError, match="not found") as info:
        resolve_dataset_spec("generic", tmp_path)
    assert str(tmp_path / "classes.yaml") in str(info.value)


# -------------------------------------------------------------------------- layouts
def test_toy_dataset_is_written_in_the_real_layout(any_toy) -> None:
    spec = any_toy.spec
    root = any_toy.root
    for rel in (spec.layout.train, *spec.layout.val, *spec.layout.test):
        assert (root / rel).is_dir(), rel
    if spec.codec is None:
        assert (root / "train.csv").is_file() and (root / "classes.yaml").is_file()


def test_list_train_reads_every_label(any_toy) -> None:
    spec = any_toy.spec
    samples = list_train(any_toy.root, spec)
    assert len(samples) == any_toy.num_train
    for s in samples:
        assert s.label.shape == (spec.num_classes,)
        assert s.label.sum() >= 1
    pool = single_label_pool(samples, spec.num_classes)
    assert [len(p) for p in pool] == [2] * spec.num_classes
    for c, members in enumerate(pool):
        assert all(m.is_single_label and m.single_class == c for m in members)
    assert (
        sum(not s.is_single_label for s in samples) == any_toy.num_train - any_toy.num_single_label
    )


def test_list_split_pairs_images_and_masks(any_toy) -> None:
    for split in ("val", "test"):
        pairs = list_split(any_toy.root, any_toy.spec, split)
        assert len(pairs) == 2
        for pair in pairs:
            assert pair.image.stem == pair.mask.stem
            assert pair.image.parent != pair.mask.parent


@pytest.mark.parametrize(
    ("dataset", "real_name", "label"),
    [
        ("luad-histoseg", "1031280-2300-27920-[1 0 0 1].png", [1, 0, 0, 1]),
        ("bcss-wsss", "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),
        ("wsss4luad", "1003370-11223-11698-[1, 1, 0].png", [1, 1, 0]),
    ],
)
def test_list_train_reads_real_file_names(
    toy_dataset, dataset: str, real_name: str, label: list[int]
) -> None:
    toy = toy_dataset(dataset)
    train_dir = toy.root / toy.spec.layout.train
    shutil.copy(list_images(train_dir)[0], train_dir / real_name)
    samples = {s.path.name: s for s in list_train(toy.root, toy.spec)}
    assert samples[real_name].label.tolist() == label
    assert len(samples) == toy.num_train + 1


def test_list_train_errors_name_the_file(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    train_dir = toy.root / "train"
    bad = train_dir / "1031280-2300-27920-[1 0 0].png"
    shutil.copy(list_images(train_dir)[0], bad)
    with pytest.raises(LabelError, match=r"1031280-2300-27920-\[1 0 0\]\.png"):
        list_train(toy.root, toy.spec)
    shutil.rmtree(train_dir)
    with pytest.raises(DatasetLayoutError, match="missing training folder"):
        list_train(toy.root, toy.spec)


def test_list_split_errors(toy_dataset) -> None:
    toy = toy_dataset("wsss4luad")
    mask_dir = toy.root / "2.validation" / "mask"
    victim = list_images(mask_dir)[0]
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match=f"{victim.stem}.*no mask"):
        list_split(toy.root, toy.spec, "val")
    shutil.rmtree(toy.root / "3.testing" / "img")
    with pytest.raises(DatasetLayoutError, match=r"3\.testing/img.*missing test image folder"):
        list_split(toy.root, toy.spec, "test")
    with pytest.raises(DatasetLayoutError, match=r"nope: no such dataset folder"):
        list_split(toy.root / "nope", toy.spec, "test")


@pytest.mark.parametrize("side", ["img", "mask"])
def test_list_split_refuses_two_files_with_one_stem(toy_dataset, side: str) -> None:
    toy = toy_dataset("luad-histoseg")
    folder = toy.root / "val" / side
    first = list_images(folder)[0]
    twin = first.with_suffix(".tif")
    shutil.copy(first, twin)
    with pytest.raises(DatasetLayoutError, match="share the stem") as info:
        list_split(toy.root, toy.spec, "val")
    assert str(first) in str(info.value) and str(twin) in str(info.value)


def test_missing_train_csv_is_a_label_error_naming_it(toy_dataset) -> None:
    toy = toy_dataset("generic")
    (toy.root / "train.csv").unlink()
    with pytest.raises(LabelError, match="not found") as info:
        list_train(toy.root, toy.spec)
    assert str(toy.root / "train.csv") in str(info.value)


def test_generic_train_needs_a_label_for_every_image(toy_dataset) -> None:
    toy = toy_dataset("generic")
    shutil.copy(list_images(toy.root / "train")[0], toy.root / "train" / "extra.png")
    with pytest.raises(LabelError, match="extra.png"):
        list_train(toy.root, toy.spec)


def test_list_synthetic(toy_dataset, tmp_path: Path) -> None:
    toy = toy_dataset("bcss-wsss")
    spec = toy.spec
    syn = tmp_path / "synthetic"
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 2
    name = spec.format_name("000001", spec.labels_from_mask(mask))
    write_rgb_png(syn / "img" / name, np.zeros((32, 32, 3), np.uint8))
    write_mask_png(syn / "mask" / name, mask, spec.palette)
    [(sample, mask_path)] = list_synthetic(syn, spec)
    assert sample.label.tolist() == [1, 0, 1, 0]
    assert mask_path == syn / "mask" / name
    (syn / "mask" / name).unlink()
    with pytest.raises(DatasetLayoutError, match="no mask"):
        list_synthetic(syn, spec)
