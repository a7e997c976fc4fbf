"""Benchmark: COCO box evaluation of a validation set, ours vs faster_coco_eval and pycocotools.

Workload: ``--images`` images (default 5,120) whose ground truth is coco128's, replicated: image
i has the boxes of coco128 image i mod 128 (boxes from its COCO JSON, ``xyxy`` pixels, labels
1..80 in category-id order, crowd objects as ``difficult``); 40 copies at the default. Each image
gets ``--detections`` detections (default 100), seeded: 85% of its objects found with jittered
corners, a quarter of those found twice more loosely, a tenth also with a wrong class, and the
rest false positives (random boxes, half with a class present in the image), scores uniform in
ranges that overlap.

Paths timed, each from its own natural input (preparing that input is not timed):

- ours: ``COCOEvaluator`` ``update`` in batches of 32 per-image tensor dicts (as the
  LightningModule sends them) + ``compute`` (faster_coco_eval from arrays); also the whole
  ``DetectionMetrics`` (COCO + VOC), without a target.
- faster_coco_eval direct: ``COCO`` from the ground-truth JSON dict, ``loadRes`` of the (N, 7)
  result array (its fastest input), ``COCOeval_faster`` evaluate / accumulate / summarize; as
  its users call it, and again with Python's cyclic garbage collector paused (ours pauses it
  while faster_coco_eval builds its annotation dicts), which shows what that pause is worth.
- pycocotools: ``COCO`` from the same JSON dict, ``loadRes`` of the JSON result dicts,
  ``COCOeval`` evaluate / accumulate / summarize.
- torchmetrics (``--torchmetrics``): ``MeanAveragePrecision`` (faster_coco_eval backend, default
  float32 thresholds) in batches of 32, then ``compute``: what ``DetectionMetrics`` ran before.

Times, by wall clock and by process CPU time (the machine may be shared: CPU time is the work
itself; every path runs on one core), are medians of ``--repeats`` interleaved runs (ours,
direct, pycocotools, ...), so load on a shared machine hits all alike. torch runs ``--threads``
threads (default 1: on a busy machine, more threads than free cores make each torch operation
wait for a descheduled thread, which slows the VOC matching in ``DetectionMetrics`` many times
over; the COCO paths barely use torch).
Memory is the peak RSS one run adds (VmHWM reset through /proc/self/clear_refs, after
malloc_trim), the largest over the runs. Targets: ours >= 8x faster than pycocotools, ours <=
1.5x faster_coco_eval direct, the 12 COCO statistics within 1e-3 of pycocotools'.

    python scripts/bench_eval.py [--images 5120] [--detections 100] [--repeats 3] [--threads 1]
        [--torchmetrics]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from ssd_lightning.coco_eval import STAT_KEYS, COCOEvaluator
from ssd_lightning.metrics import DetectionMetrics

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"
BATCH = 32

Targets = list[dict[str, Tensor]]


# ---------------------------------------------------------------- workload


def load_coco_targets(root: Path) -> tuple[Targets, list[tuple[int, int]], list[str]]:
    """Ground truth of a COCO-JSON dataset as the metric's per-image targets.

    Returns:
        targets (``boxes`` (n, 4) xyxy float32 pixels, ``labels`` (n,) int64 1..C-1 in
        category-id order, ``difficult`` (n,) bool = iscrowd), image sizes (h, w), class names.
    """
    data = json.loads(next((root / "annotations").glob("*.json")).read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories, start=1)}
    images = sorted(data["images"], key=lambda im: im["id"])
    objects: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in images}
    for ann in data["annotations"]:
        objects[ann["image_id"]].append(ann)
    targets = []
    for im in images:
        anns = objects[im["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        targets.append(
            {
                "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                "labels": torch.tensor([label_of[a["category_id"]] for a in anns]).long(),
                "difficult": torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
            }
        )
    sizes = [(im["height"], im["width"]) for im in images]
    return targets, sizes, [c["name"] for c in categories]


def make_detections(
    targets: Targets,
    sizes: Sequence[tuple[int, int]],
    num_classes: int,
    per_image: int = 100,
    seed: int = 0,
) -> Targets:
    """Seeded detections per image: found, duplicated and misclassified objects, false positives.

    85% of the objects (crowd ones too) are found with corners jittered by N(0, 0.08) of the box
    size and scores U(0.3, 1); a quarter of the found ones again with N(0, 0.2) jitter and scores
    U(0.1, 0.8); a tenth also with a random other class, scores U(0, 0.7). False positives fill
    the image up to ``per_image``: random boxes (side 4 px to the image side, log-uniform),
    labels half from the image's classes, half uniform over 1..num_classes-1, scores U(0, 0.6).
    Boxes are clipped to the image; at most ``per_image`` best-scored detections are kept.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(n: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    def jitter(boxes: Tensor, scale: float) -> Tensor:
        side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        return boxes + torch.randn(boxes.shape, generator=gen) * scale * side

    preds = []
    for target, (height, width) in zip(targets, sizes, strict=True):
        boxes, labels = target["boxes"], target["labels"]
        found = torch.rand(len(boxes), generator=gen) < 0.85
        boxes, labels = boxes[found], labels[found]
        again = torch.rand(len(boxes), generator=gen) < 0.25
        wrong = torch.rand(len(boxes), generator=gen) < 0.1
        shift = torch.randint(1, num_classes - 1, (int(wrong.sum()),), generator=gen)
        wrong_labels = (labels[wrong] - 1 + shift) % (num_classes - 1) + 1  # another class
        parts = [
            (jitter(boxes, 0.08), labels, uniform(len(boxes), 0.3, 1.0)),
            (jitter(boxes[again], 0.2), labels[again], uniform(int(again.sum()), 0.1, 0.8)),
            (jitter(boxes[wrong], 0.08), wrong_labels, uniform(int(wrong.sum()), 0.0, 0.7)),
        ]
        fill = max(per_image - sum(len(p[1]) for p in parts), 0)
        side = torch.exp(uniform(2 * fill, np.log(4.0), np.log(min(height, width)))).reshape(-1, 2)
        corner = torch.rand(fill, 2, generator=gen) * (torch.tensor([width, height]) - side)
        pool = target["labels"] if len(target["labels"]) else torch.arange(1, num_classes)
        fp_labels = torch.where(
            torch.rand(fill, generator=gen) < 0.5,
            pool[torch.randint(len(pool), (fill,), generator=gen)],
            torch.randint(1, num_classes, (fill,), generator=gen),
        )
        parts.append((torch.cat([corner, corner + side], 1), fp_labels, uniform(fill, 0.0, 0.6)))
        boxes, labels, scores = (torch.cat(column) for column in zip(*parts, strict=True))
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
        best = scores.argsort(descending=True)[:per_image]
        preds.append({"boxes": boxes[best], "scores": scores[best], "labels": labels[best]})
    return preds


def workload(root: Path, images: int, per_image: int, seed: int = 0):
    """A dataset's targets replicated to ``images`` images (image i = original i mod count),
    their detections, image sizes, class names and the original image count."""
    targets, sizes, names = load_coco_targets(root)
    originals = len(targets)
    targets = [targets[i % originals] for i in range(images)]
    sizes = [sizes[i % originals] for i in range(images)]
    preds = make_detections(targets, sizes, len(names) + 1, per_image, seed)
    return targets, preds, sizes, names, originals


# ---------------------------------------------------------------- reference inputs


def result_array(preds: Targets) -> np.ndarray:
    """Detections as faster_coco_eval's (N, 7) ``[image_id, x, y, w, h, score, label]``."""
    rows = []
    for i, p in enumerate(preds):
        xyxy = p["boxes"].double()
        rows.append(
            torch.cat(
                [
                    torch.full((len(xyxy), 1), float(i), dtype=torch.float64),
                    xyxy[:, :2],
                    xyxy[:, 2:] - xyxy[:, :2],
                    p["scores"].double()[:, None],
                    p["labels"].double()[:, None],
                ],
                1,
            )
        )
    return torch.cat(rows).numpy()


def coco_json(
    targets: Targets, sizes: Sequence[tuple[int, int]], num_classes: int
) -> dict[str, Any]:
    """Ground truth as a COCO JSON dict: image ids 0.., box areas, ``difficult`` as iscrowd."""
    annotations = []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label, crowd in zip(
            t["boxes"].double().tolist(), t["labels"].tolist(), t["difficult"].tolist(), strict=True
        ):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
    return {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(sizes)],
        "annotations": annotations,
        "categories": [{"id": k, "name": str(k)} for k in range(1, num_classes)],
    }


def result_json(dets: np.ndarray) -> list[dict[str, Any]]:
    """The (N, 7) result array as COCO result dicts."""
    return [
        {"image_id": int(r[0]), "bbox": r[1:5], "score": r[5], "category_id": int(r[6])}
        for r in dets.tolist()
    ]


def pycocotools_eval(gt: dict[str, Any], results: list[dict[str, Any]]) -> COCOeval:
    """pycocotools' evaluation, silenced; ``results`` is modified by ``loadRes``."""
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def per_class_ap(precision: np.ndarray) -> np.ndarray:
    """AP@[.5:.95] (area all, 100 detections) per class of a COCOeval precision array."""
    curves = precision[:, :, :, 0, -1].reshape(-1, precision.shape[2])  # (T*R, K)
    defined = curves > -1
    sums = np.where(defined, curves, 0.0).sum(0)
    return np.where(defined.any(0), sums / np.maximum(defined.sum(0), 1), -1.0)


# ---------------------------------------------------------------- timed paths


def run_ours(targets: Targets, preds: Targets, num_classes: int) -> np.ndarray:
    evaluator = COCOEvaluator(range(1, num_classes))
    for start in range(0, len(preds), BATCH):
        evaluator.update(preds[start : start + BATCH], targets[start : start + BATCH])
    curves = evaluator.compute()
    return np.concatenate([curves.stats, per_class_ap(curves.precision)])


def run_metrics(targets: Targets, preds: Targets, names: Sequence[str]) -> np.ndarray:
    metrics = DetectionMetrics(names)
    for start in range(0, len(preds), BATCH):
        metrics.update(preds[start : start + BATCH], targets[start : start + BATCH])
    results = metrics.compute()
    return np.array([results[key] for key in STAT_KEYS])


def run_direct(gt: dict[str, Any], dets: np.ndarray) -> np.ndarray:
    coco_gt = FasterCOCO(gt)
    coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", print_function=_silent)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return np.concatenate([coco_eval.stats, per_class_ap(coco_eval.eval["precision"])])


def run_direct_gc_paused(gt: dict[str, Any], dets: np.ndarray) -> np.ndarray:
    """The direct path with Python's cyclic garbage collector paused, as ours does."""
    gc.disable()
    try:
        return run_direct(gt, dets)
    finally:
        gc.enable()


def run_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]]) -> np.ndarray:
    coco_eval = pycocotools_eval(gt, results)
    return np.concatenate([coco_eval.stats, per_class_ap(coco_eval.eval["precision"])])


def run_torchmetrics(targets: Targets, preds: Targets) -> np.ndarray:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(class_metrics=True, backend="faster_coco_eval")
    metric.warn_on_many_detections = False
    crowd = [
        {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()}
        for t in targets
    ]
    for start in range(0, len(preds), BATCH):
        metric.update(preds[start : start + BATCH], crowd[start : start + BATCH])
    out = metric.compute()
    names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    names += ("mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
    return np.array([float(out[name]) for name in names])


def _silent(*args: object, **kwargs: object) -> None:
    pass


# ---------------------------------------------------------------- measurement


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def timed(fn: Callable[[Any], np.ndarray], inputs: Any) -> tuple[dict[str, float], float, Any]:
    """Wall and process CPU seconds of ``fn(inputs)``, the peak RSS it added (MiB; NaN if not
    measurable), and its result."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back, so RSS follows live memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        base = proc_status_kib("VmRSS")
    except OSError:
        base = None
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn(inputs)
    seconds = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu_start}
    peak = (proc_status_kib("VmHWM") - base) / 1024 if base is not None else float("nan")
    return seconds, peak, out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=COCO128)
    parser.add_argument("--images", type=int, default=5120)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more oversubscribe a busy machine)"
    )
    parser.add_argument("--torchmetrics", action="store_true", help="also time torchmetrics")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report; returns the medians, memory, stats and targets."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    targets, preds, sizes, names, originals = workload(
        args.root, args.images, args.detections, args.seed
    )
    num_classes = len(names) + 1
    gt = coco_json(targets, sizes, num_classes)
    dets = result_array(preds)
    boxes = sum(len(t["labels"]) for t in targets)
    crowd = sum(int(t["difficult"].sum()) for t in targets)
    print(
        f"bench_eval: {args.images} images, GT of {args.root.name} replicated (image i has the "
        f"boxes of its image i mod {originals}), {boxes} GT boxes ({crowd} crowd), {len(dets)} "
        f"detections ({args.detections}/image, seed {args.seed}), {num_classes - 1} classes; "
        f"median of {args.repeats} interleaved runs"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), faster_coco_eval "
        f"{version('faster-coco-eval')}, pycocotools {version('pycocotools')}, "
        f"torchmetrics {version('torchmetrics')}, numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    # name -> (untimed preparation of the path's input, timed run on it); the JSON inputs are
    # rebuilt for every run because the COCO APIs add keys to the dicts they are given.
    paths: dict[str, tuple[Callable[[], Any], Callable[[Any], np.ndarray]]] = {
        "ours": (lambda: None, lambda _: run_ours(targets, preds, num_classes)),
        "DetectionMetrics": (lambda: None, lambda _: run_metrics(targets, preds, names)),
        "direct": (lambda: copy.deepcopy(gt), lambda gt_: run_direct(gt_, dets)),
        "direct, GC paused": (
            lambda: copy.deepcopy(gt),
            lambda gt_: run_direct_gc_paused(gt_, dets),
        ),
        "pycocotools": (
            lambda: (copy.deepcopy(gt), result_json(dets)),
            lambda inputs: run_pycocotools(*inputs),
        ),
    }
    if args.torchmetrics:
        paths["torchmetrics"] = (lambda: None, lambda _: run_torchmetrics(targets, preds))
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in paths}
    memory: dict[str, float] = dict.fromkeys(paths, 0.0)
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, (prepare, run) in paths.items():
            seconds, peak, outputs[name] = timed(run, prepare())
            for clock, value in seconds.items():
                times[name][clock].append(value)
            memory[name] = max(memory[name], peak)
    medians = {
        name: {clock: statistics.median(values) for clock, values in clocks.items()}
        for name, clocks in times.items()
    }
    return report(medians, memory, outputs)


def report(
    medians: dict[str, dict[str, float]],
    memory: dict[str, float],
    outputs: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Print the table, stats, ratios and targets (speed targets by wall and by CPU time)."""
    labels = {
        "ours": "ours: COCOEvaluator update + compute",
        "DetectionMetrics": "ours: DetectionMetrics (COCO + VOC)",
        "direct": "faster_coco_eval COCOeval_faster direct",
        "direct, GC paused": "  the same, Python's GC paused as in ours",
        "pycocotools": "pycocotools COCOeval (JSON dicts)",
        "torchmetrics": "torchmetrics MeanAveragePrecision",
    }
    reference = outputs["pycocotools"]
    print()
    header = (
        f"{'path':<42}{'wall s':>8}{'CPU s':>8}{'peak MiB':>10}"
        f"{'pycocotools/x wall, CPU':>25}{'|d stats|':>11}"
    )
    print(header)
    print("-" * len(header))
    diffs = {}
    for name, clocks in medians.items():
        diffs[name] = float(np.abs(outputs[name][:12] - reference[:12]).max())
        speedups = [medians["pycocotools"][c] / clocks[c] for c in ("wall", "cpu")]
        print(
            f"{labels[name]:<42}{clocks['wall']:>8.2f}{clocks['cpu']:>8.2f}{memory[name]:>10.0f}"
            f"{speedups[0]:>18.1f}x{speedups[1]:>6.1f}x{diffs[name]:>11.1e}"
        )
    class_diff = float(np.abs(outputs["ours"][12:] - reference[12:]).max())
    print("\n12 COCO stats, ours vs pycocotools:")
    for key, mine, theirs in zip(STAT_KEYS, outputs["ours"], reference, strict=False):
        print(f"  {key:<10} {mine:8.5f} {theirs:8.5f}")
    print(f"per-class AP, ours vs pycocotools: max |d| {class_diff:.1e}")
    ratios = {
        clock: {
            "pycocotools/ours": medians["pycocotools"][clock] / medians["ours"][clock],
            "ours/direct": medians["ours"][clock] / medians["direct"][clock],
        }
        for clock in ("wall", "cpu")
    }
    if "torchmetrics" in medians:
        for clock, values in ratios.items():
            values["torchmetrics/ours"] = medians["torchmetrics"][clock] / medians["ours"][clock]
    for clock, values in ratios.items():
        name = "CPU" if clock == "cpu" else clock
        print(f"ratios ({name}): " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    targets: dict[str, Any] = {
        "ours >= 8x faster than pycocotools": {
            clock: values["pycocotools/ours"] >= 8.0 for clock, values in ratios.items()
        },
        "ours within 1.5x of faster_coco_eval direct": {
            clock: values["ours/direct"] <= 1.5 for clock, values in ratios.items()
        },
        "all 12 stats within 1e-3 of pycocotools": diffs["ours"] <= 1e-3,
    }
    print("targets:")
    for target, met in targets.items():
        if isinstance(met, dict):
            verdict = ", ".join(
                f"{'met' if ok else 'NOT met'} by {'CPU' if c == 'cpu' else c} time"
                for c, ok in met.items()
            )
        else:
            verdict = "met" if met else "NOT met"
        print(f"  {target:<46} {verdict}")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"memory: peak RSS one run adds (largest over the runs); process max {maxrss:.0f} MiB")
    return {
        "seconds": medians,
        "peak_mib": memory,
        "ratios": ratios,
        "stat_diff": diffs,
        "class_ap_diff": class_diff,
        "targets": targets,
    }


if __name__ == "__main__":
    main()
