"""MultiBox loss with hard negative mining (SSD paper, Sec. 2.2 "Training objective").

``L = (L_conf + alpha * L_loc) / N`` with ``N`` the number of positive default boxes:

- ``L_loc``: smooth L1 (beta = 1, summed) between predicted and encoded offsets of positives.
- ``L_conf``: softmax cross-entropy summed over the positives and, per image, over the
  hardest negatives ("Hard negative mining"): background boxes ranked by their own
  cross-entropy, at most ``neg_pos_ratio`` x that image's positives.

Label convention of the targets (see ``ssd_lightning.encoder``): ``0`` background,
``1..C-1`` object classes, ``-1`` ignore (e.g. a crowd region): neither positive nor a
candidate negative, so it contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiBoxLoss(nn.Module):
    """SSD MultiBox loss, vectorised over the batch.

    Args:
        neg_pos_ratio: Most mined negatives per positive in an image (3 in the paper).
            The quota of an image is ``floor(neg_pos_ratio * positives)``.
        alpha: Weight of the localisation term (1 in the paper).
        min_negatives: Least negatives per image, so background-only images still teach
            "background" (0 = paper behaviour). Capped by the negatives an image has.
        fixed_shapes: How the terms are gathered; the same loss either way.

            - True (the default on GPUs): every tensor keeps the batch's shape. The box term
              is a masked sum over all default boxes; the cross-entropy is taken for all of
              them and masked; the hard negatives are a rank mask (rank of each background
              box's loss in its image < the image's quota) from one sort. The loss never
              waits for the GPU (no host sync) and compiles with ``fullgraph=True``.
            - False (the default on CPUs, where a sync costs nothing): the positive rows and
              the negatives of one ``topk`` (k = the largest quota, read on the host) are
              gathered, so the softmax's backward runs on ~4P rows instead of all B*A (2-3x
              faster on a CPU).

    Ties at an image's quota boundary are broken arbitrarily; the loss value does not depend
    on which tied box is taken, only which row receives the gradient.
    """

    def __init__(
        self,
        neg_pos_ratio: float = 3.0,
        alpha: float = 1.0,
        min_negatives: int = 0,
        fixed_shapes: bool | None = None,
    ):
        super().__init__()
        if neg_pos_ratio < 0 or min_negatives < 0:
            raise ValueError("neg_pos_ratio and min_negatives must be >= 0")
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.min_negatives = min_negatives
        self.fixed_shapes = fixed_shapes

    def forward(
        self,
        loc_pred: Tensor,
        cls_logits: Tensor,
        loc_targets: Tensor,
        labels: Tensor,
        num_positives: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss of one batch.

        Args:
            loc_pred: Predicted offsets (encoded like ``loc_targets``).
            cls_logits: Class logits, background at index 0.
            loc_targets: Encoded regression targets; read only where ``labels > 0``.
            labels: Target class per default box, ``-1`` = ignore (any integer dtype).
            num_positives: Normaliser ``N`` (e.g. the positive count all-reduced over DDP
                ranks); defaults to this batch's positive count. ``max(1, N)`` is used.

        Returns:
            ``loss`` = ``loss_cls + alpha * loss_box``, and both terms, each divided by N.

        Shape:
            - loc_pred, loc_targets: (B, A, 4)
            - cls_logits: (B, A, C)
            - labels: (B, A)
            - outputs: scalars
        """
        labels = labels.long()
        positive = labels > 0  # (B, A)
        if num_positives is None:
            num_positives = positive.sum()
        normaliser = torch.as_tensor(num_positives, dtype=torch.float32, device=labels.device)
        normaliser = normaliser.clamp(min=1.0)
        fixed = loc_pred.is_cuda if self.fixed_shapes is None else self.fixed_shapes
        if fixed:
            # L_loc: smooth L1 summed over the positives' offsets, (B, A, 4) -> scalar.
            box = F.smooth_l1_loss(loc_pred.float(), loc_targets.float(), reduction="none")
            loss_box = (box.sum(dim=-1) * positive).sum()
            # L_conf over the positives and the mined negatives, (B, A, C) -> scalar.
            log_p = F.log_softmax(cls_logits.float(), dim=-1)
            cross_entropy = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            chosen = positive | self._negative_mask(-log_p[..., 0].detach(), labels)
            loss_cls = (cross_entropy * chosen).sum()
        else:
            loss_box = F.smooth_l1_loss(
                loc_pred[positive].float(), loc_targets[positive].float(), reduction="sum"
            )
            rows = torch.cat(
                [positive.flatten().nonzero().squeeze(1), self._negative_rows(cls_logits, labels)]
            )
            logits = cls_logits.flatten(0, 1)[rows].float()  # (R, C)
            loss_cls = F.cross_entropy(logits, labels.flatten()[rows], reduction="sum")

        loss_box = loss_box / normaliser
        loss_cls = loss_cls / normaliser
        return {
            "loss": loss_cls + self.alpha * loss_box,
            "loss_box": loss_box,
            "loss_cls": loss_cls,
        }

    def _quota(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The negatives (B, A) bool and the quota (B,) of mined negatives of every image."""
        negative = labels == 0
        num_pos = (labels > 0).sum(dim=1)
        quota = torch.floor(num_pos * self.neg_pos_ratio).long().clamp(min=self.min_negatives)
        return negative, torch.minimum(quota, negative.sum(dim=1))

    def _negative_mask(self, background_loss: Tensor, labels: Tensor) -> Tensor:
        """Mask of the mined negatives (SSD paper, "Hard negative mining"), fixed shapes.

        Background boxes ranked by their own cross-entropy ``-log softmax(x)[0]``; an image
        keeps those ranked below its quota. Positives and ignored boxes rank last (-inf).

        Shape:
            background_loss, labels: (B, A) -> (B, A) bool, ``quota`` True entries per image
        """
        negative, quota = self._quota(labels)
        score = background_loss.masked_fill(~negative, float("-inf"))
        order = score.argsort(dim=1, descending=True)  # hardest first
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return rank < quota[:, None]

    @torch.no_grad()
    def _negative_rows(self, cls_logits: Tensor, labels: Tensor) -> Tensor:
        """Flat indices (into B*A) of the mined negatives, by one ``topk`` (k read on the host).

        Shape:
            cls_logits: (B, A, C); labels: (B, A) -> (R,) int64, R = sum of the quotas
        """
        batch, num_anchors = labels.shape
        negative, quota = self._quota(labels)
        background_loss = -F.log_softmax(cls_logits.float(), dim=-1)[..., 0]
        background_loss = background_loss.masked_fill(~negative, float("-inf"))
        k = int(quota.max()) if batch else 0
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=labels.device)
        _, order = background_loss.topk(k, dim=1)  # (B, k), hardest first
        take = torch.arange(k, device=labels.device) < quota[:, None]  # rank < quota
        offsets = torch.arange(batch, device=labels.device)[:, None] * num_anchors
        return (order + offsets)[take]
