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

    Hard negatives are taken with one ``topk`` over the batch (k = the largest quota) and a
    rank mask, instead of the double ``argsort`` of most re-implementations. Ties at an
    image's quota boundary are broken arbitrarily by ``topk``; the loss value does not
    depend on which tied box is taken, only which row receives the gradient.
    """

    def __init__(self, neg_pos_ratio: float = 3.0, alpha: float = 1.0, min_negatives: int = 0):
        super().__init__()
        if neg_pos_ratio < 0 or min_negatives < 0:
            raise ValueError("neg_pos_ratio and min_negatives must be >= 0")
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.min_negatives = min_negatives

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
            labels: Target class per default box, ``-1`` = ignore.
            num_positives: Normaliser ``N`` (e.g. the positive count all-reduced over DDP
                ranks); defaults to this batch's positive count. ``max(1, N)`` is used.

        Returns:
            ``loss`` = ``loss_cls + alpha * loss_box``, and both terms, each divided by N.

        Shape:
            - loc_pred, loc_targets: (B, A, 4)
            - cls_logits: (B, A, C)
            - labels: (B, A) int64
            - outputs: scalars
        """
        positive = labels > 0  # (B, A)
        if num_positives is None:
            num_positives = positive.sum()
        normaliser = torch.as_tensor(num_positives, dtype=torch.float32, device=labels.device)
        normaliser = normaliser.clamp(min=1.0)

        # L_loc: smooth L1 over positives only, (P, 4) -> scalar.
        loss_box = F.smooth_l1_loss(
            loc_pred[positive].float(), loc_targets[positive].float(), reduction="sum", beta=1.0
        )

        # L_conf over positives and mined negatives: gather their rows, so the softmax and
        # its backward run on ~4P rows instead of all B*A.
        rows = torch.cat(
            [positive.flatten().nonzero().squeeze(1), self._hard_negatives(cls_logits, labels)]
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

    @torch.no_grad()
    def _hard_negatives(self, cls_logits: Tensor, labels: Tensor) -> Tensor:
        """Flat indices (into B*A) of the mined negatives of every image.

        Shape:
            - cls_logits: (B, A, C); labels: (B, A)
            - output: (R,) int64, R = sum of the per-image quotas
        """
        batch, num_anchors = labels.shape
        negative = labels == 0
        # Background cross-entropy -log softmax(x)[0] ranks the negatives; positives and
        # ignored boxes get -inf so they sort last. (B, A)
        background_loss = -F.log_softmax(cls_logits.float(), dim=-1)[..., 0]
        background_loss = background_loss.masked_fill(~negative, float("-inf"))

        num_pos = (labels > 0).sum(1)
        quota = torch.floor(num_pos * self.neg_pos_ratio).long().clamp(min=self.min_negatives)
        quota = torch.minimum(quota, negative.sum(1))  # (B,)
        k = int(quota.max()) if batch else 0
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=labels.device)
        _, order = background_loss.topk(k, dim=1)  # (B, k), hardest first
        take = torch.arange(k, device=labels.device) < quota[:, None]  # rank < quota
        offsets = torch.arange(batch, device=labels.device)[:, None] * num_anchors
        return (order + offsets)[take]
