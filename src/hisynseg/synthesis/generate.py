"""Writing a synthesized set: deterministic per-index generation, workers, resume, manifest.

Layout of an output folder ``out/``::

    img/<name>.png       RGB image
    mask/<name>.png      indexed ("P") mask with the dataset's palette
    labels.csv           image-level labels (generic datasets only, whose names carry none)
    manifest.csv         per image: index, file name, label, sources, seed, draw, score
    synthesis.json       dataset, method, seed, resolved parameters, package versions;
                         ``num``: images held (manifest rows), ``requested``: last --num
    .journal.jsonl       resume state (one JSON line per finished image)

``<name>`` is ``spec.format_name(f"{method}_{index:06d}", label)``, so the label is in the
file name in the dataset's own encoding and :func:`hisynseg.datasets.layouts.list_synthetic`
reads the folder back like training data.

Determinism: draw ``j`` uses ``np.random.default_rng([seed, method_id, j])`` and nothing
else, so every image is byte-identical whatever the number of workers, the order in which
they finish, or how often the run was interrupted. Without a filter, image ``i`` is draw
``i``. With a filter (``keep``), draws are made in order and the ``k``-th kept draw becomes
image ``k``; the result is deterministic as long as ``keep`` is. Filtered draws come from
their own stream, ``default_rng([seed, method_id, j, 1])``: the filter's discriminator was
trained on the unfiltered draws of the same seed, and filtering must judge fresh images
(METHOD §4), not the ones it learnt to call fake.

Resume: a re-run with the same settings writes only what is missing (an image is complete
when both its ``img`` and ``mask`` files exist, matched by the ``{method}_{index:06d}``
prefix) and leaves complete images untouched. A re-run with different settings (dataset,
method, seed, parameters, PNG level, filter, or the set of source files) into the same
folder is refused. Every file is written atomically, except the journal, which is only
appended to (a line cut short by an interruption is ignored on resume) and is rewritten
atomically at the end of a run.

Filtering hook: ``keep`` receives batches of generated samples and says which to keep
(see :class:`KeepFunction`); the discriminator of METHOD.md §4 plugs in here. Scores are
recorded in the manifest, the acceptance rate in the summary and ``synthesis.json``, and
the run stops after ``max_draws`` draws, keeping what it made.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from hisynseg import __version__
from hisynseg.config import leaf_differences
from hisynseg.datasets.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    encode_mask_png,
    encode_rgb_png,
    is_atomic_temp,
)
from hisynseg.datasets.labels import label_to_str, write_label_csv
from hisynseg.datasets.layouts import SYNTHETIC_LABELS_FILE
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.synthesis.bezier import BezierParams, bezier, check_sources
from hisynseg.synthesis.mosaic import MosaicParams, mosaic
from hisynseg.synthesis.pool import SourcePool, SynthesisError, Synthesized

__all__ = [
    "METHODS",
    "MANIFEST_FILE",
    "PNG_STRATEGIES",
    "SETTINGS_FILE",
    "JOURNAL_FILE",
    "KeepFunction",
    "SynthesisSummary",
    "SynthesisParams",
    "default_params",
    "encode_image_png",
    "generate_one",
    "sample_name",
    "synthesize",
]

log = logging.getLogger(__name__)

# Method name -> the id mixed into every draw's seed (never change: it fixes the output).
METHODS: dict[str, int] = {"mosaic": 1, "bezier": 2}
# Draw streams: appended to a filtered run's seed words (never 0: SeedSequence pads short
# entropy with zeros, so an appended 0 would give the plain stream again).
PLAIN_STREAM = 0
FILTERED_STREAM = 1
MANIFEST_FILE = "manifest.csv"
SETTINGS_FILE = "synthesis.json"
JOURNAL_FILE = ".journal.jsonl"
MANIFEST_COLUMNS = ("index", "image", "label", "sources", "seed", "draw", "score")
# Bump when a change to the synthesis alters its output for the same settings.
FORMAT_VERSION = 1
# How the RGB images are encoded. Histology texture defeats LZ77 string matching, so "rle"
# (OpenCV's encoder with zlib's run-length strategy) makes files about as small as zlib's
# default strategy (PIL's encoder, what the reference used: "default") in about a third of
# the time, and smaller ones for flat images. The pixels are the same either way.
# (A fixed "Sub" row filter would be faster still, but ~10 % larger on tissue.)
PNG_STRATEGIES = ("rle", "default")

SynthesisParams = MosaicParams | BezierParams


class KeepFunction(Protocol):
    """A filter deciding which generated samples to keep (e.g. the discriminator of §4).

    Called with a batch: ``images`` ``B×H×W×3`` ``uint8``, ``masks`` ``B×H×W`` ``uint8``,
    ``labels`` ``B×C`` ``uint8``. Returns ``B`` booleans (keep or not), or ``B`` scores
    (e.g. p(real)); scores above the threshold are kept and recorded in the manifest.
    An optional ``description`` attribute (str) identifies the filter in ``synthesis.json``
    and in the settings a resumed run must match.
    """

    def __call__(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> Any: ...


@dataclass
class SynthesisSummary:
    """What :func:`synthesize` did.

    Attributes:
        out: The output folder.
        method: ``"mosaic"`` or ``"bezier"``.
        requested: Images asked for.
        written: Images written by this run.
        skipped: Images already present (complete) and left untouched.
        failed: ``(draw, message)`` of every draw that failed.
        seconds: Wall time of the run (pool building included).
        draws: Filtered runs: draws made in total (all runs of this folder).
        kept: Filtered runs: images kept in total.
        stopped: A message when the run stopped before reaching ``requested`` (filter's
            ``max_draws`` reached), else ``None``.
    """

    out: Path
    method: str
    requested: int
    written: int = 0
    skipped: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    draws: int | None = None
    kept: int | None = None
    stopped: str | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Kept / drawn for filtered runs (``None`` without a filter or before any draw)."""
        if self.draws is None or not self.draws:
            return None
        return (self.kept or 0) / self.draws

    @property
    def complete(self) -> int:
        """Images present in the folder after the run, up to ``requested``."""
        return self.written + self.skipped


def default_params(method: str, spec: DatasetSpec | None = None) -> SynthesisParams:
    """The paper's settings of ``method`` for ``spec``'s dataset.

    Mosaic: ``mosaic_2_112``. Bézier: ``bezier224_5_0.2_0.05`` with random class pairs,
    except WSSS4LUAD, whose recipe pastes tumor and stroma onto each other only.
    """
    if method == "mosaic":
        return MosaicParams()
    if method == "bezier":
        if spec is not None and spec.name == "wsss4luad":
            return BezierParams(pairs=((0, 1), (1, 0)))
        return BezierParams()
    raise SynthesisError(f"unknown synthesis method {method!r}; expected one of {list(METHODS)}")


def generate_one(
    pool: SourcePool,
    method: str,
    params: SynthesisParams,
    seed: int,
    draw: int,
    stream: int = PLAIN_STREAM,
) -> Synthesized:
    """Draw number ``draw`` of ``method``: a pure function of ``(seed, method, draw, stream)``.

    ``stream`` is :data:`PLAIN_STREAM` for unfiltered sets and :data:`FILTERED_STREAM` for
    filtered ones, so the two never share a draw.
    """
    words = [seed, METHODS[method], draw]
    if stream != PLAIN_STREAM:
        words.append(stream)
    rng = np.random.default_rng(words)
    if method == "mosaic":
        assert isinstance(params, MosaicParams)
        return mosaic(pool, rng, params)
    assert isinstance(params, BezierParams)
    return bezier(pool, rng, params)


def encode_image_png(image: np.ndarray, compress_level: int = 6, strategy: str = "rle") -> bytes:
    """An ``H×W×3`` RGB image as PNG bytes (see :data:`PNG_STRATEGIES`)."""
    if strategy == "default":
        return encode_rgb_png(image, compress_level)
    if strategy != "rle":
        raise SynthesisError(f"png strategy must be one of {PNG_STRATEGIES}, not {strategy!r}")
    flags = [
        cv2.IMWRITE_PNG_COMPRESSION,
        compress_level,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    # OpenCV encodes BGR.
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), flags)
    if not ok:
        raise SynthesisError(f"PNG encoding of a {image.shape} image failed")
    return buf.tobytes()


def sample_name(spec: DatasetSpec, method: str, index: int, label: np.ndarray) -> str:
    """File name of output image ``index``: the label in the dataset's encoding."""
    return spec.format_name(f"{method}_{index:06d}", label)


# ------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class _Job:
    """What a worker needs besides the pool (small, picklable)."""

    spec: DatasetSpec
    method: str
    params: SynthesisParams
    seed: int
    out: Path
    compress_level: int
    png_strategy: str
    stream: int = PLAIN_STREAM


# The worker's (job, pool): set in the parent before forking (inherited copy-on-write), or
# by the initializer under spawn.
_STATE: tuple[_Job, SourcePool] | None = None
# Why a spawned worker could not set itself up (reported by every task it is given: an
# initializer that raises would make multiprocessing respawn workers forever).
_INIT_ERROR: str | None = None


def _init_worker(job: _Job | None, pool: SourcePool | None, root: Path | None) -> None:
    global _STATE, _INIT_ERROR
    if job is None:  # fork: state and OpenCV's thread setting are inherited
        return
    # Spawned: one OpenCV thread per process, the processes are the parallelism.
    cv2.setNumThreads(1)
    try:
        if pool is None:
            assert root is not None
            pool = SourcePool.build(root, job.spec, workers=1, progress=False)
        _STATE = (job, pool)
    except Exception as exc:
        _INIT_ERROR = f"worker could not load the sources: {type(exc).__name__}: {exc}"


def _make(draw: int) -> tuple[Synthesized, np.ndarray]:
    if _STATE is None:
        raise SynthesisError(_INIT_ERROR or "worker has no synthesis state")
    job, pool = _STATE
    sample = generate_one(pool, job.method, job.params, job.seed, draw, job.stream)
    return sample, job.spec.labels_from_mask(sample.mask)


def _write(
    index: int, draw: int, sample: Synthesized, label: np.ndarray, score: float | None
) -> dict[str, Any]:
    assert _STATE is not None
    job, pool = _STATE
    name = sample_name(job.spec, job.method, index, label)
    image_png = encode_image_png(sample.image, job.compress_level, job.png_strategy)
    mask_png = encode_mask_png(sample.mask, job.spec.palette, job.compress_level)
    # Mask last: an image counts as complete only once both exist; a failed mask write
    # takes its image along, so no half-written pair is left behind.
    atomic_write_bytes(job.out / "img" / name, image_png)
    try:
        atomic_write_bytes(job.out / "mask" / name, mask_png)
    except BaseException:
        (job.out / "img" / name).unlink(missing_ok=True)
        raise
    return _record(job, pool, index, draw, name, label, sample, score)


def _record(
    job: _Job,
    pool: SourcePool,
    index: int,
    draw: int,
    name: str,
    label: np.ndarray,
    sample: Synthesized,
    score: float | None,
) -> dict[str, Any]:
    return {
        "index": index,
        "image": name,
        "label": label_to_str(label),
        "sources": pool.relpaths(sample.sources),
        "seed": job.seed,
        "draw": draw,
        "score": score,
    }


def _task_make_write(task: tuple[int, int, str | None]) -> tuple[str, Any]:
    """Generate draw ``draw`` as image ``index`` and write it; with ``expected`` (the name
    of complete files already there), only describe it unless its name differs."""
    index, draw, expected = task
    try:
        sample, label = _make(draw)
        assert _STATE is not None
        job, pool = _STATE
        name = sample_name(job.spec, job.method, index, label)
        if name == expected:
            return "ok", _record(job, pool, index, draw, name, label, sample, None)
        return "written", _write(index, draw, sample, label, None)
    except Exception as exc:  # reported per item; the run goes on
        return "error", (draw, f"{type(exc).__name__}: {exc}")


def _task_make(draw: int) -> tuple[str, Any]:
    try:
        sample, label = _make(draw)
        return "ok", (draw, sample, label)
    except Exception as exc:
        return "error", (draw, f"{type(exc).__name__}: {exc}")


def _task_write(task: tuple[int, int, Synthesized, np.ndarray, float | None]) -> tuple[str, Any]:
    index, draw, sample, label, score = task
    try:
        return "ok", _write(index, draw, sample, label, score)
    except Exception as exc:
        return "error", (draw, f"{type(exc).__name__}: {exc}")


class _Runner:
    """Runs tasks in this process (one worker) or in a process pool."""

    def __init__(self, job: _Job, pool: SourcePool, workers: int) -> None:
        self.job, self.pool, self.workers = job, pool, workers
        self._procs: Any = None
        self._saved_threads: int | None = None

    def __enter__(self) -> _Runner:
        global _STATE
        # One OpenCV thread: the processes (or the caller's one) are the parallelism.
        # Set in the parent *before* forking: calling cv2.setNumThreads in a forked child
        # whose parent had started OpenCV's thread pool deadlocks.
        self._saved_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        if self.workers <= 1:
            _STATE = (self.job, self.pool)
            return self
        if "fork" in mp.get_all_start_methods():
            _STATE = (self.job, self.pool)
            ctx = mp.get_context("fork")
            initargs: tuple[Any, ...] = (None, None, None)
        else:
            ctx = mp.get_context("spawn")
            # Workers rebuild the pool from disk when it came from disk (cheaper than
            # pickling every image to every worker); an in-memory pool is sent as is.
            from_disk = self.pool.root is not None
            initargs = (self.job, None if from_disk else self.pool, self.pool.root)
        self._procs = ctx.Pool(self.workers, initializer=_init_worker, initargs=initargs)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        global _STATE
        if self._procs is not None:
            if exc_type is None:
                self._procs.close()
            else:
                self._procs.terminate()
            self._procs.join()
        if self._saved_threads is not None:
            cv2.setNumThreads(self._saved_threads)
        _STATE = None

    def map(self, fn: Callable[[Any], Any], tasks: list[Any], ordered: bool) -> Iterator[Any]:
        if self._procs is None:
            return map(fn, tasks)
        chunk = max(1, min(16, len(tasks) // (self.workers * 4)))
        if ordered:
            return self._procs.imap(fn, tasks, chunksize=chunk)
        return self._procs.imap_unordered(fn, tasks, chunksize=chunk)


# ------------------------------------------------------------------------ folder state

_INDEX_RE = re.compile(r"^([a-z]+)_(\d+)(?!\d)")


def _scan(folder: Path, method: str) -> dict[int, str]:
    """``index -> file name`` of the outputs of ``method`` in ``folder``."""
    found: dict[int, str] = {}
    if not folder.is_dir():
        return found
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.endswith(".png"):
            continue
        match = _INDEX_RE.match(entry.name)
        if match and match.group(1) == method:
            found[int(match.group(2))] = entry.name
    return found


def _complete(out: Path, method: str) -> tuple[dict[int, str], set[int]]:
    """Complete images (``index -> name``) and indices with only one half present."""
    images, masks = _scan(out / "img", method), _scan(out / "mask", method)
    complete = {i: n for i, n in images.items() if masks.get(i) == n}
    partial = (set(images) | set(masks)) - set(complete)
    return complete, partial


def _remove_outputs(out: Path, method: str, indices: Iterable[int]) -> None:
    wanted = set(indices)
    for sub in ("img", "mask"):
        for i, name in _scan(out / sub, method).items():
            if i in wanted:
                (out / sub / name).unlink(missing_ok=True)


def _read_journal(path: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """Image records by index, and the number of draws recorded as made."""
    records: dict[int, dict[str, Any]] = {}
    draws = 0
    if not path.is_file():
        return records, draws
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
        if not isinstance(entry, dict):
            continue
        if "draws" in entry:
            draws = max(draws, int(entry["draws"]))
        elif "index" in entry:
            records[int(entry["index"])] = entry
    return records, draws


def _versions() -> dict[str, str]:
    import PIL

    return {
        "hisynseg": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
    }


def _params_dict(params: SynthesisParams) -> dict[str, Any]:
    # Through JSON so that tuples and lists compare equal with what was read back.
    return json.loads(json.dumps(dataclasses.asdict(params)))


def _describe_keep(keep: KeepFunction) -> str:
    desc = getattr(keep, "description", None)
    if isinstance(desc, str) and desc:
        return desc
    return getattr(keep, "__qualname__", type(keep).__qualname__)


def _holds_nothing(out: Path) -> bool:
    """Whether ``out`` is empty but for empty ``img/`` and ``mask/`` folders, the lock and
    temporary files (what a run that stopped before writing its settings, e.g. on an
    unreadable source, leaves)."""
    for entry in out.iterdir():
        if entry.name in ("img", "mask") and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name == LOCK_FILE or is_atomic_temp(entry.name):
            continue
        return False
    return True


def _make_folders(out: Path) -> None:
    """Create ``out/img`` and ``out/mask``, or say in one line why they cannot be."""
    try:
        for sub in ("img", "mask"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SynthesisError(f"{out}: cannot create the output folder ({exc})") from None


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the run, and clear what killed runs left.

    Two runs writing one folder would interleave their journals and replace each other's
    files; the second is refused. While the lock is held, no other run is writing, so any
    temporary file in the folder, ``img/`` or ``mask/`` is a leftover of a run killed
    mid-write. Where file locks are not available (Windows), neither the check nor the
    clean-up is done.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        handle = open(out / LOCK_FILE, "a")
    except OSError as exc:
        raise SynthesisError(f"{out}: cannot write in the output folder ({exc.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SynthesisError(
                f"{out}: another synthesis is writing into this folder; wait for it to "
                "finish, or synthesize into another folder"
            ) from None
        for folder in (out, out / "img", out / "mask"):
            for leftover in folder.iterdir():
                if is_atomic_temp(leftover.name):
                    leftover.unlink(missing_ok=True)
        yield


def _held_count(out: Path) -> int:
    """Images listed in ``out``'s manifest.csv (0 when it has none yet)."""
    try:
        with open(out / MANIFEST_FILE, newline="") as fh:
            return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    except OSError:
        return 0


def _write_settings(out: Path, meta: dict[str, Any]) -> None:
    """Write ``synthesis.json`` atomically, or say in one line why it cannot be."""
    try:
        atomic_write_json(out / SETTINGS_FILE, meta)
    except OSError as exc:
        raise SynthesisError(f"{out / SETTINGS_FILE}: cannot write ({exc})") from None


def _check_folder(out: Path, settings: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Refuse an output folder that holds a different synthesis; return its old metadata."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        if out.is_dir() and not _holds_nothing(out):
            raise SynthesisError(
                f"{out}: not empty and has no {SETTINGS_FILE}; synthesize into an empty or "
                "new folder"
            )
        return {}
    try:
        old = json.loads(path.read_text())
        old_settings = old["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SynthesisError(f"{path}: unreadable synthesis settings ({exc})") from None
    diffs = [
        f"{key}: {then!r} -> {now!r}"
        for k in keys
        for key, then, now in leaf_differences(old_settings.get(k), settings.get(k), f"{k}.")
    ]
    if diffs:
        raise SynthesisError(
            f"{out}: holds a synthesis made with different settings ("
            + "; ".join(diffs[:6])
            + "); use a new folder, or the same settings to resume"
        )
    return old


# ------------------------------------------------------------------------ the run


def synthesize(
    root: str | Path | None,
    spec: DatasetSpec,
    method: str,
    num: int,
    out: str | Path,
    seed: int = 0,
    workers: int = 1,
    params: SynthesisParams | None = None,
    progress: bool = True,
    keep: KeepFunction | None = None,
    *,
    compress_level: int = 6,
    png_strategy: str = "rle",
    keep_threshold: float = 0.5,
    batch_size: int = 64,
    max_draws: int | None = None,
    pool: SourcePool | None = None,
) -> SynthesisSummary:
    """Synthesize ``num`` images with ``method`` from the single-label images of ``root``.

    Args:
        root: Dataset root in the layout of ``spec`` (may be ``None`` when ``pool`` is
            given).
        spec: The dataset.
        method: ``"mosaic"`` or ``"bezier"``.
        num: Images wanted in ``out`` (kept images, with a filter).
        out: Output folder (created).
        seed: Global seed; draw ``j`` uses ``default_rng([seed, method_id, j])``, with
            ``FILTERED_STREAM`` appended when filtering.
        workers: Processes (``<= 0``: one per CPU core). The output does not depend on it.
        params: Method settings; ``None``: :func:`default_params` for ``spec``.
        progress: Show progress bars.
        keep: Optional filter (see :class:`KeepFunction`). Draws are generated in batches
            of ``batch_size`` and passed to it; kept draws become images in draw order
            until ``num`` are kept or ``max_draws`` draws were made.
        compress_level: PNG zlib level (0-9); part of the settings since it changes bytes.
        png_strategy: zlib strategy of the RGB images, see :data:`PNG_STRATEGIES`.
        keep_threshold: With a filter returning scores: keep when score > threshold.
        batch_size: Draws per filter call.
        max_draws: With a filter: stop after this many draws in total (default 20·num),
            keeping what was made.
        pool: A prebuilt source pool (skips decoding ``root``).

    Returns:
        A :class:`SynthesisSummary`.

    Raises:
        SynthesisError: Bad arguments, no sources (or none of a class that the Bézier
            pairs name), ``out`` cannot be created or written, or it holds a synthesis
            with other settings.
        ImageReadError: A source image cannot be decoded (the message names it).
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise SynthesisError(
            f"unknown synthesis method {method!r}; expected one of {list(METHODS)}"
        )
    if num < 0:
        raise SynthesisError(f"--num must be >= 0, got {num}")
    if seed < 0:
        raise SynthesisError(f"seed must be >= 0, got {seed}")
    if not 0 <= compress_level <= 9:
        raise SynthesisError(f"compress_level must be 0-9, got {compress_level}")
    if png_strategy not in PNG_STRATEGIES:
        raise SynthesisError(f"png_strategy must be one of {PNG_STRATEGIES}, not {png_strategy!r}")
    if params is None:
        params = default_params(method, spec)
    expected = MosaicParams if method == "mosaic" else BezierParams
    if not isinstance(params, expected):
        raise SynthesisError(f"{method} needs {expected.__name__}, got {type(params).__name__}")
    if isinstance(params, BezierParams):
        params.check_classes(spec.num_classes)
    if workers <= 0:
        workers = os.cpu_count() or 1
    if keep is not None and batch_size < 1:
        raise SynthesisError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)

    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset": spec.to_dict(),
        "method": method,
        "seed": seed,
        "params": _params_dict(params),
        "compress_level": compress_level,
        "png_strategy": png_strategy,
        "filter": None
        if keep is None
        else {
            "keep": _describe_keep(keep),
            "threshold": keep_threshold,
            "draw_stream": FILTERED_STREAM,
        },
    }
    # Check what can be checked before the (slow) decoding of the sources, the output
    # folder's being creatable and writable included.
    _check_folder(out, settings, [k for k in settings if k != "sources"])
    _make_folders(out)
    with _output_lock(out):
        if pool is None:
            if root is None:
                raise SynthesisError("synthesize needs a dataset root or a prebuilt pool")
            pool = SourcePool.build(root, spec, workers=workers, progress=progress)
        elif pool.spec.to_dict() != spec.to_dict():
            raise SynthesisError(
                f"the source pool is of dataset {pool.spec.name!r}, not {spec.name!r}"
            )
        if isinstance(params, BezierParams):
            check_sources(params, pool)
        settings["sources"] = {"count": len(pool), "fingerprint": pool.fingerprint()}
        old = _check_folder(out, settings, settings)

        meta: dict[str, Any] = {
            "settings": settings,
            # "num" is what the folder holds (manifest.csv's rows), which is what train and
            # train-filter use; a re-run with a smaller --num leaves the images beyond it in place, so the
            # request alone would under-state the set. Until this run finishes it is the count
            # of the run before, matching the manifest, which is also only rewritten at the end.
            "num": _held_count(out),
            "requested": num,
            "root": None if pool.root is None else str(pool.root.resolve()),
            "class_counts": list(pool.class_counts),
            "versions": _versions(),
        }
        if "filter_stats" in old:
            meta["filter_stats"] = old["filter_stats"]
        # Settings first: a folder with outputs but no settings would be refused on resume.
        _write_settings(out, meta)

        summary = SynthesisSummary(out=out, method=method, requested=num)
        stream = PLAIN_STREAM if keep is None else FILTERED_STREAM
        job = _Job(spec, method, params, seed, out, compress_level, png_strategy, stream)
        journal_path = out / JOURNAL_FILE
        records, draws_done = _read_journal(journal_path)
        with _Runner(job, pool, workers) as runner, open(journal_path, "a") as journal:

            def log_record(entry: dict[str, Any]) -> None:
                journal.write(json.dumps(entry) + "\n")
                journal.flush()

            if keep is None:
                records = _run_plain(
                    runner, out, method, num, records, summary, log_record, progress
                )
            else:
                records = _run_filtered(
                    runner,
                    out,
                    method,
                    num,
                    records,
                    draws_done,
                    summary,
                    log_record,
                    progress,
                    keep,
                    keep_threshold,
                    batch_size,
                    max_draws if max_draws is not None else 20 * max(num, 1),
                )
        meta["num"] = _finish(out, spec, records, journal_path, summary)
        if keep is not None:
            meta["filter_stats"] = {
                "draws": summary.draws,
                "kept": summary.kept,
                "acceptance_rate": summary.acceptance_rate,
                "stopped": summary.stopped,
            }
        _write_settings(out, meta)
        summary.seconds = time.perf_counter() - started
        return summary


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def _run_plain(
    runner: _Runner,
    out: Path,
    method: str,
    num: int,
    records: dict[int, dict[str, Any]],
    summary: SynthesisSummary,
    log_record: Callable[[dict[str, Any]], None],
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Image ``i`` is draw ``i``: write the missing ones, describe complete unrecorded ones."""
    complete, partial = _complete(out, method)
    # Records of images that are gone, or whose file no longer matches, are stale.
    records = {i: r for i, r in records.items() if complete.get(i) == r.get("image")}
    missing = [i for i in range(num) if i not in complete]
    _remove_outputs(out, method, set(missing) & partial)
    unrecorded = sorted(i for i in complete if i not in records)
    summary.skipped = sum(1 for i in complete if i < num)
    tasks: list[tuple[int, int, str | None]] = [(i, i, None) for i in missing]
    tasks += [(i, i, complete[i]) for i in unrecorded]
    with _progress_bar(len(tasks), method, progress) as bar:
        for status, payload in runner.map(_task_make_write, tasks, ordered=False):
            bar.update(1)
            if status == "error":
                draw, message = payload
                summary.failed.append((draw, message))
                log.error("%s draw %d failed: %s", method, draw, message)
                continue
            index = payload["index"]
            if status == "written":
                summary.written += 1
                if index in complete:
                    # Same settings, yet the existing files had another name: replaced.
                    for sub in ("img", "mask"):
                        (out / sub / complete[index]).unlink(missing_ok=True)
                    summary.skipped -= index < num
            records[index] = payload
            log_record(payload)
    summary.failed.sort()
    return records


def _as_decisions(
    result: Any, count: int, threshold: float
) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.asarray(result)
    if values.shape != (count,):
        raise SynthesisError(
            f"the keep filter returned shape {values.shape} for a batch of {count}; it must "
            "return one boolean or score per image"
        )
    if values.dtype == bool:
        return values, None
    if not np.issubdtype(values.dtype, np.number):
        raise SynthesisError(f"the keep filter returned {values.dtype} values, not bools or scores")
    scores = values.astype(np.float64)
    return scores > threshold, scores


def _run_filtered(
    runner: _Runner,
    out: Path,
    method: str,
    num: int,
    records: dict[int, dict[str, Any]],
    draws_done: int,
    summary: SynthesisSummary,
    log_record: Callable[[dict[str, Any]], None],
    progress: bool,
    keep: KeepFunction,
    threshold: float,
    batch_size: int,
    max_draws: int,
) -> dict[int, dict[str, Any]]:
    """Draw in batches, keep what ``keep`` accepts, in draw order, until ``num`` are kept."""
    # Kept images are journalled in index order, so the recorded ones form a prefix.
    kept = 0
    while kept in records:
        kept += 1
    records = {i: records[i] for i in range(kept)}
    draws_done = max([draws_done] + [int(r["draw"]) + 1 for r in records.values()])
    complete, _ = _complete(out, method)
    # Files beyond the recorded prefix were written but never journalled: drop them.
    _remove_outputs(out, method, [i for i in complete if i not in records])
    # Recorded images whose files were deleted: regenerate them from their draw.
    redo = [i for i in sorted(records) if i < num and complete.get(i) != records[i]["image"]]
    _remove_outputs(out, method, redo)
    summary.skipped = sum(1 for i in records if i < num) - len(redo)
    if redo:
        redo_tasks = [(i, int(records[i]["draw"]), None) for i in redo]
        for status, payload in runner.map(_task_make_write, redo_tasks, ordered=True):
            if status == "error":
                summary.failed.append(payload)
                continue
            payload["score"] = records[payload["index"]].get("score")
            records[payload["index"]] = payload
            summary.written += 1

    target = num
    with _progress_bar(target, f"{method} (filtered)", progress) as bar:
        bar.update(min(kept, target))
        run_draws = run_kept = 0
        while kept < target and draws_done < max_draws:
            # Draw about what the acceptance rate so far says is still needed, so that the
            # last batch does not overshoot (the kept set does not depend on batch sizes).
            want = target - kept
            size = want if run_kept == 0 else math.ceil(1.2 * want * run_draws / run_kept)
            if run_draws and not run_kept:
                size = batch_size
            size = max(1, min(batch_size, size, max_draws - draws_done))
            batch = list(range(draws_done, draws_done + size))
            made = []
            for status, payload in runner.map(_task_make, batch, ordered=True):
                if status == "error":
                    summary.failed.append(payload)
                    log.error("%s draw %d failed: %s", method, *payload)
                else:
                    made.append(payload)
            last_draw = batch[-1]
            if made:
                images = np.stack([m[1].image for m in made])
                masks = np.stack([m[1].mask for m in made])
                labels = np.stack([m[2] for m in made])
                accept, scores = _as_decisions(keep(images, masks, labels), len(made), threshold)
                tasks = []
                for k, (draw, sample, label) in enumerate(made):
                    if accept[k] and kept + len(tasks) < target:
                        score = None if scores is None else float(scores[k])
                        tasks.append((kept + len(tasks), draw, sample, label, score))
                        if kept + len(tasks) == target:
                            last_draw = draw  # later draws of the batch are not needed
                for status, payload in runner.map(_task_write, tasks, ordered=True):
                    if status == "error":
                        # A kept draw that cannot be written ends the prefix; stop cleanly.
                        summary.failed.append(payload)
                        summary.stopped = f"writing failed: {payload[1]}"
                        break
                    records[payload["index"]] = payload
                    log_record(payload)
                    kept += 1
                    run_kept += 1
                    summary.written += 1
                    bar.update(1)
                if summary.stopped:
                    break
            run_draws += last_draw + 1 - draws_done
            draws_done = last_draw + 1
            log_record({"draws": draws_done, "kept": kept})
    summary.draws, summary.kept = draws_done, kept
    if kept < target and summary.stopped is None:
        rate = kept / draws_done if draws_done else 0.0
        advice = (
            "To continue, re-run the same command with a higher --max-draws; a lower "
            "--keep-threshold makes another set, so it needs a new --out folder"
        )
        if kept == 0:
            # More draws of a filter that keeps none are wasted: the threshold or the
            # filter itself is what to look at.
            advice = (
                "No draw passed the filter, so more draws will hardly help: check the "
                "filter's validation figures, or use a lower --keep-threshold (a new set, "
                "so in a new --out folder)"
            )
        summary.stopped = (
            f"stopped after {draws_done} draws (max_draws) with {kept} of {target} images "
            f"kept (acceptance {rate:.1%}); the kept images are written. {advice}"
        )
    summary.failed.sort()
    return records


def _finish(
    out: Path,
    spec: DatasetSpec,
    records: dict[int, dict[str, Any]],
    journal_path: Path,
    summary: SynthesisSummary,
) -> int:
    """Write manifest.csv (and labels.csv for generic datasets), compact the journal.

    Returns:
        The number of images the folder holds (the manifest's rows).
    """
    if summary.draws is not None:
        # Filtered runs: outputs that are not journalled kept images (a write that failed
        # mid-batch, with later ones of the batch done) are not part of the set.
        images, masks = _scan(out / "img", summary.method), _scan(out / "mask", summary.method)
        _remove_outputs(out, summary.method, (set(images) | set(masks)) - set(records))
    complete, _ = _complete(out, summary.method)
    rows = [records[i] for i in sorted(records) if complete.get(i) == records[i]["image"]]
    with atomic_path(out / MANIFEST_FILE) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            score = r.get("score")
            writer.writerow(
                [
                    r["index"],
                    r["image"],
                    r["label"],
                    ";".join(r["sources"]),
                    r["seed"],
                    r["draw"],
                    "" if score is None else f"{score:.6f}",
                ]
            )
    if spec.codec is None:
        labels = {r["image"]: np.array([int(c) for c in r["label"]], np.uint8) for r in rows}
        write_label_csv(out / SYNTHETIC_LABELS_FILE, labels, spec.class_names)
    # A filtered run's record is the only link from image i to the draw it came from, so
    # the records of images whose files are gone (deleted, or beyond a smaller num) stay:
    # a later run rebuilds image i from that draw instead of cutting the kept prefix there
    # and renumbering every later kept draw. Plain runs recompute theirs (draw i = image i).
    journal_rows = rows if summary.draws is None else [records[i] for i in sorted(records)]
    buf = io.StringIO()
    for r in journal_rows:
        buf.write(json.dumps(r) + "\n")
    if summary.draws is not None:
        buf.write(json.dumps({"draws": summary.draws, "kept": summary.kept}) + "\n")
    atomic_write_bytes(journal_path, buf.getvalue().encode())
    return len(rows)
