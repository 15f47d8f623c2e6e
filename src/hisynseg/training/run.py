"""One training run: checks, run directory, Lightning trainer, resume, final metrics.

:func:`train` takes a :class:`~hisynseg.config.Config` and writes into ``cfg.out``::

    config.yaml          the resolved configuration (overrides applied, precision resolved)
    versions.json        python, torch, lightning, smp, timm, albumentations, hisynseg, git
    checkpoints/best.ckpt   the epoch with the best validation mIoU
    checkpoints/last.ckpt   the latest epoch (resume point)
    logs/tensorboard/    TensorBoard events
    logs/csv/version_N/metrics.csv   the same scalars as CSV, one folder per session
    metrics.json         best and last validation scores, checkpoint paths, timings

Everything that can be wrong with the inputs (configuration values, dataset layout, class
list against ``data.classes`` or against the checkpoint being resumed, file names without
labels) is checked before the trainer starts.

Resuming: ``trainer.resume`` names a checkpoint; when it is unset and the run directory
already holds ``checkpoints/last.ckpt``, the run continues from it, so re-running an
interrupted command resumes it (use a new ``out`` for a fresh run). A resume must use the
checkpoint's settings, apart from run-control keys (:data:`RESUME_MAY_CHANGE`: more epochs,
other devices, logging, validation frequency, ...); other changes are refused before
training, since Lightning would carry on with the checkpoint's optimizer state.

Several GPUs and machines use DDP: ``trainer.devices`` GPUs per node, ``trainer.num_nodes``
nodes (start the same command on every node with Lightning's ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK`` environment, or under SLURM/torchrun). Batch sizes are per
process. Precision ``"auto"`` is 16-bit mixed precision on GPUs and 32-bit on CPUs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hisynseg.config import Config, ConfigError, config_to_dict, save_config, validate_config
from hisynseg.datasets.io import atomic_write_json
from hisynseg.datasets.spec import DatasetSpec, resolve_dataset_spec

__all__ = [
    "TrainResult",
    "train",
    "resolve_spec",
    "resolve_precision",
    "collect_versions",
    "read_metrics",
    "CHECKPOINT_DIR",
    "RESUME_MAY_CHANGE",
    "changed_settings",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"

_VERSIONED = (
    "torch",
    "torchvision",
    "lightning",
    "segmentation-models-pytorch",
    "timm",
    "albumentations",
    "numpy",
    "hisynseg",
)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    out: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict[str, Any]


def resolve_spec(cfg: Config) -> DatasetSpec:
    """The dataset's spec, refusing one whose classes differ from ``data.classes``.

    Raises:
        ConfigError: Unknown dataset, unreadable generic ``classes.yaml``, or a class list
            that differs from the configured one.
    """
    try:
        spec = resolve_dataset_spec(cfg.data.dataset, cfg.data.root)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"data.dataset: {exc.args[0] if exc.args else exc}") from None
    if cfg.data.classes is not None and list(cfg.data.classes) != list(spec.class_names):
        raise ConfigError(
            f"data.classes: the configuration expects classes {list(cfg.data.classes)}, "
            f"but dataset {spec.name!r} at {cfg.data.root} has {list(spec.class_names)}"
        )
    return spec


def _uses_gpu(accelerator: str) -> bool:
    import torch

    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"`` → ``"16-mixed"`` on a GPU, ``"32-true"`` otherwise; other values unchanged."""
    if precision != "auto":
        return precision
    return "16-mixed" if _uses_gpu(accelerator) else "32-true"


def _git_revision() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            inside = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "--is-inside-work-tree"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return {"revision": None, "note": "no commit yet"} if inside.returncode == 0 else None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def collect_versions() -> dict[str, Any]:
    """Versions of Python, the main libraries and hisynseg (with its git revision)."""
    import torch

    versions: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = (
        torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    )
    versions["gpus"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    versions["git"] = _git_revision()
    return versions


def _resume_path(cfg: Config, out: Path) -> Path | None:
    if cfg.trainer.resume:
        return Path(cfg.trainer.resume)
    last = out / CHECKPOINT_DIR / "last.ckpt"
    return last if last.is_file() else None


# Settings a resumed run may change (see changed_settings for why each one): everything
# else changes what or how the network learns, or which epoch counts as best.
RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    {
        "out",
        "trainer.resume",
        "trainer.epochs",
        "trainer.devices",
        "trainer.num_nodes",
        "trainer.accelerator",
        "trainer.channels_last",
        "trainer.progress_bar",
        "trainer.log_every_n_steps",
        "trainer.val_every",
        "trainer.limit_val_batches",
        "data.num_workers",
        "data.val_batch_size",
        "data.classes",
    }
)

# Path-valued settings, compared as absolute paths ("toy/", "./toy" and "/abs/toy" are one
# folder).
_PATH_KEYS = frozenset({"data.root", "data.synthetic", "data.pseudo_masks"})


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configuration dictionaries as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(key: str, value: Any) -> Any:
    if key not in _PATH_KEYS or value is None:
        return value
    # Runs record absolute paths; a relative one (an older run's) is read from here.
    if isinstance(value, (list, tuple)):
        return [os.path.abspath(str(v)) for v in value]
    return os.path.abspath(str(value))


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a checkpoint's configuration and this run's.

    Keys that only one side has (a checkpoint written by a hisynseg version with other
    settings) are ignored, and so are those of :data:`RESUME_MAY_CHANGE`, which control the
    run, not the training:

    * ``out``, ``trainer.resume``: where the run is written and what it continues from;
    * ``trainer.epochs``: how long it runs (more epochs is what a resume is usually for);
    * ``trainer.devices``, ``trainer.num_nodes``, ``trainer.accelerator``,
      ``trainer.channels_last``, ``data.num_workers``: where and how fast it runs (batch
      sizes are per device, so more devices means a larger global batch: the user's call,
      e.g. after losing a node). Moving between GPU and CPU with precision ``auto`` still
      changes the resolved ``trainer.precision`` (16-mixed vs 32-true), which must match;
    * ``trainer.progress_bar``, ``trainer.log_every_n_steps``: what is shown and logged;
    * ``trainer.val_every``, ``trainer.limit_val_batches``, ``data.val_batch_size``: how
      often, and on how much, validation runs;
    * ``data.classes``: only a check of the data (the checkpoint's classes are checked
      against the data separately).

    Everything else must match: the data and its paths (``data.root``, ``data.synthetic``,
    ``data.pseudo_masks``, compared as absolute paths), patch size, augmentation,
    batch sizes, ``stage``, the network and its initial weights, loss weights, optimizer,
    seed, ``limit_train_batches``, the resolved precision, ``split_forward``,
    ``sync_batchnorm``, and the ``eval`` settings that score the validation choosing
    ``best.ckpt``.

    Args:
        stored: The resolved configuration saved in the checkpoint (nested dictionaries).
        current: This run's resolved configuration, in the same form.

    Returns:
        ``{"section.key": (checkpoint's value, this run's value)}``, sorted by key.
    """
    theirs, ours = _flatten(stored), _flatten(current)
    return {
        key: (theirs[key], ours[key])
        for key in sorted(set(theirs) & set(ours) - RESUME_MAY_CHANGE)
        if _comparable(key, theirs[key]) != _comparable(key, ours[key])
    }


def _check_resume(
    path: Path,
    spec: DatasetSpec,
    model_config: dict[str, Any],
    config: dict[str, Any],
    explicit: bool,
) -> None:
    """Refuse a checkpoint that this run cannot continue as the same training.

    Lightning restores the optimizer (learning rate included), the epoch and the best
    score from the checkpoint and would silently train on with them while ``config.yaml``
    recorded this run's settings; so the checkpoint's settings must equal this run's,
    apart from :data:`RESUME_MAY_CHANGE`.

    Args:
        path: The checkpoint to resume.
        spec: This run's dataset.
        model_config: This run's network description.
        config: This run's resolved configuration (:func:`config_to_dict`).
        explicit: The checkpoint was named (``trainer.resume``), not found in ``out``.

    Raises:
        CheckpointError: Not a Lightning checkpoint, other classes, another network.
        ConfigError: Other settings; the message lists each key, old and new value.
    """
    from hisynseg.models.checkpoint import (
        CheckpointError,
        check_checkpoint_classes,
        checkpoint_meta,
    )

    meta = checkpoint_meta(path)
    if meta["kind"] != "lightning":
        raise CheckpointError(
            f"{path}: can only resume from a Lightning checkpoint (.ckpt written by "
            f"hisynseg train), this is a {meta['kind']}"
        )
    check_checkpoint_classes(meta, spec, path)
    stored = meta["model"] or {}
    common = (set(stored) & set(model_config)) - {"encoder_weights"}
    theirs = {k: stored[k] for k in sorted(common)}
    ours = {k: model_config[k] for k in sorted(common)}
    if theirs != ours:
        raise CheckpointError(
            f"{path}: checkpoint holds a different network {theirs}; this run builds {ours}"
        )
    done = meta.get("epoch")
    wanted = (config.get("trainer") or {}).get("epochs")
    if isinstance(done, int) and isinstance(wanted, int) and done + 1 >= wanted:
        log.warning(
            "%s: already trained %d epoch(s) and trainer.epochs is %d, so there is nothing "
            "to train; raise --epochs to continue",
            path,
            done + 1,
            wanted,
        )
    stored_config = meta.get("config")
    if not isinstance(stored_config, dict):
        return  # a checkpoint without its settings: nothing to compare
    changed = changed_settings(stored_config, config)
    if changed:
        listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changed.items())
        remedy = (
            "to train with these settings start from scratch (leave out trainer.resume / "
            "--resume), or resume with the checkpoint's settings"
            if explicit
            else "to train with these settings use a new --out, or the same settings to resume"
        )
        raise ConfigError(
            f"{path}: cannot resume, this checkpoint was trained with other settings "
            f"({listed}); {remedy}"
        )


def route_lightning_logs_to_root() -> None:
    """Let the application's logging print Lightning's messages, once.

    Lightning gives its ``lightning`` logger a stderr handler of its own at import and
    still passes the records up to the root logger, so under a configured root logger (the
    CLI's) every Lightning line printed twice. With a root handler present, Lightning's own
    stream handlers are removed; without one (a library user who configured nothing) they
    stay, so the messages are still seen.
    """
    # Filters of a logger do not see records of its children: filter where they print.
    for name in _LIGHTNING_LOGGERS:
        emitter = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in emitter.filters):
            emitter.addFilter(_DropAdvertisements())
    logger = logging.getLogger("lightning")
    if not logging.getLogger().handlers:
        return
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)


_LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropAdvertisements(logging.Filter):
    """Drops Lightning's product tips (e.g. the litlogger one at every Trainer start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def train(cfg: Config) -> TrainResult:
    """Train one stage as configured; see the module docstring for the run directory.

    Returns:
        The run directory, the best and last checkpoints and the final metrics.

    Raises:
        ConfigError, CheckpointError, DatasetLayoutError, LabelError, DataError: Bad inputs,
            reported before training starts.
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from hisynseg.training.callbacks import BestCheckpoint, EpochSeeding
    from hisynseg.training.data import HisynSegDataModule
    from hisynseg.training.module import HisynSegModule

    route_lightning_logs_to_root()
    validate_config(cfg)
    spec = resolve_spec(cfg)
    out = Path(cfg.out)
    resume = _resume_path(cfg, out)

    cfg = _resolved(cfg)
    if _uses_gpu(cfg.trainer.accelerator):
        # TF32 matmuls for the float32 parts; mixed precision covers the rest.
        torch.set_float32_matmul_precision("high")

    model_config = {
        "encoder": cfg.model.encoder,
        "num_classes": spec.num_classes,
        "encoder_weights": cfg.model.encoder_weights,
        "dropout": cfg.model.dropout,
    }
    if resume is not None:
        _check_resume(
            resume, spec, model_config, config_to_dict(cfg), explicit=bool(cfg.trainer.resume)
        )
        log.info("resuming from %s", resume)

    # Listing the files parses every label: bad data stops the run here, before training.
    datamodule = HisynSegDataModule(cfg, spec)
    L.seed_everything(cfg.trainer.seed, workers=True)
    module = HisynSegModule(
        model=model_config,
        dataset=spec.to_dict(),
        config=config_to_dict(cfg),
        pretrained=resume is None,
    )

    ckpt_dir = out / CHECKPOINT_DIR
    best_cb = BestCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val/miou",
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last_cb = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    t = cfg.trainer
    trainer = L.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=t.precision,
        sync_batchnorm=t.sync_batchnorm,
        check_val_every_n_epoch=t.val_every,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        callbacks=[EpochSeeding(cfg.trainer.seed), best_cb, last_cb],
        logger=[
            TensorBoardLogger(out, name="logs", version="tensorboard", default_hp_metric=False),
            # One CSV folder per session (logs/csv/version_N): Lightning's CSV logger
            # would otherwise delete the metrics of the sessions before a resume.
            CSVLogger(out / "logs", name="csv"),
        ],
        default_root_dir=out,
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        atomic_write_json(out / "versions.json", collect_versions())

    start = time.perf_counter()
    with warnings.catch_warnings():
        # A resumed run writes into its own checkpoint folder on purpose.
        warnings.filterwarnings(
            "ignore", message=r"Checkpoint directory .* exists and is not empty"
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    elapsed = time.perf_counter() - start

    best = Path(best_cb.best_model_path) if best_cb.best_model_path else None
    last = ckpt_dir / "last.ckpt"
    metrics = {
        "stage": cfg.stage,
        "dataset": spec.name,
        "classes": list(spec.class_names),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_val_miou": module.best_miou,
        "best_val": module.best_scores,
        "last_val": module.last_scores,
        "best_checkpoint": str(best) if best else None,
        "last_checkpoint": str(last) if last.is_file() else None,
        "resumed_from": str(resume) if resume else None,
        "fit_seconds": round(elapsed, 3),
        "final": {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1
        },
    }
    if trainer.is_global_zero:
        atomic_write_json(out / "metrics.json", metrics)
    return TrainResult(out, best, last if last.is_file() else None, metrics)


def _resolved(cfg: Config) -> Config:
    """A copy with ``precision: auto`` replaced by what this machine will use, and the data
    paths made absolute."""
    from hisynseg.config import config_from_dict

    resolved = config_from_dict(config_to_dict(cfg))
    resolved.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    # Absolute data paths: the run's record (config.yaml, the checkpoints) then means the
    # same folders whatever directory a resume is started from.
    d = resolved.data
    if d.root is not None:
        d.root = os.path.abspath(d.root)
    d.synthetic = [os.path.abspath(s) for s in d.synthetic]
    if d.pseudo_masks is not None:
        d.pseudo_masks = os.path.abspath(d.pseudo_masks)
    return resolved


def read_metrics(out: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run directory."""
    return json.loads((Path(out) / "metrics.json").read_text())
