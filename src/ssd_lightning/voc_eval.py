"""Pascal VOC average precision, written for this project and mergeable under DDP.

What matches the official VOC devkit (``VOCevaldet.m`` / ``VOCap.m``):

- A detection is compared with the ground truth of its image and class; it takes the GT with the
  highest IoU *whether or not that GT is already taken*. If that IoU is >= 0.5 and the GT is
  difficult, the detection is ignored (neither TP nor FP); if the GT is free it is a TP and the GT
  becomes taken; if the GT is taken it is a FP (duplicate). Otherwise it is a FP.
- Detections are processed in descending score order. Matching only interacts inside one image, so
  processing each image in score order gives the same TP/FP flags as the devkit's global sort.
- Recall counts only non-difficult GT objects.
- ``use_07_metric=True``: VOC2007 11-point interpolated AP (the SSD paper's 77.2 on VOC07 test).
  ``use_07_metric=False``: VOC2010+ area under the monotone precision envelope.

Deliberate differences:

- IoU is the plain continuous IoU of ``torchvision.ops.box_iou``. The devkit adds 1 pixel to each
  width and height because VOC stores inclusive integer pixel indices; our boxes are continuous
  float pixels (``xmax = xmin + width``), for which the +1 would inflate every box.
- A class with no non-difficult GT object has no defined AP; it reports -1 (COCO's convention
  for "undefined") and is left out of the mean. With no such class at all the mean is -1.
- Ties in score are broken by input order (stable sort); the devkit's order is unspecified there.

Detections are matched when they arrive (``update``), so the state is only per-detection
``(score, label, is_tp)`` plus per-class GT counts: lists concatenated and counts summed across
ranks, which is how torchmetrics syncs it under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import Metric


def voc_ap(recall: Tensor, precision: Tensor, use_07_metric: bool) -> float:
    """Average precision of one class from its cumulative precision/recall curve.

    Args:
        recall: Recall after each detection, in descending score order (non-decreasing).
        precision: Precision after each detection, same order.
        use_07_metric: VOC2007 11-point interpolation if True, else the VOC2010+ area under the
            monotone (right-to-left running maximum) precision envelope.

    Returns:
        AP in [0, 1]; 0.0 for an empty curve.

    Shape:
        recall, precision: (N,)
    """
    recall = recall.double()
    precision = precision.double()
    if recall.numel() == 0:
        return 0.0
    if use_07_metric:
        # VOC07: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t (0 if none).
        thresholds = torch.linspace(0, 1, 11, dtype=torch.float64)
        reached = recall[None, :] >= thresholds[:, None]  # (11, N)
        best = torch.where(reached, precision[None, :], 0.0).amax(dim=1)
        return float(best.mean())
    # VOC2010+: sentinels, envelope = running max from the right, then sum rectangles where
    # recall changes.
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    envelope = mpre.flip(0).cummax(0).values.flip(0)
    return float(((mrec[1:] - mrec[:-1]) * envelope[1:]).sum())


def _padded(items: Sequence[Tensor], fill: float) -> tuple[Tensor, Tensor]:
    """Stack variable-length per-image tensors into (B, N, ...) with a validity mask (B, N)."""
    lengths = torch.tensor([len(t) for t in items], device=items[0].device)
    padded = pad_sequence(list(items), batch_first=True, padding_value=fill)
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded, valid


def _batched_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in a with every box in b, per image.

    ``torchvision.ops.box_iou`` is 2-D only; this is the same formula batched over images so that
    a batch is matched without a Python loop per image.

    Shape:
        a: (B, D, 4) xyxy, b: (B, G, 4) xyxy -> (B, D, G)
    """
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])  # (B, D, G, 2)
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (B, D, G)
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).eps)


def match_detections(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    iou_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """VOC devkit matching of a batch of images, vectorised over images and detections.

    Args:
        preds: Per image ``boxes`` (D_i, 4) xyxy pixels, ``scores`` (D_i,), ``labels`` (D_i,).
        targets: Per image ``boxes`` (G_i, 4), ``labels`` (G_i,) and optional ``difficult``
            (G_i,) bool.
        iou_threshold: A detection matches its best GT when IoU >= this (devkit uses >=).

    Returns:
        ``is_tp`` and ``ignored`` flags for the detections in concatenated input order.

    Shape:
        is_tp, ignored: (sum D_i,) bool
    """
    device = preds[0]["scores"].device
    boxes, det_valid = _padded([p["boxes"].float() for p in preds], 0.0)  # (B, D, 4), (B, D)
    scores, _ = _padded([p["scores"].float() for p in preds], float("-inf"))  # (B, D)
    labels, _ = _padded([p["labels"].long() for p in preds], -1)
    gt_boxes, gt_valid = _padded([t["boxes"].float().to(device) for t in targets], 0.0)
    gt_labels, _ = _padded([t["labels"].long().to(device) for t in targets], -2)
    difficult, _ = _padded(
        [t.get("difficult", torch.zeros_like(t["labels"])).bool().to(device) for t in targets], 0
    )
    num_det = boxes.shape[1]
    is_tp = torch.zeros_like(det_valid)
    ignored = torch.zeros_like(det_valid)
    if gt_boxes.shape[1] > 0 and num_det > 0:
        iou = _batched_iou(boxes, gt_boxes)  # (B, D, G)
        same = (labels[:, :, None] == gt_labels[:, None, :]) & gt_valid[:, None, :]
        # Devkit: best GT of the same class, taken or not; -1 where none overlaps.
        best_iou, best_gt = torch.where(same & (iou > 0), iou, -1.0).max(dim=2)  # (B, D)
        hit = det_valid & (best_iou >= iou_threshold)
        ignored = hit & difficult.gather(1, best_gt)
        candidate = hit & ~ignored
        # Rank of each detection in its image by descending score; the first candidate to claim
        # a GT is the TP, later claimants are duplicates (FP).
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(num_det, device=device).expand_as(order)
        )
        first = torch.full(gt_labels.shape, num_det, device=device, dtype=torch.long)  # (B, G)
        first.scatter_reduce_(1, best_gt, torch.where(candidate, rank, num_det), reduce="amin")
        is_tp = candidate & (rank == first.gather(1, best_gt))
    return is_tp[det_valid], ignored[det_valid]


class VOCEvaluator(Metric):
    """Pascal VOC AP (VOC07 11-point and VOC2010+ area) per class and their means.

    Args:
        class_names: Names of the foreground classes; label k (1..C-1) is ``class_names[k - 1]``
            (label 0 is background and never evaluated).
        iou_threshold: IoU needed for a match (VOC: 0.5).

    ``update(preds, targets)`` takes the per-image dicts of :func:`match_detections` (``targets``
    may carry ``difficult``). ``compute()`` returns floats keyed ``mAP_voc07``, ``mAP_voc``,
    ``AP_voc07/<name>`` and ``AP_voc/<name>``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.iou_threshold = iou_threshold
        self.add_state("det_scores", default=[], dist_reduce_fx="cat")
        self.add_state("det_labels", default=[], dist_reduce_fx="cat")
        self.add_state("det_tp", default=[], dist_reduce_fx="cat")
        num_classes = len(self.class_names) + 1
        self.add_state(
            "num_gt", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        """Match one batch of images and store the flags of its non-ignored detections."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        if not preds:
            return
        is_tp, ignored = match_detections(preds, targets, self.iou_threshold)
        keep = ~ignored
        self.det_scores.append(torch.cat([p["scores"].float() for p in preds])[keep])
        # All three states are float32 1-D so that a rank that saw no batch (torchmetrics then
        # gathers an empty float tensor for it) still matches the others under DDP.
        self.det_labels.append(torch.cat([p["labels"].float() for p in preds])[keep])
        self.det_tp.append(is_tp[keep].float())
        counted = torch.cat(
            [
                t["labels"][~t["difficult"].bool()] if "difficult" in t else t["labels"]
                for t in targets
            ]
        )
        counted = counted.long().to(self.num_gt.device)
        self.num_gt += torch.bincount(counted, minlength=len(self.num_gt))[: len(self.num_gt)]

    def compute(self) -> dict[str, float]:
        """Per-class AP for both definitions and their means over classes with GT."""
        scores = _cat(self.det_scores)
        labels = _cat(self.det_labels).long()
        tp = _cat(self.det_tp)
        results: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {"voc07": [], "voc": []}
        for k, name in enumerate(self.class_names, start=1):
            npos = int(self.num_gt[k])
            in_class = labels == k
            order = scores[in_class].argsort(descending=True, stable=True)
            cum_tp = tp[in_class][order].double().cumsum(0)  # (N_k,)
            recall = cum_tp / max(npos, 1)
            precision = cum_tp / torch.arange(
                1, len(cum_tp) + 1, dtype=torch.float64, device=cum_tp.device
            )
            for metric, use_07 in (("voc07", True), ("voc", False)):
                ap = voc_ap(recall.cpu(), precision.cpu(), use_07) if npos > 0 else -1.0
                results[f"AP_{metric}/{name}"] = ap
                if npos > 0:
                    per_metric[metric].append(ap)
        for metric, aps in per_metric.items():
            results[f"mAP_{metric}"] = sum(aps) / len(aps) if aps else -1.0
        return results


def _cat(items: Tensor | list[Tensor]) -> Tensor:
    """Concatenate a float32 list state (already a tensor after a DDP sync)."""
    if isinstance(items, Tensor):
        return items
    return torch.cat(items) if items else torch.zeros(0)
