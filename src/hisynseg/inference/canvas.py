"""A disk-backed canvas of image rows, written and read a band at a time.

Whole-slide outputs (the class mask, the probability maps) can be far larger than memory.
:class:`DiskCanvas` keeps them in a file laid out row after row (``H×W`` or ``H×W×C``)
and maps only the band of rows being written or read (``np.memmap`` over that band,
released right after), so a process touches at most one band of it at a time and its
resident memory does not grow with the canvas. The file is either raw (a temporary
working file) or a ``.npy`` file that ``np.load(path, mmap_mode="r")`` opens directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["DiskCanvas"]


class DiskCanvas:
    """Rows of an ``H×W`` (or ``H×W×C``) array stored in a file.

    Use :meth:`create` for a new file. A fresh canvas reads as zeros.

    Args:
        path: The file.
        shape: ``(H, W)`` or ``(H, W, C)``.
        dtype: Element type.
        offset: Bytes before the first row (a ``.npy`` header).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        offset: int = 0,
    ) -> None:
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"a canvas is H×W or H×W×C with positive sides, got {shape}")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        npy: bool = False,
    ) -> DiskCanvas:
        """A new zero-filled canvas in ``path`` (sparse where the file system allows).

        Args:
            path: The file (overwritten).
            shape: ``(H, W)`` or ``(H, W, C)``.
            dtype: Element type.
            npy: Write a ``.npy`` header so that numpy can open the file by itself.
        """
        canvas, header = cls._laid_out(path, shape, dtype, npy)
        with open(canvas.path, "wb") as fh:
            fh.write(header)
            fh.truncate(canvas.offset + canvas.height * canvas.row_bytes)
        return canvas

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        npy: bool = False,
    ) -> DiskCanvas:
        """A canvas :meth:`create` made earlier with the same arguments, rows kept.

        Raises:
            ValueError: The file's size or header does not fit ``shape`` and ``dtype``.
            OSError: The file cannot be read.
        """
        canvas, header = cls._laid_out(path, shape, dtype, npy)
        with open(canvas.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if (
                fh.read(len(header)) != header
                or size != canvas.offset + canvas.height * canvas.row_bytes
            ):
                raise ValueError(f"{canvas.path}: not a canvas of {canvas.shape} {canvas.dtype}")
        return canvas

    @classmethod
    def _laid_out(
        cls, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: np.dtype | type, npy: bool
    ) -> tuple[DiskCanvas, bytes]:
        """The canvas of a file laid out as :meth:`create` writes it, and its header."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        header = _npy_header(shape, dtype) if npy else b""
        return cls(path, shape, dtype, offset=len(header)), header

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    def _band(self, top: int, rows: int, mode: str) -> np.memmap:
        if top < 0 or rows < 1 or top + rows > self.height:
            raise ValueError(f"rows {top}..{top + rows} outside a canvas of {self.height} rows")
        return np.memmap(
            self.path,
            dtype=self.dtype,
            mode=mode,
            offset=self.offset + top * self.row_bytes,
            shape=(rows, *self.shape[1:]),
        )

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        """Store ``rows`` (``n×W[×C]``) as rows ``top .. top+n-1``."""
        rows = np.asarray(rows)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} for a canvas of {self.shape}")
        # No flush: the file is read back through the page cache by this process, and an
        # msync per band would make every write wait for the disk.
        band = self._band(top, rows.shape[0], "r+")
        band[:] = rows
        del band

    def read_rows(self, top: int, count: int) -> np.ndarray:
        """A copy of rows ``top .. top+count-1`` (clipped at the bottom)."""
        count = min(count, self.height - top)
        band = self._band(top, count, "r")
        out = np.array(band)
        del band
        return out

    def bands(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(top, rows)`` of the whole canvas, ``rows`` rows at a time."""
        for top in range(0, self.height, rows):
            yield top, self.read_rows(top, rows)

    def read_all(self) -> np.ndarray:
        """The whole canvas in memory (for canvases known to be small)."""
        return self.read_rows(0, self.height)

    def resample_nearest(self, width: int, height: int, band_rows: int = 1024) -> np.ndarray:
        """The canvas shrunk (or kept) to ``height×width`` by nearest neighbour, in bands."""
        ys = np.minimum((np.arange(height) + 0.5) * self.height / height, self.height - 1)
        xs = np.minimum((np.arange(width) + 0.5) * self.width / width, self.width - 1)
        ys, xs = ys.astype(np.int64), xs.astype(np.int64)
        out = np.empty((height, width, *self.shape[2:]), self.dtype)
        start = 0
        while start < height:
            first = int(ys[start])
            stop = int(np.searchsorted(ys, first + band_rows, side="left"))
            stop = max(stop, start + 1)
            last = int(ys[stop - 1])
            band = self.read_rows(first, last - first + 1)
            out[start:stop] = band[ys[start:stop] - first][:, xs]
            start = stop
        return out

    def sync(self) -> None:
        """Make the rows written so far durable (they survive a crash of the machine, not
        only of this process)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self) -> None:
        """Delete the file."""
        self.path.unlink(missing_ok=True)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape},
    )
    return buf.getvalue()
