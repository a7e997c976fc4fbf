import pytest
import torch

from ssd_lightning.metrics import DetectionMetrics, format_table

NAMES = ["circle", "square", "triangle"]


def scene(seed=0, num_images=6):
    """GT boxes of all three classes and all COCO size ranges (areas 16^2 .. 150^2 px)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(num_images):
        n = 6
        xy = torch.rand(n, 2, generator=g) * 300
        side = torch.tensor([16.0, 20.0, 50.0, 60.0, 120.0, 150.0])[:, None]
        boxes = torch.cat([xy, xy + side], dim=1)
        labels = torch.tensor([1, 2, 3, 1, 2, 3])
        targets.append({"boxes": boxes, "labels": labels, "difficult": torch.zeros(n, dtype=bool)})
    return targets


def perfect(targets):
    return [
        {
            "boxes": t["boxes"].clone(),
            "scores": torch.linspace(1, 0.5, len(t["labels"])),
            "labels": t["labels"],
        }
        for t in targets
    ]


def test_perfect_predictions_give_one_and_all_keys():
    targets = scene()
    metrics = DetectionMetrics(NAMES)
    metrics.update(perfect(targets), targets)
    out = metrics.compute()
    expected = {"mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large"}
    expected |= {"AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large"}
    expected |= {"mAP_voc07", "mAP_voc"}
    expected |= {f"AP/{n}" for n in NAMES} | {f"AP_voc07/{n}" for n in NAMES}
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    for key in expected - {"AR_1"}:
        assert out[key] == pytest.approx(1.0), key
    # Each image has 2 objects per class; COCO's AR@1 keeps 1 detection per image and class.
    assert out["AR_1"] == pytest.approx(0.5)


def test_per_class_keys_follow_labels():
    # Only "square" (label 2) is detected; circle and triangle are missed entirely.
    targets = scene()
    preds = []
    for p in perfect(targets):
        keep = p["labels"] == 2
        preds.append({k: v[keep] for k, v in p.items()})
    metrics = DetectionMetrics(NAMES)
    metrics.update(preds, targets)
    out = metrics.compute()
    assert out["AP/square"] == pytest.approx(1.0)
    assert out["AP_voc07/square"] == pytest.approx(1.0)
    for name in ("circle", "triangle"):
        assert out[f"AP/{name}"] == 0.0
        assert out[f"AP_voc07/{name}"] == 0.0
    assert out["mAP"] == pytest.approx(1 / 3)
    assert out["mAP_voc07"] == pytest.approx(1 / 3)


def test_class_without_gt_is_undefined():
    targets = [{k: v[t["labels"] != 3] for k, v in t.items()} for t in scene()]
    metrics = DetectionMetrics(NAMES)
    metrics.update(perfect(targets), targets)
    out = metrics.compute()
    assert out["AP/triangle"] == -1.0
    assert out["AP_voc07/triangle"] == -1.0
    assert out["mAP"] == pytest.approx(1.0)
    assert out["mAP_voc07"] == pytest.approx(1.0)


def test_difficult_ignored_by_both():
    targets = scene()
    preds = perfect(targets)
    # Mark the two largest boxes of every image difficult and leave them undetected: with the
    # difficult objects ignored, the remaining perfect detections still score 1.0.
    hard_targets, hard_preds = [], []
    for t, p in zip(targets, preds, strict=True):
        difficult = torch.tensor([False, False, False, False, True, True])
        hard_targets.append({**t, "difficult": difficult})
        hard_preds.append({k: v[~difficult] for k, v in p.items()})
    # A detection on a difficult object is neither TP nor FP either: add one, with the top score.
    extra = hard_targets[0]["boxes"][4:5]
    hard_preds[0] = {
        "boxes": torch.cat([extra, hard_preds[0]["boxes"]]),
        "scores": torch.cat([torch.tensor([2.0]), hard_preds[0]["scores"]]),
        "labels": torch.cat([hard_targets[0]["labels"][4:5], hard_preds[0]["labels"]]),
    }
    metrics = DetectionMetrics(NAMES)
    metrics.update(hard_preds, hard_targets)
    out = metrics.compute()
    assert out["mAP"] == pytest.approx(1.0)
    assert out["mAP_voc07"] == pytest.approx(1.0)
    assert out["mAP_large"] == -1.0  # the only large objects were difficult
    # Without the difficult flags the same predictions miss objects and have a FP.
    metrics.reset()
    metrics.update(hard_preds, targets)
    out = metrics.compute()
    assert out["mAP"] < 0.9
    assert out["mAP_voc07"] < 0.9


def test_format_table_lists_summary_and_classes():
    targets = scene()
    metrics = DetectionMetrics(NAMES)
    metrics.update(perfect(targets), targets)
    out = metrics.compute()
    out["AP/triangle"] = -1.0
    table = format_table(out)
    lines = table.splitlines()
    assert any(line.startswith("COCO AP50") and line.endswith("1.0000") for line in lines)
    assert any(line.startswith("VOC07 mAP") and line.endswith("1.0000") for line in lines)
    assert any(line.startswith("COCO AR@100") and line.endswith("1.0000") for line in lines)
    assert any(line.startswith("COCO AR@1 ") and line.endswith("0.5000") for line in lines)
    square = next(line for line in lines if line.startswith("square"))
    assert square.split() == ["square", "1.0000", "1.0000"]
    assert next(line for line in lines if line.startswith("triangle")).split() == [
        "triangle",
        "-",
        "1.0000",
    ]


def test_last_coco_eval_keeps_the_evaluated_rows():
    """The rows behind the figures (for the confusion matrix): every detection and object of
    every image, crowd flags included; kept after reset() until the next compute()."""
    targets = scene()
    targets[0]["difficult"] = torch.tensor([True, False, False, False, False, False])
    preds = perfect(targets)
    metrics = DetectionMetrics(NAMES)
    metrics.update(preds[:4], targets[:4])
    metrics.update(preds[4:], targets[4:])
    metrics.compute()
    metrics.reset()
    curves = metrics.last_coco_eval
    assert curves.dets.shape == (36, 7) and curves.gts.shape == (36, 7)
    assert sorted(set(curves.dets[:, 0].tolist())) == list(range(6))
    assert curves.gts[:, 5].tolist() == [1.0] + [0.0] * 35
    expected = torch.cat([t["boxes"] for t in targets]).double()
    torch.testing.assert_close(torch.from_numpy(curves.gts[:, 1:3]), expected[:, :2])
    torch.testing.assert_close(
        torch.from_numpy(curves.gts[:, 3:5]), expected[:, 2:] - expected[:, :2]
    )
