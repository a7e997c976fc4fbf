"""From raw SSD outputs to detections in original-image pixels (SSD paper, Sec. 3 "Inference").

The rule is torchvision's ``SSD.postprocess_detections``: softmax over the classes, drop the
background, keep the (anchor, class) pairs scoring above ``score_threshold`` and the
``candidates_per_class`` best of every class, NMS per class, then the ``max_detections`` best
boxes of the image. Here it runs for the whole batch at once on a *pool*: the ``pool`` best
pairs of every image (``PostProcessor.detect``).

A pool gives the exact answer once ``max_detections`` of its boxes survive NMS, because every
pair left out scores lower than every pair in the pool:

1. a pair's rank within its class is the same in the pool as in the image, so the per-class
   top-k keeps the same pairs of the pool;
2. greedy NMS decides on a box from the higher-scoring boxes of its class only, all in the pool;
3. the detections are the best survivors, and the pool's survivors outscore all others.

``PostProcessor.__call__`` starts with a pool of ``4 * max_detections`` pairs and redoes the
images left short (heavy suppression) with a pool twice as large, at last with all their pairs.
The ONNX export (``ssd_lightning.export``) runs one pass with a fixed pool.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torchvision.ops import nms

# First pool of __call__, per detection kept: most images are final after one pass (random
# outputs keep almost every pair; a trained model's clustered boxes about a third).
POOL_PER_DETECTION = 4

# Boxes per torchvision ``nms`` call on CPU (see ``grouped_nms``).
NMS_SLICE = 256


class BoxDecoder(Protocol):
    """What the post-processor needs of a box coder (``ssd_lightning.encoder.SSDBoxCoder``)."""

    def decode(self, loc: Tensor, anchors: Tensor | None = None) -> Tensor:
        """(B, A, 4) offsets -> (B, A, 4) normalised xyxy boxes; with ``anchors`` (B, T) the
        default box of every row, (B, T, 4) -> (B, T, 4)."""
        ...


class Scores(NamedTuple):
    """A batch's outputs, computed once for all passes (``PostProcessor.score``).

    Shape:
        values (r, C), best (B, A), row_of (B, A) as from ``class_scores``; loc (B, A, 4) float
        offsets (decoded for the pool's anchors only); sizes (B, 2) original (h, w)
    """

    values: Tensor
    best: Tensor
    row_of: Tensor
    loc: Tensor
    sizes: Tensor

    def images(self, index: Tensor) -> Scores:
        """The outputs of the images at ``index`` (``values`` shared)."""
        return Scores(self.values, *(t.index_select(0, index) for t in self[1:]))


class Pool(NamedTuple):
    """The pool of every image, by decreasing score, and the detections found in it.

    Shape:
        boxes (B, T, 4) xyxy pixels; scores (B, T); labels (B, T) int64 (0: an empty slot,
        score -inf); keep (B, T) bool: the detections; final (B,) bool: they are the image's
        (else it needs a larger pool)
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    keep: Tensor
    final: Tensor


class PostProcessor:
    """Turns a batch of SSD outputs into per-image detections.

    Args:
        box_coder: Decodes offsets into normalised xyxy boxes (``SSDBoxCoder``).
        score_threshold: Keep class scores strictly above this (0.01 for evaluation).
        nms_threshold: IoU above which NMS suppresses a lower-scoring box of the same class.
        candidates_per_class: Best-scoring boxes per image and class that enter NMS.
        max_detections: Detections kept per image (200 in the paper).
        class_agnostic: NMS across classes (a box suppresses overlapping boxes of any class);
            the per-class top-k is unchanged.

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
        class_agnostic: bool = False,
    ) -> None:
        self.box_coder = box_coder
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.candidates_per_class = int(candidates_per_class)
        self.max_detections = int(max_detections)
        self.class_agnostic = bool(class_agnostic)

    @torch.no_grad()
    def __call__(
        self, loc: Tensor, cls_logits: Tensor, image_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """Detections of every image of a batch (exact: pools grow until they suffice).

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
        batch, num_classes = cls_logits.shape[0], cls_logits.shape[2]
        none = torch.zeros(0, 4, device=loc.device)
        found = [
            {"boxes": none, "scores": none[:, 0], "labels": none[:, 0].long()} for _ in range(batch)
        ]
        if num_classes < 2:  # no foreground class
            return found
        scores = self.score(loc, cls_logits, image_sizes)
        todo, pool = list(range(batch)), POOL_PER_DETECTION * self.max_detections
        while todo:
            index = torch.tensor(todo, device=loc.device)
            part = self.search(scores if len(todo) == batch else scores.images(index), pool)
            counts, final = part.keep.sum(dim=1).tolist(), part.final.tolist()
            kept = zip(*(t[part.keep].split(counts) for t in part[:3]), strict=True)
            for image, done, (boxes, image_scores, labels) in zip(todo, final, kept, strict=True):
                if done:
                    found[image] = {"boxes": boxes, "scores": image_scores, "labels": labels}
            todo = [image for image, done in zip(todo, final, strict=True) if not done]
            pool *= 2
        return found

    def detect(
        self, loc: Tensor, cls_logits: Tensor, image_sizes: Tensor, pool: int, export: bool = False
    ) -> Pool:
        """One pass with a fixed ``pool`` of (anchor, class) pairs per image, inputs as for
        ``__call__``. ``export`` (``torch.onnx.export``): no data-dependent branch, and one
        NMS call in float32, as ONNX ``NonMaxSuppression`` takes."""
        return self.search(self.score(loc, cls_logits, image_sizes, export), pool, export)

    def score(
        self, loc: Tensor, cls_logits: Tensor, image_sizes: Tensor, export: bool = False
    ) -> Scores:
        """Class scores, inputs as for ``__call__``."""
        values, best, row_of = class_scores(cls_logits.float(), self.score_threshold, not export)
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=loc.device)
        return Scores(values, best, row_of, loc.float(), sizes)

    def search(self, scores: Scores, pool: int, export: bool = False) -> Pool:
        """The detections among the ``pool`` best (anchor, class) pairs of every image.

        Shape:
            scores of B images -> Pool of T = min(pool, A * C) pairs per image
        """
        batch, num_anchors = scores.best.shape
        num_classes = scores.values.shape[1]
        # The pool's pairs belong to its best anchors (by best class score): an anchor holding
        # one of the image's ``pool`` best pairs is among its ``pool`` best anchors.
        anchor = scores.best.topk(min(pool, num_anchors), dim=1, sorted=False).indices  # (B, Ta)
        rows = scores.row_of.gather(1, anchor).view(-1)
        pairs = scores.values.index_select(0, rows).view(batch, -1)  # (B, Ta * C)
        score, pair = pairs.topk(min(pool, pairs.shape[1]), dim=1)  # (B, T) best first
        anchor = anchor.gather(1, torch.div(pair, num_classes, rounding_mode="floor"))
        labels = pair % num_classes
        loc = scores.loc.gather(1, anchor[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(loc, anchor).clamp_(0.0, 1.0)  # (B, T, 4) normalised

        # Candidates by (image, class), then decreasing score: the pool is by decreasing
        # score, so sort by (class, position in the pool).
        width = labels.shape[1]  # T
        key, order = (labels * width + torch.arange(width, device=labels.device)).sort(dim=1)
        rank = rank_in_sorted_rows(torch.div(key, width, rounding_mode="floor"), num_classes)
        candidate = score.gather(1, order) > self.score_threshold
        candidate &= rank < self.candidates_per_class  # rank: (B, T) within the class
        index = (order + torch.arange(batch, device=order.device)[:, None] * width)[candidate]
        image = torch.div(index, width, rounding_mode="floor")  # index: (n,) into (B * T)
        group = image if self.class_agnostic else image * num_classes + labels.view(-1)[index]
        keep = grouped_nms(  # normalised boxes: NMS does not depend on the scale
            boxes.view(-1, 4)[index].to(torch.float32 if export else torch.float64),
            score.view(-1)[index],
            group,
            self.nms_threshold,
            None if export or not boxes.is_cpu else NMS_SLICE,
        )
        keep = torch.zeros_like(score, dtype=torch.bool).view(-1).index_fill_(0, index[keep], True)
        keep = keep.view(batch, -1)
        keep &= keep.cumsum(dim=1) <= self.max_detections  # the best of every image
        # Final: enough survivors, or the pool holds every pair above the threshold (at the
        # latest when it holds every pair, the background's too).
        final = (keep.sum(dim=1) >= self.max_detections) | (score[:, -1] <= self.score_threshold)
        pixels = boxes * scores.sizes.flip(-1).repeat(1, 2)[:, None]  # times w, h, w, h
        return Pool(pixels, score, labels, keep, final)


def class_scores(
    logits: Tensor, threshold: float, skip: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax scores (the background's -inf: never a candidate) and each anchor's best one.

    softmax_c = exp(l_c) / sum_k exp(l_k) <= exp(l_c - l_0) (l_0: the background logit), so an
    anchor whose best class logit is below l_0 + log(threshold) holds no pair above it (the
    margin covers rounding). With ``skip``, when a sample of the rows says that most anchors
    are such (a trained model: ~90% of them with 91 classes), only the others get a softmax,
    row-wise, so bitwise that of ``softmax(logits)``.

    Returns:
        ``values`` (r, C): the rows computed, the last one (-inf, 0, ...) for the anchors
        skipped; ``best`` (B, A): the best class score of every anchor; ``row_of`` (B, A): its
        row of ``values``.

    Shape:
        logits: (B, A, C) float32
    """
    batch, num_anchors, num_classes = logits.shape
    flat = logits.view(-1, num_classes)  # (B*A, C)

    def can_pass(rows: Tensor) -> Tensor:
        return rows[:, 1:].amax(dim=1) > rows[:, 0] + (math.log(threshold) - 1e-3)

    rows = None
    if skip and threshold > 0.0:
        sample = flat[:: max(1, len(flat) // 1024)]
        if 2 * int(can_pass(sample).sum()) < len(sample):
            rows = can_pass(flat).nonzero()[:, 0]  # (r - 1,)
    if rows is None:  # every row (shapes, not len(): torch.export keeps the batch size)
        values = flat.softmax(dim=1)
        row_of = torch.arange(flat.shape[0], device=flat.device)
    else:  # the rows kept, and one for the others (logits 0, -inf, ...: scores 1, 0, ...)
        skipped = flat.new_full((1, num_classes), -math.inf)
        skipped[0, 0] = 0.0
        values = torch.cat([flat.index_select(0, rows), skipped]).softmax(dim=1)  # (r, C)
        row_of = torch.full_like(flat[:, 0], len(rows), dtype=torch.long)
        row_of.index_copy_(0, rows, torch.arange(len(rows), device=flat.device))
    values[:, 0] = -math.inf
    best = values.amax(dim=1)  # (r,)
    if rows is not None:  # to every anchor
        best = best.index_select(0, row_of)
    return values, best.view(batch, num_anchors), row_of.view(batch, num_anchors)


def rank_in_sorted_rows(values: Tensor, num_values: int) -> Tensor:
    """Position of every entry among the equal entries of its row; rows sorted.

    Shape:
        values: (B, T) int64 in [0, num_values), sorted along dim 1 -> (B, T) int64
    """
    counts = torch.zeros(values.shape[0], num_values, dtype=torch.long, device=values.device)
    counts.scatter_add_(1, values, torch.ones_like(values))
    first = counts.cumsum(dim=1) - counts  # (B, num_values) position of the first of each
    return torch.arange(values.shape[1], device=values.device) - first.gather(1, values)


def grouped_nms(
    boxes: Tensor,
    scores: Tensor,
    group: Tensor,
    iou_threshold: float,
    slice_size: int | None = None,
) -> Tensor:
    """Indices of the boxes NMS keeps within each group, in the dtype of ``boxes``:
    torchvision's coordinate trick, boxes shifted by twice their group (no overlap between
    groups).

    With ``slice_size`` (``group`` sorted), one ``torchvision.ops.nms`` call per slice of about
    that many boxes, a group never straddling two. The CPU kernel compares every box it keeps
    with every later box of its call, of any group, so one call for a batch's thousands of
    boxes costs (kept x boxes) IoU tests, mostly between groups; slices bound it to (boxes x
    slice_size). ``batched_nms`` does not avoid it: above 1,000 boxes on CPU it loops over the
    groups, each scanning all the boxes.

    Shape:
        boxes: (n, 4) xyxy within [0, 1]; scores: (n,); group: (n,) int64 -> (k,)
    """
    shifted = boxes + 2.0 * group.to(boxes)[:, None]
    scores = scores.to(boxes.dtype)
    if slice_size is None or len(boxes) <= slice_size:
        return nms(shifted, scores, iou_threshold)
    first = torch.searchsorted(group, group)  # (n,) start of every box's group
    slice_of = torch.div(first, slice_size, rounding_mode="floor")
    ends = [*((slice_of[1:] != slice_of[:-1]).nonzero()[:, 0] + 1).tolist(), len(boxes)]
    keep, begin = [], 0
    for end in ends:
        keep.append(nms(shifted[begin:end], scores[begin:end], iou_threshold) + begin)
        begin = end
    return torch.cat(keep)
