"""The synthesis source pool: every single-label training image, decoded once, in memory.

Both synthesis methods draw from the training images whose label has exactly one positive
class (METHOD.md §3). Decoding a PNG costs far more than anything the synthesis does with
it, so :class:`SourcePool` decodes each source once (in parallel) and keeps the pixels;
worker processes forked afterwards share them copy-on-write. For datasets whose training
patches contain white background (``spec.background_in_train``) the background map of each
source is computed here, once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hisynseg.datasets.io import read_rgb
from hisynseg.datasets.layouts import list_train, single_label_pool
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError
from hisynseg.synthesis.background import spec_background_mask

__all__ = [
    "SynthesisError",
    "SourceImage",
    "SourcePool",
    "Synthesized",
    "INTERPOLATIONS",
]

# Names accepted wherever a resize interpolation is configurable.
INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


class SynthesisError(HisynsegError):
    """Synthesis cannot go on (no sources, impossible parameters, a refused output folder)."""


@dataclass(frozen=True)
class SourceImage:
    """One single-label source image.

    Attributes:
        path: Where it was read from (``None`` for in-memory pools).
        relpath: Its path relative to the dataset root (POSIX form), as manifests record it.
        class_index: Its one tissue class.
    """

    path: Path | None
    relpath: str
    class_index: int


@dataclass(frozen=True)
class Synthesized:
    """One synthesized sample.

    Attributes:
        image: ``H×W×3`` ``uint8`` RGB image.
        mask: ``H×W`` ``uint8`` class-index mask (background index where there is none).
        sources: Pool indices of the source images used, in the order they were drawn.
    """

    image: np.ndarray
    mask: np.ndarray
    sources: tuple[int, ...]


def _decode(path: Path, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray | None]:
    image = read_rgb(path)
    return image, spec_background_mask(image, spec)


class SourcePool:
    """Single-label source images held in memory, grouped by class.

    Attributes:
        spec: The dataset the images come from.
        root: The dataset root, or ``None`` for an in-memory pool.
        sources: What each image is (path, class), pool order: by class, then by path.
        images: The decoded ``H×W×3`` ``uint8`` images, pool order (sizes may differ).
        background: Per image, its ``H×W`` ``bool`` background map, or ``None`` when it has
            no background pixels (always ``None`` unless ``spec.background_in_train``).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        sources: Sequence[SourceImage],
        images: Sequence[np.ndarray],
        background: Sequence[np.ndarray | None] | None = None,
        root: str | Path | None = None,
    ) -> None:
        if len(sources) != len(images):
            raise ValueError("one image per source is needed")
        if background is None:
            background = [spec_background_mask(im, spec) for im in images]
        if len(background) != len(images):
            raise ValueError("one background entry per source is needed")
        for src, image in zip(sources, images, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise SynthesisError(
                    f"{src.relpath}: source must be H×W×3 uint8 RGB, got "
                    f"{image.dtype} {image.shape}"
                )
            if not 0 <= src.class_index < spec.num_classes:
                raise ValueError(f"{src.relpath}: class {src.class_index} out of range")
        self.spec = spec
        self.root = None if root is None else Path(root)
        self.sources: tuple[SourceImage, ...] = tuple(sources)
        self.images: tuple[np.ndarray, ...] = tuple(images)
        self.background: tuple[np.ndarray | None, ...] = tuple(background)
        self.classes = np.array([s.class_index for s in self.sources], dtype=np.int64)
        self._by_class = tuple(np.flatnonzero(self.classes == c) for c in range(spec.num_classes))
        if not self.sources:
            raise SynthesisError(f"dataset {spec.name!r}: no single-label source images")

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        root: str | Path,
        spec: DatasetSpec,
        *,
        workers: int | None = None,
        progress: bool = True,
    ) -> SourcePool:
        """Decode every single-label training image of a dataset root.

        Args:
            root: Dataset root in the layout of ``spec``.
            spec: The dataset.
            workers: Decoding threads (``None`` or < 1: one per CPU core).
            progress: Show a progress bar.

        Raises:
            SynthesisError: The root has no single-label training image.
            ImageReadError: A source image cannot be decoded; the message names it.
            DatasetLayoutError, LabelError: From listing the training folder.
        """
        from tqdm.auto import tqdm

        root = Path(root)
        samples = list_train(root, spec)
        by_class = single_label_pool(samples, spec.num_classes)
        sources = [
            SourceImage(s.path, s.path.relative_to(root).as_posix(), c)
            for c, group in enumerate(by_class)
            for s in sorted(group, key=lambda s: s.path.name)
        ]
        if not sources:
            raise SynthesisError(
                f"{root / spec.layout.train}: no single-label training images "
                f"(of {len(samples)} training images); synthesis needs images whose label "
                "has exactly one class"
            )
        n_threads = workers if workers and workers > 0 else (os.cpu_count() or 1)
        images: list[np.ndarray] = []
        background: list[np.ndarray | None] = []
        # PIL's PNG decoder and OpenCV release the GIL, so threads decode in parallel
        # without copying pixels between processes.
        with (
            ThreadPoolExecutor(max_workers=max(1, n_threads)) as executor,
            tqdm(
                total=len(sources), desc="decoding sources", unit="img", disable=not progress
            ) as bar,
        ):
            for image, bg in executor.map(lambda s: _decode(s.path, spec), sources):
                images.append(image)
                background.append(bg)
                bar.update(1)
        return cls(spec, sources, images, background, root=root)

    @classmethod
    def from_arrays(
        cls, spec: DatasetSpec, images_by_class: Sequence[Sequence[np.ndarray]]
    ) -> SourcePool:
        """An in-memory pool (tests, benchmarks): ``images_by_class[c]`` lists class ``c``'s
        images; background maps are computed as :meth:`build` would."""
        sources, images = [], []
        for c, group in enumerate(images_by_class):
            for k, image in enumerate(group):
                sources.append(SourceImage(None, f"<memory>/{c}/{k}", c))
                images.append(np.ascontiguousarray(image, dtype=np.uint8))
        return cls(spec, sources, images)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.sources)

    def class_indices(self, class_index: int) -> np.ndarray:
        """Pool indices of the images of one class."""
        return self._by_class[class_index]

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Number of source images per class."""
        return tuple(len(ix) for ix in self._by_class)

    @property
    def present_classes(self) -> tuple[int, ...]:
        """Classes with at least one source image."""
        return tuple(c for c, ix in enumerate(self._by_class) if len(ix))

    @property
    def origin(self) -> str:
        """Where the sources come from, for messages: the training folder of the dataset
        root, or ``"in-memory source pool"``."""
        if self.root is None:
            return "in-memory source pool"
        return str(self.root / self.spec.layout.train)

    def pick(self, class_index: int, rng: np.random.Generator) -> int:
        """A uniformly random pool index of class ``class_index``.

        Raises:
            SynthesisError: The class has no source image.
        """
        ix = self._by_class[class_index]
        if not len(ix):
            raise SynthesisError(
                f"dataset {self.spec.name!r}: class {class_index} "
                f"({self.spec.class_names[class_index]}) has no single-label source image"
            )
        return int(ix[rng.integers(len(ix))])

    def class_mask(self, index: int, background: np.ndarray | None) -> np.ndarray | int:
        """The mask values of (a crop of) image ``index``: its class, or an array with the
        background index where ``background`` (the matching crop of its map) is true."""
        cls = int(self.classes[index])
        if background is None:
            return cls
        return np.where(background, np.uint8(self.spec.background_index), np.uint8(cls))

    def resized(
        self, index: int, size: int, interpolation: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``index`` and its background map resized to ``size×size``.

        ``interpolation`` names an entry of :data:`INTERPOLATIONS`, or ``"auto"``: area
        averaging when shrinking, bicubic when enlarging (close to the PIL bicubic resize
        of the reference). Background maps are resized by nearest neighbour (centre-aligned),
        so they stay aligned with the image.
        """
        image, bg = self.images[index], self.background[index]
        h, w = image.shape[:2]
        if h == size and w == size:
            return image, bg
        if interpolation == "auto":
            flag = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_CUBIC
        else:
            flag = INTERPOLATIONS[interpolation]
        out = cv2.resize(image, (size, size), interpolation=flag)
        if bg is not None:
            bg = cv2.resize(
                bg.view(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST_EXACT
            ).astype(bool)
        return out, bg

    def relpaths(self, indices: Sequence[int]) -> list[str]:
        """Dataset-relative paths of pool images."""
        return [self.sources[i].relpath for i in indices]

    def fingerprint(self) -> str:
        """A digest of which files (path, class, byte size) make up the pool.

        Two runs with the same fingerprint draw from the same sources, so a resumed
        synthesis can check it continues the same set.
        """
        digest = hashlib.sha256()
        for src, image in zip(self.sources, self.images, strict=True):
            size = src.path.stat().st_size if src.path is not None else image.nbytes
            digest.update(f"{src.relpath}\t{src.class_index}\t{size}\n".encode())
            if src.path is None:
                digest.update(hashlib.sha256(image.tobytes()).digest())
        return digest.hexdigest()
