"""Choosing the reader for a file, and listing the inputs of a folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hisynseg.slides.base import SlideReader, SlideReadError

__all__ = [
    "IMAGE_SUFFIXES",
    "INPUT_SUFFIXES",
    "SLIDE_SUFFIXES",
    "InputListing",
    "list_inputs",
    "open_slide",
    "scan_inputs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
# Read by OpenSlide when it is installed; tifffile reads the first two without it.
OPENSLIDE_PREFERRED = (".svs", ".ndpi")
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
SLIDE_SUFFIXES = (".tif", ".tiff", *OPENSLIDE_PREFERRED, *OPENSLIDE_ONLY)
INPUT_SUFFIXES = (*IMAGE_SUFFIXES, *SLIDE_SUFFIXES)


def _has_openslide() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """Open ``path`` with the reader its format needs.

    PNG/JPEG/BMP: :class:`PlainImageReader`; TIFF (plain or pyramidal):
    :class:`TiffSlideReader`; SVS and NDPI: OpenSlide when installed (tifffile for those
    it refuses), else tifffile;
    MIRAX, Ventana, Hamamatsu VMS/VMU, Leica SCN, Philips: OpenSlide.

    Raises:
        SlideReadError: Missing or unreadable file, an unknown suffix, or a format whose
            reader is not installed (the message names the pip extra).
        ImageReadError: A corrupt plain image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise SlideReadError(f"{path}: file not found")
    if suffix in IMAGE_SUFFIXES:
        from hisynseg.slides.plain import PlainImageReader

        return PlainImageReader(path)
    if suffix in OPENSLIDE_ONLY or (suffix in OPENSLIDE_PREFERRED and _has_openslide()):
        from hisynseg.slides.openslide_reader import OpenSlideReader

        try:
            return OpenSlideReader(path)
        except SlideReadError as refused:
            if suffix in OPENSLIDE_ONLY:
                raise
            # OpenSlide refuses SVS/NDPI files its vendor rules do not cover (a stripped
            # SVS, say) that are still ordinary TIFFs.
            from hisynseg.slides.tiff import TiffSlideReader

            try:
                return TiffSlideReader(path)
            except SlideReadError:
                raise refused from None
    if suffix in (".tif", ".tiff", *OPENSLIDE_PREFERRED):
        from hisynseg.slides.tiff import TiffSlideReader

        return TiffSlideReader(path)
    raise SlideReadError(
        f"{path}: unsupported file type {suffix or '(no suffix)'}; expected one of "
        + ", ".join(INPUT_SUFFIXES)
    )


@dataclass
class InputListing:
    """The inputs :func:`scan_inputs` found, and what it did not take from the folders.

    Attributes:
        files: Files to predict, in order, without duplicates.
        unsearched: Per folder listed, how many (not hidden) subfolders it holds, which
            are not searched.
        left_out: Per folder listed, how many input files ``leave_out`` took out.
    """

    files: list[Path] = field(default_factory=list)
    unsearched: dict[Path, int] = field(default_factory=dict)
    left_out: dict[Path, int] = field(default_factory=dict)


def scan_inputs(
    paths: Iterable[str | os.PathLike[str]],
    leave_out: Callable[[Path], bool] | None = None,
) -> InputListing:
    """Files to predict, as :func:`list_inputs`, with what the folders held beside them.

    Args:
        paths: Files and folders.
        leave_out: Says of each file and subfolder in a listed folder whether to pass it
            over (e.g. the outputs of an earlier prediction into that folder). Such a file
            is counted in ``left_out``, such a folder not in ``unsearched``. Files given
            as paths are always kept.

    Returns:
        The files, and per folder the subfolders not searched and the files left out.
    """
    listing = InputListing()
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        found = [path]
        if path.is_dir():
            found, subfolders, skipped = [], 0, 0
            for p in sorted(path.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_dir():
                    subfolders += not (leave_out is not None and leave_out(p))
                elif p.is_file() and p.suffix.lower() in INPUT_SUFFIXES:
                    if leave_out is not None and leave_out(p):
                        skipped += 1
                    else:
                        found.append(p)
            if subfolders:
                listing.unsearched[path] = subfolders
            if skipped:
                listing.left_out[path] = skipped
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                listing.files.append(p)
    return listing


def list_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files to predict: each file as given, and the images/slides directly in each folder.

    Folders are listed sorted, hidden files skipped; their subfolders are not searched
    (:func:`scan_inputs` counts them). A path that does not exist is kept (it is reported
    as a failed input, not silently dropped). Duplicates are removed.
    """
    return scan_inputs(paths).files
