"""The training data: synthetic and real loaders, and the validation split.

Stage 1 (METHOD §5) trains on labelled synthetic images (``img/`` + ``mask/`` folders,
label = classes present in the mask) and, for the consistency branch, on every real
training image with its image-level label from the file name (or the generic layout's
CSV). Each training step receives one batch of each: the train loader is Lightning's
:class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader` in mode
``"max_size_cycle"``, so an epoch runs over the longer loader and restarts the shorter
one as often as needed. The batch is ``{"labelled": {...}, "real": {...}}``.

Stage 2 trains on the real training images with their pseudo-masks (a folder written
like a synthetic set) together with the synthetic sets, as one shuffled labelled set.
Its batches hold ``batch_size_synthetic + batch_size_real`` images, as many as a stage-1
step sees; the batch is ``{"labelled": {...}}``.

Real training images with white slide background (WSSS4LUAD) need nothing special: only
their image-level labels are used. In synthetic masks the background index is ignored by
the Dice loss and is not part of the label.

Validation reads ``list_split(root, spec, "val")`` at full size, normalised only. Images
that all have one size (the LUAD-HistoSeg and BCSS-WSSS patches) are validated in
batches; images of varying sizes (WSSS4LUAD) one per batch. Images larger than the
training patch are predicted with sliding windows of the patch size (see
:meth:`hisynseg.training.module.HisynSegModule.predict_logits`); nothing is resized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from hisynseg.config import Config, ConfigError
from hisynseg.datasets.io import read_image_size, read_mask, read_rgb
from hisynseg.datasets.layouts import (
    LabelledImage,
    MaskedImage,
    list_split,
    list_synthetic,
    list_train,
)
from hisynseg.datasets.spec import DatasetSpec
from hisynseg.errors import HisynsegError
from hisynseg.training.transforms import eval_transform, to_chw_float, train_transform

__all__ = [
    "DataError",
    "MaskedSamples",
    "LabelledSamples",
    "EvalSamples",
    "HisynSegDataModule",
    "EpochSeededLoader",
    "seed_worker_transform",
]


class DataError(HisynsegError, ValueError):
    """A training or validation file does not fit the dataset; the message names it."""


def _check_mask(mask: np.ndarray, image: np.ndarray, spec: DatasetSpec, path: Path) -> None:
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    top = int(mask.max(initial=0))
    if top > spec.background_index:
        raise DataError(
            f"{path}: mask value {top} is neither a class of {spec.name} "
            f"(0-{spec.num_classes - 1}) nor its background index {spec.background_index}"
        )


class MaskedSamples(Dataset):
    """Images with pixel masks (synthetic sets, pseudo-masks) for supervised training.

    Each item is ``{"image": 3xHxW float, "mask": HxW int64, "label": C float}``; the label
    is the set of tissue classes present in the *augmented* mask, so a class cropped or
    rotated out of view is not claimed.
    """

    def __init__(self, items: Sequence[tuple[Path, Path]], spec: DatasetSpec, transform: Any):
        self.items = list(items)
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, mask_path = self.items[index]
        image = read_rgb(image_path)
        mask = read_mask(mask_path, self.spec.palette)
        _check_mask(mask, image, self.spec, mask_path)
        out = self.transform(image=image, mask=mask)
        mask = out["mask"]
        return {
            "image": torch.from_numpy(to_chw_float(out["image"])),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "label": torch.from_numpy(self.spec.labels_from_mask(mask).astype(np.float32)),
        }


class LabelledSamples(Dataset):
    """Real training images with image-level labels only (the consistency branch).

    Each item is ``{"image": 3xHxW float, "label": C float}``.
    """

    def __init__(self, items: Sequence[LabelledImage], transform: Any):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        out = self.transform(image=read_rgb(item.path))
        return {
            "image": torch.from_numpy(to_chw_float(out["image"])),
            "label": torch.from_numpy(item.label.astype(np.float32)),
        }


class EvalSamples(Dataset):
    """Evaluation images at full size with their masks: ``{"image", "mask", "index"}``."""

    def __init__(self, pairs: Sequence[MaskedImage], spec: DatasetSpec):
        self.pairs = list(pairs)
        self.spec = spec
        self.transform = eval_transform()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        image = read_rgb(pair.image)
        mask = read_mask(pair.mask, self.spec.palette)
        _check_mask(mask, image, self.spec, pair.mask)
        out = self.transform(image=image)
        return {
            "image": torch.from_numpy(to_chw_float(out["image"])),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "index": index,
        }


def seed_worker_transform(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn`` that gives each worker its own augmentation stream.

    albumentations keeps a private random generator per ``Compose`` that no global seed
    reaches, and forked workers inherit identical copies of it, so without this every
    worker would repeat the same augmentations. Each worker's ``info.seed`` is drawn from
    the (seeded) main-process torch generator plus the worker id: distinct per worker and
    reproducible per run.
    """
    from lightning.fabric.utilities.seed import pl_worker_init_function

    # Keep Lightning's seeding of numpy / random / torch in the worker, which this
    # function replaces as the loader's worker_init_fn.
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def _synthetic_items(folders: Sequence[str], spec: DatasetSpec) -> list[tuple[Path, Path]]:
    items: list[tuple[Path, Path]] = []
    for folder in folders:
        found = list_synthetic(folder, spec)
        if not found:
            raise DataError(f"{folder}: synthetic set has no images in img/")
        items.extend((sample.path, mask) for sample, mask in found)
    return items


class EpochSeededLoader(DataLoader):
    """A training loader whose every pass is seeded from ``(seed, epoch, pass, rank)``.

    Each ``iter()`` (one per epoch, more when ``max_size_cycle`` restarts the shorter
    loader) re-seeds the loader's own generator, which shuffles and hands out the worker
    seeds, and the dataset's in-process augmentation stream. A run resumed at epoch ``e``
    therefore sees exactly the batches an uninterrupted run sees there, wherever Lightning
    happens to open the iterator. Workers are never persistent: they would carry their
    augmentation streams across epochs.

    Args:
        dataset: A dataset with an albumentations ``transform`` attribute (or none).
        seed: The run's seed.
        epoch: Returns the current epoch (the trainer's, restored on resume).
        rank: Returns the process's global rank (distinct DDP streams).
        **kwargs: Passed to :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int,
        epoch: Callable[[], int],
        rank: Callable[[], int],
        **kwargs: Any,
    ):
        kwargs["persistent_workers"] = False
        kwargs["generator"] = torch.Generator()
        super().__init__(dataset, **kwargs)
        self.run_seed = seed
        self.epoch_of = epoch
        self.rank_of = rank
        self.passes = (-1, 0)  # (epoch, passes opened in it)

    def __iter__(self) -> Any:
        epoch = self.epoch_of()
        done = self.passes[1] if self.passes[0] == epoch else 0
        self.passes = (epoch, done + 1)
        seed = int(
            np.random.SeedSequence([self.run_seed, epoch, done, self.rank_of()]).generate_state(1)[
                0
            ]
        )
        self.generator.manual_seed(seed)
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        return super().__iter__()


class HisynSegDataModule(L.LightningDataModule):
    """Loaders for one training stage, built from a :class:`~hisynseg.config.Config`.

    The file lists are read when the module is created, so a missing folder or a file
    name without a valid label stops the run before any training starts.

    Args:
        cfg: The run's configuration (``data`` section and ``stage``).
        spec: The dataset's description (classes, background index, layout).

    Raises:
        ConfigError: The stage lacks its inputs (no synthetic set in stage 1, no
            pseudo-mask folder in stage 2, no data root).
        DatasetLayoutError, LabelError, DataError: A folder or file does not fit.
    """

    def __init__(self, cfg: Config, spec: DatasetSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        d = cfg.data
        if d.root is None:
            raise ConfigError("data.root: the dataset root is not set (--data)")
        self.val_pairs = list_split(d.root, spec, "val")
        if not self.val_pairs:
            raise DataError(f"{d.root}: the validation split has no images")
        # Images of different sizes cannot share a batch: validate them one at a time.
        self.val_uniform = len({read_image_size(p.image) for p in self.val_pairs}) == 1
        self.real_items: list[LabelledImage] = []
        if cfg.stage == 1:
            if not d.synthetic:
                raise ConfigError(
                    "data.synthetic: stage 1 needs at least one synthetic set (--synthetic DIR)"
                )
            self.labelled_items = _synthetic_items(d.synthetic, spec)
            if d.real_unlabeled:
                self.real_items = list_train(d.root, spec)
                if not self.real_items:
                    raise DataError(f"{d.root}: no training images for the consistency branch")
        else:
            if d.pseudo_masks is None:
                raise ConfigError(
                    "data.pseudo_masks: stage 2 needs the pseudo-mask folder (--pseudo)"
                )
            pseudo = _synthetic_items([d.pseudo_masks], spec)
            self.labelled_items = pseudo + _synthetic_items(d.synthetic, spec)

    @property
    def labelled_batch_size(self) -> int:
        d = self.cfg.data
        return (
            d.batch_size_synthetic
            if self.cfg.stage == 1
            else d.batch_size_synthetic + d.batch_size_real
        )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.cfg.data.num_workers
        common: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": seed_worker_transform if workers > 0 else None,
        }
        if not shuffle:
            return DataLoader(dataset, persistent_workers=workers > 0, **common)
        return EpochSeededLoader(
            dataset,
            seed=self.cfg.trainer.seed,
            epoch=self._current_epoch,
            rank=self._global_rank,
            shuffle=True,
            # A last batch of one image would break BatchNorm's training statistics.
            drop_last=len(dataset) > batch_size,
            **common,
        )

    def _current_epoch(self) -> int:
        # The count Lightning hands to samplers' set_epoch: unlike ``current_epoch`` it
        # already names the next epoch when a run resumed from an epoch's end opens its
        # first iterator.
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_progress.current.processed

    def _global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_datasets(self) -> dict[str, Dataset]:
        """The training sets by batch key: ``"labelled"`` and, in stage 1, ``"real"``."""
        d = self.cfg.data
        seed = self.cfg.trainer.seed

        def transform(offset: int) -> Any:
            # albumentations ignores global seeds: each set gets its own seeded stream
            # (re-seeded per worker by seed_worker_transform when workers are used).
            t = train_transform(d.patch_size, self.spec.background_index, d.aug_border)
            t.set_random_seed((seed + offset) % 2**32)
            return t

        # Several synthetic folders (and, in stage 2, the pseudo-masks) form one pool.
        sets: dict[str, Dataset] = {
            "labelled": MaskedSamples(self.labelled_items, self.spec, transform(0))
        }
        if self.real_items:
            sets["real"] = LabelledSamples(self.real_items, transform(1))
        return sets

    def train_dataloader(self) -> CombinedLoader:
        sets = self.train_datasets()
        loaders = {"labelled": self._loader(sets["labelled"], self.labelled_batch_size, True)}
        if "real" in sets:
            loaders["real"] = self._loader(sets["real"], self.cfg.data.batch_size_real, True)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        batch = self.cfg.data.val_batch_size if self.val_uniform else 1
        return self._loader(EvalSamples(self.val_pairs, self.spec), batch, False)
