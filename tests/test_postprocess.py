"""PostProcessor: limits, NMS groups, scaling, clipping, and torchvision's SSD post-processing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import batched_nms

import ssd_lightning.postprocess as pp
from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.postprocess import (
    PostProcessor,
    class_scores,
    grouped_nms,
    rank_in_groups,
    row_max,
    sort_by_group_and_score,
)

TV_CODER = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))  # torchvision SSD: 1 / variances


class BoxesAsOffsets:
    """Test coder whose 'offsets' already are normalised xyxy boxes."""

    def decode(self, loc: torch.Tensor) -> torch.Tensor:
        return loc


def logits_for(labels: list[list[int]], num_classes: int, confidence: float = 8.0):
    """(B, A, C) logits that give every box one confident class (0 = background)."""
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()
    return onehot * confidence


def torchvision_detections(anchors, loc, logits, sizes, **settings):
    """torchvision's SSD.postprocess_detections with anchors scaled to each original size."""
    ssd = SimpleNamespace(box_coder=TV_CODER, **settings)
    image_anchors = [anchors.xyxy * torch.tensor([w, h, w, h]) for h, w in sizes]
    head = {"bbox_regression": loc, "cls_logits": logits}
    return SSD.postprocess_detections(ssd, head, image_anchors, [tuple(s) for s in sizes])


def assert_same_detections(ours, theirs, atol=1e-3):
    """Equal as sets: order by (label, score) on both sides, then compare."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs, strict=True):
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        assert len(o["scores"]) == len(t["scores"])
        io = torch.argsort(o["labels"].double() * 2 + o["scores"].double())
        it = torch.argsort(t["labels"].double() * 2 + t["scores"].double())
        assert torch.equal(o["labels"][io], t["labels"][it])
        torch.testing.assert_close(o["scores"][io], t["scores"][it])
        torch.testing.assert_close(o["boxes"][io], t["boxes"][it], atol=atol, rtol=0)


def small_setup(batch=3, num_classes=4, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    anchors = DefaultBoxes(300, [5, 3, 1], aspect_ratios=[[2], [2, 3], [2]])
    loc = torch.randn(batch, len(anchors), 4, generator=g) * 0.5
    logits = torch.randn(batch, len(anchors), num_classes, generator=g) * spread
    sizes = [[300, 300], [240, 500], [480, 320]][:batch]
    return anchors, loc, logits, sizes


@pytest.mark.parametrize(
    "settings",
    [
        {
            "score_thresh": 0.01,
            "nms_thresh": 0.45,
            "topk_candidates": 200,
            "detections_per_img": 200,
        },
        {"score_thresh": 0.2, "nms_thresh": 0.3, "topk_candidates": 7, "detections_per_img": 15},
        {"score_thresh": 0.01, "nms_thresh": 0.6, "topk_candidates": 50, "detections_per_img": 3},
        {"score_thresh": 0.0, "nms_thresh": 0.5, "topk_candidates": 10, "detections_per_img": 30},
    ],
)
def test_matches_torchvision_postprocess_detections(settings):
    anchors, loc, logits, sizes = small_setup()
    post = PostProcessor(
        SSDBoxCoder(anchors.cxcywh),
        score_threshold=settings["score_thresh"],
        nms_threshold=settings["nms_thresh"],
        candidates_per_class=settings["topk_candidates"],
        max_detections=settings["detections_per_img"],
    )
    ours = post(loc, logits, torch.tensor(sizes))
    assert sum(len(d["scores"]) for d in ours) > 0
    assert_same_detections(ours, torchvision_detections(anchors, loc, logits, sizes, **settings))


def clustered_loc(anchors, sizes, seed=2, jitter=0.005):
    """Offsets decoding every box to one of 3 jittered copies: NMS keeps ~1 per (image, class)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8], [0.2, 0.6, 0.5, 0.9]])
    pick = torch.randint(0, 3, (len(sizes), len(anchors)), generator=g)
    boxes = centres[pick] + torch.randn(len(sizes), len(anchors), 4, generator=g) * jitter
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)[:, None]
    image_anchors = anchors.xyxy[None] * scale
    return torch.stack(
        [
            TV_CODER.encode_single(b * s, a)
            for b, s, a in zip(boxes, scale, image_anchors, strict=True)
        ]
    )


def spy(monkeypatch, name):
    """Record the arguments of every call of ``ssd_lightning.postprocess.<name>``."""
    calls = []
    original = getattr(pp, name)
    monkeypatch.setattr(pp, name, lambda *a: calls.append(a) or original(*a))
    return calls


def test_heavy_suppression_sends_more_candidates_and_still_matches_torchvision(monkeypatch):
    # Every anchor fits in the first m = 3 * max_detections: all pairs are candidates, but only
    # the m best of each image enter NMS first; too few survive, so 4x more are sent (all of
    # them here).
    anchors, _, logits, sizes = small_setup(seed=1, spread=1.0)
    loc = clustered_loc(anchors, sizes)
    logits[..., 0] += 3.0  # background dominant: ~400 of 474 pairs per image pass
    nms_inputs = spy(monkeypatch, "grouped_nms")
    best_pairs = spy(monkeypatch, "best_pairs")
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=100)
    ours = post(loc, logits, torch.tensor(sizes))
    assert not best_pairs  # every image sent all its pairs
    assert [len(a[0]) for a in nms_inputs] == [3 * 300, 1215]  # 300 best per image, then all
    settings = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}
    theirs = torchvision_detections(anchors, loc, logits, sizes, detections_per_img=100, **settings)
    assert_same_detections(ours, theirs)
    assert all(len(d["scores"]) < 20 for d in ours)


def test_images_where_most_pairs_pass_send_their_best_pairs_then_more_then_all(monkeypatch):
    # All 158 anchors hold a candidate, more than m (m = 3 * 9 detections): the pairs of the m
    # best anchors are gathered first. Class 1 dominates and NMS keeps one box per (cluster,
    # class), so fewer than 9 survive: the pairs of the 2 m best anchors, then all (4 m is
    # most of the anchors).
    anchors, _, logits, sizes = small_setup(seed=3, spread=1.0)
    loc = clustered_loc(anchors, sizes, seed=4)
    logits[..., 1] += 2.0
    best_pairs = spy(monkeypatch, "best_pairs")
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=9)
    rounds = []
    nms_rounds = post._nms_rounds
    monkeypatch.setattr(post, "_nms_rounds", lambda c, *a: rounds.append(c) or nms_rounds(c, *a))
    ours = post(loc, logits, torch.tensor(sizes))
    assert [m for _, _, m, *_ in best_pairs] == [27, 54]
    sent = [len(r.score) for r in rounds]
    assert len(sent) == 3 and sent[0] < sent[1] < sent[2]
    settings = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}
    theirs = torchvision_detections(anchors, loc, logits, sizes, detections_per_img=9, **settings)
    assert_same_detections(ours, theirs)


def test_best_pairs_alone_when_enough_survive(monkeypatch):
    # Random boxes hardly overlap: the m best pairs of each image are enough.
    anchors, loc, logits, sizes = small_setup(seed=5, spread=1.0)
    best_pairs = spy(monkeypatch, "best_pairs")
    nms_inputs = spy(monkeypatch, "grouped_nms")
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=5)
    ours = post(loc, logits, torch.tensor(sizes))
    assert len(best_pairs) == 1 and len(nms_inputs) == 1
    assert len(nms_inputs[0][0]) <= 3 * 5 * len(sizes)
    assert all(len(d["scores"]) == 5 for d in ours)
    settings = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}
    theirs = torchvision_detections(anchors, loc, logits, sizes, detections_per_img=5, **settings)
    assert_same_detections(ours, theirs)


def trained_like_outputs(anchors, num_classes, batch, background, seed=0, objects=10):
    """Outputs like a trained SSD's: matched default boxes regress to their object (clusters)
    and score its class; logit noise with a per-image class preference; background raised."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, objects, 2, generator=g) * 0.8 + 0.1
    half = (torch.rand(batch, objects, 2, generator=g) * 0.3 + 0.05) / 2
    gt = torch.cat([centre - half, centre + half], dim=-1).clamp(0, 1)
    gt_labels = torch.randint(1, num_classes, (batch, objects), generator=g)
    coder = SSDBoxCoder(anchors.cxcywh)
    loc, labels = coder.encode_batch(gt, gt_labels, torch.ones(batch, objects, dtype=torch.bool))
    positive = labels > 0
    loc = loc + torch.randn(loc.shape, generator=g) * torch.where(positive, 0.3, 1.0)[..., None]
    logits = torch.randn(batch, len(anchors), num_classes, generator=g)
    logits += torch.randn(batch, 1, num_classes, generator=g) * 1.5
    logits.scatter_add_(-1, labels[..., None], positive[..., None] * 6.0)
    logits[..., 0] += background
    return loc, logits


@pytest.mark.parametrize(
    ("num_classes", "background", "pairs_range", "rows_dropped"),
    [
        (91, 10.6, (1500, 2500), True),  # ~2,000 pairs, on ~16% of the anchors
        (21, 6.1, (0.11, 0.15), False),  # ~13% of the pairs, on ~85% of the anchors
    ],
)
def test_trained_like_outputs_match_torchvision(
    monkeypatch, num_classes, background, pairs_range, rows_dropped
):
    # SSD300's 8732 default boxes; background dominant, boxes clustered on objects.
    scores = []
    original = pp.class_scores
    monkeypatch.setattr(pp, "class_scores", lambda *a: scores.append(original(*a)) or scores[-1])
    anchors = DefaultBoxes(300, [38, 19, 10, 5, 3, 1], sizes=[21, 45, 99, 153, 207, 261, 315])
    loc, logits = trained_like_outputs(anchors, num_classes, batch=2, background=background)
    passing = (logits.softmax(-1)[..., 1:] > 0.01).sum().item() / 2
    low, high = pairs_range
    if high < 1:  # a fraction of all pairs
        low, high = low * logits[0, :, 1:].numel(), high * logits[0, :, 1:].numel()
    assert low < passing < high
    sizes = [[300, 300], [480, 640]]
    ours = PostProcessor(SSDBoxCoder(anchors.cxcywh))(loc, logits, torch.tensor(sizes))
    settings = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}
    theirs = torchvision_detections(anchors, loc, logits, sizes, detections_per_img=200, **settings)
    assert_same_detections(ours, theirs)
    assert sum(len(d["scores"]) for d in ours) > 100
    assert (scores[0].row is not None) == rows_dropped  # softmax of some anchors only


def test_limits_threshold_and_candidates_per_class():
    anchors, loc, logits, sizes = small_setup(num_classes=6, spread=2.0)
    post = PostProcessor(
        SSDBoxCoder(anchors.cxcywh),
        score_threshold=0.1,
        nms_threshold=0.9,
        candidates_per_class=4,
        max_detections=12,
    )
    for det in post(loc, logits, torch.tensor(sizes)):
        assert len(det["scores"]) == 12  # plenty of candidates: exactly the limit
        assert (det["scores"] > 0.1).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])  # by decreasing score
        assert det["labels"].min() >= 1 and det["labels"].max() <= 5
        assert torch.bincount(det["labels"]).max() <= 4


def test_nms_suppresses_same_class_only_within_an_image():
    a = [0.1, 0.1, 0.5, 0.5]
    b = [0.12, 0.1, 0.52, 0.5]  # IoU(a, b) = 0.9
    c = [0.6, 0.6, 0.9, 0.9]  # far from both
    loc = torch.tensor([[a, b, c], [a, b, b]])
    logits = logits_for([[1, 1, 1], [1, 2, 1]], num_classes=3)
    logits[0, 0, 1] += 1.0  # a beats b in image 0
    logits[1, 2, 1] += 1.0  # the second b beats a in image 1
    sizes = torch.tensor([[100, 100], [100, 100]])
    image0, image1 = PostProcessor(BoxesAsOffsets())(loc, logits, sizes)
    # image 0: b suppressed by a (same class), c kept.
    torch.testing.assert_close(image0["boxes"], torch.tensor([a, c]) * 100)
    assert image0["labels"].tolist() == [1, 1]
    # image 1: a (class 1) suppressed by the better b (class 1); b of class 2 kept.
    assert sorted(image1["labels"].tolist()) == [1, 2]
    torch.testing.assert_close(image1["boxes"], torch.tensor([b, b]) * 100)


def test_boxes_are_scaled_to_original_size_and_clipped():
    loc = torch.tensor([[[0.1, 0.2, 0.5, 1.3]], [[-0.2, 0.25, 0.75, 0.5]]])
    logits = logits_for([[1], [2]], num_classes=3)
    sizes = torch.tensor([[100, 200], [400, 80]])  # (h, w)
    image0, image1 = PostProcessor(BoxesAsOffsets())(loc, logits, sizes)
    torch.testing.assert_close(image0["boxes"], torch.tensor([[20.0, 20.0, 100.0, 100.0]]))
    torch.testing.assert_close(image1["boxes"], torch.tensor([[0.0, 100.0, 60.0, 200.0]]))
    assert image0["labels"].tolist() == [1] and image1["labels"].tolist() == [2]


def test_empty_batch_and_background_only_classes_give_no_detections():
    anchors, loc, logits, sizes = small_setup()
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh))
    assert post(loc[:0], logits[:0], torch.zeros(0, 2)) == []
    for det in post(loc, logits[..., :1], torch.tensor(sizes)):  # no foreground class
        assert det["boxes"].shape == (0, 4) and det["labels"].dtype == torch.int64


@pytest.mark.parametrize("threshold", [1.0, -0.5, 0.5])
def test_score_thresholds_at_and_beyond_the_range_match_torchvision(threshold):
    anchors, loc, logits, sizes = small_setup()
    post = PostProcessor(
        SSDBoxCoder(anchors.cxcywh),
        score_threshold=threshold,
        max_detections=30,
        candidates_per_class=10,
    )
    ours = post(loc, logits, torch.tensor(sizes))
    theirs = torchvision_detections(
        anchors,
        loc,
        logits,
        sizes,
        score_thresh=threshold,
        nms_thresh=0.45,
        topk_candidates=10,
        detections_per_img=30,
    )
    assert_same_detections(ours, theirs)
    assert (sum(len(d["scores"]) for d in ours) == 0) == (threshold >= 1.0)


def test_background_only_gives_empty_detections():
    loc = torch.rand(2, 5, 4)
    logits = logits_for([[0] * 5, [0] * 5], num_classes=3, confidence=20.0)
    for det in PostProcessor(BoxesAsOffsets())(loc, logits, torch.tensor([[10, 10]] * 2)):
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,)
        assert det["labels"].dtype == torch.int64


def test_sort_by_group_and_score_and_rank_in_groups():
    group = torch.tensor([2, 0, 2, 1, 0, 2])
    score = torch.tensor([0.5, 0.25, 0.75, 0.0, 1.0, 0.125])
    sorted_group, order = sort_by_group_and_score(group, score)
    assert order.tolist() == [4, 1, 3, 2, 0, 5]
    assert sorted_group.tolist() == [0, 0, 1, 2, 2, 2]
    assert rank_in_groups(sorted_group, 4).tolist() == [0, 1, 0, 0, 1, 2]


@pytest.mark.parametrize("columns", [1, 2, 3, 7, 20, 33, 90])
def test_row_max_equals_amax(columns):
    g = torch.Generator().manual_seed(columns)
    x = torch.randn(50, columns + 1, generator=g)[:, 1:]  # a column slice, as the scores
    assert torch.equal(row_max(x), x.amax(dim=1))


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_grouped_nms_equals_batched_nms(chunk):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 20], dim=1)
    scores = torch.rand(300, generator=g)
    group = torch.randint(0, 12, (300,), generator=g).sort().values
    keep = grouped_nms(boxes, scores, group, 0.45, chunk)
    expected = batched_nms(boxes.double(), scores.double(), group, 0.45)
    assert 50 < len(keep) < 300
    assert sorted(keep.tolist()) == sorted(expected.tolist())


def test_class_scores_drop_only_anchors_without_a_passing_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 500, 6, generator=g)
    logits[..., 0] += 7.0  # mostly background
    scores = class_scores(logits, 0.01)
    full = logits.reshape(-1, 6).softmax(-1)
    assert scores.row is not None and 0 < len(scores.row) < 500
    assert torch.equal(scores.values[:, 1:], full[scores.row, 1:])  # bitwise
    assert torch.equal(scores.best, full[scores.row, 1:].amax(1))
    dropped = torch.ones(1000, dtype=torch.bool)
    dropped[scores.row] = False
    assert (full[dropped, 1:] <= 0.01).all()
    assert ((full[:, 1:] > 0.01).any(1) <= ~dropped).all()  # every passing anchor is kept
    logits[..., 0] -= 7.0
    assert class_scores(logits, 0.01).row is None  # most anchors hold a candidate: all rows
