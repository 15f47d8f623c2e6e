"""hisynseg: weakly-supervised tissue segmentation of histopathology images (HisynSeg).

Importing the package has no side effects and loads no heavy dependency: torch, Lightning
and the model zoo are imported by the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
