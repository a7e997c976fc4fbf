"""From raw SSD outputs to detections in original-image pixels (SSD paper, Sec. 3 "Inference").

Decode the offsets, softmax the logits, drop background, keep scores above a threshold and the
top-k candidates per class, run per-class NMS, keep the best detections of every image.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torchvision.ops import nms

# NMS runs on slices of about this many boxes (see ``grouped_nms``).
NMS_CHUNK = 256


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
    per-class NMS, top ``max_detections``), computed for the whole batch at once. The work
    follows the number of (anchor, class) pairs above the threshold, which a trained model
    keeps small (background dominates: ~2,000 of SSD300's 8732 x 91 pairs per COCO image):

    1. Softmax only for the anchors where some class can pass (``class_scores``).
    2. The pairs above the threshold (one ``nonzero``). An image where more than
       ``m = 3 * max_detections`` anchors hold one (an untrained model: all of them) sends
       only its best pairs first: those scoring above its (m+1)-th best anchor, found among
       its m best anchors (``best_pairs``).
    3. The ``candidates_per_class`` best pairs of every (image, class) (one integer sort).
    4. NMS per (image, class) (``grouped_nms``), then the ``max_detections`` best of every
       image. An image that sent all its pairs goes through NMS with its m best candidates
       first, then 4 m, 16 m, ... while it is left with fewer than ``max_detections``.
    5. An image of step 2 left short (heavy suppression: a trained model's boxes cluster on
       its objects) sends the pairs of its 2 m, 4 m, ... best anchors, at last all its pairs.

    Steps 2, 4 and 5 are exact: greedy NMS decides on a box from higher-scoring boxes of its
    class only, and every pair left out scores lower than all those sent (per class too, so
    the per-class top-k is unchanged), so once ``max_detections`` boxes survive they are the
    final answer.

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
        if batch == 0 or num_classes < 2:  # no image or no foreground class
            return Detections.none(loc.device).split(batch)
        boxes = self.box_coder.decode(loc.float()).reshape(-1, 4)  # (B*A, 4) normalised xyxy
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=loc.device)
        scale = sizes.flip(-1).repeat(1, 2)  # (B, 4): w, h, w, h
        scores = class_scores(cls_logits.float(), self.score_threshold)
        alive = scores.best > self.score_threshold  # (r,) rows holding a pair
        # About a third of the best pairs survive NMS on trained-like outputs (their boxes
        # cluster on objects), almost all on random ones: 3x sends enough in one step for most
        # images of both (2x: 10-30% slower on trained-like outputs, 4x: 10-25% on random).
        m = 3 * self.max_detections
        # Images with more anchors holding a pair than m send their best pairs first.
        partial = scores.per_image(alive, batch, num_anchors) > m  # (B,)

        def detect(pairs: Tensor, first: Tensor) -> Detections:
            return self._nms_rounds(self._per_class(pairs, scores, boxes, scale), first)

        def all_pairs(images: Tensor) -> Tensor:
            return scores.pairs_of(images, self.score_threshold, num_anchors)

        # NMS first on the m best candidates of an image that sends all its pairs, on all of
        # them for one that sends its best pairs.
        first = torch.where(partial, scores.values.numel(), m)  # (B,)
        if not bool(partial.any()):
            return detect(all_pairs(~partial), first).split(batch)
        best, left_out = best_pairs(scores, partial, m, self.score_threshold, num_anchors)
        found = detect(torch.cat([best, all_pairs(~partial)]), first)
        partial, sent = left_out, m
        while True:  # heavy suppression: the short images send 2x more pairs, then all
            short = partial & (torch.bincount(found.image, minlength=batch) < self.max_detections)
            if not bool(short.any()):
                return found.split(batch)
            sent *= 2
            if 2 * sent < num_anchors:
                pairs, partial = best_pairs(scores, short, sent, self.score_threshold, num_anchors)
            else:  # all pairs; NMS on the best ones first, as the sent pairs fell short
                pairs, partial = all_pairs(short), short & False
                first.fill_(sent)
            others = found.select(~short.index_select(0, found.image))
            found = Detections.cat([others, detect(pairs, first)])

    def _per_class(
        self, pairs: Tensor, scores: ClassScores, boxes: Tensor, scale: Tensor
    ) -> Candidates:
        """The ``candidates_per_class`` best pairs of every (image, class), boxes in pixels.

        Shape:
            pairs: (n,) flat indices into ``scores.values``; boxes: (B*A, 4) normalised xyxy;
            scale: (B, 4) -> candidates by (image, class) then decreasing score
        """
        batch, num_classes = len(scale), scores.values.shape[1]
        score = scores.values.view(-1).index_select(0, pairs)
        anchor = scores.anchor(torch.div(pairs, num_classes, rounding_mode="floor"))
        num_anchors = len(boxes) // batch
        group = torch.div(anchor, num_anchors, rounding_mode="floor") * num_classes
        group += pairs % num_classes  # (n,) image * C + class
        order, group = best_per_group(group, score, self.candidates_per_class)
        image = torch.div(group, num_classes, rounding_mode="floor")
        pixels = boxes.index_select(0, anchor.index_select(0, order)).clamp_(0.0, 1.0)
        pixels *= scale.index_select(0, image)  # (k, 4)
        return Candidates(group, score.index_select(0, order), pixels, num_classes)

    def _nms_rounds(self, cand: Candidates, first: Tensor) -> Detections:
        """NMS per (image, class) and the best ``max_detections`` of every image.

        Only the ``first`` best candidates of an image enter NMS; images left short (heavy
        suppression) are redone with 4x more, and so on.

        Shape:
            cand: n candidates; first: (B,) int64 -> detections of every image with candidates
        """
        batch, image = len(first), cand.image
        num_candidates = torch.bincount(image, minlength=batch)
        todo = num_candidates > 0
        found = [Detections.none(first.device)]  # for a batch without candidates
        m, rank = first, None
        if bool((num_candidates > m).any()):  # position of every candidate in its image
            sorted_image, order = sort_by_group_and_score(image, cand.score)
            rank = torch.empty_like(order)
            rank[order] = rank_in_groups(sorted_image, batch)
        while bool(todo.any()):
            take = todo.index_select(0, image)
            if rank is not None:
                take &= rank < m.index_select(0, image)
            sent = cand.select(take)
            keep = grouped_nms(sent.pixels, sent.score, sent.group, self.nms_threshold, NMS_CHUNK)
            kept_image = sent.image.index_select(0, keep)
            best, _ = best_per_group(
                kept_image, sent.score.index_select(0, keep), self.max_detections
            )
            kept = sent.detections(keep.index_select(0, best))
            done = todo & (
                (torch.bincount(kept.image, minlength=batch) >= self.max_detections)
                | (num_candidates <= m)
            )
            found.append(kept.select(done.index_select(0, kept.image)))
            todo &= ~done
            m = m * 4
        return Detections.cat(found)


class ClassScores(NamedTuple):
    """Softmax scores of some anchors, the background set to -inf (never a candidate).

    Shape:
        row: (r,) flat anchor index image * A + anchor of every row, increasing, or None when
        all B * A anchors are there; values: (r, C); best: (r,) best score of every row
    """

    row: Tensor | None
    values: Tensor
    best: Tensor

    def anchor(self, rows: Tensor) -> Tensor:
        """Flat anchor index image * A + anchor of the given rows."""
        return rows if self.row is None else self.row.index_select(0, rows)

    def per_image(self, mask: Tensor, batch: int, num_anchors: int) -> Tensor:
        """Rows marked in ``mask`` (r,) bool, per image -> (B,)."""
        if self.row is None:
            return mask.view(batch, num_anchors).sum(dim=1)
        image = torch.div(self.row[mask], num_anchors, rounding_mode="floor")
        return torch.bincount(image, minlength=batch)

    def pairs_of(self, images: Tensor, threshold: float, num_anchors: int) -> Tensor:
        """All the pairs above ``threshold`` of the images marked in ``images`` (B,) bool.

        Shape:
            -> (n,) flat indices into ``values``
        """
        if not bool(images.any()):
            return torch.zeros(0, dtype=torch.long, device=images.device)
        if bool(images.all()):
            return (self.values.view(-1) > threshold).nonzero()[:, 0]
        if self.row is None:  # the rows of image i are i * A ... (i + 1) * A - 1
            index = images.nonzero()[:, 0]
            per_image = self.values.view(len(images), -1)
            passing = per_image.index_select(0, index) > threshold
            image, pair = passing.nonzero().unbind(1)
            return index.index_select(0, image) * per_image.shape[1] + pair
        row_image = torch.div(self.row, num_anchors, rounding_mode="floor")
        rows = images.index_select(0, row_image).nonzero()[:, 0]
        row, column = (self.values.index_select(0, rows) > threshold).nonzero().unbind(1)
        return rows.index_select(0, row) * self.values.shape[1] + column


class Candidates(NamedTuple):
    """Pairs that may enter NMS, by (image, class) then decreasing score.

    Shape:
        group (n,) image * C + class; score (n,); pixels (n, 4) xyxy; num_classes C
    """

    group: Tensor
    score: Tensor
    pixels: Tensor
    num_classes: int

    @property
    def image(self) -> Tensor:
        return torch.div(self.group, self.num_classes, rounding_mode="floor")

    def select(self, index: Tensor) -> Candidates:
        """The candidates at ``index`` (int64) or where ``index`` (bool) holds."""
        index = as_indices(index)
        return Candidates(*(t.index_select(0, index) for t in self[:3]), self.num_classes)

    def detections(self, index: Tensor) -> Detections:
        group = self.group.index_select(0, index)
        image = torch.div(group, self.num_classes, rounding_mode="floor")
        labels = group - image * self.num_classes
        pixels, score = self.pixels.index_select(0, index), self.score.index_select(0, index)
        return Detections(image, pixels, score, labels)


class Detections(NamedTuple):
    """Detections of a batch, by image then decreasing score.

    Shape:
        image (n,); boxes (n, 4) xyxy pixels; scores (n,); labels (n,)
    """

    image: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @staticmethod
    def none(device: torch.device) -> Detections:
        long = torch.zeros(0, dtype=torch.long, device=device)
        return Detections(
            long, torch.zeros(0, 4, device=device), torch.zeros(0, device=device), long
        )

    def select(self, index: Tensor) -> Detections:
        """The detections at ``index`` (int64) or where ``index`` (bool) holds."""
        index = as_indices(index)
        return Detections(*(t.index_select(0, index) for t in self))

    @staticmethod
    def cat(parts: list[Detections]) -> Detections:
        """Concatenation, re-sorted by image (a stable sort keeps the score order)."""
        joined = Detections(*(torch.cat(ts) for ts in zip(*parts, strict=True)))
        return joined.select(torch.sort(joined.image, stable=True).indices)

    def split(self, batch: int) -> list[dict[str, Tensor]]:
        counts = torch.bincount(self.image, minlength=batch).tolist()
        parts = zip(*(t.split(counts) for t in self[1:]), strict=True)
        return [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in parts]


def as_indices(index: Tensor) -> Tensor:
    """int64 indices of a bool mask; int64 indices unchanged."""
    return index.nonzero()[:, 0] if index.dtype == torch.bool else index


def class_scores(logits: Tensor, threshold: float) -> ClassScores:
    """Softmax scores of the anchors where a class can score above ``threshold``.

    Exact: softmax_c = exp(l_c - M) / sum_k exp(l_k - M) <= exp(l_c - M) <= exp(l_c - l_0),
    with M the row maximum (the sum holds exp(0) = 1) and l_0 the background logit, so an
    anchor whose best class logit is below l_0 + log(threshold) holds no candidate (the margin
    covers rounding). Softmax is row-wise, so the rows kept get the scores, bitwise, of
    ``softmax(logits)``. All rows are kept when a sample of them says most would be.

    Shape:
        logits: (B, A, C) float32 -> ClassScores with r rows
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*A, C)
    row = None
    if threshold > 0.0:
        limit = math.log(threshold) - 1e-3

        def can_pass(x: Tensor) -> Tensor:
            return row_max(x[:, 1:]) > x[:, 0] + limit

        sample = flat[:: max(1, len(flat) // 1024)]
        if 2 * int(can_pass(sample).sum()) < len(sample):  # mostly background: gather
            row = can_pass(flat).nonzero()[:, 0]
            flat = flat.index_select(0, row)
    values = flat.softmax(dim=-1)
    best = row_max(values[:, 1:])
    values[:, 0] = -math.inf
    return ClassScores(row, values, best)


def row_max(x: Tensor) -> Tensor:
    """Maximum of every row: ``amax(dim=1)``, by halving the columns when they are few.

    On CPU, ``amax`` over a short last dimension does not vectorise: 6.6 ms for 279k rows of
    20 (SSD300, 21 classes, batch 32) against 3.6 ms for these elementwise maxima. Above 32
    columns ``amax`` is faster.

    Shape:
        x: (n, c) -> (n,)
    """
    if x.shape[1] > 32:
        return x.amax(dim=1)
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        top = torch.maximum(x[:, :half], x[:, half : 2 * half])
        if x.shape[1] % 2:
            top[:, 0] = torch.maximum(top[:, 0], x[:, -1])
        x = top
    return x[:, 0]


def best_pairs(
    scores: ClassScores, images: Tensor, m: int, threshold: float, num_anchors: int
) -> tuple[Tensor, Tensor]:
    """The best pairs of the selected images: those scoring above the best score t of the
    image's (m+1)-th best anchor (and above ``threshold``).

    An anchor holding a pair above t has a best score above t, so it is one of the image's m
    best anchors: gathering their pairs above t finds every pair of the image above t (at
    least m of them: each of the m anchors' best, barring ties), and every pair left out
    scores at most t, below all those found.

    Returns:
        Flat indices into ``scores.values``, and which images have pairs above the threshold
        left out.

    Shape:
        images: (B,) bool -> (n,), (B,) bool
    """
    batch, num_classes = len(images), scores.values.shape[1]
    best = scores.best
    if scores.row is not None:  # to the (B * A,) layout
        best = best.new_full((batch * num_anchors,), -math.inf).index_copy_(0, scores.row, best)
    index = images.nonzero()[:, 0]  # (b,)
    per_image = best.view(batch, num_anchors).index_select(0, index)  # (b, A)
    top_best, anchor = per_image.topk(min(m + 1, num_anchors), dim=1, sorted=False)
    limit = torch.full_like(top_best[:, 0], threshold)  # (b,)
    if top_best.shape[1] > m:
        limit = limit.maximum(top_best.amin(dim=1))  # the (m+1)-th best
    rows = index[:, None] * num_anchors + anchor  # (b, k) flat anchor index
    if scores.row is not None:  # to the row of each anchor (others: best -inf, masked below)
        row_of = torch.zeros(batch * num_anchors, dtype=torch.long, device=rows.device)
        row_of[scores.row] = torch.arange(len(scores.row), device=rows.device)
        rows = row_of.index_select(0, rows.view(-1)).view(rows.shape)
    values = scores.values.index_select(0, rows.view(-1)).view(*rows.shape, num_classes)
    above = (values > limit[:, None, None]) & (top_best > limit[:, None])[..., None]
    pair = above.view(-1).nonzero()[:, 0]  # into (b, k, C)
    row = rows.view(-1).index_select(0, torch.div(pair, num_classes, rounding_mode="floor"))
    left_out = torch.zeros_like(images)
    left_out[index] = limit > threshold
    return row * num_classes + pair % num_classes, left_out


def best_per_group(group: Tensor, score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring entries of every group, by group then decreasing score.

    Returns:
        ``order`` the indices of those entries and ``group[order]``.

    Shape:
        group: (n,) int64 >= 0; score: (n,) float32 >= 0 -> (k,), (k,)
    """
    if len(group) == 0:
        return group, group
    sorted_group, order = sort_by_group_and_score(group, score)
    top = (rank_in_groups(sorted_group, int(sorted_group[-1]) + 1) < k).nonzero()[:, 0]
    return order.index_select(0, top), sorted_group.index_select(0, top)


def sort_by_group_and_score(group: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Order by increasing group, then decreasing score, with one integer sort.

    A float32 score >= 0 read as int32 grows with the score, so (group, -score) packs into one
    int64 key; integer sorts (radix) are several times faster than float sorts on CPU.

    Returns:
        The sorted groups and the permutation.

    Shape:
        group: (n,) int64 >= 0; score: (n,) float32 >= 0 -> (n,), (n,)
    """
    bits = score.contiguous().view(torch.int32).long()
    key, order = torch.sort(group * 2**31 + (2**31 - 1 - bits))
    return torch.div(key, 2**31, rounding_mode="floor"), order


def rank_in_groups(group: Tensor, num_groups: int) -> Tensor:
    """Position of every entry within its group; ``group`` sorted (groups contiguous).

    Shape:
        group: (n,) int64 in [0, num_groups) -> (n,) int64
    """
    counts = torch.bincount(group, minlength=num_groups)
    first = torch.cumsum(counts, 0) - counts  # (num_groups,) start of each group
    return torch.arange(len(group), device=group.device) - first.index_select(0, group)


def grouped_nms(
    boxes: Tensor, scores: Tensor, group: Tensor, iou_threshold: float, chunk: int = 256
) -> Tensor:
    """NMS within each group; ``group`` sorted (groups contiguous).

    Groups are packed into slices of about ``chunk`` boxes (a group never straddles two) and
    each slice is one ``torchvision.ops.nms`` call on boxes offset by group, so boxes of two
    groups never overlap (torchvision's coordinate trick); float64, as the offsets reach
    group * max coordinate, beyond float32 precision.

    Why slices: torchvision's CPU NMS compares every box it keeps with every later box of the
    call (~2.4 ns each) and a call costs ~20-50 us of small tensor ops. One call per image is
    as good while an image sends a few hundred boxes, but grows with kept x boxes when it sends
    thousands (most pairs compared are of different classes); one call per group, and
    ``batched_nms`` (on CPU above 1,000 boxes: a Python loop over groups, each scanning all
    boxes), pay the call cost hundreds of times per batch. Measured at batch 32, SSD300, one
    thread (ms; "first": the candidates that enter NMS first, <= ~600 per image; "all": every
    candidate):

        outputs, boxes sent          256-box slices  per image  per group  batched_nms
        random 21 classes, first          10.8         15.8        23.4        57.8
        trained-like 91, first             8.7         10.5        25.0        54.5
        trained-like 21, first             8.0          8.1        15.6        34.2
        trained-like 91, all              23.8         80.3        42.5       107.3
        trained-like 21, all              63.8        197.9        67.1       171.7

    Returns:
        Indices of the boxes kept, by slice then decreasing score.

    Shape:
        boxes: (n, 4) xyxy; scores: (n,); group: (n,) int64 -> (k,)
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.double()
    scores = scores.double()
    boxes = boxes + (group.double() * (boxes.max() + 1.0))[:, None]
    position = torch.arange(len(group), device=group.device)
    start = position - rank_in_groups(group, int(group[-1]) + 1)  # (n,) start of the box's group
    slice_id = torch.div(start, chunk, rounding_mode="floor")
    ends = [*((slice_id[1:] != slice_id[:-1]).nonzero()[:, 0] + 1).tolist(), len(boxes)]
    keep, begin = [], 0
    for end in ends:
        keep.append(nms(boxes[begin:end], scores[begin:end], iou_threshold) + begin)
        begin = end
    return torch.cat(keep)
