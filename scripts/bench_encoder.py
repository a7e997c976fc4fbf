"""Benchmark: ground-truth assignment, images/s on one core.

Ours (``SSDBoxCoder.encode``: bipartite matching + threshold + encoding, per image as in the
DataLoader workers, and batched over 32 padded images) against a straightforward per-image
implementation of the kind most re-implementations ship (IoU matrix from expanded corner tensors,
argmax both ways, a Python loop forcing each GT's best box, threshold, encode), on the same
inputs: SSD300 default boxes, ~13 objects per image drawn from bccd-like sizes.

    python scripts/bench_encoder.py [--objects 13] [--images 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import Tensor

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder


def reference_encode(boxes: Tensor, labels: Tensor, priors: Tensor, threshold: float = 0.5):
    """Per-image matching as commonly written: greedy force-match, no bipartite rule."""
    point = torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    g, a = boxes.size(0), point.size(0)
    max_xy = torch.min(
        boxes[:, 2:].unsqueeze(1).expand(g, a, 2), point[:, 2:].unsqueeze(0).expand(g, a, 2)
    )
    min_xy = torch.max(
        boxes[:, :2].unsqueeze(1).expand(g, a, 2), point[:, :2].unsqueeze(0).expand(g, a, 2)
    )
    inter = torch.clamp(max_xy - min_xy, min=0).prod(2)
    area_a = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).unsqueeze(1)
    area_b = ((point[:, 2] - point[:, 0]) * (point[:, 3] - point[:, 1])).unsqueeze(0)
    overlaps = inter / (area_a + area_b - inter)
    best_prior_idx = overlaps.argmax(1)
    best_truth_overlap, best_truth_idx = overlaps.max(0)
    best_truth_overlap.index_fill_(0, best_prior_idx, 2.0)
    for j in range(best_prior_idx.size(0)):
        best_truth_idx[best_prior_idx[j]] = j
    matches = boxes[best_truth_idx]
    conf = labels[best_truth_idx]
    conf[best_truth_overlap < threshold] = 0
    g_cxcy = ((matches[:, :2] + matches[:, 2:]) / 2 - priors[:, :2]) / (0.1 * priors[:, 2:])
    g_wh = torch.log((matches[:, 2:] - matches[:, :2]) / priors[:, 2:]) / 0.2
    return torch.cat([g_cxcy, g_wh], 1), conf


def make_images(n: int, objects: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Random images with bccd-like boxes (side ~0.1-0.35 of the image, overlapping)."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        wh = 0.1 + 0.25 * torch.rand(objects, 2, generator=gen)
        xy = torch.rand(objects, 2, generator=gen) * (1 - wh)
        labels = torch.randint(1, 4, (objects,), generator=gen)
        images.append((torch.cat([xy, xy + wh], 1), labels))
    return images


def time_images_per_s(fn, images, repeats: int) -> float:
    fn(images[:5])
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        runs.append(len(images) / (time.perf_counter() - start))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=13)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    anchors = DefaultBoxes(300, [38, 19, 10, 5, 3, 1], sizes=[21, 45, 99, 153, 207, 261, 315])
    coder = SSDBoxCoder(anchors.cxcywh)
    images = make_images(args.images, args.objects)
    batch_boxes = torch.stack([b for b, _ in images])
    batch_labels = torch.stack([lab for _, lab in images])
    valid = torch.ones(batch_labels.shape, dtype=torch.bool)

    def ours(chunk):
        for boxes, labels in chunk:
            coder.encode(boxes, labels)

    def ours_batched(chunk):
        for start in range(0, len(chunk), 32):
            sl = slice(start, start + 32)
            coder.encode_batch(batch_boxes[sl], batch_labels[sl], valid[sl])

    def reference(chunk):
        for boxes, labels in chunk:
            reference_encode(boxes, labels, coder.default_boxes)

    ref = time_images_per_s(reference, images, args.repeats)
    per_image = time_images_per_s(ours, images, args.repeats)
    batched = time_images_per_s(lambda c: ours_batched(images), images, args.repeats)
    print(
        f"GT assignment, 1 thread, {len(anchors)} default boxes, {args.objects} objects/image, "
        f"median of {args.repeats} runs over {args.images} images"
    )
    print(f"  reference (per image, greedy force-match): {ref:8.0f} images/s")
    print(
        f"  ours, per image (DataLoader worker path):  {per_image:8.0f} images/s  "
        f"ratio {per_image / ref:.2f}x  (target >= 5x)"
    )
    print(
        f"  ours, batched x32 (padded GT):             {batched:8.0f} images/s  "
        f"ratio {batched / ref:.2f}x"
    )
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
