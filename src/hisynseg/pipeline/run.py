"""The whole HisynSeg method as one resumable run (``hisynseg pipeline``).

Stages, each in its own folder of the run directory (METHOD.md §3–7)::

    01-synth-unfiltered-mosaic   10,000 unfiltered images (the filter's "fake" examples)
    02-synth-unfiltered-bezier
    03-filter-mosaic             real-vs-synthetic ResNet-18 per method
    04-filter-bezier
    05-synth-mosaic              the training sets, kept by the filter
    06-synth-bezier
    07-train-stage1              synthetic images + consistency on real images
    08-eval-stage1
    09-pseudo-label              d4 pseudo-masks of the real training images
    10-train-stage2              real images with pseudo-masks + synthetic images
    11-eval-stage2

Ablations remove stages (no filter: no 01–04, the training sets unfiltered; one method
only; no stage 2: no 09–11). ``report.md`` and ``summary.json`` are rewritten after every
stage; until the last stage is done they say the run is incomplete and which stages are left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from hisynseg.config import config_from_dict, config_to_dict, leaf_differences
from hisynseg.datasets.io import atomic_write_json
from hisynseg.datasets.spec import DatasetSpec, resolve_dataset_spec
from hisynseg.devices import resolve_device
from hisynseg.errors import HisynsegError
from hisynseg.pipeline.config import PipelineConfig, save_pipeline_config
from hisynseg.pipeline.report import write_report
from hisynseg.pipeline.stages import Stage, StageRecord, run_stages, stage_folder

__all__ = ["PipelineError", "build_stages", "run_pipeline", "RESOLVED_RECIPE"]

log = logging.getLogger(__name__)

RESOLVED_RECIPE = "pipeline.yaml"


class PipelineError(HisynsegError):
    """A stage could not do its work (the message says which and why)."""


def _workers(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


def _synthesis_params(cfg: PipelineConfig, spec: DatasetSpec, method: str):
    from hisynseg.synthesis.generate import default_params

    base = default_params(method, spec)
    overrides = dict(getattr(cfg.synthesis, method))
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise PipelineError(
            f"synthesis.{method}: unknown parameter(s) {unknown}; valid: {', '.join(fields)}"
        )
    for key, value in overrides.items():
        # YAML gives lists where the parameters hold tuples (ranges, class pairs).
        if isinstance(value, list):
            overrides[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return dataclasses.replace(base, **overrides)


def _synth_stage(
    cfg: PipelineConfig, spec: DatasetSpec, root: Path, method: str, num: int, filtered: bool
) -> Stage:
    def run(folder: Path, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from hisynseg.synthesis.generate import synthesize

        keep = None
        max_draws = None
        if filtered:
            from hisynseg.synthesis.discriminator import load_filter

            keep = load_filter(
                done[f"filter-{method}"]["checkpoint"],
                dataset=spec,
                method=method,
                device=resolve_device(cfg.device),
            )
            max_draws = int(num * cfg.synthesis.max_draws_factor)
        summary = synthesize(
            root,
            spec,
            method,
            num,
            folder,
            seed=cfg.seed,
            workers=_workers(cfg.synthesis.workers),
            params=_synthesis_params(cfg, spec, method),
            keep=keep,
            keep_threshold=cfg.filter.keep_threshold,
            max_draws=max_draws,
            compress_level=cfg.synthesis.compress_level,
        )
        if summary.failed:
            log.warning("%s: %d draws failed", folder.name, len(summary.failed))
        if summary.stopped:
            if max_draws is not None and (summary.draws or 0) >= max_draws:
                # synthesize's own advice (--max-draws, --keep-threshold, --out) names
                # flags this command lacks, and a run directory refuses a changed recipe.
                raise PipelineError(
                    f"{folder.name}: the filter kept {summary.kept} of {num} images in "
                    f"{summary.draws} draws, the most synthesis.max_draws_factor = "
                    f"{cfg.synthesis.max_draws_factor:g} allows; the kept images are "
                    "written. A run directory keeps its recipe, so re-run with a higher "
                    "synthesis.max_draws_factor or a lower filter.keep_threshold and a new --out"
                )
            raise PipelineError(f"{folder.name}: {summary.stopped}")
        return {
            "out": str(folder),
            "method": method,
            "images": summary.complete,
            "filtered": filtered,
            "draws": summary.draws,
            "kept": summary.kept,
            "acceptance_rate": summary.acceptance_rate,
            "failed": len(summary.failed),
        }

    return Stage(
        ("synth-" if filtered or not cfg.filter.enabled else "synth-unfiltered-") + method, run
    )


def _filter_stage(cfg: PipelineConfig, spec: DatasetSpec, root: Path, method: str) -> Stage:
    def run(folder: Path, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from hisynseg.synthesis.discriminator import (
            FilterExistsError,
            FilterTrainConfig,
            train_filter,
        )

        f = cfg.filter

        def train(overwrite: bool) -> Any:
            return train_filter(
                root,
                spec,
                done[f"synth-unfiltered-{method}"]["out"],
                folder,
                method=method,
                config=FilterTrainConfig(
                    epochs=f.epochs,
                    lr=f.lr,
                    batch_size=f.batch_size,
                    cap=f.cap,
                    val_fraction=f.val_fraction,
                    image_size=f.image_size,
                    seed=cfg.seed,
                    device=cfg.device,
                ),
                overwrite=overwrite,
            )

        try:
            result = train(overwrite=False)
        except FilterExistsError as exc:
            # The stage's folder belongs to the pipeline: a filter of other settings there
            # is outdated (e.g. left by an older hisynseg), not the user's to keep.
            log.warning("%s: replacing a filter trained for other settings (%s)", folder, exc)
            result = train(overwrite=True)
        return {
            "checkpoint": str(result.checkpoint),
            "best_epoch": result.best_epoch,
            "best": result.best,
            "counts": result.counts,
        }

    return Stage(f"filter-{method}", run)


def _train_stage(cfg: PipelineConfig, spec: DatasetSpec, root: Path, stage: int) -> Stage:
    def run(folder: Path, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from hisynseg.training.run import train

        data = config_to_dict(cfg.train)
        data["stage"] = stage
        data["out"] = str(folder)
        data["data"]["root"] = str(root)
        data["data"]["dataset"] = cfg.dataset
        data["data"]["synthetic"] = [
            s["out"]
            for name, s in done.items()
            if name.startswith("synth-") and "unfiltered" not in name
        ]
        data["trainer"]["seed"] = cfg.seed
        if stage == 2:
            data["data"]["pseudo_masks"] = done["pseudo-label"]["out"]
            if cfg.stage2.epochs is not None:
                data["trainer"]["epochs"] = cfg.stage2.epochs
        result = train(config_from_dict(data))
        if result.best_checkpoint is None:
            raise PipelineError(f"{folder.name}: training finished without a best checkpoint")
        return {
            "best_checkpoint": str(result.best_checkpoint),
            "last_checkpoint": str(result.last_checkpoint),
            "best_val_miou": result.metrics.get("best_val_miou"),
            "epochs": result.metrics.get("epochs"),
        }

    return Stage(f"train-stage{stage}", run)


def evaluate_with_recipe(
    model: Any,
    cfg: PipelineConfig,
    spec: DatasetSpec,
    root: Path,
    device: str,
    save_masks_dir: Path | None,
) -> dict[str, Any]:
    """Score ``model`` on the recipe's evaluation split with the recipe's settings (TTA,
    sliding windows and scales, the training patch size); what every method of a run is
    scored with, so that their figures compare.

    Returns:
        :func:`hisynseg.evaluation.evaluate.evaluate`'s metrics.
    """
    from hisynseg.evaluation.evaluate import evaluate

    e = cfg.evaluation
    return evaluate(
        model,
        root,
        spec,
        e.split,
        tta=e.tta,
        window=e.window,
        stride=e.stride,
        scales=e.scales,
        patch_size=cfg.train.data.patch_size,
        device=device,
        batch_size=e.batch_size,
        save_masks_dir=save_masks_dir,
    )


def _eval_stage(cfg: PipelineConfig, spec: DatasetSpec, root: Path, stage: int) -> Stage:
    def run(folder: Path, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from hisynseg.models.checkpoint import load_segmenter

        e = cfg.evaluation
        ckpt = done[f"train-stage{stage}"]["best_checkpoint"]
        device = resolve_device(cfg.device)
        model, _ = load_segmenter(ckpt, expected_spec=spec, map_location=device)
        metrics = evaluate_with_recipe(
            model, cfg, spec, root, device, folder if e.save_masks else None
        )
        metrics["checkpoint"] = ckpt
        atomic_write_json(folder / "metrics.json", metrics)
        return {
            "miou": metrics["miou"],
            "fwiou": metrics["fwiou"],
            "iou": metrics["iou"],
            "split": e.split,
            "checkpoint": ckpt,
        }

    return Stage(f"eval-stage{stage}", run)


def _pseudo_stage(cfg: PipelineConfig, spec: DatasetSpec, root: Path) -> Stage:
    def run(folder: Path, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from hisynseg.inference.pseudo_labels import (
            OtherMasksError,
            clear_pseudo_labels,
            pseudo_label_dataset,
        )
        from hisynseg.models.checkpoint import load_segmenter

        device = resolve_device(cfg.device)
        ckpt = done["train-stage1"]["best_checkpoint"]
        model, _ = load_segmenter(ckpt, expected_spec=spec, map_location=device)

        def label(overwrite: bool) -> Any:
            return pseudo_label_dataset(
                model,
                root,
                spec,
                folder,
                patch_size=cfg.train.data.patch_size,
                tta=cfg.stage2.tta,
                device=device,
                batch_size=cfg.evaluation.batch_size,
                save_entropy=cfg.stage2.save_entropy,
                checkpoint=ckpt,
                overwrite=overwrite,
            )

        try:
            summary = label(overwrite=False)
        except OtherMasksError as exc:
            # The stage's folder belongs to the pipeline: masks of an earlier stage-1 model
            # or other settings are outdated, not the user's to keep.
            log.warning("%s; making them again", exc)
            clear_pseudo_labels(folder, require_record=False)
            summary = label(overwrite=False)
        if summary.failed:
            log.warning("pseudo-labelling skipped %d unreadable images", len(summary.failed))
        return {**summary.to_dict(), "out": str(folder), "checkpoint": ckpt}

    return Stage("pseudo-label", run)


def build_stages(cfg: PipelineConfig, spec: DatasetSpec, root: Path) -> list[Stage]:
    """The stages ``cfg`` asks for, in order."""
    methods = list(cfg.synthesis.methods)
    if not methods:
        raise PipelineError("synthesis.methods: name at least one of mosaic, bezier")
    stages: list[Stage] = []
    if cfg.filter.enabled:
        stages += [
            _synth_stage(cfg, spec, root, m, cfg.synthesis.unfiltered, False) for m in methods
        ]
        stages += [_filter_stage(cfg, spec, root, m) for m in methods]
    stages += [
        _synth_stage(cfg, spec, root, m, cfg.synthesis.num, cfg.filter.enabled) for m in methods
    ]
    stages += [_train_stage(cfg, spec, root, 1), _eval_stage(cfg, spec, root, 1)]
    if cfg.stage2.enabled:
        stages += [
            _pseudo_stage(cfg, spec, root),
            _train_stage(cfg, spec, root, 2),
            _eval_stage(cfg, spec, root, 2),
        ]
    return stages


def run_pipeline(cfg: PipelineConfig, root: str | Path, out: str | Path) -> dict[str, Any]:
    """Run (or resume) the whole method; returns the summary also written to ``summary.json``.

    Raises:
        PipelineError: A stage failed or the run directory belongs to another recipe.
    """
    root = Path(root)
    out = Path(out)
    spec = resolve_dataset_spec(cfg.dataset, root)
    _check_recipe(cfg, out)
    _check_data_root(root, out)
    stages = build_stages(cfg, spec, root)
    planned = [stage_folder(out, i, s.name).name for i, s in enumerate(stages, start=1)]
    records: list[StageRecord] = []

    def on_stage(record: StageRecord) -> None:
        records.append(record)
        # Written after every stage, so an interrupted run's report says what is left.
        write_report(out, cfg, spec, records, planned=planned)

    run_stages(out, stages, on_stage=on_stage)
    return write_report(out, cfg, spec, records, planned=planned)


DATA_RECORD = "data.json"


def _check_data_root(root: Path, out: Path) -> None:
    """Refuse to resume a run directory made from another dataset folder; record this one.

    Completed stages are skipped on a re-run, so results of one dataset would otherwise be
    reported as those of another.
    """
    path = out / DATA_RECORD
    current = str(root.resolve())
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("root")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous is not None and previous != current:
            raise PipelineError(
                f"{out}: this run directory was made from the data in {previous}, not "
                f"{current}; use a new --out, or the same --data to resume"
            )
    atomic_write_json(path, {"root": current})


def _check_recipe(cfg: PipelineConfig, out: Path) -> None:
    """Refuse to resume a run directory made with another recipe; save this one."""
    from hisynseg.pipeline.config import load_pipeline_config, pipeline_config_to_dict

    path = out / RESOLVED_RECIPE
    if path.is_file():
        previous = pipeline_config_to_dict(load_pipeline_config(path))
        current = pipeline_config_to_dict(cfg)
        if previous != current:
            changed = [
                f"{key} {then!r} → {now!r}"
                for key, then, now in leaf_differences(previous, current)
            ]
            shown = "; ".join(changed[:6]) + (
                f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
            )
            raise PipelineError(
                f"{out}: this run directory was made with another recipe ({shown}); use a "
                "new --out, or the same recipe and overrides to resume"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_pipeline_config(cfg, path)
    from hisynseg.training.run import collect_versions

    # Refreshed on every (re-)run: the versions that did the latest work.
    atomic_write_json(out / "versions.json", collect_versions())
