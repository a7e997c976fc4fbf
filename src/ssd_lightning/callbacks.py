"""Training callbacks: throughput, per-epoch reseeding, and prediction images for TensorBoard."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from ssd_lightning.visualize import prediction_grid


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
    """Seeds every RNG with ``seed + epoch`` right before each training epoch's data iterator.

    Lightning stores no RNG state in checkpoints, so without this a run resumed from
    ``last.ckpt`` would shuffle and augment differently from the uninterrupted run. Here the
    shuffling order and the augmentation seeds of epoch e depend only on ``seed + e``:

    - The first epoch of a ``fit`` call (epoch 0, or the epoch a resumed run starts at) gets its
      iterator already in ``configure_optimizers`` (Lightning loads the train loader to count
      the steps of the schedule); it is seeded in ``setup``, which comes before, with the epoch
      read from the checkpoint being resumed.
    - Later epochs are seeded in ``on_train_epoch_start``, just before their iterator.
    - The sanity check runs with an isolated RNG, so it changes nothing.

    Exact for data loaded in the main process or by workers started every epoch
    (``persistent_workers=False``); persistent workers keep the generators of their first
    epoch. Resuming is exact from end-of-epoch checkpoints.

    Args:
        seed: base seed.
        ckpt_path: the checkpoint the run resumes from, if any.
    """

    def __init__(self, seed: int = 0, ckpt_path: str | None = None) -> None:
        self.seed = seed
        self.ckpt_path = ckpt_path
        self._next_epoch = 0  # the epoch a run resumed from a checkpoint saved now starts at
        self._first_epoch_of_fit = True

    def state_dict(self) -> dict[str, int]:
        return {"next_epoch": self._next_epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._next_epoch = int(state_dict["next_epoch"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._first_epoch_of_fit = True
        datamodule = getattr(trainer, "datamodule", None)
        loads_here = datamodule is not None and getattr(datamodule, "num_workers", 1) == 0
        # a new loader object over the same dataset (the trainer's does not exist yet)
        loader = datamodule.train_dataloader() if loads_here else None
        self._reseed(trainer, self._resume_epoch(), _main_process_transform(loader))

    def _resume_epoch(self) -> int:
        if not self.ckpt_path:
            return 0
        checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("callbacks", {}).get(self.state_key, {}).get("next_epoch", 0))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._next_epoch = trainer.current_epoch + 1
        if self._first_epoch_of_fit:  # iterator already created and seeded
            self._first_epoch_of_fit = False
            return
        transform = _main_process_transform(trainer.train_dataloader)
        self._reseed(trainer, trainer.current_epoch, transform)

    def _reseed(self, trainer: L.Trainer, epoch: int, transform: Any) -> None:
        L.seed_everything(self.seed + epoch, workers=True, verbose=False)
        # Loading in this process: the augmentation's own generators too (DataLoader workers
        # reseed theirs from the torch seed when they start).
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(self.seed + epoch + 1000003 * trainer.global_rank)


def _main_process_transform(loader: Any) -> Any:
    """The dataset's transform when ``loader`` loads in this process, else None."""
    if getattr(loader, "num_workers", 1) != 0:
        return None
    return getattr(getattr(loader, "dataset", None), "transform", None)


class PredictionImages(Callback):
    """Each validation epoch, a TensorBoard image ``val/predictions``: the first validation
    images with their predicted boxes (scored, coloured per class) beside the ground truth.

    Args:
        num_images: images shown (taken from the first validation batches of rank 0).
        score_threshold: lowest score of a drawn prediction.
    """

    def __init__(self, num_images: int = 8, score_threshold: float = 0.3) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self._images: list[torch.Tensor] = []
        self._preds: list[dict[str, torch.Tensor]] = []
        self._targets: list[dict[str, torch.Tensor]] = []
        self._sizes: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._preds, self._targets, self._sizes = [], [], [], []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        missing = self.num_images - len(self._images)
        if missing <= 0 or not trainer.is_global_zero or trainer.sanity_checking:
            return
        take = min(missing, int(batch["images"].shape[0]))
        self._images += list(batch["images"][:take].detach().cpu())
        self._preds += [{k: v.detach().cpu() for k, v in p.items()} for p in outputs[:take]]
        self._targets += [
            {"boxes": b.cpu(), "labels": lab.cpu()}
            for b, lab in zip(batch["gt_boxes"][:take], batch["gt_labels"][:take], strict=True)
        ]
        self._sizes += list(batch["orig_sizes"][:take].cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = tensorboard(trainer)
        if logger is None or not self._images or not trainer.is_global_zero:
            return
        grid = prediction_grid(
            torch.stack(self._images),
            self._preds,
            self._targets,
            class_names=getattr(pl_module, "class_names", None),
            mean=pl_module.hparams.get("mean", (0.485, 0.456, 0.406)),
            std=pl_module.hparams.get("std", (0.229, 0.224, 0.225)),
            orig_sizes=torch.stack(self._sizes),
            score_threshold=self.score_threshold,
            max_images=self.num_images,
        )
        logger.experiment.add_image("val/predictions", grid, trainer.global_step, dataformats="CHW")
        self._images, self._preds, self._targets, self._sizes = [], [], [], []


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


__all__ = ["PredictionImages", "ReseedEveryEpoch", "ThroughputMonitor", "tensorboard"]
