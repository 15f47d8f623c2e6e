"""Recipes shipped with the package, so that ``--config toy`` works from any folder.

``configs/*.yaml`` in the source tree are links to these files. A ``--config`` value that
names an existing file is that file; otherwise a bare name such as ``toy`` or
``luad-histoseg.yaml`` is looked up among the shipped recipes.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RECIPE_NAMES", "find_recipe", "recipe_path"]

_HERE = Path(__file__).resolve().parent
_DEMO = _HERE.parent / "demo" / "recipe.yaml"

# Name -> file: the pipeline recipes of the three benchmarks, the toy and demo runs, and
# the training defaults (a 'hisynseg train --config' file).
_RECIPES = {
    "luad-histoseg": _HERE / "luad-histoseg.yaml",
    "bcss-wsss": _HERE / "bcss-wsss.yaml",
    "wsss4luad": _HERE / "wsss4luad.yaml",
    "toy": _HERE / "toy.yaml",
    "demo": _DEMO,
    "default": _HERE / "default.yaml",
}
RECIPE_NAMES = tuple(_RECIPES)


def recipe_path(value: str | os.PathLike[str]) -> Path:
    """The file a ``--config`` value means: itself if it is a file, else a shipped recipe.

    Args:
        value: A path, or a recipe name with or without ``.yaml``
            (one of :data:`RECIPE_NAMES`).

    Returns:
        The path to read. A value that is neither is returned unchanged, so that reading
        it reports the missing file under the name the user gave.
    """
    path = Path(value)
    # A folder of the same name (the quick start's dataset is called 'toy') is no recipe.
    if path.is_file() or path.parent != Path("."):
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    return _RECIPES.get(name, path)


def find_recipe(value: str | os.PathLike[str]) -> Path:
    """:func:`recipe_path`, or an error saying the value is neither a file nor a recipe.

    Raises:
        ConfigError: No such file, and no shipped recipe of that name.
    """
    from hisynseg.config import ConfigError

    path = recipe_path(value)
    # Something that exists (a folder, say) is left to the reader, which says what it is.
    if not path.exists():
        raise ConfigError(
            f"{value}: no such configuration file, and no shipped recipe of that name "
            f"(shipped: {', '.join(RECIPE_NAMES)})"
        )
    return path
