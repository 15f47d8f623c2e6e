"""Initial weights of the segmenter: random, downloaded ImageNet weights, or a local file.

The network is always built with random weights; :func:`load_initial_weights` then fills
it according to the ``encoder_weights`` setting:

* ``None`` / ``"none"``: keep the random initialisation.
* ``"imagenet"`` (or another weight name smp knows for that encoder, e.g. ``"advprop"``):
  fetched by smp (native encoders) or timm (``tu-`` encoders) from the Hugging Face hub.
  On a machine without internet this fails with :class:`WeightsUnavailableError`, whose
  message says where the file lives and how to pass it instead.
* A path to a ``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors`` file holding an encoder
  state dict, a whole smp / hisynseg model state dict (optionally under a prefix such as
  Lightning's ``model.``), or, for ``tu-`` encoders, the timm model's own checkpoint.
  Tensors are matched to the network by name, whatever the prefix; every encoder tensor
  must be found with the right shape or :class:`WeightsFileError` names what is missing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hisynseg.errors import HisynsegError

__all__ = [
    "WEIGHT_FILE_SUFFIXES",
    "WeightsFileError",
    "WeightsReport",
    "WeightsUnavailableError",
    "load_initial_weights",
    "load_weights_file",
    "read_state_dict",
]

_log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
_NO_WEIGHTS = ("", "none", "null", "random")
# Containers in which training frameworks nest the state dict of a checkpoint.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_BN_COUNTER = "num_batches_tracked"


class WeightsUnavailableError(HisynsegError):
    """Pretrained weights could not be downloaded (typically: no internet)."""


class WeightsFileError(HisynsegError):
    """A local weights file is unreadable or does not fit the network."""


@dataclass
class WeightsReport:
    """What :func:`load_weights_file` did.

    Attributes:
        source: The file that was read.
        loaded: Network tensors that received a value from the file.
        skipped: Non-encoder tensors found in the file with another shape (left as built),
            e.g. a segmentation head for another number of classes.
        unused: File tensors that match nothing in the network (e.g. a classifier's ``fc``).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def load_initial_weights(net: nn.Module, encoder_weights: str | Path | None) -> str | None:
    """Fill ``net``'s encoder (and possibly more) according to ``encoder_weights``.

    Args:
        net: A :class:`~hisynseg.models.segmenter.HisynSegNet` (needs ``encoder``,
            ``encoder_name``, ``encoder_depth`` and ``output_stride``).
        encoder_weights: ``None``/``"none"``, ``"imagenet"`` (or another smp weight name of
            the encoder), or a path to a weights file.

    Returns:
        A short description of where the weights came from (``None`` for random).

    Raises:
        WeightsUnavailableError: The download failed.
        WeightsFileError: The file is unreadable or does not fit.
        HisynsegError: ``encoder_weights`` is neither a known weight name nor a file.
    """
    if encoder_weights is None:
        return None
    text = str(encoder_weights).strip()
    if text.lower() in _NO_WEIGHTS:
        return None
    path = Path(text).expanduser()
    if path.is_file():
        report = load_weights_file(net, path)
        return report.source
    names = available_weight_names(net.encoder_name)
    if text in names:
        _load_pretrained(net, text)
        return text
    if path.suffix.lower() in WEIGHT_FILE_SUFFIXES or "/" in text or "\\" in text:
        raise WeightsFileError(f"{path}: weights file not found")
    raise HisynsegError(
        f"encoder_weights {text!r} for encoder {net.encoder_name!r} is neither a file nor a "
        f"known weight name (known: {', '.join(names) or 'none'}; or None for random weights)"
    )


def available_weight_names(encoder_name: str) -> list[str]:
    """The downloadable weight names of an encoder (``["imagenet"]`` for ``tu-`` models)."""
    if encoder_name.startswith("tu-"):
        return ["imagenet"]
    from segmentation_models_pytorch.encoders import encoders

    entry = encoders.get(encoder_name)
    return list(entry["pretrained_settings"]) if entry else []


def _weights_location(encoder_name: str, weights: str) -> str:
    """Where the weights are downloaded from, for the error message."""
    if encoder_name.startswith("tu-"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(encoder_name[3:])
        if cfg is not None and cfg.hf_hub_id:
            return f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)"
        if cfg is not None and cfg.url:
            return cfg.url
        return "the timm model hub"
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder_name]["pretrained_settings"][weights]
    return (
        f"https://huggingface.co/{settings['repo_id']}/resolve/"
        f"{settings['revision']}/model.safetensors"
    )


def _load_pretrained(net: nn.Module, weights: str) -> None:
    """Download the named weights through smp/timm and copy them into ``net.encoder``."""
    from huggingface_hub.errors import HfHubHTTPError
    from segmentation_models_pytorch.encoders import get_encoder

    name = net.encoder_name
    if name.startswith("tu-"):
        from timm.models import is_model_pretrained

        # timm silently falls back to random weights for a model without a pretrained tag.
        if not is_model_pretrained(name[3:]):
            raise HisynsegError(
                f"timm model {name[3:]!r} has no pretrained weights; "
                "use encoder_weights=None or another model"
            )
    try:
        with warnings.catch_warnings():
            # smp warns that tu- encoders take True rather than a weight name.
            warnings.simplefilter("ignore", UserWarning)
            pretrained = get_encoder(
                name,
                in_channels=3,
                depth=net.encoder_depth,
                weights=True if name.startswith("tu-") else weights,
                output_stride=net.output_stride,
            )
    except (OSError, HfHubHTTPError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise WeightsUnavailableError(
            f"could not download the {weights!r} weights of encoder {name!r} "
            f"({type(err).__name__}: {first_line}). Offline? Download "
            f"{_weights_location(name, weights)} on a connected machine and pass the file "
            "instead: encoder_weights=/path/to/file.safetensors (.pth/.pt also accepted; "
            "an encoder state dict, a whole smp model, or a timm checkpoint for tu- encoders)"
        ) from err
    net.encoder.load_state_dict(pretrained.state_dict())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from checkpoint containers.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A dict holding ``state_dict`` (Lightning),
    ``model_state_dict``, ``model``, ``module`` or ``net`` is unwrapped.

    Raises:
        WeightsFileError: Missing, unreadable, or holding no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: weights file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure is the file's fault, reported as such
        raise WeightsFileError(
            f"{path}: not a readable weights file ({type(err).__name__}: "
            f"{(str(err).strip().splitlines() or [''])[0]})"
        ) from err
    for _ in range(3):  # a few levels of nesting at most
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsFileError(f"{path}: holds no tensors")
    return tensors


def _namespaces(net: nn.Module) -> list[str]:
    """Where a file's tensors may belong inside ``net``: whole net, encoder, timm model."""
    spaces = ["", "encoder."]
    if isinstance(getattr(net.encoder, "model", None), nn.Module):
        spaces.append("encoder.model.")
    return spaces


def _best_mapping(
    file_keys: list[str], net_keys: list[str], namespaces: list[str]
) -> dict[str, str]:
    """The renaming ``net key -> file key`` that matches the most encoder tensors.

    A renaming replaces a prefix ``p`` of file keys by a namespace ``q`` of the network;
    candidate prefixes come from file keys that end with one of a few anchor keys.
    """
    net_set = set(net_keys)
    encoder_keys = [k for k in net_keys if k.startswith("encoder.")]
    best: dict[str, str] = {}
    best_score = (-1, -1)
    tried: set[tuple[str, str]] = set()
    for q in namespaces:
        inside = [k[len(q) :] for k in encoder_keys if k.startswith(q)]
        anchors = [a for a in inside[:3] + inside[-3:] if not a.endswith(_BN_COUNTER)]
        for anchor in anchors:
            for key in file_keys:
                if not key.endswith(anchor):
                    continue
                p = key[: len(key) - len(anchor)]
                if p and not p.endswith("."):
                    continue
                if (p, q) in tried:
                    continue
                tried.add((p, q))
                mapping = {
                    q + k[len(p) :]: k
                    for k in file_keys
                    if k.startswith(p) and q + k[len(p) :] in net_set
                }
                n_enc = sum(1 for k in mapping if k.startswith("encoder."))
                score = (n_enc, len(mapping))
                if score > best_score:
                    best, best_score = mapping, score
    return best


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights_file(net: nn.Module, path: str | Path) -> WeightsReport:
    """Load a local weights file into ``net`` (see the module docstring for formats).

    Every encoder tensor must be found with the network's shape. Decoder and head tensors
    are loaded when present with the right shape; those with another shape are left as
    built and listed in a warning (a head trained for another number of classes).

    Raises:
        WeightsFileError: Unreadable file, or encoder tensors missing / of another shape.
    """
    path = Path(path)
    state = read_state_dict(path)
    own = net.state_dict()
    net_keys = list(own)
    mapping = _best_mapping(list(state), net_keys, _namespaces(net))
    encoder_keys = [k for k in net_keys if k.startswith("encoder.")]
    required = [k for k in encoder_keys if not k.endswith(_BN_COUNTER)]
    name = getattr(net, "encoder_name", "?")
    if not mapping:
        raise WeightsFileError(
            f"{path}: none of its {len(state)} tensors (e.g. {_examples(list(state))}) "
            f"matches encoder {name!r} (which has e.g. "
            f"{_examples([k.removeprefix('encoder.') for k in required])}); "
            "is it a checkpoint of another encoder?"
        )
    missing = [k for k in required if k not in mapping]
    wrong = [
        f"{k} (file {tuple(state[mapping[k]].shape)}, model {tuple(own[k].shape)})"
        for k in encoder_keys
        if k in mapping and state[mapping[k]].shape != own[k].shape
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(required)} tensors missing: {_examples(missing)}")
        if wrong:
            parts.append(f"{len(wrong)} of another shape: {_examples(wrong)}")
        raise WeightsFileError(
            f"{path}: does not fit encoder {name!r}: {'; '.join(parts)}. Pass weights of "
            "the same encoder (its state dict, a whole smp/hisynseg model, or the timm "
            "checkpoint of a tu- encoder)"
        )
    report = WeightsReport(source=str(path))
    to_load: dict[str, torch.Tensor] = {}
    for key, file_key in mapping.items():
        if state[file_key].shape == own[key].shape:
            to_load[key] = state[file_key]
            report.loaded.append(key)
        else:
            report.skipped.append(key)
    used = set(mapping.values())
    report.unused = [k for k in state if k not in used]
    net.load_state_dict(to_load, strict=False)
    if report.skipped:
        warnings.warn(
            f"{path}: {len(report.skipped)} non-encoder tensors have another shape and keep "
            f"their initial values: {_examples(report.skipped)}",
            UserWarning,
            stacklevel=2,
        )
    if len(report.unused) > max(8, len(report.loaded) // 10):
        # A classifier head or two is normal in ImageNet checkpoints; many more tensors
        # suggest weights of a larger variant (resnet34 into resnet18 fits key by key).
        warnings.warn(
            f"{path}: {len(report.unused)} of its tensors are not used by {name!r} "
            f"(e.g. {_examples(report.unused)}); are they weights of another encoder?",
            UserWarning,
            stacklevel=2,
        )
    elif report.unused:
        _log.info("%s: ignored %d tensors: %s", path, len(report.unused), _examples(report.unused))
    return report
