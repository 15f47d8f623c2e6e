"""Build the real-H&E demo dataset from the sample images and the project's own annotations.

The annotations (``annotations.geojson`` beside this module) are polygons drawn by this
project over the images of :data:`hisynseg.demo.sources.SOURCES`, in level-0 pixel
coordinates of each image (origin at the top-left corner of the top-left pixel). A
feature either marks a tissue class (``properties: {image, class}``) or a held-out
region (``properties: {image, split}``, ``split`` being ``val`` or ``test``). Pixels
covered by no class polygon are *not annotated* and get the background index, as does
white glass or lumen inside a polygon (found with the same grey-level threshold the
dataset declares for its training patches).

:func:`build_demo_dataset` then, for every annotated image:

1. rasterises the class polygons into an index mask at the image's working scale;
2. cuts training patches only outside the held-out regions (kept ``gap`` pixels away
   from them). A patch's image-level label is the set of classes covering at least
   ``min_class_share`` of it; patches mostly not annotated are dropped. Single-label
   patches (the synthesis pool) are placed first, then multi-label ones, each overlapping
   any chosen patch by at most ``max_overlap`` of its area;
3. tiles every held-out region into evaluation images with pixel masks.

The result is a dataset in the generic layout (``train/`` + ``train.csv``,
``val/{img,mask}``, ``test/{img,mask}``, ``classes.yaml``) plus ``manifest.json``
(settings, sources and their licences, counts, and where every file was cut from) and
``train_masks/``, the training patches' pixel masks, which only the fully-supervised upper
bound of ``hisynseg demo`` reads. The
whole folder is written beside the destination and moved into place at the end, so an
interrupted build never leaves a half-built dataset under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from hisynseg.datasets.io import (
    atomic_write_json,
    atomic_write_text,
    write_mask_png,
    write_rgb_png,
)
from hisynseg.datasets.labels import label_to_str, write_label_csv
from hisynseg.datasets.spec import (
    GENERIC_CLASSES_FILE,
    GENERIC_LABELS_FILE,
    DatasetSpec,
    load_generic_spec,
)
from hisynseg.demo.sources import SOURCES, fetch_source, read_source_image
from hisynseg.errors import HisynsegError
from hisynseg.synthesis.background import background_mask

__all__ = [
    "ANNOTATIONS_RESOURCE",
    "DEMO_CLASSES",
    "DEMO_NAME",
    "TRAIN_MASKS_DIR",
    "AnnotationError",
    "DemoBuildError",
    "DemoDataset",
    "DemoSettings",
    "ImageAnnotations",
    "build_demo_dataset",
    "class_mask",
    "load_annotations",
    "rasterise",
]

DEMO_NAME = "hisynseg-demo"
MANIFEST_FILE = "manifest.json"
# Pixel masks of the training patches, same file names as ``train/``. Only the demo's
# fully-supervised upper bound reads them; the weakly-supervised methods use ``train/``
# and its image-level labels alone.
TRAIN_MASKS_DIR = "train_masks"
ANNOTATIONS_RESOURCE = "annotations.geojson"
SPLITS = ("val", "test")


@dataclass(frozen=True)
class DemoClass:
    """One tissue class of the demo dataset."""

    name: str
    short: str
    colour: tuple[int, int, int]
    description: str


DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass(
        "tumour epithelium",
        "TE",
        (205, 51, 51),
        "carcinoma cells in sheets, nests and papillary fronds (tia-carcinoma, "
        "slideflow-papillary, stardist-tumour)",
    ),
    DemoClass(
        "stroma",
        "STR",
        (255, 165, 0),
        "collagenous connective tissue: the dermis of the skin slide and the stroma of "
        "the carcinomas",
    ),
    DemoClass(
        "lymphocytes",
        "LYM",
        (65, 105, 225),
        "dense bands and clusters of lymphocytes (tia-carcinoma only)",
    ),
    DemoClass(
        "epidermis",
        "EPI",
        (0, 170, 0),
        "stratified squamous epithelium of the skin with its compact cornified layer "
        "(cmu-skin only)",
    ),
)
BACKGROUND_COLOUR = (255, 255, 255)


class AnnotationError(HisynsegError, ValueError):
    """The annotation GeoJSON is malformed; the message names the file and the feature."""


class DemoBuildError(HisynsegError):
    """The demo dataset cannot be built as asked; the message says why."""


Ring = list[tuple[float, float]]
Polygon = list[Ring]  # outer ring first, then holes


@dataclass
class ImageAnnotations:
    """The polygons drawn over one source image.

    Attributes:
        image: The source's name.
        classes: ``(class index, polygon)`` pairs; a later polygon wins where two overlap.
        heldout: ``(split, polygon)`` pairs marking the held-out regions.
    """

    image: str
    classes: list[tuple[int, Polygon]] = field(default_factory=list)
    heldout: list[tuple[str, Polygon]] = field(default_factory=list)


@dataclass(frozen=True)
class DemoSettings:
    """How the demo dataset is cut.

    Attributes:
        patch_size: Side of the training patches, in working pixels.
        eval_size: Side of the evaluation tiles (default twice the patch size); a
            held-out region narrower than this gives tiles of its own width or height.
        scales: Working pixels per level-0 pixel for each source (default 1: full
            resolution).
        min_class_share: A class is in a patch's label when it covers at least this share
            of the patch; smaller slivers are within the annotations' precision and left
            out of the label.
        min_annotated_share: A training patch needs at least this share of pixels that
            carry a class.
        max_unlabelled_tissue: A training patch may hold at most this share of tissue
            that is not annotated (non-white pixels outside every class polygon), whose
            class would be unknown.
        max_overlap: Two training patches of one image overlap by at most this share of
            a patch's area.
        candidate_stride: Step of the grid of candidate patch positions (default a sixth
            of the patch size).
        gap: Working pixels kept free between the held-out regions and training patches.
        min_eval_annotated: An evaluation tile needs at least this share of annotated
            pixels.
        white_threshold: Grey level above which a pixel may be white glass or lumen.
        white_min_size: Bright 4-connected regions smaller than this stay tissue.
    """

    patch_size: int = 96
    eval_size: int | None = None
    scales: Mapping[str, float] = field(default_factory=dict)
    min_class_share: float = 0.05
    min_annotated_share: float = 0.5
    max_unlabelled_tissue: float = 0.1
    max_overlap: float = 0.25
    candidate_stride: int | None = None
    gap: int = 16
    min_eval_annotated: float = 0.25
    white_threshold: int = 210
    white_min_size: int = 64

    def __post_init__(self) -> None:
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be at least 16, got {self.patch_size}")
        if self.eval_size is not None and self.eval_size < 16:
            raise ValueError(f"eval_size must be at least 16, got {self.eval_size}")
        for name in (
            "min_class_share",
            "min_annotated_share",
            "max_unlabelled_tissue",
            "max_overlap",
            "min_eval_annotated",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.gap < 0:
            raise ValueError(f"gap must be >= 0, got {self.gap}")
        if self.candidate_stride is not None and self.candidate_stride < 1:
            raise ValueError(f"candidate_stride must be >= 1, got {self.candidate_stride}")
        for name, scale in self.scales.items():
            if not 0.0 < scale <= 4.0:
                raise ValueError(f"scale of {name} must lie in (0, 4], got {scale}")

    @property
    def eval_side(self) -> int:
        return self.eval_size or 2 * self.patch_size

    @property
    def stride(self) -> int:
        return self.candidate_stride or max(1, self.patch_size // 6)

    def scale_of(self, image: str) -> float:
        return float(self.scales.get(image, 1.0))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scales"] = dict(self.scales)
        out["eval_size"] = self.eval_side
        out["candidate_stride"] = self.stride
        return out


@dataclass(frozen=True)
class DemoDataset:
    """What :func:`build_demo_dataset` wrote (the fields of ``ToyDataset`` and more).

    Attributes:
        root: The dataset folder.
        spec: The spec to read it with (from its ``classes.yaml``).
        num_train: Training patches.
        num_single_label: Single-label training patches (the synthesis pool).
        train_per_class: Training patches carrying each class.
        single_label_per_class: Single-label training patches of each class.
        num_val: Validation images.
        num_test: Test images.
        manifest: Path of ``manifest.json``.
    """

    root: Path
    spec: DatasetSpec
    num_train: int
    num_single_label: int
    train_per_class: tuple[int, ...]
    single_label_per_class: tuple[int, ...]
    num_val: int
    num_test: int
    manifest: Path


# --------------------------------------------------------------------------- annotations


def _as_ring(raw: Any, where: str) -> Ring:
    if not isinstance(raw, list) or len(raw) < 4:
        raise AnnotationError(f"{where}: a ring needs at least 4 [x, y] positions")
    ring: Ring = []
    for pos in raw:
        if (
            not isinstance(pos, list | tuple)
            or len(pos) < 2
            or not all(isinstance(v, int | float) and np.isfinite(v) for v in pos[:2])
        ):
            raise AnnotationError(f"{where}: position {pos!r} is not [x, y]")
        ring.append((float(pos[0]), float(pos[1])))
    if ring[0] != ring[-1]:
        raise AnnotationError(f"{where}: ring is not closed (first and last positions differ)")
    return ring


def _polygons(geometry: Any, where: str) -> list[Polygon]:
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: missing geometry")
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        parts = [coords]
    elif kind == "MultiPolygon":
        parts = coords if isinstance(coords, list) else None
    else:
        raise AnnotationError(f"{where}: geometry type {kind!r}; expected Polygon or MultiPolygon")
    if not parts:
        raise AnnotationError(f"{where}: geometry has no coordinates")
    polygons = []
    for part in parts:
        if not isinstance(part, list) or not part:
            raise AnnotationError(f"{where}: a polygon needs at least one ring")
        polygons.append([_as_ring(r, where) for r in part])
    return polygons


def load_annotations(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> dict[str, ImageAnnotations]:
    """Read an annotation GeoJSON (default: the one shipped with the package).

    Args:
        source: A path to a GeoJSON file, an already-parsed FeatureCollection, or
            ``None`` for the packaged ``annotations.geojson``.

    Returns:
        The annotations of each image, by image name, in file order.

    Raises:
        AnnotationError: Not a FeatureCollection, a feature without ``image``, with an
            unknown class or split, with both or neither, or with bad coordinates.
    """
    if source is None:
        ref = resources.files("hisynseg.demo") / ANNOTATIONS_RESOURCE
        origin = str(ref)
        data = json.loads(ref.read_text(encoding="utf-8"))
    elif isinstance(source, Mapping):
        origin = "annotations"
        data = source
    else:
        origin = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AnnotationError(f"{origin}: file not found") from None
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{origin}: not valid JSON ({exc})") from None
    if not isinstance(data, Mapping) or data.get("type") != "FeatureCollection":
        raise AnnotationError(f"{origin}: must be a GeoJSON FeatureCollection")
    names = [c.name for c in DEMO_CLASSES]
    out: dict[str, ImageAnnotations] = {}
    for i, feature in enumerate(data.get("features") or []):
        where = f"{origin}: feature {i}"
        props = feature.get("properties") if isinstance(feature, Mapping) else None
        if not isinstance(props, Mapping) or not isinstance(props.get("image"), str):
            raise AnnotationError(f"{where}: properties need an 'image' name")
        image = props["image"]
        has_class, has_split = "class" in props, "split" in props
        if has_class == has_split:
            raise AnnotationError(f"{where}: properties need exactly one of 'class' and 'split'")
        entry = out.setdefault(image, ImageAnnotations(image))
        polygons = _polygons(feature.get("geometry"), where)
        if has_class:
            if props["class"] not in names:
                raise AnnotationError(
                    f"{where}: class {props['class']!r} is not one of {', '.join(names)}"
                )
            index = names.index(props["class"])
            entry.classes.extend((index, p) for p in polygons)
        else:
            if props["split"] not in SPLITS:
                raise AnnotationError(f"{where}: split {props['split']!r} is not val or test")
            entry.heldout.extend((props["split"], p) for p in polygons)
    if not out:
        raise AnnotationError(f"{origin}: holds no features")
    return out


def rasterise(polygon: Polygon, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Boolean ``H×W`` map of the pixels whose centre lies inside ``polygon``.

    Coordinates are level-0 pixels with the origin at the top-left corner of the image,
    multiplied by ``scale``; pixel ``(row, col)`` has its centre at ``(col + 0.5, row + 0.5)``.
    The rings are filled with the even-odd rule, so holes (and overlapping rings) are
    left out. A centre exactly on an edge counts as inside for left and top edges only,
    so two polygons sharing an edge never both claim a pixel.
    """
    h, w = shape
    starts, ends = [], []
    for ring in polygon:
        pts = np.asarray(ring, dtype=np.float64) * scale
        if pts.shape[0] < 3:
            continue
        starts.append(pts)
        ends.append(np.roll(pts, -1, axis=0))
    out = np.zeros((h, w), dtype=bool)
    if not starts:
        return out
    p0, p1 = np.concatenate(starts), np.concatenate(ends)
    flat = p0[:, 1] == p1[:, 1]
    p0, p1 = p0[~flat], p1[~flat]
    y_lo, y_hi = np.minimum(p0[:, 1], p1[:, 1]), np.maximum(p0[:, 1], p1[:, 1])
    # Rows whose centre y lies in [y_lo, y_hi): half-open, so a vertex is counted once.
    r0 = np.clip(np.ceil(y_lo - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(y_hi - 0.5), 0, h).astype(np.int64)
    spans = r1 - r0
    if spans.sum() == 0:
        return out
    edge = np.repeat(np.arange(p0.shape[0]), spans)
    rows = r0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(spans) - spans, spans))
    yc = rows + 0.5
    a, b = p0[edge], p1[edge]
    xs = a[:, 0] + (yc - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Every ring crosses a row an even number of times; consecutive pairs bound the runs
    # of pixels whose centre x lies in [x_in, x_out).
    c0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(xs[1::2] - 0.5), 0, w).astype(np.int64)
    run_rows = rows[0::2]
    keep = c1 > c0
    diff = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(diff, (run_rows[keep], c0[keep]), 1)
    np.add.at(diff, (run_rows[keep], c1[keep]), -1)
    return np.cumsum(diff[:, :w], axis=1) > 0


def class_mask(
    annotations: ImageAnnotations, shape: tuple[int, int], scale: float = 1.0
) -> np.ndarray:
    """``H×W`` ``uint8`` index mask of the class polygons; unannotated pixels get the
    background index (the number of classes)."""
    mask = np.full(shape, len(DEMO_CLASSES), dtype=np.uint8)
    for index, polygon in annotations.classes:
        mask[rasterise(polygon, shape, scale)] = index
    return mask


# --------------------------------------------------------------------------- cutting


@dataclass
class _Patch:
    source: str
    x: int  # working-pixel box
    y: int
    w: int
    h: int
    scale: float
    label: np.ndarray | None = None
    shares: np.ndarray | None = None
    file: str = ""

    def level0_box(self) -> list[float]:
        s = self.scale
        return [
            round(self.x / s, 1),
            round(self.y / s, 1),
            round((self.x + self.w) / s, 1),
            round((self.y + self.h) / s, 1),
        ]


def _positions(length: int, size: int, stride: int) -> np.ndarray:
    """Start positions of a window along one axis, always including the last one."""
    if length < size:
        return np.zeros(0, dtype=np.int64)
    pos = np.arange(0, length - size + 1, stride)
    if pos[-1] != length - size:
        pos = np.append(pos, length - size)
    return pos


def _window_sums(binary: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """Count of true pixels in every ``size``-square window at ``(ys[i], xs[j])``."""
    integral = cv2.integral(binary.astype(np.uint8))  # (H+1)×(W+1), int32
    y0, x0 = ys[:, None], xs[None, :]
    y1, x1 = y0 + size, x0 + size
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def _working_image(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return np.ascontiguousarray(image)
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interp)


def _select_patches(
    name: str,
    mask: np.ndarray,
    unlabelled: np.ndarray,
    allowed: np.ndarray,
    scale: float,
    settings: DemoSettings,
    rng: np.random.Generator,
) -> list[_Patch]:
    """Training patches of one image: valid candidates, single-label ones placed first."""
    p = settings.patch_size
    area = p * p
    num_classes = len(DEMO_CLASSES)
    ys = _positions(mask.shape[0], p, settings.stride)
    xs = _positions(mask.shape[1], p, settings.stride)
    if ys.size == 0 or xs.size == 0:
        return []
    inside = _window_sums(allowed, ys, xs, p) == area
    counts = np.stack([_window_sums(mask == c, ys, xs, p) for c in range(num_classes)], axis=-1)
    shares = counts / area
    annotated = shares.sum(axis=-1)
    unknown = _window_sums(unlabelled, ys, xs, p) / area
    labels = shares >= settings.min_class_share
    valid = (
        inside
        & (annotated >= settings.min_annotated_share)
        & (unknown <= settings.max_unlabelled_tissue)
        & labels.any(axis=-1)
    )
    iy, ix = np.nonzero(valid)
    if iy.size == 0:
        return []
    single = labels[iy, ix].sum(axis=-1) == 1
    # Single-label patches first (the synthesis pool), then the rest; random within each.
    order = np.lexsort((rng.random(iy.size), ~single))
    # Two equal squares overlap by (p-|dx|)(p-|dy|); reject a candidate whose overlap
    # with a chosen patch exceeds the allowed share.
    limit = settings.max_overlap * area
    chosen_y: list[int] = []
    chosen_x: list[int] = []
    patches: list[_Patch] = []
    for k in order:
        y, x = int(ys[iy[k]]), int(xs[ix[k]])
        if chosen_y:
            dy = np.maximum(p - np.abs(np.asarray(chosen_y) - y), 0)
            dx = np.maximum(p - np.abs(np.asarray(chosen_x) - x), 0)
            if (dy * dx).max() > limit:
                continue
        chosen_y.append(y)
        chosen_x.append(x)
        patches.append(
            _Patch(
                name,
                x,
                y,
                p,
                p,
                scale,
                label=labels[iy[k], ix[k]].astype(np.uint8),
                shares=shares[iy[k], ix[k]],
            )
        )
    patches.sort(key=lambda q: (q.y, q.x))
    return patches


def _eval_tiles(
    name: str, region: np.ndarray, mask: np.ndarray, scale: float, settings: DemoSettings
) -> list[_Patch]:
    """Tiles of one held-out region: a centred grid of evaluation-size squares (smaller
    where the region is), each wholly inside the region and annotated enough."""
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return []
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    tiles = []
    th, tw = min(settings.eval_side, y1 - y0), min(settings.eval_side, x1 - x0)
    ny, nx = (y1 - y0) // th, (x1 - x0) // tw
    oy, ox = y0 + ((y1 - y0) - ny * th) // 2, x0 + ((x1 - x0) - nx * tw) // 2
    bg = len(DEMO_CLASSES)
    for j in range(ny):
        for i in range(nx):
            ty, tx = int(oy + j * th), int(ox + i * tw)
            if not region[ty : ty + th, tx : tx + tw].all():
                continue
            annotated = np.mean(mask[ty : ty + th, tx : tx + tw] != bg)
            if annotated >= settings.min_eval_annotated:
                tiles.append(_Patch(name, tx, ty, int(tw), int(th), scale))
    return tiles


@dataclass
class _ImageResult:
    name: str
    image: np.ndarray
    mask: np.ndarray
    scale: float
    train: list[_Patch]
    heldout: dict[str, list[_Patch]]
    annotated_pixels: np.ndarray


def _cut_image(
    ann: ImageAnnotations, full: np.ndarray, settings: DemoSettings, seed: int
) -> _ImageResult:
    scale = settings.scale_of(ann.image)
    image = _working_image(full, scale)
    shape = image.shape[:2]
    bg = len(DEMO_CLASSES)
    mask = class_mask(ann, shape, scale)
    white = background_mask(image, settings.white_threshold, settings.white_min_size)
    if white is None:
        white = np.zeros(shape, dtype=bool)
    mask[white] = bg
    unlabelled = (mask == bg) & ~white

    regions: dict[str, np.ndarray] = {s: np.zeros(shape, dtype=bool) for s in SPLITS}
    for split, polygon in ann.heldout:
        regions[split] |= rasterise(polygon, shape, scale)
    if (regions["val"] & regions["test"]).any():
        raise DemoBuildError(f"{ann.image}: its val and test regions overlap")
    heldout_any = regions["val"] | regions["test"]
    if settings.gap and heldout_any.any():
        kernel = np.ones((2 * settings.gap + 1, 2 * settings.gap + 1), dtype=np.uint8)
        blocked = cv2.dilate(heldout_any.astype(np.uint8), kernel).astype(bool)
    else:
        blocked = heldout_any
    rng = np.random.default_rng([seed, zlib.crc32(ann.image.encode("utf-8"))])
    train = _select_patches(ann.image, mask, unlabelled, ~blocked, scale, settings, rng)
    heldout = {
        split: _eval_tiles(ann.image, regions[split], mask, scale, settings) for split in SPLITS
    }
    annotated = np.bincount(mask.ravel(), minlength=bg + 1)[:bg]
    return _ImageResult(ann.image, image, mask, scale, train, heldout, annotated)


# --------------------------------------------------------------------------- writing

PREVIEW_DIR = "preview"
_PREVIEW_MAX_SIDE = 1200
_SPLIT_COLOURS = {"val": (0, 190, 255), "test": (255, 0, 200)}


def _preview(res: _ImageResult, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """The working image with its class mask blended in, held-out tiles outlined (val
    cyan, test magenta) and training patches outlined in black; at most 1200 px a side."""
    bg = len(DEMO_CLASSES)
    colours = np.asarray(palette, dtype=np.float32)[res.mask]
    blend = res.image.astype(np.float32)
    tissue = res.mask != bg
    blend[tissue] = 0.6 * blend[tissue] + 0.4 * colours[tissue]
    out = np.ascontiguousarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
    factor = min(1.0, _PREVIEW_MAX_SIDE / max(out.shape[:2]))
    if factor < 1.0:
        size = (round(out.shape[1] * factor), round(out.shape[0] * factor))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
    thick = max(1, round(2 * factor))

    def box(p: _Patch, colour: tuple[int, int, int]) -> None:
        x0, y0 = round(p.x * factor), round(p.y * factor)
        x1, y1 = round((p.x + p.w) * factor) - 1, round((p.y + p.h) * factor) - 1
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick)

    for patch in res.train:
        box(patch, (0, 0, 0))
    for split in SPLITS:
        for tile in res.heldout[split]:
            box(tile, _SPLIT_COLOURS[split])
    return out


def _classes_yaml(settings: DemoSettings) -> dict[str, Any]:
    return {
        "name": DEMO_NAME,
        "classes": [c.name for c in DEMO_CLASSES],
        "short_names": [c.short for c in DEMO_CLASSES],
        "palette": [list(c.colour) for c in DEMO_CLASSES] + [list(BACKGROUND_COLOUR)],
        "background_index": len(DEMO_CLASSES),
        "patch_size": settings.patch_size,
        # White glass and lumina occur inside training patches; synthesis and
        # pseudo-labels find them with these thresholds, as the build did.
        "background_in_train": True,
        "background_grey_threshold": settings.white_threshold,
        "background_min_size": settings.white_min_size,
    }


def _source_record(name: str) -> dict[str, Any]:
    if name in SOURCES:
        return SOURCES[name].to_dict()
    return {"name": name, "licence": "unknown (image supplied by the caller)"}


def _is_replaceable(out: Path) -> bool:
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    manifest = out / MANIFEST_FILE
    try:
        return json.loads(manifest.read_text()).get("dataset") == DEMO_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _swap_into_place(built: Path, out: Path) -> None:
    """Move the finished folder to ``out``, replacing a previous demo build there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(built, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_dataset(
    root: Path,
    results: Sequence[_ImageResult],
    settings: DemoSettings,
    seed: int,
    previews: bool,
) -> dict[str, Any]:
    num_classes = len(DEMO_CLASSES)
    classes = _classes_yaml(settings)
    atomic_write_text(
        root / GENERIC_CLASSES_FILE,
        "# hisynseg demo dataset: real H&E sample images, classes drawn by the project.\n"
        "# See manifest.json for the sources and their licences.\n"
        + yaml.safe_dump(classes, sort_keys=False),
    )
    palette = classes["palette"]
    labels: dict[str, np.ndarray] = {}
    train_records = []
    split_records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    split_pixels = {s: np.zeros(num_classes + 1, dtype=np.int64) for s in SPLITS}
    for res in results:
        for patch in res.train:
            patch.file = f"{res.name}-{patch.x:05d}-{patch.y:05d}.png"
            crop = res.image[patch.y : patch.y + patch.h, patch.x : patch.x + patch.w]
            write_rgb_png(root / "train" / patch.file, crop)
            crop_mask = res.mask[patch.y : patch.y + patch.h, patch.x : patch.x + patch.w]
            write_mask_png(root / TRAIN_MASKS_DIR / patch.file, crop_mask, palette)
            labels[patch.file] = np.asarray(patch.label, dtype=np.uint8)
            train_records.append(
                {
                    "file": patch.file,
                    "source": res.name,
                    "box_level0": patch.level0_box(),
                    "label": label_to_str(patch.label),
                    "shares": [round(float(v), 4) for v in np.asarray(patch.shares)],
                }
            )
        for split in SPLITS:
            for tile in res.heldout[split]:
                tile.file = f"{res.name}-{tile.x:05d}-{tile.y:05d}.png"
                box = (slice(tile.y, tile.y + tile.h), slice(tile.x, tile.x + tile.w))
                tile_mask = res.mask[box]
                write_rgb_png(root / split / "img" / tile.file, res.image[box])
                write_mask_png(root / split / "mask" / tile.file, tile_mask, palette)
                pixels = np.bincount(tile_mask.ravel(), minlength=num_classes + 1)
                split_pixels[split] += pixels[: num_classes + 1]
                split_records[split].append(
                    {
                        "file": tile.file,
                        "source": res.name,
                        "box_level0": tile.level0_box(),
                        "pixels": [int(v) for v in pixels[: num_classes + 1]],
                    }
                )
    if previews:
        for res in results:
            write_rgb_png(root / PREVIEW_DIR / f"{res.name}.png", _preview(res, palette))
    for split in SPLITS:
        (root / split / "img").mkdir(parents=True, exist_ok=True)
        (root / split / "mask").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / TRAIN_MASKS_DIR).mkdir(parents=True, exist_ok=True)
    write_label_csv(root / GENERIC_LABELS_FILE, labels, [c.name for c in DEMO_CLASSES])

    label_array = (
        np.stack(list(labels.values())) if labels else np.zeros((0, num_classes), np.uint8)
    )
    single = label_array.sum(axis=1) == 1
    names = [c.name for c in DEMO_CLASSES]
    counts: dict[str, Any] = {
        "train": {
            "images": len(labels),
            "per_class": dict(zip(names, label_array.sum(axis=0).tolist(), strict=True)),
            "single_label": dict(zip(names, label_array[single].sum(axis=0).tolist(), strict=True)),
            "multi_label": int((~single).sum()),
            "per_source": {r.name: len(r.train) for r in results},
        }
    }
    for split in SPLITS:
        px = split_pixels[split]
        counts[split] = {
            "images": len(split_records[split]),
            "pixels": dict(zip([*names, "background"], px.tolist(), strict=True)),
            "images_with_class": {
                n: sum(1 for r in split_records[split] if r["pixels"][c] > 0)
                for c, n in enumerate(names)
            },
        }
    manifest = {
        "dataset": DEMO_NAME,
        "format": 1,
        "seed": seed,
        "settings": settings.to_dict(),
        "classes": [
            {"index": i, "name": c.name, "short": c.short, "description": c.description}
            for i, c in enumerate(DEMO_CLASSES)
        ],
        "background": {
            "index": num_classes,
            "description": "white glass or lumen, and tissue no polygon covers; "
            "not scored in evaluation",
        },
        "sources": [
            {
                **_source_record(r.name),
                "scale": r.scale,
                "working_size": list(r.image.shape[:2]),
                "annotated_pixels": dict(zip(names, r.annotated_pixels.tolist(), strict=True)),
            }
            for r in results
        ],
        "counts": counts,
        "train_masks": {
            "folder": TRAIN_MASKS_DIR,
            "description": "pixel masks of the training patches (same file names as "
            "train/), for the fully-supervised upper bound only; weakly-supervised methods "
            "never read them",
        },
        "train": train_records,
        **split_records,
    }
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def build_demo_dataset(
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    patch_size: int | None = None,
    seed: int = 0,
    settings: DemoSettings | None = None,
    annotations: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    previews: bool = True,
) -> DemoDataset:
    """Build the demo dataset under ``out`` in the generic layout.

    Args:
        out: The dataset folder to create. An existing folder is replaced only if it is
            empty or a previous demo build (it holds this builder's ``manifest.json``).
        cache_dir: Where the source images are cached (see
            :func:`hisynseg.demo.sources.fetch_source`).
        patch_size: Training patch side; overrides ``settings.patch_size``.
        seed: Seeds the order in which candidate patches are placed; the same seed, images
            and settings give the same dataset.
        settings: How to cut (default :class:`DemoSettings`).
        annotations: A GeoJSON path or parsed FeatureCollection (default: the packaged
            annotations).
        images: Full-resolution RGB arrays by source name, used instead of fetching
            (tests, or images read another way); every annotated image must be present.
        previews: Also write ``preview/<source>.png``: each working image with its
            annotation blended in, training patches outlined in black and held-out tiles
            in cyan (val) or magenta (test).

    Returns:
        What was written, with counts.

    Raises:
        DemoBuildError: ``out`` holds something else, or the result would lack a split or
            a class's single-label patches.
        AnnotationError: Malformed annotations.
        SourceError: A source image cannot be fetched or read.
    """
    settings = settings or DemoSettings()
    if patch_size is not None and patch_size != settings.patch_size:
        settings = DemoSettings(**{**asdict(settings), "patch_size": patch_size})
    out = Path(out)
    if not _is_replaceable(out):
        raise DemoBuildError(
            f"{out}: exists and is not a demo dataset built by hisynseg; choose another "
            "folder or remove it"
        )
    per_image = load_annotations(annotations)
    results = []
    for name, ann in per_image.items():
        if images is not None:
            if name not in images:
                raise DemoBuildError(f"annotations name image {name!r}, which was not supplied")
            full = np.asarray(images[name])
            if full.dtype != np.uint8 or full.ndim != 3 or full.shape[2] != 3:
                raise DemoBuildError(
                    f"image {name!r} must be an H×W×3 uint8 RGB array, got "
                    f"{full.dtype} {full.shape}"
                )
        else:
            full = read_source_image(name, fetch_source(name, cache_dir))
        results.append(_cut_image(ann, full, settings, seed))

    _check_result(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = _write_dataset(building, results, settings, seed, previews)
        _swap_into_place(building, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(building)
    train = manifest["counts"]["train"]
    return DemoDataset(
        root=out,
        spec=load_generic_spec(out / GENERIC_CLASSES_FILE),
        num_train=train["images"],
        num_single_label=sum(train["single_label"].values()),
        train_per_class=tuple(train["per_class"].values()),
        single_label_per_class=tuple(train["single_label"].values()),
        num_val=manifest["counts"]["val"]["images"],
        num_test=manifest["counts"]["test"]["images"],
        manifest=out / MANIFEST_FILE,
    )


def _check_result(results: Sequence[_ImageResult]) -> None:
    """Refuse a dataset that training or evaluation could not use."""
    single = np.zeros(len(DEMO_CLASSES), dtype=np.int64)
    for res in results:
        for patch in res.train:
            label = np.asarray(patch.label)
            if label.sum() == 1:
                single += label
    missing = [c.name for c, n in zip(DEMO_CLASSES, single, strict=True) if n == 0]
    if missing:
        raise DemoBuildError(
            f"no single-label training patch of {', '.join(missing)}; synthesis needs one "
            "per class (lower patch_size or min_class_share, or annotate more of it)"
        )
    for split in SPLITS:
        if not any(res.heldout[split] for res in results):
            raise DemoBuildError(
                f"no {split} image: no held-out region yields a tile of enough annotated "
                "tissue (lower eval_size or min_eval_annotated)"
            )
