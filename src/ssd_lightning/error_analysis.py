"""Where a detector fails: per-class precision-recall curves and a confusion matrix.

Both come from one COCO evaluation (:class:`~ssd_lightning.coco_eval.COCOCurves`), so nothing
is evaluated or gathered twice: the PR curves are slices of its precision array, and the
confusion matrix is computed from its detection and ground-truth rows (``[image_id, x, y, w, h,
score | iscrowd, label]``, already gathered from every DDP rank).

Confusion matrix ``matrix[true, predicted]`` (counts), indexed by label: 0 is background,
label k (1..C-1) is ``class_names[k - 1]``.

- A detection matched to a GT object counts at ``[GT label, detection label]`` (the diagonal
  when the class is right, a confusion otherwise).
- A detection matched to nothing is a false positive: ``[0, detection label]`` (background row).
  A second detection of an already matched object is one too, as in AP.
- A GT object no detection matched is missed: ``[GT label, 0]`` (background column).
- ``[0, 0]`` (true negatives) is always 0.

Matching rule, per image, at ``score_threshold`` and ``iou_threshold`` (0.3 and 0.5 by default):

1. The detections scoring >= ``score_threshold``, in decreasing score order (ties: row order).
2. Each takes the still unmatched non-crowd GT object of highest IoU, if that IoU is >=
   ``iou_threshold``, whatever the classes of both: a confusion is a detection of the wrong
   class on an object, and whichever detection scores higher gets the object.
3. A detection left unmatched is ignored (counted nowhere) when it lies in a crowd / difficult
   region: its intersection with a crowd box covers >= ``iou_threshold`` of its own area
   (COCO's crowd rule, the one the AP figures use). Crowd / difficult objects are never missed.

It differs from COCO's AP matching in that class is ignored (COCO matches within a class) and
every detection above the threshold counts (COCO keeps 100 per image and class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ssd_lightning.coco_eval import COCOCurves

# match_detections codes for detections matched to no GT row.
FALSE_POSITIVE = -1
IGNORED = -2  # in a crowd / difficult region
BELOW_THRESHOLD = -3
_CHUNK_PAIRS = 1 << 16  # (detection, GT) pairs held at once: cache-sized, faster than larger


def match_detections(
    dets: np.ndarray,
    gts: np.ndarray,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """The GT row each detection is matched to by the greedy rule of the module docstring.

    Vectorised over images: images are independent, so step r of the loop matches the r-th
    detection (by score) of every image at once, which is exactly the sequential rule's step r
    in each image; the loop runs over detection ranks (at most the detections per image), not
    detections. Only the (detection, GT) pairs of one image with IoU >= ``iou_threshold`` take
    part; all pairs of an image are enumerated chunk by chunk (``_CHUNK_PAIRS`` at a time).

    Args:
        dets: Detection rows ``[image_id, x, y, w, h, score, label]``.
        gts: Ground-truth rows ``[image_id, x, y, w, h, iscrowd, label]``.
        score_threshold: Detections scoring lower take no part.
        iou_threshold: Lowest IoU of a match (and lowest crowd coverage of an ignored detection).

    Returns:
        Per detection the index of its GT row, or ``FALSE_POSITIVE``, ``IGNORED`` (unmatched,
        in a crowd region) or ``BELOW_THRESHOLD``.

    Shape:
        dets: (N, 7), gts: (G, 7) -> (N,) int64
    """
    if not 0 < iou_threshold <= 1:  # a match needs boxes that intersect
        raise ValueError(f"iou_threshold={iou_threshold}: use a value in (0, 1]")
    match = np.full(len(dets), BELOW_THRESHOLD, dtype=np.int64)
    kept = np.flatnonzero(dets[:, 5] >= score_threshold)
    # Detections by image, then decreasing score, then row (lexsort is stable).
    order = kept[np.lexsort((-dets[kept, 5], dets[kept, 0]))]
    det_image = dets[order, 0]
    rank = np.arange(len(order)) - np.searchsorted(det_image, det_image, side="left")
    det_boxes, gt_boxes = _Boxes(dets[order]), _Boxes(gts)
    crowd = gts[:, 5] > 0
    plain = np.flatnonzero(~crowd)
    pair_det, pair_gt, inter = _overlapping_pairs(det_boxes, gt_boxes, det_image, gts, plain)
    union = det_boxes.area[pair_det] + gt_boxes.area[pair_gt] - inter
    iou = inter / union  # union >= inter > 0
    candidate = iou >= iou_threshold
    pair_det, pair_gt, iou = pair_det[candidate], pair_gt[candidate], iou[candidate]
    # Candidates of one rank together; within a detection, highest IoU first (ties: GT row).
    sort = np.lexsort((pair_gt, -iou, pair_det, rank[pair_det]))
    pair_det, pair_gt = pair_det[sort], pair_gt[sort]
    bounds = np.searchsorted(rank[pair_det], np.arange(int(rank.max(initial=-1)) + 2))
    matched = np.full(len(order), FALSE_POSITIVE, dtype=np.int64)
    taken = np.zeros(len(gts), dtype=bool)
    for start, end in pairwise(bounds.tolist()):
        # One detection per image here, so no two of them compete for a GT object.
        free = ~taken[pair_gt[start:end]]
        det, gt = pair_det[start:end][free], pair_gt[start:end][free]
        best = np.ones(len(det), dtype=bool)  # each detection's first free candidate
        best[1:] = det[1:] != det[:-1]
        matched[det[best]] = gt[best]
        taken[gt[best]] = True
    # Unmatched detections a crowd box covers by >= iou_threshold of their own area: ignored.
    unmatched = matched == FALSE_POSITIVE
    crowd_det, _, inter = _overlapping_pairs(
        det_boxes, gt_boxes, det_image, gts, np.flatnonzero(crowd), unmatched
    )
    covered = crowd_det[inter / det_boxes.area[crowd_det] >= iou_threshold]  # area >= inter > 0
    matched[covered] = IGNORED
    match[order] = matched
    return match


class _Boxes:
    """Corner and area columns of ``xywh`` rows (contiguous, for gathering pair by pair)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.x1, self.y1 = rows[:, 1].copy(), rows[:, 2].copy()
        self.x2, self.y2 = self.x1 + rows[:, 3], self.y1 + rows[:, 4]
        self.area = rows[:, 3] * rows[:, 4]


def _overlapping_pairs(
    dets: _Boxes,
    gts: _Boxes,
    det_image: np.ndarray,
    gt_rows: np.ndarray,
    gt_subset: np.ndarray,
    det_subset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (detection, GT) pairs of one image whose boxes intersect, with the intersection.

    Args:
        dets: Detection boxes, sorted by image (``det_image``).
        gts: Ground-truth boxes; ``gt_rows`` their rows (for the image ids).
        gt_subset: The GT rows to pair with.
        det_subset: Optional (n,) bool mask of the detections to pair.

    Pairs are enumerated chunk by chunk, at most ``_CHUNK_PAIRS`` (or one detection's) at once.

    Shape:
        det_image: (n,) -> pair_det, pair_gt, intersection: (P,)
    """
    gt_order = gt_subset[np.argsort(gt_rows[gt_subset, 0], kind="stable")]
    gt_image = gt_rows[gt_order, 0]
    first = np.searchsorted(gt_image, det_image, side="left")
    count = np.searchsorted(gt_image, det_image, side="right") - first  # GT rows per detection
    if det_subset is not None:
        count = np.where(det_subset, count, 0)
    ends = np.cumsum(count)
    found = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))]
    lo = int(np.searchsorted(ends, 0, side="right"))  # detections without GT rows skipped
    while lo < len(det_image):
        base = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, base + _CHUNK_PAIRS, side="right")), lo + 1)
        det = np.repeat(np.arange(lo, hi), count[lo:hi])
        offset = np.arange(len(det)) - np.repeat(ends[lo:hi] - count[lo:hi] - base, count[lo:hi])
        gt = gt_order[first[det] + offset]
        # Width first: most pairs of an image do not overlap in x, and drop out before y.
        width = np.minimum(dets.x2[det], gts.x2[gt]) - np.maximum(dets.x1[det], gts.x1[gt])
        keep = width > 0
        det, gt, width = det[keep], gt[keep], width[keep]
        height = np.minimum(dets.y2[det], gts.y2[gt]) - np.maximum(dets.y1[det], gts.y1[gt])
        keep = height > 0
        found.append((det[keep], gt[keep], width[keep] * height[keep]))
        lo = hi
    pair_det, pair_gt, inter = (np.concatenate(column) for column in zip(*found, strict=True))
    return pair_det, pair_gt, inter


def confusion_matrix(
    dets: np.ndarray,
    gts: np.ndarray,
    num_classes: int,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Counts ``[true label, predicted label]`` with background 0 (see the module docstring).

    Args:
        dets: Detection rows ``[image_id, x, y, w, h, score, label]``.
        gts: Ground-truth rows ``[image_id, x, y, w, h, iscrowd, label]``.
        num_classes: Number of classes including background; labels are 1..num_classes-1.
        score_threshold: Lowest score of a counted detection.
        iou_threshold: Lowest IoU of a match.

    Shape:
        dets: (N, 7), gts: (G, 7) -> (num_classes, num_classes) int64
    """
    det_labels, gt_labels = dets[:, 6].astype(np.int64), gts[:, 6].astype(np.int64)
    for what, labels in (("detection", det_labels), ("ground-truth", gt_labels)):
        bad = (labels < 1) | (labels >= num_classes)
        if bad.any():
            raise ValueError(
                f"{what} label {int(labels[bad][0])} outside 1..{num_classes - 1} "
                f"(num_classes={num_classes} counts background)"
            )
    match = match_detections(dets, gts, score_threshold, iou_threshold)
    matched = match >= 0
    missed = np.ones(len(gts), dtype=bool)
    missed[match[matched]] = False
    missed &= gts[:, 5] <= 0  # crowd objects are never missed
    true = np.concatenate(
        [
            gt_labels[match[matched]],
            np.zeros(int((match == FALSE_POSITIVE).sum()), dtype=np.int64),
            gt_labels[missed],
        ]
    )
    predicted = np.concatenate(
        [
            det_labels[matched],
            det_labels[match == FALSE_POSITIVE],
            np.zeros(int(missed.sum()), dtype=np.int64),
        ]
    )
    flat = np.bincount(true * num_classes + predicted, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the objects of that true class; for the background row, the
    false positives); NaN for an empty row. Shape: (C, C) -> (C, C) float64"""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, totals, out=np.full(matrix.shape, np.nan), where=totals > 0)


@dataclass(frozen=True)
class PRCurves:
    """Per-class precision-recall curves of a COCO evaluation (area all, 100 detections).

    Attributes:
        recall: COCO's 101 recall points.
        precision_50: Interpolated precision at IoU 0.5, per class label 1..C-1 (row k-1); NaN
            for a class without ground truth.
        precision: The same averaged over IoU 0.50:0.05:0.95.
        scores_50: Detection score at which each ``precision_50`` point is reached.

    Shape:
        recall: (R,); precision_50, precision, scores_50: (C-1, R)
    """

    recall: np.ndarray
    precision_50: np.ndarray
    precision: np.ndarray
    scores_50: np.ndarray

    @property
    def ap_50(self) -> np.ndarray:
        """AP at IoU 0.5 per class (the mean of its curve; NaN without ground truth)."""
        return self.precision_50.mean(axis=1)

    @property
    def ap(self) -> np.ndarray:
        """AP@[.5:.95] per class, equal to ``COCOCurves.per_class_ap``."""
        return self.precision.mean(axis=1)


def pr_curves(curves: COCOCurves, num_classes: int) -> PRCurves:
    """Slices of the evaluation's precision and score arrays; classes it did not evaluate
    (without ground truth, or absent from the torchmetrics backend's K axis) are NaN."""
    # COCOeval's precision (T, R, K, A, M) at area "all" (A=0) and 100 detections (M=-1).
    precision = curves.precision[:, :, :, 0, -1]  # (T, R, K)
    scores = curves.scores[0, :, :, 0, -1]  # (R, K) at IoU 0.5
    shape = (num_classes - 1, len(curves.recall_thresholds))
    out = {name: np.full(shape, np.nan) for name in ("precision_50", "precision", "scores_50")}
    for k, label in enumerate(curves.labels.tolist()):
        if 1 <= label < num_classes and (precision[:, :, k] > -1).all():
            out["precision_50"][label - 1] = precision[0, :, k]
            out["precision"][label - 1] = precision[:, :, k].mean(axis=0)
            out["scores_50"][label - 1] = scores[:, k]
    return PRCurves(recall=np.asarray(curves.recall_thresholds), **out)


@dataclass(frozen=True)
class ConfusedPair:
    """Objects of class ``true`` detected as class ``predicted``: ``count`` of them, the
    ``fraction`` of that class's (non-crowd) objects."""

    true: str
    predicted: str
    count: int
    fraction: float


@dataclass(frozen=True)
class ErrorAnalysis:
    """PR curves and confusion matrix of one evaluation.

    Attributes:
        class_names: Foreground names; label k is ``class_names[k - 1]``.
        matrix: Confusion counts ``[true label, predicted label]``, background 0.
        curves: Per-class PR curves.
        score_threshold: Lowest score of a detection counted in the matrix.
        iou_threshold: Lowest IoU of a match in the matrix.

    Shape:
        matrix: (C, C) with C = len(class_names) + 1
    """

    class_names: list[str]
    matrix: np.ndarray
    curves: PRCurves
    score_threshold: float
    iou_threshold: float

    @property
    def labels(self) -> list[str]:
        """Row / column names of the matrix: ``background`` then the classes."""
        return ["background", *self.class_names]

    def worst_classes(self, top: int = 5) -> list[tuple[str, float, float]]:
        """``(name, AP, AP_50)`` of the ``top`` classes of lowest AP@[.5:.95] (classes without
        ground truth left out), lowest first."""
        ap, ap_50 = self.curves.ap, self.curves.ap_50
        defined = np.flatnonzero(~np.isnan(ap))
        order = defined[np.argsort(ap[defined], kind="stable")][:top]
        return [(self.class_names[k], float(ap[k]), float(ap_50[k])) for k in order]

    def confused_pairs(self, top: int = 5) -> list[ConfusedPair]:
        """The ``top`` most frequent (true class, other predicted class) pairs, background
        left out, most frequent first (ties: larger fraction first)."""
        counts = self.matrix[1:, 1:].copy()
        np.fill_diagonal(counts, 0)
        fractions = normalise_rows(self.matrix)[1:, 1:]
        true, predicted = np.nonzero(counts)
        order = np.lexsort((-fractions[true, predicted], -counts[true, predicted]))[:top]
        return [
            ConfusedPair(
                self.class_names[t],
                self.class_names[p],
                int(counts[t, p]),
                float(fractions[t, p]),
            )
            for t, p in zip(true[order], predicted[order], strict=True)
        ]


def analyse(
    curves: COCOCurves,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> ErrorAnalysis:
    """PR curves and confusion matrix of an evaluation, from its arrays alone."""
    num_classes = len(class_names) + 1
    return ErrorAnalysis(
        class_names=list(class_names),
        matrix=confusion_matrix(
            curves.dets, curves.gts, num_classes, score_threshold, iou_threshold
        ),
        curves=pr_curves(curves, num_classes),
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
    )
