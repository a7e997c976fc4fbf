"""From raw SSD outputs to detections in original-image pixels (SSD paper, Sec. 3 "Inference").

Decode the offsets, softmax the logits, drop background, keep scores above a threshold and the
top-k candidates per class, run per-class NMS, keep the best detections of every image.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms


class BoxDecoder(Protocol):
    """What the post-processor needs of a box coder (``ssd_lightning.encoder.SSDBoxCoder``)."""

    def decode(self, loc: Tensor) -> Tensor:
        """(B, A, 4) offsets -> (B, A, 4) normalised xyxy boxes."""
        ...


class PostProcessor:
    """Turns a batch of SSD outputs into per-image detections.

    Args:
        box_coder: Decodes offsets into normalised xyxy boxes (``SSDBoxCoder``).
        score_threshold: Keep class scores strictly above this (0.01 for evaluation).
        nms_threshold: IoU above which NMS suppresses a lower-scoring box of the same class.
        candidates_per_class: Best-scoring boxes per image and class that enter NMS.
        max_detections: Detections kept per image (200 in the paper).

    The result equals torchvision's ``SSD.postprocess_detections`` (threshold, per-class top-k,
    per-class NMS, top ``max_detections``), computed for the whole batch at once: one
    ``batched_nms`` whose groups are (image, class).

    To keep NMS small, each image first sends only its ``m`` best (box, class) pairs, starting
    at ``m = 2 * max_detections``. This is exact: greedy NMS decides on a box from higher-scoring
    boxes only, and every pair outside the ``m`` scores lower than all inside, so when at least
    ``max_detections`` boxes survive NMS they are the final answer. Images that end up short
    (heavy suppression) are redone with ``4 m`` pairs until all their candidates were seen.
    Equal scores are ordered arbitrarily (as in torchvision), which can swap tied boxes at a
    cut-off.
    """

    def __init__(
        self,
        box_coder: BoxDecoder,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        candidates_per_class: int = 200,
        max_detections: int = 200,
    ) -> None:
        self.box_coder = box_coder
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.candidates_per_class = int(candidates_per_class)
        self.max_detections = int(max_detections)

    @torch.no_grad()
    def __call__(
        self, loc: Tensor, cls_logits: Tensor, image_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """Detections of every image of a batch.

        Args:
            loc: Predicted box offsets.
            cls_logits: Class logits, background at index 0.
            image_sizes: Original (height, width) of every image; boxes are scaled to it.

        Returns:
            One dict per image: ``boxes`` (n, 4) float32 xyxy pixels clipped to the image,
            ``scores`` (n,) float32 and ``labels`` (n,) int64 in 1..C-1, by decreasing score.

        Shape:
            - loc: (B, A, 4); cls_logits: (B, A, C); image_sizes: (B, 2)
        """
        batch, num_anchors, num_classes = cls_logits.shape
        boxes = self.box_coder.decode(loc.float())  # (B, A, 4) normalised xyxy
        scores = F.softmax(cls_logits.float(), dim=-1)
        scores[..., 0] = -1.0  # background is never a candidate (below any threshold)
        scores = scores.view(batch, num_anchors * num_classes)  # pair p: anchor p // C, class p % C
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=loc.device)
        scale = sizes.flip(-1).repeat(1, 2)  # (B, 4): w, h, w, h

        m = min(scores.shape[1], 2 * self.max_detections)
        if m == 0:
            return [_no_detections(loc.device) for _ in range(batch)]
        results: list[dict[str, Tensor]] = [{} for _ in range(batch)]
        todo = list(range(batch))
        while True:
            detections, need_more = self._detect(boxes, scores, scale, num_classes, m)
            for i, det in zip(todo, detections, strict=True):
                results[i] = det
            if not bool(need_more.any()):
                return results
            todo = [i for i, more in zip(todo, need_more.tolist(), strict=True) if more]
            boxes, scores, scale = boxes[need_more], scores[need_more], scale[need_more]
            m = min(scores.shape[1], 4 * m)

    def _detect(
        self, boxes: Tensor, scores: Tensor, scale: Tensor, num_classes: int, m: int
    ) -> tuple[list[dict[str, Tensor]], Tensor]:
        """Detections from the ``m`` best (box, class) pairs of every image.

        Shape:
            - boxes: (b, A, 4) normalised xyxy; scores: (b, A*num_classes); scale: (b, 4)
            - returns b dicts, and need_more (b,) bool: too few survivors and pairs left unseen
        """
        b = scores.shape[0]
        top_scores, pair = scores.topk(m, dim=1)  # (b, m), best first
        anchor, label = pair // num_classes, pair % num_classes
        valid = top_scores > self.score_threshold
        if m > self.candidates_per_class:
            valid &= rank_within_class(label, num_classes) < self.candidates_per_class
        exhausted = (m == scores.shape[1]) | (top_scores[:, -1] <= self.score_threshold)

        image = torch.arange(b, device=scores.device)[:, None].expand(b, m)[valid]  # (n,)
        cand_boxes = boxes[image, anchor[valid]].clamp(0.0, 1.0) * scale[image]  # (n, 4) pixels
        cand_scores, cand_labels = top_scores[valid], label[valid]
        # One NMS for the batch, groups = (image, class). float64: batched_nms may offset the
        # boxes by group index * max coordinate, which would cost float32 IoU precision.
        groups = image * num_classes + cand_labels
        keep = batched_nms(cand_boxes.double(), cand_scores.double(), groups, self.nms_threshold)
        # keep is by decreasing score; a stable sort by image keeps that order within an image.
        kept_image, order = torch.sort(image[keep], stable=True)
        keep = keep[order]
        counts = torch.bincount(kept_image, minlength=b)
        need_more = (counts < self.max_detections) & ~exhausted
        first = torch.cumsum(counts, 0) - counts  # (b,) start of every image in keep
        rank = torch.arange(keep.numel(), device=keep.device) - first[kept_image]
        keep = keep[rank < self.max_detections]

        per_image = counts.clamp(max=self.max_detections).tolist()
        detections = [
            {"boxes": bx, "scores": sc, "labels": lb}
            for bx, sc, lb in zip(
                cand_boxes[keep].split(per_image),
                cand_scores[keep].split(per_image),
                cand_labels[keep].split(per_image),
                strict=True,
            )
        ]
        return detections, need_more


def _no_detections(device: torch.device) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.long, device=device),
    }


def rank_within_class(cls: Tensor, num_classes: int) -> Tensor:
    """Position of every entry among the entries of the same class before it, per row.

    Rows are sorted by score, so this is each pair's rank within its class.

    Shape:
        cls: (b, m) int64 in [0, num_classes); returns (b, m) int64.
    """
    order = torch.sort(cls, dim=1, stable=True).indices  # same-class entries together, in order
    counts = torch.zeros(cls.shape[0], num_classes, dtype=torch.long, device=cls.device)
    counts.scatter_add_(1, cls, torch.ones_like(cls))
    first = torch.cumsum(counts, 1) - counts  # (b, num_classes) start of each class in order
    positions = torch.arange(cls.shape[1], device=cls.device).expand_as(cls)
    rank_sorted = positions - first.gather(1, cls.gather(1, order))
    return torch.empty_like(cls).scatter_(1, order, rank_sorted)
