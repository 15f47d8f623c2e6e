"""The ``hisynseg`` command: help, version, ``python -m hisynseg``, ``toy-data``, argument
parsing, signals and their exit statuses."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hisynseg import __version__
from hisynseg.cli import COMMANDS, RESUMABLE, main
from hisynseg.datasets.layouts import list_split, list_train, single_label_pool
from hisynseg.datasets.spec import resolve_dataset_spec
from hisynseg.datasets.validate import validate_dataset

# Heavy libraries the CLI must not load just to parse arguments.
HEAVY = ("torch", "lightning", "segmentation_models_pytorch", "timm", "albumentations")


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hisynseg" in out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"hisynseg.cli.{COMMANDS[command]}")
    assert callable(module.add_parser) and callable(module.run)
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: hisynseg {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hisynseg {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_help_is_fast_and_torch_free() -> None:
    # -X importtime lists every module imported, on stderr: none of them may be heavy.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hisynseg", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: hisynseg" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hisynseg.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, "CLI imports a heavy library"


@pytest.mark.parametrize("dataset", ["luad-histoseg", "bcss-wsss", "wsss4luad", "generic"])
def test_toy_data_command(dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "toy"
    argv = ["toy-data", str(out_dir), "--dataset", dataset, "--patch-size", "32"]
    argv += ["--single-per-class", "2", "--multi", "3", "--val", "1", "--test", "2", "--seed", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    spec = resolve_dataset_spec(dataset, out_dir)
    assert f"wrote a {spec.name} toy dataset to {out_dir}" in out
    samples = list_train(out_dir, spec)
    assert len(samples) == 2 * spec.num_classes + 3
    assert [len(p) for p in single_label_pool(samples, spec.num_classes)] == [2] * spec.num_classes
    assert len(list_split(out_dir, spec, "val")) == 1
    assert len(list_split(out_dir, spec, "test")) == 2
    report = validate_dataset(out_dir, spec, workers=1)
    assert report.ok, report.format()


def test_toy_data_rejects_unknown_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["toy-data", str(tmp_path), "--dataset", "camelyon"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _toy_args(out: Path, *extra: str) -> list[str]:
    return ["toy-data", str(out), "--patch-size", "32", "--val", "1", "--test", "1", *extra]


def test_toy_data_refuses_a_non_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "toy"
    assert main(_toy_args(out_dir, "--multi", "10")) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*"))
    # A second dataset into the same folder would mix with the first one.
    assert main(_toy_args(out_dir, "--multi", "2", "--single-per-class", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{out_dir}: folder is not empty" in err and "--overwrite" in err
    assert sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) == before
    assert main(_toy_args(out_dir, "--dataset", "bcss-wsss")) == 2  # nor another layout


def test_toy_data_overwrite_replaces_a_toy_dataset_and_reports_true_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "toy"
    assert main(_toy_args(out_dir, "--multi", "10")) == 0
    args = _toy_args(out_dir, "--multi", "2", "--single-per-class", "1", "--overwrite")
    assert main([*args, "--dataset", "bcss-wsss"]) == 0
    out = capsys.readouterr().out
    assert "6 training images (4 single-label)" in out
    spec = resolve_dataset_spec("bcss-wsss", out_dir)
    assert len(list_train(out_dir, spec)) == 6
    assert not (out_dir / "train").exists()  # the LUAD-HistoSeg training folder is gone
    report = validate_dataset(out_dir, spec, workers=1)
    assert report.ok, report.format()


def test_toy_data_overwrite_never_deletes_other_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real dataset in the same layout: no toy.json, so not toy-data's to delete.
    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    (real / "train" / "1-2-3-[1 0 0 1].png").write_bytes(b"keep me")
    assert main(_toy_args(real, "--overwrite")) == 2
    assert "not a toy dataset" in capsys.readouterr().err
    assert (real / "train" / "1-2-3-[1 0 0 1].png").read_bytes() == b"keep me"
    # A toy dataset with the user's own files beside it.
    toy = tmp_path / "toy"
    assert main(_toy_args(toy)) == 0
    (toy / "notes.txt").write_text("mine")
    assert main(_toy_args(toy, "--overwrite")) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (toy / "notes.txt").read_text() == "mine" and (toy / "train").is_dir()
    # ... or inside one of its folders.
    (toy / "notes.txt").unlink()
    (toy / "train" / "my_notes.txt").write_text("mine too")
    assert main(_toy_args(toy, "--overwrite")) == 2
    assert "train/my_notes.txt" in capsys.readouterr().err
    assert (toy / "train" / "my_notes.txt").read_text() == "mine too"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--patch-size", "7"], "--patch-size must be a multiple of 32 and at least 32"),
        (["--patch-size", "48"], "--patch-size must be a multiple of 32"),
        (["--single-per-class", "0", "--multi", "0"], "--single-per-class must be at least 1"),
        (["--multi", "-1"], "--multi must be at least 0"),
        (["--val", "0"], "--val must be at least 1"),
        (["--test", "0"], "--test must be at least 1"),
    ],
)
def test_toy_data_refuses_unusable_settings(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "toy"
    assert main([*_toy_args(out_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out_dir.exists()


def test_make_toy_dataset_refuses_a_used_folder_and_bad_arguments(tmp_path: Path) -> None:
    from hisynseg.datasets.toy import ToyDataError, make_toy_dataset

    small = dict(single_per_class=1, multi_train=1, num_val=1, num_test=1, patch_size=32)
    make_toy_dataset(tmp_path / "a", "generic", **small)
    with pytest.raises(ToyDataError, match="not empty"):
        make_toy_dataset(tmp_path / "a", "generic", **small)
    with pytest.raises(ToyDataError, match="at least 32"):
        make_toy_dataset(tmp_path / "b", **{**small, "patch_size": 7})
    with pytest.raises(ToyDataError, match="0 or more"):
        make_toy_dataset(tmp_path / "b", **{**small, "num_val": -1})
    assert not (tmp_path / "b").exists()


PIPELINE_ARGS = ["pipeline", "--config", "recipe.yaml", "--data", "data", "--out", "run"]


def _stopped_by(signum: int, lightning_style: bool, cleaned: list[str]) -> Callable[..., int]:
    """A command's run() that receives ``signum`` mid-work and cleans up."""

    def run(args: object) -> int:
        try:
            os.kill(os.getpid(), signum)  # Ctrl-C, or a scheduler's kill, mid-work
            time.sleep(5)
            return 0
        except KeyboardInterrupt:
            if lightning_style:  # Lightning cleans up, then calls sys.exit(1)
                sys.exit(1)
            raise
        finally:
            cleaned.append("temporary outputs removed")

    return run


@pytest.mark.parametrize(
    ("signum", "status", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
@pytest.mark.parametrize("lightning_style", [False, True])
def test_sigterm_and_ctrl_c_stop_a_command_with_the_shells_status(
    signum: int,
    status: int,
    word: str,
    lightning_style: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cleaned: list[str] = []
    pipeline = importlib.import_module("hisynseg.cli.pipeline")
    monkeypatch.setattr(pipeline, "run", _stopped_by(signum, lightning_style, cleaned))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert main(PIPELINE_ARGS) == status
    assert cleaned == ["temporary outputs removed"]
    assert f"pipeline: {word}; re-run the same command to resume" in capsys.readouterr().err
    # main leaves no handler behind
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_command_that_does_not_resume_promises_no_resume(
    signum: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate = importlib.import_module("hisynseg.cli.evaluate")
    monkeypatch.setattr(evaluate, "run", _stopped_by(signum, False, []))
    assert main(["evaluate", "c.ckpt", "root"]) in (130, 143)
    err = capsys.readouterr().err
    assert "evaluate: " in err and "a re-run starts from the beginning" in err
    assert "resume" not in err
    # toy-data refuses a non-empty folder: its advice says how to start again.
    toy_data = importlib.import_module("hisynseg.cli.toy_data")
    monkeypatch.setattr(toy_data, "run", _stopped_by(signum, False, []))
    assert main(["toy-data", "unused"]) in (130, 143)
    assert "toy-data: " in (err := capsys.readouterr().err) and "--overwrite" in err


def test_resumable_commands_are_commands() -> None:
    assert RESUMABLE <= set(COMMANDS)
    assert {"evaluate", "export", "validate-data"}.isdisjoint(RESUMABLE)


def _parsed(monkeypatch: pytest.MonkeyPatch, module: str, argv: list[str]) -> Any:
    """The arguments ``main(argv)`` hands to ``module``'s run()."""
    seen: list[Any] = []
    monkeypatch.setattr(importlib.import_module(f"hisynseg.cli.{module}"), "run", seen.append)
    assert main(argv) == 0
    return seen[0]


def test_overrides_may_sit_between_options(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["train", "trainer.epochs=1", "--data", "toy", "trainer.seed=3", "--out", "o"]
    args = _parsed(monkeypatch, "train", [*argv, "loss.w3=0"])
    assert args.overrides == ["trainer.epochs=1", "trainer.seed=3", "loss.w3=0"]
    train = importlib.import_module("hisynseg.cli.train")
    cfg = train.build_config(args)
    assert (cfg.trainer.epochs, cfg.trainer.seed, cfg.loss.w3, cfg.data.root) == (1, 3, 0, "toy")

    argv = [*PIPELINE_ARGS, "dataset=wsss4luad", "--ablation", "no-filter"]
    argv += ["--ablation", "no-stage2", "train.trainer.epochs=1"]
    args = _parsed(monkeypatch, "pipeline", argv)
    assert args.overrides == ["dataset=wsss4luad", "train.trainer.epochs=1"]
    assert args.ablation == ["no-filter", "no-stage2"]


def test_other_leftover_words_are_usage_errors_naming_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "a.b=1", "--data", "toy", "stray", "--bogus", "c.d=2"])
    assert info.value.code == 2
    assert "hisynseg train: error: unrecognized arguments: stray --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["toy-data", "out", "--seed", "1", "a.b=1"])  # toy-data takes no overrides
    assert info.value.code == 2
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err


def test_a_folder_as_config_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pipeline", "--config", str(tmp_path), "--data", "data", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"hisynseg pipeline: error: {tmp_path}: is a folder, not a configuration file"
    )


def test_a_command_that_exits_is_not_taken_for_terminated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    toy_data = importlib.import_module("hisynseg.cli.toy_data")
    monkeypatch.setattr(toy_data, "run", lambda args: sys.exit(3))
    with pytest.raises(SystemExit) as info:
        main(["toy-data", "unused"])
    assert info.value.code == 3
