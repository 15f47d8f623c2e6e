"""``hisynseg demo``: the whole method on real H&E, against a CAM baseline and an upper bound.

One resumable run directory::

    data/                 the demo dataset (build_demo_dataset), with train_masks/
    hisynseg/             hisynseg pipeline run (synthesis, filters, training, evaluation)
    cam-baseline/         classifier CAMs turned into masks (same network and budget)
    fully-supervised/     the same network trained on the training patches' pixel masks
    config.yaml           the resolved recipe (hisynseg pipeline --config reads it)
    progress.json         completed phases, their summaries and timings
    report.md, report.html, report.json, overlays.png, curves.png

Phases run in order: build the dataset, run HisynSeg with the recipe
(``configs/demo.yaml`` by default), train and score the two baselines with HisynSeg's
budget (:mod:`hisynseg.demo.baselines`), write the report. A phase recorded in
``progress.json`` is skipped when the command is run again; the pipeline resumes its own
stages. All three methods are scored by :func:`hisynseg.evaluation.evaluate.evaluate`
with the recipe's evaluation settings, and each keeps the checkpoint of its best
validation mIoU; the test split is never used for any choice.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hisynseg.datasets.io import atomic_path, atomic_write_json, atomic_write_text
from hisynseg.errors import HisynsegError

__all__ = [
    "DEFAULT_OUT",
    "METHOD_LABELS",
    "DemoError",
    "default_config_path",
    "load_demo_config",
    "run_demo",
]

DEFAULT_OUT = "runs/demo"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.yaml"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
OVERLAYS_PNG = "overlays.png"
CURVES_PNG = "curves.png"

# Keys of report.json's "methods", in table order; "hisynseg" is the final HisynSeg model
# (stage 2 when the recipe runs it, stage 1 otherwise).
METHOD_LABELS: dict[str, str] = {
    "hisynseg_stage1": "HisynSeg (stage 1)",
    "hisynseg": "HisynSeg",
    "cam": "CAM baseline",
    "fully_supervised": "Fully supervised (upper bound)",
}
_BASELINE_FOLDERS = {"cam": "cam-baseline", "fully_supervised": "fully-supervised"}
_BASELINE_KINDS = {"cam": "cam", "fully_supervised": "supervised"}
_COLOURS = {
    "hisynseg_stage1": "#7fb3d5",
    "hisynseg": "#1f77b4",
    "cam": "#d62728",
    "fully_supervised": "#2ca02c",
}


class DemoError(HisynsegError):
    """The demo cannot run as asked; the message says why."""


def default_config_path() -> Path:
    """The demo recipe shipped inside the package (``configs/demo.yaml`` in the source
    tree links to it), so ``hisynseg demo`` works from any install.

    Raises:
        DemoError: The package was installed without its data files; pass ``--config``.
    """
    path = Path(__file__).resolve().with_name("recipe.yaml")
    if not path.is_file():
        raise DemoError(
            f"{path}: the demo recipe is missing from this install; pass --config with a "
            "copy of configs/demo.yaml"
        )
    return path


def load_demo_config(
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    pretrained: bool = False,
) -> Any:
    """The demo's pipeline recipe with overrides applied.

    Args:
        config: Recipe file (default :func:`default_config_path`).
        overrides: Dotted ``key=value`` overrides at any depth.
        pretrained: Start every encoder from ImageNet weights (needs internet, or
            smp's/timm's cache).

    Raises:
        ConfigError: Bad file, key or value.
        DemoError: A recipe the demo cannot run (not the generic layout, no evaluation
            on the test split).
    """
    from hisynseg.pipeline.config import load_pipeline_config

    extra = ["train.model.encoder_weights=imagenet"] if pretrained else []
    path = Path(config) if config is not None else default_config_path()
    cfg = load_pipeline_config(path, [*overrides, *extra])
    if cfg.dataset != "generic":
        raise DemoError(
            f"{path}: dataset is {cfg.dataset!r}; the demo dataset has the generic layout"
        )
    return cfg


# ----------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(message, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """``progress.json``: the settings of the run and the phases completed so far."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.path = out / PROGRESS_FILE
        self.data: dict[str, Any] = {"settings": settings, "phases": {}}
        if self.path.is_file():
            previous = json.loads(self.path.read_text())
            if previous.get("settings") != settings:
                changed = sorted(
                    k
                    for k in set(settings) | set(previous.get("settings") or {})
                    if settings.get(k) != (previous.get("settings") or {}).get(k)
                )
                raise DemoError(
                    f"{out}: this run directory was made with other settings (changed: "
                    f"{', '.join(changed)}); use a new --out, or the same options to resume"
                )
            self.data = previous
        else:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)

    def done(self, name: str) -> dict[str, Any] | None:
        return self.data["phases"].get(name)

    def record(
        self, name: str, summary: dict[str, Any], seconds: float, load: list[Any]
    ) -> dict[str, Any]:
        entry = {"summary": summary, "seconds": round(seconds, 2), "load": load}
        self.data["phases"][name] = entry
        atomic_write_json(self.path, self.data)
        return entry


def _scores(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("miou", "fwiou", "pixel_accuracy", "iou", "split")}


# ----------------------------------------------------------------------------- phases


def _phase_data(
    root: Path,
    cfg: Any,
    cache_dir: str | os.PathLike[str] | None,
    images: Mapping[str, np.ndarray] | None,
    annotations: Any,
    data_settings: Any,
) -> dict[str, Any]:
    from hisynseg.demo.build import build_demo_dataset

    demo = build_demo_dataset(
        root,
        cache_dir,
        seed=cfg.seed,
        settings=data_settings,
        annotations=annotations,
        images=images,
    )
    return {
        "root": str(demo.root),
        "num_train": demo.num_train,
        "num_single_label": demo.num_single_label,
        "train_per_class": list(demo.train_per_class),
        "single_label_per_class": list(demo.single_label_per_class),
        "num_val": demo.num_val,
        "num_test": demo.num_test,
    }


def _training_budget(cfg: Any, summary: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Steps and images of HisynSeg's training, read from its runs' ``metrics.json``."""
    d = cfg.train.data
    per_step_1 = d.batch_size_synthetic + (d.batch_size_real if d.real_unlabeled else 0)
    per_step_2 = d.batch_size_synthetic + d.batch_size_real
    stages = {s["name"]: run_dir / s["folder"] for s in summary["stages"]}
    m1 = json.loads((stages["train-stage1"] / "metrics.json").read_text())
    steps1, epochs1 = int(m1["global_step"]), max(1, int(m1["epochs"]))
    steps2 = 0
    if "train-stage2" in stages:
        steps2 = int(
            json.loads((stages["train-stage2"] / "metrics.json").read_text())["global_step"]
        )
    images = steps1 * per_step_1 + steps2 * per_step_2
    return {
        "batch_size": per_step_1,
        "steps": max(1, round(images / per_step_1)),
        "images_seen": images,
        "val_every": max(1, steps1 // epochs1),
        "stage1_steps": steps1,
        "stage1_epochs": epochs1,
        "stage2_steps": steps2,
    }


def _phase_hisynseg(cfg: Any, root: Path, run_dir: Path) -> dict[str, Any]:
    from hisynseg.pipeline.run import run_pipeline

    summary = run_pipeline(cfg, root, run_dir)
    stages = {s["name"]: s["folder"] for s in summary["stages"]}
    methods: dict[str, Any] = {}
    final = "stage2" if "stage2" in summary["metrics"] else "stage1"
    for stage, scores in summary["metrics"].items():
        key = "hisynseg" if stage == final else "hisynseg_stage1"
        train = json.loads((run_dir / stages[f"train-{stage}"] / "metrics.json").read_text())
        methods[key] = {
            **_scores(scores),
            "best_val_miou": train.get("best_val_miou"),
            "best_epoch": (train.get("best_val") or {}).get("epoch"),
            "steps": train.get("global_step"),
            "eval_folder": str(run_dir / stages[f"eval-{stage}"]),
            "train_folder": str(run_dir / stages[f"train-{stage}"]),
        }
    return {
        "methods": methods,
        "budget": _training_budget(cfg, summary, run_dir),
        "stages": summary["stages"],
        "synthesis": summary["synthesis"],
        "filters": summary["filters"],
    }


def _phase_baseline(
    key: str, cfg: Any, root: Path, folder: Path, budget: Mapping[str, Any], cam_gate: bool
) -> dict[str, Any]:
    from hisynseg.datasets.spec import resolve_dataset_spec
    from hisynseg.demo.baselines import (
        BaselineSettings,
        load_baseline_predictor,
        train_baseline,
    )
    from hisynseg.evaluation.evaluate import resolve_device
    from hisynseg.pipeline.run import evaluate_with_recipe

    spec = resolve_dataset_spec(cfg.dataset, root)
    t = cfg.train
    kind = _BASELINE_KINDS[key]
    device = resolve_device(cfg.device)
    settings = BaselineSettings(
        kind=kind,
        steps=int(budget["steps"]),
        batch_size=int(budget["batch_size"]),
        val_every=int(budget["val_every"]),
        patch_size=t.data.patch_size,
        encoder=t.model.encoder,
        encoder_weights=t.model.encoder_weights,
        dropout=t.model.dropout,
        lr=t.optim.lr,
        weight_decay=t.optim.weight_decay,
        w1=t.loss.w1,
        w2=t.loss.w2,
        aug_border=t.data.aug_border,
        seed=cfg.seed,
        cam_gate=cam_gate,
        device=device,
    )
    result = train_baseline(settings, root, spec, folder)
    e = cfg.evaluation
    model = load_baseline_predictor(result.best_checkpoint, spec, kind, cam_gate)
    metrics = evaluate_with_recipe(model, cfg, spec, root, device, folder / e.split)
    atomic_write_json(folder / "test_metrics.json", metrics)
    return {
        **_scores(metrics),
        "best_val_miou": result.best_val_miou,
        "best_step": result.best_step,
        "steps": result.steps,
        "images_seen": result.images_seen,
        "eval_folder": str(folder / e.split),
        "train_folder": str(folder),
    }


# ----------------------------------------------------------------------------- figures


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _lightning_curves(train_folder: Path, step_offset: int) -> dict[str, list[tuple[float, float]]]:
    """``{series: [(step, value)]}`` from a Lightning run's CSV logs (every session)."""
    series: dict[str, list[tuple[float, float]]] = {}
    versions = sorted(
        (train_folder / "logs" / "csv").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    for path in versions:
        for row in _read_csv(path):
            step = _num(row.get("step"))
            if step is None:
                continue
            for column, value in row.items():
                x = _num(value)
                if column in ("step", "epoch") or x is None:
                    continue
                series.setdefault(column, []).append((step + step_offset, x))
    return series


def _baseline_curves(train_folder: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    path = train_folder / "metrics.csv"
    if not path.is_file():
        return series
    for row in _read_csv(path):
        step = _num(row["step"])
        for column in ("loss", "cls", "seg", "val_miou", "val_fwiou"):
            x = _num(row.get(column))
            if step is not None and x is not None:
                series.setdefault(column, []).append((step, x))
    return series


def _plot_curves(methods: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax_terms, ax_loss, ax_val, ax_fw = axes
    stage1_steps = 0
    if "hisynseg_stage1" in methods:
        stage1_steps = int(methods["hisynseg_stage1"].get("steps") or 0)
    for key, m in methods.items():
        colour = _COLOURS[key]
        label = METHOD_LABELS[key]
        if key.startswith("hisynseg"):
            offset = stage1_steps if key == "hisynseg" and "hisynseg_stage1" in methods else 0
            curves = _lightning_curves(Path(m["train_folder"]), offset)
            loss, val = curves.get("train/loss", []), curves.get("val/miou", [])
            fw = curves.get("val/fwiou", [])
            is_stage1 = key == "hisynseg_stage1" or "hisynseg_stage1" not in methods
            if is_stage1:
                for term, style in (
                    ("train/cls_syn", "-"),
                    ("train/seg", "--"),
                    ("train/cls_real", "-."),
                    ("train/reg", ":"),
                ):
                    points = curves.get(term, [])
                    if points:
                        xs, ys = zip(*points, strict=True)
                        ax_terms.plot(xs, ys, style, label=term.removeprefix("train/"))
        else:
            curves = _baseline_curves(Path(m["train_folder"]))
            loss, val = curves.get("loss", []), curves.get("val_miou", [])
            fw = curves.get("val_fwiou", [])
        if loss:
            xs, ys = zip(*loss, strict=True)
            ax_loss.plot(xs, ys, color=colour, label=label, linewidth=1)
        if val:
            xs, ys = zip(*val, strict=True)
            ax_val.plot(xs, [100 * y for y in ys], "o-", color=colour, label=label)
        if fw:
            xs, ys = zip(*fw, strict=True)
            ax_fw.plot(xs, [100 * y for y in ys], "o-", color=colour, label=label)
    ax_terms.set_title("HisynSeg stage-1 loss terms")
    ax_loss.set_title("training loss (each method's own objective)")
    ax_val.set_title("validation mIoU (%): selects the checkpoint")
    ax_fw.set_title("validation FwIoU (%)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plot_overlays(
    root: Path, spec: Any, split: str, methods: Mapping[str, Any], path: Path
) -> list[str]:
    """Rows: the held-out images; columns: image, ground truth, each method's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from hisynseg.datasets.io import read_mask, read_rgb
    from hisynseg.datasets.layouts import list_split
    from hisynseg.evaluation.visualize import overlay_mask

    pairs = list_split(root, spec, split)
    keys = [k for k in METHOD_LABELS if k in methods]
    cols = 2 + len(keys)
    fig, axes = plt.subplots(
        len(pairs), cols, figsize=(2.1 * cols, 2.2 * len(pairs) + 0.8), squeeze=False
    )
    for r, pair in enumerate(pairs):
        image = read_rgb(pair.image)
        truth = read_mask(pair.mask, spec.palette)
        panels = [
            ("image", image),
            ("ground truth", overlay_mask(image, truth, spec.palette, 0.5, spec.background_index)),
        ]
        for key in keys:
            pred_path = Path(methods[key]["eval_folder"]) / "masks" / f"{pair.image.stem}.png"
            pred = read_mask(pred_path, spec.palette)
            panels.append((METHOD_LABELS[key], overlay_mask(image, pred, spec.palette, 0.5)))
        for c, (title, picture) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title.replace(" (", "\n("), fontsize=9)
        axes[r][0].set_ylabel(pair.image.stem, fontsize=7)
    handles = [
        Patch(color=np.asarray(spec.palette[i]) / 255, label=f"{spec.short_names[i]}: {name}")
        for i, name in enumerate(spec.class_names)
    ]
    handles.append(Patch(facecolor="none", edgecolor="grey", label="not annotated (not scored)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (2.2 * len(pairs) + 0.8), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return [p.image.name for p in pairs]


# ----------------------------------------------------------------------------- report


def _pct(value: Any) -> str:
    x = _num(value)
    return "–" if x is None else f"{100 * x:.2f}"


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
    }


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


Block = tuple[Any, ...]


def _render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for kind, *rest in blocks:
        if kind == "h":
            level, text = rest
            lines += ["#" * level + " " + text, ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, rows = rest
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            src, alt = rest
            lines += [f"![{alt}]({src})", ""]
        elif kind == "code":
            lines += ["```", rest[0], "```", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    # Markdown's `code` and **bold** in the few places the report uses them.
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _render_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for kind, *rest in blocks:
        if kind == "h":
            level, text = rest
            body.append(f"<h{level}>{_inline_html(text)}</h{level}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
            cells = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>"
                for row in rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            src, alt = rest
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>')
        elif kind == "code":
            body.append(f"<pre>{html.escape(rest[0])}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;"
        "text-align:right}th{background:#eee}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _closing_note(methods: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The target (HisynSeg's mIoU above the CAM baseline's) as a record and a sentence."""
    h = _num(methods.get("hisynseg", {}).get("miou"))
    c = _num(methods.get("cam", {}).get("miou"))
    if h is None or c is None:
        return {"met": None}, "The target could not be checked: a method has no mIoU."
    margin = 100 * (h - c)
    target = {"hisynseg_miou": h, "cam_miou": c, "margin_points": round(margin, 2), "met": h > c}
    where = "above" if h > c else "below"
    note = (
        f"**Target {'met' if h > c else 'not met'}**: HisynSeg's test mIoU ({100 * h:.2f} %) "
        f"is {abs(margin):.2f} points {where} the CAM baseline's ({100 * c:.2f} %)."
    )
    s1 = _num(methods.get("hisynseg_stage1", {}).get("miou"))
    if s1 is not None:
        diff = 100 * (s1 - c)
        note += (
            f" Stage 1 alone scores {100 * s1:.2f} %, {abs(diff):.2f} points "
            f"{'above' if diff > 0 else 'below'} the CAM baseline; stage 2 (the real patches "
            f"with pseudo-masks, and the synthetic images) changes it by {100 * (h - s1):+.2f} "
            "points."
        )
    f = _num(methods.get("fully_supervised", {}).get("miou"))
    if f is not None and f < h:
        note += (
            f" The fully-supervised model ({100 * f:.2f} %) scores below HisynSeg here: it "
            "bounds what the training data can teach, but its checkpoint, too, was chosen "
            "by the noisy validation mIoU (see the notes and the curves)."
        )
    if h <= c:
        note += (
            " Both were trained with the same network, budget and validation-based "
            "checkpoint choice; the curves show whether either was still improving, and the "
            "notes below what limits this dataset."
        )
    return target, note


def _build_report(
    out: Path,
    cfg: Any,
    progress: _Progress,
    timings: dict[str, Any],
    machine: dict[str, Any],
    command: str | None,
) -> dict[str, Any]:
    from hisynseg.datasets.spec import resolve_dataset_spec

    root = out / "data"
    spec = resolve_dataset_spec(cfg.dataset, root)
    phases = progress.data["phases"]
    hisynseg = phases["hisynseg"]["summary"]
    methods: dict[str, Any] = dict(hisynseg["methods"])
    for key in ("cam", "fully_supervised"):
        methods[key] = phases[key]["summary"]
    methods = {k: methods[k] for k in METHOD_LABELS if k in methods}
    split = cfg.evaluation.split
    manifest = json.loads((root / "manifest.json").read_text())
    budget = hisynseg["budget"]

    _plot_curves(methods, out / CURVES_PNG)
    images = _plot_overlays(root, spec, split, methods, out / OVERLAYS_PNG)
    target, note = _closing_note(methods)

    t = cfg.train
    blocks: list[Block] = [("h", 1, "HisynSeg demo on real H&E")]
    blocks.append(
        (
            "p",
            "Weakly-supervised tissue segmentation of a small real H&E dataset (image-level "
            "labels for training, pixel masks for validation and test only), by HisynSeg, by a "
            "plain CAM baseline and by a fully-supervised model, the upper bound. All three use "
            f"the same network (DeepLabV3+ with a CAM head, encoder `{t.model.encoder}`, "
            f"initial weights `{t.model.encoder_weights or 'none (random)'}`), the same training "
            f"budget ({budget['steps']} optimizer steps of {budget['batch_size']} images, "
            f"{budget['images_seen']} images in all) and the same scoring on the {split} split "
            f"(TTA `{cfg.evaluation.tta or 'none'}`); each keeps the checkpoint with the best "
            "validation mIoU.",
        )
    )
    header = ["method", *spec.short_names, "mIoU", "FwIoU", "best val mIoU"]
    rows = []
    for key, m in methods.items():
        iou = m.get("iou") or {}
        rows.append(
            [
                METHOD_LABELS[key],
                *[_pct(iou.get(name)) for name in spec.class_names],
                f"**{_pct(m.get('miou'))}**",
                _pct(m.get("fwiou")),
                _pct(m.get("best_val_miou")),
            ]
        )
    blocks += [
        ("h", 2, f"Segmentation on the {split} split (IoU, %)"),
        ("table", header, rows),
        ("p", note),
        (
            "p",
            "Classes: "
            + "; ".join(
                f"{s} = {n}" for s, n in zip(spec.short_names, spec.class_names, strict=True)
            )
            + ". A class neither in the ground truth nor predicted has no IoU (–) and is left "
            "out of the mIoU; unannotated pixels are not scored.",
        ),
        ("h", 2, "Methods"),
        (
            "list",
            [
                "**HisynSeg**: Mosaic and Bézier synthesis from the single-label training "
                f"patches ({', '.join(cfg.synthesis.methods)}; filter "
                f"{'on' if cfg.filter.enabled else 'off'}), stage-1 training on the synthetic "
                "images with pixel masks plus classification and CAM consistency on the real "
                f"patches (w1 {t.loss.w1}, w2 {t.loss.w2}, w3 {t.loss.w3})"
                + (
                    f", then pseudo-masks and stage 2 ({budget['stage2_steps']} steps)"
                    if cfg.stage2.enabled
                    else ""
                )
                + f"; `hisynseg pipeline` run in `{out / 'hisynseg'}`.",
                "**CAM baseline**: the same network trained with the classification loss only, "
                "on the real training patches and their image-level labels; prediction = the "
                "CAM upsampled bilinearly to the image, argmax over classes"
                + (
                    ", among the classes the network itself scores above 0.5 for the image "
                    "(no label is used at test time)."
                    if phases["cam"]["summary"].get("cam_gate", True)
                    else "."
                ),
                "**Fully supervised**: the same network trained with classification + Dice "
                "loss on the same real training patches with their pixel masks "
                "(`data/train_masks/`, which the weakly-supervised methods never read).",
            ],
        ),
        ("h", 2, f"Predictions on the {split} images"),
        (
            "p",
            "Columns: the image, its ground truth (unannotated pixels left plain), then each "
            "method's prediction blended over the image.",
        ),
        ("img", OVERLAYS_PNG, "overlays"),
        ("h", 2, "Training curves"),
        (
            "p",
            "From the left: HisynSeg's stage-1 loss terms; each method's training loss; "
            "validation mIoU, which chooses each method's checkpoint, and validation FwIoU "
            "(windows of the patch size, no TTA), against optimizer steps (HisynSeg's stage "
            "2 continues the step count of stage 1).",
        ),
        ("img", CURVES_PNG, "training curves"),
    ]
    synth = hisynseg.get("synthesis") or {}
    if synth:
        blocks += [
            ("h", 2, "HisynSeg synthesis and filters"),
            (
                "table",
                ["set", "images", "filtered", "draws", "acceptance"],
                [
                    [
                        name,
                        s.get("images"),
                        "yes" if s.get("filtered") else "no",
                        s.get("draws") if s.get("draws") is not None else "–",
                        _pct(s.get("acceptance_rate")) + " %"
                        if s.get("acceptance_rate") is not None
                        else "–",
                    ]
                    for name, s in synth.items()
                ],
            ),
        ]
        filters = hisynseg.get("filters") or {}
        if filters:
            blocks.append(
                (
                    "table",
                    ["filter", "best epoch", "val accuracy", "val precision", "val recall"],
                    [
                        [
                            name,
                            f.get("best_epoch"),
                            _pct(f.get("val_accuracy")),
                            _pct(f.get("val_precision")),
                            _pct(f.get("val_recall")),
                        ]
                        for name, f in filters.items()
                    ],
                )
            )
    counts = manifest["counts"]
    blocks += [
        ("h", 2, "Data"),
        (
            "p",
            f"`{root}`: {counts['train']['images']} training patches of "
            f"{manifest['settings']['patch_size']} px ({counts['train']['multi_label']} with "
            f"two or more classes), {counts['val']['images']} validation and "
            f"{counts['test']['images']} test images of {manifest['settings']['eval_size']} px "
            "with pixel masks. Classes drawn by this project, not by a pathologist; "
            "validation and test tiles come from other regions of the same images as the "
            "training patches, so these scores show that the pipeline works, not how the "
            "methods compare in general (docs/demo-data.md).",
        ),
        (
            "table",
            ["class", "training patches", "single-label", f"{split} pixels"],
            [
                [
                    name,
                    counts["train"]["per_class"][name],
                    counts["train"]["single_label"][name],
                    counts[split]["pixels"][name],
                ]
                for name in spec.class_names
            ],
        ),
        ("h", 3, "Sources and licences"),
        (
            "table",
            ["image", "package", "member", "licence", "note"],
            [
                [
                    s["name"],
                    f"{s.get('package', '?')}=={s.get('version', '?')}",
                    f"`{s.get('member', '?')}`",
                    s.get("licence", "?"),
                    s.get("licence_note", ""),
                ]
                for s in manifest["sources"]
            ],
        ),
        ("h", 2, "Machine, commands and timings"),
        (
            "list",
            [
                f"machine: {machine['cpu'] or 'unknown CPU'}, {machine['cpu_count']} cores, "
                f"torch threads {machine['torch_threads']}; {machine['platform']}; Python "
                f"{machine['python']}, torch {machine['torch']}",
                f"load average (1, 5, 15 min) when this command started "
                f"{timings.get('load_start')}, at its end {timings.get('load_end')}; per "
                "phase below (other jobs on the machine slow the run down)",
                f"command: `{command or 'hisynseg demo --out ' + str(out)}`",
                f"HisynSeg alone: `hisynseg pipeline --config {out / 'hisynseg' / 'pipeline.yaml'} "
                f"--data {root} --out {out / 'hisynseg'}`",
                f"resolved recipe: `{out / CONFIG_FILE}`; baselines' settings in their "
                "`metrics.json`",
            ],
        ),
        (
            "table",
            ["phase", "seconds", "load average before → after", "this run"],
            [
                [
                    name,
                    f"{p['seconds']:.1f}",
                    " → ".join(str(x) for x in p.get("load") or []) or "–",
                    "ran" if name in timings["ran"] else "done before",
                ]
                for name, p in phases.items()
            ]
            + [["total (all phases)", f"{sum(p['seconds'] for p in phases.values()):.1f}", "", ""]],
        ),
        ("h", 2, "Notes"),
        (
            "list",
            [
                "The training budget is tiny (minutes on a CPU, random initial weights unless "
                "`--pretrained`), so all three models are far from converged; the upper bound "
                "shows what the same budget buys with pixel masks.",
                "The validation split has no lymphocytes. A class predicted but absent from "
                "the ground truth has IoU 0 and counts in the mean, so a single pixel "
                "predicted as lymphocytes anywhere in validation costs a quarter of the "
                "validation mIoU: it jumps between about 60 % and 90 % from one validation "
                "to the next (FwIoU, which weighs classes by their pixels, is smoother), and "
                "the checkpoint choice is noisy for every method. The CAM baseline, which "
                "drops classes its classifier rules out for the image, predicts stray "
                "lymphocytes less often, hence its higher validation mIoU. Lymphocytes have "
                "8 training patches (2 single-label), all from one image.",
                "Classes are tied to source images (epidermis only in the skin slide, "
                "lymphocytes only in one carcinoma image): a model may partly learn the source.",
            ],
        ),
    ]
    text = _render_markdown(blocks)
    atomic_write_text(out / REPORT_MD, text)
    atomic_write_text(out / REPORT_HTML, _render_html(blocks, "HisynSeg demo"))
    report = {
        "split": split,
        "classes": list(spec.class_names),
        "methods": {
            key: {
                "label": METHOD_LABELS[key],
                "miou": m.get("miou"),
                "fwiou": m.get("fwiou"),
                "pixel_accuracy": m.get("pixel_accuracy"),
                "iou": m.get("iou"),
                "best_val_miou": m.get("best_val_miou"),
                "steps": m.get("steps"),
            }
            for key, m in methods.items()
        },
        "target": target,
        "budget": budget,
        "timings": {
            "phases": {name: p["seconds"] for name, p in phases.items()},
            "phase_load": {name: p.get("load") for name, p in phases.items()},
            "total_seconds": round(sum(p["seconds"] for p in phases.values()), 2),
            "this_run_seconds": timings.get("this_run"),
            "load_start": timings.get("load_start"),
            "load_end": timings.get("load_end"),
        },
        "machine": machine,
        "command": command,
        "figures": {"overlays": OVERLAYS_PNG, "curves": CURVES_PNG},
        "overlay_images": images,
        "dataset": {"root": str(root), "counts": counts, "sources": manifest["sources"]},
    }
    atomic_write_json(out / REPORT_JSON, report)
    return report


# ----------------------------------------------------------------------------- entry point


def run_demo(
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    pretrained: bool = False,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cam_gate: bool = True,
    images: Mapping[str, np.ndarray] | None = None,
    annotations: Any = None,
    data_settings: Any = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Build the demo dataset, run HisynSeg and both baselines, write the report.

    Args:
        out: Run directory (created, or resumed).
        config: Pipeline recipe (default ``configs/demo.yaml``).
        overrides: Dotted recipe overrides (``train.trainer.epochs=3``).
        pretrained: ImageNet encoder weights for all three methods (needs internet).
        threads: Torch threads (default: every core).
        cache_dir: Where the source images are cached (see :mod:`hisynseg.demo.sources`).
        cam_gate: CAM baseline: keep only the classes it predicts for the image
            (:func:`hisynseg.demo.baselines.cam_to_scores`).
        images: Source images by name instead of fetching them (tests).
        annotations: Annotation GeoJSON instead of the packaged one (tests).
        data_settings: :class:`hisynseg.demo.build.DemoSettings` of the dataset; the
            default cuts 96-px patches.
        command: The command line, for the report.

    Returns:
        The content of ``report.json``.

    Raises:
        DemoError: A run directory made with other settings, or an unusable recipe.
        HisynsegError: A stage failed (the message names it).
    """
    import torch

    from hisynseg.demo.build import DemoSettings
    from hisynseg.pipeline.config import pipeline_config_to_dict, save_pipeline_config

    start = time.perf_counter()
    out = Path(out)
    cfg = load_demo_config(config, overrides, pretrained)
    data_settings = data_settings or DemoSettings()
    if data_settings.patch_size != cfg.train.data.patch_size:
        # The recipe trains on whole patches: crops of another size would rescale them.
        data_settings = replace(data_settings, patch_size=cfg.train.data.patch_size)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    settings = {
        "recipe": pipeline_config_to_dict(cfg),
        "data": {**data_settings.to_dict(), "seed": cfg.seed, "custom_images": images is not None},
        "cam_gate": cam_gate,
    }
    # As progress.json will hold them (tuples become lists), for the resume check.
    progress = _Progress(out, json.loads(json.dumps(settings)))
    save_pipeline_config(cfg, out / CONFIG_FILE)
    timings: dict[str, Any] = {"load_start": _load(), "ran": []}
    root = out / "data"
    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        (
            "data",
            "building the demo dataset",
            lambda: _phase_data(root, cfg, cache_dir, images, annotations, data_settings),
        ),
        (
            "hisynseg",
            "HisynSeg: synthesis, filters, training, evaluation",
            lambda: _phase_hisynseg(cfg, root, out / "hisynseg"),
        ),
    ]
    for key in ("cam", "fully_supervised"):
        steps.append(
            (
                key,
                f"{METHOD_LABELS[key]}: training with HisynSeg's budget, evaluation",
                lambda key=key: {
                    **_phase_baseline(
                        key,
                        cfg,
                        root,
                        out / _BASELINE_FOLDERS[key],
                        progress.done("hisynseg")["summary"]["budget"],
                        cam_gate,
                    ),
                    "cam_gate": cam_gate,
                },
            )
        )
    total = len(steps) + 1
    for index, (name, title, work) in enumerate(steps, start=1):
        heading = f"== [{index}/{total}] {title} (elapsed {_clock(time.perf_counter() - start)})"
        if progress.done(name) is not None:
            _say(f"{heading}: done before, skipped")
            continue
        _say(heading)
        began = time.perf_counter()
        load_before = _load()
        summary = work()
        progress.record(name, summary, time.perf_counter() - began, [load_before, _load()])
        timings["ran"].append(name)
        scores = summary["methods"] if name == "hisynseg" else {name: summary}
        for key, m in scores.items():
            if key in METHOD_LABELS and m.get("miou") is not None:
                _say(
                    f"   {METHOD_LABELS[key]}: {cfg.evaluation.split} mIoU {100 * m['miou']:.2f} %"
                )
    _say(f"== [{total}/{total}] report (elapsed {_clock(time.perf_counter() - start)})")
    began = time.perf_counter()
    timings["load_end"] = _load()
    timings["this_run"] = round(time.perf_counter() - start, 2)
    report = _build_report(out, cfg, progress, timings, _machine(), command)
    _say(
        f"report: {out / REPORT_MD} (and {REPORT_HTML}, {REPORT_JSON}), done in "
        f"{_clock(time.perf_counter() - start)} (report {time.perf_counter() - began:.1f} s)"
    )
    return report
