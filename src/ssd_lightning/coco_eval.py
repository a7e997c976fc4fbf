"""COCO box AP/AR over a whole evaluation set, from tensors, synced once under DDP.

Every box of an evaluation is kept as one row of faster_coco_eval's result-array layout,
``[image_id, x, y, w, h, value, label]`` (float64, ``xywh`` pixels), where ``value`` is the score
of a detection and the crowd flag of a ground-truth object. ``update`` appends one such
(n, 7) tensor per batch for the detections and one for the ground truth, on the device the
batch came from; nothing is converted per box and nothing is synced per batch.

``compute`` gathers the rows of all DDP ranks once (the per-rank row and image counts, then
the rows, so ranks may have seen different numbers of images), shifts each rank's image ids by
the image counts of the ranks before it, and evaluates everything on every rank, so all ranks
return the same figures. Images with neither boxes nor detections (e.g. padding) change nothing.
The gathered rows are returned with the figures (``COCOCurves.dets`` / ``gts``), so later
analyses (:mod:`ssd_lightning.error_analysis`) need no second gather.

Evaluation is faster_coco_eval's ``COCOeval_faster`` (C++ matching and accumulation, the same
rules as pycocotools: 10 IoU thresholds .50:.05:.95, 101 recall points, areas all / small /
medium / large, maxDets 1 / 10 / 100 per image and class). Both COCO objects come from the arrays
through ``COCO.loadRes``: the detections directly, the ground truth with its crowd flag in the
score column, written back as ``iscrowd`` for the crowd rows only. Areas are box areas
(``w * h``), as for any box-only ground truth. ``backend="torchmetrics"`` sends the same
gathered rows through torchmetrics' ``MeanAveragePrecision`` instead (much slower: it converts
box by box); it is kept as an independent cross-check.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor

# Names of COCOeval's 12 summary statistics, in its order.
STAT_KEYS = (
    "mAP",
    "mAP_50",
    "mAP_75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR_1",
    "AR_10",
    "AR_100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
# pycocotools' thresholds, float64 (torchmetrics' own defaults are float32: its recall point
# 0.6 is 0.6000000238 and misses a recall of exactly 3/5, which shifts APs by up to ~1e-3).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = ("all", "small", "medium", "large")
MAX_DETS = (1, 10, 100)
BACKENDS = ("faster_coco_eval", "torchmetrics")


@dataclass(frozen=True)
class COCOCurves:
    """Accumulated COCO evaluation: summary statistics and the arrays behind them.

    Attributes:
        stats: The 12 summary statistics, named by ``STAT_KEYS`` (-1 = undefined).
        precision: Interpolated precision at each recall threshold (-1 where the class has no
            ground truth in that area range).
        recall: Highest recall reached.
        scores: Detection score at which each precision entry is reached.
        labels: Class label of each K index.
        iou_thresholds: (T,) IoU thresholds.
        recall_thresholds: (R,) recall thresholds.
        dets: The evaluated detection rows ``[image_id, x, y, w, h, score, label]`` of every
            rank (image ids made unique), e.g. for a confusion matrix without a second gather.
        gts: The ground-truth rows ``[image_id, x, y, w, h, iscrowd, label]``, likewise.

    Shape:
        stats: (12,); precision, scores: (T, R, K, A, M); recall: (T, K, A, M); labels: (K,),
        with T = 10 IoU thresholds, R = 101 recall points, K classes, A = 4 ``AREA_RANGES``,
        M = 3 ``MAX_DETS``; dets: (N, 7), gts: (G, 7) float64.
    """

    stats: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    dets: np.ndarray
    gts: np.ndarray

    def summary(self) -> dict[str, float]:
        """The 12 statistics as ``STAT_KEYS`` name -> float."""
        return {key: float(value) for key, value in zip(STAT_KEYS, self.stats, strict=True)}

    def per_class_ap(self) -> dict[int, float]:
        """AP@[.5:.95] (area all, 100 detections) of each class label; -1 without ground truth."""
        aps = {}
        for k, label in enumerate(self.labels.tolist()):
            curve = self.precision[:, :, k, 0, -1]
            defined = curve[curve > -1]
            aps[int(label)] = float(defined.mean()) if defined.size else -1.0
        return aps


def batch_rows(
    boxes: Sequence[Tensor], values: Sequence[Tensor], labels: Sequence[Tensor], first_image: int
) -> Tensor:
    """The boxes of a batch of images as result-array rows, images numbered from ``first_image``.

    Args:
        boxes: Per image (n_i, 4) ``xyxy`` pixels.
        values: Per image (n_i,) scores (detections) or crowd flags (ground truth).
        labels: Per image (n_i,) class labels.
        first_image: Image id of the first image of the batch.

    Returns:
        Rows ``[image_id, x, y, w, h, value, label]`` on the device of ``boxes[0]``.

    Shape:
        (sum n_i, 7) float64
    """
    device = boxes[0].device
    # Filled on the device (no host-to-device copy, so a CUDA batch is not synchronised).
    image_ids = torch.cat(
        [
            torch.full((len(lab),), float(first_image + i), dtype=torch.float64, device=device)
            for i, lab in enumerate(labels)
        ]
    )
    xyxy = torch.cat([b.reshape(-1, 4).to(device, torch.float64) for b in boxes])
    columns = [
        image_ids[:, None],
        xyxy[:, :2],
        xyxy[:, 2:] - xyxy[:, :2],
        torch.cat([v.to(device, torch.float64) for v in values])[:, None],
        torch.cat([lab.to(device, torch.float64) for lab in labels])[:, None],
    ]
    return torch.cat(columns, dim=1)


class COCOEvaluator:
    """COCO AP/AR of detections against ground truth, accumulated over batches.

    Args:
        labels: Class labels to evaluate (e.g. 1..C-1); detections of other labels are ignored.
        backend: ``faster_coco_eval`` (default) or ``torchmetrics`` (slow cross-check).

    ``update(preds, targets)`` takes per-image dicts: ``preds`` with ``boxes`` (n, 4) ``xyxy``
    pixels, ``scores`` (n,) and ``labels`` (n,); ``targets`` with ``boxes``, ``labels`` and
    optional ``difficult`` (n,) bool, evaluated as COCO ``iscrowd`` (ignored). ``compute()``
    gathers all DDP ranks and returns :class:`COCOCurves`.
    """

    def __init__(self, labels: Sequence[int], backend: str = "faster_coco_eval") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
        self.labels = [int(k) for k in labels]
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        self.num_images = 0
        self._dets: list[Tensor] = []
        self._gts: list[Tensor] = []

    def update(
        self, preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> None:
        """Append one batch of per-image predictions and ground truth."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        if not preds:
            return
        crowd = [
            t.get("difficult", torch.zeros_like(t["labels"], dtype=torch.bool)) for t in targets
        ]
        self._dets.append(
            batch_rows(
                [p["boxes"] for p in preds],
                [p["scores"] for p in preds],
                [p["labels"] for p in preds],
                self.num_images,
            )
        )
        self._gts.append(
            batch_rows(
                [t["boxes"] for t in targets],
                crowd,
                [t["labels"] for t in targets],
                self.num_images,
            )
        )
        self.num_images += len(preds)

    def compute(self) -> COCOCurves:
        """Evaluate everything seen by every rank (a collective call under DDP)."""
        dets, gts, num_images = gather_rows(
            _cat_rows(self._dets), _cat_rows(self._gts), self.num_images
        )
        evaluate = evaluate_rows if self.backend == "faster_coco_eval" else torchmetrics_rows
        return evaluate(dets, gts, num_images, self.labels)


def _cat_rows(rows: list[Tensor]) -> Tensor:
    return torch.cat(rows) if rows else torch.zeros(0, 7, dtype=torch.float64)


def gather_rows(dets: Tensor, gts: Tensor, num_images: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Detection and ground-truth rows of all ranks, image ids made unique, as numpy arrays.

    Two collectives: the (detections, ground truth, images) counts of every rank, then every
    rank's rows padded to the longest. Rank r's image ids are shifted by the images of ranks
    0..r-1. Without an initialised process group (or with one process) the rows are returned
    as they are.

    Shape:
        dets: (N, 7), gts: (G, 7) -> (N_all, 7), (G_all, 7) float64
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dets.cpu().numpy(), gts.cpu().numpy(), num_images
    device = _collective_device()
    world = dist.get_world_size()
    counts = torch.tensor([len(dets), len(gts), num_images], device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    sizes = torch.stack(all_counts).cpu().tolist()  # (world, 3)
    longest = max(n + g for n, g, _ in sizes)
    if longest == 0:  # every rank knows: none gathers
        return dets.cpu().numpy(), gts.cpu().numpy(), sum(images for *_, images in sizes)
    local = torch.zeros(longest, 7, dtype=torch.float64, device=device)
    local[: len(dets) + len(gts)] = torch.cat([dets.to(device), gts.to(device)])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    all_dets, all_gts, first_image = [], [], 0
    for rows, (n, g, images) in zip(gathered, sizes, strict=True):
        rows = rows[: n + g].cpu().numpy()
        rows[:, 0] += first_image
        all_dets.append(rows[:n])
        all_gts.append(rows[n:])
        first_image += images
    return np.concatenate(all_dets), np.concatenate(all_gts), first_image


def _collective_device() -> torch.device:
    """The device collectives of the default process group run on (NCCL needs CUDA)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def evaluate_rows(
    dets: np.ndarray, gts: np.ndarray, num_images: int, labels: Sequence[int]
) -> COCOCurves:
    """COCO evaluation of result-array rows with faster_coco_eval's ``COCOeval_faster``.

    Args:
        dets: Detection rows ``[image_id, x, y, w, h, score, label]``.
        gts: Ground-truth rows ``[image_id, x, y, w, h, iscrowd, label]``.
        num_images: Images 0..num_images-1 were evaluated (also those without any row).
        labels: Class labels to evaluate.

    Shape:
        dets: (N, 7), gts: (G, 7) float64
    """
    with _gc_paused():
        return _evaluate_with_faster_coco_eval(dets, gts, num_images, labels)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block.

    faster_coco_eval holds every annotation as a Python dict (its C++ core reads them); building
    hundreds of thousands of them otherwise triggers collections that traverse all of them again
    and again. They form no reference cycles: reference counting frees them when the evaluation
    returns, collector or not.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _evaluate_with_faster_coco_eval(
    dets: np.ndarray, gts: np.ndarray, num_images: int, labels: Sequence[int]
) -> COCOCurves:
    base = COCO()
    base.dataset = {
        "images": [{"id": i} for i in range(num_images)],
        "categories": [{"id": k} for k in labels],
    }
    base.createIndex()
    coco_gt = base.loadRes(gts)  # iscrowd=0 everywhere, ids 1..G in row order
    annotations = coco_gt.dataset["annotations"]
    for row in np.flatnonzero(gts[:, 5] > 0):
        annotations[row]["iscrowd"] = 1
    coco_dt = coco_gt.loadRes(dets)
    coco_eval = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_silent)
    coco_eval.params.catIds = list(labels)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    result = coco_eval.eval
    return COCOCurves(
        stats=np.asarray(coco_eval.stats, dtype=np.float64),
        precision=result["precision"],
        recall=result["recall"],
        scores=result["scores"],
        labels=np.asarray(coco_eval.params.catIds, dtype=np.int64),
        iou_thresholds=np.asarray(coco_eval.params.iouThrs),
        recall_thresholds=np.asarray(coco_eval.params.recThrs),
        dets=dets,
        gts=gts,
    )


def _silent(*args: object, **kwargs: object) -> None:
    """faster_coco_eval's progress printer, switched off."""


def torchmetrics_rows(
    dets: np.ndarray, gts: np.ndarray, num_images: int, labels: Sequence[int]
) -> COCOCurves:
    """The same evaluation as :func:`evaluate_rows` through torchmetrics' MeanAveragePrecision.

    torchmetrics takes one dict per image; its K axis holds only the classes that occur in
    detections or ground truth (``labels`` restricts the detections as in
    :func:`evaluate_rows`).
    """
    from torchmetrics.detection import MeanAveragePrecision

    evaluated_dets = dets[np.isin(dets[:, 6], labels)]
    evaluated_gts = gts[np.isin(gts[:, 6], labels)]
    metric = MeanAveragePrecision(
        box_format="xywh",
        iou_thresholds=IOU_THRESHOLDS.tolist(),
        rec_thresholds=RECALL_THRESHOLDS.tolist(),
        class_metrics=True,
        extended_summary=True,
        sync_on_compute=False,
    )
    metric.warn_on_many_detections = False
    preds = [
        {"boxes": r[:, 1:5], "scores": r[:, 5], "labels": r[:, 6].long()}
        for r in _per_image(evaluated_dets, num_images)
    ]
    targets = [
        {"boxes": r[:, 1:5], "iscrowd": r[:, 5].long(), "labels": r[:, 6].long()}
        for r in _per_image(evaluated_gts, num_images)
    ]
    metric.update(preds, targets)
    out = metric.compute()
    stat_names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    stat_names += ("mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
    return COCOCurves(
        stats=np.array([float(out[name]) for name in stat_names]),
        precision=out["precision"].numpy(),
        recall=out["recall"].numpy(),
        scores=out["scores"].numpy(),
        labels=out["classes"].reshape(-1).numpy().astype(np.int64),
        iou_thresholds=IOU_THRESHOLDS,
        recall_thresholds=RECALL_THRESHOLDS,
        dets=dets,
        gts=gts,
    )


def _per_image(rows: np.ndarray, num_images: int) -> list[Tensor]:
    """Rows split by image id 0..num_images-1, as tensors."""
    if num_images == 0:
        return []
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    ends = np.searchsorted(rows[:, 0], np.arange(num_images), side="right")
    return list(torch.from_numpy(rows).tensor_split(torch.from_numpy(ends[:-1])))
