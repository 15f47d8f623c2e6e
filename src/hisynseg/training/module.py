"""The Lightning module: stage-1 and stage-2 training steps, validation mIoU, AdamW.

Stage 1 (METHOD §5), with ``S`` the segmentation logits, ``A`` the CAM and ``y`` the
image-level label::

    loss = [w1·L_cls(syn) + w2·L_seg(syn)] + [w1·L_cls(real) + w3·L_reg(real)]

``y`` of a synthetic image is the set of classes in its (augmented) mask; ``y`` of a real
image comes from its file name. Without the real branch (``data.real_unlabeled: false``)
the second bracket is dropped; ``w3 = 0`` keeps the real classification term only.
Stage 2 is ``w1·L_cls + w2·L_seg`` on real images with pseudo-masks plus synthetic images.

The synthetic and real batches go through the network as **one concatenated batch**: one
encoder/decoder pass per step instead of two, which keeps the step about as cheap as a
single plain forward/backward over the same images. A consequence: in training mode,
BatchNorm normalises each step with statistics over both batches together (and its
running statistics track the mixture of synthetic and real images), where two separate
passes would use each batch's own statistics.

Validation accumulates one confusion matrix over the whole validation set (summed across
DDP processes) and logs ``val/miou``, ``val/fwiou`` and per-class IoU. The reference
code's gating of classes absent from the ground truth is ``eval.reference_gating`` (off by
default); this module only validates, it is never used at test time.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from hisynseg.config import Config, config_from_dict
from hisynseg.losses import classification_loss, consistency_loss, dice_loss
from hisynseg.models import SegmenterOutput, build_segmenter

__all__ = ["HisynSegModule", "LOSS_TERMS"]

# Names of the logged loss terms (``train/<name>``).
LOSS_TERMS = ("cls_syn", "seg", "cls_real", "reg")


class HisynSegModule(L.LightningModule):
    """DeepLabV3+ with a CAM head, trained by the HisynSeg losses.

    The hyper-parameters saved in every checkpoint are exactly the constructor's
    arguments, so :func:`hisynseg.models.checkpoint.load_segmenter` (or
    ``HisynSegModule.load_from_checkpoint``) can rebuild the network without the config
    file.

    Args:
        model: Keyword arguments of :func:`hisynseg.models.build_segmenter`
            (``model.config()`` of a built network, optionally with ``encoder_weights``).
            The checkpoint stores ``self.model.config()``.
        dataset: ``DatasetSpec.to_dict()`` of the training data.
        config: The resolved run configuration as a dictionary
            (:func:`hisynseg.config.config_to_dict`).
        pretrained: Load the encoder's pretrained weights when building (pass ``False``
            when the weights will come from a checkpoint anyway).
    """

    def __init__(
        self,
        model: dict[str, Any],
        dataset: dict[str, Any],
        config: dict[str, Any],
        pretrained: bool = True,
    ):
        super().__init__()
        self.cfg: Config = config_from_dict(config)
        kwargs = dict(model)
        if not pretrained:
            kwargs["encoder_weights"] = None
        self.model = build_segmenter(**kwargs)
        # model.config() rebuilds the architecture; the weights come from the checkpoint.
        self.save_hyperparameters(
            {"model": self.model.config(), "dataset": dataset, "config": config}
        )
        self.num_classes = len(dataset["classes"])
        self.class_names = list(dataset["classes"])
        self.short_names = list(dataset.get("short_names") or self.class_names)
        self.ignore_index = int(dataset["background_index"])
        self.channels_last = self.cfg.trainer.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._confusion: torch.Tensor | None = None
        self.best_miou: float | None = None
        self.best_scores: dict[str, Any] | None = None
        self.last_scores: dict[str, Any] | None = None

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor) -> Any:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """All loss terms of one training step and their weighted sum ``"loss"``.

        Args:
            batch: ``{"labelled": {"image", "mask", "label"}}`` plus, in stage 1 with the
                consistency branch, ``"real": {"image", "label"}``.

        Returns:
            ``{"loss", "cls_syn", "seg"}`` and, with a real batch, ``"cls_real"``, ``"reg"``.
            In stage 2 ``cls_syn``/``seg`` cover every labelled image (pseudo-masked
            real ones included).
        """
        w = self.cfg.loss
        labelled = batch["labelled"]
        real = batch.get("real")
        n = labelled["image"].shape[0]
        if real is None:
            syn_out, real_out = self(labelled["image"]), None
        elif self.cfg.trainer.split_forward:
            syn_out, real_out = self(labelled["image"]), self(real["image"])
        else:
            joint = self(torch.cat([labelled["image"], real["image"]]))
            syn_out = SegmenterOutput(*(t[:n] for t in joint))
            real_out = SegmenterOutput(*(t[n:] for t in joint))
        # Losses in float32: softmax/Dice in half precision lose too much.
        terms = {
            "cls_syn": classification_loss(syn_out.cls_logits.float(), labelled["label"].float()),
            "seg": dice_loss(syn_out.seg_logits.float(), labelled["mask"], self.ignore_index),
        }
        loss = w.w1 * terms["cls_syn"] + w.w2 * terms["seg"]
        if real is not None:
            terms["cls_real"] = classification_loss(
                real_out.cls_logits.float(), real["label"].float()
            )
            terms["reg"] = consistency_loss(real_out.seg_logits.float(), real_out.cam.float())
            loss = loss + w.w1 * terms["cls_real"] + w.w3 * terms["reg"]
        terms["loss"] = loss
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        size = sum(part["image"].shape[0] for part in batch.values())
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        for name in LOSS_TERMS:
            if name in terms:
                self.log(f"train/{name}", terms[name].detach(), batch_size=size)
        return terms["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    # ---------------------------------------------------------------- validation
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores at the input's size (argmax gives the prediction).

        Inputs no larger than the training patch (the benchmark patches) are predicted in
        one pass (logits). Larger images (WSSS4LUAD's validation images) are predicted
        with :func:`hisynseg.inference.sliding.predict_sliding`: windows of the training
        patch size, stride ``eval.val_stride`` (default: the patch size, the paper's
        validation setting), one scale; the result is softmax probabilities averaged over
        overlapping windows.
        """
        patch = self.cfg.data.patch_size
        h, w = x.shape[-2:]
        if h <= patch and w <= patch:
            return self._whole_image_logits(x)
        from hisynseg.inference.sliding import predict_sliding

        stride = self.cfg.eval.val_stride or patch
        probs = [
            predict_sliding(
                lambda crops: self._whole_image_logits(crops).softmax(1),
                image,
                self.num_classes,
                window=patch,
                stride=min(stride, patch),
                batch_size=self.cfg.data.val_batch_size,
            )
            for image in x
        ]
        return torch.from_numpy(np.stack(probs)).to(x.device)

    def _whole_image_logits(self, x: torch.Tensor) -> torch.Tensor:
        # The network needs sides divisible by its stride: pad by reflection, crop back.
        h, w = x.shape[-2:]
        d = int(getattr(self.model, "input_divisor", 32))
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        logits = self(x).seg_logits
        return logits[..., :h, :w].float()

    def on_validation_epoch_start(self) -> None:
        self._confusion = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=self.device
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.predict_logits(batch["image"])
        mask = batch["mask"]
        if self.cfg.eval.reference_gating:
            logits = gate_absent_classes(logits, mask, self.num_classes)
        pred = logits.argmax(1)
        valid = mask < self.num_classes  # background/exclude pixels are not scored
        index = mask[valid] * self.num_classes + pred[valid]
        assert self._confusion is not None
        self._confusion += torch.bincount(index, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def on_validation_epoch_end(self) -> None:
        from hisynseg.evaluation.metrics import scores_from_confusion

        assert self._confusion is not None
        confusion = self.trainer.strategy.reduce(self._confusion, reduce_op="sum")
        # NaN (a class neither in the ground truth nor predicted) is stored as None.
        scores = scores_from_confusion(confusion.cpu().numpy(), self.class_names, nan_as_none=True)

        def value(v: float | None) -> float:
            return math.nan if v is None else float(v)

        self.log("val/miou", value(scores["miou"]), prog_bar=True)
        self.log("val/fwiou", value(scores["fwiou"]))
        for short, name in zip(self.short_names, self.class_names, strict=True):
            self.log(f"val/iou/{short}", value(scores["iou"][name]))
        if self.trainer.sanity_checking:
            return
        scores = {"epoch": int(self.current_epoch), "step": int(self.global_step), **scores}
        self.last_scores = scores
        miou = value(scores["miou"])
        if not math.isnan(miou) and (self.best_miou is None or miou > self.best_miou):
            self.best_miou = miou
            self.best_scores = scores

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hisynseg"] = {
            "best_miou": self.best_miou,
            "best_scores": self.best_scores,
            "last_scores": self.last_scores,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("hisynseg") or {}
        self.best_miou = state.get("best_miou")
        self.best_scores = state.get("best_scores")
        self.last_scores = state.get("last_scores")


def gate_absent_classes(logits: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reference code's validation gating: classes absent from an image's ground truth
    cannot be predicted there (their logits set to the lowest value). Uses ground truth, so
    it belongs to validation only, never to test.
    """
    present = torch.stack(
        [torch.bincount(m[m < num_classes].flatten(), minlength=num_classes) > 0 for m in mask]
    )
    if not bool(present.any(1).all()):
        # An image of background only has nothing to gate; keep it unconstrained.
        present = present | ~present.any(1, keepdim=True)
    low = torch.finfo(logits.dtype).min
    return logits.masked_fill(~present[:, :, None, None], low)
