"""The image filtering module: a real-vs-synthetic discriminator and the scorer built on it.

HisynSeg (METHOD.md §4) trains, per dataset and synthesis strategy, a ResNet-18 from
scratch to tell real training images (those with two or more tissue labels) from
unfiltered synthesized ones. The synthesis stage then keeps a fresh synthetic image only
when the discriminator's softmax probability of "real" exceeds a threshold (0.5).

This module holds the whole filter: the data split, the training loop with best-epoch
selection, the checkpoint format (weights plus the metadata that ties them to one dataset
and one strategy), and :class:`RealnessScorer`, which turns a batch of RGB arrays into
``p(real)``. It imports torch and timm, so the CLI imports it only inside commands.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hisynseg import __version__
from hisynseg.datasets.io import (
    ImageReadError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    list_images,
    read_rgb,
)
from hisynseg.datasets.layouts import list_train
from hisynseg.datasets.spec import DatasetSpec, resolve_dataset_spec
from hisynseg.devices import resolve_device
from hisynseg.errors import HisynsegError
from hisynseg.normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "FILTER_FILE",
    "METRICS_CSV",
    "METRICS_JSON",
    "METRICS_PNG",
    "FILTER_CONFIG_FILE",
    "REAL_INDEX",
    "FilterError",
    "FilterFileError",
    "FilterExistsError",
    "FilterTrainConfig",
    "FilterSplit",
    "FilterTrainResult",
    "RealnessScorer",
    "binary_metrics",
    "select_best_epoch",
    "split_real_fake",
    "build_discriminator",
    "preprocess_images",
    "paper_cap",
    "train_filter",
    "synthetic_set_method",
    "save_filter",
    "load_filter",
]

log = logging.getLogger(__name__)

FILTER_FILE = "filter.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
METRICS_PNG = "metrics.png"
FILTER_CONFIG_FILE = "filter_config.json"

# Class 1 is "real", class 0 "synthetic", as in the reference notebooks; p(real) is the
# softmax probability of class 1.
REAL_INDEX = 1
FAKE_INDEX = 0
ARCH = "resnet18"

_FORMAT = "hisynseg-filter"
_FORMAT_VERSION = 1
# Training-image cap per side used by the paper (LUAD-HistoSeg, BCSS-WSSS); WSSS4LUAD had none.
_PAPER_CAP = 5000
_UNCAPPED_DATASETS = ("wsss4luad",)

_METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
)


class FilterError(HisynsegError):
    """The filter cannot be trained or used as asked; the message says why."""


class FilterFileError(FilterError, ValueError):
    """A filter checkpoint is unreadable, not a filter, or made for other data."""


class FilterExistsError(FilterError):
    """The output folder holds a filter trained for another method, dataset or settings."""


# ----------------------------------------------------------------------------- settings


@dataclass
class FilterTrainConfig:
    """Settings of one discriminator training run (defaults: the paper's).

    Attributes:
        epochs: Training epochs; the epoch with the best validation accuracy is kept.
        lr: Adam learning rate.
        batch_size: Images per optimisation step.
        cap: Most training images per side (real, synthetic) after the split, as in the
            reference code; ``None`` for no cap. The validation part is never capped.
        val_fraction: Share of each side held out for validation (stratified split).
        image_size: Side images are resized to before entering the network.
        seed: Seeds the split, the weight initialisation, shuffling and flips.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ...
        workers: DataLoader worker processes (0 reads images in the main process).
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 256
    cap: int | None = _PAPER_CAP
    val_fraction: float = 0.2
    image_size: int = 224
    seed: int = 0
    device: str = "auto"
    workers: int = 0

    def validate(self) -> None:
        """Raise :class:`FilterError` naming the first invalid setting."""
        if self.epochs < 1:
            raise FilterError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise FilterError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise FilterError(f"batch size must be at least 1, got {self.batch_size}")
        if self.cap is not None and self.cap < 1:
            raise FilterError(f"cap must be at least 1 (or none), got {self.cap}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FilterError(f"val fraction must be in (0, 1), got {self.val_fraction}")
        if self.image_size < 8:
            raise FilterError(f"image size must be at least 8 pixels, got {self.image_size}")
        if self.workers < 0:
            raise FilterError(f"workers must be 0 or more, got {self.workers}")


def paper_cap(spec: DatasetSpec) -> int | None:
    """The training cap per side the paper used for ``spec`` (``None``: no cap)."""
    return None if spec.name in _UNCAPPED_DATASETS else _PAPER_CAP


# ----------------------------------------------------------------------------- metrics


def binary_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    positive: int = REAL_INDEX,
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of hard predictions, ``positive`` the positive class.

    A ratio whose denominator is zero (no predicted or no true positives) is 0.0, so the
    numbers stay finite on degenerate epochs.
    """
    t = np.asarray(y_true).ravel() == positive
    p = np.asarray(y_pred).ravel() == positive
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    n = t.size
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    tn = n - tp - fp - fn
    accuracy = (tp + tn) / n if n else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def select_best_epoch(history: Sequence[dict[str, Any]], key: str = "val_accuracy") -> int:
    """Index in ``history`` of the epoch with the highest ``key`` (the earliest on ties).

    Validation accuracy of the discriminator swings a lot from epoch to epoch (paper), so
    the kept model is the best epoch, not the last one.

    Raises:
        ValueError: Empty history, or an entry without ``key``.
    """
    if not history:
        raise ValueError("no epochs to choose from")
    best, best_value = 0, float("-inf")
    for i, entry in enumerate(history):
        if key not in entry:
            raise ValueError(f"epoch entry {i} has no {key!r}")
        value = float(entry[key])
        if value > best_value:
            best, best_value = i, value
    return best


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FilterSplit:
    """Indices into the real and the synthetic image lists."""

    train_real: np.ndarray
    val_real: np.ndarray
    train_fake: np.ndarray
    val_fake: np.ndarray


def _split_one(n: int, val_fraction: float, cap: int | None, rng: np.random.Generator):
    order = rng.permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val, train = order[:n_val], order[n_val:]
    if cap is not None:
        train = train[:cap]
    return np.sort(train), np.sort(val)


def split_real_fake(
    n_real: int, n_fake: int, val_fraction: float = 0.2, cap: int | None = None, seed: int = 0
) -> FilterSplit:
    """Seeded stratified train/validation split of the real and the synthetic images.

    Each side is shuffled and split on its own (at least one image on each side of the
    split), then the training part of each side is cut to ``cap`` images.

    Raises:
        FilterError: A side has fewer than two images.
    """
    for what, n in (("real", n_real), ("synthetic", n_fake)):
        if n < 2:
            raise FilterError(
                f"need at least 2 {what} images to train and validate the filter, found {n}"
            )
    rng = np.random.default_rng(seed)
    train_real, val_real = _split_one(n_real, val_fraction, cap, rng)
    train_fake, val_fake = _split_one(n_fake, val_fraction, cap, rng)
    return FilterSplit(train_real, val_real, train_fake, val_fake)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    # PIL's bilinear resize antialiases on downscaling, like torchvision's Resize on PIL
    # images in the reference; training and scoring share this one function.
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))


def _to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    arr = _resize(np.asarray(image, dtype=np.uint8), size).astype(np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess_images(images: Sequence[np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """``N×3×size×size`` float tensor: resized, scaled to [0, 1], ImageNet-normalised."""
    if len(images) == 0:
        return torch.empty((0, 3, size, size))
    return torch.stack([_to_tensor(img, size) for img in images])


def _unreadable_images(paths: Sequence[Path]) -> list[str]:
    """``"path (problem)"`` for each file that is not a whole image.

    PIL's ``verify`` walks the file's structure (PNG: every chunk and its checksum)
    without decoding the pixels, so checking every image before training costs a small
    part of one epoch and catches a damaged file before hours of training, not after.
    """
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except UnidentifiedImageError:
            bad.append(f"{path} (not an image file)")
        except Exception as exc:  # PIL reports damage as many exception types
            bad.append(f"{path} ({type(exc).__name__}: {exc})")
    return bad


class _FileDataset(Dataset):
    """Image files with 0/1 targets; random horizontal and vertical flips when training.

    An item is ``(image, target, error)``: ``error`` is ``""``, or the one-line message of
    an image that could not be read (the image is then zeros). Raised inside a DataLoader
    worker, the error would come back wrapped in the worker's traceback; as data, it lets
    :func:`_batches` raise it as it is.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], size: int, flip: bool):
        self.paths = list(paths)
        self.targets = list(targets)
        self.size = size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            x = _to_tensor(read_rgb(self.paths[i]), self.size)
        except HisynsegError as exc:
            return torch.zeros((3, self.size, self.size)), self.targets[i], str(exc)
        if self.flip:
            # torch's RNG: seeded by the DataLoader in each worker, so runs repeat.
            if torch.rand(()) < 0.5:
                x = x.flip(2)
            if torch.rand(()) < 0.5:
                x = x.flip(1)
        return x, self.targets[i], ""


def _batches(loader: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(images, targets)`` batches of a :class:`_FileDataset` loader.

    Raises:
        ImageReadError: An image of the batch could not be read (its own message).
    """
    for x, y, errors in loader:
        failed = [e for e in errors if e]
        if failed:
            raise ImageReadError(failed[0])
        yield x, y


# ----------------------------------------------------------------------------- model + scorer


def build_discriminator() -> nn.Module:
    """A randomly initialised timm ResNet-18 with two outputs (synthetic, real)."""
    import timm

    return timm.create_model(ARCH, pretrained=False, num_classes=2)


class RealnessScorer:
    """Scores RGB images with a trained discriminator: ``scorer(images) -> p(real)``.

    Args:
        model: A two-class network whose output 1 is "real".
        image_size: Side images are resized to.
        device: Where to run; ``"auto"`` picks CUDA when available.
        batch_size: Images per forward pass.
        metadata: What the checkpoint said about the filter (dataset, method, epoch, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(resolve_device(device)) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.batch_size = max(1, int(batch_size))
        self.metadata = dict(metadata or {})

    @property
    def method(self) -> str | None:
        """The synthesis method the filter was trained on, if recorded."""
        return self.metadata.get("method")

    @property
    def dataset_name(self) -> str | None:
        """The name of the dataset the filter was trained on, if recorded."""
        return (self.metadata.get("dataset") or {}).get("name")

    @property
    def description(self) -> str:
        """Identifies the filter in ``synthesis.json`` (a resumed run must use the same one)."""
        desc = self.metadata.get("description")
        if desc:
            return str(desc)
        return f"realness filter {type(self.model).__name__} at {self.image_size} px"

    def __call__(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        masks: Any = None,
        labels: Any = None,
    ) -> np.ndarray:
        """p(real) of each image.

        The scorer is itself a ``keep`` function for
        :func:`hisynseg.synthesis.generate.synthesize`, which also passes the masks and
        labels of the batch; the filter judges the images alone and ignores them.

        Args:
            images: A list of ``H×W×3`` ``uint8`` arrays (sizes may differ) or one
                ``N×H×W×3`` array.
            masks: Ignored.
            labels: Ignored.

        Returns:
            A float64 array of shape ``(N,)`` with values in [0, 1].
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(
                f"expected a batch of H×W×3 images (N×H×W×3), got an array of shape "
                f"{images.shape}; wrap a single image in a list"
            )
        out = np.empty(len(images), dtype=np.float64)
        self.model.eval()  # in case a caller switched it to training mode meanwhile
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                x = preprocess_images(chunk, self.image_size).to(self.device)
                prob = torch.softmax(self.model(x).float(), dim=1)[:, REAL_INDEX]
                out[start : start + len(chunk)] = prob.cpu().numpy()
        return out


def save_filter(
    path: str | Path,
    model: nn.Module,
    *,
    spec: DatasetSpec,
    method: str,
    image_size: int,
    epoch: int,
    val_metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a filter checkpoint atomically: weights plus the metadata :func:`load_filter` checks."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "arch": ARCH,
        "num_classes": 2,
        "real_index": REAL_INDEX,
        "dataset": spec.to_dict(),
        "method": method,
        "image_size": int(image_size),
        "epoch": int(epoch),
        "val_metrics": {k: float(v) for k, v in val_metrics.items()},
        "hisynseg_version": __version__,
        **(extra or {}),
        "state_dict": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _expected_spec(
    dataset: str | DatasetSpec | None, root: str | Path | None
) -> DatasetSpec | None:
    if dataset is None or isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return resolve_dataset_spec(dataset, root)
    except (KeyError, ValueError) as exc:
        raise FilterError(str(exc).strip("'\"")) from None


def load_filter(
    path: str | Path,
    *,
    dataset: str | DatasetSpec | None = None,
    method: str | None = None,
    root: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
) -> RealnessScorer:
    """Load a filter written by :func:`train_filter` as a :class:`RealnessScorer`.

    Args:
        path: The ``filter.pt`` file.
        dataset: When given (name or spec), the filter must have been trained on this
            dataset (same name and classes).
        method: When given, the filter must have been trained on this synthesis method.
        root: Data root, needed only to resolve ``dataset="generic"``.
        device: Where to score (``"auto"``: CUDA when available).
        batch_size: Images per forward pass.

    Raises:
        FilterFileError: Missing, corrupt or foreign file, or a filter for another dataset
            or method.
    """
    path = Path(path)
    if not path.is_file():
        raise FilterFileError(
            f"{path}: filter file not found (train one with hisynseg train-filter)"
        )
    data = path.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports corruption as many exception types
        raise FilterFileError(
            f"{path}: not a readable filter checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise FilterFileError(f"{path}: not a hisynseg filter checkpoint (no '{_FORMAT}' header)")
    if ckpt.get("format_version") != _FORMAT_VERSION:
        raise FilterFileError(
            f"{path}: filter format version {ckpt.get('format_version')!r} is not supported "
            f"(this hisynseg reads version {_FORMAT_VERSION})"
        )
    missing = [
        k
        for k in ("arch", "dataset", "method", "image_size", "state_dict", "real_index")
        if k not in ckpt
    ]
    if missing:
        raise FilterFileError(f"{path}: filter checkpoint lacks {missing}")
    if ckpt["arch"] != ARCH or ckpt["real_index"] != REAL_INDEX:
        raise FilterFileError(
            f"{path}: filter architecture {ckpt['arch']!r} (real index {ckpt['real_index']}) "
            f"is not the {ARCH!r} this hisynseg builds"
        )
    trained = ckpt["dataset"] if isinstance(ckpt["dataset"], dict) else {}
    expected = _expected_spec(dataset, root)
    if expected is not None:
        want = expected.to_dict()
        if trained.get("name") != want["name"] or trained.get("classes") != want["classes"]:
            raise FilterFileError(
                f"{path}: filter was trained on dataset {trained.get('name')!r} "
                f"(classes {trained.get('classes')}), not {want['name']!r} "
                f"(classes {want['classes']}); train one for this dataset with "
                "hisynseg train-filter"
            )
    if method is not None and ckpt["method"] != method:
        raise FilterFileError(
            f"{path}: filter was trained on {ckpt['method']!r} images, not {method!r}; "
            "the paper trains one filter per synthesis method"
        )
    model = build_discriminator()
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FilterFileError(
            f"{path}: filter weights do not fit a {ARCH} ({str(exc).splitlines()[0]})"
        ) from None
    metadata = {k: v for k, v in ckpt.items() if k != "state_dict"}
    # The content hash, not the path, names the filter: a moved file still resumes a run.
    digest = hashlib.sha256(data).hexdigest()[:16]
    metadata["description"] = (
        f"discriminator {ckpt['method']}/{trained.get('name')} epoch {ckpt.get('epoch')} "
        f"sha256:{digest}"
    )
    try:
        return RealnessScorer(
            model, int(ckpt["image_size"]), device=device, batch_size=batch_size, metadata=metadata
        )
    except FilterError as exc:
        raise FilterFileError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------- training


@dataclass
class FilterTrainResult:
    """What :func:`train_filter` produced."""

    out: Path
    checkpoint: Path
    history: list[dict[str, float]]
    best_epoch: int
    best: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: bool = False

    def history_table(self) -> str:
        """The per-epoch losses and validation figures as a text table, the kept epoch
        marked."""
        lines = ["epoch  train_loss  val_acc  val_prec  val_rec  val_f1"]
        for e in self.history:
            mark = "  <- kept" if e["epoch"] == self.best_epoch else ""
            lines.append(
                f"{e['epoch']:>5}  {e['train_loss']:>10.4f}  {e['val_accuracy']:>7.4f}  "
                f"{e['val_precision']:>8.4f}  {e['val_recall']:>7.4f}  {e['val_f1']:>6.4f}{mark}"
            )
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "hisynseg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def _write_metrics(out: Path, history: list[dict[str, float]], summary: dict[str, Any]) -> None:
    with atomic_path(out / METRICS_CSV) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_METRIC_COLUMNS)
        for entry in history:
            writer.writerow([entry["epoch"]] + [f"{entry[c]:.6f}" for c in _METRIC_COLUMNS[1:]])
    atomic_write_json(out / METRICS_JSON, {**summary, "epochs": history})


def _plot_metrics(path: Path, history: list[dict[str, float]], best_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [e["train_loss"] for e in history], "o-", label="train loss")
    ax_loss.plot(epochs, [e["val_loss"] for e in history], "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    for name in ("accuracy", "precision", "recall", "f1"):
        ax_val.plot(epochs, [e[f"val_{name}"] for e in history], "o-", label=name)
    ax_val.axvline(best_epoch, color="grey", linestyle="--", label=f"kept (epoch {best_epoch})")
    ax_val.set_ylim(-0.02, 1.02)
    ax_val.set_xlabel("epoch")
    ax_val.set_title("validation (positive class: real)")
    ax_val.legend(loc="best", fontsize="small")
    for ax in (ax_loss, ax_val):
        ax.set_xticks(epochs)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, criterion: nn.Module
) -> tuple[float, np.ndarray, np.ndarray]:
    model.eval()
    total, n = 0.0, 0
    targets, preds = [], []
    with torch.no_grad():
        for x, y in _batches(loader):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += float(criterion(logits, y)) * len(y)
            n += len(y)
            targets.append(y.cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
    return total / max(n, 1), np.concatenate(targets), np.concatenate(preds)


def synthetic_set_method(folder: str | Path, spec: DatasetSpec, method: str | None = None) -> str:
    """The synthesis method that made ``folder``, checked against ``spec`` and ``method``.

    Reads the set's ``synthesis.json`` (written by ``hisynseg synthesize``). Without that
    file, ``method`` must be given. A set made from another dataset is refused; a set
    that was itself filtered is accepted with a warning (the paper trains the filter on
    unfiltered images).

    Raises:
        FilterError: No way to tell the method, or a mismatch with ``spec`` or ``method``.
    """
    from hisynseg.synthesis.generate import SETTINGS_FILE

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        if method is None:
            raise FilterError(
                f"{path}: not found, so the synthesis method of {folder} is unknown; pass --method"
            )
        return method
    try:
        settings = json.loads(path.read_text())["settings"]
        recorded = str(settings["method"])
        dataset = settings.get("dataset") or {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FilterError(f"{path}: unreadable synthesis settings ({exc})") from None
    if dataset.get("name") not in (None, spec.name) or dataset.get("classes") not in (
        None,
        list(spec.class_names),
    ):
        raise FilterError(
            f"{path}: the set was synthesized from dataset {dataset.get('name')!r}, "
            f"not {spec.name!r}"
        )
    if method is not None and method != recorded:
        raise FilterError(f"{path}: the set was made by {recorded!r}, not {method!r}")
    if settings.get("filter"):
        log.warning(
            "%s was synthesized with a filter; the paper trains the filter on unfiltered images",
            folder,
        )
    return recorded


# Settings that change where or how fast the filter trains, not what it learns.
_RUNTIME_SETTINGS = ("device", "workers")
_OUTPUTS = (FILTER_FILE, METRICS_CSV, METRICS_JSON, METRICS_PNG, FILTER_CONFIG_FILE)


def _files_fingerprint(paths: Sequence[Path]) -> dict[str, Any]:
    """Count and a hash of names and sizes: tells another image set from this one cheaply."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\t{path.stat().st_size}\n".encode())
    return {"count": len(paths), "sha256": digest.hexdigest()[:16]}


def _trained_for(
    spec: DatasetSpec,
    method: str,
    config: FilterTrainConfig,
    real_paths: Sequence[Path],
    fake_paths: Sequence[Path],
) -> dict[str, Any]:
    """What a filter is the filter of: compared with an existing one in the output folder."""
    settings = {k: v for k, v in asdict(config).items() if k not in _RUNTIME_SETTINGS}
    return {
        "dataset": {"name": spec.name, "classes": list(spec.class_names)},
        "method": method,
        "settings": settings,
        "real_images": _files_fingerprint(real_paths),
        "synthetic_images": _files_fingerprint(fake_paths),
    }


def _recorded_identity(out: Path) -> tuple[dict[str, Any] | None, bool]:
    """What the filter in ``out`` was trained for, and whether that record is complete.

    Read from ``filter_config.json``; where it is missing or damaged, from ``filter.pt``'s
    metadata. Records of older hisynseg versions lack the image fingerprints: what they
    hold is compared, and the record is not complete (such a filter is retrained, never
    taken as done).

    Returns:
        ``(None, False)`` when ``out`` holds no ``filter.pt``.

    Raises:
        FilterExistsError: A filter is there but what it was trained for cannot be read.
    """
    config_path, filter_path = out / FILTER_CONFIG_FILE, out / FILTER_FILE
    if not filter_path.is_file():
        # Nothing to protect: at most the settings and curves of a run stopped before its
        # first epoch was saved.
        return None, False
    record: Any = None
    try:
        record = json.loads(config_path.read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(record, dict) or "method" not in record:
        try:
            record = torch.load(filter_path, map_location="cpu", weights_only=True)
        except Exception:  # torch reports corruption as many exception types
            record = None
    if not isinstance(record, dict) or "method" not in record:
        raise FilterExistsError(
            f"{out}: holds a filter whose training settings cannot be read "
            f"({FILTER_CONFIG_FILE} or {FILTER_FILE} is damaged); use a new --out, or "
            "--overwrite to replace it"
        )
    if isinstance(record.get("trained_for"), dict):
        return record["trained_for"], True
    dataset = record.get("dataset") if isinstance(record.get("dataset"), dict) else {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    return {
        "dataset": {"name": dataset.get("name"), "classes": dataset.get("classes")},
        "method": record.get("method"),
        "settings": {k: v for k, v in settings.items() if k not in _RUNTIME_SETTINGS},
    }, False


def _identity_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"what: old -> new"`` for every recorded fact that differs (unrecorded ones pass)."""
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(
            f"dataset: {(old.get('dataset') or {}).get('name')!r} -> {new['dataset']['name']!r}"
        )
    if old.get("method") != new["method"]:
        diffs.append(f"method: {old.get('method')!r} -> {new['method']!r}")
    old_settings = old.get("settings") or {}
    for key, value in new["settings"].items():
        if key in old_settings and old_settings[key] != value:
            diffs.append(f"{key}: {old_settings[key]!r} -> {value!r}")
    for key, what in (("real_images", "real images"), ("synthetic_images", "synthetic images")):
        if key in old and old[key] != new[key]:
            before, after = old[key] or {}, new[key]
            detail = (
                f"{before.get('count')} -> {after['count']} files"
                if before.get("count") != after["count"]
                else "same count, other files"
            )
            diffs.append(f"{what}: {detail}")
    return diffs


def _finished_result(out: Path, config: FilterTrainConfig) -> FilterTrainResult | None:
    """The result of a finished earlier training in ``out``, or ``None`` if it did not
    finish (every epoch in metrics.json, and filter.pt there)."""
    try:
        summary = json.loads((out / METRICS_JSON).read_text())
        history = summary["epochs"]
        best_epoch, best, counts = int(summary["best_epoch"]), summary["best"], summary["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(history) != config.epochs or not (out / FILTER_FILE).is_file():
        return None
    return FilterTrainResult(
        out, out / FILTER_FILE, history, best_epoch, best, counts, skipped=True
    )


def train_filter(
    root: str | Path,
    spec: DatasetSpec,
    synthetic: str | Path,
    out: str | Path,
    *,
    method: str,
    config: FilterTrainConfig | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> FilterTrainResult:
    """Train the real-vs-synthetic discriminator of one dataset and one synthesis method.

    Real images are the training images with two or more labels; synthetic images are the
    (unfiltered) images in ``synthetic/img``. The epoch with the best validation accuracy
    is saved as ``out/filter.pt``; per-epoch metrics (positive class: real) go to
    ``metrics.csv``, ``metrics.json`` and ``metrics.png``; the resolved settings and
    library versions to ``filter_config.json``.

    An ``out`` that already holds a filter: trained for the same dataset, method, settings
    (device and workers aside) and images, and finished, it is kept and returned with
    ``skipped=True`` (nothing is retrained); unfinished (interrupted), it is trained again
    from scratch. A filter trained for anything else is refused, unless ``overwrite``,
    which deletes it and trains anew.

    Args:
        root: Dataset root.
        spec: The dataset's description.
        synthetic: A synthesized set (folder with ``img/``).
        out: Output folder (created).
        method: Name of the synthesis method that made ``synthetic`` (recorded).
        config: Training settings (paper defaults when ``None``).
        progress: Show progress bars.
        on_epoch: Called with each epoch's metrics once they are computed.
        overwrite: Replace a filter in ``out`` trained for another method, dataset,
            settings or images, and retrain even a finished one with the same.

    Raises:
        FilterExistsError: ``out`` holds a filter trained for something else (the
            message lists what differs) and ``overwrite`` is false.
        FilterError: Bad settings, too few images, or damaged images (all of them named,
            checked before training).
        ImageReadError: An image that passed the check cannot be decoded (named).
        DatasetLayoutError, LabelError: Problems with the dataset's layout or labels.
    """
    config = copy.deepcopy(config) if config is not None else FilterTrainConfig()
    config.validate()
    out = Path(out)
    synthetic = Path(synthetic)
    device = torch.device(resolve_device(config.device))

    real_paths = [s.path for s in list_train(root, spec) if int(s.label.sum()) >= 2]
    img_dir = synthetic / "img"
    if not img_dir.is_dir():
        raise FilterError(f"{img_dir}: missing; --synthetic must be a synthesized set with img/")
    fake_paths = list_images(img_dir)
    if len(real_paths) < 2:
        raise FilterError(
            f"{root}: {len(real_paths)} training images carry two or more labels; the filter "
            "needs at least 2 as its 'real' examples"
        )
    if len(fake_paths) < 2:
        raise FilterError(f"{img_dir}: {len(fake_paths)} synthetic images; need at least 2")
    split = split_real_fake(
        len(real_paths), len(fake_paths), config.val_fraction, config.cap, config.seed
    )
    counts = {
        "real_total": len(real_paths),
        "synthetic_total": len(fake_paths),
        "train_real": len(split.train_real),
        "train_synthetic": len(split.train_fake),
        "val_real": len(split.val_real),
        "val_synthetic": len(split.val_fake),
    }

    def pick(paths: list[Path], idx: np.ndarray) -> list[Path]:
        return [paths[i] for i in idx]

    train_paths = pick(real_paths, split.train_real) + pick(fake_paths, split.train_fake)
    val_paths = pick(real_paths, split.val_real) + pick(fake_paths, split.val_fake)
    bad = _unreadable_images(train_paths + val_paths)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FilterError(
            f"{len(bad)} of the filter's {len(train_paths) + len(val_paths)} images are "
            f"unreadable: {shown}"
        )

    if out.exists() and not out.is_dir():
        raise FilterError(f"{out}: exists and is not a folder; --out must be a folder")
    trained_for = _trained_for(spec, method, config, real_paths, fake_paths)
    if not overwrite:
        old, complete = _recorded_identity(out)
        if old is not None:
            diffs = _identity_diffs(old, trained_for)
            if diffs:
                raise FilterExistsError(
                    f"{out}: holds a filter trained for something else ("
                    + "; ".join(diffs[:6])
                    + "); use a new --out, or --overwrite to replace it"
                )
            finished = _finished_result(out, config) if complete else None
            if finished is not None:
                log.info("%s: already trained with these settings and images; kept", out)
                return finished
            log.info("%s: an unfinished filter with these settings; training it again", out)
    # Old outputs go first: a filter.pt of an earlier run must not survive next to the
    # new filter_config.json if this run stops before its first saved epoch.
    for name in _OUTPUTS:
        (out / name).unlink(missing_ok=True)

    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(config)
    settings["device"] = str(device)
    atomic_write_json(
        out / FILTER_CONFIG_FILE,
        {
            "command": "train-filter",
            "trained_for": trained_for,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data_root": str(Path(root).resolve()),
            "dataset": spec.to_dict(),
            "synthetic": str(synthetic.resolve()),
            "method": method,
            "settings": settings,
            "model": {"arch": ARCH, "pretrained": False, "num_classes": 2, "real_index": 1},
            "counts": counts,
            "versions": _versions(),
        },
    )

    train_set = _FileDataset(
        train_paths,
        [REAL_INDEX] * len(split.train_real) + [FAKE_INDEX] * len(split.train_fake),
        config.image_size,
        flip=True,
    )
    val_set = _FileDataset(
        val_paths,
        [REAL_INDEX] * len(split.val_real) + [FAKE_INDEX] * len(split.val_fake),
        config.image_size,
        flip=False,
    )
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    # BatchNorm cannot train on a batch of one image: drop a trailing singleton batch.
    drop_last = len(train_set) % config.batch_size == 1 and len(train_set) > 1
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )

    from tqdm.auto import tqdm

    model = build_discriminator().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion = nn.CrossEntropyLoss()
    history: list[dict[str, float]] = []
    checkpoint = out / FILTER_FILE
    summary: dict[str, Any] = {
        "positive_class": "real",
        "dataset": spec.name,
        "method": method,
        "counts": counts,
    }
    log.info(
        "training the %s filter on %d real + %d synthetic images (validation %d + %d) on %s",
        method,
        counts["train_real"],
        counts["train_synthetic"],
        counts["val_real"],
        counts["val_synthetic"],
        device,
    )
    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            _batches(train_loader),
            total=len(train_loader),
            desc=f"filter epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        val_loss, targets, preds = _evaluate(model, val_loader, device, criterion)
        scores = binary_metrics(targets, preds, positive=REAL_INDEX)
        entry = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            **{f"val_{k}": v for k, v in scores.items()},
        }
        history.append(entry)
        best_index = select_best_epoch(history)
        if best_index == len(history) - 1:
            save_filter(
                checkpoint,
                model,
                spec=spec,
                method=method,
                image_size=config.image_size,
                epoch=epoch,
                val_metrics={k: v for k, v in entry.items() if k != "epoch"},
                extra={"counts": counts, "settings": settings},
            )
        best = history[best_index]
        summary.update(best_epoch=best["epoch"], best=best)
        # Rewritten every epoch, so an interrupted run still leaves its curves behind.
        _write_metrics(out, history, summary)
        _plot_metrics(out / METRICS_PNG, history, int(best["epoch"]))
        log.info(
            "epoch %d/%d: train loss %.4f, val accuracy %.4f precision %.4f recall %.4f F1 %.4f%s",
            epoch,
            config.epochs,
            entry["train_loss"],
            entry["val_accuracy"],
            entry["val_precision"],
            entry["val_recall"],
            entry["val_f1"],
            " (best so far, saved)" if best_index == len(history) - 1 else "",
        )
        if on_epoch is not None:
            on_epoch(entry)
    best = history[select_best_epoch(history)]
    return FilterTrainResult(out, checkpoint, history, int(best["epoch"]), best, counts)
