"""Does the image filter learn to reject a visible synthesis artefact? (slow; outside CI)

A small generated problem: real images are the multi-label images of a toy LUAD-layout
dataset (smooth, curved class boundaries); synthetic images are Mosaic images of its
single-label images, in two variants made from the same draws:

* **seamed**: a dark line, ``--seam-width`` px wide, drawn wherever the mask changes
  class (along tile and quadrant boundaries), a caricature of a synthesis artefact;
* **clean**: the same images without the line.

The filter is trained on real vs *seamed* images (held-out draws are used for scoring),
then fresh seamed and clean images, and fresh real images, are scored. A filter that
learned the artefact keeps clearly fewer seamed than clean images at p(real) > 0.5.

Run (CPU, a few minutes at 64 px)::

    .venv/bin/python benchmarks/filter_seam_check.py
    .venv/bin/python benchmarks/filter_seam_check.py --size 64 --epochs 5 --train 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from hisynseg.datasets.io import list_images, read_rgb, write_rgb_png
from hisynseg.datasets.toy import make_toy_dataset
from hisynseg.synthesis.discriminator import FilterTrainConfig, load_filter, train_filter
from hisynseg.synthesis.generate import generate_one
from hisynseg.synthesis.mosaic import MosaicParams
from hisynseg.synthesis.pool import SourcePool


def add_seams(
    image: np.ndarray, mask: np.ndarray, width: int = 2, shade: float = 0.3
) -> np.ndarray:
    """Darken a ``width``-px line along every boundary between mask classes."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width // 2)
    out = image.astype(np.float32)
    out[edge] *= shade
    return out.astype(np.uint8)


def draw_mosaics(
    pool: SourcePool, params: MosaicParams, draws: range, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, mask)`` of each Mosaic draw (a pure function of the seed and the draw)."""
    out = []
    for j in draws:
        sample = generate_one(pool, "mosaic", params, seed, j)
        out.append((sample.image, sample.mask))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image side (default 64)")
    ap.add_argument("--real", type=int, default=300, help="real multi-label images (default 300)")
    ap.add_argument("--train", type=int, default=300, help="seamed training images (default 300)")
    ap.add_argument("--test", type=int, default=200, help="fresh images scored per kind")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seam-width", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the generated files here (default: a temp dir)")
    args = ap.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        # Real images for training/validation, and a second dataset for fresh real images.
        toy = make_toy_dataset(
            work / "data",
            "luad-histoseg",
            single_per_class=25,
            multi_train=args.real,
            num_val=0,
            num_test=0,
            patch_size=args.size,
            seed=args.seed,
        )
        fresh_real = make_toy_dataset(
            work / "fresh",
            "luad-histoseg",
            single_per_class=0,
            multi_train=args.test,
            num_val=0,
            num_test=0,
            patch_size=args.size,
            seed=args.seed + 1,
        )
        pool = SourcePool.build(toy.root, toy.spec, progress=False)
        params = MosaicParams(tile_size=args.size // 2, output_size=args.size)

        train_draws = draw_mosaics(pool, params, range(args.train), args.seed)
        for i, (image, mask) in enumerate(train_draws):
            write_rgb_png(
                work / "seamed" / "img" / f"seamed_{i:05d}.png",
                add_seams(image, mask, args.seam_width),
            )
        fresh = draw_mosaics(pool, params, range(args.train, args.train + args.test), args.seed)
        has_seam = np.array(
            [(m[:, 1:] != m[:, :-1]).any() or (m[1:] != m[:-1]).any() for _, m in fresh]
        )

        config = FilterTrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.size,
            seed=args.seed,
            device="auto",
        )
        t0 = time.perf_counter()
        result = train_filter(
            toy.root,
            toy.spec,
            work / "seamed",
            work / "filter",
            method="mosaic",
            config=config,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        scorer = load_filter(work / "filter" / "filter.pt", dataset=toy.spec, method="mosaic")

        p_seamed = scorer([add_seams(im, m, args.seam_width) for im, m in fresh])
        p_clean = scorer([im for im, _ in fresh])
        p_real = scorer([read_rgb(p) for p in list_images(fresh_real.root / "train")])

    c = result.counts
    print(f"filter seam check: {args.size} px, seam {args.seam_width} px, device {scorer.device}")
    print(
        f"trained on {c['train_real']} real + {c['train_synthetic']} seamed, validated on "
        f"{c['val_real']} + {c['val_synthetic']}; {args.epochs} epochs in {train_s:.0f} s"
    )
    print(result.history_table())
    print(
        f"fresh images scored: {len(fresh)} synthetic draws ({int(has_seam.sum())} with a "
        f"class boundary, so a seam), {len(p_real)} real"
    )
    print("kind                 kept (p>0.5)   mean p(real)")
    rows = [("seamed synthetic", p_seamed), ("clean synthetic", p_clean)]
    if not has_seam.all():
        # Draws whose tiles are all of one class have no boundary, hence no seam.
        rows += [
            ("  seamed, boundary", p_seamed[has_seam]),
            ("  clean, boundary", p_clean[has_seam]),
        ]
    rows.append(("real (held out)", p_real))
    for name, p in rows:
        print(f"{name:<20} {np.mean(p > 0.5):>12.1%}   {np.mean(p):>12.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
