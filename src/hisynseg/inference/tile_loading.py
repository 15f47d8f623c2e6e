"""Reading prediction tiles ahead of the network: in threads, or in worker processes.

A tile costs the host more than its decoding: assembling it from the file's stored tiles,
resampling it to the model's resolution, its tissue mask and the mask's reduction to the
output resolution. Much of that holds Python's GIL, so on a machine whose accelerator
predicts a thousand tiles a second, threads of one process cannot feed it however many
cores it has. Two loaders share one interface (:meth:`TileLoader.submit` a batch of tile
positions, get a future of a :class:`LoadedBatch`):

- :class:`ThreadTileLoader` reads in a pool of threads of this process (any reader; no
  start-up cost; the reader's decoded-tile cache is shared by all threads).
- :class:`ProcessTileLoader` reads in the spawned processes of a :class:`ReaderPool`,
  each opening the slide from its path, into a ring of batch slots in shared memory, so
  a batch crosses to the network without being pickled or copied. A slot is reused once
  its batch is released. One pool serves every slide of a run, so its processes start
  once, while the first slide is being opened.

This module imports neither torch nor the network code, so that worker processes start
in a fraction of a second and stay small.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from hisynseg.errors import HisynsegError
from hisynseg.inference.tissue import pixel_tissue_mask
from hisynseg.slides.base import SlideReader

__all__ = [
    "CALLER_HELD_BATCHES",
    "LOADER_KINDS",
    "LoadedBatch",
    "ProcessTileLoader",
    "ReaderPool",
    "SharedMemoryTooSmallError",
    "ThreadTileLoader",
    "TileGeometry",
    "TileLoader",
    "choose_loader",
    "load_batch",
    "pool_mask",
    "processes_may_pay",
    "read_tile",
    "reader_factory",
    "shared_memory_free_bytes",
]

LOADER_KINDS = ("auto", "threads", "processes")
# "auto" starts processes only where the GIL is what limits: the network runs on an
# accelerator (on a CPU the network takes far longer per tile than the host's Python
# work), there are at least this many tiles (below it, the workers' start-up, about a
# second, costs more than it saves) and at least this many readers (with fewer cores,
# threads sharing one decoded-tile cache decode less: each process caches only the tiles
# it read itself).
MIN_TILES_FOR_PROCESSES = 256
MIN_WORKERS_FOR_PROCESSES = 4

# A loader's depth (batches read or held at once) is its readers plus this many: a read
# per reader keeps every reader busy while the caller holds two batches (one with the
# network, one blending). A caller that holds more reads that many fewer ahead.
CALLER_HELD_BATCHES = 2

Position = tuple[int, int]


class TileGeometry(NamedTuple):
    """What reading a tile needs of a :class:`~hisynseg.inference.wsi.TilePlan`.

    Attributes:
        level: Pyramid level the tiles are read from.
        level_scale: Level pixels per model pixel (1: read as is; slightly below 1 when
            the level is a little coarser than the model's resolution).
        tile: Tile side in model pixels.
        output_downsample: Model pixels per output pixel (side).
    """

    level: int
    level_scale: float
    tile: int
    output_downsample: int


def read_tile(reader: SlideReader, plan: Any, top: int, left: int) -> np.ndarray:
    """The ``tile×tile×3`` RGB tile at model pixel ``(top, left)`` (white beyond the slide).

    Args:
        reader: The slide.
        plan: A :class:`~hisynseg.inference.wsi.TilePlan` or a :class:`TileGeometry`.
        top: Tile row in model pixels.
        left: Tile column in model pixels.
    """
    t, r = plan.tile, plan.level_scale
    if abs(r - 1.0) < 1e-6:
        return reader.read_region(plan.level, left, top, t, t)
    lx, ly, span = left * r, top * r, t * r
    x0, y0 = math.floor(lx), math.floor(ly)
    x1, y1 = math.ceil(lx + span), math.ceil(ly + span)
    region = reader.read_region(plan.level, x0, y0, x1 - x0, y1 - y0)
    ox, oy = round((lx - x0) / r), round((ly - y0) / r)
    w = max(round((x1 - x0) / r), ox + t)
    h = max(round((y1 - y0) / r), oy + t)
    # r < 1 (a level slightly coarser than the model's resolution) enlarges a little.
    interp = cv2.INTER_AREA if r > 1 else cv2.INTER_LINEAR
    small = cv2.resize(region, (w, h), interpolation=interp)
    return np.ascontiguousarray(small[oy : oy + t, ox : ox + t])


def pool_mask(mask: np.ndarray, d: int) -> np.ndarray:
    """``float32`` share of ``True`` over ``d×d`` blocks of a boolean mask (sides divisible
    by ``d``).

    Exact block counts from a summed-area table (cv2, outside the GIL), divided by ``d²``.
    """
    if d == 1:
        return mask.astype(np.float32)
    table = cv2.integral(np.ascontiguousarray(mask).view(np.uint8))
    counts = table[d::d, d::d] - table[:-d:d, d::d] - table[d::d, :-d:d] + table[:-d:d, :-d:d]
    return counts.astype(np.float32) / np.float32(d * d)


def load_batch(
    reader: SlideReader,
    geometry: TileGeometry,
    positions: Sequence[Position],
    tissue_threshold: float | None,
    images: np.ndarray,
    shares: np.ndarray | None,
) -> None:
    """Read tiles at ``positions`` into ``images[i]`` and their tissue shares into ``shares[i]``.

    Args:
        reader: The slide.
        geometry: Where and at what scale tiles are read.
        positions: ``(top, left)`` of each tile in model pixels.
        tissue_threshold: Saturation threshold of tissue; ``None``: no tissue shares.
        images: ``≥n×T×T×3`` ``uint8`` destination.
        shares: ``≥n×(T/d)×(T/d)`` ``float32`` destination of the tissue share per output
            pixel (with ``tissue_threshold``).
    """
    d = geometry.output_downsample
    for i, (top, left) in enumerate(positions):
        images[i] = read_tile(reader, geometry, top, left)
        if tissue_threshold is not None and shares is not None:
            shares[i] = pool_mask(pixel_tissue_mask(images[i], tissue_threshold), d)


@dataclass
class LoadedBatch:
    """Tiles read for the network.

    Attributes:
        images: ``n×T×T×3`` ``uint8`` RGB; valid until :meth:`release`.
        shares: ``n×(T/d)×(T/d)`` ``float32`` tissue shares, or ``None`` without tissue
            detection.
    """

    images: np.ndarray
    shares: np.ndarray | None
    _release: Callable[[], None] | None = None

    def release(self) -> None:
        """Give the memory back to the loader (the arrays must no longer be used)."""
        if self._release is not None:
            self._release()
            self._release = None


class TileLoader(Protocol):
    """Reads batches of tiles in the background; at most ``depth`` batches are pending or
    held (not yet released) at once."""

    kind: str
    depth: int
    workers: int

    def submit(self, positions: Sequence[Position]) -> Future[LoadedBatch]: ...

    def close(self) -> None: ...


class ThreadTileLoader:
    """Reads batches in ``workers`` threads sharing ``reader``.

    Args:
        reader: The slide (must be safe to read from several threads).
        geometry: Where and at what scale tiles are read.
        tissue_threshold: Saturation threshold of tissue, or ``None``.
        workers: Threads.
    """

    kind = "threads"

    def __init__(
        self,
        reader: SlideReader,
        geometry: TileGeometry,
        tissue_threshold: float | None,
        workers: int,
    ) -> None:
        self.reader = reader
        self.geometry = geometry
        self.tissue_threshold = tissue_threshold
        self.workers = workers
        self.depth = workers + CALLER_HELD_BATCHES
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader")

    def _load(self, positions: Sequence[Position]) -> LoadedBatch:
        t, d = self.geometry.tile, self.geometry.output_downsample
        images = np.empty((len(positions), t, t, 3), np.uint8)
        shares = None
        if self.tissue_threshold is not None:
            shares = np.empty((len(positions), t // d, t // d), np.float32)
        load_batch(self.reader, self.geometry, positions, self.tissue_threshold, images, shares)
        return LoadedBatch(images, shares)

    def submit(self, positions: Sequence[Position]) -> Future[LoadedBatch]:
        return self._pool.submit(self._load, list(positions))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# What a reader process keeps between batches: the open slide and the mapped slot block.
_worker: dict[str, Any] = {}


class _SlotJob(NamedTuple):
    """One batch for a reader process: which slide, where to put the tiles, which tiles."""

    reader_factory: Callable[[str], SlideReader]
    path: str
    memory_name: str
    slot_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    slots: int
    slot: int
    positions: list[Position]
    geometry: TileGeometry
    tissue_threshold: float | None


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction.

    Ctrl-C reaches the whole process group: the parent stops the workers itself (after
    their current batch), so they must not die with a traceback each, not even while
    they are still importing, before any code of theirs could ignore it. An ignored
    signal stays ignored in a spawned interpreter, and Python then installs no
    KeyboardInterrupt handler. The parent ignores Ctrl-C for the few milliseconds this
    takes; only its main thread can change signal handlers, so elsewhere nothing changes.
    """
    previous = signal.getsignal(signal.SIGINT)
    # None: a handler not set from Python, which could not be put back.
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# Seconds between a reader process's checks that the process it reads for still exists.
_PARENT_CHECK_SECONDS = 0.5


def _exit_with_parent(parent: int) -> None:
    """End this process once ``parent`` is gone.

    A parent killed outright (SIGKILL, the out-of-memory killer) cannot stop its readers,
    and an idle reader waits for work forever: it would outlive it, holding the shared
    memory and the parent's output pipes.
    """
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_SECONDS)
    os._exit(1)


def _start_worker(parent: int) -> None:
    # Also for processes started off the main thread (see _sigint_ignored_by_children).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker decodes on its own core: more threads per worker would oversubscribe.
    cv2.setNumThreads(1)
    # The parent's pid comes from the parent: a worker still starting when its parent
    # dies would otherwise take its new parent (init) for the one to watch.
    threading.Thread(
        target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True
    ).start()


def _warm_up() -> None:
    """Import what reading a TIFF slide needs, while the parent prepares the slide."""
    import importlib

    for module in ("hisynseg.slides.tiff", "tifffile", "imagecodecs"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _load_into_slot(job: _SlotJob) -> int:
    w = _worker
    if w.get("path") != job.path:
        previous = w.pop("reader", None)
        w.pop("path", None)
        if previous is not None:
            previous.close()
        w["reader"] = job.reader_factory(job.path)  # may raise: then no reader is kept
        w["path"] = job.path
    if w.get("memory_name") != job.memory_name:
        if "memory" in w:
            del w["images"], w["shares"]
            w.pop("memory").close()
        memory = shared_memory.SharedMemory(name=job.memory_name)
        w["images"], w["shares"] = _slot_views(memory, job.slot_shapes, job.slots)
        w["memory"], w["memory_name"] = memory, job.memory_name
    threshold = job.tissue_threshold
    shares = w["shares"][job.slot] if threshold is not None else None
    load_batch(w["reader"], job.geometry, job.positions, threshold, w["images"][job.slot], shares)
    return job.slot


class ReaderPool:
    """Spawned processes that read tiles for :class:`ProcessTileLoader`, kept for a whole
    run: they start once (about a second of imports, overlapping whatever the caller does
    next) and open each slide they are given.

    Args:
        workers: Processes.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"need at least one reader process, got {workers}")
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> ReaderPool:
        """Start every process now (they then import their modules in the background)."""
        if self._executor is not None:
            return self
        # spawn, not fork: the parent may hold CUDA state and threads.
        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(),),
        )
        # The executor spawns a process per submitted job until it has them all, so these
        # jobs start every process here, where they can be given SIGINT ignored.
        with _sigint_ignored_by_children():
            for _ in range(self.workers):
                executor.submit(_warm_up)
        self._executor = executor
        return self

    def submit(self, job: _SlotJob) -> Future[int]:
        executor = self.start()._executor
        assert executor is not None
        return executor.submit(_load_into_slot, job)

    def reset(self) -> None:
        """Drop the processes (after one died: the next use starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _slot_views(
    memory: shared_memory.SharedMemory,
    slot_shapes: tuple[tuple[int, ...], tuple[int, ...]],
    slots: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``slots×B×T×T×3`` ``uint8`` images and ``slots×B×t×t`` ``float32`` shares in ``memory``."""
    image_shape, share_shape = slot_shapes
    images = np.ndarray((slots, *image_shape), np.uint8, buffer=memory.buf)
    offset = images.nbytes
    shares = np.ndarray((slots, *share_shape), np.float32, buffer=memory.buf, offset=offset)
    return images, shares


def _memory_bytes(slot_shapes: tuple[tuple[int, ...], tuple[int, ...]], slots: int) -> int:
    image_shape, share_shape = slot_shapes
    return slots * (math.prod(image_shape) + 4 * math.prod(share_shape))


SHM_PATH = "/dev/shm"


class SharedMemoryTooSmallError(HisynsegError):
    """Not enough free shared memory for the batch slots of :class:`ProcessTileLoader`."""


def shared_memory_free_bytes() -> int | None:
    """Free bytes of the file system behind shared memory, or ``None`` where there is no
    :data:`SHM_PATH` (shared memory then lives elsewhere, e.g. on macOS)."""
    try:
        stat = os.statvfs(SHM_PATH)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


class ProcessTileLoader:
    """Reads batches of one slide in the processes of a :class:`ReaderPool`, into shared
    memory.

    Args:
        reader_factory: Opens the slide from its path in a worker (a picklable callable:
            a reader class, or :func:`functools.partial` of one).
        path: The slide.
        geometry: Where and at what scale tiles are read.
        tissue_threshold: Saturation threshold of tissue, or ``None``.
        pool: The reader processes; ``None`` starts a pool of ``workers`` processes that
            this loader closes with itself.
        workers: Processes of a pool of its own (without ``pool``).
        batch_size: Largest batch that will be submitted.

    Raises:
        SharedMemoryTooSmallError: The batch slots do not fit in the free shared memory.
        HisynsegError: A worker cannot open the slide, or dies.
    """

    kind = "processes"

    def __init__(
        self,
        reader_factory: Callable[[str], SlideReader],
        path: str | os.PathLike[str],
        geometry: TileGeometry,
        tissue_threshold: float | None,
        pool: ReaderPool | None = None,
        *,
        workers: int = 1,
        batch_size: int,
    ) -> None:
        t, d = geometry.tile, geometry.output_downsample
        self.path = str(path)
        self.workers = pool.workers if pool is not None else workers
        self.batch_size = batch_size
        self.depth = self.workers + CALLER_HELD_BATCHES
        self._shapes = ((batch_size, t, t, 3), (batch_size, t // d, t // d))
        size = _memory_bytes(self._shapes, self.depth)
        free = shared_memory_free_bytes()
        if free is not None and size > free:
            # The block is created sparse: a short /dev/shm (64 MiB in a default Docker
            # container) would only show when a worker's write kills it with SIGBUS.
            raise SharedMemoryTooSmallError(
                f"{self.path}: tile reader processes need {size / 2**20:.0f} MiB of shared "
                f"memory for {self.depth} batch slots, but {SHM_PATH} has "
                f"{free / 2**20:.0f} MiB free; use fewer --workers or a smaller "
                "--batch-size, enlarge /dev/shm (docker run --shm-size=1g), or use "
                "--tile-loader threads"
            )
        self._factory = reader_factory
        self._geometry = geometry
        self._threshold = tissue_threshold
        self._own_pool = pool is None
        self._pool = ReaderPool(self.workers) if pool is None else pool
        self._memory = shared_memory.SharedMemory(create=True, size=size)
        self._images, self._shares = _slot_views(self._memory, self._shapes, self.depth)
        self._free = list(range(self.depth))
        self._pending: list[tuple[Future[int], Future[LoadedBatch]]] = []
        self._pending_lock = threading.Lock()
        self._broken = False

    def submit(self, positions: Sequence[Position]) -> Future[LoadedBatch]:
        positions = list(positions)
        if len(positions) > self.batch_size:
            raise ValueError(f"a batch of {len(positions)} tiles for slots of {self.batch_size}")
        if not self._free:
            raise RuntimeError(f"all {self.depth} batch slots are in use; release a batch first")
        slot = self._free.pop()
        done: Future[LoadedBatch] = Future()
        job = _SlotJob(
            self._factory,
            self.path,
            self._memory.name,
            self._shapes,
            self.depth,
            slot,
            positions,
            self._geometry,
            self._threshold,
        )
        try:
            work = self._pool.submit(job)
        except BrokenProcessPool:
            self._free.append(slot)
            self._pool.reset()
            raise self._died() from None

        def finish(work: Future[int]) -> None:
            if work.cancelled():  # dropped by close()
                self._free.append(slot)
                done.cancel()
                done.set_running_or_notify_cancel()  # wakes wait() on it
                return
            error = work.exception()
            if error is not None:
                self._free.append(slot)
                if isinstance(error, BrokenProcessPool):
                    self._broken = True
                    error = self._died()
                done.set_exception(error)
                return
            n = len(positions)
            done.set_result(
                LoadedBatch(
                    self._images[slot, :n],
                    self._shares[slot, :n] if self._threshold is not None else None,
                    lambda: self._free.append(slot),
                )
            )

        work.add_done_callback(finish)
        self._track(work, done)
        return done

    def _died(self) -> HisynsegError:
        return HisynsegError(
            f"{self.path}: a tile reader process died: out of memory, a crash in the slide "
            "library, or a script that predicts at import time (worker processes import "
            "the main script: guard its work with if __name__ == '__main__'); use "
            "--tile-loader threads (tile_loader='threads') to read without processes"
        )

    def close(self) -> None:
        """Wait for the batches in flight, then free the slots (and an own pool, or a
        shared pool one of whose processes died, so that the next slide gets new ones)."""
        try:
            if self._own_pool or self._broken:
                self._pool.reset()
            else:
                self._drain()
        finally:
            self._close_memory()

    def _drain(self) -> None:
        # Workers must be done writing into the block before it is unlinked, and every
        # batch's completion callback must have run; batches not yet started are dropped.
        with self._pending_lock:
            pending = list(self._pending)
        for work, _ in pending:
            work.cancel()
        wait([done for _, done in pending])

    def _track(self, work: Future[int], done: Future[LoadedBatch]) -> None:
        with self._pending_lock:
            self._pending = [p for p in self._pending if not p[1].done()]
            self._pending.append((work, done))

    def _close_memory(self) -> None:
        # Views into the block must go before it can be closed; a batch still held by
        # the caller (after an error) keeps the mapping alive until it is collected.
        self._images = self._shares = None  # type: ignore[assignment]
        try:
            self._memory.close()
        except BufferError:
            pass
        self._memory.unlink()


def reader_factory(reader: SlideReader) -> Callable[[str], SlideReader] | None:
    """What opens ``reader``'s file again in a worker process, or ``None`` when it cannot
    (a reader without a ``reopener`` method, or one whose method says no)."""
    reopener = getattr(reader, "reopener", None)
    return reopener() if callable(reopener) else None


def processes_may_pay(kind: str, accelerated: bool, workers: int) -> bool:
    """Whether reader processes can be wanted at all, before any slide is opened: asked
    for, or under ``auto`` a network on an accelerator and at least
    :data:`MIN_WORKERS_FOR_PROCESSES` readers (:func:`choose_loader` then also needs a
    reopenable reader and enough tiles)."""
    if kind == "processes":
        return True
    return kind == "auto" and accelerated and workers >= MIN_WORKERS_FOR_PROCESSES


def choose_loader(
    kind: str,
    reader: SlideReader,
    workers: int,
    num_tiles: int,
    accelerated: bool = True,
) -> str:
    """``"threads"`` or ``"processes"`` for reading ``num_tiles`` tiles of ``reader``.

    ``auto`` picks processes when the network runs on an accelerator (``accelerated``),
    the reader can be reopened in a worker (its ``reopener()`` gives a factory), and there
    are at least :data:`MIN_WORKERS_FOR_PROCESSES` workers and
    :data:`MIN_TILES_FOR_PROCESSES` tiles; threads otherwise. ``processes`` is threads
    too for a reader that cannot be reopened (a plain picture).

    Raises:
        HisynsegError: An unknown ``kind``.
    """
    if kind not in LOADER_KINDS:
        raise HisynsegError(
            f"unknown tile reader {kind!r}; expected one of {', '.join(LOADER_KINDS)}"
        )
    reopenable = reader_factory(reader) is not None
    if kind == "processes" and not reopenable:
        # A picture is decoded whole into this process's memory: worker processes would
        # each decode it again, and threads read it fast enough.
        return "threads"
    if kind == "auto":
        use = (
            processes_may_pay(kind, accelerated, workers)
            and reopenable
            and num_tiles >= MIN_TILES_FOR_PROCESSES
        )
        return "processes" if use else "threads"
    return kind
