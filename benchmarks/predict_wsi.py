"""Throughput and peak memory of ``hisynseg predict`` on a generated whole-slide image.

1. Writes a pyramidal, tiled, JPEG-compressed TIFF of ``--size``² pixels (0.5 µm/px;
   20,000² by default) tile by tile from a generator: a smooth stained-tissue texture with
   patches of white glass. Reduced levels are SubIFDs, each built from the level above it
   one tile row at a time, so the generator never holds more than a band of tiles.
2. Runs ``hisynseg predict`` on it in a child process (so the parent's memory does not mix
   in) with a small CPU model (random weights), and reads the child's peak RSS
   (``ru_maxrss``) and the tile loop's tiles per second (from ``predict.json``).
3. In the same run, just before and just after the prediction, times the model's bare
   batched forward pass on random tensors of the same batch and tile size: the ceiling
   the prediction loop is held against (the mean of the two).

Targets: peak RSS <= 2 GiB; tiles/s >= 80 % of the bare forward. With tile reader
processes (``--tile-loader processes``, or ``auto`` with 4+ readers) the script also prints
the peak memory of the whole process tree (PSS, sampled).

``--gil`` runs the predict process under ``py-spy record --gil`` (``pip install py-spy``)
and prints how long its tile loop held the GIL per tile: the most tiles/s its Python work
allows however many cores there are. That ceiling is what a fast accelerator runs into, and
it can be measured on a small CPU machine.

``--pipeline-only`` replaces the network by a pointwise (1×1 convolution) segmenter that
costs next to nothing, so what is left is the pipeline: reading and decoding the slide,
tissue masks, preprocessing, host/device copies, blending and writing the outputs. Its
tiles/s is the most any network can reach through ``hisynseg predict`` on this machine:
the figure to hold against a fast accelerator's bare forward (``--profile`` adds a
cProfile of the child's main thread).

``--simulated-device R`` (with ``--pipeline-only``) puts a stand-in device in the
network's place: it runs queued batches one after another at ``R`` tiles/s, and launching
a batch returns at once, as on CUDA. The share of ``R`` the tile loop reaches is how busy
it keeps a device of that speed; ``--in-flight 1`` makes the loop wait for each batch
before staging the next, the synchronous loop, for comparison. On a small machine the
readers cap ``R`` (a 2-core one reads a few hundred tiles/s at most).

    python benchmarks/predict_wsi.py                          # 20,000² slide, every tissue tile
    python benchmarks/predict_wsi.py --size 4096               # quick check
    python benchmarks/predict_wsi.py --max-tiles 64            # 20,000² slide, first 64 tiles
    python benchmarks/predict_wsi.py --target-mpp 2.0          # whole slide at 2 µm/px
    python benchmarks/predict_wsi.py --pipeline-only --batch 16  # the pipeline's own ceiling
    python benchmarks/predict_wsi.py --pipeline-only --null-backend --batch 16 --workers 2 \
        --tile-loader processes --gil                          # GIL ceiling, reader processes
    python benchmarks/predict_wsi.py --pipeline-only --simulated-device 150 --batch 16 \
        --workers 2 --tile-loader processes [--in-flight 1]    # device kept busy?

A 2-core CPU runs resnet18 DeepLabV3+ at 3 to 4 tiles of 512² per second, so a full
20,000² slide at its native resolution (1,459 tissue tiles) takes about eight minutes
there; ``--max-tiles`` and ``--target-mpp`` measure the same pipeline in one or two.
The script prints exactly what it measured.

The default batch is 4: on a CPU, resnet18 DeepLabV3+ activations for a batch of 8 tiles
of 512² alone take the process to about 2 GiB (the bare-forward line prints its own peak,
so the prediction's overhead can be read off).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

SLIDE_MPP = 0.5
TILE = 512


class SyntheticSlide:
    """A deterministic slide rendered tile by tile: textured tissue with glass patches."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        rng = np.random.default_rng(seed)
        # A bank of stained textures (cells as dark dots on pink/purple stroma).
        self.bank = []
        for i in range(12):
            base = np.array([200, 120, 180], np.float32) - rng.uniform(0, 60, 3).astype(np.float32)
            field = cv2.GaussianBlur(
                rng.standard_normal((TILE, TILE)).astype(np.float32), (0, 0), 6
            )
            image = base + 180 * field[:, :, None] * np.array([0.6, 1.0, 0.5], np.float32)
            dots = rng.random((TILE, TILE)) < 0.004 * (1 + i % 3)
            dots = cv2.dilate(dots.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            image[dots] = [90, 40, 130]
            image += rng.normal(0, 6, image.shape).astype(np.float32)
            self.bank.append(np.clip(image, 0, 255).astype(np.uint8))
        # Tissue where a coarse smooth field is positive (about 70 % of the slide).
        cells = math.ceil(size / TILE)
        coarse = cv2.GaussianBlur(
            rng.standard_normal((cells + 2, cells + 2)).astype(np.float32), (0, 0), 1.5
        )
        self.field = coarse - np.quantile(coarse, 0.3)
        self.order = rng.integers(0, len(self.bank), (cells, cells))

    def tile(self, ty: int, tx: int) -> np.ndarray:
        """Level-0 tile (``TILE×TILE×3``) at tile row ``ty``, column ``tx``."""
        window = self.field[ty : ty + 3, tx : tx + 3]
        big = cv2.resize(window, (3 * TILE, 3 * TILE), interpolation=cv2.INTER_CUBIC)
        alpha = np.clip(big[TILE : 2 * TILE, TILE : 2 * TILE] * 8, 0, 1)[:, :, None]
        glass = np.full((TILE, TILE, 3), 242, np.float32)
        out = alpha * self.bank[self.order[ty, tx]] + (1 - alpha) * glass
        return out.astype(np.uint8)


def _level_rows(slide: SyntheticSlide, level: int) -> Iterator[np.ndarray]:
    """Rows of tiles of ``level`` (``TILE`` rows × full width), built from level 0."""
    f = 2**level
    size = math.ceil(slide.size / f)
    tiles = math.ceil(slide.size / TILE)
    for band in range(math.ceil(size / TILE)):
        rows = np.full((TILE, math.ceil(size / TILE) * TILE, 3), 242, np.uint8)
        for sub in range(f):
            ty = band * f + sub
            if ty >= tiles:
                break
            for tx in range(tiles):
                small = slide.tile(ty, tx)
                if f > 1:
                    small = cv2.resize(small, (TILE // f, TILE // f), interpolation=cv2.INTER_AREA)
                y, x = sub * TILE // f, tx * TILE // f
                rows[y : y + TILE // f, x : x + TILE // f] = small
        yield rows


def _tiles(slide: SyntheticSlide, level: int) -> Iterator[np.ndarray]:
    for rows in _level_rows(slide, level):
        for x in range(0, rows.shape[1], TILE):
            yield np.ascontiguousarray(rows[:, x : x + TILE])


def write_slide(path: Path, size: int) -> int:
    """Write the synthetic slide; return its number of levels."""
    import tifffile

    slide = SyntheticSlide(size)
    levels = [size]
    while levels[-1] > 2048:
        levels.append(math.ceil(levels[-1] / 2))
    opts = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, side in enumerate(levels):
            extra = (
                {
                    "subifds": len(levels) - 1,
                    "resolution": (1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP),
                    "resolutionunit": "CENTIMETER",
                }
                if i == 0
                else {"subfiletype": 1}
            )
            tif.write(_tiles(slide, i), shape=(side, side, 3), dtype=np.uint8, **opts, **extra)
    return len(levels)


# Peak memory of the whole process tree (the predict process and its tile reader
# processes): a thread sums the proportional set size (PSS: shared pages such as the batch
# slots split between the processes sharing them) of the process and its descendants
# every 0.2 s. ru_maxrss of the children is no use here: a child forked from a large
# parent reports the parent's size.
_TREE_MEMORY = """
import os, threading


def _descendants(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(k) for k in fh.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]


def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    def __init__(self):
        self.peak_kib = 0
        self.peak_workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        me = os.getpid()
        while not self._stop.wait(0.2):
            kids = _descendants(me)
            total = _pss_kib(me) + sum(_pss_kib(k) for k in kids)
            self.peak_kib = max(self.peak_kib, total)
            self.peak_workers = max(self.peak_workers, len(kids))

    def stop(self):
        self._stop.set()
        self._thread.join()
        return {"tree_pss_kib": self.peak_kib, "tree_children": self.peak_workers}


tree_memory = TreeMemory()
"""

_CHILD = (
    _TREE_MEMORY
    + """
import json, resource, sys
from hisynseg.cli import main
rc = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "children_cpu_s": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]), **tree_memory.stop()}))
"""
)


_BARE = """
import json, resource, sys, time
import torch
from hisynseg.models import build_segmenter
encoder, device = sys.argv[1], sys.argv[5]
batch, tile, iterations = map(int, sys.argv[2:5])
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
torch.manual_seed(0)
# The layout hisynseg predict runs in: channels-last weights and input (its tiles arrive
# as B×H×W×3), which on a CPU is faster than the default layout.
model = build_segmenter(encoder, num_classes=4).eval().to(device)
model = model.to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, tile, tile, device=device).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        model(x)
    sync()
    seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH " + json.dumps({"tiles_per_second": iterations * batch / seconds, "maxrss_kib": rss}))
"""


_PIPELINE = (
    _TREE_MEMORY
    + """
import cProfile, json, pstats, resource, sys
import torch
from torch import nn
from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.inference.backends import Backend
from hisynseg.inference.outputs import ClassLabels
from hisynseg.inference.predict import PredictOptions, predict_inputs
slide, out, device, options, profile, mode, in_flight = sys.argv[1:]
if in_flight:
    import hisynseg.inference.wsi as wsi

    wsi._IN_FLIGHT = int(in_flight)  # 1: wait for every batch before staging the next


class Pointwise(nn.Module):
    # Four logits made of the normalised channels and their mean: the whole backend path
    # (normalisation, copies, softmax, pooling) runs, the "network" costs next to nothing
    # (a 1×1 convolution with three input channels is oddly slow on CPU).
    input_divisor = 1

    def forward(self, x):
        return torch.cat([x, x.mean(1, keepdim=True)], 1) * 4.0


class Null:
    # No network and no preprocessing: fixed probabilities, so that what is measured is
    # only reading, decoding, tissue masks, blending and writing (the host's share).
    def __call__(self, tiles):
        return self.pooled(tiles, 1)

    def pooled(self, tiles, factor):
        side = tiles.shape[1] // factor
        probs = np.zeros((len(tiles), 4, side, side), np.float32)
        probs[:, 1] = 1.0
        return probs


class Simulated:
    # A device that runs queued batches one after another, each in batch / rate seconds:
    # launch stages the tiles (a host copy, as into page-locked memory) and returns at
    # once; a result is ready when its batch's turn on the device is over. How close the
    # tile loop comes to the rate is how busy it keeps a device of that speed.
    def __init__(self, rate):
        self.rate, self.free_at = rate, 0.0

    def pooled(self, tiles, factor):
        return self.launch(tiles, factor).result()

    def launch(self, tiles, factor):
        staged = np.array(tiles)
        self.free_at = max(time.perf_counter(), self.free_at) + len(staged) / self.rate
        return Ticket(self.free_at, len(staged), tiles.shape[1] // factor)


class Ticket:
    def __init__(self, ready_at, n, side):
        self.ready_at, self.n, self.side = ready_at, n, side

    def done(self):
        return time.perf_counter() >= self.ready_at

    def result(self):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        probs = np.zeros((self.n, 4, self.side, self.side), np.float32)
        probs[:, 1] = 1.0
        return probs


import time

import numpy as np

if mode == "null":
    backend = Null()
elif mode.startswith("simulated:"):
    backend = Simulated(float(mode.split(":")[1]))
else:
    backend = Backend(Pointwise().eval().to(device), 4, device=device)
labels = ClassLabels.from_dataset_dict(get_dataset_spec("luad-histoseg").to_dict())
opts = PredictOptions(**json.loads(options))
prof = cProfile.Profile() if profile else None
if prof:
    prof.enable()
results = predict_inputs([slide], backend, 4, labels, out, opts)
if prof:
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
rc = 0 if all(r.status == "ok" for r in results) else 1
print("BENCH " + json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "children_cpu_s": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]), **tree_memory.stop()}))
"""
)


# Frames of the tile loop and the tile loaders: GIL-held samples in any of them count.
_LOOP_FRAMES = ("predict_slide", "TileLoader", "load_batch")
_GIL_RATE = 250


def _child(code: str, *argv: str, gil_profile: Path | None = None) -> tuple[dict, str]:
    """Run ``code`` in a fresh interpreter; its ``BENCH {json}`` line and its output.

    With ``gil_profile``, the interpreter runs under ``py-spy record --gil``, which
    samples only the threads that hold the GIL, into that file.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", code, *argv]
    if gil_profile is not None:
        spy = ["py-spy", "record", "--gil", "-r", str(_GIL_RATE), "-f", "raw"]
        command = [*spy, "-o", str(gil_profile), "--", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        sys.exit(f"benchmark child failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[6:]), proc.stdout + proc.stderr


def _gil_seconds(profile: Path) -> float:
    """Seconds the tile loop (and its loader threads) held the GIL, from py-spy's samples."""
    samples = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if any(frame in stack for frame in _LOOP_FRAMES):
            samples += int(count)
    return samples / _GIL_RATE


def _print_gil(args: argparse.Namespace, profile: Path, tiles: int, loop_seconds: float) -> None:
    held = _gil_seconds(profile)
    ceiling = tiles / held if held > 0 else float("inf")
    print(
        f"GIL (py-spy, main process): the tile loop held it {held:.2f} s of "
        f"{loop_seconds:.1f} s = {1e3 * held / max(tiles, 1):.2f} ms per tile; ceiling "
        f"{ceiling:.0f} tiles/s on any number of cores (tile loader {args.tile_loader})"
    )


def _print_memory(child: dict) -> None:
    rss = child["maxrss_kib"] / 2**20
    print(
        f"peak RSS of the predict process: {rss:.2f} GiB "
        f"(target <= 2 GiB: {'met' if rss <= 2 else 'NOT met'})"
    )
    tree = child["tree_pss_kib"] / 2**20
    if child["tree_children"]:
        print(
            f"peak memory of the process tree (PSS, sampled every 0.2 s): {tree:.2f} GiB, the "
            f"predict process and up to {child['tree_children']} child processes (tile "
            f"readers, multiprocessing's resource tracker; target <= 2 GiB: "
            f"{'met' if tree <= 2 else 'NOT met'})"
        )


def _print_reader_cost(child: dict, record: dict) -> None:
    """CPU time the reader processes spent per tile, and the tiles/s that many cores give."""
    if record.get("tile_loader") != "processes" or not record["tiles_predicted"]:
        return
    per_tile = child["children_cpu_s"] / record["tiles_predicted"]
    readers = record["workers"]
    print(
        f"tile reader processes: {1e3 * per_tile:.2f} ms of CPU per tile (reading, decoding, "
        f"tissue masks), so {readers} readers on free cores would supply "
        f"{readers / per_tile:.0f} tiles/s"
    )


def _print_costs(
    args: argparse.Namespace, child: dict, record: dict, gil_profile: Path | None
) -> None:
    """What both reports end with: memory, reader-process CPU, and the GIL with --gil."""
    _print_memory(child)
    _print_reader_cost(child, record)
    if gil_profile is not None:
        _print_gil(args, gil_profile, record["tiles_predicted"], record["seconds"])


def _check_py_spy() -> None:
    import shutil

    if shutil.which("py-spy") is None:
        sys.exit("--gil needs py-spy: pip install py-spy")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=20000, help="slide side in pixels (20000)")
    ap.add_argument("--encoder", default="resnet18", help="model encoder (resnet18)")
    ap.add_argument("--batch", type=int, default=4, help="tiles per forward pass (4)")
    ap.add_argument("--overlap", type=int, default=64, help="tile overlap (64)")
    ap.add_argument("--target-mpp", type=float, help="predict at this µm/px (slide: 0.5)")
    ap.add_argument("--max-tiles", type=int, help="stop after this many tiles")
    ap.add_argument("--bare-iterations", type=int, default=6, help="timed bare batches (6)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    ap.add_argument("--workdir", help="keep the slide and outputs here (default: a temp dir)")
    ap.add_argument(
        "--pipeline-only",
        action="store_true",
        help="predict with a pointwise 1×1-conv network: the pipeline's own tiles/s",
    )
    ap.add_argument("--profile", action="store_true", help="with --pipeline-only: cProfile")
    ap.add_argument(
        "--tile-loader",
        choices=("auto", "threads", "processes"),
        default="auto",
        help="what reads the tiles: hisynseg predict --tile-loader (auto)",
    )
    ap.add_argument("--workers", type=int, help="tile readers (default: predict's default)")
    ap.add_argument(
        "--gil",
        action="store_true",
        help="sample the predict process with py-spy --gil: the seconds per tile its tile "
        "loop holds the GIL, and the tiles/s that allows however many cores there are",
    )
    ap.add_argument(
        "--null-backend",
        action="store_true",
        help="with --pipeline-only: no network nor preprocessing at all (fixed probabilities)",
    )
    ap.add_argument(
        "--simulated-device",
        type=float,
        metavar="TILES_PER_S",
        help="with --pipeline-only: a stand-in device that computes queued batches at this "
        "rate and returns fixed probabilities; prints how busy the tile loop keeps it",
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        choices=(1, 2),
        help="with --pipeline-only: batches a launching backend may have queued on its "
        "device (predict's own: 2; 1 waits for each batch before staging the next)",
    )
    args = ap.parse_args()
    if (args.simulated_device or args.in_flight) and not args.pipeline_only:
        ap.error("--simulated-device and --in-flight need --pipeline-only")

    import torch

    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.models import build_segmenter
    from hisynseg.models.checkpoint import export_segmenter

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="predict-wsi-")
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide-{args.size}.tif"
    t0 = time.perf_counter()
    if not slide.is_file():
        partial = slide.with_name(f".{slide.name}.tmp")
        levels = write_slide(partial, args.size)
        os.replace(partial, slide)
        print(
            f"generated {slide.name}: {args.size}×{args.size} px, {levels} levels, "
            f"{slide.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s"
        )
    if args.gil:
        _check_py_spy()
    if args.pipeline_only:
        _pipeline_only(args, slide, work / "out-pipeline")
        if tmp is not None:
            tmp.cleanup()
        return
    torch.manual_seed(0)
    ckpt = work / f"model-{args.encoder}.pt"
    export_segmenter(
        build_segmenter(args.encoder, num_classes=4), get_dataset_spec("luad-histoseg"), ckpt
    )

    out = work / "out"
    cmd = ["predict", str(ckpt), str(slide), "--out", str(out)]
    cmd += ["--tile", str(TILE), "--overlap", str(args.overlap), "--batch-size", str(args.batch)]
    cmd += ["--device", args.device, "--overwrite", "--no-progress"]
    cmd += ["--tile-loader", args.tile_loader]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.target_mpp:
        cmd += ["--target-mpp", str(args.target_mpp)]
    if args.max_tiles:
        cmd += ["--max-tiles", str(args.max_tiles)]
    bare_args = (args.encoder, str(args.batch), str(TILE), str(args.bare_iterations), args.device)
    # The bare forward is timed just before and just after the prediction and averaged, so
    # that a change of load on a shared machine weighs on both sides of the ratio alike.
    bare_before, _ = _child(_BARE, *bare_args)
    start = time.perf_counter()
    gil_profile = work / "gil.txt" if args.gil else None
    child, output = _child(_CHILD, *cmd, gil_profile=gil_profile)
    wall = time.perf_counter() - start
    if child["rc"] != 0:
        sys.exit(f"prediction failed:\n{output}")
    record = json.loads((out / "predict.json").read_text())["inputs"][0]["details"]
    plan = record["plan"]
    loop_rate = record["tiles_per_second"]
    bare_after, _ = _child(_BARE, *bare_args)
    bare_rates = (bare_before["tiles_per_second"], bare_after["tiles_per_second"])
    bare = sum(bare_rates) / 2
    bare_rss = max(bare_before["maxrss_kib"], bare_after["maxrss_kib"])

    print(
        f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"device {args.device} "
        "(shared machine: other work may run at the same time)"
    )
    print(
        f"slide: {args.size}×{args.size} px at {SLIDE_MPP} µm/px; model {args.encoder}, "
        f"tile {TILE}, overlap {args.overlap}, batch {args.batch}, "
        f"target {args.target_mpp or SLIDE_MPP} µm/px (level {plan['level']}), output "
        f"{plan['output_size'][0]}×{plan['output_size'][1]} (downsample {plan['output_downsample']})"
    )
    limited = " (limited by --max-tiles)" if args.max_tiles else ""
    print(
        f"tiles: {record['tiles_total']} in the grid, {record['tiles_with_tissue']} with tissue, "
        f"{record['tiles_predicted']} predicted{limited}; read by {record['workers']} "
        f"{record['tile_loader']}"
    )
    steady = record["steady_tiles_per_second"]
    print(
        f"predict: tile loop {record['seconds']:.1f} s = {loop_rate:.3f} tiles/s "
        f"(network {record['predict_seconds']:.1f} s); outputs {record['write_seconds']:.1f} s; "
        f"whole command {wall:.1f} s incl. start-up and tissue detection"
    )
    print(
        f"  of the tile loop, {record['warmup_seconds']:.2f} s until the first batch was read "
        f"(tissue test, starting the readers); after it {steady:.3f} tiles/s"
    )
    print(
        f"bare forward: {bare:.3f} tiles/s, the mean of {bare_rates[0]:.3f} before and "
        f"{bare_rates[1]:.3f} after the prediction ({args.bare_iterations} batches of "
        f"{args.batch}, random tensors); its own process peaks at "
        f"{bare_rss / 2**20:.2f} GiB RSS"
    )
    ratio = loop_rate / bare
    print(
        f"throughput / bare forward: {ratio:.2f} over the whole tile loop (target >= 0.80: "
        f"{'met' if ratio >= 0.8 else 'NOT met'})"
    )
    steady_ratio = steady / bare
    print(
        f"throughput / bare forward after the first batch: {steady_ratio:.2f} (the bare "
        f"forward's own warm-up is untimed too; >= 0.80: "
        f"{'met' if steady_ratio >= 0.8 else 'NOT met'})"
    )
    _print_costs(args, child, record, gil_profile)
    if tmp is not None:
        tmp.cleanup()


def _pipeline_only(args: argparse.Namespace, slide: Path, out: Path) -> None:
    """Predict ``slide`` with a pointwise network and print the pipeline's own rates."""
    options = {
        "tile": TILE,
        "overlap": args.overlap,
        "batch_size": args.batch,
        "target_mpp": args.target_mpp,
        "max_tiles": args.max_tiles,
        "overwrite": True,
        "progress": False,
        "tile_loader": args.tile_loader,
        "workers": args.workers,
    }
    if args.simulated_device:
        mode, label = (
            f"simulated:{args.simulated_device}",
            (f"simulated device of {args.simulated_device:g} tiles/s"),
        )
    elif args.null_backend:
        mode, label = "null", "null backend"
    else:
        mode, label = "pointwise", "pointwise network"
    if args.in_flight:
        label += f", at most {args.in_flight} batch(es) queued on it"
    start = time.perf_counter()
    gil_profile = out.parent / "gil-pipeline.txt" if args.gil else None
    child, output = _child(
        _PIPELINE,
        str(slide),
        str(out),
        args.device,
        json.dumps(options),
        "1" if args.profile else "",
        mode,
        str(args.in_flight or ""),
        gil_profile=gil_profile,
    )
    wall = time.perf_counter() - start
    if child["rc"] != 0:
        sys.exit(f"prediction failed:\n{output}")
    if args.profile:
        print(output[: output.rfind("BENCH ")])
    record = json.loads((out / "predict.json").read_text())["inputs"][0]["details"]
    plan = record["plan"]
    print(
        f"pipeline only ({label}), "
        f"device {args.device}, {os.cpu_count()} CPU cores "
        "(shared machine: other work may run at the same time)"
    )
    print(
        f"slide: {args.size}×{args.size} px; tile {TILE}, overlap {args.overlap}, batch "
        f"{args.batch}, level {plan['level']}, output {plan['output_size'][0]}×"
        f"{plan['output_size'][1]} (downsample {plan['output_downsample']})"
    )
    print(
        f"tiles: {record['tiles_total']} in the grid, {record['tiles_with_tissue']} with tissue, "
        f"{record['tiles_predicted']} predicted; read by {record['workers']} "
        f"{record['tile_loader']}"
    )
    print(
        f"pipeline: tile loop {record['seconds']:.1f} s = {record['tiles_per_second']:.3f} "
        f"tiles/s (backend calls {record['predict_seconds']:.1f} s); outputs "
        f"{record['write_seconds']:.1f} s; whole command {wall:.1f} s incl. start-up"
    )
    print(
        f"  of the tile loop, {record['warmup_seconds']:.2f} s until the first batch was read; "
        f"after it {record['steady_tiles_per_second']:.3f} tiles/s"
    )
    for key, value in record.get("write_breakdown", {}).items():
        print(f"  outputs: {key} {value:.1f} s")
    if args.simulated_device:
        steady = record["steady_tiles_per_second"]
        print(
            f"simulated device kept busy: {steady / args.simulated_device:.2f} of its "
            f"{args.simulated_device:g} tiles/s after the first batch, "
            f"{record['tiles_per_second'] / args.simulated_device:.2f} over the whole loop"
        )
    _print_costs(args, child, record, gil_profile)


if __name__ == "__main__":
    main()
