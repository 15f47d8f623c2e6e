"""QuPath GeoJSON of a class mask: polygons along the pixel edges, grouped into outer
rings and holes as OpenCV's two-level hierarchy groups them, streamed or built whole."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from hisynseg.inference.outputs import (
    ClassLabels,
    _corner_grid,
    _square_corners,
    mask_to_geojson,
    write_geojson,
    write_mask_geojson,
)
from test_predict import BG, LABELS, SPEC, _blobs


def _noisy(seed: int, shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5, shape).astype(np.uint8)


def _polygons(feature: dict) -> list[list[np.ndarray]]:
    geom = feature["geometry"]
    polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    return [[np.asarray(ring, np.float64) for ring in rings] for rings in polygons]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area: positive = counter-clockwise in the coordinates' own axes, as
    RFC 7946 has exterior rings (image y points down, so a screen shows them clockwise)."""
    x, y = ring[:-1, 0], ring[:-1, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _inside(rings: list[np.ndarray], shape: tuple[int, int], scale: float) -> np.ndarray:
    """Even-odd test of every pixel centre against all rings (none runs through one)."""
    yy, xx = (np.mgrid[: shape[0], : shape[1]] + 0.5) * scale
    inside = np.zeros(shape, bool)
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True):
            if y0 != y1:
                crosses = (y0 > yy) != (y1 > yy)
                inside ^= crosses & (xx < x0 + (yy - y0) * (x1 - x0) / (y1 - y0))
    return inside


@pytest.mark.parametrize("scale", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("kind", ["blobs", "noisy", "lines"])
def test_polygons_cover_exactly_the_pixels_of_their_class(kind: str, scale: float) -> None:
    if kind == "blobs":
        mask = _blobs()
    elif kind == "noisy":
        mask = _noisy(3)
    else:  # one-pixel lines, a lone pixel, a diagonal of pixels touching at corners
        mask = np.full((20, 30), BG, np.uint8)
        mask[5, 2:25] = 0
        mask[8:18, 4] = 1
        mask[12, 12] = 2
        for i in range(6):
            mask[10 + i, 16 + i] = 3
    data = json.loads(json.dumps(mask_to_geojson(mask, LABELS, scale)))
    by_class = {f["properties"]["classification"]["name"]: f for f in data["features"]}
    present = {LABELS.names[i] for i in np.unique(mask) if i != BG}
    assert set(by_class) == present
    for index, name in enumerate(LABELS.names):
        if name not in by_class:
            continue
        rings = [ring for rings in _polygons(by_class[name]) for ring in rings]
        assert all((ring[0] == ring[-1]).all() and len(ring) >= 5 for ring in rings)
        np.testing.assert_array_equal(_inside(rings, mask.shape, scale), mask == index)
        # Outer rings counter-clockwise, holes clockwise (RFC 7946); the area of the
        # polygons is the class's pixel count, as in the area table.
        area = 0.0
        for polygon in _polygons(by_class[name]):
            assert _signed_area(polygon[0]) > 0
            assert all(_signed_area(hole) < 0 for hole in polygon[1:])
            area += sum(_signed_area(ring) for ring in polygon)
        assert area == pytest.approx((mask == index).sum() * scale * scale)


def test_geojson_is_a_qupath_feature_collection(tmp_path: Path) -> None:
    mask = _blobs()
    write_geojson(tmp_path / "m.geojson", mask_to_geojson(mask, LABELS, 4.0, (100.0, 50.0)))
    data = json.loads((tmp_path / "m.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    by_class = {f["properties"]["classification"]["name"]: f for f in data["features"]}
    assert set(by_class) == {SPEC.class_names[i] for i in range(4)}
    assert by_class[SPEC.class_names[2]]["geometry"]["type"] == "MultiPolygon"
    outer = by_class[SPEC.class_names[0]]["geometry"]
    assert outer["type"] == "Polygon" and len(outer["coordinates"]) == 2  # with its hole
    for index, name in enumerate(SPEC.class_names):
        properties = by_class[name]["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["color"] == list(SPEC.palette[index])
    # Class 2's rectangles, columns 90-150 by rows 10-50 and 90-110 by 80-110, bounded
    # by the outer edges of those pixels, in level-0 pixels.
    boxes = {
        (*ring.min(axis=0).tolist(), *ring.max(axis=0).tolist())
        for ring, *_ in _polygons(by_class[SPEC.class_names[2]])
    }
    assert boxes == {
        (100 + 90 * 4, 50 + 10 * 4, 100 + 151 * 4, 50 + 51 * 4),
        (100 + 90 * 4, 50 + 80 * 4, 100 + 111 * 4, 50 + 111 * 4),
    }


def _geojson_ccomp(mask: np.ndarray, labels: ClassLabels, scale: float) -> dict:
    """The outline of each class grouped by OpenCV's own RETR_CCOMP hierarchy."""
    features = []
    for index, name in enumerate(labels.names):
        binary = (mask == index).astype(np.uint8)
        contours, hierarchy = cv2.findContours(
            _corner_grid(binary), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
        )
        if hierarchy is None:
            continue

        def ring(c: np.ndarray, clockwise: bool, binary: np.ndarray = binary) -> list:
            pts = c.reshape(-1, 2).astype(np.int64)
            pts, _ = _square_corners(pts, np.array([0]), np.array([len(pts)]), binary)
            x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
            if (float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) > 0) != clockwise:
                pts = pts[::-1]
            out = np.round(pts * (scale / 2), 3).tolist()
            return [*out, out[0]]

        polygons = []
        hier = hierarchy[0]
        for i, contour in enumerate(contours):
            if hier[i][3] != -1:
                continue
            rings, child = [ring(contour, True)], hier[i][2]
            while child != -1:
                rings.append(ring(contours[child], False))
                child = hier[child][0]
            polygons.append(rings)
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        color = list(labels.palette[index])
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {"name": name, "color": color},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _grouping(collection: dict) -> list[frozenset]:
    """Each feature as its set of polygons, each an outer ring and a set of holes, each
    ring its set of vertices: free of where rings start and the order OpenCV lists them."""

    def vertices(ring: np.ndarray) -> frozenset:
        return frozenset(map(tuple, ring.tolist()))

    return [
        frozenset(
            (vertices(rings[0]), frozenset(vertices(hole) for hole in rings[1:]))
            for rings in _polygons(feature)
        )
        for feature in collection["features"]
    ]


def test_grouping_equals_opencvs_hierarchy_and_streams_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    noisy = _noisy(7)
    blocky = cv2.resize(noisy[:20, :25], (100, 80), interpolation=cv2.INTER_NEAREST)
    blocky[30:60, 30:70] = rng.integers(0, 5, (30, 40))  # islands inside holes
    for mask in (noisy, blocky, _blobs()):
        expected = _geojson_ccomp(mask, LABELS, 2.5)
        assert len(expected["features"]) >= 3
        assert _grouping(mask_to_geojson(mask, LABELS, 2.5)) == _grouping(expected)
        write_geojson(tmp_path / "a.geojson", mask_to_geojson(mask, LABELS, 2.5))
        write_mask_geojson(tmp_path / "b.geojson", mask, LABELS, 2.5)
        assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    one = np.full((20, 20), BG, np.uint8)
    one[5:9, 5:12] = 2  # a single polygon of a single class
    write_geojson(tmp_path / "a.geojson", mask_to_geojson(one, LABELS, 1.0, (3.0, 4.0)))
    write_mask_geojson(tmp_path / "b.geojson", one, LABELS, 1.0, (3.0, 4.0))
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    geometry = json.loads((tmp_path / "b.geojson").read_text())["features"][0]["geometry"]
    assert geometry == {
        "type": "Polygon",
        "coordinates": [[[15.0, 9.0], [15.0, 13.0], [8.0, 13.0], [8.0, 9.0], [15.0, 9.0]]],
    }
