"""Detection metrics of a validation or test run: COCO AP/AR and Pascal VOC AP.

COCO: :class:`ssd_lightning.coco_eval.COCOEvaluator` keeps every box of the evaluation as rows
of arrays (one tensor per batch), gathers all DDP ranks once in ``compute`` and evaluates with
faster_coco_eval's C++ ``COCOeval_faster`` (pycocotools' rules). Ranks may have seen different
numbers of images; no padding is needed, and empty padding images change nothing. After
``compute``, ``last_coco_eval`` holds the precision (T, R, K, A, M) and recall (T, K, A, M)
arrays, their class labels and the gathered detection and ground-truth rows: what
:mod:`ssd_lightning.error_analysis` draws per-class precision/recall curves and a confusion
matrix from.
``backend="torchmetrics"`` evaluates the same gathered boxes with torchmetrics'
``MeanAveragePrecision`` instead (slower; a cross-check). VOC:
:class:`ssd_lightning.voc_eval.VOCEvaluator` (a torchmetrics ``Metric``: it matches at
``update`` and syncs its per-detection flags itself).

Difficult (VOC) and crowd (COCO) objects arrive as ``targets[i]["difficult"]`` and are ignored by
both metrics: the VOC evaluator skips detections matched to them, and the COCO evaluation takes
them as ``iscrowd``. COCO's crowd rule is slightly looser than VOC's: a detection is ignored when
its intersection with the crowd box covers >= IoU-threshold of the *detection's* area (not IoU),
and it is only tried after every non-crowd GT; so on data with difficult objects the two can
differ slightly beyond their interpolation.

COCO evaluation keeps the 100 top-scored detections per image and class (its standard
``maxDets``; SSD keeps up to 200 per image by design); the VOC evaluator keeps all of them, as the
devkit does. Timings of both backends against pycocotools: ``scripts/bench_eval.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ssd_lightning.coco_eval import COCOCurves, COCOEvaluator
from ssd_lightning.voc_eval import VOCEvaluator


class DetectionMetrics(torch.nn.Module):
    """COCO AP/AR and Pascal VOC AP over a whole evaluation set, synced across DDP ranks.

    An ``nn.Module`` (holding the VOC ``Metric``) so it moves with the LightningModule's device.

    Args:
        class_names: Foreground class names; label k (1..C-1) is ``class_names[k - 1]``.
        backend: COCO evaluation: ``faster_coco_eval`` (default) or ``torchmetrics``.

    ``update(preds, targets)``: per image, ``preds`` dicts with ``boxes`` (n, 4) xyxy pixels,
    ``scores`` (n,) and ``labels`` (n,) int64; ``targets`` dicts with ``boxes``, ``labels`` and
    optional ``difficult`` (n,) bool. ``compute()`` (collective under DDP: every rank calls it
    and gets the same results) returns floats keyed ``mAP``, ``mAP_50``, ``mAP_75``,
    ``mAP_small``, ``mAP_medium``, ``mAP_large``, ``AR_1``, ``AR_10``, ``AR_100``,
    ``AR_small``, ``AR_medium``, ``AR_large`` (COCO), ``mAP_voc07``, ``mAP_voc`` (VOC),
    ``AP/<name>`` (COCO AP@[.5:.95] per class) and ``AP_voc07/<name>``. -1 means undefined (no
    GT for that class or size range). ``last_coco_eval`` keeps the :class:`COCOCurves` of the
    latest ``compute()`` (also after ``reset()``), rows included (56 bytes per box).
    """

    def __init__(self, class_names: Sequence[str], backend: str = "faster_coco_eval") -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.coco = COCOEvaluator(range(1, len(self.class_names) + 1), backend=backend)
        self.voc = VOCEvaluator(self.class_names)
        self.last_coco_eval: COCOCurves | None = None

    def update(
        self, preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> None:
        """Add one batch of per-image predictions and ground truth."""
        self.coco.update(preds, targets)
        self.voc.update(
            [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
            [dict(t) for t in targets],
        )

    def compute(self) -> dict[str, float]:
        """All metrics as flat ``name -> float``."""
        self.last_coco_eval = self.coco.compute()
        results = self.last_coco_eval.summary()
        voc = self.voc.compute()
        results["mAP_voc07"] = voc["mAP_voc07"]
        results["mAP_voc"] = voc["mAP_voc"]
        per_class = self.last_coco_eval.per_class_ap()
        for k, name in enumerate(self.class_names, start=1):
            results[f"AP/{name}"] = per_class.get(k, -1.0)
        for name in self.class_names:
            results[f"AP_voc07/{name}"] = voc[f"AP_voc07/{name}"]
        return results

    def reset(self) -> None:
        """Forget everything seen (call at the start of each evaluation)."""
        self.coco.reset()
        self.voc.reset()


def format_table(results: Mapping[str, float]) -> str:
    """Readable text table of :meth:`DetectionMetrics.compute` results (-1 shown as ``-``).

    Summary rows (COCO AP, AP50, AP75, APs/m/l, AR@1/10/100, ARs/m/l, VOC07 and VOC2010+ mAP),
    then one row per class with its COCO AP and VOC07 AP.
    """
    summary = [
        ("COCO AP@[.5:.95]", "mAP"),
        ("COCO AP50", "mAP_50"),
        ("COCO AP75", "mAP_75"),
        ("COCO AP small", "mAP_small"),
        ("COCO AP medium", "mAP_medium"),
        ("COCO AP large", "mAP_large"),
        ("COCO AR@1", "AR_1"),
        ("COCO AR@10", "AR_10"),
        ("COCO AR@100", "AR_100"),
        ("COCO AR small", "AR_small"),
        ("COCO AR medium", "AR_medium"),
        ("COCO AR large", "AR_large"),
        ("VOC07 mAP (11-point)", "mAP_voc07"),
        ("VOC mAP (area)", "mAP_voc"),
    ]
    names = [key.split("/", 1)[1] for key in results if key.startswith("AP/")]
    width = max([len(label) for label, _ in summary] + [len(n) for n in names])
    lines = [f"{'metric':<{width}}  {'value':>8}", "-" * (width + 10)]
    lines += [f"{label:<{width}}  {_fmt(results.get(key))}" for label, key in summary]
    if names:
        lines += ["", f"{'class':<{width}}  {'AP':>8}  {'AP_voc07':>8}", "-" * (width + 20)]
        for name in names:
            coco_ap, voc_ap = results.get(f"AP/{name}"), results.get(f"AP_voc07/{name}")
            lines.append(f"{name:<{width}}  {_fmt(coco_ap)}  {_fmt(voc_ap)}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    """A metric value in a fixed-width cell; missing or undefined (< 0) as ``-``."""
    if value is None or float(value) < 0:
        return f"{'-':>8}"
    return f"{float(value):8.4f}"
