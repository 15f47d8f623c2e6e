"""Reading trained segmenters back: Lightning checkpoints and plain exports.

Three file kinds are accepted by :func:`load_segmenter`:

* a **Lightning checkpoint** (``.ckpt``) written by ``hisynseg train``: its
  ``hyper_parameters`` hold ``{"model": model.config(), "dataset": spec.to_dict(),
  "config": <resolved run configuration>}`` and its ``state_dict`` the module's weights
  (keys prefixed ``model.``);
* an **export** written by :func:`export_segmenter`: a dictionary with
  ``"format": "hisynseg-segmenter"``, the same ``model``/``dataset``/``config`` entries
  and the network's own ``state_dict`` (no prefix);
* a **bare state dict** (parameter name → tensor, e.g. ``torch.save(model.state_dict())``),
  which carries no description: pass ``model_config`` to say how to build the network.

Loading checks the file before trusting it: an unreadable or truncated file, or weights
that do not fit the network they claim to be, raise :class:`CheckpointError`; so does a
checkpoint made for another class list than the expected dataset's.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hisynseg.datasets.io import atomic_path
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError

__all__ = [
    "CheckpointError",
    "EXPORT_FORMAT",
    "read_checkpoint",
    "checkpoint_meta",
    "check_checkpoint_classes",
    "load_segmenter",
    "export_segmenter",
]

EXPORT_FORMAT = "hisynseg-segmenter"


class CheckpointError(HisynsegError, ValueError):
    """A checkpoint is missing, corrupt, or made for other data; the message names the file."""


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file's dictionary.

    Only tensors and plain containers are unpickled (``weights_only``); a file that needs
    more (an old Lightning checkpoint with pickled objects) is read fully as a fallback,
    so only load checkpoints you trust.

    Raises:
        CheckpointError: The file is missing, corrupt or truncated, or not a dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path}: an ONNX model, which only 'hisynseg predict' runs; this needs the "
            "torch checkpoint (.ckpt from 'hisynseg train') it was exported from"
        )
    try:
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights_only" not in str(exc).lower() and "weights only" not in str(exc).lower():
                raise
            data = torch.load(path, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except Exception as exc:  # torch reports corruption as many exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{path}: corrupt checkpoint: holds a {type(data).__name__}, not a dictionary"
        )
    return dict(data)


def _split(data: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, state_dict of the bare network)`` of a loaded checkpoint dictionary."""
    if data.get("format") == EXPORT_FORMAT:
        meta = {k: data.get(k) for k in ("model", "dataset", "config")}
        meta["kind"] = "export"
        return meta, dict(data["state_dict"])
    if "state_dict" in data and isinstance(data.get("hyper_parameters"), Mapping):
        hp = data["hyper_parameters"]
        if "model" not in hp:
            raise CheckpointError(
                f"{path}: a Lightning checkpoint, but not of a hisynseg segmenter "
                "(its hyper_parameters have no 'model' entry)"
            )
        meta = {k: hp.get(k) for k in ("model", "dataset", "config")}
        meta.update(
            kind="lightning",
            epoch=data.get("epoch"),
            global_step=data.get("global_step"),
            **{k: v for k, v in (data.get("hisynseg") or {}).items() if k == "best_miou"},
        )
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
        return meta, state
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        state = {k.removeprefix("model."): v for k, v in data.items()}
        return {"model": None, "dataset": None, "config": None, "kind": "state_dict"}, state
    raise CheckpointError(
        f"{path}: not a hisynseg checkpoint (neither a Lightning checkpoint with "
        "hyper_parameters, an export, nor a state dict)"
    )


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description stored with a checkpoint: ``model``, ``dataset``, ``config``, ``kind``
    (and for Lightning checkpoints ``epoch``, ``global_step``, ``best_miou``).

    Raises:
        CheckpointError: See :func:`read_checkpoint`.
    """
    meta, _ = _split(read_checkpoint(path), Path(path))
    meta["path"] = str(path)
    return meta


def check_checkpoint_classes(
    meta: Mapping[str, Any], spec: DatasetSpec, path: str | os.PathLike[str]
) -> None:
    """Refuse a checkpoint whose class list differs from ``spec``'s.

    Raises:
        CheckpointError: The class lists differ; the message shows both.
    """
    dataset = meta.get("dataset")
    if not dataset:
        return
    theirs = [str(c) for c in dataset.get("classes", [])]
    ours = list(spec.class_names)
    if theirs != ours:
        raise CheckpointError(
            f"{path}: checkpoint was trained for classes {theirs} "
            f"(dataset {dataset.get('name')!r}), but the data has classes {ours} "
            f"(dataset {spec.name!r})"
        )
    bg = dataset.get("background_index")
    if bg is not None and int(bg) != spec.background_index:
        raise CheckpointError(
            f"{path}: checkpoint uses background index {bg}, the data {spec.background_index}"
        )


def load_segmenter(
    path: str | os.PathLike[str],
    expected_spec: DatasetSpec | None = None,
    map_location: Any = "cpu",
    model_config: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained segmenter from a checkpoint, an export, or a bare state dict.

    Args:
        path: The file.
        expected_spec: When given, a checkpoint made for another class list is refused.
        map_location: Where to load the tensors (``"cpu"``, ``"cuda"``, a device).
        model_config: :func:`hisynseg.models.build_segmenter` keyword arguments; required
            for a bare state dict, and overrides the stored description otherwise.

    Returns:
        ``(model, meta)``: the network in eval mode, and the stored description
        (``model``, ``dataset``, ``config``, ``kind``, ``path``, ...).

    Raises:
        CheckpointError: Missing, corrupt or foreign file; a class list that differs from
            ``expected_spec``; weights that do not fit the described network.
    """
    from hisynseg.models import build_segmenter

    path = Path(path)
    meta, state = _split(read_checkpoint(path, map_location), path)
    meta["path"] = str(path)
    if expected_spec is not None:
        check_checkpoint_classes(meta, expected_spec, path)
    kwargs = dict(model_config) if model_config is not None else meta.get("model")
    if not kwargs:
        raise CheckpointError(
            f"{path}: a bare state dict does not say how to build the network; "
            "pass model_config (encoder, num_classes, ...)"
        )
    kwargs = dict(kwargs)
    # The checkpoint's weights replace the pretrained ones: never download them.
    kwargs["encoder_weights"] = None
    meta["model"] = dict(kwargs)
    try:
        model = build_segmenter(**kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{path}: unusable model description {kwargs}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its weights do not fit the network it describes ({first})"
        ) from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, meta


def export_segmenter(
    model: torch.nn.Module,
    spec: DatasetSpec,
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write a self-describing plain export (no optimizer or trainer state), atomically.

    Args:
        model: A network from :func:`hisynseg.models.build_segmenter` (has ``config()``).
        spec: The dataset it was trained for.
        path: Destination file.
        config: The run configuration to keep with it, if any.
    """
    payload = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "model": model.config(),
        "dataset": spec.to_dict(),
        "config": dict(config) if config is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
