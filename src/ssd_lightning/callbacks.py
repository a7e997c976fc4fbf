"""Training callbacks: checkpoints that are never lost, throughput, per-epoch reseeding with
exact resume (also mid-epoch), and prediction images for TensorBoard. The graceful stop on a
signal is ``ssd_lightning.preemption.StopOnSignal``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from ssd_lightning.visualize import prediction_grid


class CheckpointNotSavedError(OSError):
    """A checkpoint could not be written; the message names the file and folder."""


class SSDCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never loses a checkpoint without a loud error.

    On top of Lightning's callback (same arguments):

    - The checkpoint folder must be writable when fitting starts, and every checkpoint is read
      back after it is written (Lightning's atomic save swallows a ``PermissionError``);
      ``CheckpointNotSavedError`` otherwise.
    - ``last.ckpt`` is written at the end of every training epoch (and so at the end of
      training): Lightning writes it only together with a top-k save, so after an epoch that
      did not improve the monitored score it kept an older state.
    - Resuming into a new run folder carries the best score and the best checkpoints over
      (copied into the new folder), so the run's "best" can never get worse by resuming.
    - A model whose weights are not all finite is never saved as a best checkpoint.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saved_at: int | None = None  # global step of the newest last.ckpt
        self._carried: dict[str, Any] = {}  # best checkpoints of the run resumed from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            check_writable(self.dirpath, "checkpoint folder")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        due = self._last_saved_at != trainer.global_step
        if self.save_last and fitting and due and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_at = trainer.global_step

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write (and verify) ``last.ckpt`` of the current state, e.g. mid-epoch on a stop
        signal; call it on every rank. Returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    @property
    def last_saved_at(self) -> int | None:
        """Global step of the newest ``last.ckpt`` written by this run (None: none yet)."""
        return self._last_saved_at

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            verify_saved(filepath, trainer.global_step)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict
    ) -> None:
        params = [p.detach() for p in trainer.lightning_module.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            rank_zero_warn(
                f"epoch {trainer.current_epoch}: the weights are not all finite; not saved as "
                f"a best checkpoint ({self.monitor}={float(current):.4f})"
            )
            return
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        # Resumed into another run folder: keep the best score; copy the files in on_fit_start.
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.best_k_models = dict(state_dict.get("best_k_models") or {})
        self._carried = dict(self.best_k_models)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._carried or not self.dirpath:
            return
        moved = {old: os.path.join(self.dirpath, os.path.basename(old)) for old in self._carried}
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            for old, new in moved.items():
                if os.path.isfile(old):
                    shutil.copy2(old, new)
                else:
                    rank_zero_warn(
                        f"best checkpoint {old} of the resumed run is gone; its score "
                        f"{float(self._carried[old]):.4f} stays the one to beat"
                    )
        trainer.strategy.barrier()
        self.best_k_models = {moved[old]: score for old, score in self._carried.items()}
        self.best_model_path = moved.get(self.best_model_path, self.best_model_path)
        self.kth_best_model_path = moved.get(self.kth_best_model_path, self.kth_best_model_path)
        self._carried = {}


def check_writable(folder: str | os.PathLike[str], what: str = "output folder") -> None:
    """Create ``folder`` if needed and write a file into it; raise naming it otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointNotSavedError(
            f"the {what} {os.fspath(folder)} is not writable: {e.strerror or e}"
        ) from e


def verify_saved(path: str | os.PathLike[str], global_step: int) -> None:
    """Raise unless ``path`` is a readable checkpoint of ``global_step`` (just written)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        why = None if saved.get("global_step") == global_step else "an older file is there"
    except Exception as e:  # missing, empty, truncated
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if why is not None:
        raise CheckpointNotSavedError(
            f"checkpoint {os.fspath(path)} of step {global_step} was not written ({why}): "
            f"check that {os.path.dirname(os.fspath(path))} is writable and has free space"
        )


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
      read from the checkpoint being resumed. (Lightning calls no ``on_train_epoch_start`` for
      an epoch resumed mid-way.)
    - Later epochs are seeded in ``on_train_epoch_start``, just before their iterator.
    - The sanity check runs with an isolated RNG, so it changes nothing.

    Exact for data loaded in the main process or by workers started every epoch
    (``persistent_workers=False``); persistent workers keep the generators of their first
    epoch. Resuming is exact from end-of-epoch and from mid-epoch checkpoints (a stop signal,
    ``val_check_interval``): checkpoints record the epoch to resume and the batches of it
    already trained, and Lightning, whose loaders keep no position, starts that epoch's
    iterator from its first batch while counting those batches as done; here they are loaded
    again and dropped before training continues, so the rest of the epoch sees the same images
    with the same augmentation as the uninterrupted run (at the cost of loading them).

    Args:
        seed: base seed.
        ckpt_path: the checkpoint the run resumes from, if any.
    """

    def __init__(self, seed: int = 0, ckpt_path: str | None = None) -> None:
        self.seed = seed
        self.ckpt_path = ckpt_path
        self._next_epoch = 0  # state_dict() outside fit
        self._skip = 0  # batches of the resumed epoch already trained
        self._fit_start_epoch = 0  # its iterator is seeded in setup
        self._trainer: L.Trainer | None = None

    def state_dict(self) -> dict[str, int]:
        """Where a run resumed from a checkpoint saved now continues: ``next_epoch`` and the
        batches of it already trained (``batches_done``, 0 at an epoch boundary)."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {"next_epoch": self._next_epoch, "batches_done": 0}
        # batches whose step ran in this epoch; every Lightning save point is inside an epoch
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:
            return {"next_epoch": trainer.current_epoch + 1, "batches_done": 0}
        return {"next_epoch": trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._next_epoch = int(state_dict["next_epoch"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        datamodule = getattr(trainer, "datamodule", None)
        loads_here = datamodule is not None and getattr(datamodule, "num_workers", 1) == 0
        # a new loader object over the same dataset (the trainer's does not exist yet)
        loader = datamodule.train_dataloader() if loads_here else None
        self._fit_start_epoch, self._skip = self._resume_position()
        self._reseed(trainer, self._fit_start_epoch, _main_process_transform(loader))

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained) of the checkpoint resumed from."""
        if not self.ckpt_path:
            return 0, 0
        checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        return int(state.get("next_epoch", 0)), int(state.get("batches_done", 0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._skip:  # resumed mid-epoch
            _drop_first_batches(trainer, self._skip)
            self._skip = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._next_epoch = trainer.current_epoch + 1
        if trainer.current_epoch == self._fit_start_epoch:  # iterator already created and seeded
            return
        transform = _main_process_transform(trainer.train_dataloader)
        self._reseed(trainer, trainer.current_epoch, transform)

    def _reseed(self, trainer: L.Trainer, epoch: int, transform: Any) -> None:
        L.seed_everything(self.seed + epoch, workers=True, verbose=False)
        # Loading in this process: the augmentation's own generators too (DataLoader workers
        # reseed theirs from the torch seed when they start).
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(self.seed + epoch + 1000003 * trainer.global_rank)


def _drop_first_batches(trainer: L.Trainer, count: int) -> None:
    """Load and drop the first ``count`` batches of the training iterator of a fit resumed
    mid-epoch (Lightning counts them as done but iterates from the epoch's first batch)."""
    # Lightning 2.x: the fetcher's iterator is created in setup_data and yields the epoch's
    # batches; the mid-epoch resume test fails if this ever changes.
    iterator = trainer.fit_loop._data_fetcher.iterator
    for _ in range(count):
        next(iterator)


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
        if missing <= 0 or batch is None or not trainer.is_global_zero or trainer.sanity_checking:
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


__all__ = [
    "CheckpointNotSavedError",
    "PredictionImages",
    "ReseedEveryEpoch",
    "SSDCheckpoint",
    "ThroughputMonitor",
    "check_writable",
    "tensorboard",
    "verify_saved",
]
