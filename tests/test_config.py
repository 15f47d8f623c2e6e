"""Typed configuration: YAML round trip, dotted overrides with type coercion, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hisynseg.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from hisynseg.errors import HisynsegError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_matches_dataclass_defaults() -> None:
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg == Config()
    validate_config(cfg)


def test_paper_defaults() -> None:
    cfg = Config()
    assert (cfg.data.batch_size_synthetic, cfg.data.batch_size_real) == (32, 32)
    assert cfg.data.patch_size == 224
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 0.05)
    assert (cfg.loss.w1, cfg.loss.w2, cfg.loss.w3) == (1.0, 1.0, 1.0)
    assert cfg.eval.reference_gating is False
    assert cfg.trainer.precision == "auto"


def test_overrides_coerce_to_field_types() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "trainer.epochs=3",
            "loss.w3=0",
            "optim.lr=3e-4",
            "trainer.channels_last=yes",
            "data.real_unlabeled=false",
            "data.synthetic=[syn/a, syn/b]",
            "data.classes=tumor,stroma",
            "model.encoder_weights=null",
            "trainer.devices=2",
            "trainer.limit_train_batches=0.25",
            "trainer.limit_val_batches=3",
            "stage=2",
            "out=runs/x",
        ],
    )
    assert cfg.trainer.epochs == 3 and isinstance(cfg.trainer.epochs, int)
    assert cfg.loss.w3 == 0.0 and isinstance(cfg.loss.w3, float)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.trainer.channels_last is True
    assert cfg.data.real_unlabeled is False
    assert cfg.data.synthetic == ["syn/a", "syn/b"]
    assert cfg.data.classes == ["tumor", "stroma"]
    assert cfg.model.encoder_weights is None
    assert cfg.trainer.devices == 2 and isinstance(cfg.trainer.devices, int)
    assert cfg.trainer.limit_train_batches == 0.25
    assert cfg.trainer.limit_val_batches == 3 and isinstance(cfg.trainer.limit_val_batches, int)
    assert (cfg.stage, cfg.out) == (2, "runs/x")


def test_overrides_do_not_modify_the_input() -> None:
    base = Config()
    apply_overrides(base, ["trainer.epochs=7", "data.synthetic=a"])
    assert base.trainer.epochs == 25 and base.data.synthetic == []


def test_string_fields_keep_text_and_devices_keep_id_lists() -> None:
    cfg = apply_overrides(Config(), ["trainer.devices=0,1", "model.encoder=efficientnet-b6"])
    assert cfg.trainer.devices == "0,1"
    assert cfg.model.encoder == "efficientnet-b6"


def test_unknown_key_lists_valid_keys_of_its_section() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["trainer.epoch=3"])
    message = str(err.value)
    assert "trainer.epoch" in message
    for key in ("epochs", "devices", "precision", "seed", "val_every"):
        assert key in message
    assert isinstance(err.value, HisynsegError)


def test_unknown_section_and_malformed_overrides() -> None:
    with pytest.raises(ConfigError, match="valid sections"):
        apply_overrides(Config(), ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), ["trainer.epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(Config(), ["loss=1"])


@pytest.mark.parametrize(
    ("override", "wanted"),
    [
        ("trainer.epochs=three", "not an integer"),
        ("trainer.epochs=2.5", "not an integer"),
        ("loss.w1=heavy", "not a number"),
        ("trainer.progress_bar=maybe", "not a boolean"),
        ("trainer.limit_train_batches=all", "trainer.limit_train_batches"),
    ],
)
def test_bad_values_are_refused(override: str, wanted: str) -> None:
    with pytest.raises(ConfigError, match=wanted):
        apply_overrides(Config(), [override])


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), ["data.synthetic=[a,b]", "trainer.limit_val_batches=0.5"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert load_config(path, ["trainer.seed=5"]).trainer.seed == 5

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epochs: 2\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*trainer\.warmup.*epochs"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_unreadable_config_files_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder, an image or an unreadable file given as --config: a ConfigError naming
    the file and the problem, not a traceback."""
    folder = tmp_path / "toy"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"toy: is a folder"):
        load_config(folder)
    slide = tmp_path / "slide.tif"
    slide.write_bytes(b"II*\x00\x08\x00\x00\x00\x80\xff\xfe")
    with pytest.raises(ConfigError, match=r"slide\.tif: not a YAML text file"):
        load_config(slide)

    locked = tmp_path / "locked.yaml"
    locked.write_text("stage: 1\n")

    # Simulated: the tests may run as root, who can read any file.
    for error, wanted in [
        (PermissionError(13, "Permission denied"), r"not readable \(permission denied\)"),
        (OSError(5, "Input/output error"), r"cannot be read \(Input/output error\)"),
    ]:
        monkeypatch.setattr(Path, "read_text", _raising(error))
        with pytest.raises(ConfigError, match=rf"locked\.yaml: configuration file {wanted}"):
            load_config(locked)


def _raising(error: OSError) -> Callable[..., str]:
    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        raise error

    return read_text


def test_yaml_values_are_type_checked() -> None:
    with pytest.raises(ConfigError, match="data.batch_size_real"):
        config_from_dict({"data": {"batch_size_real": "many"}})
    with pytest.raises(ConfigError, match="valid keys"):
        config_from_dict({"stages": 2})
    cfg = config_from_dict({"loss": {"w1": 2}, "trainer": {"limit_val_batches": 1.0}})
    assert cfg.loss.w1 == 2.0 and isinstance(cfg.loss.w1, float)
    # 1.0 (all batches) must not become 1 (one batch) for Lightning.
    assert isinstance(cfg.trainer.limit_val_batches, float)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override",
    ["stage=3", "loss.w2=-1", "data.patch_size=100", "trainer.precision=8", "data.aug_border=wrap"],
)
def test_validation_rejects_out_of_range_values(override: str) -> None:
    with pytest.raises(ConfigError):
        validate_config(apply_overrides(Config(), [override]))


def test_pseudo_masks_outside_stage_2_are_refused_and_pseudo_means_stage_2() -> None:
    from hisynseg.cli import build_parser
    from hisynseg.cli.train import build_config

    with pytest.raises(ConfigError, match="only read in stage 2"):
        validate_config(apply_overrides(Config(), ["data.pseudo_masks=pm"]))
    validate_config(apply_overrides(Config(), ["stage=2", "data.pseudo_masks=pm"]))
    args = build_parser().parse_args(["train", "--data", "d", "--pseudo", "pm", "--out", "o"])
    assert build_config(args).stage == 2
    args = build_parser().parse_args(["train", "--data", "d", "--pseudo", "pm", "--stage", "1"])
    with pytest.raises(ConfigError, match="only read in stage 2"):
        validate_config(build_config(args))


def test_train_config_may_name_the_shipped_defaults(tmp_path: Path, monkeypatch) -> None:
    from hisynseg.cli import build_parser
    from hisynseg.cli.train import build_config

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--config", "default", "--data", "d"])
    assert build_config(args) == apply_overrides(Config(), ["data.root=d"])
