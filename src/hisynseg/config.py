"""Typed training configuration: dataclass sections, YAML load/save and dotted overrides.

A configuration is a :class:`Config` made of sections (``data``, ``model``, ``loss``,
``optim``, ``trainer``, ``eval``) plus the top-level ``stage`` and ``out``. It is read
from YAML with :func:`load_config`, changed with dotted ``key=value`` strings by
:func:`apply_overrides` (``"trainer.epochs=3"``, ``"loss.w3=0"``,
``"data.synthetic=[a,b]"``), checked by :func:`validate_config` and written back with
:func:`save_config`. Every value is coerced to its field's declared type, so a YAML file
and a command line behave the same; an unknown key or a value of the wrong kind is a
:class:`ConfigError` that names the key and lists the valid ones.

The defaults are light enough to run on a CPU (ResNet-18 encoder, no pretrained weights);
the paper's recipe is EfficientNet-b6 with ImageNet weights, batches of 32 + 32 and 25
(LUAD-HistoSeg, BCSS-WSSS) or 60 (WSSS4LUAD) epochs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hisynseg.datasets.io import atomic_write_text
from hisynseg.errors import HisynsegError

__all__ = [
    "ConfigError",
    "coerce_value",
    "coerce_field",
    "dataclass_from_dict",
    "valid_keys",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainerConfig",
    "EvalConfig",
    "Config",
    "SECTIONS",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_yaml_mapping",
    "leaf_differences",
    "save_config",
    "dump_config",
    "apply_overrides",
    "validate_config",
]


def leaf_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two nested mappings
    (a key one side lacks counts as ``None`` there); for messages refusing a changed run."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            found += leaf_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


class ConfigError(HisynsegError, ValueError):
    """A configuration key or value is invalid; the message names it and what is allowed."""


@dataclass
class DataConfig:
    """Where the data is and how it is batched.

    Attributes:
        root: Dataset root (the folder holding the benchmark's train/val/test layout).
        dataset: Registered dataset name, or ``"generic"`` (classes from ``root/classes.yaml``).
        classes: Expected class names, in order; when set, a dataset with other classes is
            refused before training starts.
        synthetic: Folders of synthesized images (each with ``img/`` and ``mask/``).
        real_unlabeled: Stage 1: train the consistency branch on the real training images.
        pseudo_masks: Stage 2: folder with ``img/`` and ``mask/`` of real images and their
            pseudo-masks (same reader as a synthetic set).
        batch_size_synthetic: Synthetic (stage 2: labelled) images per step.
        batch_size_real: Real images per step (stage-1 consistency branch).
        val_batch_size: Validation images per step (1 is used for large, varying images).
        num_workers: Data-loader worker processes per loader.
        patch_size: Training crop side in pixels.
        aug_border: How geometric augmentations fill pixels outside the source:
            ``"constant"`` (white image, background/ignore index in the mask) or
            ``"reflect"`` (mirror image and mask alike).
    """

    root: str | None = None
    dataset: str = "luad-histoseg"
    classes: list[str] | None = None
    synthetic: list[str] = field(default_factory=list)
    real_unlabeled: bool = True
    pseudo_masks: str | None = None
    batch_size_synthetic: int = 32
    batch_size_real: int = 32
    val_batch_size: int = 16
    num_workers: int = 4
    patch_size: int = 224
    aug_border: str = "constant"


@dataclass
class ModelConfig:
    """The segmenter (DeepLabV3+ with a CAM head).

    Attributes:
        encoder: smp encoder name (paper: ``"efficientnet-b6"``).
        encoder_weights: Pretrained weights (paper: ``"imagenet"``), or ``None``.
        dropout: Dropout before the CAM head's 1×1 convolution.
    """

    encoder: str = "resnet18"
    encoder_weights: str | None = None
    dropout: float = 0.5


@dataclass
class LossConfig:
    """Weights of the classification (``w1``), Dice (``w2``) and consistency (``w3``) terms."""

    w1: float = 1.0
    w2: float = 1.0
    w3: float = 1.0


@dataclass
class OptimConfig:
    """AdamW settings (no learning-rate schedule, as in the paper)."""

    lr: float = 1e-4
    weight_decay: float = 0.05


@dataclass
class TrainerConfig:
    """Lightning trainer settings.

    Attributes:
        epochs: Training epochs (paper: 25 for LUAD-HistoSeg/BCSS-WSSS, 60 for WSSS4LUAD).
        devices: Devices per node (``"auto"``, a count, or ``-1`` for all); several use DDP.
        num_nodes: Machines for multi-node DDP.
        accelerator: ``"auto"``, ``"cpu"``, ``"gpu"``, ...
        precision: ``"auto"`` (``16-mixed`` on GPU, ``32-true`` on CPU) or a Lightning value.
        seed: Seeds Python, NumPy, torch, the augmentations and the data-loader workers.
        val_every: Validate every this many epochs.
        limit_train_batches: Lightning's limit (a count, a fraction, or ``None`` for all).
        limit_val_batches: The same for validation.
        channels_last: Use the channels-last memory format (faster convolutions on GPU).
        split_forward: In stage 1, run the synthetic and the real batch through the
            network in two forward passes before one optimizer step on the summed loss,
            as the reference does (default). ``False`` runs one concatenated pass: faster
            on GPUs, but BatchNorm then normalises the two batches together and its
            running statistics follow the mixture, which changes the training.
        sync_batchnorm: Synchronise BatchNorm statistics across DDP processes.
        log_every_n_steps: Logging interval of the training losses.
        progress_bar: Show a progress bar.
        resume: Checkpoint to resume from; ``None`` resumes from the run directory's
            ``checkpoints/last.ckpt`` when there is one.
    """

    epochs: int = 25
    devices: int | str = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"
    seed: int = 0
    val_every: int = 1
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    channels_last: bool = False
    split_forward: bool = True
    sync_batchnorm: bool = False
    log_every_n_steps: int = 50
    progress_bar: bool = True
    resume: str | None = None


@dataclass
class EvalConfig:
    """Validation options.

    Attributes:
        reference_gating: At validation only, zero the logits of classes absent from the
            ground-truth mask before the argmax, as the reference code does (**pitfall**:
            it uses ground truth, so it inflates validation mIoU; off by default and never
            applied at test time).
        val_stride: Sliding-window stride for large validation images (default: the
            patch size, as in the paper's validation).
    """

    reference_gating: bool = False
    val_stride: int | None = None


@dataclass
class Config:
    """A whole training configuration.

    Attributes:
        stage: 1 (synthetic images + consistency on real images) or 2 (real images with
            pseudo-masks + synthetic images).
        out: Run directory (config, checkpoints, logs, metrics).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage: int = 1
    out: str = "runs/train"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type) -> str:
    """The field names of the dataclass ``cls``, comma-separated (for messages)."""
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a YAML value or a command-line string) to the type ``tp``.

    Raises:
        ConfigError: The value cannot be read as ``tp``; the message names ``key``.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if type(None) in options and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        ):
            return None
        # A YAML value that already has one of the allowed types stays as it is (1.0 for
        # ``int | float`` means "all batches" to Lightning, 1 means one batch).
        if type(value) in options and type(value) in (bool, int, float):
            return value
        # Try the narrower types first so that "3" becomes 3 for ``int | str`` and
        # "0.5" becomes 0.5 for ``int | float``.
        order = sorted(
            (t for t in options if t is not type(None)),
            key=lambda t: {bool: 0, int: 1, float: 2, list: 3, str: 4}.get(
                typing.get_origin(t) or t, 5
            ),
        )
        for option in order:
            try:
                return coerce_value(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key}: {value!r} is not a valid list") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if item_type is Any:
            return list(value)
        return [coerce_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def dataclass_from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from nested dictionaries, sections recursively; missing
    keys keep their defaults, values are coerced to their fields' types.

    Args:
        cls: A dataclass (:class:`Config`, a section, a pipeline recipe).
        data: Its mapping, or ``None`` for all defaults.
        prefix: The dotted name of ``data`` in the whole file, for messages.

    Raises:
        ConfigError: Not a mapping, an unknown key (the message lists the valid keys of
            that section), or a value that is not of the key's type.
    """
    where = prefix or "the configuration"
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {valid_keys(cls)}, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            raise ConfigError(f"unknown key {name}; valid keys of {where}: {valid_keys(cls)}")
        kwargs[key] = coerce_field(types_[key], value, name)
    return cls(**kwargs)


def coerce_field(tp: Any, value: Any, name: str) -> Any:
    """A field's value from YAML or the command line: a section (dataclass) is built
    recursively, a ``dict`` field is kept as a free-form mapping, anything else goes
    through :func:`coerce_value`."""
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, name)
    if typing.get_origin(tp) is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return coerce_value(value, tp, name)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested dictionaries (missing keys keep their defaults).

    Raises:
        ConfigError: An unknown section or key, or a value that is not of the key's type.
    """
    return dataclass_from_dict(Config, data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as nested plain dictionaries (YAML/JSON/pickle friendly)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The configuration as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (empty for an empty file).

    Raises:
        ConfigError: Missing or unreadable file (a folder, no permission, not UTF-8 text
            such as an image), invalid YAML, or a top level that is not a mapping; the
            message names the file.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a configuration file") from None
    except PermissionError:
        raise ConfigError(f"{path}: configuration file not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not readable as UTF-8)") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: configuration file cannot be read ({exc.strerror or exc})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration must be a mapping of sections")
    return data or {}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML configuration, then apply dotted ``overrides``.

    Raises:
        ConfigError: Missing or unparsable file, unknown key, or a value of the wrong type;
            the message names the file.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the configuration as YAML, atomically."""
    atomic_write_text(path, dump_config(cfg))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied.

    ``section.key=value`` sets a section's field, ``key=value`` a top-level one (``stage``,
    ``out``). Values are coerced to the field's type: ``3`` for an ``int``, ``true``/``false``
    for a ``bool``, ``null``/``none`` for an optional field, ``[a, b]`` or ``a,b`` for a list.

    Raises:
        ConfigError: A malformed override, an unknown key (the message lists the valid keys
            of that section), or a value that cannot be converted.
    """
    cfg = config_from_dict(config_to_dict(cfg))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.split(".")
        if len(parts) == 1:
            top = _field_types(Config)
            if parts[0] in SECTIONS:
                raise ConfigError(
                    f"override {item!r}: {parts[0]} is a section; set one of its keys: "
                    f"{valid_keys(SECTIONS[parts[0]])}"
                )
            if parts[0] not in top:
                raise ConfigError(f"unknown key {key}; valid keys: {valid_keys(Config)}")
            setattr(cfg, parts[0], coerce_value(value, top[parts[0]], key))
        elif len(parts) == 2:
            section, name = parts
            if section not in SECTIONS:
                raise ConfigError(
                    f"unknown section {section} in {key}; valid sections: {', '.join(SECTIONS)}"
                )
            types_ = _field_types(SECTIONS[section])
            if name not in types_:
                raise ConfigError(
                    f"unknown key {key}; valid keys of {section}: {valid_keys(SECTIONS[section])}"
                )
            setattr(getattr(cfg, section), name, coerce_value(value, types_[name], key))
        else:
            raise ConfigError(f"override {item!r}: keys have the form section.key")
    return cfg


_PRECISIONS = {
    "auto",
    "32",
    "32-true",
    "16",
    "16-mixed",
    "bf16",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
    "64-true",
}


def validate_config(cfg: Config) -> None:
    """Check values that have a type but a limited range.

    Raises:
        ConfigError: The first invalid value, with what is allowed.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.stage in (1, 2), f"stage: must be 1 or 2, got {cfg.stage}")
    d = cfg.data
    need(
        cfg.stage == 2 or d.pseudo_masks is None,
        f"data.pseudo_masks: {d.pseudo_masks} is only read in stage 2; set stage: 2 "
        "(--stage 2) or leave the pseudo-masks out",
    )
    need(d.patch_size >= 32, f"data.patch_size: must be at least 32, got {d.patch_size}")
    need(d.patch_size % 32 == 0, f"data.patch_size: must be a multiple of 32, got {d.patch_size}")
    for name in ("batch_size_synthetic", "batch_size_real", "val_batch_size"):
        need(getattr(d, name) >= 1, f"data.{name}: must be at least 1, got {getattr(d, name)}")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    need(
        d.aug_border in ("constant", "reflect"),
        f"data.aug_border: must be 'constant' or 'reflect', got {d.aug_border!r}",
    )
    for name in ("w1", "w2", "w3"):
        value = getattr(cfg.loss, name)
        need(value >= 0, f"loss.{name}: must be >= 0, got {value}")
    need(cfg.optim.lr > 0, f"optim.lr: must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    need(0 <= cfg.model.dropout < 1, f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    t = cfg.trainer
    need(t.epochs >= 1, f"trainer.epochs: must be at least 1, got {t.epochs}")
    need(t.num_nodes >= 1, f"trainer.num_nodes: must be at least 1, got {t.num_nodes}")
    need(t.val_every >= 1, f"trainer.val_every: must be at least 1, got {t.val_every}")
    need(
        isinstance(t.devices, int) or t.devices == "auto" or t.devices.replace(",", "").isdigit(),
        f"trainer.devices: must be 'auto', a count, or a list like '0,1'; got {t.devices!r}",
    )
    need(
        str(t.precision) in _PRECISIONS,
        f"trainer.precision: must be one of {', '.join(sorted(_PRECISIONS))}; got {t.precision!r}",
    )
    if cfg.eval.val_stride is not None:
        need(cfg.eval.val_stride >= 1, "eval.val_stride: must be at least 1")
