import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from ssd_lightning.voc_eval import VOCEvaluator, _batched_iou, match_detections, voc_ap

NAMES = ["cat", "dog", "bird"]


def det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def gt(boxes, labels, difficult=None):
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if difficult is not None:
        target["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return target


def test_voc_ap_golden_curves():
    # One detection, a TP, with 2 GT: recall 0.5 at precision 1.
    rec, prec = torch.tensor([0.5]), torch.tensor([1.0])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(6 / 11)  # t = 0, .1, ..., .5
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5)
    # FP, TP, TP with 2 GT: precision 0, 1/2, 2/3 at recall 0, 1/2, 1; envelope 2/3 everywhere.
    rec, prec = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(2 / 3)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(2 / 3)
    # Empty curve (no detections).
    assert voc_ap(torch.zeros(0), torch.zeros(0), use_07_metric=True) == 0.0
    assert voc_ap(torch.zeros(0), torch.zeros(0), use_07_metric=False) == 0.0


def hand_worked_batch():
    """Two images, classes cat (1), dog (2), bird (3).

    Image A GT: cat g1 [0,0,10,10], cat g2 [20,20,30,30], dog h1 [0,0,20,20].
    Image B GT: cat g3 [0,0,10,10], cat g4 [50,50,60,60] difficult, dog h2 [30,30,60,60].
    """
    targets = [
        gt([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 20, 20]], [1, 1, 2], [0, 0, 0]),
        gt([[0, 0, 10, 10], [50, 50, 60, 60], [30, 30, 60, 60]], [1, 1, 2], [0, 1, 0]),
    ]
    preds = [
        det(
            [[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 20, 20], [40, 40, 50, 50]],
            [0.9, 0.8, 0.4, 0.95],
            [1, 1, 2, 2],
        ),
        det(
            [[50, 50, 60, 60], [100, 100, 110, 110], [0, 0, 10, 10], [0, 0, 5, 5]],
            [0.7, 0.6, 0.5, 0.3],
            [1, 1, 1, 3],
        ),
    ]
    return preds, targets


def test_match_detections_hand_worked():
    preds, targets = hand_worked_batch()
    is_tp, ignored = match_detections(preds, targets)
    # A: cat .9 hits g1 (TP); cat .8 IoU .9 with taken g1 (FP duplicate); dog .4 hits h1 (TP);
    #    dog .95 overlaps nothing (FP).
    # B: cat .7 hits difficult g4 (ignored); cat .6 nothing (FP); cat .5 hits g3 (TP);
    #    bird .3 has no bird GT (FP).
    assert is_tp.tolist() == [True, False, True, False, False, False, True, False]
    assert ignored.tolist() == [False, False, False, False, True, False, False, False]


def test_voc_evaluator_hand_worked():
    preds, targets = hand_worked_batch()
    metric = VOCEvaluator(NAMES)
    metric.update(preds, targets)
    out = metric.compute()
    # cat: npos 3 (g4 difficult). Scores .9 TP, .8 FP, (.7 ignored), .6 FP, .5 TP
    #   precision 1, 1/2, 1/3, 1/2 at recall 1/3, 1/3, 1/3, 2/3.
    #   VOC07: t = 0,.1,.2,.3 -> 1; t = .4,.5,.6 -> 1/2; t = .7..1 -> 0: (4 + 1.5) / 11 = 0.5.
    #   area: envelope 1 on [0, 1/3], 1/2 on [1/3, 2/3]: 1/3 + 1/6 = 0.5.
    assert out["AP_voc07/cat"] == pytest.approx(0.5)
    assert out["AP_voc/cat"] == pytest.approx(0.5)
    # dog: npos 2. Scores .95 FP, .4 TP: precision 0, 1/2 at recall 0, 1/2.
    #   VOC07: t = 0..0.5 (6 points) -> 1/2: 3/11.  area: 1/2 * 1/2 = 0.25.
    assert out["AP_voc07/dog"] == pytest.approx(3 / 11)
    assert out["AP_voc/dog"] == pytest.approx(0.25)
    # bird: no GT -> undefined (-1) and left out of the means.
    assert out["AP_voc07/bird"] == -1.0
    assert out["AP_voc/bird"] == -1.0
    assert out["mAP_voc07"] == pytest.approx((0.5 + 3 / 11) / 2)
    assert out["mAP_voc"] == pytest.approx((0.5 + 0.25) / 2)


def test_same_result_when_images_arrive_one_by_one():
    preds, targets = hand_worked_batch()
    batched = VOCEvaluator(NAMES)
    batched.update(preds, targets)
    single = VOCEvaluator(NAMES)
    for p, t in zip(preds, targets, strict=True):
        single.update([p], [t])
    assert single.compute() == pytest.approx(batched.compute())


def test_devkit_rule_best_gt_taken_is_a_duplicate():
    # Two overlapping GT; the second detection's best GT (IoU .9) is taken, so VOC counts it as a
    # FP even though it also has IoU >= .5 with the free GT (COCO would match it there instead).
    targets = [gt([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1])]
    preds = [det([[0, 0, 10, 10], [0.5, 0, 10.5, 10]], [0.9, 0.8], [1, 1])]
    iou = box_iou(preds[0]["boxes"], targets[0]["boxes"])
    assert iou[1, 0] > iou[1, 1] >= 0.5
    is_tp, _ = match_detections(preds, targets)
    assert is_tp.tolist() == [True, False]


def test_difficult_only_detections_change_nothing():
    preds, targets = hand_worked_batch()
    base = VOCEvaluator(NAMES)
    base.update(preds, targets)
    # Add many detections on the difficult cat g4 at high scores: all ignored.
    extra = det([[50, 50, 60, 60], [50, 51, 60, 60], [49, 50, 60, 60]], [0.99, 0.98, 0.97], [1] * 3)
    more = {k: torch.cat([preds[1][k], extra[k]]) for k in extra}
    with_extra = VOCEvaluator(NAMES)
    with_extra.update([preds[0], more], targets)
    assert with_extra.compute() == pytest.approx(base.compute())


def test_perfect_detector_gives_one():
    torch.manual_seed(0)
    preds, targets = [], []
    for _ in range(5):
        xy = torch.rand(4, 2) * 100
        boxes = torch.cat([xy, xy + 10 + torch.rand(4, 2) * 20], dim=1)
        labels = torch.randint(1, 4, (4,))
        targets.append(
            {"boxes": boxes, "labels": labels, "difficult": torch.zeros(4, dtype=torch.bool)}
        )
        preds.append({"boxes": boxes.clone(), "scores": torch.rand(4), "labels": labels.clone()})
    metric = VOCEvaluator(NAMES)
    metric.update(preds, targets)
    out = metric.compute()
    assert out["mAP_voc07"] == pytest.approx(1.0)
    assert out["mAP_voc"] == pytest.approx(1.0)


def test_no_detections_and_no_images():
    metric = VOCEvaluator(NAMES)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["mAP_voc"] == -1.0  # nothing seen: undefined
    metric.update([det([], [], [])], [gt([[0, 0, 5, 5]], [2])])
    out = metric.compute()
    assert out["AP_voc/dog"] == 0.0
    assert out["mAP_voc07"] == 0.0


def test_batched_iou_matches_torchvision():
    torch.manual_seed(1)
    a = torch.rand(3, 5, 2) * 50
    a = torch.cat([a, a + torch.rand(3, 5, 2) * 30], dim=-1)
    b = torch.rand(3, 4, 2) * 50
    b = torch.cat([b, b + torch.rand(3, 4, 2) * 30], dim=-1)
    expected = torch.stack([box_iou(a[i], b[i]) for i in range(3)])
    torch.testing.assert_close(_batched_iou(a, b), expected)


def devkit_reference(preds, targets, num_classes, use_07):
    """Straight port of VOCevaldet.m (detection loop, plain IoU) for cross-checking."""
    aps = {}
    for c in range(1, num_classes):
        records = []
        for i, p in enumerate(preds):
            for j in torch.nonzero(p["labels"] == c).flatten().tolist():
                records.append((float(p["scores"][j]), i, p["boxes"][j]))
        records.sort(key=lambda r: -r[0])
        taken = [torch.zeros(len(t["labels"]), dtype=torch.bool) for t in targets]
        npos = sum(int(((t["labels"] == c) & ~t["difficult"]).sum()) for t in targets)
        tp, fp = [], []
        for _, i, box in records:
            t = targets[i]
            ious = box_iou(box[None], t["boxes"])[0]
            ious[t["labels"] != c] = -1
            if len(ious) and ious.max() >= 0.5:
                jmax = int(ious.argmax())
                if t["difficult"][jmax]:
                    continue
                tp.append(0.0 if taken[i][jmax] else 1.0)
                taken[i][jmax] = True
            else:
                tp.append(0.0)
            fp.append(1.0 - tp[-1])
        if npos == 0:
            continue
        ctp = torch.tensor(tp, dtype=torch.float64).cumsum(0)
        cfp = torch.tensor(fp, dtype=torch.float64).cumsum(0)
        aps[c] = voc_ap(ctp / npos, ctp / (ctp + cfp).clamp(min=1e-12), use_07)
    return aps


def random_scene(seed, num_images=20, num_classes=4, separated=False):
    """Random GT and noisy detections around them (plus clutter), with difficult flags."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(num_images):
        n = int(torch.randint(0, 6, (1,), generator=g))
        if separated:  # GT on a grid of disjoint cells: no detection can overlap two GT >= .5
            cells = torch.randperm(16, generator=g)[:n]
            xy = torch.stack([cells % 4, cells // 4], dim=1).float() * 100
            boxes = torch.cat([xy + 20, xy + 60 + torch.rand(n, 2, generator=g) * 20], dim=1)
        else:
            xy = torch.rand(n, 2, generator=g) * 200
            boxes = torch.cat([xy, xy + 15 + torch.rand(n, 2, generator=g) * 60], dim=1)
        labels = torch.randint(1, num_classes, (n,), generator=g)
        difficult = torch.rand(n, generator=g) < (0.0 if separated else 0.2)
        targets.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        k = int(torch.randint(0, 12, (1,), generator=g))
        src = torch.randint(0, max(n, 1), (k,), generator=g)
        if n:
            jitter = torch.randn(k, 4, generator=g) * 6
            pboxes, plabels = boxes[src] + jitter, labels[src].clone()
            pboxes = torch.cat(
                [pboxes[:, :2].minimum(pboxes[:, 2:]), pboxes[:, :2].maximum(pboxes[:, 2:])], 1
            )
            flip = torch.rand(k, generator=g) < 0.15
            plabels[flip] = torch.randint(1, num_classes, (int(flip.sum()),), generator=g)
        else:
            pboxes, plabels = torch.zeros(k, 4), torch.randint(1, num_classes, (k,), generator=g)
        clutter_xy = torch.rand(3, 2, generator=g) * 250
        clutter = torch.cat([clutter_xy, clutter_xy + 20], dim=1)
        preds.append(
            {
                "boxes": torch.cat([pboxes, clutter]),
                "scores": torch.rand(k + 3, generator=g),
                "labels": torch.cat([plabels, torch.randint(1, num_classes, (3,), generator=g)]),
            }
        )
    return preds, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_devkit_reference_loop(seed):
    preds, targets = random_scene(seed)
    metric = VOCEvaluator(NAMES)
    metric.update(preds[:7], targets[:7])
    metric.update(preds[7:], targets[7:])
    out = metric.compute()
    for use_07, key in ((True, "voc07"), (False, "voc")):
        ref = devkit_reference(preds, targets, len(NAMES) + 1, use_07)
        assert ref, "scene has no GT"
        for c, ap in ref.items():
            assert out[f"AP_{key}/{NAMES[c - 1]}"] == pytest.approx(ap, abs=1e-9)
        assert out[f"mAP_{key}"] == pytest.approx(sum(ref.values()) / len(ref), abs=1e-9)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
@pytest.mark.parametrize("seed", [3, 4])
def test_area_ap_agrees_with_coco_ap50(seed, backend):
    # With disjoint GT (and no difficult/crowd), VOC and COCO matching give the same TP/FP flags:
    # a box with IoU >= .5 to two disjoint GT would need |d∩A| + |d∩B| >= |d|, impossible (up to a
    # measure-zero edge), so "best GT even if taken" and "best free GT" coincide. What is left is
    # the interpolation: COCO averages the same precision envelope f (non-increasing on [0, 1]) at
    # 101 recall points, VOC2010+ integrates it. For such f, the 101-point mean S/101 and the
    # integral are both between sum(f(r_1..r_100))/100 and sum(f(r_0..r_99))/100, so they differ by
    # at most 1/100 per class, and so for the mean over classes.
    preds, targets = random_scene(seed, num_images=40, separated=True)
    ours = VOCEvaluator(NAMES)
    ours.update(preds, targets)
    coco = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], backend=backend)
    coco.update(preds, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    coco_ap50 = float(coco.compute()["map"])
    voc = ours.compute()["mAP_voc"]
    assert 0.2 < voc < 0.95  # a non-trivial curve
    assert voc == pytest.approx(coco_ap50, abs=0.01 + 1e-6)


def _ddp_worker(rank, world_size, port, result_file):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    preds, targets = random_scene(0)
    results = []
    # Uneven shards (different state lengths), and rank 0 never calling update at all.
    for first_shard in (3, 0):
        metric = VOCEvaluator(NAMES)
        shard = slice(0, first_shard) if rank == 0 else slice(first_shard, None)
        if shard.stop != 0:
            metric.update(preds[shard], targets[shard])
        results.append(metric.compute())
    if rank == 0:
        torch.save(results, result_file)
    dist.destroy_process_group()


def test_ddp_sync_equals_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(result_file)), nprocs=2, join=True)
    preds, targets = random_scene(0)
    single = VOCEvaluator(NAMES)
    single.update(preds, targets)
    expected = single.compute()
    uneven, rank0_empty = torch.load(result_file)
    assert uneven == pytest.approx(expected)
    assert rank0_empty == pytest.approx(expected)
