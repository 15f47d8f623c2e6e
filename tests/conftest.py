"""Shared fixtures: tiny generated datasets in each of the four layouts.

``toy_dataset(name, **kwargs)`` builds a fresh dataset under the test's ``tmp_path`` with
:func:`hisynseg.datasets.toy.make_toy_dataset`; the defaults make it small (32 px patches,
2 single-label images per class) so that a test using it takes milliseconds. Keyword
arguments override the defaults, e.g. ``toy_dataset("wsss4luad", patch_size=48, seed=3)``.

``any_layout`` runs a test once per layout name; ``any_toy`` is a dataset of that layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hisynseg.datasets.toy import ToyDataset, make_toy_dataset

TOY_LAYOUTS = ("luad-histoseg", "bcss-wsss", "wsss4luad", "generic")

TOY_DEFAULTS: dict[str, Any] = {
    "single_per_class": 2,
    "multi_train": 4,
    "num_val": 2,
    "num_test": 2,
    "patch_size": 32,
    "seed": 0,
}

ToyFactory = Callable[..., ToyDataset]


@pytest.fixture
def toy_dataset(tmp_path: Path) -> ToyFactory:
    """Factory: ``toy_dataset(name="luad-histoseg", root=None, **make_toy_dataset_kwargs)``.

    Each call writes a new dataset (under ``tmp_path/<name>-<n>`` unless ``root`` is given)
    and returns the :class:`~hisynseg.datasets.toy.ToyDataset` describing it.
    """
    counter = itertools.count()

    def make(
        name: str = "luad-histoseg", root: str | Path | None = None, **kwargs: Any
    ) -> ToyDataset:
        options = {**TOY_DEFAULTS, **kwargs}
        if root is None:
            root = tmp_path / f"{name}-{next(counter)}"
        return make_toy_dataset(root, name, **options)

    return make


@pytest.fixture(params=TOY_LAYOUTS)
def any_layout(request: pytest.FixtureRequest) -> str:
    """Each dataset layout name in turn: the three benchmarks and ``generic``."""
    return request.param


@pytest.fixture
def any_toy(toy_dataset: ToyFactory, any_layout: str) -> ToyDataset:
    """A small toy dataset of each layout in turn."""
    return toy_dataset(any_layout)
