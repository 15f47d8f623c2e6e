"""The ``hisynseg`` command: help, version, ``python -m hisynseg``, and ``toy-data``."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hisynseg import __version__
from hisynseg.cli import COMMANDS, main
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


@pytest.mark.parametrize("lightning_style", [False, True])
def test_sigterm_stops_a_command_like_ctrl_c(
    lightning_style: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cleaned: list[str] = []

    def run(args: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's kill, mid-work
            time.sleep(5)
            return 0
        except KeyboardInterrupt:
            if lightning_style:  # Lightning cleans up, then calls sys.exit(1)
                sys.exit(1)
            raise
        finally:
            cleaned.append("temporary outputs removed")

    toy_data = importlib.import_module("hisynseg.cli.toy_data")
    monkeypatch.setattr(toy_data, "run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["toy-data", "unused"]) == 143
    assert cleaned == ["temporary outputs removed"]
    assert "toy-data: terminated; re-run the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # main leaves no handler behind


def test_a_command_that_exits_is_not_taken_for_terminated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    toy_data = importlib.import_module("hisynseg.cli.toy_data")
    monkeypatch.setattr(toy_data, "run", lambda args: sys.exit(3))
    with pytest.raises(SystemExit) as info:
        main(["toy-data", "unused"])
    assert info.value.code == 3
