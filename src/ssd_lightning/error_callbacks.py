"""Callback: where the detector fails, after every validation (PR curves, confusion matrix)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from ssd_lightning.callbacks import tensorboard
from ssd_lightning.error_analysis import analyse
from ssd_lightning.error_report import images, save


class ErrorAnalysisFigures(Callback):
    """After every validation: per-class PR curves and the confusion matrix of
    :mod:`ssd_lightning.error_analysis`, as TensorBoard images ``val/pr_curves`` and
    ``val/confusion_matrix`` (matplotlib figures, rendered once) and as PNG + CSV files in
    ``dirpath`` (replaced each time).

    Computed from the COCO evaluation the LightningModule's ``val_metrics`` just ran
    (``last_coco_eval``: its precision arrays and its gathered rows, the same on every rank),
    on rank 0 only; nothing is evaluated or gathered again. The sanity check is skipped.

    Args:
        dirpath: Folder of the files; None: ``<trainer.default_root_dir>/analysis`` (the run
            folder's ``analysis/``).
        score_threshold: Lowest score of a detection counted in the confusion matrix.
        iou_threshold: Lowest IoU of a match in the confusion matrix.
        highlight: Past 10 classes, the number of lowest-AP classes named in the PR figure.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        score_threshold: float = 0.3,
        iou_threshold: float = 0.5,
        highlight: int = 5,
    ) -> None:
        self.dirpath = dirpath
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.highlight = highlight

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the LightningModule's on_validation_epoch_end, which ran the evaluation.
        metrics = getattr(pl_module, "val_metrics", None)
        curves = getattr(metrics, "last_coco_eval", None)
        if trainer.sanity_checking or not trainer.is_global_zero or curves is None:
            return
        analysis = analyse(curves, metrics.class_names, self.score_threshold, self.iou_threshold)
        title = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        drawn = images(analysis, title, self.highlight)
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "analysis")
        save(analysis, folder, drawn)
        logger = tensorboard(trainer)
        if logger is not None:
            for name, rgb in drawn.items():
                step = trainer.global_step
                logger.experiment.add_image(f"val/{name}", rgb, step, dataformats="HWC")


__all__ = ["ErrorAnalysisFigures"]
