"""Image-mixing synthesis (METHOD.md §3): Mosaic and Bézier images with exact pixel masks.

* :mod:`~hisynseg.synthesis.pool`: the single-label source images, decoded once.
* :mod:`~hisynseg.synthesis.background`: white background of WSSS4LUAD-style patches.
* :mod:`~hisynseg.synthesis.mosaic`, :mod:`~hisynseg.synthesis.bezier`: one sample each,
  from a pool and a random generator (functions ``mosaic.mosaic`` and ``bezier.bezier``,
  not re-exported here so that the submodule names stay modules).
* :mod:`~hisynseg.synthesis.generate`: deterministic, resumable, parallel writing of a set.

Nothing here imports torch; the discriminator filter plugs into
:func:`~hisynseg.synthesis.generate.synthesize` through its ``keep`` argument.
"""

from hisynseg.synthesis.bezier import BezierParams
from hisynseg.synthesis.generate import (
    METHODS,
    KeepFunction,
    SynthesisSummary,
    default_params,
    generate_one,
    synthesize,
)
from hisynseg.synthesis.mosaic import MosaicParams
from hisynseg.synthesis.pool import SourcePool, SynthesisError, Synthesized

__all__ = [
    "METHODS",
    "BezierParams",
    "KeepFunction",
    "MosaicParams",
    "SourcePool",
    "SynthesisError",
    "SynthesisSummary",
    "Synthesized",
    "default_params",
    "generate_one",
    "synthesize",
]
