"""The pipeline recipe: one YAML file with every stage's settings (``configs/<dataset>.yaml``).

A recipe nests the training configuration of :mod:`hisynseg.config` under ``train`` and adds
sections for synthesis, the filter, stage 2 and evaluation. Overrides use the same dotted
form at any depth: ``filter.enabled=false``, ``train.trainer.epochs=3``,
``synthesis.mosaic.tile_size=64``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hisynseg.config import (
    Config,
    ConfigError,
    coerce_field,
    dataclass_from_dict,
    read_yaml_mapping,
    valid_keys,
)
from hisynseg.datasets.io import atomic_write_text

__all__ = [
    "SynthesisStageConfig",
    "FilterStageConfig",
    "Stage2Config",
    "EvaluationStageConfig",
    "PipelineConfig",
    "load_pipeline_config",
    "pipeline_config_from_dict",
    "pipeline_config_to_dict",
    "save_pipeline_config",
    "apply_pipeline_overrides",
    "ABLATIONS",
]


@dataclass
class SynthesisStageConfig:
    """Synthesis settings shared by both methods.

    Attributes:
        methods: Strategies to use (``mosaic``, ``bezier``, or one of them for ablations).
        unfiltered: Images per method synthesized without a filter to train the
            discriminator (paper: 10,000).
        num: Images per method used for training, kept by the filter when it is enabled
            (paper: LUAD-HistoSeg and WSSS4LUAD 3,600, BCSS-WSSS 7,200).
        max_draws_factor: A filtered run gives up after ``num × factor`` draws and keeps
            what it made.
        workers: Worker processes (0: all cores).
        compress_level: PNG compression of the written images (0–9).
        mosaic: Overrides of :class:`hisynseg.synthesis.mosaic.MosaicParams`.
        bezier: Overrides of :class:`hisynseg.synthesis.bezier.BezierParams`.
    """

    methods: list[str] = field(default_factory=lambda: ["mosaic", "bezier"])
    unfiltered: int = 10000
    num: int = 3600
    max_draws_factor: float = 20.0
    workers: int = 0
    compress_level: int = 6
    mosaic: dict[str, Any] = field(default_factory=dict)
    bezier: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterStageConfig:
    """The real-vs-synthetic discriminator (METHOD.md §4).

    Attributes:
        enabled: Train a filter per method and keep only images it scores as real; when
            false, ``synthesis.num`` unfiltered images are used (ablation "no filter").
        epochs: Training epochs (best validation accuracy kept).
        lr: Adam learning rate.
        batch_size: Images per step.
        cap: Training images per side after the split (``None``: no cap).
        val_fraction: Held-out share.
        image_size: Input side of the discriminator.
        keep_threshold: Keep an image when p(real) is above this.
    """

    enabled: bool = True
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 256
    cap: int | None = 5000
    val_fraction: float = 0.2
    image_size: int = 224
    keep_threshold: float = 0.5


@dataclass
class Stage2Config:
    """Pseudo-labelling and the second training stage (METHOD.md §6).

    Attributes:
        enabled: Run pseudo-labelling and stage 2 (paper: LUAD-HistoSeg, BCSS-WSSS).
        tta: Test-time augmentation of the pseudo-labelling (``d4`` or ``none``).
        save_entropy: Also write per-pixel entropy maps of the pseudo-masks.
        epochs: Stage-2 epochs (``None``: as stage 1).
    """

    enabled: bool = True
    tta: str | None = "d4"
    save_entropy: bool = False
    epochs: int | None = None


@dataclass
class EvaluationStageConfig:
    """How each trained stage is scored.

    Attributes:
        split: ``test`` (the paper's figures) or ``val``.
        tta: ``d4`` or ``none``.
        window: Sliding-window side for large images (``None``: the patch size).
        stride: Sliding-window stride (``None``: half the window at test).
        scales: Multi-scale factors (``None``: 1–2 in steps of 0.25 for large test images).
        batch_size: Images or windows per forward pass.
        save_masks: Write predicted masks and overlays.
    """

    split: str = "test"
    tta: str | None = "d4"
    window: int | None = None
    stride: int | None = None
    scales: list[float] | None = None
    batch_size: int = 16
    save_masks: bool = True


@dataclass
class PipelineConfig:
    """A whole HisynSeg run, from synthesis to the stage-2 evaluation.

    Attributes:
        dataset: Registered dataset name or ``generic``.
        seed: Seeds synthesis, the filter and training.
        device: ``auto``, ``cpu`` or ``cuda`` for the filter, pseudo-labelling and evaluation
            (training uses ``train.trainer``).
        synthesis: See :class:`SynthesisStageConfig`.
        filter: See :class:`FilterStageConfig`.
        train: The stage-1 training configuration (:class:`hisynseg.config.Config`); the
            pipeline fills in the data root, the synthetic sets and the output folder.
        stage2: See :class:`Stage2Config`.
        evaluation: See :class:`EvaluationStageConfig`.
    """

    dataset: str = "luad-histoseg"
    seed: int = 0
    device: str = "auto"
    synthesis: SynthesisStageConfig = field(default_factory=SynthesisStageConfig)
    filter: FilterStageConfig = field(default_factory=FilterStageConfig)
    train: Config = field(default_factory=Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    evaluation: EvaluationStageConfig = field(default_factory=EvaluationStageConfig)


# The ablations of the paper as override lists (``--ablation NAME``).
ABLATIONS: dict[str, list[str]] = {
    "no-filter": ["filter.enabled=false"],
    "no-consistency": ["train.loss.w3=0", "train.data.real_unlabeled=false"],
    "mosaic-only": ["synthesis.methods=[mosaic]"],
    "bezier-only": ["synthesis.methods=[bezier]"],
    "no-stage2": ["stage2.enabled=false"],
}


def pipeline_config_from_dict(data: dict[str, Any] | None) -> PipelineConfig:
    """Build a recipe from nested dictionaries (missing keys keep their defaults).

    Raises:
        ConfigError: An unknown key (the message lists the valid ones) or a bad value.
    """
    return dataclass_from_dict(PipelineConfig, data)


def pipeline_config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The recipe as nested plain dictionaries."""
    return dataclasses.asdict(cfg)


def apply_pipeline_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied at any depth.

    Raises:
        ConfigError: A malformed override, an unknown key, or a value of the wrong type.
    """
    data = pipeline_config_to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.split(".")
        node: Any = data
        cls: Any = PipelineConfig
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if cls is not None and dataclasses.is_dataclass(cls):
                hints = typing.get_type_hints(cls)
                if part not in hints:
                    where = ".".join(parts[:depth]) or "the recipe"
                    raise ConfigError(
                        f"unknown key {key}; valid keys of {where}: {valid_keys(cls)}"
                    )
                tp = hints[part]
            else:
                tp = None  # inside a free-form mapping (synthesis.mosaic / .bezier)
            if last:
                if tp is None:
                    node[part] = yaml.safe_load(raw) if raw.strip() else None
                elif dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {item!r}: {key} is a section; set one of its keys")
                else:
                    node[part] = coerce_field(tp, raw, key)
            else:
                if tp is not None and not (
                    dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict
                ):
                    raise ConfigError(
                        f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value"
                    )
                node = node.setdefault(part, {})
                cls = tp if tp is not None and dataclasses.is_dataclass(tp) else None
    return pipeline_config_from_dict(data)


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a recipe, then apply dotted overrides.

    Raises:
        ConfigError: Missing or unparsable file, unknown key, or bad value; names the file.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        cfg = pipeline_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_pipeline_overrides(cfg, overrides or [])


def save_pipeline_config(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the resolved recipe as YAML, atomically."""
    atomic_write_text(
        path,
        yaml.safe_dump(pipeline_config_to_dict(cfg), sort_keys=False, default_flow_style=False),
    )
