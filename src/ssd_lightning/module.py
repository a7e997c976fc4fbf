"""LightningModule tying the SSD network, default boxes, MultiBox loss and evaluation together."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.checkpoint import verify_weights, weights_digest
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.metrics import DetectionMetrics
from ssd_lightning.optim import param_groups, scaled_lr
from ssd_lightning.postprocess import PostProcessor

# The batch hooks are the module's (normalising and assigning on the device): not a mistake.
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss too many optimiser steps in a row."""


class BoxCoderMismatchError(ValueError):
    """The DataModule encodes targets against other default boxes than the model's."""


class ClassMismatchError(ValueError):
    """The data's classes are not the classes the network was trained on."""


class SSDModule(L.LightningModule):
    """Trains and evaluates an SSD network.

    The default boxes are built here, once, from the network's measured feature-map sizes and
    the anchor settings (``DefaultBoxes.for_network``); they live as buffers of ``box_coder``
    (an ``nn.Module``, so they move with the model and are saved in checkpoints), which the
    post-processing shares and of which the DataModule encodes with a CPU copy (checked at
    setup).

    Args:
        net: network returning ``(loc (B, A, 4), cls_logits (B, A, C))``.
        loss: MultiBox loss module.
        optimizer: partial optimiser taking parameter groups (e.g. ``SGD`` with lr, momentum,
            weight_decay).
        scheduler: optional partial ``(optimizer, total_steps) -> LRScheduler``, stepped
            every optimiser step (see ``ssd_lightning.optim``).
        anchors: ``DefaultBoxes`` settings other than image size and feature maps
            (aspect_ratios, s_min, s_max, sizes, steps, clip).
        image_size: network input size, int or (height, width).
        mean: input normalisation mean (0..1 pixel units), kept for display and export.
        std: input normalisation std.
        iou_threshold: matching threshold of the box coder.
        variances: box-coder variances.
        score_threshold: post-processing score threshold.
        nms_threshold: post-processing NMS IoU threshold.
        max_detections: detections kept per image.
        class_names: names of classes 1..C-1, without background (taken from the DataModule
            when None).
        label_map: contiguous label -> dataset category id (e.g. COCO); stored in checkpoints.
        no_decay_bias_norm: no weight decay on biases and normalisation scales.
        batch_size: per-process batch size, for the linear lr scaling rule.
        base_batch_size: if set, lr *= global batch size / base_batch_size.
        compile: ``torch.compile`` the network.
        channels_last: train in channels-last memory format (faster convolutions on GPUs).
        max_nonfinite_steps: stop after this many non-finite losses in a row.
        net_config: the network's config (plain dict with ``_target_``) so a checkpoint can
            rebuild it; stored as a hyperparameter.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        anchors: dict[str, Any] | None = None,
        image_size: int | Sequence[int] = 300,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        iou_threshold: float = 0.5,
        variances: Sequence[float] = (0.1, 0.2),
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        max_detections: int = 200,
        class_names: Sequence[str] | None = None,
        label_map: dict[int, int] | None = None,
        no_decay_bias_norm: bool = True,
        batch_size: int | None = None,
        base_batch_size: int | None = None,
        compile: bool = False,
        channels_last: bool = False,
        max_nonfinite_steps: int = 20,
        net_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names = list(class_names) if class_names is not None else None
        self.label_map = dict(label_map) if label_map is not None else None

        self.anchors = DefaultBoxes.for_network(net, image_size, **(anchors or {}))
        self.anchor_settings = self.anchors.settings()
        # The one set of default boxes: buffers of the coder, moved with the module.
        self.box_coder = SSDBoxCoder(self.anchors.cxcywh, iou_threshold, variances)
        self.postprocess = PostProcessor(
            self.box_coder,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
        )
        self.val_metrics: DetectionMetrics | None = None
        # Non-finite steps (total, in a row, most in a row), counted on the device.
        self.register_buffer("_nonfinite", torch.zeros(3, dtype=torch.long), persistent=False)
        self._nonfinite_reported = 0
        self._step_nonfinite: Tensor | None = None
        self._skip_on_device = False  # set by configure_optimizers
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self._compiled = False
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_box_coder(getattr(datamodule, "box_coder", None))
        if self.class_names is None:
            self.class_names = _foreground(datamodule) or []
        else:
            self.check_class_names(datamodule)
        if self.label_map is None and getattr(datamodule, "label_map", None) is not None:
            self.label_map = dict(datamodule.label_map)
        if self.val_metrics is None:
            self.val_metrics = DetectionMetrics(class_names=self.class_names)
        if self.hparams.compile and not self._compiled:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
            self._compiled = True

    def check_box_coder(self, coder: SSDBoxCoder | None) -> None:
        """Raise if the DataModule encodes against other default boxes than this model."""
        if coder is None:
            return
        ours = self.box_coder
        same = (
            coder.default_boxes.shape == ours.default_boxes.shape
            and torch.equal(coder.default_boxes.cpu(), ours.default_boxes.cpu())
            and coder.iou_threshold == ours.iou_threshold
            and tuple(coder.variances) == tuple(ours.variances)
        )
        if not same:
            raise BoxCoderMismatchError(
                "the DataModule's box coder differs from the model's: "
                f"data has {len(coder)} default boxes (iou_threshold={coder.iou_threshold}, "
                f"variances={coder.variances}), the model has {len(ours)} built from "
                f"{self.anchor_settings} (iou_threshold={ours.iou_threshold}, "
                f"variances={ours.variances}). Call datamodule.set_box_coder(module.box_coder)."
            )

    def check_class_names(self, datamodule: Any) -> None:
        """Raise if the data's classes differ from this model's (names and order)."""
        names = _foreground(datamodule)
        if names is None or not self.class_names or names == self.class_names:
            return
        reorder = sorted(names) == sorted(self.class_names)
        raise ClassMismatchError(
            f"the data's classes {names} are not the classes the network was trained on "
            f"{self.class_names}"
            + (
                " (same names in another order: ssd-eval match_classes=by_name reorders the "
                "network's outputs on purpose)"
                if reorder
                else ""
            )
        )

    def reorder_classes(self, names: Sequence[str]) -> None:
        """Make label k mean ``names[k - 1]``: the same class names, in the data's order.

        Permutes the classifier outputs of the network, so predictions carry the data's labels.
        """
        if sorted(names) != sorted(self.class_names or []):
            raise ClassMismatchError(
                f"cannot reorder the network's classes {self.class_names} to {list(names)}: "
                "not the same names"
            )
        order = [0, *(self.class_names.index(n) + 1 for n in names)]  # new label -> old label
        self.net.head.permute_classes(order)
        self.class_names = list(names)

    @property
    def default_boxes(self) -> Tensor:
        """(A, 4) normalised cxcywh default boxes (the box coder's buffer)."""
        return self.box_coder.default_boxes

    @property
    def nonfinite_steps(self) -> int:
        """Training steps skipped so far because the loss was not finite (reads the device)."""
        return int(self._nonfinite[0])

    # ---------------------------------------------------------------- forward

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Batches of ``data.assign_on=device``: uint8 images normalised (and laid out
        channels-last) here, and the GT assigned to the default boxes for the whole batch."""
        if not isinstance(batch, dict):
            return batch
        if batch["images"].dtype == torch.uint8:
            batch["images"] = self.normalise(batch["images"])
        if "loc_targets" not in batch and "boxes" in batch:
            batch["loc_targets"], batch["labels"] = self.box_coder.encode_batch(
                batch["boxes"], batch["box_labels"], batch["box_valid"], batch.get("box_crowd")
            )
        return batch

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std``.

        Shape:
            images: (B, 3, H, W) uint8; returns (B, 3, H, W) float32.
        """
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images.float() - self._mean) / self._std

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw network outputs.

        Shape:
            images: (B, 3, H, W) normalised; returns loc (B, A, 4) and cls_logits (B, A, C).
        """
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    @torch.no_grad()
    def detect(self, images: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections in pixels of each image's original size.

        Shape:
            images: (B, 3, H, W); image_sizes: (B, 2) as (h, w). Returns B dicts with boxes
            (n, 4) xyxy pixels, scores (n,), labels (n,).
        """
        loc, cls_logits = self(images)
        return self.postprocess(loc.float(), cls_logits.float(), image_sizes)

    # ---------------------------------------------------------------- training

    def _losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """Losses normalised by the global positive count, and whether any rank went non-finite.

        Under DDP each rank's gradient is averaged over the world, so every rank divides its
        summed loss by (positives over all ranks) / world_size: the average then equals the
        loss of the global batch divided by its positives, as on one device.
        """
        loc, cls_logits = self(batch["images"])
        labels = batch["labels"]
        sums = self.loss(loc, cls_logits, batch["loc_targets"], labels, num_positives=1.0)
        local = torch.stack([(labels > 0).sum().float(), (~torch.isfinite(sums["loss"])).float()])
        total, world = _all_reduce(local.detach(), "SUM")
        normaliser = (total[0] / world).clamp(min=1.0)
        return {k: v / normaliser for k, v in sums.items()}, total[1] > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """One step without host syncs: the non-finite check and the loss values are read
        back from the device only every ``trainer.log_every_n_steps`` steps.

        A non-finite loss (on any rank) skips the optimiser step on the device: the fused
        optimisers (``optim.optimizer.fused=true``) take a ``found_inf`` flag, as with a grad
        scaler. Other optimisers are asked on the host, one sync per step.
        """
        losses, nonfinite = self._losses(batch)
        self._count_nonfinite(nonfinite)
        size = batch["images"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=size)
        if self._skip_on_device:
            self._step_nonfinite = nonfinite
        elif bool(nonfinite):  # one host sync per step
            self._check_nonfinite()
            return None  # Lightning skips backward and step
        if (batch_idx + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self._check_nonfinite()
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._skip_on_device and self._step_nonfinite is not None:
            optimizer.found_inf = self._step_nonfinite.float()  # read by the fused step

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite()

    def _count_nonfinite(self, nonfinite: Tensor) -> None:
        """Update (total, in a row, most in a row) of the non-finite steps, on the device."""
        total, in_a_row, most = self._nonfinite.unbind()
        flag = nonfinite.long()
        in_a_row = (in_a_row + 1) * flag
        self._nonfinite.copy_(torch.stack([total + flag, in_a_row, torch.maximum(most, in_a_row)]))

    def _check_nonfinite(self) -> None:
        """Read the counts (one host sync); warn about new skips, stop after too many in a row."""
        total, in_a_row, most = self._nonfinite.tolist()
        if total > self._nonfinite_reported:
            self._nonfinite_reported = total
            self.log("train/nonfinite_steps", float(total), batch_size=1)
            rank_zero_warn(
                f"non-finite loss: {total} training steps skipped so far (by step "
                f"{self.global_step}, {in_a_row} in a row now)"
            )
        limit = self.hparams.max_nonfinite_steps
        if most >= limit:
            raise NonFiniteLossError(
                f"training stopped: {most} non-finite losses in a row "
                f"(max_nonfinite_steps={limit}) by step {self.global_step}. Try a lower "
                "learning rate or longer warm-up, check the data for broken boxes, or train "
                "in 32-bit precision."
            )

    # ---------------------------------------------------------------- validation

    def validation_step(
        self, batch: dict[str, Any] | None, batch_idx: int
    ) -> list[dict[str, Tensor]]:
        if batch is None:  # every image of the batch was unreadable (dropped and counted)
            return []
        loc, cls_logits = self(batch["images"])
        labels = batch["labels"]
        losses = self.loss(loc, cls_logits, batch["loc_targets"], labels)
        size = batch["images"].shape[0]
        self.log("val/loss", losses["loss"], batch_size=size, sync_dist=True)
        preds = self.postprocess(loc.float(), cls_logits.float(), batch["orig_sizes"])
        self.val_metrics.update(preds, _targets(batch))
        return preds

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        self.last_val_results = results
        for name, value in _flat_scalars(results).items():
            # Identical on every rank (the metric state was gathered before compute()); the
            # mean over ranks keeps it so and tells Lightning the value is global.
            self.log(f"val/{name}", value, prog_bar=name in ("mAP", "mAP_50"), sync_dist=True)

    # ---------------------------------------------------------------- optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self.net, self.hparams.no_decay_bias_norm)
        optimizer = self.optimizer_factory(groups)
        # Fused optimisers skip a step on the device from a found_inf flag (no host sync).
        self._skip_on_device = all(g.get("fused") for g in optimizer.param_groups)
        if self.hparams.base_batch_size is not None:
            world = self.trainer.world_size * self.trainer.accumulate_grad_batches
            global_batch = (self.hparams.batch_size or 1) * world
            for group in optimizer.param_groups:
                group["lr"] = scaled_lr(group["lr"], global_batch, self.hparams.base_batch_size)
                group["initial_lr"] = group["lr"]
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        # Schedules are written in epochs (warm-up) and fractions of the run (milestones), so a
        # recipe means the same training at any global batch size.
        batches = self.trainer.num_training_batches
        per_epoch = total if batches == float("inf") else int(batches)
        per_epoch = max(1, per_epoch // self.trainer.accumulate_grad_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssd"] = {
            "anchors": self.anchor_settings,
            "class_names": list(self.class_names or []),
            "label_map": {int(k): int(v) for k, v in (self.label_map or {}).items()},
            "iou_threshold": self.box_coder.iou_threshold,
            "variances": list(self.box_coder.variances),
            "loss": _loss_settings(self.loss),
            # Checked on every load: a file corrupted on disk is refused, not used.
            "weights_sha256": weights_digest(checkpoint["state_dict"]),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        verify_weights(checkpoint, getattr(trainer, "ckpt_path", None) or "checkpoint")
        meta = checkpoint.get("ssd", {})
        if meta.get("class_names"):
            self.class_names = list(meta["class_names"])
            self.check_class_names(getattr(trainer, "datamodule", None))
        if meta.get("label_map"):
            self.label_map = {int(k): int(v) for k, v in meta["label_map"].items()}


def _all_reduce(values: Tensor, op: str) -> tuple[Tensor, int]:
    """``values`` reduced over all processes with ``op`` ("SUM", "MAX"; themselves without
    torch.distributed), and the number of processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 1
    values = values.clone()
    dist.all_reduce(values, op=getattr(dist.ReduceOp, op))
    return values, dist.get_world_size()


def _loss_settings(loss: nn.Module) -> dict[str, float]:
    """The MultiBox loss settings (plain values) that ``MultiBoxLoss(**settings)`` rebuilds."""
    names = ("neg_pos_ratio", "alpha", "min_negatives")
    return {n: getattr(loss, n) for n in names if isinstance(getattr(loss, n, None), int | float)}


def _foreground(datamodule: Any) -> list[str] | None:
    """The foreground class names of a DataModule (None without one)."""
    names = getattr(datamodule, "class_names", None)
    if names is None:
        return None
    names = list(names)
    return names[1:] if names[:1] == ["background"] else names


def _targets(batch: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Ground truth of a batch in the metric's format (pixels of the original image)."""
    return [
        {"boxes": boxes, "labels": labels, "difficult": difficult}
        for boxes, labels, difficult in zip(
            batch["gt_boxes"], batch["gt_labels"], batch["gt_difficult"], strict=True
        )
    ]


def _flat_scalars(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalars of a (possibly nested) results dict, nested keys joined with '/'."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}/"))
        elif (isinstance(value, Tensor) and value.numel() == 1) or isinstance(value, int | float):
            flat[name] = float(value)
    return flat


__all__ = ["BoxCoderMismatchError", "ClassMismatchError", "NonFiniteLossError", "SSDModule"]
