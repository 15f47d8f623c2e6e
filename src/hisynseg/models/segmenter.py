"""The segmentation network: DeepLabV3+ (smp) plus a CAM classification head (METHOD §5).

The encoder runs once per forward pass; its deepest feature map feeds both the
DeepLabV3+ decoder (segmentation logits ``S``) and the CAM head, ``Dropout(p)`` then a
1×1 convolution to one channel per class (the CAM ``A``). The image-level logits are
the global average of ``A``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from hisynseg.errors import HisynsegError
from hisynseg.models.weights import load_initial_weights

__all__ = ["HisynSegNet", "SegmenterOutput", "build_segmenter", "OUTPUT_STRIDE"]

# DeepLabV3+ at output stride 16: the deepest feature is 14×14 for a 224×224 input.
OUTPUT_STRIDE = 16


class SegmenterOutput(NamedTuple):
    """What :class:`HisynSegNet` returns.

    Attributes:
        seg_logits: Segmentation logits ``S``, ``B×C×H×W`` at the input's size.
        cam: Class activation map ``A``, ``B×C×h×w`` at the deepest feature's size.
        cls_logits: Image-level logits ``GAP(A)``, ``B×C``.
    """

    seg_logits: torch.Tensor
    cam: torch.Tensor
    cls_logits: torch.Tensor


class HisynSegNet(nn.Module):
    """DeepLabV3+ with a CAM head on the deepest encoder feature.

    The smp model is built with random weights and taken apart: ``encoder``, ``decoder``
    and ``segmentation_head`` keep smp's names, so a plain smp ``DeepLabV3Plus`` state
    dict loads into this module (plus ``cam_head``). Use :func:`build_segmenter` to also
    load pretrained weights.

    Args:
        encoder: smp encoder name (``"resnet18"``, ``"efficientnet-b6"``, ...) or
            ``"tu-<timm model>"``.
        num_classes: Number of tissue classes ``C`` (background excluded).
        dropout: Dropout probability before the CAM's 1×1 convolution.
        encoder_depth: Encoder stages used by DeepLabV3+ (3, 4 or 5).

    Raises:
        HisynsegError: Unknown encoder or invalid settings.
    """

    def __init__(
        self,
        encoder: str,
        num_classes: int,
        dropout: float = 0.5,
        encoder_depth: int = 5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise HisynsegError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise HisynsegError(f"dropout must be in [0, 1), got {dropout}")
        if encoder_depth not in (3, 4, 5):
            raise HisynsegError(f"encoder_depth must be 3, 4 or 5, got {encoder_depth}")
        model = _build_deeplab(encoder, num_classes, encoder_depth)
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.segmentation_head = model.segmentation_head
        channels = int(self.encoder.out_channels[-1])
        self.cam_head = nn.Sequential(nn.Dropout(p=dropout), nn.Conv2d(channels, num_classes, 1))
        self.encoder_name = encoder
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.encoder_depth = int(encoder_depth)
        self.output_stride = OUTPUT_STRIDE
        # Sides must be divisible by the stride of the deepest feature (16 at depth >= 4).
        self.input_divisor = min(OUTPUT_STRIDE, 2**encoder_depth)
        self.encoder_weights: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HisynSegNet:
        """Rebuild the architecture (random weights) from :meth:`config`."""
        return cls(**config)

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture.

        Valid for both :class:`HisynSegNet` and :func:`build_segmenter`. The initial
        weights are not part of it (they come from the checkpoint when rebuilding).
        """
        return {
            "encoder": self.encoder_name,
            "num_classes": self.num_classes,
            "dropout": self.dropout,
            "encoder_depth": self.encoder_depth,
        }

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        """Segmentation logits, CAM and image-level logits of a batch ``B×3×H×W``.

        ``H`` and ``W`` must be divisible by :attr:`input_divisor` (16).
        """
        h, w = x.shape[-2:]
        d = self.input_divisor
        # Skipped while tracing (ONNX export), where sizes are symbolic.
        if not torch.jit.is_tracing() and (h % d or w % d):
            raise ValueError(
                f"input of {h}×{w} pixels: sides must be divisible by {d}; pad the image "
                f"to {-(-h // d) * d}×{-(-w // d) * d}"
            )
        features = self.encoder(x)
        seg_logits = self.segmentation_head(self.decoder(features))
        cam = self.cam_head(features[-1])
        return SegmenterOutput(seg_logits, cam, cam.mean(dim=(2, 3)))


def _build_deeplab(encoder: str, num_classes: int, encoder_depth: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    try:
        with warnings.catch_warnings():
            # smp's deprecation notice for "timm-" names is not actionable here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return smp.DeepLabV3Plus(
                encoder_name=encoder,
                encoder_depth=encoder_depth,
                encoder_weights=None,
                encoder_output_stride=OUTPUT_STRIDE,
                classes=num_classes,
            )
    except KeyError as err:
        if encoder.startswith("tu-"):
            raise
        raise HisynsegError(
            f"unknown encoder {encoder!r}: use an smp encoder name (e.g. resnet18, "
            "efficientnet-b6, mobilenet_v2) or 'tu-<timm model name>' (e.g. tu-resnet10t)"
        ) from err
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise HisynsegError(
            f"unknown encoder {encoder!r}: timm has no model {encoder[3:]!r} "
            "(see timm.list_models())"
        ) from err


def build_segmenter(
    encoder: str = "resnet18",
    num_classes: int | None = None,
    encoder_weights: str | Path | None = None,
    dropout: float = 0.5,
    encoder_depth: int = 5,
) -> HisynSegNet:
    """Build the HisynSeg network and load its initial weights.

    Args:
        encoder: smp encoder name or ``"tu-<timm model>"``.
        num_classes: Number of tissue classes (required).
        encoder_weights: ``None``/``"none"`` (random), ``"imagenet"`` (downloaded by
            smp/timm), or a local ``.pth``/``.pt``/``.safetensors`` file of the encoder
            state dict or a whole smp model (see :mod:`hisynseg.models.weights`).
        dropout: Dropout before the CAM head's 1×1 convolution.
        encoder_depth: Encoder stages (3, 4 or 5).

    Returns:
        The network; ``net.encoder_weights`` records where its weights came from.

    Raises:
        WeightsUnavailableError: ``"imagenet"`` requested but the download failed.
        WeightsFileError: The weights file is unreadable or does not fit the encoder.
        HisynsegError: Unknown encoder or invalid settings.
    """
    if num_classes is None:
        raise TypeError("build_segmenter() needs num_classes")
    net = HisynSegNet(
        encoder=encoder,
        num_classes=int(num_classes),
        dropout=dropout,
        encoder_depth=encoder_depth,
    )
    net.encoder_weights = load_initial_weights(net, encoder_weights)
    return net
