"""Reading images and whole-slide images region by region.

:func:`open_slide` picks the reader for a file: :class:`PlainImageReader` for pictures,
:class:`TiffSlideReader` (tifffile) for plain and pyramidal TIFF, :class:`OpenSlideReader`
for vendor slide formats. All offer the :class:`SlideReader` interface. tifffile and
OpenSlide are imported only when a file needs them.
"""

from hisynseg.slides.base import (
    SlideReader,
    SlideReadError,
    best_level,
    plausible_mpp,
    read_thumbnail,
)
from hisynseg.slides.open import INPUT_SUFFIXES, SLIDE_SUFFIXES, list_inputs, open_slide
from hisynseg.slides.openslide_reader import OpenSlideReader
from hisynseg.slides.plain import PlainImageReader
from hisynseg.slides.tiff import TiffSlideReader

__all__ = [
    "INPUT_SUFFIXES",
    "OpenSlideReader",
    "PlainImageReader",
    "SLIDE_SUFFIXES",
    "SlideReadError",
    "SlideReader",
    "TiffSlideReader",
    "best_level",
    "list_inputs",
    "open_slide",
    "plausible_mpp",
    "read_thumbnail",
]
