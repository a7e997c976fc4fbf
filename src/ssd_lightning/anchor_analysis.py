"""Anchor coverage analysis: are the default boxes right for a dataset's boxes?

Before any training, every ground-truth box (after the eval resize: normalised to the network
input) meets the default boxes exactly as the SSD matching would (SSD paper, Sec. 2.2 "Matching
strategy", through ``SSDBoxCoder.match``). Per GT box this records:

- the best IoU with any default box, and the feature map holding that box. A GT box is *covered*
  when that IoU reaches the matching threshold: it has a positive beyond the one the bipartite
  step forces onto every GT box however badly it fits;
- its positives (forced one included) after the full matching of its image, per feature map.

Summaries split these by COCO object size (area in ORIGINAL pixels: small < 32^2 <= medium
< 96^2 <= large) and by feature map. ``suggest_scales`` grid-searches s_min / s_max (SSD paper,
Eq. 4) for the highest coverage. The best IoU comes from ``grid_iou_stats``: exact, from the grid
layout of the default boxes, ~20x faster than the IoU matrix, which makes that search cheap.
Only boxes and image sizes are needed, never the images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder

SIZE_NAMES = ("small", "medium", "large")
SIZE_AREA_LIMITS = (32.0**2, 96.0**2)  # COCO area ranges, original pixels
# Histogram bins of positives per GT box: (label, low, high inclusive).
POSITIVE_BINS = (("0", 0, 0), ("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-9", 5, 9),
                 ("10-19", 10, 19), ("20+", 20, None))  # fmt: skip
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
S_MIN_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
S_MAX_GRID = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
MAX_IOU_ELEMENTS = 2**24  # IoU entries per batch (64 MiB of float32)
GRID_CHUNK = 4096  # GT boxes per chunk of grid_iou_stats

Objective = Literal["coverage", "iou"]


@dataclass(frozen=True)
class CoverageReport:
    """How the GT boxes of a dataset meet one set of default boxes (one entry per GT box).

    Attributes:
        name: Label of the anchor configuration (a table column).
        iou_threshold: Matching threshold the positives and coverage refer to.
        anchors: ``DefaultBoxes.settings()`` of the analysed default boxes.
        num_images: Images analysed (with or without GT boxes).
        num_defaults: Number A of default boxes.
        anchor_shapes: Per feature map, the (width, height) of the boxes of one cell in
            network-input pixels, shape (boxes_per_location[k], 2).
        best_iou: Best IoU of every GT box with any default box. Shape (N,).
        best_map: Feature map of that default box. Shape (N,), int64.
        positives_per_map: Default boxes matched to each GT box, per map. Shape (N, M), int64.
        area: GT box area in original-image pixels (for the size classes). Shape (N,).
        size: GT (width, height) in network-input pixels. Shape (N, 2).
    """

    name: str
    iou_threshold: float
    anchors: dict[str, Any]
    num_images: int
    num_defaults: int
    anchor_shapes: list[Tensor]
    best_iou: Tensor
    best_map: Tensor
    positives_per_map: Tensor
    area: Tensor
    size: Tensor

    @property
    def positives(self) -> Tensor:
        """(N,) positives of every GT box, all maps."""
        return self.positives_per_map.sum(dim=1)

    @property
    def covered(self) -> Tensor:
        """(N,) bool: some default box reaches the threshold (beyond the forced match)."""
        return self.best_iou >= self.iou_threshold

    @property
    def size_class(self) -> Tensor:
        """(N,) int64 index into ``SIZE_NAMES`` from the original-pixel area."""
        return torch.bucketize(self.area, torch.tensor(SIZE_AREA_LIMITS), right=True)


@dataclass(frozen=True)
class ScaleSuggestion:
    """Result of ``suggest_scales``: the best (s_min, s_max) and every grid point tried.

    ``grid`` rows hold s_min, s_max, coverage, mean_best_iou and mean_positives, best first.
    Positives here ignore competition between GT boxes of one image (each GT box counts its
    default boxes at or above the threshold, at least the forced one).
    """

    s_min: float
    s_max: float
    coverage: float
    mean_best_iou: float
    mean_positives: float
    objective: str
    num_gt: int
    grid: list[dict[str, float]]


def records_boxes(records: Any, include_crowd: bool = False) -> tuple[list[Tensor], Tensor]:
    """GT boxes and image sizes from a dataset's ``AnnotationRecords`` (no image decoding).

    Args:
        records: ``ssd_lightning.data.AnnotationRecords`` (``dataset.records``).
        include_crowd: Keep COCO crowd regions (training ignores them in matching).

    Returns:
        One (n_i, 4) float32 xyxy pixel tensor per image, and the (N, 2) int64 (height, width).
    """
    counts = np.diff(records.offsets)
    image_of = np.repeat(np.arange(len(counts)), counts)
    keep = np.ones(len(image_of), bool) if include_crowd else ~records.iscrowd
    boxes = torch.from_numpy(np.ascontiguousarray(records.boxes[keep], dtype=np.float32))
    kept = np.bincount(image_of[keep], minlength=len(counts)).tolist()
    return list(boxes.reshape(-1, 4).split(kept)), torch.as_tensor(records.sizes).long()


def coverage(
    gt_boxes: Sequence[Tensor],
    image_sizes: Tensor | Sequence[Sequence[int]],
    default_boxes: DefaultBoxes,
    iou_threshold: float = 0.5,
    name: str = "anchors",
    max_iou_elements: int = MAX_IOU_ELEMENTS,
    progress: bool = False,
) -> CoverageReport:
    """Match every image's GT boxes to the default boxes and record how well they fit.

    Images are processed in padded batches (images sorted by box count, so little padding)
    of at most ``max_iou_elements`` IoU entries.

    Args:
        gt_boxes: Per image, xyxy boxes in original-image pixels.
        image_sizes: Original (height, width) of every image.
        default_boxes: The anchors to test (built for the network input size).
        iou_threshold: Matching threshold (0.5 in the SSD paper).
        name: Label of this configuration in tables and plots.
        max_iou_elements: Memory bound of one batch (B * G * A).
        progress: Show a progress bar over images (tqdm).

    Shape:
        gt_boxes: I tensors (n_i, 4); image_sizes: (I, 2). The report holds N = sum n_i rows.
    """
    boxes, area, counts = _normalised(gt_boxes, image_sizes)
    coder = SSDBoxCoder(default_boxes.cxcywh, iou_threshold)
    map_of_default = default_boxes.map_of_box
    num_maps = len(default_boxes.feature_maps)
    best_iou, best_map, _ = grid_iou_stats(boxes, default_boxes, iou_threshold)
    per_map = torch.zeros(boxes.shape[0], num_maps, dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    bar = _progress(len(counts), progress, name)
    for images in _batches(counts, len(default_boxes), max_iou_elements):
        gt, valid, index = _padded(boxes, starts[images], counts[images])
        positives = _positives_per_map(gt, valid, coder, map_of_default, num_maps)
        per_map[index[valid]] = positives[valid]
        bar.update(len(images))
    bar.update(int((counts == 0).sum()))
    bar.close()
    height, width = default_boxes.image_size
    scale = torch.tensor([width, height], dtype=torch.float32)
    return CoverageReport(
        name=name,
        iou_threshold=float(iou_threshold),
        anchors={**default_boxes.settings(), "resolved": default_boxes.describe()},
        num_images=len(counts),
        num_defaults=len(default_boxes),
        anchor_shapes=[shapes * scale for _, _, shapes in _grids(default_boxes)],
        best_iou=best_iou,
        best_map=best_map,
        positives_per_map=per_map,
        area=area,
        size=(boxes[:, 2:] - boxes[:, :2]) * scale,
    )


def _normalised(
    gt_boxes: Sequence[Tensor], image_sizes: Tensor | Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated boxes normalised by their image size, their pixel areas, boxes per image.

    Shape:
        returns (N, 4) float32 normalised xyxy, (N,) float32 areas, (I,) int64 counts.
    """
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32).reshape(-1, 2)
    if len(gt_boxes) != len(sizes):
        raise ValueError(f"{len(gt_boxes)} box tensors for {len(sizes)} image sizes")
    counts = torch.tensor([len(b) for b in gt_boxes], dtype=torch.long)
    pixels = torch.cat(
        [torch.zeros(0, 4)]
        + [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes]
    )
    whwh = sizes.flip(-1).repeat(1, 2).repeat_interleave(counts, dim=0)  # (N, 4): w, h, w, h
    area = (pixels[:, 2] - pixels[:, 0]) * (pixels[:, 3] - pixels[:, 1])
    return pixels / whwh, area, counts


def _batches(counts: Tensor, num_defaults: int, max_elements: int) -> Iterator[Tensor]:
    """Indices of images with GT boxes, most boxes first, in batches of bounded IoU size."""
    order = torch.sort(counts, descending=True, stable=True).indices
    order = order[counts[order] > 0]
    start = 0
    while start < len(order):
        g = int(counts[order[start]])  # the batch's largest box count (sorted)
        size = max(1, max_elements // (g * num_defaults))
        yield order[start : start + size]
        start += size


def _padded(boxes: Tensor, starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GT boxes of a batch of images padded to the largest count.

    Shape:
        starts, counts: (B,); returns boxes (B, G, 4), valid (B, G) bool and (B, G) rows of
        ``boxes`` (padding slots repeat the image's first box and are marked invalid).
    """
    slot = torch.arange(int(counts.max()))
    valid = slot[None] < counts[:, None]
    index = starts[:, None] + torch.where(valid, slot[None], 0)
    return boxes[index], valid, index


def _positives_per_map(
    gt: Tensor, valid: Tensor, coder: SSDBoxCoder, map_of_default: Tensor, num_maps: int
) -> Tensor:
    """Default boxes matched to every GT box of a padded batch, per feature map.

    Shape:
        gt: (B, G, 4) normalised xyxy; valid: (B, G); returns (B, G, M) int64.
    """
    batch, num_gt = valid.shape
    matched = coder.match(gt, valid)  # (B, A): GT index, -1 background (bipartite + threshold)
    image, default = (matched >= 0).nonzero(as_tuple=True)
    slot = (image * num_gt + matched[image, default]) * num_maps + map_of_default[default]
    per_map = torch.bincount(slot, minlength=batch * num_gt * num_maps)
    return per_map.view(batch, num_gt, num_maps)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, name: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"coverage {name}", unit="img")


def summarize(report: CoverageReport) -> dict[str, Any]:
    """Plain-value summary (JSON-ready): overall, by object size and by feature map."""
    everything = torch.ones_like(report.covered)
    size_class = report.size_class
    by_map = []
    for k, (fmap, shapes) in enumerate(
        zip(report.anchors["feature_maps"], report.anchor_shapes, strict=True)
    ):
        on_map = report.best_map == k
        side = shapes.prod(dim=1).sqrt()
        by_map.append({
            "map": k,
            "feature_map": list(fmap),
            "anchor_px": [round(float(side.min()), 1), round(float(side.max()), 1)],
            "best_share": _mean(on_map.float()),
            "coverage": _mean(report.covered[on_map].float()),
            "positives_per_gt": _mean(report.positives_per_map[:, k].float()),
        })  # fmt: skip
    return {
        "name": report.name,
        "iou_threshold": report.iou_threshold,
        "num_images": report.num_images,
        "num_defaults": report.num_defaults,
        "anchors": report.anchors,
        "all": _stats(report, everything),
        "by_size": {name: _stats(report, size_class == i) for i, name in enumerate(SIZE_NAMES)},
        "by_map": by_map,
    }


def _stats(report: CoverageReport, mask: Tensor) -> dict[str, Any]:
    """Coverage, positives and best-IoU distribution of the GT boxes selected by ``mask``."""
    best = report.best_iou[mask]
    positives = report.positives[mask]
    hist = {}
    for label, low, high in POSITIVE_BINS:
        upper = positives <= high if high is not None else torch.ones_like(positives, dtype=bool)
        hist[label] = _mean(((positives >= low) & upper).float())
    quantiles = torch.quantile(best, torch.tensor(QUANTILES)).tolist() if len(best) else [None] * 5
    return {
        "num_gt": int(mask.sum()),
        "coverage": _mean((best >= report.iou_threshold).float()),
        "unmatched": _mean((positives == 0).float()),
        "positives_mean": _mean(positives.float()),
        "positives_median": float(positives.median()) if len(positives) else None,
        "positives_hist": hist,
        "best_iou_mean": _mean(best),
        "best_iou_quantiles": {
            f"q{round(100 * q):02d}": v for q, v in zip(QUANTILES, quantiles, strict=True)
        },
    }


def _mean(values: Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def suggest_scales(
    gt_boxes: Sequence[Tensor],
    image_sizes: Tensor | Sequence[Sequence[int]],
    default_boxes: DefaultBoxes,
    s_min_values: Sequence[float] = S_MIN_GRID,
    s_max_values: Sequence[float] = S_MAX_GRID,
    iou_threshold: float = 0.5,
    objective: Objective = "coverage",
    max_boxes: int | None = 20_000,
    seed: int = 0,
) -> ScaleSuggestion:
    """Grid search of s_min / s_max (SSD paper, Eq. 4) for a dataset's boxes.

    Every other setting (image size, feature maps, aspect ratios, steps, clip) is kept from
    ``default_boxes``; an explicit size table there is replaced by the scales.

    Args:
        gt_boxes: Per image, xyxy boxes in original-image pixels.
        image_sizes: Original (height, width) of every image.
        default_boxes: Template anchors.
        s_min_values: Candidate scales of the first map.
        s_max_values: Candidate scales of the last map (pairs with s_min >= s_max are skipped).
        iou_threshold: Matching threshold.
        objective: ``"coverage"`` (fraction of GT boxes with a default box at or above the
            threshold; ties broken by mean best IoU) or ``"iou"`` (mean best IoU). Mean
            positives is reported but not offered as an objective: it only grows with larger,
            overlapping default boxes, whatever the fit.
        max_boxes: Random subset of GT boxes searched (None: all), for speed.
        seed: Seed of that subset.

    Shape:
        gt_boxes: I tensors (n_i, 4); image_sizes: (I, 2).
    """
    boxes, _, _ = _normalised(gt_boxes, image_sizes)
    if max_boxes is not None and len(boxes) > max_boxes:
        pick = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))
        boxes = boxes[pick[:max_boxes]]
    if len(boxes) == 0:
        raise ValueError("suggest_scales: no GT boxes")
    grid = []
    for s_min in s_min_values:
        for s_max in s_max_values:
            if s_min >= s_max:
                continue
            candidate = default_boxes.with_scales(s_min, s_max)
            best, _, count = grid_iou_stats(boxes, candidate, iou_threshold)
            grid.append({
                "s_min": float(s_min),
                "s_max": float(s_max),
                "coverage": float((best >= iou_threshold).float().mean()),
                "mean_best_iou": float(best.mean()),
                "mean_positives": float(count.clamp(min=1).float().mean()),
            })  # fmt: skip
    if not grid:
        raise ValueError("suggest_scales: no (s_min, s_max) pair with s_min < s_max")
    keys = {
        "coverage": ("coverage", "mean_best_iou"),
        "iou": ("mean_best_iou", "coverage"),
    }[objective]
    grid.sort(key=lambda row: tuple(-row[k] for k in keys))
    best_row = grid[0]
    return ScaleSuggestion(
        s_min=best_row["s_min"],
        s_max=best_row["s_max"],
        coverage=best_row["coverage"],
        mean_best_iou=best_row["mean_best_iou"],
        mean_positives=best_row["mean_positives"],
        objective=objective,
        num_gt=len(boxes),
        grid=grid,
    )


def grid_iou_stats(
    boxes: Tensor, default_boxes: DefaultBoxes, iou_threshold: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Best IoU, its feature map and the default boxes at or above the threshold, per GT box.

    Exact, without the (N, A) IoU matrix. The default boxes of one map and one cell shape lie on
    a grid of centres, and the intersection of two axis-aligned boxes is the product of the
    overlaps along x and along y, each non-increasing in the distance of the centres. So the
    best default box of a shape is the one at the nearest x and nearest y centre, and counting
    IoU >= t, i.e. inter >= t (area_gt + area_default) / (1 + t), needs only the sorted y
    overlaps: per x cell, a ``searchsorted`` of the y overlap it requires.

    Shape:
        boxes: (N, 4) normalised xyxy; returns (N,) float32, (N,) int64 and (N,) int64.
    """
    if len(boxes) > GRID_CHUNK:  # bounds the (N, K, f) overlap tensors
        parts = [grid_iou_stats(b, default_boxes, iou_threshold) for b in boxes.split(GRID_CHUNK)]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
    wh = boxes[:, 2:] - boxes[:, :2]
    gt_area = (wh[:, 0] * wh[:, 1])[:, None]  # (N, 1)
    best = torch.zeros(len(boxes))
    best_map = torch.zeros(len(boxes), dtype=torch.long)
    count = torch.zeros(len(boxes), dtype=torch.long)
    for k, (xs, ys, shapes) in enumerate(_grids(default_boxes)):
        ox = _overlap(centre[:, 0], wh[:, 0], xs, shapes[:, 0])  # (N, K, fw)
        oy = _overlap(centre[:, 1], wh[:, 1], ys, shapes[:, 1])  # (N, K, fh)
        default_area = shapes[:, 0] * shapes[:, 1]  # (K,)
        inter = ox.amax(dim=2) * oy.amax(dim=2)  # (N, K) at the nearest centres
        iou = (inter / (gt_area + default_area - inter)).amax(dim=1)  # (N,)
        best_map = torch.where(iou > best, k, best_map)
        best = torch.maximum(best, iou)
        need = iou_threshold * (gt_area + default_area) / (1 + iou_threshold)  # (N, K)
        oy_sorted = oy.sort(dim=2).values.contiguous()
        need_y = need[:, :, None] / ox  # (N, K, fw); inf where the x overlap is 0
        above = oy.shape[2] - torch.searchsorted(oy_sorted, need_y.contiguous())
        count += above.sum(dim=(1, 2))
    return best, best_map, count


def _grids(default_boxes: DefaultBoxes) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Per map: x centres (fw,), y centres (fh,) and the (K, 2) cell shapes (w, h)."""
    for k in range(len(default_boxes.feature_maps)):
        grid = default_boxes.map_grid(k)  # (fh, fw, K, 4)
        yield grid[0, :, 0, 0], grid[:, 0, 0, 1], grid[0, 0, :, 2:]


def coverage_fraction(
    records: Any, default_boxes: DefaultBoxes, iou_threshold: float = 0.5
) -> float | None:
    """Fraction of a dataset's GT boxes (crowd left out) with a default box at IoU >= threshold.

    The "covered" figure of ``ssd-anchors``, from the annotations alone (``dataset.records``);
    None without boxes.
    """
    boxes, sizes = records_boxes(records)
    normalised, _, _ = _normalised(boxes, sizes)
    if len(normalised) == 0:
        return None
    best, _, _ = grid_iou_stats(normalised, default_boxes, iou_threshold)
    return float((best >= iou_threshold).float().mean())


def _overlap(centre: Tensor, size: Tensor, centres: Tensor, sizes: Tensor) -> Tensor:
    """1-D overlap of N intervals with every (size, centre) default interval.

    Shape:
        centre, size: (N,); centres: (f,); sizes: (K,); returns (N, K, f).
    """
    lo = torch.maximum((centre - size / 2)[:, None, None], centres - sizes[:, None] / 2)
    hi = torch.minimum((centre + size / 2)[:, None, None], centres + sizes[:, None] / 2)
    return (hi - lo).clamp(min=0)
