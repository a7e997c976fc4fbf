"""Detection metrics of a validation or test run: COCO AP (torchmetrics) and Pascal VOC AP.

Difficult (VOC) and crowd (COCO) objects arrive as ``targets[i]["difficult"]`` and are ignored by
both metrics: the VOC evaluator skips detections matched to them, and the COCO metric receives them
as ``iscrowd``. COCO's crowd rule is slightly looser than VOC's: a detection is ignored when its
intersection with the crowd box covers >= IoU-threshold of the *detection's* area (not IoU), and it
is only tried after every non-crowd GT; so on data with difficult objects the two can differ
slightly beyond their interpolation.

COCO evaluation keeps the 100 top-scored detections per image and class (its standard
``maxDets``; torchmetrics' warning about more than 100 per image is switched off since SSD keeps up
to 200 per image by design); the VOC evaluator keeps all of them, as the devkit does.

Cost, measured on the 2-core CPU box: 4960 images x 200 detections take ~10 s of ``update`` and
~45 s of ``compute``, nearly all in torchmetrics' per-box conversion to COCO format; the VOC part
is ~0.5 s of that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from ssd_lightning.voc_eval import VOCEvaluator

# Flat result key -> key in torchmetrics' MeanAveragePrecision output.
_COCO_KEYS = {
    "mAP": "map",
    "mAP_50": "map_50",
    "mAP_75": "map_75",
    "mAP_small": "map_small",
    "mAP_medium": "map_medium",
    "mAP_large": "map_large",
}


class DetectionMetrics(torch.nn.Module):
    """COCO AP and Pascal VOC AP over a whole evaluation set, synced across DDP ranks.

    An ``nn.Module`` holding two torchmetrics ``Metric`` children, so it moves with the
    LightningModule's device and each child gathers its own state under DDP on ``compute``.

    Args:
        class_names: Foreground class names; label k (1..C-1) is ``class_names[k - 1]``.
        backend: COCO evaluation backend of torchmetrics (``faster_coco_eval`` or
            ``pycocotools``).

    ``update(preds, targets)``: per image, ``preds`` dicts with ``boxes`` (n, 4) xyxy pixels,
    ``scores`` (n,) and ``labels`` (n,) int64; ``targets`` dicts with ``boxes``, ``labels`` and
    optional ``difficult`` (n,) bool. ``compute()`` returns floats keyed ``mAP``, ``mAP_50``,
    ``mAP_75``, ``mAP_small``, ``mAP_medium``, ``mAP_large`` (COCO), ``mAP_voc07``, ``mAP_voc``
    (VOC), ``AP/<name>`` (COCO AP@[.5:.95] per class) and ``AP_voc07/<name>``. -1 means
    undefined (no GT for that class or size range).
    """

    def __init__(self, class_names: Sequence[str], backend: str = "faster_coco_eval") -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.coco = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", class_metrics=True, backend=backend
        )
        self.coco.warn_on_many_detections = False
        self.voc = VOCEvaluator(self.class_names)

    def update(
        self, preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> None:
        """Add one batch of per-image predictions and ground truth."""
        preds = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
        coco_targets = []
        for t in targets:
            difficult = t.get("difficult", torch.zeros_like(t["labels"], dtype=torch.bool))
            coco_targets.append(
                {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": difficult.long()}
            )
        self.coco.update(preds, coco_targets)
        self.voc.update(preds, [dict(t) for t in targets])

    def compute(self) -> dict[str, float]:
        """All metrics as flat ``name -> float``."""
        coco = self.coco.compute()
        results = {key: float(coco[src]) for key, src in _COCO_KEYS.items()}
        voc = self.voc.compute()
        results["mAP_voc07"] = voc["mAP_voc07"]
        results["mAP_voc"] = voc["mAP_voc"]
        per_class = dict(
            zip(
                coco["classes"].reshape(-1).tolist(),
                coco["map_per_class"].reshape(-1).tolist(),
                strict=True,
            )
        )
        for k, name in enumerate(self.class_names, start=1):
            results[f"AP/{name}"] = float(per_class.get(k, -1.0))
        for name in self.class_names:
            results[f"AP_voc07/{name}"] = voc[f"AP_voc07/{name}"]
        return results

    def reset(self) -> None:
        """Forget everything seen (call at the start of each evaluation)."""
        self.coco.reset()
        self.voc.reset()


def format_table(results: Mapping[str, float]) -> str:
    """Readable text table of :meth:`DetectionMetrics.compute` results (-1 shown as ``-``).

    Summary rows (COCO AP, AP50, AP75, APs/m/l, VOC07 and VOC2010+ mAP), then one row per class
    with its COCO AP and VOC07 AP.
    """
    summary = [
        ("COCO AP@[.5:.95]", "mAP"),
        ("COCO AP50", "mAP_50"),
        ("COCO AP75", "mAP_75"),
        ("COCO AP small", "mAP_small"),
        ("COCO AP medium", "mAP_medium"),
        ("COCO AP large", "mAP_large"),
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
