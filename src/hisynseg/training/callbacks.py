"""Lightning callbacks that keep a resumed run equal to an uninterrupted one.

* :class:`EpochSeeding` draws every epoch's model randomness (dropout) from
  ``(run seed, epoch, rank)``. Seeding once at the start would make a resumed run replay
  epoch 0's draws instead of continuing (the loaders seed their own passes, see
  :class:`~hisynseg.training.data.EpochSeededLoader`).
* :class:`BestCheckpoint` keeps "best" meaning best over the whole run when training
  resumes from a checkpoint in another run directory, where Lightning forgets the score
  to beat and the first validation would always overwrite ``best.ckpt``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["BestCheckpoint", "EpochSeeding", "epoch_seed"]

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one process: a pure function of its three arguments.

    Ranks differ so that the GPUs of a DDP run do not apply one sequence of augmentation
    parameters to their different images.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class EpochSeeding(L.Callback):
    """Seed Python, NumPy and torch at every epoch start from ``(seed, epoch, rank)``.

    This covers the model's own randomness (dropout); the training loaders seed their
    shuffles and augmentations per pass themselves
    (:class:`~hisynseg.training.data.EpochSeededLoader`).

    Args:
        seed: The run's seed (``trainer.seed``).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_everything(
            epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank),
            workers=True,
            verbose=False,
        )


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` of the best validation score that survives a change of folder.

    When the checkpoint being resumed was written in another ``dirpath``, Lightning
    restores only the path of the old best file. This copies that file here and restores
    its score, so an epoch must beat it to replace it. If the old best file is gone, the
    run's remembered best scores are dropped instead, so that ``metrics.json`` and
    ``best.ckpt`` keep describing the same epoch.
    """

    _forget_best = False

    @property
    def state_key(self) -> str:
        # Keep ModelCheckpoint's key: checkpoints written before this class existed keep
        # restoring their best score.
        key = super().state_key
        return key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath", self.dirpath)
        score = state_dict.get("best_model_score")
        old_best = state_dict.get("best_model_path") or ""
        if self.dirpath is None or old_dir == self.dirpath or score is None:
            super().load_state_dict(state_dict)
            return
        here = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        if old_best and Path(old_best).is_file():
            here.parent.mkdir(parents=True, exist_ok=True)
            # Every DDP process restores callbacks: each copies under a name of its own
            # and renames (the same bytes), so none trips over another's partial file.
            partial = here.with_name(f".{here.name}.{socket.gethostname()}.{os.getpid()}.partial")
            shutil.copyfile(old_best, partial)
            partial.replace(here)
            log.info("resumed from another run directory: its best checkpoint copied to %s", here)
        elif here.is_file():
            # The run directory was moved or copied: its best checkpoint came along.
            log.info("resumed in a moved run directory: keeping %s as the best so far", here)
        else:
            log.warning(
                "the best checkpoint of the resumed run (%s) is missing: best.ckpt will hold "
                "the best of the epochs trained from now on",
                old_best or "not recorded",
            )
            self._forget_best = True
            return
        score = torch.as_tensor(score)
        self.best_model_path = self.kth_best_model_path = str(here)
        self.best_model_score = self.kth_value = score
        self.best_k_models = {str(here): score}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._forget_best and hasattr(pl_module, "best_miou"):
            pl_module.best_miou = None
            pl_module.best_scores = None
        self._forget_best = False
