"""Dataset descriptions, label codecs, layouts, image I/O and validation."""

from hisynseg.datasets.labels import LabelCodec, LabelError
from hisynseg.datasets.spec import (
    DATASET_NAMES,
    DATASETS,
    DatasetSpec,
    get_dataset_spec,
    load_generic_spec,
    resolve_dataset_spec,
)

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DatasetSpec",
    "LabelCodec",
    "LabelError",
    "get_dataset_spec",
    "load_generic_spec",
    "resolve_dataset_spec",
]
