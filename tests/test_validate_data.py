"""``validate_dataset`` and ``hisynseg validate-data``: clean data passes, every fault is listed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hisynseg.cli import main
from hisynseg.datasets.io import list_images, read_mask, write_mask_png, write_rgb_png
from hisynseg.datasets.labels import write_label_csv
from hisynseg.datasets.layouts import list_train
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.datasets.toy import ToyDataset
from hisynseg.datasets.validate import PROBLEM_KINDS, ValidationReport, validate_dataset


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main(["validate-data", *(str(a) for a in argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_synthetic(folder: Path, spec: DatasetSpec, *, wrong: bool) -> Path:
    """Two synthesized images; the second's name label disagrees with its mask if ``wrong``."""
    names = []
    labels: dict[str, np.ndarray] = {}
    for i in range(2):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, 16:] = 1
        mask[:4, :4] = spec.background_index
        label = spec.labels_from_mask(mask)
        if wrong and i == 1:
            label = np.roll(label, 1)  # names classes 1 and 2, the mask holds 0 and 1
        name = spec.format_name(f"{i:06d}", label)
        write_rgb_png(folder / "img" / name, np.full((32, 32, 3), 128, np.uint8))
        write_mask_png(folder / "mask" / Path(name).with_suffix(".png"), mask, spec.palette)
        labels[name] = label
        names.append(name)
    if spec.codec is None:
        write_label_csv(folder / "labels.csv", labels, spec.class_names)
    return folder / "img" / names[1]


def problem_paths(report: ValidationReport, kind: str) -> set[Path]:
    return {p.path for p in report.problems_of(kind)}


# ------------------------------------------------------------------------ clean data
def test_clean_toy_dataset_passes(
    any_layout: str, any_toy: ToyDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(capsys, any_toy.root, "--dataset", any_layout)
    assert code == 0, out
    assert "OK: no problems found" in out
    for short in any_toy.spec.short_names:
        assert short in out


def test_report_counts_match_the_toy_dataset(any_toy: ToyDataset) -> None:
    spec = any_toy.spec
    report = validate_dataset(any_toy.root, spec, workers=2)
    assert report.ok, report.format()
    assert list(report.splits) == ["train", "val", "test"]
    train = report.splits["train"]
    assert train.num_images == train.num_readable == any_toy.num_train
    assert train.single_label == [2] * spec.num_classes
    labels = np.stack([s.label for s in list_train(any_toy.root, spec)])
    assert train.class_images == labels.sum(axis=0).tolist()
    assert train.min_size is not None and train.max_size is not None
    for split in ("val", "test"):
        summary = report.splits[split]
        assert summary.num_images == summary.num_masks == 2
        values = set()
        for mask_path in list_images(any_toy.root / spec.layout.split_dirs(split)[1]):
            values |= set(np.unique(read_mask(mask_path)).tolist())
        assert summary.mask_values == sorted(values)
        assert summary.min_size == summary.max_size
    as_json = json.loads(json.dumps(report.to_dict()))
    assert (
        as_json["ok"] is True and as_json["splits"]["train"]["single_label"] == train.single_label
    )


def test_printed_counts(toy_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    toy = toy_dataset("luad-histoseg", single_per_class=3, multi_train=0, num_val=1, num_test=1)
    code, out = run_cli(capsys, toy.root, "--dataset", "luad-histoseg")
    assert code == 0, out
    assert "train: 12 images (published: 16,678)" in out
    assert "sizes (HxW): min 32x32, max 32x32" in out
    lines = [line.split() for line in out.splitlines()]
    # class rows: "TE tumor epithelium 3 3" (images carrying it, single-label images)
    te = next(words for words in lines if words[:1] == ["TE"] and words[-2:] == ["3", "3"])
    assert te
    assert "mask values: {" in out


# -------------------------------------------------------------------- all faults at once
def test_every_fault_is_reported_in_one_run(
    any_layout: str, toy_dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = toy_dataset(any_layout, num_val=4, num_test=2)
    spec, root = toy.spec, toy.root
    train_dir = root / spec.layout.train
    val_img, val_mask = (root / d for d in spec.layout.val)
    test_img, test_mask = (root / d for d in spec.layout.test)
    samples = list_train(root, spec)
    multi = [s.path for s in samples if not s.is_single_label]
    expected: dict[str, set[Path]] = {}

    # 1. truncated images and masks, in every split
    truncate(multi[0])
    truncate(list_images(val_img)[3])
    truncate(list_images(test_mask)[0])
    # a PNG cut just before its end chunk: PIL decodes every pixel, the file is still cut
    cut_end = list_images(test_img)[1]
    cut_end.write_bytes(cut_end.read_bytes()[:-12])
    expected["unreadable"] = {
        multi[0],
        list_images(val_img)[3],
        list_images(test_mask)[0],
        cut_end,
    }

    # 2. a mask of the wrong size
    wrong_size = list_images(val_mask)[0]
    write_mask_png(wrong_size, np.zeros((20, 24), np.uint8), spec.palette)
    expected["size-mismatch"] = {wrong_size}

    # 3. value 7 in a mask
    bad_value = list_images(val_mask)[1]
    mask = read_mask(bad_value)
    mask[0, :3] = 7
    write_mask_png(bad_value, mask, spec.palette)
    expected["mask-value"] = {bad_value}

    # 4. an image without a mask
    no_mask = list_images(val_img)[2]
    (val_mask / no_mask.name).unlink()
    expected["missing-mask"] = {no_mask}

    # 5. a training file renamed with a malformed label
    csv_path = root / "train.csv"
    if spec.codec is not None:
        renamed = multi[1].with_name(multi[1].name.replace("[", "(").replace("]", ")"))
        multi[1].rename(renamed)
        non_binary = multi[2].with_name(re.sub(r"[01]\]", "2]", multi[2].name))
        multi[2].rename(non_binary)
        expected["bad-label"] = {renamed, non_binary}
    else:
        # generic: the label lives in train.csv; give the file's row a non-binary value
        rows = [row.split(",") for row in csv_path.read_text().splitlines()]
        for row in rows:
            if row[0] == multi[1].name:
                row[1] = "2"
        csv_path.write_text("".join(",".join(row) + "\n" for row in rows))
        expected["bad-label"] = {csv_path}

    # 6. no single-label image of class 1 left
    deleted = {s.path.name for s in samples if s.is_single_label and s.single_class == 1}
    for name in deleted:
        (train_dir / name).unlink()
    if spec.codec is None:
        rows = csv_path.read_text().splitlines()
        csv_path.write_text("".join(r + "\n" for r in rows if r.split(",")[0] not in deleted))
    expected["no-single-label"] = {train_dir}

    # 7. a synthesized set whose name label disagrees with its mask
    synthetic = tmp_path / "synthetic-set"
    lying = make_synthetic(synthetic, spec, wrong=True)
    expected["label-mismatch"] = {lying}

    code, out = run_cli(
        capsys,
        root,
        "--dataset",
        any_layout,
        "--synthetic",
        synthetic,
        "--json",
        tmp_path / "r.json",
    )
    assert code == 1, out
    assert "FAILED" in out
    for paths in expected.values():
        for path in paths:
            assert str(path) in out, f"{path} not reported:\n{out}"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False
    found: dict[str, set[Path]] = {}
    for problem in report["problems"]:
        assert problem["kind"] in PROBLEM_KINDS
        assert problem["path"] in problem["message"], problem
        found.setdefault(problem["kind"], set()).add(Path(problem["path"]))
    for kind, paths in expected.items():
        assert paths <= found.get(kind, set()), (kind, found)
    # nothing but the injected faults
    assert set(found) == set(expected), found
    assert report["splits"]["train"]["single_label"][1] == 0


# ------------------------------------------------------------------------ single faults
def test_missing_folders_are_each_reported(any_layout: str, toy_dataset, capsys) -> None:
    toy = toy_dataset(any_layout)
    spec = toy.spec
    shutil.rmtree(toy.root / spec.layout.train)
    shutil.rmtree(toy.root / spec.layout.val[1])
    shutil.rmtree(toy.root / spec.layout.test[0])
    report = validate_dataset(toy.root, spec, workers=1)
    assert problem_paths(report, "missing-folder") == {
        toy.root / spec.layout.train,
        toy.root / spec.layout.val[1],
        toy.root / spec.layout.test[0],
    }
    # the val images are still decoded without their masks, and are not each flagged
    assert report.splits["val"].num_readable == 2
    assert not report.problems_of("missing-mask")
    code, out = run_cli(capsys, toy.root, "--dataset", any_layout)
    assert code == 1 and str(toy.root / spec.layout.val[1]) in out


def test_missing_root(tmp_path: Path, capsys) -> None:
    code, out = run_cli(capsys, tmp_path / "nowhere", "--dataset", "luad-histoseg")
    assert code == 1
    assert f"{tmp_path / 'nowhere'}: dataset root folder does not exist" in out


def test_mask_without_image(toy_dataset) -> None:
    toy = toy_dataset("bcss-wsss")
    image = list_images(toy.root / "test" / "img")[0]
    image.unlink()
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "missing-image") == {toy.root / "test" / "mask" / image.name}


def test_background_index_is_valid_but_one_past_it_is_not(toy_dataset) -> None:
    toy = toy_dataset("wsss4luad")  # background is 3; 4 is not a value of this dataset
    mask_path = list_images(toy.root / "2.validation" / "mask")[0]
    mask = read_mask(mask_path)
    mask[:2, :2] = 3
    write_mask_png(mask_path, mask, toy.spec.palette)
    assert validate_dataset(toy.root, toy.spec).ok
    mask[:2, :2] = 4
    write_mask_png(mask_path, mask, toy.spec.palette)
    [problem] = validate_dataset(toy.root, toy.spec).problems
    assert problem.kind == "mask-value" and "[4]" in problem.message


def test_rgb_masks_are_read_through_the_palette(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    palette = np.asarray(toy.spec.palette, np.uint8)
    mask_paths = list_images(toy.root / "val" / "mask")
    for path in mask_paths:
        Image.fromarray(palette[read_mask(path)], "RGB").save(path)
    assert validate_dataset(toy.root, toy.spec).ok
    rgb = palette[read_mask(mask_paths[0], toy.spec.palette)]
    rgb[0, 0] = (9, 9, 9)
    Image.fromarray(rgb, "RGB").save(mask_paths[0])
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "mask-value") == {mask_paths[0]}


def test_synthetic_set_alone(any_layout: str, toy_dataset, tmp_path: Path, capsys) -> None:
    toy = toy_dataset(any_layout)
    good = tmp_path / "good"
    make_synthetic(good, toy.spec, wrong=False)
    code, out = run_cli(capsys, toy.root, "--dataset", any_layout, "--splits", "--synthetic", good)
    assert code == 0, out
    assert "synthetic:good: 2 images, 2 masks" in out
    assert "train:" not in out
    bad = tmp_path / "bad"
    lying = make_synthetic(bad, toy.spec, wrong=True)
    code, out = run_cli(capsys, toy.root, "--dataset", any_layout, "--splits", "--synthetic", bad)
    assert code == 1
    assert f"{lying}: " in out and "label-mismatch" in out


def test_synthetic_set_missing_mask_folder(toy_dataset, tmp_path: Path) -> None:
    toy = toy_dataset("luad-histoseg")
    folder = tmp_path / "syn"
    make_synthetic(folder, toy.spec, wrong=False)
    shutil.rmtree(folder / "mask")
    report = validate_dataset(toy.root, toy.spec, splits=(), synthetic=[folder])
    assert problem_paths(report, "missing-folder") == {folder / "mask"}


def test_generic_csv_faults_are_all_listed(toy_dataset) -> None:
    toy = toy_dataset("generic")
    csv_path = toy.root / "train.csv"
    images = list_images(toy.root / "train")
    lines = csv_path.read_text().splitlines()
    # row 2: bad value; row 3: dropped (its image has no label); extra row: no such image
    first = lines[1].split(",")
    lines[1] = ",".join([first[0], "x", *first[2:]])
    dropped = lines.pop(2).split(",")[0]
    lines.append("ghost.png,1,0,0")
    csv_path.write_text("\n".join(lines) + "\n")
    report = validate_dataset(toy.root, toy.spec)
    messages = [p.message for p in report.problems]
    assert any(f"{csv_path}:2: {first[0]}" in m for m in messages), messages
    assert toy.root / "train" / dropped in problem_paths(report, "bad-label")
    assert any("ghost.png" in m for m in messages)
    assert len(images) == report.splits["train"].num_images


def test_eval_image_named_with_a_label_must_agree_with_its_mask(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    image = list_images(toy.root / "val" / "img")[0]
    mask = toy.root / "val" / "mask" / image.name
    present = toy.spec.labels_from_mask(read_mask(mask))
    wrong = 1 - present
    new_name = toy.spec.format_name(image.stem, wrong)
    image.rename(image.with_name(new_name))
    mask.rename(mask.with_name(new_name))
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "label-mismatch") == {image.with_name(new_name)}


def test_truncation_caught_even_when_pil_is_told_to_accept_it(toy_dataset, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    toy = toy_dataset("luad-histoseg")
    victim = list_images(toy.root / "train")[5]
    truncate(victim)
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "unreadable") == {victim}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_quick_mode_reads_headers_and_still_decodes_masks(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    victim = list_images(toy.root / "val" / "mask")[0]
    truncate(victim)
    report = validate_dataset(toy.root, toy.spec, decode_images=False)
    assert problem_paths(report, "unreadable") == {victim}
    assert report.splits["train"].num_readable == toy.num_train


def test_single_split_and_unknown_split(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    report = validate_dataset(toy.root, toy.spec, splits=("val",))
    assert list(report.splits) == ["val"]
    with pytest.raises(ValueError, match="unknown split"):
        validate_dataset(toy.root, toy.spec, splits=("training",))


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    code, out = run_cli(capsys, tmp_path, "--dataset", "camelyon")
    assert code == 2 and "unknown dataset 'camelyon'" in out
    code, out = run_cli(capsys, tmp_path, "--dataset", "generic")
    assert code == 2 and "classes.yaml" in out
    code, out = run_cli(capsys, tmp_path, "--dataset", "luad", "--splits")
    assert code == 2 and "nothing to check" in out


def test_non_image_files_are_a_warning(toy_dataset, capsys) -> None:
    toy = toy_dataset("luad-histoseg")
    (toy.root / "train" / "Thumbs.db").write_bytes(b"x")
    code, out = run_cli(capsys, toy.root, "--dataset", "luad-histoseg")
    assert code == 0
    assert "warnings (1)" in out and "Thumbs.db" in out


def test_two_masks_with_one_stem_are_ambiguous(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    mask = list_images(toy.root / "val" / "mask")[0]
    shutil.copy(mask, mask.with_suffix(".tif"))
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "duplicate") == {mask.with_suffix(".tif")}


def test_max_problems_shortens_the_listing_only(toy_dataset, tmp_path: Path, capsys) -> None:
    toy = toy_dataset("luad-histoseg")
    for image in list_images(toy.root / "train")[:5]:
        truncate(image)
    argv = [toy.root, "--dataset", "luad", "--max-problems", "2", "--json", tmp_path / "r.json"]
    code, out = run_cli(capsys, *argv)
    assert code == 1
    assert "problems (5):" in out and "... and 3 more" in out
    assert len(json.loads((tmp_path / "r.json").read_text())["problems"]) == 5


def test_bytes_after_a_complete_png_are_not_truncation(toy_dataset) -> None:
    # Only the file's last 1 KiB used to be searched for IEND, so a complete PNG with
    # more than that appended was called truncated.
    toy = toy_dataset("luad-histoseg")
    image = list_images(toy.root / "train")[0]
    mask = list_images(toy.root / "val" / "mask")[0]
    for path in (image, mask):
        path.write_bytes(path.read_bytes() + bytes(range(256)) * 8)
    report = validate_dataset(toy.root, toy.spec)
    assert report.ok, report.format()


def test_png_cut_inside_its_chunks_is_still_truncated(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    image, cut_end = list_images(toy.root / "train")[:2]
    data = image.read_bytes()
    # Drop the IEND chunk only: every pixel decodes, the file is still incomplete.
    image.write_bytes(data[:-12])
    cut_end.write_bytes(cut_end.read_bytes()[:-3])  # IEND's CRC cut short
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "unreadable") == {image, cut_end}


def test_two_images_with_one_stem_are_ambiguous(toy_dataset) -> None:
    toy = toy_dataset("luad-histoseg")
    image = list_images(toy.root / "val" / "img")[0]
    shutil.copy(image, image.with_suffix(".tif"))
    report = validate_dataset(toy.root, toy.spec)
    assert problem_paths(report, "duplicate") == {image.with_suffix(".tif")}
    assert image.name in report.problems_of("duplicate")[0].message


def test_negative_max_problems_is_a_usage_error(toy_dataset, capsys) -> None:
    toy = toy_dataset("luad-histoseg")
    with pytest.raises(SystemExit) as info:
        main(["validate-data", str(toy.root), "--dataset", "luad", "--max-problems", "-1"])
    assert info.value.code == 2
    assert "--max-problems" in capsys.readouterr().err
    report = validate_dataset(toy.root, toy.spec)
    with pytest.raises(ValueError, match="max_problems"):
        report.format(max_problems=-1)


def test_generic_train_csv_with_a_byte_order_mark(toy_dataset) -> None:
    toy = toy_dataset("generic")
    csv_path = toy.root / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    report = validate_dataset(toy.root, toy.spec)
    assert report.ok, report.format()


def test_malformed_classes_yaml_is_a_one_line_usage_error(toy_dataset, capsys) -> None:
    toy = toy_dataset("generic")
    (toy.root / "classes.yaml").write_text("classes: [a, b\npalette: [[0, 0, 0]]\n")
    code, out = run_cli(capsys, toy.root, "--dataset", "generic")
    assert code == 2
    assert "classes.yaml: not valid YAML" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
