"""Writing what a prediction produced: masks, overlays, area tables, QuPath GeoJSON.

* **Mask**: an indexed palette PNG for pictures (:func:`hisynseg.datasets.io.write_mask_png`),
  a tiled pyramidal TIFF (palette colour map, deflate, reduced levels as SubIFDs) for
  slides, streamed from the disk canvas a band of rows at a time.
* **Overlay**: the class colours blended over a thumbnail of the image (background left
  as the image).
* **Areas**: pixels, share of the tissue and, when the resolution is known, µm² per class.
* **GeoJSON**: one QuPath annotation per class, a Polygon or MultiPolygon (with holes) of
  its regions in level-0 pixel coordinates of the slide, the coordinates QuPath's
  *File → Import objects* expects.

All files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from hisynseg.datasets.io import atomic_path, atomic_write_text
from hisynseg.inference.canvas import DiskCanvas

__all__ = [
    "ClassLabels",
    "area_table",
    "mask_to_geojson",
    "write_area_csv",
    "write_geojson",
    "write_mask_geojson",
    "write_mask_tiff",
]


class ClassLabels(NamedTuple):
    """Names and colours of a model's classes.

    Attributes:
        names: Tissue class names, in output-channel order.
        palette: RGB of every mask value: the tissue classes, then background.
        background_index: Mask value of background (glass, unpredicted pixels).
    """

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    background_index: int

    @classmethod
    def from_dataset_dict(cls, data: Mapping[str, Any]) -> ClassLabels:
        """From a stored dataset description (``DatasetSpec.to_dict()``)."""
        names = tuple(str(c) for c in data["classes"])
        palette = tuple(tuple(int(v) for v in c) for c in data["palette"])
        bg = int(data.get("background_index", len(names)))
        if len(palette) <= max(bg, len(names) - 1):
            raise ValueError(f"palette of {len(palette)} colours for {len(names)} classes")
        return cls(names, palette, bg)  # type: ignore[arg-type]

    @classmethod
    def default(cls, num_classes: int) -> ClassLabels:
        """Placeholder names and a fixed colour cycle, for models without a description."""
        cycle = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
        cycle += [(70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
        palette = tuple(cycle[i % len(cycle)] for i in range(num_classes)) + ((255, 255, 255),)
        return cls(tuple(f"class {i}" for i in range(num_classes)), palette, num_classes)

    def name(self, index: int) -> str:
        if index == self.background_index:
            return "background"
        return self.names[index] if 0 <= index < len(self.names) else f"value {index}"


def _colormap(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """TIFF palette colour map: ``3×256`` ``uint16`` (8-bit colours scaled by 257)."""
    cmap = np.zeros((3, 256), np.uint16)
    colours = np.asarray(palette, np.uint16).reshape(-1, 3)
    cmap[:, : len(colours)] = colours.T * 257
    return cmap


def write_mask_tiff(
    path: str | os.PathLike[str],
    canvas: DiskCanvas,
    palette: Sequence[Sequence[int]],
    mpp: float | None = None,
    tile: int = 256,
    min_side: int = 512,
    temp_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Write an ``H×W`` ``uint8`` canvas as a tiled pyramidal palette TIFF, atomically.

    Level 0 is the canvas; each further level halves it (nearest neighbour, so values stay
    class indices) until its longer side is at most ``min_side``; reduced levels are
    SubIFDs of level 0 (as OME-TIFF and QuPath read them). Each level is built from the
    previous one in bands, so memory stays at a few bands of rows.

    Args:
        path: Destination (``.tif``).
        canvas: The mask.
        palette: RGB of every mask value.
        mpp: Microns per canvas pixel, stored as the resolution (per centimetre).
        tile: TIFF tile side (a multiple of 16).
        min_side: Stop adding levels once the longer side is at most this.
        temp_dir: Folder of the reduced levels and the TIFF being written (default: beside
            ``path``; on its file system).

    Returns:
        Number of levels written.
    """
    from hisynseg.slides.tiff import import_tifffile

    tifffile = import_tifffile(path)
    path = Path(path)
    temp_dir = path.parent if temp_dir is None else Path(temp_dir)
    levels = [canvas]
    temps: list[DiskCanvas] = []
    try:
        while max(levels[-1].shape) > min_side and min(levels[-1].shape) > 1:
            prev = levels[-1]
            h, w = (prev.height + 1) // 2, (prev.width + 1) // 2
            nxt = DiskCanvas.create(
                temp_dir / f".{path.name}.level{len(levels)}.tmp", (h, w), np.uint8
            )
            temps.append(nxt)
            for top, rows in prev.bands(2 * tile):
                nxt.write_rows(top // 2, rows[::2, ::2])
            levels.append(nxt)
        cmap = _colormap(palette)
        options: dict[str, Any] = {
            "photometric": "palette",
            "colormap": cmap,
            "compression": "zlib",
            "tile": (tile, tile),
        }
        with (
            atomic_path(path, temp_dir) as tmp,
            tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(canvas)) as tif,
        ):
            for i, level in enumerate(levels):
                extra: dict[str, Any] = (
                    {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
                )
                if mpp is not None:  # each level its own pixel size
                    per_cm = 1e4 / (mpp * canvas.width / level.width)
                    per_cm_y = 1e4 / (mpp * canvas.height / level.height)
                    extra.update(resolution=(per_cm, per_cm_y), resolutionunit="CENTIMETER")
                tif.write(
                    _tiles(level, tile),
                    shape=level.shape,
                    dtype=np.uint8,
                    **options,
                    **extra,
                )
    finally:
        for t in temps:
            t.unlink()
    return len(levels)


def _needs_bigtiff(canvas: DiskCanvas) -> bool:
    # Deflated masks are small, but classic TIFF offsets stop at 4 GiB: be safe early.
    return canvas.height * canvas.width > 2**31


def _tiles(canvas: DiskCanvas, tile: int) -> Any:
    """The canvas as ``tile×tile`` tiles, row by row, padded with zeros at the edges."""
    for _, rows in canvas.bands(tile):
        if rows.shape[0] < tile:
            rows = np.pad(rows, ((0, tile - rows.shape[0]), (0, 0)))
        for left in range(0, canvas.width, tile):
            block = rows[:, left : left + tile]
            if block.shape[1] < tile:
                block = np.pad(block, ((0, 0), (0, tile - block.shape[1])))
            yield np.ascontiguousarray(block)


def area_table(
    counts: np.ndarray,
    labels: ClassLabels,
    output_mpp: float | None,
    level0_per_output: float,
) -> list[dict[str, Any]]:
    """One row per class (then background): pixels, tissue share, area.

    Args:
        counts: Output pixels per mask value (256 entries).
        labels: The classes.
        output_mpp: Microns per output pixel, or ``None`` (µm² columns left empty).
        level0_per_output: Level-0 pixels per output pixel (side).

    Returns:
        Rows with ``index``, ``class``, ``pixels``, ``tissue_fraction``, ``area_um2``,
        ``area_level0_px``.
    """
    counts = np.asarray(counts, np.int64)
    tissue = int(sum(counts[i] for i in range(len(labels.names))))
    rows = []
    for index in [*range(len(labels.names)), labels.background_index]:
        n = int(counts[index])
        rows.append(
            {
                "index": index,
                "class": labels.name(index),
                "pixels": n,
                "tissue_fraction": (
                    round(n / tissue, 6) if tissue and index != labels.background_index else ""
                ),
                "area_um2": round(n * output_mpp**2, 3) if output_mpp is not None else "",
                "area_level0_px": round(n * level0_per_output**2, 3),
            }
        )
    return rows


def write_area_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write :func:`area_table` rows as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class _ClassOutlines(NamedTuple):
    """The contours of one class's mask and which of them make which polygon."""

    points: np.ndarray  # all ring points, N×2, already scaled and rounded (int64 if whole)
    starts: np.ndarray  # first point of each contour
    sizes: np.ndarray  # points of each contour
    screen_cw: np.ndarray  # each contour's orientation on screen (y down)
    outers: list[int]  # outer contours of the polygons, in OpenCV's order
    holes: dict[int, list[int]]  # outer contour -> its holes, in OpenCV's order

    def __len__(self) -> int:
        return len(self.outers)

    def ring(self, i: int, clockwise: bool, offset: tuple[float, float]) -> list[list[float]]:
        # RFC 7946: exterior rings counter-clockwise, holes clockwise (y up). Image y
        # points down, so "counter-clockwise" there is clockwise on screen.
        pts = self.points[self.starts[i] : self.starts[i] + self.sizes[i]].tolist()
        if bool(self.screen_cw[i]) != clockwise:
            pts.reverse()
        pts.append(pts[0])
        ox, oy = offset
        if ox or oy:
            pts = [[x + ox, y + oy] for x, y in pts]
        return pts

    def polygons(self, offset: tuple[float, float]) -> Iterator[Iterator[list[list[float]]]]:
        """Each polygon as its rings, the outer one then its holes, one ring at a time."""
        for i in self.outers:
            yield self._rings(i, offset)

    def _rings(self, i: int, offset: tuple[float, float]) -> Iterator[list[list[float]]]:
        yield self.ring(i, True, offset)
        for j in self.holes.get(i, ()):
            yield self.ring(j, False, offset)


def _corner_grid(binary: np.ndarray) -> np.ndarray:
    """The mask on a grid of pixel corners, edge midpoints and centres.

    Pixel ``(i, j)`` covers ``[j, j + 1] × [i, i + 1]``; grid point ``(r, c)`` is the
    point ``(c / 2, r / 2)``, so each pixel sets a 3×3 block of the ``(2h + 1)×(2w + 1)``
    grid. The grid's foreground is the union of the closed pixel squares, whose border
    pixels lie on the pixel edges: tracing them outlines the pixels themselves.
    """
    h, w = binary.shape
    grid = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    for dy in range(3):
        for dx in range(3):
            block = grid[dy : dy + 2 * h : 2, dx : dx + 2 * w : 2]
            np.bitwise_or(block, binary, out=block)
    return grid


def _on_grid(binary: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether :func:`_corner_grid` is set at grid points ``(c, r)``, from the mask: a
    point is set when a pixel it touches is (without keeping the 4× larger grid)."""
    h, w = binary.shape
    c, r = points[:, 0], points[:, 1]
    found = np.zeros(len(points), bool)
    for rows in ((r - 1) // 2, r // 2):
        for cols in ((c - 1) // 2, c // 2):
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            found[inside] |= binary[rows[inside], cols[inside]] > 0
    return found


def _ring_starts(sizes: np.ndarray) -> np.ndarray:
    """Index of the first point of each ring, rings stored one after another."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _ring_links(starts: np.ndarray, sizes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the next and of the previous point of each point of the rings."""
    nxt = np.arange(1, n + 1, dtype=np.int64)
    nxt[starts + sizes - 1] = starts
    prev = np.arange(-1, n - 1, dtype=np.int64)
    prev[starts] = starts + sizes - 1
    return nxt, prev


def _square_corners(
    points: np.ndarray, starts: np.ndarray, sizes: np.ndarray, binary: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rings with the corners OpenCV cuts put back, and straight runs merged.

    OpenCV follows 8-connected borders, so at a concave corner of the grid's foreground
    (and at every corner of a one-pixel hole) it steps diagonally, past the corner point,
    and the ring cuts off an eighth of a pixel. The corner is whichever of the two points
    beside the diagonal step is foreground.

    Returns:
        ``(points, sizes)`` of the same rings, in the same order.
    """
    nxt, _ = _ring_links(starts, sizes, len(points))
    step = points[nxt] - points
    del nxt
    is_diagonal = (step[:, 0] != 0) & (step[:, 1] != 0)
    diagonal = np.flatnonzero(is_diagonal)
    at, by = points[diagonal], step[diagonal]
    del step
    if (np.abs(by) != 1).any():  # OpenCV's diagonal runs on this grid are single steps
        raise AssertionError("unexpected diagonal run in a pixel outline")
    along_x = np.stack([at[:, 0] + by[:, 0], at[:, 1]], axis=1)
    along_y = np.stack([at[:, 0], at[:, 1] + by[:, 1]], axis=1)
    corners = np.where(_on_grid(binary, along_x)[:, None], along_x, along_y)
    sizes = sizes + np.add.reduceat(is_diagonal.astype(np.int64), starts)
    del is_diagonal, at, by, along_x, along_y
    points = np.insert(points, diagonal + 1, corners.astype(points.dtype), axis=0)
    starts = _ring_starts(sizes)
    # Drop the points in the middle of straight runs (the edge midpoints above): all
    # steps are now along an axis, so a point is mid-run when its step in and out agree.
    nxt, prev = _ring_links(starts, sizes, len(points))
    heading = np.sign(points[nxt] - points).astype(np.int8)
    del nxt
    keep = (heading != heading[prev]).any(axis=1)
    del heading, prev
    return points[keep], np.add.reduceat(keep.astype(np.int64), starts)


def _class_outlines(binary: np.ndarray, sx: float, sy: float) -> _ClassOutlines:
    """The polygons (outer ring, then holes) of a binary mask, along the pixel edges, as
    OpenCV's two-level hierarchy (``RETR_CCOMP``) would group them, built without it.

    The outlines are traced on :func:`_corner_grid`, so each polygon covers exactly its
    pixels (its area is their count; a one-pixel line is a thin rectangle) and
    neighbouring classes share their borders. ``RETR_CCOMP`` takes minutes on a noisy
    slide-sized mask (hundreds of thousands of contours), while ``RETR_LIST`` lists the
    same contours in well under a second. Each contour bounds one 8-connected component
    of the mask; a component's outer border is the contour that starts at its first grid
    point in raster order (border following starts every contour at its first point, and
    a component's first point starts its outer border), its other contours are its
    holes. Vertices are scaled by ``(sx, sy)`` and rounded to 3 decimals.
    """
    grid = _corner_grid(binary)
    contours, _ = cv2.findContours(grid, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    del grid
    if not contours:
        empty = np.zeros(0, np.int64)
        return _ClassOutlines(np.zeros((0, 2)), empty, empty, empty.astype(bool), [], {})
    sizes = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    points = np.concatenate(contours).reshape(-1, 2)  # int32 grid coordinates
    del contours
    starts = _ring_starts(sizes)
    first = points[starts].astype(np.int64)
    points, sizes = _square_corners(points, starts, sizes, binary)
    starts = _ring_starts(sizes)
    # 32-bit labels: OpenCV numbers provisional labels before merging them, so even a
    # mask of a few hundred regions can run out of 16-bit ones.
    _, components = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    h, w = binary.shape
    # A contour starts at the top-left corner of its component's first pixel (an outer
    # border) or just left of a hole's first pixel centre: the pixel at or left of the
    # start, in its row, is of its component; the other is background (label 0).
    label = np.zeros(len(sizes), np.int32)
    rows = np.minimum(first[:, 1] // 2, h - 1)
    for cols in ((first[:, 0] - 1) // 2, first[:, 0] // 2):
        inside = (cols >= 0) & (cols < w)
        np.maximum.at(label, np.flatnonzero(inside), components[rows[inside], cols[inside]])
    del components
    raster = first[:, 1] * (2 * w + 1) + first[:, 0]
    by_label = np.lexsort((raster, label))
    leads = np.concatenate([[True], label[by_label][1:] != label[by_label][:-1]])
    outer = np.zeros(len(sizes), bool)
    outer[by_label[leads]] = True
    # Shoelace sums of all rings at once (exact: integer coordinates in float64);
    # positive = clockwise on screen (image y points down).
    nxt, _ = _ring_links(starts, sizes, len(points))
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    screen_cw = np.add.reduceat(x * y[nxt] - x[nxt] * y, starts) > 0
    del nxt, x, y
    scaled = np.round(points * np.array([sx / 2, sy / 2]), 3)
    if np.array_equal(scaled, np.round(scaled)):
        scaled = scaled.astype(np.int64)  # whole level-0 pixels: JSON writes ints faster
    owner = {}
    outers = []
    for i in np.flatnonzero(outer).tolist():
        owner[int(label[i])] = i
        outers.append(i)
    holes: dict[int, list[int]] = {}
    for j in np.flatnonzero(~outer).tolist():
        i = owner.get(int(label[j]))
        if i is not None:
            holes.setdefault(i, []).append(j)
    return _ClassOutlines(scaled, starts, sizes, screen_cw, outers, holes)


def _feature_properties(labels: ClassLabels, index: int) -> dict[str, Any]:
    name = labels.names[index]
    return {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": name, "color": list(labels.palette[index])},
        "isLocked": False,
    }


def _class_masks(mask: np.ndarray, labels: ClassLabels) -> Iterator[tuple[int, np.ndarray]]:
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    for index in range(len(labels.names)):
        binary = (mask == index).astype(np.uint8)
        if binary.any():
            yield index, binary


def mask_to_geojson(
    mask: np.ndarray,
    labels: ClassLabels,
    scale: float | tuple[float, float] = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """QuPath-importable GeoJSON of the class regions of an index mask.

    One ``Feature`` per class present: geometry ``Polygon`` (one region) or
    ``MultiPolygon``, each polygon its outer boundary then its holes (OpenCV's two-level
    contour hierarchy). Rings run along the pixel edges, so a class's polygons cover
    exactly its pixels (their area is the pixel count, as in the area table) and
    neighbouring classes share their borders; a mask point ``(x, y)`` (pixel ``(i, j)``
    spans ``[j, j + 1] × [i, i + 1]``) maps to level-0 pixels as ``x·scale + offset``.
    Properties follow QuPath:
    ``{"objectType": "annotation", "classification": {"name", "color"}}``.
    :func:`write_mask_geojson` writes the same file without building it in memory.

    Args:
        mask: ``H×W`` class indices.
        labels: Class names and colours (background gets no feature).
        scale: Level-0 pixels per mask pixel, one value or ``(sx, sy)``.
        offset: Level-0 position of the mask's origin.
    """
    sx, sy = (scale, scale) if np.isscalar(scale) else scale  # type: ignore[misc]
    features = []
    for index, binary in _class_masks(mask, labels):
        outlines = _class_outlines(binary, sx, sy)
        if not len(outlines):
            continue
        polygons = [list(rings) for rings in outlines.polygons(offset)]
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": _feature_properties(labels, index),
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_mask_geojson(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    labels: ClassLabels,
    scale: float | tuple[float, float] = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    temp_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Write :func:`mask_to_geojson`'s GeoJSON as :func:`write_geojson` would, atomically,
    a polygon at a time: a noisy slide-sized mask has millions of vertices, which as
    Python objects would take gigabytes.

    ``temp_dir`` holds the file while it is written (default: beside ``path``; on its
    file system).
    """
    sx, sy = (scale, scale) if np.isscalar(scale) else scale  # type: ignore[misc]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with atomic_path(path, temp_dir) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        first = True
        for index, binary in _class_masks(mask, labels):
            outlines = _class_outlines(binary, sx, sy)
            if not len(outlines):
                continue
            fh.write(("" if first else ",") + '{"type":"Feature","geometry":')
            first = False
            multi = len(outlines) > 1
            fh.write('{"type":"MultiPolygon","coordinates":[' if multi else '{"type":"Polygon",')
            for k, rings in enumerate(outlines.polygons(offset)):
                fh.write(("," if k else "") + ("[" if multi else '"coordinates":['))
                for r, ring in enumerate(rings):
                    fh.write(("," if r else "") + dumps(ring))
                fh.write("]")
            fh.write("]}" if multi else "}")
            fh.write(',"properties":' + dumps(_feature_properties(labels, index)) + "}")
        fh.write("]}\n")


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> None:
    """Write a GeoJSON object compactly, atomically."""
    atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")
