"""PostProcessor: limits, NMS groups, scaling, clipping, and torchvision's SSD post-processing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.postprocess import PostProcessor, rank_within_class

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


def test_heavy_suppression_widens_the_candidates_and_still_matches_torchvision(monkeypatch):
    # Every box is one of 3 jittered copies: NMS keeps ~1 per (image, class), so the first
    # 2 * max_detections pairs are not enough and further rounds must see more pairs.
    anchors, _, logits, sizes = small_setup(seed=1, spread=1.0)
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8], [0.2, 0.6, 0.5, 0.9]])
    pick = torch.randint(0, 3, (len(sizes), len(anchors)), generator=g)
    boxes = centres[pick] + torch.randn(len(sizes), len(anchors), 4, generator=g) * 0.005
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)[:, None]
    image_anchors = anchors.xyxy[None] * scale
    loc = torch.stack(
        [
            TV_CODER.encode_single(b * s, a)
            for b, s, a in zip(boxes, scale, image_anchors, strict=True)
        ]
    )
    post = PostProcessor(SSDBoxCoder(anchors.cxcywh), max_detections=20)
    rounds = []
    detect = post._detect
    monkeypatch.setattr(post, "_detect", lambda *a: rounds.append(a[-1]) or detect(*a))
    ours = post(loc, logits, torch.tensor(sizes))
    assert len(rounds) >= 2 and rounds[-1] > rounds[0]
    settings = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 200}
    theirs = torchvision_detections(anchors, loc, logits, sizes, detections_per_img=20, **settings)
    assert_same_detections(ours, theirs)
    assert all(len(d["scores"]) < 20 for d in ours)


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


def test_background_only_gives_empty_detections():
    loc = torch.rand(2, 5, 4)
    logits = logits_for([[0] * 5, [0] * 5], num_classes=3, confidence=20.0)
    for det in PostProcessor(BoxesAsOffsets())(loc, logits, torch.tensor([[10, 10]] * 2)):
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,)
        assert det["labels"].dtype == torch.int64


def test_rank_within_class():
    cls = torch.tensor([[2, 0, 2, 1, 0, 2], [1, 1, 1, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 3]])
    assert torch.equal(rank_within_class(cls, 3), expected)
