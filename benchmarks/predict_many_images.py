"""Per-image cost of ``hisynseg predict`` over a folder of many small images.

Users predict folders of thousands of patches; what each image costs besides its network
pass (opening it, tissue detection, the mask, overlay, area table, GeoJSON, the run's
``predict.json``) must not grow with the number of images done. This script writes
``--large`` random RGB PNGs of ``--side`` px, then times ``predict_inputs`` over the first
``--small`` of them and over all of them, in fresh output folders, with a network that
costs nothing (fixed probabilities). It prints milliseconds per image for both runs and
their ratio: about 1 when the cost per image is flat, and far above 1 when something is
redone for every image done so far (as rewriting ``predict.json`` in full after every
image once was: 300 images took 21 s, seven times their own work). It also prints how
much of each run went to writing ``predict.json``.

    python benchmarks/predict_many_images.py                 # 50 vs 500 images of 96 px
    python benchmarks/predict_many_images.py --large 2000    # longer, clearer
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _null_backend(tiles: np.ndarray) -> np.ndarray:
    probs = np.zeros((len(tiles), 4, *tiles.shape[1:3]), np.float32)
    probs[:, 1] = 1.0
    return probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50, help="images of the short run")
    parser.add_argument("--large", type=int, default=500, help="images of the long run")
    parser.add_argument("--side", type=int, default=96, help="image side in px")
    parser.add_argument("--workdir", type=Path, help="keep the images here (default: temp)")
    args = parser.parse_args(argv)
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")

    import hisynseg.inference.predict as predict_module
    from hisynseg.datasets.io import write_rgb_png
    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.inference.outputs import ClassLabels
    from hisynseg.inference.predict import PredictOptions, predict_inputs

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hisynseg-many-"))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.large):
        path = images / f"patch{i:05d}.png"
        if not path.exists():
            write_rgb_png(path, rng.integers(0, 256, (args.side, args.side, 3), np.uint8))
        paths.append(path)

    record_seconds = [0.0]
    write_json = predict_module.atomic_write_json

    def timed_write(path: Path, obj: object) -> None:
        start = time.perf_counter()
        write_json(path, obj)
        record_seconds[0] += time.perf_counter() - start

    predict_module.atomic_write_json = timed_write
    labels = ClassLabels.from_dataset_dict(get_dataset_spec("luad-histoseg").to_dict())
    tile = max(16, args.side // 2 // 16 * 16)
    options = PredictOptions(tile=tile, overlap=tile // 4, progress=False)
    per_image = {}
    print(
        f"machine: {sys.platform}, images of {args.side}² px, tile {tile}, "
        "network: fixed probabilities (costs nothing)"
    )
    for n in (args.small, args.large):
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        record_seconds[0] = 0.0
        start = time.perf_counter()
        results = predict_inputs(paths[:n], _null_backend, 4, labels, out, options)
        seconds = time.perf_counter() - start
        assert all(r.status == "ok" for r in results), [r.error for r in results]
        per_image[n] = seconds / n
        print(
            f"{n} images: {seconds:.2f} s = {1e3 * per_image[n]:.1f} ms per image; "
            f"predict.json writes {record_seconds[0]:.2f} s ({record_seconds[0] / seconds:.0%})"
        )
    ratio = per_image[args.large] / per_image[args.small]
    print(
        f"per-image time, {args.large} images / {args.small} images: {ratio:.2f} "
        "(about 1: the cost per image does not grow with the images done)"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
