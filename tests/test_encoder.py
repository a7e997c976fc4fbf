import pytest
import torch
from torchvision.ops import box_iou

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import (
    SSDBoxCoder,
    batched_box_iou,
    bipartite_match,
    bipartite_match_dense,
)

# The sparse rounds (CPU) and the fixed-shape rounds (GPU) must give the same matches.
MATCHERS = pytest.mark.parametrize(
    "match", [bipartite_match, bipartite_match_dense], ids=["sparse", "dense"]
)

SSD300 = DefaultBoxes(300, [38, 19, 10, 5, 3, 1], sizes=[21, 45, 99, 153, 207, 261, 315])


def random_boxes(generator, n, low=0.05, high=0.4):
    wh = low + (high - low) * torch.rand(n, 2, generator=generator)
    xy = torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([xy, xy + wh], dim=1)


def sequential_bipartite(iou):
    """The Caffe rule written plainly: take the best remaining pair, strike its row and column."""
    iou = iou.clone()
    forced = torch.full((iou.shape[1],), -1)
    while True:
        value, flat = iou.flatten().max(0)
        if value <= 0:
            return forced
        g, a = divmod(int(flat), iou.shape[1])
        forced[a] = g
        iou[g, :] = -1
        iou[:, a] = -1


def test_batched_iou_equals_torchvision():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.stack([random_boxes(gen, 7) for _ in range(3)])
    ours = batched_box_iou(boxes, SSD300.xyxy.t().contiguous())
    for image in range(3):
        torch.testing.assert_close(ours[image], box_iou(boxes[image], SSD300.xyxy))


@MATCHERS
def test_bipartite_where_greedy_force_matching_differs(match):
    # GT 0 and GT 1 both like box 0 best. Greedy force-matching (each GT takes its argmax, later
    # GT overwrites) leaves GT 0 without a guaranteed box; the bipartite rule gives GT 1 box 1.
    iou = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.8, 0.7, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.3],
        ]
    )
    assert match(iou[None])[0].tolist() == [0, 1, -1, 2]
    greedy = torch.full((4,), -1)
    greedy[iou.argmax(1)] = torch.arange(3)
    assert greedy.tolist() == [1, -1, -1, 2]  # what the common shortcut does


@MATCHERS
def test_bipartite_chain_of_conflicts_and_zero_iou(match):
    # GT 2's best box goes to GT 0, then its second best to GT 1: three rounds. GT 3 overlaps
    # nothing and must not be matched (IoU 0 never makes a match).
    iou = torch.tensor(
        [
            [0.95, 0.0, 0.0, 0.0],
            [0.0, 0.9, 0.2, 0.0],
            [0.8, 0.85, 0.5, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert match(iou[None])[0].tolist() == [0, 1, 2, -1]


@MATCHERS
def test_bipartite_equals_sequential_rule_on_random_overlapping_boxes(match):
    gen = torch.Generator().manual_seed(1)
    boxes = torch.stack([random_boxes(gen, 20, 0.2, 0.6) for _ in range(8)])  # many conflicts
    iou = batched_box_iou(boxes, SSD300.xyxy.t().contiguous())
    iou[3, 15:] = -1.0  # padding rows
    ours = match(iou)
    for image in range(8):
        assert torch.equal(ours[image], sequential_bipartite(iou[image]))


def test_every_gt_gets_a_positive_and_threshold_rule():
    coder = SSDBoxCoder(SSD300.cxcywh)
    gen = torch.Generator().manual_seed(2)
    boxes = random_boxes(gen, 13, 0.02, 0.5)
    labels = torch.randint(1, 4, (13,), generator=gen)
    loc, target = coder.encode(boxes, labels)
    assert loc.shape == (8732, 4) and target.shape == (8732,) and target.dtype == torch.int64
    iou = box_iou(boxes, SSD300.xyxy)
    matched = coder.match(boxes[None], torch.ones(1, 13, dtype=torch.bool))[0]
    assert set(matched[matched >= 0].tolist()) == set(range(13))  # each GT has >= 1 positive
    best_iou, best_gt = iou.max(0)
    forced = bipartite_match(iou[None])[0]
    above = (best_iou >= 0.5) & (forced < 0)
    assert torch.equal(matched[above], best_gt[above])
    assert (matched[(best_iou < 0.5) & (forced < 0)] == -1).all()
    assert torch.equal(target, torch.where(matched >= 0, labels[matched.clamp(min=0)], 0))
    assert (loc[target == 0] == 0).all()


def test_encode_decode_round_trip():
    coder = SSDBoxCoder(SSD300.cxcywh)
    boxes = random_boxes(torch.Generator().manual_seed(3), 9, 0.02, 0.9)
    loc, target = coder.encode(boxes, torch.ones(9, dtype=torch.long))
    matched = coder.match(boxes[None], torch.ones(1, 9, dtype=torch.bool))[0]
    decoded = coder.decode(loc[None])[0]
    positive = target > 0
    torch.testing.assert_close(decoded[positive], boxes[matched[positive]], atol=1e-5, rtol=0)
    torch.testing.assert_close(coder.decode(torch.zeros(1, 8732, 4))[0], SSD300.xyxy)


def test_decoding_some_default_boxes_equals_decoding_all():
    coder = SSDBoxCoder(SSD300.cxcywh)
    gen = torch.Generator().manual_seed(4)
    loc = torch.randn(2, 8732, 4, generator=gen)
    anchors = torch.randint(0, 8732, (2, 50), generator=gen)
    some = coder.decode(loc.gather(1, anchors[..., None].expand(-1, -1, 4)), anchors)
    torch.testing.assert_close(some, coder.decode(loc)[torch.arange(2)[:, None], anchors])


def test_decode_never_overflows():
    coder = SSDBoxCoder(SSD300.cxcywh)
    boxes = coder.decode(torch.full((2, 8732, 4), 1e4))
    assert torch.isfinite(boxes).all()


def test_no_gt_gives_all_background():
    coder = SSDBoxCoder(SSD300.cxcywh)
    loc, target = coder.encode(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (target == 0).all() and (loc == 0).all()
    valid = torch.zeros(2, 3, dtype=torch.bool)
    loc, target = coder.encode_batch(torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.long), valid)
    assert (target == 0).all() and (loc == 0).all()


def test_batched_form_equals_per_image():
    coder = SSDBoxCoder(SSD300.cxcywh, iou_threshold=0.4, variances=(0.1, 0.2))
    gen = torch.Generator().manual_seed(4)
    counts = [5, 0, 12, 1]
    boxes, labels, valid = torch.zeros(4, 12, 4), torch.zeros(4, 12, dtype=torch.long), []
    per_image = []
    for i, n in enumerate(counts):
        b, lab = random_boxes(gen, n), torch.randint(1, 21, (n,), generator=gen)
        boxes[i, :n], labels[i, :n] = b, lab
        per_image.append(coder.encode(b, lab))
    valid = torch.arange(12)[None] < torch.tensor(counts)[:, None]
    loc, target = coder.encode_batch(boxes, labels, valid)
    for i, (image_loc, image_target) in enumerate(per_image):
        torch.testing.assert_close(loc[i], image_loc)
        assert torch.equal(target[i], image_target)


@MATCHERS
def test_ties_resolve_to_the_lower_index_like_the_sequential_rule(match):
    iou = torch.tensor([[[0.5, 0.7, 0.7], [0.7, 0.2, 0.0]]])
    assert match(iou)[0].tolist() == [1, 0, -1]
    assert torch.equal(match(iou)[0], sequential_bipartite(iou[0]))
