"""The segmentation network (DeepLabV3+ with a CAM head) and its initial weights."""

from hisynseg.models.segmenter import (
    OUTPUT_STRIDE,
    HisynSegNet,
    SegmenterOutput,
    build_segmenter,
)
from hisynseg.models.weights import (
    WeightsFileError,
    WeightsReport,
    WeightsUnavailableError,
    load_initial_weights,
    load_weights_file,
    read_state_dict,
)

__all__ = [
    "OUTPUT_STRIDE",
    "HisynSegNet",
    "SegmenterOutput",
    "WeightsFileError",
    "WeightsReport",
    "WeightsUnavailableError",
    "build_segmenter",
    "load_initial_weights",
    "load_weights_file",
    "read_state_dict",
]
