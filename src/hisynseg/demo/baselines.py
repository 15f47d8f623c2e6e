"""The demo's two reference methods, trained with HisynSeg's network under HisynSeg's budget.

* **CAM baseline** (the plain weakly-supervised method HisynSeg improves on): the same
  DeepLabV3+ network with its CAM head, trained with the image-level classification loss
  ``L_cls = BCE(GAP(A), y)`` on the real training patches and their image-level labels
  only, never a pixel mask. Its segmentation is read from the CAM: ``A`` is upsampled
  bilinearly to the image size and the argmax over classes taken. No label is known at
  test time; by default (``cam_gate``) the classes the network itself scores below
  ``sigmoid 0.5`` for the whole image are left out of the argmax (the top-scoring class is
  always kept), the usual way of turning CAMs into masks. The decoder is not trained.
* **Fully supervised** (the upper bound): the same network trained with
  ``w1·L_cls + w2·L_seg`` (the losses of HisynSeg's stage 2) on the same real training
  patches with their pixel masks (``train_masks/`` of the demo dataset), the image-level
  label of each augmented patch being the classes left in its mask.

Both are trained here by one small loop instead of the Lightning trainer: HisynSeg's data
module has no classification-only branch on real images, and the loop gives both methods
exactly the budget of the HisynSeg run they are compared with, the same number of
optimizer steps at the same batch size (images per step). Everything else is shared with
HisynSeg: the network (:func:`hisynseg.models.build_segmenter`), the augmentation
(:func:`hisynseg.training.transforms.train_transform`), the datasets
(:class:`~hisynseg.training.data.LabelledSamples`,
:class:`~hisynseg.training.data.MaskedSamples`), the losses, AdamW, and the scoring
(:func:`hisynseg.evaluation.evaluate.evaluate`). Validation runs every ``val_every``
steps with the protocol of HisynSeg's validation (windows of the patch size, stride the
patch size, no TTA), and the step with the best validation mIoU is kept.

A run directory holds ``best.pt`` (an export that
:func:`hisynseg.models.checkpoint.load_segmenter` reads), ``metrics.csv`` (training loss
at every step, validation scores at every validation) and ``metrics.json``.
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hisynseg.datasets.io import atomic_write_bytes, atomic_write_json
from hisynseg.datasets.layouts import list_train
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.demo.build import TRAIN_MASKS_DIR
from hisynseg.errors import HisynsegError

__all__ = [
    "BASELINES",
    "GATED_SCORE",
    "BaselineError",
    "BaselineSettings",
    "BaselineResult",
    "CamPredictor",
    "cam_to_scores",
    "train_baseline",
    "load_baseline_predictor",
    "supervised_items",
]

BASELINES = ("cam", "supervised")
# Score given to a class the classifier rules out: far below any CAM value, finite so that
# d4 test-time augmentation can average it with the views where the class was kept.
GATED_SCORE = -1e4
BEST_FILE = "best.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
_CSV_COLUMNS = ("step", "epoch", "loss", "cls", "seg", "val_miou", "val_fwiou")


class BaselineError(HisynsegError):
    """A baseline cannot be trained or loaded as asked; the message says why."""


@dataclass(frozen=True)
class BaselineSettings:
    """How one baseline is trained.

    Attributes:
        kind: ``"cam"`` or ``"supervised"``.
        steps: Optimizer steps in all (HisynSeg's, for the same budget).
        batch_size: Images per step (HisynSeg's synthetic + real batch).
        val_every: Steps between validations (HisynSeg's steps per epoch); the last step
            is always validated.
        patch_size: Training crop side.
        encoder: smp encoder name.
        encoder_weights: Initial encoder weights (``None``: random).
        dropout: Dropout before the CAM head.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        w1: Weight of the classification loss (supervised only; the CAM loss is ``L_cls``).
        w2: Weight of the Dice loss (supervised only).
        aug_border: Border mode of the geometric augmentations.
        seed: Seeds the weights, the batch order and the augmentations.
        cam_gate: CAM baseline: leave out of the argmax the classes the network scores
            below 0.5 for the whole image.
        device: Torch device to train and validate on.
    """

    kind: str
    steps: int
    batch_size: int
    val_every: int
    patch_size: int
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    dropout: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 0.05
    w1: float = 1.0
    w2: float = 1.0
    aug_border: str = "constant"
    seed: int = 0
    cam_gate: bool = True
    device: str = "cpu"

    def validate(self) -> None:
        """Raise :class:`BaselineError` naming the first invalid setting."""
        if self.kind not in BASELINES:
            raise BaselineError(f"unknown baseline {self.kind!r}; expected one of {BASELINES}")
        for name in ("steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise BaselineError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.patch_size < 32 or self.patch_size % 32:
            raise BaselineError(f"patch_size must be a multiple of 32, got {self.patch_size}")
        if not self.lr > 0:
            raise BaselineError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BaselineResult:
    """What :func:`train_baseline` produced."""

    out: Path
    best_checkpoint: Path
    best_val_miou: float | None
    best_step: int | None
    steps: int
    images_seen: int
    seconds: float


# ----------------------------------------------------------------------------- CAM to mask


def cam_to_scores(
    cam: torch.Tensor,
    cls_logits: torch.Tensor,
    size: tuple[int, int],
    gate: bool = True,
) -> torch.Tensor:
    """Per-pixel class scores of the CAM baseline, whose argmax is its segmentation.

    Args:
        cam: Class activation maps ``B×C×h×w``.
        cls_logits: Image-level logits ``B×C`` (the CAM's global average).
        size: Output ``(H, W)``, the image size.
        gate: Give classes with ``sigmoid(logit) <= 0.5`` the score :data:`GATED_SCORE`
            so that they are never the argmax; an image's top-scoring class is always
            kept, so every pixel gets a class.

    Returns:
        ``B×C×H×W`` float scores: the CAM upsampled bilinearly.
    """
    if cam.ndim != 4 or cls_logits.shape != cam.shape[:2]:
        raise ValueError(
            f"cam {tuple(cam.shape)} must be B×C×h×w with cls_logits {tuple(cls_logits.shape)} B×C"
        )
    scores = F.interpolate(cam.float(), size=tuple(size), mode="bilinear", align_corners=False)
    if not gate:
        return scores
    logits = cls_logits.float()
    keep = logits > 0  # sigmoid(x) > 0.5
    top = logits.argmax(dim=1)
    keep[torch.arange(keep.shape[0], device=keep.device), top] = True
    return scores.masked_fill(~keep[:, :, None, None], GATED_SCORE)


class CamPredictor(nn.Module):
    """A HisynSeg network read through its CAM: ``forward(x)`` gives ``B×C×H×W`` scores.

    :func:`hisynseg.evaluation.evaluate.evaluate` accepts it like any segmenter (plain
    logits out, sides padded to :attr:`input_divisor`).
    """

    def __init__(self, net: nn.Module, gate: bool = True) -> None:
        super().__init__()
        self.net = net
        self.gate = gate
        self.input_divisor = int(getattr(net, "input_divisor", 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.encoder(x)
        cam = self.net.cam_head(features[-1])
        return cam_to_scores(cam, cam.mean(dim=(2, 3)), x.shape[-2:], self.gate)


# ----------------------------------------------------------------------------- data


def supervised_items(root: str | Path, spec: DatasetSpec) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of the training patches: ``train/`` and ``train_masks/``.

    Raises:
        BaselineError: ``train_masks/`` is missing or lacks a patch's mask.
    """
    root = Path(root)
    folder = root / TRAIN_MASKS_DIR
    if not folder.is_dir():
        raise BaselineError(
            f"{folder}: missing; the fully-supervised upper bound needs the training "
            "patches' pixel masks, which build_demo_dataset writes there"
        )
    items = []
    for sample in list_train(root, spec):
        mask = folder / (sample.path.stem + ".png")
        if not mask.is_file():
            raise BaselineError(f"{sample.path}: no pixel mask {mask}")
        items.append((sample.path, mask))
    return items


def _dataset(settings: BaselineSettings, root: Path, spec: DatasetSpec) -> torch.utils.data.Dataset:
    from hisynseg.training.data import LabelledSamples, MaskedSamples
    from hisynseg.training.transforms import train_transform

    transform = train_transform(settings.patch_size, spec.background_index, settings.aug_border)
    # albumentations 2 draws from its own generator, not the global seeds.
    transform.set_random_seed(settings.seed)
    if settings.kind == "cam":
        # Image-level labels only (train.csv); the reader never opens a mask.
        return LabelledSamples(list_train(root, spec), transform)
    return MaskedSamples(supervised_items(root, spec), spec, transform)


def _batches(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, epoch after epoch, without a short last batch."""
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=size,
        shuffle=True,
        drop_last=len(dataset) > size,
        num_workers=0,
        generator=generator,
    )
    while True:
        yield from loader


# ----------------------------------------------------------------------------- training


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _losses(
    kind: str,
    net: nn.Module,
    batch: dict[str, torch.Tensor],
    settings: BaselineSettings,
    ignore: int,
) -> dict[str, torch.Tensor]:
    from hisynseg.losses import classification_loss, dice_loss

    label = batch["label"].float()
    if kind == "cam":
        # Encoder and CAM head only: the decoder plays no part in the CAM baseline.
        cam = net.cam_head(net.encoder(batch["image"])[-1])
        cls = classification_loss(cam.mean(dim=(2, 3)), label)
        return {"loss": cls, "cls": cls}
    out = net(batch["image"])
    cls = classification_loss(out.cls_logits.float(), label)
    seg = dice_loss(out.seg_logits.float(), batch["mask"], ignore)
    return {"loss": settings.w1 * cls + settings.w2 * seg, "cls": cls, "seg": seg}


def _validate(
    net: nn.Module, settings: BaselineSettings, root: Path, spec: DatasetSpec
) -> dict[str, Any]:
    from hisynseg.evaluation.evaluate import evaluate

    model = CamPredictor(net, settings.cam_gate) if settings.kind == "cam" else net
    # HisynSeg's validation protocol: patch-size windows at stride = patch, one scale.
    result = evaluate(
        model,
        root,
        spec,
        "val",
        window=settings.patch_size,
        stride=settings.patch_size,
        scales=[1.0],
        patch_size=settings.patch_size,
        device=settings.device,
        batch_size=16,
        progress=False,
    )
    net.train()
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in _CSV_COLUMNS})
    atomic_write_bytes(path, text.getvalue().encode())


def train_baseline(
    settings: BaselineSettings,
    root: str | Path,
    spec: DatasetSpec,
    out: str | Path,
    *,
    progress: bool = True,
) -> BaselineResult:
    """Train one baseline and keep the step with the best validation mIoU.

    Args:
        settings: What to train and for how long.
        root: The demo dataset (generic layout; ``train_masks/`` for ``"supervised"``).
        spec: Its description.
        out: Run directory (``best.pt``, ``metrics.csv``, ``metrics.json``).
        progress: Show a progress bar.

    Returns:
        Where the best model is and how it scored on validation.

    Raises:
        BaselineError: Invalid settings, or missing training masks for ``"supervised"``.
    """
    from tqdm.auto import tqdm

    from hisynseg.models import build_segmenter
    from hisynseg.models.checkpoint import export_segmenter

    settings.validate()
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(settings.seed)
    dataset = _dataset(settings, root, spec)
    if len(dataset) < 2:
        raise BaselineError(f"{root}: needs at least 2 training patches, found {len(dataset)}")
    net = build_segmenter(
        settings.encoder,
        num_classes=spec.num_classes,
        encoder_weights=settings.encoder_weights,
        dropout=settings.dropout,
    )
    net.to(settings.device).train()
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    batches = _batches(dataset, settings.batch_size, settings.seed)
    steps_per_epoch = max(1, len(dataset) // min(settings.batch_size, len(dataset)))
    rows: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    images = 0
    start = time.perf_counter()
    label = "CAM baseline" if settings.kind == "cam" else "fully supervised"
    bar = tqdm(total=settings.steps, desc=label, unit="step", disable=not progress)
    try:
        for step in range(1, settings.steps + 1):
            batch = {k: v.to(settings.device) for k, v in next(batches).items()}
            terms = _losses(settings.kind, net, batch, settings, spec.background_index)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            images += int(batch["image"].shape[0])
            row = {k: round(float(v.detach()), 6) for k, v in terms.items()}
            rows.append({"step": step, "epoch": (step - 1) // steps_per_epoch, **row})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if step % settings.val_every == 0 or step == settings.steps:
                scores = _validate(net, settings, root, spec)
                miou = scores["miou"]
                rows.append(
                    {
                        "step": step,
                        "epoch": (step - 1) // steps_per_epoch,
                        "val_miou": miou,
                        "val_fwiou": scores["fwiou"],
                    }
                )
                value = -math.inf if miou is None else float(miou)
                if best is None or value > best[0]:
                    best = (value, step)
                    export_segmenter(net, spec, out / BEST_FILE, {"baseline": settings.to_dict()})
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    val_miou=f"{value:.3f}",
                    best=f"{best[0]:.3f}@{best[1]}",
                )
                _write_csv(out / METRICS_CSV, rows)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    assert best is not None  # the last step always validates
    best_miou = None if math.isinf(best[0]) else best[0]
    result = BaselineResult(
        out=out,
        best_checkpoint=out / BEST_FILE,
        best_val_miou=best_miou,
        best_step=best[1],
        steps=settings.steps,
        images_seen=images,
        seconds=round(seconds, 3),
    )
    atomic_write_json(
        out / METRICS_JSON,
        {
            "settings": settings.to_dict(),
            "best_val_miou": best_miou,
            "best_step": best[1],
            "steps": settings.steps,
            "images_seen": images,
            "training_images": len(dataset),
            "seconds": result.seconds,
            "best_checkpoint": str(result.best_checkpoint),
        },
    )
    return result


def load_baseline_predictor(
    path: str | Path, spec: DatasetSpec, kind: str, cam_gate: bool = True
) -> nn.Module:
    """The trained network of a baseline, ready for :func:`~hisynseg.evaluation.evaluate.evaluate`.

    Args:
        path: ``best.pt`` of a baseline run.
        spec: The dataset it must have been trained for.
        kind: ``"cam"`` (wrapped in :class:`CamPredictor`) or ``"supervised"``.
        cam_gate: See :func:`cam_to_scores`.

    Raises:
        BaselineError: Unknown kind.
        CheckpointError: A missing or corrupt file, or one made for other classes.
    """
    from hisynseg.models.checkpoint import load_segmenter

    if kind not in BASELINES:
        raise BaselineError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    net, _ = load_segmenter(path, expected_spec=spec)
    return CamPredictor(net, cam_gate) if kind == "cam" else net
