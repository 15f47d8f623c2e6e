"""Training of the segmentation network: data module, Lightning module, run directory.

Only :mod:`hisynseg.training.run`'s entry points are re-exported here; they import torch
and Lightning when called, so importing this package stays cheap.
"""

from hisynseg.training.run import TrainResult, read_metrics, train

__all__ = ["TrainResult", "read_metrics", "train"]
