"""Predicting a list of images and slides into an output folder (``hisynseg predict``).

Per input ``NAME`` (the file's stem, without ``.ome``; see :func:`output_names` for
inputs that share one):

* ``NAME.mask.png`` (pictures) or ``NAME.mask.tif`` (TIFF and slide files; pyramidal,
  tiled, palette): class indices at the output resolution;
* ``NAME.overlay.png``: the class colours over a thumbnail (longer side at most
  ``overlay_max_side``);
* ``NAME.areas.csv``: pixels, tissue share and µm² (when the resolution is known) per class;
* ``NAME.geojson``: QuPath annotations of the class regions in level-0 pixels;
* ``NAME.probs.npy`` (``save_probs``): ``H×W×C`` ``float16`` probabilities at the output
  resolution (open with ``np.load(path, mmap_mode="r")``).

An input whose outputs all exist is skipped unless ``overwrite``, provided they were made
from the same input (the same file: path, size and modification time), model and
pixel-changing options (``OUTPUT_SETTINGS``); outputs made otherwise are not passed off
as this run's: the input fails with an error saying so. An
input that fails (unreadable file, missing resolution, ...) is reported and the others go
on. ``predict.json`` in the folder records the options, the versions and every input's
status, and under ``outputs`` what every output set in the folder was made from, over all
runs into it; it is rewritten every few seconds as inputs finish, at the end, and when the
run is interrupted (a run killed outright may leave the last few seconds' inputs out).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from hisynseg.config import leaf_differences
from hisynseg.datasets.io import atomic_write_json, write_mask_png, write_rgb_png
from hisynseg.errors import HisynsegError
from hisynseg.evaluation.visualize import overlay_mask
from hisynseg.inference.canvas import DiskCanvas
from hisynseg.inference.outputs import (
    ClassLabels,
    area_table,
    write_area_csv,
    write_mask_geojson,
    write_mask_tiff,
)
from hisynseg.inference.resume import (
    PROGRESS_SUFFIX,
    SlideProgress,
    adopt_progress,
    discard_progress,
    find_saved_progress,
    fingerprint,
    has_progress,
)
from hisynseg.inference.scratch import (
    StaleScratch,
    claim_ended_scratch,
    remove_scratch,
    resumable_folder,
    scratch_folder,
    scratch_size,
)
from hisynseg.inference.tile_loading import (
    LOADER_KINDS,
    ReaderPool,
    processes_may_pay,
)
from hisynseg.inference.tissue import TissueDetector
from hisynseg.inference.wsi import (
    BLEND_MODES,
    PredictionError,
    default_workers,
    plan_tiles,
    predict_slide,
    runs_on_accelerator,
)
from hisynseg.slides.base import read_thumbnail
from hisynseg.slides.open import IMAGE_SUFFIXES, SLIDE_SUFFIXES, open_slide

__all__ = [
    "OUTPUT_SUFFIXES",
    "InputResult",
    "PredictOptions",
    "check_out_dir",
    "output_names",
    "predict_file",
    "predict_inputs",
    "versions",
]

log = logging.getLogger(__name__)

MASK_FORMATS = ("auto", "png", "tiff")
# How the names of the outputs (:func:`output_paths`) end: a folder of inputs that is
# also the output folder holds them beside the inputs, and they are no inputs.
OUTPUT_SUFFIXES = (".mask.png", ".mask.tif", ".overlay.png", ".areas.csv", ".geojson", ".probs.npy")
# Least seconds between two rewrites of predict.json while a run goes on.
RECORD_EVERY_SECONDS = 2.0


# Options that change the pixels of an input's outputs: existing outputs made with other
# values (or another model or input) are not skipped as done.
OUTPUT_SETTINGS = (
    "tile",
    "overlap",
    "target_mpp",
    "mpp",
    "output_downsample",
    "max_output_pixels",
    "blend",
    "tissue_detection",
    "min_tissue",
    "max_tiles",
)


@dataclass(frozen=True)
class PredictOptions:
    """Settings of a prediction run (all recorded in ``predict.json``).

    Attributes:
        tile: Tile side in model pixels.
        overlap: Overlap of neighbouring tiles in model pixels.
        batch_size: Tiles per network call.
        target_mpp: Resolution the network runs at (µm/px), ``None`` = native.
        mpp: The inputs' level-0 resolution, overriding what the files record.
        output_downsample: Model pixels per output pixel; ``None`` = automatic.
        max_output_pixels: Cap on the output canvas for the automatic downsample.
        blend: Weighting of overlapping tiles (``gaussian``, ``cosine``, ``constant``).
        tissue_detection: Skip glass tiles and mark glass pixels as background.
        min_tissue: Least tissue share for a tile to be predicted.
        mask_format: ``auto`` (PNG for pictures, pyramidal TIFF otherwise), ``png``, ``tiff``.
        save_probs: Also write the probabilities (``NAME.probs.npy``).
        geojson: Write the QuPath GeoJSON.
        overlay_max_side: Longer side of the overlay image.
        geojson_max_pixels: Outline a mask larger than this from a reduced copy.
        overwrite: Predict inputs whose outputs already exist.
        max_tiles: Stop each input after this many tiles (quick checks).
        progress: Progress bar over each input's tiles.
        workers: Threads or processes reading and decoding tiles ahead of the network;
            ``None``: one per CPU core, at most eight.
        tile_loader: ``auto``, ``threads`` or ``processes``: what reads the tiles
            (:func:`hisynseg.inference.tile_loading.choose_loader`).
        progress_every: Seconds between two saves of a slide's progress, which an
            interrupted prediction resumes from (with a model key; see
            :func:`predict_file`).
        resume: Go on from a slide's saved progress (``False``: delete it and predict
            from the first tile; progress is still saved).
    """

    tile: int = 512
    overlap: int = 64
    batch_size: int = 8
    target_mpp: float | None = None
    mpp: float | None = None
    output_downsample: int | None = None
    max_output_pixels: int = 2**26
    blend: str = "gaussian"
    tissue_detection: bool = True
    min_tissue: float = 0.02
    mask_format: str = "auto"
    save_probs: bool = False
    geojson: bool = True
    overlay_max_side: int = 2048
    geojson_max_pixels: int = 2**26
    overwrite: bool = False
    max_tiles: int | None = None
    progress: bool = True
    workers: int | None = None
    tile_loader: str = "auto"
    progress_every: float = 60.0
    resume: bool = True

    def check(self) -> None:
        """Raise :class:`PredictionError` for values that cannot work."""
        if self.tile < 16 or not 0 <= self.overlap < self.tile:
            raise PredictionError(
                f"need a tile of at least 16 px and 0 <= overlap < tile; got tile "
                f"{self.tile}, overlap {self.overlap}"
            )
        if self.batch_size < 1:
            raise PredictionError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise PredictionError(f"need at least one tile reader, got {self.workers}")
        if self.tile_loader not in LOADER_KINDS:
            raise PredictionError(
                f"unknown tile loader {self.tile_loader!r}; expected one of "
                + ", ".join(LOADER_KINDS)
            )
        for name in ("target_mpp", "mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise PredictionError(f"{name} must be a positive number of µm/px, got {value}")
        if self.blend not in BLEND_MODES:
            raise PredictionError(f"unknown blending {self.blend!r}")
        if not self.progress_every >= 0:
            raise PredictionError(
                f"progress_every must be a number of seconds >= 0, got {self.progress_every}"
            )
        if self.mask_format not in MASK_FORMATS:
            raise PredictionError(f"unknown mask format {self.mask_format!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise PredictionError(f"min_tissue must lie in [0, 1], got {self.min_tissue}")
        d = self.output_downsample
        if d is not None and (d < 1 or self.tile % d or self.overlap % d):
            raise PredictionError(
                f"the output downsample ({d}) must divide the tile ({self.tile}) and the "
                f"overlap ({self.overlap})"
            )


@dataclass
class InputResult:
    """The outcome for one input: ``status`` is ``ok``, ``skipped`` or ``failed``."""

    input: str
    name: str
    status: str
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, Any]:
    """Versions of Python, hisynseg and the libraries a prediction may use."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("hisynseg", "torch", "numpy", "opencv-python-headless", "tifffile"):
        out[name] = _version(name)
    for name in ("onnxruntime", "openslide-python", "openslide-bin"):
        out[name] = _version(name)
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _stem(path: Path) -> str:
    """The file's stem, without the ``.ome`` of an OME-TIFF (``x.ome.tif``: ``x``)."""
    stem = path.stem
    if path.suffix.lower() in (".tif", ".tiff") and stem.lower().endswith(".ome"):
        stem = stem[: -len(".ome")]
    return stem or path.stem


def output_names(inputs: Sequence[Path]) -> list[str]:
    """Output base names, one per input and no two alike.

    Each file's stem (:func:`_stem`); where that is another input's too, its whole name
    (``x.png``, ``x.tif``); where that is too, its folder's name and stem (``a_x`` for
    ``a/x.png``, ``b_x`` for ``b/x.png``); where even that is, a counter (``a_x_2``).
    Names are compared ignoring case, as macOS and Windows file systems do. An input's
    name depends only on the other inputs, not on their order (but for the counter).
    """
    candidates = [
        (_stem(p), p.name, f"{p.absolute().parent.name}_{_stem(p)}".lstrip("_")) for p in inputs
    ]
    level = [0] * len(candidates)
    while True:
        names = [c[i] for c, i in zip(candidates, level, strict=True)]
        counts = Counter(n.casefold() for n in names)
        # Every input of a clash moves to its next candidate, so that which of them keeps
        # the name does not depend on the order of the inputs.
        clashing = [
            k
            for k, n in enumerate(names)
            if counts[n.casefold()] > 1 and level[k] < len(candidates[k]) - 1
        ]
        if not clashing:
            break
        for k in clashing:
            level[k] += 1
    taken = {n.casefold() for n in names}
    seen: set[str] = set()
    for k, name in enumerate(names):
        if name.casefold() in seen:
            count = 2
            while f"{name}_{count}".casefold() in taken:
                count += 1
            names[k] = f"{name}_{count}"
            taken.add(names[k].casefold())
        seen.add(names[k].casefold())
    return names


def _recorded_names(
    paths: Sequence[Path], names: list[str], made_by: dict[str, dict[str, Any]]
) -> list[str]:
    """``names``, but an input the folder already holds outputs of keeps the name they
    have, where no other input takes it: outputs written under an earlier naming rule
    (``x.ome`` for ``x.ome.tif``, say) are then skipped, not made again beside the old."""
    recorded: dict[str, str] = {}
    for name, maker in made_by.items():
        recorded.setdefault(str(maker.get("input")), name)
    out = list(names)
    for k, path in enumerate(paths):
        try:
            name = recorded.get(str(path.resolve()))
        except OSError:
            continue
        if name is None or name == out[k]:
            continue
        if all(name.casefold() != other.casefold() for j, other in enumerate(out) if j != k):
            out[k] = name
    return out


def _mask_suffix(path: Path, options: PredictOptions) -> str:
    if options.mask_format == "png":
        return ".png"
    if options.mask_format == "tiff":
        return ".tif"
    return ".png" if path.suffix.lower() in IMAGE_SUFFIXES else ".tif"


def output_paths(path: Path, name: str, out_dir: Path, options: PredictOptions) -> dict[str, Path]:
    """The files one input produces, by kind."""
    paths = {
        "mask": out_dir / f"{name}.mask{_mask_suffix(path, options)}",
        "overlay": out_dir / f"{name}.overlay.png",
        "areas": out_dir / f"{name}.areas.csv",
    }
    if options.geojson:
        paths["geojson"] = out_dir / f"{name}.geojson"
    if options.save_probs:
        paths["probs"] = out_dir / f"{name}.probs.npy"
    return paths


def _fit(
    width: int, height: int, max_pixels: float, max_side: float | None = None
) -> tuple[int, int]:
    """``(w, h)`` shrunk (never enlarged) to at most ``max_pixels`` and ``max_side``."""
    f = 1.0
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
    if max_side is not None and max(width, height) * f > max_side:
        f = max_side / max(width, height)
    return max(1, int(width * f)), max(1, int(height * f))


def _lap(times: dict[str, float], key: str, since: float) -> float:
    """Record the seconds since ``since`` under ``key``; return now."""
    now = time.perf_counter()
    times[key] = round(now - since, 3)
    return now


def _input_identity(path: Path) -> list[Any]:
    """``[resolved path, size, mtime_ns]``: what tells a version of an input file from
    another (the file replaced at the same path)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _progress_fingerprint(
    path: Path, name: str, options: PredictOptions, plan: dict[str, Any], model_key: str
) -> str:
    """What a saved progress of this prediction must have been saved with."""
    settings = ("tile", "overlap", "target_mpp", "mpp", "blend", "tissue_detection")
    settings += ("min_tissue", "max_tiles", "save_probs")
    return fingerprint(
        input=_input_identity(path),
        name=name,
        model=model_key,
        options={k: getattr(options, k) for k in settings},
        plan=plan,
        hisynseg=_version("hisynseg"),
    )


def _open_canvases(
    scratch: Path,
    name: str,
    size: tuple[int, int],
    num_classes: int,
    options: PredictOptions,
    adopted: tuple[SlideProgress, Path] | None,
) -> tuple[DiskCanvas, DiskCanvas | None, SlideProgress | None]:
    """The mask and probability canvases in ``scratch``: those of adopted progress (and
    the progress) when they are intact, new ones otherwise."""
    mask_path = scratch / f"{name}.mask.raw"
    probs_path = scratch / f"{name}.probs.npy"
    probs_shape = (*size, num_classes)
    if adopted is not None:
        try:
            mask = DiskCanvas.open(mask_path, size, np.uint8)
            probs = None
            if options.save_probs:
                probs = DiskCanvas.open(probs_path, probs_shape, np.float16, npy=True)
            return mask, probs, adopted[0]
        except (OSError, ValueError) as exc:
            log.warning("%s; predicting from the start", exc)
    # Progress must never sit beside canvases it does not describe, not even for the
    # moment before the new ones are made.
    (scratch / f"{name}{PROGRESS_SUFFIX}").unlink(missing_ok=True)
    mask = DiskCanvas.create(mask_path, size, np.uint8)
    probs = None
    if options.save_probs:
        probs = DiskCanvas.create(probs_path, probs_shape, np.float16, npy=True)
    return mask, probs, None


def predict_file(
    path: str | os.PathLike[str],
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    labels: ClassLabels,
    out_dir: str | os.PathLike[str],
    options: PredictOptions,
    name: str | None = None,
    reader_pool: ReaderPool | None = None,
    model_key: str | None = None,
    saved_progress: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Predict one image or slide and write its outputs.

    With a ``model_key``, the tile loop's progress is saved every minute in the
    prediction's scratch folder and kept when the prediction is interrupted, and a
    prediction of the same input into the same folder with the same model key, options
    and tile plan goes on from there (:mod:`hisynseg.inference.resume`).

    Args:
        path: The input file.
        predict: Backend: ``B×T×T×3`` ``uint8`` → ``B×C×T×T`` probabilities.
        num_classes: ``C``.
        labels: Names, palette and background index of the classes.
        out_dir: Output folder.
        options: Settings.
        name: Output base name (default: the file's stem).
        reader_pool: Tile reader processes kept for the whole run (when the slide is
            read with processes).
        model_key: What identifies the model and how it is run (e.g. the checkpoint file
            and TTA); ``None``: no progress is saved or resumed (nor where file locks are
            missing: Windows, some network file systems).
        saved_progress: The folders of ended predictions holding progress of this input
            (:func:`~hisynseg.inference.resume.find_saved_progress`, of folders this
            process has claimed); ``None``: claim and look in ``out_dir``.

    Returns:
        Details: the tile plan, tile counts, timings, output paths.

    Raises:
        SlideReadError, ImageReadError: The input cannot be read.
        MissingMPPError: A target resolution without a known slide resolution.
        Exception: Whatever else goes wrong; no partial output is left under a final name.
    """
    path, out_dir = Path(path), Path(out_dir)
    name = name or path.stem
    paths = output_paths(path, name, out_dir, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = open_slide(path)
    with contextlib.ExitStack() as stack:
        stack.callback(reader.close)
        plan = plan_tiles(
            reader,
            tile=options.tile,
            overlap=options.overlap,
            target_mpp=options.target_mpp,
            mpp=options.mpp,
            output_downsample=options.output_downsample,
            max_output_pixels=options.max_output_pixels,
        )
        wo, ho = plan.output_size
        tissue = TissueDetector.fit(reader) if options.tissue_detection else None
        if tissue is not None and not tissue.mask.any():
            log.warning(
                "%s: tissue detection found no tissue (it looks for stained, coloured "
                "pixels; a greyscale or unstained image has none), so all of it is "
                "background; --no-tissue-detection predicts every tile",
                path,
            )
        scratch = stack.enter_context(scratch_folder(out_dir, keep=has_progress))
        expected = None
        if model_key is not None and resumable_folder(scratch):  # else no run could adopt it
            expected = _progress_fingerprint(path, name, options, plan.to_dict(), model_key)
        adopted = None
        if expected is not None:
            if saved_progress is None:
                claims = stack.enter_context(claim_ended_scratch(out_dir))
                saved_progress = find_saved_progress(claims.folders).get(name, [])
                claims.release([f for f in claims.folders if f not in saved_progress])
            if options.resume:
                adopted = adopt_progress(saved_progress, name, expected, scratch)
            else:
                discard_progress(saved_progress)
        mask, probs, resume = _open_canvases(scratch, name, (ho, wo), num_classes, options, adopted)
        progress_file = scratch / f"{name}{PROGRESS_SUFFIX}"
        if resume is not None and adopted is not None:
            log.info("%s: resuming at tile %d (progress of %s)", path, resume.next_tile, adopted[1])
        save_progress = None
        if expected is not None:

            def save_progress(progress: SlideProgress) -> None:
                # The rows the progress says are written must reach the disk before it
                # does: after a machine crash it would otherwise claim rows that are lost.
                mask.sync()
                if probs is not None:
                    probs.sync()
                progress.fingerprint = expected
                progress.save(progress_file)

        stats = predict_slide(
            reader,
            predict,
            plan,
            num_classes,
            labels.background_index,
            mask,
            probs,
            batch_size=options.batch_size,
            blend=options.blend,
            tissue=tissue,
            min_tissue=options.min_tissue,
            max_tiles=options.max_tiles,
            progress=options.progress,
            description=path.name,
            workers=options.workers,
            tile_loader=options.tile_loader,
            reader_pool=reader_pool,
            resume=resume,
            save_progress=save_progress,
            progress_every=options.progress_every,
        )
        t0 = time.perf_counter()
        breakdown: dict[str, float] = {}
        lap = t0
        if paths["mask"].suffix == ".png":
            write_mask_png(paths["mask"], mask.read_all(), labels.palette)
            levels = 1
        else:
            levels = write_mask_tiff(
                paths["mask"], mask, labels.palette, mpp=plan.output_mpp, temp_dir=scratch
            )
        lap = _lap(breakdown, "mask", lap)
        ow, oh = _fit(wo, ho, math.inf, options.overlay_max_side)
        small = mask.resample_nearest(ow, oh)
        thumb = read_thumbnail(reader, (ow, oh))
        write_rgb_png(
            paths["overlay"],
            overlay_mask(thumb, small, labels.palette, skip_index=labels.background_index),
        )
        lap = _lap(breakdown, "overlay", lap)
        rows = area_table(stats.counts, labels, plan.output_mpp, plan.level0_per_output)
        write_area_csv(paths["areas"], rows)
        if options.geojson:
            gw, gh = _fit(wo, ho, options.geojson_max_pixels)
            gmask = mask.read_all() if (gw, gh) == (wo, ho) else mask.resample_nearest(gw, gh)
            f = plan.level0_per_output
            write_mask_geojson(
                paths["geojson"], gmask, labels, (f * wo / gw, f * ho / gh), temp_dir=scratch
            )
            _lap(breakdown, "geojson", lap)
        if probs is not None:
            os.replace(probs.path, paths["probs"])
        write_seconds = time.perf_counter() - t0
    return {
        "size": list(reader.dimensions),
        "levels": len(reader.level_dimensions),
        "mpp": reader.mpp,
        "plan": plan.to_dict(),
        **stats.to_dict(),
        "mask_levels": levels,
        "write_seconds": round(write_seconds, 3),
        "write_breakdown": breakdown,
        "areas": rows,
        "outputs": {k: str(v) for k, v in paths.items()},
    }


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Make the output folder (with its parents) and check that files can be made in it.

    Meant to be called before the model is loaded, so that a folder that cannot be used
    is said at once, in a line.

    Returns:
        The folder.

    Raises:
        PredictionError: A file is there, the folder cannot be made, or no file can be
            made in it (read-only, no permission, a full disk).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictionError(f"--out {out_dir}: not a folder (a file is there)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictionError(
            f"--out {out_dir}: cannot make the folder ({exc.strerror or exc})"
        ) from None
    # Permissions alone do not tell (a read-only file system, ACLs, root): try a file, as
    # predict.json and every output are written.
    try:
        fd, probe = tempfile.mkstemp(prefix=".hisynseg-probe.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PredictionError(
            f"--out {out_dir}: cannot write in it ({exc.strerror or exc})"
        ) from None
    return out_dir


def predict_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    labels: ClassLabels,
    out_dir: str | os.PathLike[str],
    options: PredictOptions,
    run_info: dict[str, Any] | None = None,
    report: Callable[[InputResult], None] | None = None,
    model_key: str | None = None,
) -> list[InputResult]:
    """Predict every input, going on past failures; keep ``out_dir/predict.json`` current.

    Args:
        inputs: Files (see :func:`hisynseg.slides.list_inputs` for folders).
        predict: The backend.
        num_classes: Its number of classes.
        labels: Class names and colours.
        out_dir: Output folder.
        options: Settings.
        run_info: Extra entries for ``predict.json`` (checkpoint, backend, ...).
        report: Called with each input's result as soon as it is known.
        model_key: What identifies the model and how it is run; with it, slides save
            their progress and an interrupted prediction resumes
            (see :func:`predict_file`).

    Returns:
        One result per input, in order.
    """
    from tqdm.auto import tqdm

    options.check()
    out_dir = check_out_dir(out_dir)
    paths = [Path(p) for p in inputs]
    results: list[InputResult] = []
    header = {
        **(run_info or {}),
        "options": asdict(options),
        "labels": {
            "classes": list(labels.names),
            "palette": [list(c) for c in labels.palette],
            "background_index": labels.background_index,
        },
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record = _RunRecord(out_dir / "predict.json", header, len(paths))
    names = _recorded_names(paths, output_names(paths), record.made_by)
    settings = {k: getattr(options, k) for k in OUTPUT_SETTINGS}

    def predict_one(path: Path, name: str, reader_pool: ReaderPool | None) -> InputResult:
        expected = output_paths(path, name, out_dir, options)
        start = time.perf_counter()
        maker = _maker(path, model_key, settings)
        earlier = record.made_by.get(name)
        if not options.overwrite and all(p.is_file() for p in expected.values()):
            differ = [] if earlier is None else _maker_differences(earlier, maker)
            if differ:
                result = InputResult(
                    str(path),
                    name,
                    "failed",
                    error=f"{expected['mask']}: outputs exist, made from {' and '.join(differ)} "
                    "(see predict.json); use --overwrite to replace them, or a new --out",
                )
            else:
                result = InputResult(
                    str(path), name, "skipped", {k: str(v) for k, v in expected.items()}
                )
                result.details["reason"] = "outputs exist (use --overwrite to predict again)"
            # Progress left for finished outputs could never be resumed.
            discard_progress(resumable.get(name, []))
        else:
            try:
                details = predict_file(
                    path,
                    predict,
                    num_classes,
                    labels,
                    out_dir,
                    options,
                    name,
                    reader_pool,
                    model_key=model_key,
                    saved_progress=resumable.get(name, []),
                )
                result = InputResult(str(path), name, "ok", details.pop("outputs"), details=details)
                record.made_by[name] = maker
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                message = (
                    str(exc) if isinstance(exc, HisynsegError) else f"{type(exc).__name__}: {exc}"
                )
                if str(path) not in message:
                    message = f"{path}: {message}"
                log.debug("%s failed:\n%s", path, traceback.format_exc())
                result = InputResult(str(path), name, "failed", error=message)
        result.seconds = round(time.perf_counter() - start, 3)
        return result

    with claim_ended_scratch(out_dir) as claims:
        # The progress of this run's inputs stays claimed (locked) for the whole run, so
        # that no other run resumes or deletes it meanwhile; the rest is let go at once.
        resumable = find_saved_progress(claims.folders)
        with_progress = {f for folders in resumable.values() for f in folders}
        removed = remove_scratch([f for f in claims.folders if f not in with_progress])
        claims.release([r.path for r in removed])
        _report_scratch(out_dir, resumable, names, removed)
        claims.release([f for n, fs in resumable.items() if n not in names for f in fs])
        record.save()
        # Reader processes, when they will be wanted, start now: their imports then overlap
        # the first slide's opening and tissue detection, and they serve every slide.
        reader_pool = start_reader_pool(paths, predict, options)
        bar = tqdm(
            total=len(paths),
            desc="inputs",
            unit="input",
            disable=not options.progress or len(paths) < 2,
        )
        try:
            for path, name in zip(paths, names, strict=True):
                result = predict_one(path, name, reader_pool)
                results.append(result)
                if report is not None:
                    report(result)
                record.add(result)
                bar.update()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or broken: the record shows every input done.
            with contextlib.suppress(Exception):
                record.save()
            raise
        finally:
            bar.close()
            if reader_pool is not None:
                reader_pool.close()
    record.save(finished=True)
    return results


def _report_scratch(
    out_dir: Path,
    resumable: dict[str, list[Path]],
    names: Sequence[str],
    removed: Sequence[StaleScratch],
) -> None:
    """Log the scratch folders of ended predictions: removed, or kept for inputs of
    other runs."""
    for other in sorted(set(resumable) - set(names)):
        for folder in resumable[other]:
            log.warning(
                "%s holds %.1f MiB of progress of an interrupted prediction of %s: "
                "predicting it again into %s resumes it (or delete the folder)",
                folder,
                scratch_size(folder) / 2**20,
                other,
                out_dir,
            )
    for stale in removed:
        log.warning(
            "removed %s: %.1f MiB of temporary files left by an earlier prediction "
            "(process %s) that was killed",
            stale.path,
            stale.size / 2**20,
            stale.pid,
        )


def _maker(path: Path, model_key: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What outputs of ``path`` are made from, as ``predict.json`` records it under
    ``outputs``: the input (path, size, modification time), model and settings."""
    try:
        resolved, size, mtime_ns = _input_identity(path)
    except OSError:
        # A missing input: its outputs, if any, are judged by its path (predicting it
        # fails and says why).
        resolved, size, mtime_ns = str(path.resolve()), None, None
    return {
        "input": resolved,
        "input_size": size,
        "input_mtime_ns": mtime_ns,
        "model": model_key,
        "settings": settings,
    }


def _maker_differences(earlier: dict[str, Any], maker: dict[str, Any]) -> list[str]:
    """How the outputs ``earlier`` describes were made otherwise than ``maker`` would make
    them (empty: the same way)."""
    differ = []
    if earlier.get("input") != maker["input"]:
        differ.append(f"another input ({earlier.get('input')})")
    else:
        # Records written before sizes and times were recorded name the path only; they
        # are taken at their word, as they always were.
        then = {k: earlier.get(k) for k in ("input_size", "input_mtime_ns")}
        now = {k: maker[k] for k in ("input_size", "input_mtime_ns")}
        known = [k for k in then if then[k] is not None and now[k] is not None]
        if any(then[k] != now[k] for k in known):
            if then["input_size"] != now["input_size"]:
                was = f"size {then['input_size']} then, {now['input_size']} now"
            else:
                was = _modified(then["input_mtime_ns"], now["input_mtime_ns"])
            differ.append(f"another version of this input ({was})")
    if earlier.get("model") != maker["model"]:
        differ.append(_model_difference(earlier.get("model"), maker["model"]))
    if earlier.get("settings") != maker["settings"]:
        then_now = _then_now(earlier.get("settings"), maker["settings"])
        differ.append(f"other options ({then_now})")
    return differ


def _modified(then: Any, now: Any) -> str:
    """``modified T1 then, T2 now`` of two modification times in nanoseconds, to the
    second unless they share it."""

    def when(ns: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))

    if not (isinstance(then, int) and isinstance(now, int)):
        return f"modified {then!r} then, {now!r} now"
    if when(then) == when(now):
        return f"modified {then} then, {now} now (ns)"
    return f"modified {when(then)} then, {when(now)} now"


def _model_difference(old: Any, new: Any) -> str:
    """Say whether another model made outputs, or the same one run another way (TTA...)."""
    try:
        then, now = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return "another model"
    same = isinstance(then, dict) and isinstance(now, dict)
    if not same or then.get("model_sha256") != now.get("model_sha256"):
        return "another model"
    return f"the same model run another way ({_then_now(then.get('run'), now.get('run'))})"


def _then_now(old: Any, new: Any) -> str:
    """``key old then, new now`` for each setting that differs."""
    return ", ".join(
        f"{key} {then!r} then, {now!r} now"
        for key, then, now in leaf_differences(old or {}, new or {})
    )


def _read_made_by(path: Path) -> dict[str, dict[str, Any]]:
    """The ``outputs`` index of an earlier ``predict.json`` (empty if there is none)."""
    if not path.is_file():
        return {}
    try:
        made_by = json.loads(path.read_text(encoding="utf-8")).get("outputs") or {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); the outputs it described are not checked", path, exc)
        return {}
    return {str(k): v for k, v in made_by.items() if isinstance(v, dict)}


class _RunRecord:
    """``predict.json`` of a run, kept current as inputs finish.

    Rewriting the whole record after every input would cost time in proportion to the
    inputs done so far, hours over a folder of ten thousand patches; so each input's
    entry is made once, and the file is rewritten at most every
    :data:`RECORD_EVERY_SECONDS` (and never more often than ten times what writing it
    took), at the end, and when the run is interrupted.
    """

    def __init__(self, path: Path, header: dict[str, Any], inputs: int) -> None:
        self.path, self.header, self.inputs = path, header, inputs
        self.entries: list[dict[str, Any]] = []
        # Output name -> the input, model and settings its outputs were made from, over
        # every run into the folder (an earlier run's record is read back).
        self.made_by: dict[str, dict[str, Any]] = _read_made_by(path)
        self.counts = dict.fromkeys(("ok", "skipped", "failed"), 0)
        self.saved_at = -math.inf
        self.save_seconds = 0.0

    def add(self, result: InputResult) -> None:
        self.entries.append(asdict(result))
        self.counts[result.status] += 1
        since = time.perf_counter() - self.saved_at
        if since >= max(RECORD_EVERY_SECONDS, 10 * self.save_seconds):
            self.save()

    def save(self, finished: bool = False) -> None:
        start = time.perf_counter()
        atomic_write_json(
            self.path,
            {
                **self.header,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z") if finished else None,
                "summary": {"inputs": self.inputs, "done": len(self.entries), **self.counts},
                "inputs": self.entries,
                "outputs": self.made_by,
            },
        )
        self.saved_at = time.perf_counter()
        self.save_seconds = self.saved_at - start


def start_reader_pool(
    paths: Sequence[Path], predict: Any, options: PredictOptions
) -> ReaderPool | None:
    """Tile reader processes for a run, started, or ``None`` when no input will use them.

    They are started for ``tile_loader="processes"``, and for ``auto`` when the network
    runs on an accelerator with at least
    :data:`~hisynseg.inference.tile_loading.MIN_WORKERS_FOR_PROCESSES` readers; in both
    cases only if some input is a TIFF or slide file (pictures are read with threads).
    Each slide still chooses for itself (:func:`~hisynseg.inference.tile_loading.
    choose_loader`).
    """
    workers = default_workers() if options.workers is None else options.workers
    if not processes_may_pay(options.tile_loader, runs_on_accelerator(predict), workers):
        return None
    if not any(p.suffix.lower() in SLIDE_SUFFIXES for p in paths):
        return None
    return ReaderPool(workers).start()
