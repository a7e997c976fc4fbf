"""Training callbacks: throughput, per-epoch reseeding, and prediction images for TensorBoard."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger


class ThroughputMonitor(Callback):
    """Logs ``train/images_per_sec``: images of the global batch per second of wall time.

    Measured between batch ends over ``window`` steps (default: the trainer's
    ``log_every_n_steps``), so data loading, forward, backward and the optimiser step count.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._start = 0.0
        self._images = 0
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
    ) -> None:
        self._images += int(batch["images"].shape[0]) * trainer.world_size
        self._steps += 1
        if self._steps < (self.window or trainer.log_every_n_steps):
            return
        now = time.perf_counter()
        rate = self._images / max(now - self._start, 1e-9)
        pl_module.log("train/images_per_sec", rate, on_step=True, on_epoch=False, batch_size=1)
        self._start, self._images, self._steps = now, 0, 0


class ReseedEveryEpoch(Callback):
    """Seeds every RNG with ``seed + epoch`` at the start of each training epoch.

    The shuffling order and the augmentation seeds of the DataLoader workers are drawn when the
    epoch's iterator is created, after this hook; so epoch e sees the same data whether the run
    went through uninterrupted or was resumed from a checkpoint (Lightning does not store RNG
    states). This is what makes resuming from ``last.ckpt`` reproduce the uninterrupted run.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


__all__ = ["ReseedEveryEpoch", "ThroughputMonitor", "tensorboard", "torch"]
