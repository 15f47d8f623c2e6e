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
interrupted command resumes it (use a new ``out`` for a fresh run).

Several GPUs and machines use DDP: ``trainer.devices`` GPUs per node, ``trainer.num_nodes``
nodes (start the same command on every node with Lightning's ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK`` environment, or under SLURM/torchrun). Batch sizes are per
process. Precision ``"auto"`` is 16-bit mixed precision on GPUs and 32-bit on CPUs.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
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


def _check_resume(path: Path, spec: DatasetSpec, model_config: dict[str, Any]) -> None:
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


def route_lightning_logs_to_root() -> None:
    """Let the application's logging print Lightning's messages, once.

    Lightning gives its ``lightning`` logger a stderr handler of its own at import and
    still passes the records up to the root logger, so under a configured root logger (the
    CLI's) every Lightning line printed twice. With a root handler present, Lightning's own
    stream handlers are removed; without one (a library user who configured nothing) they
    stay, so the messages are still seen.
    """
    if not logging.getLogger().handlers:
        return
    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)


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
        _check_resume(resume, spec, model_config)
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
    """A copy with ``precision: auto`` replaced by what this machine will use."""
    from hisynseg.config import config_from_dict

    resolved = config_from_dict(config_to_dict(cfg))
    resolved.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    return resolved


def read_metrics(out: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run directory."""
    return json.loads((Path(out) / "metrics.json").read_text())
