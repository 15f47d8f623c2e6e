"""Bézier synthesis: point sampling, the closed curve, the shape guard, pasting and pairs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from hisynseg.datasets.spec import get_dataset_spec
from hisynseg.datasets.toy import class_colours, make_toy_dataset
from hisynseg.synthesis.bezier import (
    BezierParams,
    BezierParamsError,
    bezier,
    ccw_sort,
    closed_bezier_curve,
    random_points,
    shape_mask,
)
from hisynseg.synthesis.generate import default_params, generate_one, synthesize
from hisynseg.synthesis.pool import SourcePool, SynthesisError

LAYOUTS = ("luad-histoseg", "bcss-wsss", "wsss4luad", "generic")


@pytest.fixture(scope="module")
def flat_pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourcePool]:
    """Flat-colour toy datasets in every layout. WSSS4LUAD-style patches vary in size
    (60-100 px) and half of them have a white background corner."""
    pools = {}
    for name in LAYOUTS:
        toy = make_toy_dataset(
            tmp_path_factory.mktemp(name),
            name,
            single_per_class=4,
            multi_train=2,
            num_val=0,
            num_test=0,
            patch_size=80 if name == "wsss4luad" else 64,
            style="flat",
            seed=4,
        )
        pools[name] = SourcePool.build(toy.root, toy.spec, workers=2, progress=False)
    return pools


def eroded(region: np.ndarray) -> np.ndarray:
    return cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def test_defaults_are_the_papers() -> None:
    p = BezierParams()
    assert (p.output_size, p.num_points, p.rad, p.edgy, p.points_per_segment) == (
        224,
        5,
        0.2,
        0.05,
        100,
    )
    assert p.effective_min_distance == pytest.approx(0.7 / 5)
    assert p.max_point_retries == 200 and p.pairs == "random"
    assert p.foreground_share == (0.05, 0.95)
    assert default_params("bezier", get_dataset_spec("wsss4luad")).pairs == ((0, 1), (1, 0))
    assert default_params("bezier", get_dataset_spec("bcss-wsss")).pairs == "random"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_points": 2},
        {"pairs": "sometimes"},
        {"pairs": ((1, 1),)},
        {"pairs": ()},
        {"foreground_share": (0.6, 0.4)},
        {"foreground_share": (0.0, 1.5)},
        {"resize_interpolation": "lanczos9"},
        {"points_per_segment": 1},
    ],
)
def test_bad_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(BezierParamsError):
        BezierParams(**kwargs)


def test_pairs_are_normalised_and_checked_against_the_classes() -> None:
    p = BezierParams(pairs=[[0, 1], [2, 0]])  # e.g. read back from JSON
    assert p.pairs == ((0, 1), (2, 0))
    p.check_classes(3)
    with pytest.raises(BezierParamsError, match="outside"):
        p.check_classes(2)


def test_ccw_sort_orders_by_angle() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = ccw_sort(rng.random((7, 2)))
        d = pts - pts.mean(axis=0)
        assert np.all(np.diff(np.arctan2(d[:, 1], d[:, 0])) > 0)


def test_random_points_are_far_enough_apart() -> None:
    """Consecutive counter-clockwise points, closing pair included, are >= 0.7/n apart
    (Euclidean) whenever the retries found such a set — which they do for n = 5."""
    for seed in range(200):
        pts = random_points(np.random.default_rng(seed), 5, 0.14, 200)
        assert pts.shape == (5, 2) and pts.min() >= 0 and pts.max() < 1
        assert (ccw_sort(pts) == pts).all()
        closing = np.vstack([pts, pts[:1]])
        dist = np.sqrt(((closing[1:] - closing[:-1]) ** 2).sum(axis=1))
        assert dist.min() >= 0.14


def test_random_points_give_up_after_the_retries() -> None:
    # An impossible distance: the last draw is returned after exactly 1 + retries draws.
    rng = np.random.default_rng(0)
    pts = random_points(rng, 5, 1.45, max_retries=3)
    replay = np.random.default_rng(0)
    for _ in range(4):
        last = replay.random((5, 2))
    assert np.allclose(np.sort(pts, axis=0), np.sort(last, axis=0))


def test_closed_curve_passes_through_the_points_and_is_c1() -> None:
    rng = np.random.default_rng(3)
    pts = ccw_sort(rng.random((5, 2)) * 100)
    assert closed_bezier_curve(pts, points_per_segment=100).shape == (500, 2)
    # Dense sampling, so that chords approximate tangents.
    segments = closed_bezier_curve(pts, 0.2, 0.05, 20000).reshape(5, 20000, 2)
    for i in range(5):
        assert np.allclose(segments[i, 0], pts[i])
        assert np.allclose(segments[i, -1], pts[(i + 1) % 5])
        # The tangent leaving point i+1 has the direction of the tangent arriving there.
        arriving = segments[i, -1] - segments[i, -2]
        leaving = segments[(i + 1) % 5, 1] - segments[(i + 1) % 5, 0]
        cos = arriving @ leaving / (np.linalg.norm(arriving) * np.linalg.norm(leaving))
        assert cos > 0.999


def test_tangent_blend_follows_the_edgy_formula() -> None:
    """At each point the curve leaves along p·θ_i + (1-p)·θ_(i-1), p = atan(edgy)/π + 1/2."""
    pts = ccw_sort(np.array([[0.0, 0.0], [4.0, 0.5], [5.0, 4.0], [1.0, 5.0], [-1.0, 2.0]]))
    edgy = 0.7
    curve = closed_bezier_curve(pts, rad=0.3, edgy=edgy, points_per_segment=1000)
    seg = np.roll(pts, -1, axis=0) - pts
    theta = np.mod(np.arctan2(seg[:, 1], seg[:, 0]), 2 * np.pi)
    p = math.atan(edgy) / math.pi + 0.5
    for i in range(5):
        prev = theta[i - 1]
        want = p * theta[i] + (1 - p) * prev + (math.pi if abs(prev - theta[i]) > math.pi else 0)
        d = curve[i * 1000 + 1] - curve[i * 1000]
        got = math.atan2(d[1], d[0])
        assert math.cos(got - want) > 0.9999


def test_shapes_are_one_region_within_the_share_guard() -> None:
    params = BezierParams()
    rng = np.random.default_rng(11)
    for _ in range(300):
        mask = shape_mask(rng, params)
        assert mask.shape == (224, 224) and set(np.unique(mask)) <= {0, 1}
        share = mask.mean()
        assert 0.05 <= share <= 0.95
        count, _ = cv2.connectedComponents(mask, connectivity=8)
        assert count - 1 == 1, "the foreground must be one closed region"


def test_share_guard_redraws_and_can_be_disabled() -> None:
    narrow = BezierParams(output_size=64, foreground_share=(0.3, 0.35), max_shape_draws=5000)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert 0.3 <= shape_mask(rng, narrow).mean() <= 0.35
    impossible = BezierParams(output_size=64, foreground_share=(0.99, 1.0), max_shape_draws=10)
    with pytest.raises(SynthesisError, match="foreground share"):
        shape_mask(rng, impossible)
    BezierParams(foreground_share=(0.0, 1.0))  # the guard off is valid


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pixels_follow_the_mask(flat_pools: dict[str, SourcePool], layout: str) -> None:
    """Away from boundaries, each pixel has its mask class's colour; white background
    pixels of WSSS4LUAD-style sources get the background index."""
    pool = flat_pools[layout]
    spec = pool.spec
    params = BezierParams(output_size=64, pairs=default_params("bezier", spec).pairs)
    colours = class_colours(spec.num_classes)
    seen_background = False
    for draw in range(40):
        sample = generate_one(pool, "bezier", params, seed=2, draw=draw)
        image, mask = sample.image, sample.mask
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        classes = [int(pool.classes[i]) for i in sample.sources]
        assert classes[0] != classes[1]
        if isinstance(params.pairs, tuple):
            assert tuple(classes) in params.pairs
        tissue = set(np.unique(mask).tolist()) - {spec.background_index}
        assert tissue <= set(classes)
        checked = 0
        for value in np.unique(mask):
            inner = eroded(mask == value)
            checked += int(inner.sum())
            if value == spec.background_index:
                seen_background = True
                assert not inner.any() or image[inner].min() >= 230
            else:
                assert (image[inner] == colours[value]).all()
        assert checked > 0.4 * mask.size
    assert seen_background == (layout == "wsss4luad")


def test_hard_paste_and_mask_formula() -> None:
    """image = M·fg + (1-M)·bg and mask = M·B + (1-M)·A, with an explicit pair."""
    spec = get_dataset_spec("luad-histoseg")
    rng_img = np.random.default_rng(0)
    textures = [[rng_img.integers(0, 200, (64, 64, 3), dtype=np.uint8)] for _ in range(4)]
    pool = SourcePool.from_arrays(spec, textures)
    params = BezierParams(output_size=64, pairs=((3, 1),))
    for draw in range(10):
        rng = np.random.default_rng(draw)
        sample = bezier(pool, rng, params)
        back, fore = (pool.images[i] for i in sample.sources)
        shape = sample.mask == 1
        assert set(np.unique(sample.mask).tolist()) == {1, 3}
        assert (sample.image[shape] == fore[shape]).all()
        assert (sample.image[~shape] == back[~shape]).all()


def test_random_pairs_use_classes_with_sources_only() -> None:
    spec = get_dataset_spec("bcss-wsss")
    colours = class_colours(4)
    pool = SourcePool.from_arrays(
        spec, [[np.full((64, 64, 3), colours[c], np.uint8)] if c != 2 else [] for c in range(4)]
    )
    params = BezierParams(output_size=64)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        sample = bezier(pool, rng, params)
        seen.add(tuple(int(pool.classes[i]) for i in sample.sources))
    assert seen == {(a, b) for a in (0, 1, 3) for b in (0, 1, 3) if a != b}
    with pytest.raises(SynthesisError, match="no single-label source"):
        bezier(pool, rng, BezierParams(output_size=64, pairs=((2, 0),)))


def test_sources_are_resized_to_the_output_size() -> None:
    spec = get_dataset_spec("wsss4luad")
    colours = class_colours(3)
    sizes = [(50, 90), (300, 120), (224, 224)]
    pool = SourcePool.from_arrays(
        spec, [[np.full((*sizes[c], 3), colours[c], np.uint8)] for c in range(3)]
    )
    params = BezierParams(output_size=96, pairs=((0, 1), (1, 2), (2, 0)))
    for draw in range(10):
        sample = bezier(pool, np.random.default_rng(draw), params)
        assert sample.image.shape == (96, 96, 3)
        for value in np.unique(sample.mask):
            inner = eroded(sample.mask == value)
            assert (sample.image[inner] == colours[value]).all()


def test_pairs_naming_a_class_without_sources_are_refused_before_any_draw(
    tmp_path: Path,
) -> None:
    spec = get_dataset_spec("wsss4luad")
    img = np.full((64, 64, 3), (120, 40, 170), np.uint8)
    pool = SourcePool.from_arrays(spec, [[img], [], [img]])  # no stroma sources
    out = tmp_path / "o"
    params = BezierParams(output_size=64, pairs=((0, 2), (0, 1), (1, 0)))
    with pytest.raises(SynthesisError, match=r"in-memory source pool: .* 1 \(stroma\)"):
        synthesize(None, spec, "bezier", 5, out, params=params, pool=pool, progress=False)
    assert not list((out / "img").iterdir())
    # Pairs between classes that have sources are fine.
    ok = BezierParams(output_size=64, pairs=((0, 2), (2, 0)))
    assert (
        synthesize(None, spec, "bezier", 2, out, params=ok, pool=pool, progress=False).written == 2
    )

    # Random pairs need two classes with sources; the message names the dataset root.
    toy = make_toy_dataset(
        tmp_path / "d",
        "luad-histoseg",
        single_per_class=2,
        multi_train=0,
        num_val=0,
        num_test=0,
        patch_size=32,
    )
    one_class = SourcePool.build(toy.root, toy.spec, progress=False)
    for image in one_class.sources:
        if image.class_index != 0:
            assert image.path is not None
            image.path.unlink()
    with pytest.raises(
        SynthesisError, match=re.escape(f"{toy.root / toy.spec.layout.train}: ") + ".*only class 0"
    ):
        synthesize(
            toy.root,
            toy.spec,
            "bezier",
            5,
            tmp_path / "r",
            params=BezierParams(output_size=32),
            progress=False,
        )
