"""Reading images and masks, and writing them atomically.

Every writer here goes through :func:`atomic_path`: the bytes land in a temporary file in
the destination folder, which is renamed over the destination only once complete, so an
interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from hisynseg.errors import HisynsegError

__all__ = [
    "ImageReadError",
    "MaskColourError",
    "atomic_path",
    "is_atomic_temp",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_rgb",
    "read_mask",
    "read_image_size",
    "encode_rgb_png",
    "encode_mask_png",
    "write_rgb_png",
    "write_mask_png",
    "palette_to_flat",
    "sha256_of",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(HisynsegError, OSError):
    """An image or mask file could not be read; the message names the file and the problem."""


class MaskColourError(ImageReadError):
    """A mask holds a value (index or colour) that is not a class of the dataset."""


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives new files under this process's umask (mkstemp's 0600
    would make every output private to its owner)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # No /proc (macOS, Windows): read the umask by setting it and putting it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def is_atomic_temp(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary files (``.NAME.*.tmp``),
    which only a write cut short by a kill leaves behind."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], temp_dir: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that globbing for the
    final suffix never picks up a partial file.

    Args:
        path: The final file.
        temp_dir: Where the temporary file lives instead (on the same file system as
            ``path``, so that it can be renamed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = path.parent if temp_dir is None else Path(temp_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=where)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _new_file_mode())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _open_image(path: Path) -> Image.Image:
    img = None
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # A failed load() leaves PIL's file handle open; close it now, not at garbage
        # collection, or scanning thousands of corrupt files runs out of descriptors.
        if img is not None:
            img.close()
        # PIL reports truncated or corrupt data as OSError/SyntaxError with its own wording.
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None
    return img


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as an ``H×W×3`` ``uint8`` RGB array; transparency shows white.

    Raises:
        ImageReadError: Missing, unreadable or truncated file.
    """
    img = _open_image(Path(path))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent parts are glass, as the slide readers have them, not black.
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_mask(
    path: str | os.PathLike[str],
    palette: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Read a label mask as an ``H×W`` ``uint8`` array of class indices.

    Greyscale masks are read as their values and indexed ("P") masks as their indices,
    unless the file's own palette gives those indices other classes' colours of
    ``palette``: then the mask was re-indexed by an editor (or PIL's ``quantize``) and is
    mapped through its colours instead. An RGB mask is mapped through ``palette``; a
    colour not in the palette is an error.

    Raises:
        ImageReadError: Unreadable file.
        MaskColourError: An RGB mask with a colour outside ``palette``, or a 16/32-bit
            mask with a value above 255.
    """
    path = Path(path)
    img = _open_image(path)
    if img.mode == "L":
        return np.array(img, dtype=np.uint8)
    if img.mode == "P":
        indices = np.array(img, dtype=np.uint8)
        if palette is None:
            return indices
        return _indices_by_colour(path, indices, img.getpalette() or [], palette)
    if img.mode in ("I", "I;16"):
        values = np.asarray(img)
        # Casting to uint8 would wrap 256 to 0 and pass a bad mask off as a valid one.
        if values.size and (values.min() < 0 or values.max() > 255):
            raise MaskColourError(
                f"{path}: mask values {int(values.min())}..{int(values.max())} "
                "do not fit class indices 0..255"
            )
        return values.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        if palette is None:
            raise ImageReadError(f"{path}: RGB mask but no palette to map its colours")
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, 255, dtype=np.uint8)
        for index, colour in enumerate(palette):
            r, g, b = (int(c) for c in colour)
            out[code == ((r << 16) | (g << 8) | b)] = index
        if (out == 255).any():
            bad = np.unique(rgb[out == 255].reshape(-1, 3), axis=0)[:5].tolist()
            raise MaskColourError(f"{path}: mask colours {bad} are not in the dataset's palette")
        return out
    raise ImageReadError(f"{path}: unsupported mask mode {img.mode!r}")


def _indices_by_colour(
    path: Path,
    indices: np.ndarray,
    file_palette: Sequence[int],
    palette: Sequence[Sequence[int]],
) -> np.ndarray:
    """Class indices of an indexed mask, trusting its palette where it names our colours.

    The file's palette is the only record of which class an index meant when the indices
    are not ours. Read as is: a file whose indices all show their own class's colour (the
    usual case), and a file whose palette is for display only (a grey ramp, PASCAL VOC's
    colours, PIL's default), which at best shares a grey such as black or white with the
    dataset by chance. Mapped by colour: a file whose indices all show dataset colours,
    at least one of them a true colour (not a grey), i.e. a colour mask re-indexed by an
    editor or PIL's ``quantize``.
    """
    ours = {tuple(int(c) for c in colour): index for index, colour in enumerate(palette)}
    colours: dict[int, tuple[int, ...]] = {}
    for value in np.unique(indices).tolist():
        colours[value] = tuple(int(c) for c in file_palette[3 * value : 3 * value + 3])
    if all(ours.get(rgb) == value for value, rgb in colours.items()):
        return indices
    coloured = any(len(set(rgb)) > 1 for rgb in colours.values())
    if not coloured or not all(rgb in ours for rgb in colours.values()):
        return indices
    lookup = np.arange(256, dtype=np.uint8)
    for value, rgb in colours.items():
        lookup[value] = ours[rgb]
    return lookup[indices]


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(height, width)`` from the header without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    return h, w


def palette_to_flat(palette: Sequence[Sequence[int]]) -> list[int]:
    """PIL's flat 768-entry palette from a list of RGB triples (unused entries black)."""
    flat = [int(c) for colour in palette for c in colour]
    return flat + [0] * (768 - len(flat))


def encode_rgb_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode an ``H×W×3`` ``uint8`` array as PNG bytes."""
    buf = io.BytesIO()
    image = np.ascontiguousarray(image, dtype=np.uint8)
    Image.frombytes("RGB", (image.shape[1], image.shape[0]), image.tobytes()).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def encode_mask_png(
    mask: np.ndarray, palette: Sequence[Sequence[int]], compress_level: int = 6
) -> bytes:
    """Encode an ``H×W`` index mask as an indexed ("P" mode) PNG with ``palette``."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    img.putpalette(palette_to_flat(palette))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_rgb_png(path: str | os.PathLike[str], image: np.ndarray, compress_level: int = 6) -> None:
    """Write an RGB PNG atomically."""
    atomic_write_bytes(path, encode_rgb_png(image, compress_level))


def write_mask_png(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    compress_level: int = 6,
) -> None:
    """Write an indexed palette PNG atomically."""
    atomic_write_bytes(path, encode_mask_png(mask, palette, compress_level))


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden and temporary files skipped)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def sha256_of(data: bytes | Path) -> str:
    """SHA-256 hex digest of some bytes or of a file's content (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(data)
    return digest.hexdigest()
