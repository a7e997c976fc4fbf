"""PostProcessor against torchvision's SSD post-processing (random, trained-like, empty,
background-only and tied outputs), its pools, NMS groups, scaling and clipping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import batched_nms, nms

import ssd_lightning.postprocess as pp
from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.postprocess import (
    PostProcessor,
    class_scores,
    grouped_nms,
    rank_in_sorted_rows,
)

TV_CODER = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))  # torchvision SSD: 1 / variances
TV_DEFAULTS = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}


class BoxesAsOffsets:
    """Test coder whose 'offsets' already are normalised xyxy boxes."""

    def decode(self, loc: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        return loc


def logits_for(labels: list[list[int]], num_classes: int, confidence: float = 8.0):
    """(B, A, C) logits that give every box one confident class (0 = background)."""
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()
    return onehot * confidence


def ssd300_anchors() -> DefaultBoxes:
    return DefaultBoxes(300, [38, 19, 10, 5, 3, 1], sizes=[21, 45, 99, 153, 207, 261, 315])


def torchvision_detections(anchors, loc, logits, sizes, **settings):
    """torchvision's SSD.postprocess_detections with anchors scaled to each original size."""
    ssd = SimpleNamespace(box_coder=TV_CODER, **settings)
    image_anchors = [anchors.xyxy * torch.tensor([w, h, w, h]) for h, w in sizes]
    head = {"bbox_regression": loc, "cls_logits": logits}
    return SSD.postprocess_detections(ssd, head, image_anchors, [tuple(s) for s in sizes])


def torchvision_on_boxes(boxes, logits, sizes, **settings):
    """torchvision's SSD.postprocess_detections for normalised xyxy boxes (``BoxesAsOffsets``)."""
    coder = SimpleNamespace(decode_single=lambda codes, scale: codes * scale)
    ssd = SimpleNamespace(box_coder=coder, **settings)
    scales = [torch.tensor([w, h, w, h], dtype=torch.float32) for h, w in sizes]
    head = {"bbox_regression": boxes, "cls_logits": logits}
    return SSD.postprocess_detections(ssd, head, scales, [tuple(s) for s in sizes])


def assert_same_detections(ours, theirs, atol=1e-3):
    """Equal as sets: order by (label, score) on both sides, then compare."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs, strict=True):
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])  # by decreasing score
        assert len(o["scores"]) == len(t["scores"])
        io = torch.argsort(o["labels"].double() * 2 + o["scores"].double())
        it = torch.argsort(t["labels"].double() * 2 + t["scores"].double())
        assert torch.equal(o["labels"][io], t["labels"][it])
        torch.testing.assert_close(o["scores"][io], t["scores"][it])
        torch.testing.assert_close(o["boxes"][io], t["boxes"][it], atol=atol, rtol=0)


def small_setup(batch=3, num_classes=4, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    anchors = DefaultBoxes(300, [5, 3, 1], aspect_ratios=[[2], [2, 3], [2]])  # 158 anchors
    loc = torch.randn(batch, len(anchors), 4, generator=g) * 0.5
    logits = torch.randn(batch, len(anchors), num_classes, generator=g) * spread
    sizes = [[300, 300], [240, 500], [480, 320]][:batch]
    return anchors, loc, logits, sizes


def spy_passes(post: PostProcessor) -> list[tuple[int, int]]:
    """Record (images, pool) of every pass of ``post`` over pools."""
    passes = []
    search = post.search

    def recording(scores, pool, *args):
        passes.append((len(scores.best), pool))
        return search(scores, pool, *args)

    post.search = recording
    return passes


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


@pytest.mark.parametrize("num_classes", [21, 91])
def test_random_ssd300_outputs_match_torchvision_in_one_pass(num_classes):
    # An untrained model: most pairs pass 0.01 and NMS keeps almost all boxes, so the first
    # pool (4 x 200 pairs per image) is enough.
    anchors = ssd300_anchors()
    g = torch.Generator().manual_seed(num_classes)
    loc = torch.randn(2, len(anchors), 4, generator=g) * 0.5
    logits = torch.randn(2, len(anchors), num_classes, generator=g)
    sizes = [[300, 300], [480, 640]]
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh))
    passes = spy_passes(post)
    ours = post(loc, logits, torch.tensor(sizes))
    assert passes == [(2, 800)]
    assert [len(d["scores"]) for d in ours] == [200, 200]
    theirs = torchvision_detections(
        anchors, loc, logits, sizes, detections_per_img=200, **TV_DEFAULTS
    )
    assert_same_detections(ours, theirs)


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


def test_heavy_suppression_grows_the_pool_and_still_matches_torchvision():
    # 158 anchors x 3 classes; ~400 pairs per image pass 0.01. Boxes in 3 clusters: NMS keeps
    # ~1 per (cluster, class), far fewer than 100, so the pool of 4 x 100 pairs is not final
    # while it leaves pairs out; the next (800 >= all 474 pairs) is.
    anchors, _, logits, sizes = small_setup(seed=1, spread=1.0)
    loc = clustered_loc(anchors, sizes)
    logits[..., 0] += 3.0
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=100)
    passes = spy_passes(post)
    ours = post(loc, logits, torch.tensor(sizes))
    assert passes == [(3, 400), (3, 800)]
    theirs = torchvision_detections(
        anchors, loc, logits, sizes, detections_per_img=100, **TV_DEFAULTS
    )
    assert_same_detections(ours, theirs)
    assert all(0 < len(d["scores"]) < 20 for d in ours)


def test_only_the_images_left_short_get_a_larger_pool():
    anchors, loc, logits, sizes = small_setup(batch=2, seed=1, spread=1.0)
    loc[1] = clustered_loc(anchors, sizes)[1]  # image 1 clustered, image 0 random boxes
    logits[..., 0] += 3.0
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=60)
    passes = spy_passes(post)
    ours = post(loc, logits, torch.tensor(sizes))
    assert passes == [(2, 240), (1, 480)]
    assert len(ours[0]["scores"]) == 60 and len(ours[1]["scores"]) < 20
    theirs = torchvision_detections(
        anchors, loc, logits, sizes, detections_per_img=60, **TV_DEFAULTS
    )
    assert_same_detections(ours, theirs)


def test_a_pass_is_final_when_enough_survive_or_no_pair_is_left_out():
    anchors, _, logits, sizes = small_setup(seed=3, spread=1.0)
    loc = clustered_loc(anchors, sizes, seed=4)
    logits[0, :, 0] += 8.0  # image 0: only a few pairs pass, all of them in the pool
    logits[2, 10:] = logits[2, 10:].clamp(max=0.0)  # image 2: 10 anchors hold its best pairs
    logits[2, :10, 1:] += torch.arange(10.0)[:, None] * 0.5 + 20.0
    loc[2, :10] = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)) * 3.0  # apart
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=8)
    found = post.detect(loc, logits, torch.tensor(sizes), pool=24)
    assert found.scores.shape == (3, 24) and torch.all(found.scores[:, :-1] >= found.scores[:, 1:])
    assert found.final.tolist() == [True, False, True]
    assert found.keep.sum(dim=1).tolist()[2] == 8  # 8 survivors among 24 pairs: final
    exact = post(loc, logits, torch.tensor(sizes))
    for i in (0, 2):
        keep = found.keep[i]
        torch.testing.assert_close(found.boxes[i][keep], exact[i]["boxes"])
        assert found.labels[i][keep].tolist() == exact[i]["labels"].tolist()


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
    ("num_classes", "background", "pairs_range", "rows_skipped"),
    [
        (91, 10.6, (1500, 2500), True),  # ~2,000 pairs, on ~16% of the anchors
        (21, 6.1, (0.11, 0.15), False),  # ~13% of the pairs, on ~85% of the anchors
    ],
)
def test_trained_like_outputs_match_torchvision(
    monkeypatch, num_classes, background, pairs_range, rows_skipped
):
    # SSD300's 8732 default boxes; background dominant, boxes clustered on objects.
    scores = []
    original = pp.class_scores
    monkeypatch.setattr(
        pp, "class_scores", lambda *a, **k: scores.append(original(*a, **k)) or scores[-1]
    )
    anchors = ssd300_anchors()
    loc, logits = trained_like_outputs(anchors, num_classes, batch=2, background=background)
    passing = (logits.softmax(-1)[..., 1:] > 0.01).sum().item() / 2
    low, high = pairs_range
    if high < 1:  # a fraction of all pairs
        low, high = low * logits[0, :, 1:].numel(), high * logits[0, :, 1:].numel()
    assert low < passing < high
    sizes = [[300, 300], [480, 640]]
    ours = PostProcessor(SSDBoxCoder(anchors.cxcywh))(loc, logits, torch.tensor(sizes))
    theirs = torchvision_detections(
        anchors, loc, logits, sizes, detections_per_img=200, **TV_DEFAULTS
    )
    assert_same_detections(ours, theirs)
    assert sum(len(d["scores"]) for d in ours) > 100
    values, _, _ = scores[0]
    assert (len(values) < 2 * len(anchors)) == rows_skipped  # softmax of some anchors only


def test_tied_boxes_and_scores_match_torchvision():
    # Every box twice, with the same logits: ties at every cut-off (per-class top-k, pool,
    # max_detections) are between identical boxes, one of which NMS suppresses, so the
    # detections do not depend on how the tie is broken.
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(2, 4000, 2, generator=g) * 0.8
    boxes = torch.cat([xy, xy + 0.02 + torch.rand(2, 4000, 2, generator=g) * 0.2], dim=-1)
    boxes = boxes.repeat_interleave(2, dim=1)
    logits = torch.randn(2, 4000, 21, generator=g).repeat_interleave(2, dim=1)
    logits[1, :, 0] += 4.0  # image 1: fewer pairs
    sizes = [[300, 300], [480, 640]]
    for k, max_detections in [(200, 200), (7, 50)]:
        post = PostProcessor(
            BoxesAsOffsets(), candidates_per_class=k, max_detections=max_detections
        )
        ours = post(boxes, logits, torch.tensor(sizes))
        settings = {**TV_DEFAULTS, "topk_candidates": k}
        theirs = torchvision_on_boxes(
            boxes, logits, sizes, detections_per_img=max_detections, **settings
        )
        assert_same_detections(ours, theirs)
        assert [len(d["scores"]) for d in ours] == [max_detections] * 2


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


def test_class_agnostic_nms_suppresses_across_classes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 300, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(2, 300, 2, generator=g) * 0.25], dim=-1)
    logits = torch.randn(2, 300, 5, generator=g) * 2.0
    sizes = [[100, 200], [300, 300]]
    post = PostProcessor(BoxesAsOffsets(), candidates_per_class=40, class_agnostic=True)
    ours = post(boxes, logits, torch.tensor(sizes))
    # Reference: torchvision's candidates (class-aware NMS at IoU > 1 keeps them all), then
    # one NMS over all classes.
    settings = {"score_thresh": 0.01, "nms_thresh": 1.0, "topk_candidates": 40}
    candidates = torchvision_on_boxes(boxes, logits, sizes, detections_per_img=10**6, **settings)
    for o, c in zip(ours, candidates, strict=True):
        keep = nms(c["boxes"], c["scores"], 0.45)[:200]
        assert 50 < len(keep) < len(c["scores"])
        assert o["labels"].tolist() == c["labels"][keep].tolist()
        torch.testing.assert_close(o["boxes"], c["boxes"][keep])


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


def test_background_dominant_ssd300_outputs_give_what_torchvision_gives():
    # Image 0: no pair above 0.01 (no anchor's softmax computed); image 1: a single one.
    anchors = ssd300_anchors()
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(2, len(anchors), 4, generator=g) * 0.5
    logits = torch.randn(2, len(anchors), 21, generator=g)
    logits[..., 0] += 12.0
    logits[1, 100, 3] += 12.0
    sizes = [[300, 300], [480, 640]]
    ours = PostProcessor(SSDBoxCoder(anchors.cxcywh))(loc, logits, torch.tensor(sizes))
    assert [len(d["scores"]) for d in ours] == [0, 1] and ours[1]["labels"].tolist() == [3]
    theirs = torchvision_detections(
        anchors, loc, logits, sizes, detections_per_img=200, **TV_DEFAULTS
    )
    assert_same_detections(ours, theirs)


def test_export_pass_gives_the_same_detections_as_the_eager_pass():
    anchors, loc, logits, sizes = small_setup(num_classes=6)
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), score_threshold=0.05, max_detections=40)
    eager = post.detect(loc, logits, torch.tensor(sizes), pool=300)
    export = post.detect(loc, logits, torch.tensor(sizes), pool=300, export=True)
    for a, b in zip(eager, export, strict=True):
        torch.testing.assert_close(a, b)


def test_rank_in_sorted_rows():
    values = torch.tensor([[0, 0, 2, 2, 2, 3], [1, 1, 1, 1, 4, 4]])
    assert rank_in_sorted_rows(values, 5).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("slice_size", [1, 7, None])
def test_grouped_nms_equals_batched_nms(slice_size):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(300, 2, generator=g) * 0.3], dim=1).double()
    scores = torch.rand(300, generator=g)
    group = torch.randint(0, 12, (300,), generator=g).sort().values
    keep = grouped_nms(boxes, scores, group, 0.45, slice_size)
    expected = batched_nms(boxes, scores.double(), group, 0.45)
    assert 50 < len(keep) < 300
    assert sorted(keep.tolist()) == sorted(expected.tolist())


def test_class_scores_skip_only_anchors_without_a_passing_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 500, 6, generator=g)
    logits[..., 0] += 7.0  # mostly background
    values, best, row_of = class_scores(logits, 0.01)
    full = logits.reshape(-1, 6).softmax(-1)
    full[:, 0] = -float("inf")
    kept = row_of.view(-1) < len(values) - 1
    assert 0 < kept.sum() < 500
    assert torch.equal(values[row_of.view(-1)[kept]], full[kept])  # bitwise
    assert values[-1].tolist() == [-float("inf"), 0, 0, 0, 0, 0]  # the anchors skipped
    assert (full[~kept] <= 0.01).all()  # every anchor holding a pair is kept
    assert torch.equal(best.view(-1), torch.where(kept, full.amax(1), 0.0))
    logits[..., 0] -= 7.0  # most anchors hold a pair: the softmax of all of them
    values, best, row_of = class_scores(logits, 0.01)
    assert len(values) == 1000 and torch.equal(row_of.view(-1), torch.arange(1000))
    assert torch.equal(best.view(-1), values.amax(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_detections():
    anchors = ssd300_anchors()
    loc, logits = trained_like_outputs(anchors, 21, batch=4, background=6.1)
    sizes = torch.tensor([[300, 300], [480, 640], [200, 100], [512, 512]])
    cpu = PostProcessor(SSDBoxCoder(anchors.cxcywh))(loc, logits, sizes)
    gpu = PostProcessor(SSDBoxCoder(anchors.cxcywh).to("cuda"))(
        loc.cuda(), logits.cuda(), sizes.cuda()
    )
    assert_same_detections([{k: v.cpu() for k, v in d.items()} for d in gpu], cpu)
