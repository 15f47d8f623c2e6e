"""Mosaic synthesis: parameters, the composed affine warp, pixel/mask agreement, background."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.datasets.toy import class_colours, make_toy_dataset
from hisynseg.synthesis.generate import METHODS, generate_one
from hisynseg.synthesis.mosaic import (
    MosaicParams,
    MosaicParamsError,
    _draw_tile,
    anchor,
    mosaic,
    quadrant_matrix,
)
from hisynseg.synthesis.pool import SourcePool, SynthesisError

LAYOUTS = ("luad-histoseg", "bcss-wsss", "wsss4luad", "generic")
SMALL = MosaicParams(tile_size=32, output_size=64)


@pytest.fixture(scope="module")
def flat_pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourcePool]:
    """Flat-colour toy datasets (one constant colour per class) in every layout."""
    pools = {}
    for name in LAYOUTS:
        root = tmp_path_factory.mktemp(name)
        toy = make_toy_dataset(
            root,
            name,
            single_per_class=4,
            multi_train=2,
            num_val=0,
            num_test=0,
            patch_size=64,
            style="flat",
            seed=3,
        )
        pools[name] = SourcePool.build(toy.root, toy.spec, workers=2, progress=False)
    return pools


def quadrant_ids(seed_entropy: list[int] | int, params: MosaicParams) -> np.ndarray:
    """Which quadrant each output pixel belongs to, from the anchor (the generator's first
    two draws, see :func:`mosaic`)."""
    rng = np.random.default_rng(seed_entropy)
    s = params.output_size
    h = anchor(s, rng.uniform(*params.anchor_range))
    w = anchor(s, rng.uniform(*params.anchor_range))
    yy, xx = np.mgrid[0:s, 0:s]
    return (yy >= h) * 2 + (xx >= w)


def assert_colours_follow_mask(
    image: np.ndarray, mask: np.ndarray, pool: SourcePool, pieces: np.ndarray | None = None
) -> None:
    """Away from class boundaries (each class region eroded by 2 px) every pixel has the
    colour of the class its mask gives; background pixels are white.

    ``pieces`` splits the image into separately transformed parts (Mosaic quadrants): a
    region is eroded within its part, and at the image border, because bilinear sampling
    at the edge of a crop may show the fringe of a class region that the crop cut away.
    """
    colours = class_colours(pool.spec.num_classes)
    kernel = np.ones((5, 5), np.uint8)
    if pieces is None:
        pieces = np.zeros(mask.shape, np.int64)
    checked = 0
    for piece in np.unique(pieces):
        for value in np.unique(mask[pieces == piece]):
            region = (mask == value) & (pieces == piece)
            inner = cv2.erode(
                region.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
            ).astype(bool)
            if not inner.any():
                continue
            checked += int(inner.sum())
            if value == pool.spec.background_index:
                assert image[inner].min() >= 230, "background pixels must be white"
            else:
                assert (image[inner] == colours[value]).all(), f"class {value}: foreign colours"
    assert checked > 0.4 * mask.size


def test_defaults_are_the_papers() -> None:
    p = MosaicParams()
    assert (p.tiles_per_side, p.tile_size, p.output_size, p.grid_size) == (2, 112, 224, 224)
    assert p.anchor_range == (0.2, 0.8) and p.flip_p == 0.8 and p.ssr_p == 0.8
    assert (p.shift_limit, p.scale_limit, p.rotate_limit) == (0.0625, 0.2, 45.0)
    assert p.max_background_share == 0.8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_size": 300},
        {"anchor_range": (0.0, 0.5)},
        {"anchor_range": (0.6, 0.4)},
        {"flip_p": 1.5},
        {"tile_sampling": "pixel"},
        {"max_background_share": -0.1},
        {"scale_limit": 1.0},
    ],
)
def test_bad_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(MosaicParamsError):
        MosaicParams(**kwargs)


def test_anchor_is_even_and_rounds_up() -> None:
    assert anchor(224, 0.2) == 44  # int(44.8) = 44
    assert anchor(224, 0.5) == 112
    assert anchor(225, 0.2) == 46  # int(45.0) = 45 -> 46
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = anchor(224, rng.uniform(0.2, 0.8))
        assert h % 2 == 0 and 44 <= h <= 180


def test_quadrant_warp_equals_flip_then_ssr_then_crop() -> None:
    """One composed warp gives what the sequential flip → shift-scale-rotate → crop gives."""
    rng_img = np.random.default_rng(1)
    g = 64
    grid = cv2.GaussianBlur(rng_img.integers(0, 256, (g, g, 3), dtype=np.uint8), (5, 5), 2)
    grid_mask = (np.arange(g)[None, :] // 16 + 4 * (np.arange(g)[:, None] // 16)).astype(np.uint8)
    params = MosaicParams(tile_size=32, output_size=64)
    for seed in range(40):
        qh, qw = 24 + seed % 7, 40 - seed % 5
        matrix = quadrant_matrix(np.random.default_rng(seed), params, qh, qw)
        # Sequential reference: replay the same draws step by step.
        rng = np.random.default_rng(seed)
        img, msk = grid, grid_mask
        if rng.random() < params.flip_p:
            code = {0: 0, 1: 1, 2: -1}[int(rng.integers(3))]  # cv2.flip codes
            img, msk = cv2.flip(img, code), cv2.flip(msk, code)
        if rng.random() < params.ssr_p:
            angle = rng.uniform(-45, 45)
            scale = rng.uniform(0.8, 1.2)
            dx, dy = rng.uniform(-0.0625, 0.0625) * g, rng.uniform(-0.0625, 0.0625) * g
            m = cv2.getRotationMatrix2D(((g - 1) / 2, (g - 1) / 2), angle, scale)
            m[:, 2] += (dx, dy)
            img = cv2.warpAffine(
                img, m, (g, g), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
            msk = cv2.warpAffine(
                msk, m, (g, g), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
            )
        y0, x0 = int(rng.integers(g - qh + 1)), int(rng.integers(g - qw + 1))
        want_img, want_msk = img[y0 : y0 + qh, x0 : x0 + qw], msk[y0 : y0 + qh, x0 : x0 + qw]
        got_img = cv2.warpAffine(
            grid, matrix, (qw, qh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        got_msk = cv2.warpAffine(
            grid_mask, matrix, (qw, qh), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
        )
        # Fixed-point sub-pixel rounding may differ by one step between the two routes.
        assert np.abs(got_img.astype(int) - want_img.astype(int)).max() <= 2
        assert (got_msk == want_msk).mean() > 0.99


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pixels_follow_the_mask(flat_pools: dict[str, SourcePool], layout: str) -> None:
    pool = flat_pools[layout]
    seen_background = False
    for draw in range(40):
        sample = generate_one(pool, "mosaic", SMALL, seed=5, draw=draw)
        assert sample.image.shape == (64, 64, 3) and sample.mask.shape == (64, 64)
        assert len(sample.sources) == 16
        pieces = quadrant_ids([5, METHODS["mosaic"], draw], SMALL)
        assert_colours_follow_mask(sample.image, sample.mask, pool, pieces)
        tissue = set(np.unique(sample.mask)) - {pool.spec.background_index}
        assert tissue <= set(range(pool.spec.num_classes))
        seen_background |= pool.spec.background_index in sample.mask
    # The WSSS4LUAD toy sources have white corners: some must reach the masks.
    assert seen_background == (layout == "wsss4luad")


def test_same_rng_state_same_sample(flat_pools: dict[str, SourcePool]) -> None:
    pool = flat_pools["luad-histoseg"]
    a = mosaic(pool, np.random.default_rng(7), SMALL)
    b = mosaic(pool, np.random.default_rng(7), SMALL)
    assert (a.image == b.image).all() and (a.mask == b.mask).all() and a.sources == b.sources


def _half_white_pool(share_white: float) -> SourcePool:
    spec = get_dataset_spec("wsss4luad")
    image = np.full((64, 64, 3), (40, 70, 200), np.uint8)
    image[:, : int(64 * share_white)] = 255
    return SourcePool.from_arrays(spec, [[image], [image.copy()], [image.copy()]])


def test_tiles_respect_the_background_share() -> None:
    pool = _half_white_pool(0.625)  # 32-px crops hold 25 %..100 % background
    params = MosaicParams(tile_size=32, output_size=64, max_background_share=0.5)
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(300):
        _, _, tile_mask = _draw_tile(pool, rng, params, pool.present_classes)
        shares.append(np.mean(np.asarray(tile_mask) == pool.spec.background_index))
    assert max(shares) <= 0.5 and min(shares) < 0.4


def test_all_background_sources_fail_clearly() -> None:
    pool = _half_white_pool(1.0)
    params = MosaicParams(tile_size=32, output_size=64, max_tile_draws=20)
    with pytest.raises(SynthesisError, match="background"):
        mosaic(pool, np.random.default_rng(0), params)


def test_tile_sampling_by_image_or_by_class() -> None:
    spec = get_dataset_spec("luad-histoseg")
    colours = class_colours(4)
    many = [np.full((40, 40, 3), colours[0], np.uint8) for _ in range(19)]
    one = [np.full((40, 40, 3), colours[1], np.uint8)]
    pool = SourcePool.from_arrays(spec, [many, one, [], []])
    counts = {}
    for sampling in ("image", "class"):
        params = MosaicParams(tile_size=32, output_size=64, tile_sampling=sampling)
        rng = np.random.default_rng(0)
        classes = [int(pool.classes[_draw_tile(pool, rng, params, (0, 1))[0]]) for _ in range(2000)]
        counts[sampling] = np.bincount(classes, minlength=2) / 2000
    assert abs(counts["image"][1] - 1 / 20) < 0.02
    assert abs(counts["class"][1] - 0.5) < 0.05


def test_sources_smaller_than_a_tile_are_padded() -> None:
    spec = get_dataset_spec("luad-histoseg")
    colours = class_colours(4)
    pool = SourcePool.from_arrays(
        spec, [[np.full((20, 24, 3), colours[c], np.uint8)] for c in range(4)]
    )
    sample = mosaic(pool, np.random.default_rng(0), SMALL)
    assert_colours_follow_mask(sample.image, sample.mask, pool, quadrant_ids(0, SMALL))


def test_pool_relpaths_are_relative_to_root(flat_pools: dict[str, SourcePool]) -> None:
    pool = flat_pools["bcss-wsss"]
    assert pool.root is not None
    for src in pool.sources:
        assert src.relpath.startswith("training/")
        assert (pool.root / src.relpath).is_file()
        assert Path(src.relpath).name.endswith("].png")
    assert pool.class_counts == (4, 4, 4, 4)


def test_background_mask_thresholds_and_small_regions() -> None:
    from hisynseg.synthesis.background import background_mask, spec_background_mask

    image = np.full((40, 40, 3), (120, 40, 170), np.uint8)
    image[:20, :20] = 250  # 400 px bright region: background
    image[30:33, 30:33] = 250  # 9 px bright speck: stays tissue
    image[25, :] = 205  # grey 205 <= 210: not bright
    bg = background_mask(image, 210, 64)
    assert bg.dtype == bool and bg[:20, :20].all() and bg.sum() == 400
    assert not background_mask(np.zeros((8, 8, 3), np.uint8), 210, 64).any()
    wsss, luad = get_dataset_spec("wsss4luad"), get_dataset_spec("luad-histoseg")
    assert (spec_background_mask(image, wsss) == bg).all()
    assert spec_background_mask(image, luad) is None
    assert spec_background_mask(np.zeros((8, 8, 3), np.uint8), wsss) is None
