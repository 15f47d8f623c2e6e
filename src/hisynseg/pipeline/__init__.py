"""The whole HisynSeg method as one resumable run: recipe, stages, report."""

from hisynseg.pipeline.config import (
    ABLATIONS,
    PipelineConfig,
    apply_pipeline_overrides,
    load_pipeline_config,
)

__all__ = ["ABLATIONS", "PipelineConfig", "apply_pipeline_overrides", "load_pipeline_config"]
