"""``report.md`` and ``summary.json`` of a pipeline run: metrics, filter figures, timings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hisynseg.datasets.io import atomic_write_json, atomic_write_text
from hisynseg.datasets.spec import DatasetSpec

if TYPE_CHECKING:
    from hisynseg.pipeline.config import PipelineConfig
    from hisynseg.pipeline.stages import StageRecord

__all__ = ["write_report", "PUBLISHED_MIOU", "REPORT_FILE", "SUMMARY_FILE"]

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"

# METHOD.md §8: published test mIoU (%) of other methods, for comparison.
PUBLISHED_MIOU: dict[str, dict[str, float]] = {
    "luad-histoseg": {
        "HistoSegNet (ICCV'19)": 47.75,
        "WSSS-Tissue / MLPS (MIA'22)": 73.63,
        "TPRO (MICCAI'23)": 76.80,
        "ARML (MICCAI'24)": 77.11,
        "PDSeg (ICASSP'25)": 77.46,
        "ESFAN (MICCAI'25, stage 2)": 79.55,
    },
    "bcss-wsss": {
        "HistoSegNet (ICCV'19)": 27.64,
        "WSSS-Tissue / MLPS (MIA'22)": 62.55,
        "TPRO (MICCAI'23)": 65.64,
        "PistoSeg (AAAI'23, retrained)": 70.75,
        "ARML (MICCAI'24)": 70.56,
        "PDSeg (ICASSP'25)": 70.77,
        "ESFAN (MICCAI'25, stage 2)": 71.51,
    },
    "wsss4luad": {
        "PistoSeg (AAAI'23, retrained)": 75.30,
        "WSSS4LUAD challenge winner": 84.13,
    },
}


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.2f}"


def _stages_left(records: list[StageRecord], planned: Sequence[str] | None) -> list[str]:
    """Folders of the planned stages that have no record yet, in order."""
    done = {r.folder.name for r in records}
    return [name for name in planned or () if name not in done]


def _stage_span(folders: Sequence[str]) -> str:
    """``"stage 11"`` or ``"stages 10–11"`` from folder names such as ``"10-train-stage2"``."""
    numbers = [name.split("-", 1)[0].lstrip("0") or "0" for name in folders]
    if len(numbers) == 1:
        return f"stage {numbers[0]}"
    return f"stages {numbers[0]}–{numbers[-1]}"


def _summary(
    cfg: PipelineConfig,
    spec: DatasetSpec,
    records: list[StageRecord],
    planned: Sequence[str] | None = None,
) -> dict[str, Any]:
    left = _stages_left(records, planned)
    metrics: dict[str, Any] = {}
    filters: dict[str, Any] = {}
    synthesis: dict[str, Any] = {}
    for r in records:
        if r.name.startswith("eval-"):
            metrics[r.name.removeprefix("eval-")] = {
                k: r.summary.get(k) for k in ("miou", "fwiou", "iou", "split")
            }
        elif r.name.startswith("filter-"):
            filters[r.name.removeprefix("filter-")] = {
                "best_epoch": r.summary.get("best_epoch"),
                **{k: v for k, v in (r.summary.get("best") or {}).items()},
            }
        elif r.name.startswith("synth-"):
            synthesis[r.name.removeprefix("synth-")] = {
                k: r.summary.get(k)
                for k in ("images", "filtered", "draws", "kept", "acceptance_rate")
            }
    return {
        "status": "incomplete" if left else "complete",
        "stages_left": left,
        "dataset": spec.name,
        "classes": list(spec.class_names),
        "metrics": metrics,
        "filters": filters,
        "synthesis": synthesis,
        "stages": [
            {
                "name": r.name,
                "folder": r.folder.name,
                "seconds": round(r.seconds, 2),
                "skipped": r.skipped,
            }
            for r in records
        ],
        "total_seconds": round(sum(r.seconds for r in records), 2),
        "settings": {
            "methods": list(cfg.synthesis.methods),
            "filter": cfg.filter.enabled,
            "consistency_weight": cfg.train.loss.w3,
            "real_unlabeled": cfg.train.data.real_unlabeled,
            "stage2": cfg.stage2.enabled,
            "encoder": cfg.train.model.encoder,
            "epochs": cfg.train.trainer.epochs,
        },
    }


def _markdown(summary: dict[str, Any], spec: DatasetSpec) -> str:
    lines = [f"# HisynSeg run on {spec.name}", ""]
    left = summary.get("stages_left") or []
    if left:
        # An interrupted run leaves this file behind; without this line its tables and
        # total would read as the final result.
        lines += [
            f"**Incomplete:** {_stage_span(left)} not run yet ({', '.join(left)}); re-run "
            "the same command to continue. The figures below cover the stages done so far.",
            "",
        ]
    s = summary["settings"]
    lines += [
        f"Methods: {', '.join(s['methods'])}; filter: {'on' if s['filter'] else 'off'}; "
        f"consistency weight w3 = {s['consistency_weight']}; stage 2: {'on' if s['stage2'] else 'off'}; "
        f"encoder: {s['encoder']}; epochs: {s['epochs']}.",
        "",
        "## Segmentation (IoU, %)",
        "",
    ]
    if summary["metrics"]:
        names = list(spec.short_names)
        lines.append("| stage | split | " + " | ".join(names) + " | mIoU | FwIoU |")
        lines.append("|---" * (len(names) + 4) + "|")
        for stage, m in summary["metrics"].items():
            iou = m.get("iou") or {}
            cells = [_pct(iou.get(c)) for c in spec.class_names]
            lines.append(
                f"| {stage} | {m.get('split')} | "
                + " | ".join(cells)
                + f" | {_pct(m.get('miou'))} | {_pct(m.get('fwiou'))} |"
            )
    else:
        lines.append("No stage has been evaluated yet.")
    published = PUBLISHED_MIOU.get(spec.name)
    if published:
        lines += ["", "Published test mIoU on the real dataset, for comparison (METHOD.md §8):", ""]
        lines += ["| method | mIoU (%) |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in published.items()]
    if summary["filters"]:
        lines += ["", "## Filters (best epoch, validation)", ""]
        lines += [
            "| method | epoch | accuracy | precision | recall | F1 |",
            "|---|---|---|---|---|---|",
        ]
        for method, f in summary["filters"].items():
            lines.append(
                f"| {method} | {f.get('best_epoch')} | "
                + " | ".join(
                    _pct(f.get(f"val_{k}")) for k in ("accuracy", "precision", "recall", "f1")
                )
                + " |"
            )
    if summary["synthesis"]:
        lines += ["", "## Synthesis", ""]
        lines += ["| set | images | filtered | draws | acceptance |", "|---|---|---|---|---|"]
        for name, x in summary["synthesis"].items():
            rate = x.get("acceptance_rate")
            lines.append(
                f"| {name} | {x.get('images')} | {'yes' if x.get('filtered') else 'no'} | "
                f"{x.get('draws') if x.get('draws') is not None else '–'} | "
                f"{_pct(rate) + ' %' if rate is not None else '–'} |"
            )
    lines += ["", "## Timings", "", "| stage | seconds | this run |", "|---|---|---|"]
    for st in summary["stages"]:
        lines.append(
            f"| {st['folder']} | {st['seconds']:.1f} | {'skipped (done before)' if st['skipped'] else 'ran'} |"
        )
    total = "Total so far" if left else "Total"
    lines += ["", f"{total}: {summary['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def write_report(
    out: Path,
    cfg: PipelineConfig,
    spec: DatasetSpec,
    records: list[StageRecord],
    planned: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json`` and ``report.md`` for the stages done so far; return the summary.

    Args:
        out: The run directory.
        cfg: The run's recipe.
        spec: The dataset.
        records: The stages done (or skipped as done before), in order.
        planned: The folder names of every stage of the run, in order. Those without a
            record make the report "incomplete": ``summary.json`` gets ``"status":
            "incomplete"`` and ``"stages_left"``, and ``report.md`` says so at the top.
            ``None``: ``records`` are the whole run.

    Returns:
        The content of ``summary.json``.
    """
    summary = _summary(cfg, spec, records, planned)
    atomic_write_json(out / SUMMARY_FILE, summary)
    atomic_write_text(out / REPORT_FILE, _markdown(summary, spec))
    return summary
