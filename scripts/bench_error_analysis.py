"""Benchmark: the cost of the error analysis on top of a COCO evaluation.

Workload: ``scripts/bench_eval.py``'s (``--images`` images, default 5,120, with coco128's ground
truth replicated, ``--detections`` seeded detections per image, default 100, 80 classes),
evaluated once by ``COCOEvaluator``; everything below works from that evaluation's arrays, as
the validation callback and ``ssd-eval`` do.

Steps timed (wall and process CPU seconds, medians of ``--repeats`` interleaved runs):

- COCO evaluation: ``COCOEvaluator`` update + compute (the cost the analysis adds to).
- confusion matrix: ``confusion_matrix`` on the gathered (N, 7) rows (vectorised matching).
- PR curves: ``pr_curves`` (slices of the precision array).
- figures: both matplotlib figures built (``error_report.figures``).
- rendering: both figures drawn once into RGB arrays (what TensorBoard gets).
- files: ``error_report.save`` of those arrays as PNG, and the 3 CSV files.
- reference: the same matching image by image, a Python loop over detections (numpy IoU per
  image), to show what the vectorised matching saves; its matrix must be identical.

    python scripts/bench_error_analysis.py [--images 5120] [--detections 100] [--repeats 3]
        [--threads 1] [--score-threshold 0.3] [--output DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_lightning.coco_eval import COCOEvaluator
from ssd_lightning.error_analysis import ErrorAnalysis, confusion_matrix, pr_curves
from ssd_lightning.error_report import figures, render, save

HERE = Path(__file__).resolve().parent


def _bench_eval() -> Any:
    spec = importlib.util.spec_from_file_location("bench_eval", HERE / "bench_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_image_confusion(
    dets: np.ndarray,
    gts: np.ndarray,
    num_classes: int,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """The reference: one IoU matrix per image, then a Python loop over its detections."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    dets = dets[dets[:, 5] >= score_threshold]
    dets = dets[np.lexsort((-dets[:, 5], dets[:, 0]))]
    gts = gts[np.argsort(gts[:, 0], kind="stable")]
    images = np.union1d(dets[:, 0], gts[:, 0])
    d_bounds = (
        np.searchsorted(dets[:, 0], images, side="left"),
        np.searchsorted(dets[:, 0], images, side="right"),
    )
    g_bounds = (
        np.searchsorted(gts[:, 0], images, side="left"),
        np.searchsorted(gts[:, 0], images, side="right"),
    )
    for i in range(len(images)):
        d = dets[d_bounds[0][i] : d_bounds[1][i]]
        g = gts[g_bounds[0][i] : g_bounds[1][i]]
        crowd = g[:, 5] > 0
        inter = _pairwise_intersection(d[:, 1:5], g[:, 1:5])
        det_area, gt_area = d[:, 3] * d[:, 4], g[:, 3] * g[:, 4]
        iou = inter / np.maximum(det_area[:, None] + gt_area[None] - inter, 1e-12)
        covered = inter / np.maximum(det_area[:, None], 1e-12)
        iou[:, crowd] = -1.0
        taken = np.zeros(len(g), dtype=bool)
        for j in range(len(d)):
            row = np.where(taken, -1.0, iou[j])
            best = int(row.argmax()) if len(row) else -1
            if best >= 0 and row[best] >= iou_threshold:
                taken[best] = True
                matrix[int(g[best, 6]), int(d[j, 6])] += 1
            elif not (covered[j, crowd] >= iou_threshold).any():
                matrix[0, int(d[j, 6])] += 1
        for label in g[~taken & ~crowd, 6].astype(np.int64):
            matrix[label, 0] += 1
    return matrix


def _pairwise_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4), (m, 4) xywh -> (n, m) intersection areas."""
    width = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    width -= np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    height -= np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE.parent.parent / "shared/data/coco128")
    parser.add_argument("--images", type=int, default=5120)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--output", type=Path, help="folder of the files (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = _bench_eval()
    targets, preds, _, names, originals = bench.workload(args.root, args.images, args.detections)
    num_classes = len(names) + 1

    def evaluate() -> Any:
        evaluator = COCOEvaluator(range(1, num_classes))
        for start in range(0, len(preds), bench.BATCH):
            evaluator.update(
                preds[start : start + bench.BATCH], targets[start : start + bench.BATCH]
            )
        return evaluator.compute()

    curves = evaluate()
    dets, gts = curves.dets, curves.gts
    folder = args.output or Path(tempfile.mkdtemp(prefix="bench_error_analysis-"))
    state: dict[str, Any] = {}

    def analysis() -> ErrorAnalysis:
        return ErrorAnalysis(names, state["matrix"], state["pr"], args.score_threshold, 0.5)

    steps: dict[str, Callable[[], Any]] = {
        "COCO evaluation (update + compute)": evaluate,
        "confusion matrix (vectorised)": lambda: state.__setitem__(
            "matrix", confusion_matrix(dets, gts, num_classes, args.score_threshold)
        ),
        "PR curves (array slices)": lambda: state.__setitem__("pr", pr_curves(curves, num_classes)),
        "figures built": lambda: state.__setitem__("figures", figures(analysis())),
        "rendering (2 figures)": lambda: state.__setitem__(
            "images", {name: render(fig) for name, fig in state["figures"].items()}
        ),
        "files (2 PNG + 3 CSV)": lambda: save(analysis(), folder, state["images"]),
        "reference: per-image loop": lambda: state.__setitem__(
            "reference", per_image_confusion(dets, gts, num_classes, args.score_threshold)
        ),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            step()
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu)
    medians = {n: {c: statistics.median(v) for c, v in t.items()} for n, t in times.items()}
    same = bool(np.array_equal(state["matrix"], state["reference"]))
    matrix = np.asarray(state["matrix"])
    right = int(np.trace(matrix[1:, 1:]))
    kept = int((dets[:, 5] >= args.score_threshold).sum())
    print(
        f"bench_error_analysis: {args.images} images (coco128 GT replicated from {originals}), "
        f"{len(gts)} GT rows, {len(dets)} detections ({kept} at score >= "
        f"{args.score_threshold}), {num_classes - 1} classes; median of {args.repeats} "
        f"interleaved runs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"\n{'step':<38}{'wall s':>9}{'CPU s':>9}")
    print("-" * 56)
    for name, clocks in medians.items():
        print(f"{name:<38}{clocks['wall']:>9.3f}{clocks['cpu']:>9.3f}")
    added = ("confusion matrix (vectorised)", "PR curves (array slices)")
    drawn = ("figures built", "rendering (2 figures)", "files (2 PNG + 3 CSV)")
    numbers = sum(medians[n]["wall"] for n in added)
    total = numbers + sum(medians[n]["wall"] for n in drawn)
    evaluation = medians["COCO evaluation (update + compute)"]["wall"]
    reference = medians["reference: per-image loop"]["wall"]
    print(
        f"\nanalysis numbers {numbers:.3f} s ({numbers / evaluation:.1%} of the evaluation), "
        f"with figures and files {total:.3f} s ({total / evaluation:.1%}); vectorised matrix "
        f"{reference / medians[added[0]]['wall']:.0f}x faster than the per-image loop, "
        f"identical matrix: {same}"
    )
    print(
        f"matrix: {right} right, {int(matrix[1:, 1:].sum()) - right} confused, "
        f"{int(matrix[0].sum())} false positives, {int(matrix[1:, 0].sum())} missed"
    )
    return {"seconds": medians, "identical": same, "files": folder}


if __name__ == "__main__":
    main()
