"""Running named stages in order inside one run directory, with completion markers.

Each stage owns a folder ``RUN/<NN>-<name>/``. When its work returns, the stage's summary
(with its wall time) is written to ``stage.json`` in that folder, atomically; that file is
the completion marker. A re-run skips every stage that has one and re-enters the first
that has not, whose own work resumes from what it left (synthesis writes only missing
images, training resumes from its last checkpoint, pseudo-labelling writes only missing
masks).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hisynseg.datasets.io import atomic_write_json

__all__ = ["Stage", "StageRecord", "run_stages", "STAGE_MARKER"]

log = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Attributes:
        name: Short name; the folder is ``<NN>-<name>``.
        run: Does the work in the given folder and returns a JSON-friendly summary. It
            receives the summaries of the stages before it, by name.
    """

    name: str
    run: Callable[[Path, dict[str, dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class StageRecord:
    """A finished stage: its folder, summary, wall time and whether this run did it."""

    name: str
    folder: Path
    summary: dict[str, Any]
    seconds: float
    skipped: bool


def stage_folder(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index:02d}-{name}"


def run_stages(
    run_dir: str | Path,
    stages: list[Stage],
    on_stage: Callable[[StageRecord], None] | None = None,
) -> list[StageRecord]:
    """Run ``stages`` in order, skipping those already complete.

    Args:
        run_dir: The run directory.
        stages: The stages, in order.
        on_stage: Called after each stage (done or skipped), e.g. to refresh a report.

    Returns:
        One record per stage.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records: list[StageRecord] = []
    summaries: dict[str, dict[str, Any]] = {}
    for index, stage in enumerate(stages, start=1):
        folder = stage_folder(run_dir, index, stage.name)
        marker = folder / STAGE_MARKER
        if marker.is_file():
            data = json.loads(marker.read_text())
            record = StageRecord(stage.name, folder, data["summary"], data["seconds"], True)
            log.info("stage %s: already complete, skipped", folder.name)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            log.info("stage %s: running", folder.name)
            start = time.perf_counter()
            summary = stage.run(folder, summaries)
            seconds = time.perf_counter() - start
            atomic_write_json(marker, {"stage": stage.name, "seconds": seconds, "summary": summary})
            record = StageRecord(stage.name, folder, summary, seconds, False)
            log.info("stage %s: done in %.1f s", folder.name, seconds)
        summaries[stage.name] = record.summary
        records.append(record)
        if on_stage is not None:
            on_stage(record)
    return records
