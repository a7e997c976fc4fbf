"""MultiBoxLoss: golden values, invariants, a per-image reference and torchvision's SSD loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.loss import MultiBoxLoss as _MultiBoxLoss

# Every test runs both ways of gathering the terms: fixed shapes (the GPU default) and the
# gathered rows (the CPU default); they must give the same loss.
FIXED_SHAPES = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["gathered", "fixed"])
def fixed_shapes(request):
    FIXED_SHAPES[0] = request.param
    return request.param


def MultiBoxLoss(*args, **kwargs) -> _MultiBoxLoss:
    return _MultiBoxLoss(*args, fixed_shapes=FIXED_SHAPES[0], **kwargs)


def reference_loss(loc_pred, cls_logits, loc_targets, labels, ratio=3.0, min_neg=0, num_pos=None):
    """Straightforward SSD loss: a loop over images and a full sort of the negatives."""
    box, cls, total_pos = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        pos, neg = labels[b] > 0, labels[b] == 0
        total_pos += int(pos.sum())
        box = box + F.smooth_l1_loss(loc_pred[b][pos], loc_targets[b][pos], reduction="sum")
        ce = F.cross_entropy(cls_logits[b], labels[b].clamp(min=0), reduction="none")
        quota = min(max(math.floor(ratio * int(pos.sum())), min_neg), int(neg.sum()))
        hardest = ce[neg].sort(descending=True).values[:quota]
        cls = cls + ce[pos].sum() + hardest.sum()
    n = max(1.0, float(total_pos if num_pos is None else num_pos))
    return {"loss": (box + cls) / n, "loss_box": box / n, "loss_cls": cls / n}


def random_batch(batch=4, anchors=60, classes=5, seed=0):
    """Random predictions and targets with a different number of positives per image."""
    g = torch.Generator().manual_seed(seed)
    loc_pred = torch.randn(batch, anchors, 4, generator=g)
    cls_logits = torch.randn(batch, anchors, classes, generator=g)
    loc_targets = torch.randn(batch, anchors, 4, generator=g)
    labels = torch.zeros(batch, anchors, dtype=torch.long)
    for b, count in enumerate([0, 1, 5, 20][:batch]):  # 20 positives: quota 60 > 40 negatives
        idx = torch.randperm(anchors, generator=g)[:count]
        labels[b, idx] = torch.randint(1, classes, (count,), generator=g)
    return loc_pred, cls_logits, loc_targets, labels


def rows_with_gradient(loss_fn, loc_pred, cls_logits, loc_targets, labels):
    """(B, A) bool: default boxes whose logits receive gradient, i.e. enter L_conf."""
    cls_logits = cls_logits.clone().requires_grad_(True)
    loss_fn(loc_pred, cls_logits, loc_targets, labels)["loss"].backward()
    return cls_logits.grad.abs().sum(-1) > 0


def test_hand_computed_golden_value():
    # One positive with offsets (1, 0.5, 0, 0) vs a zero prediction: smooth L1 = 0.5 + 0.125.
    # Two negatives with equal logits: the quota (1) takes one of them; CE = ln 2 each.
    labels = torch.tensor([[1, 0, 0]])
    loc_targets = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4]])
    out = MultiBoxLoss(neg_pos_ratio=1.0)(
        torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), loc_targets, labels
    )
    assert out["loss_box"].item() == pytest.approx(0.625)
    assert out["loss_cls"].item() == pytest.approx(2 * math.log(2))
    assert out["loss"].item() == pytest.approx(0.625 + 2 * math.log(2))


def test_no_ground_truth_gives_zero_box_loss_and_finite_class_loss():
    loc_pred, cls_logits, loc_targets, _ = random_batch()
    labels = torch.zeros(4, 60, dtype=torch.long)
    cls_logits.requires_grad_(True)
    out = MultiBoxLoss()(loc_pred, cls_logits, loc_targets, labels)
    assert out["loss_box"].item() == 0.0
    assert out["loss_cls"].item() == 0.0  # paper: no positives -> no mined negatives
    out["loss"].backward()
    assert torch.isfinite(cls_logits.grad).all()
    with_min = MultiBoxLoss(min_negatives=3)(loc_pred, cls_logits, loc_targets, labels)
    assert torch.isfinite(with_min["loss"]) and with_min["loss_cls"].item() > 0


def test_one_box_gives_positive_box_loss():
    loc_pred, cls_logits, loc_targets, _ = random_batch(batch=1)
    labels = torch.zeros(1, 60, dtype=torch.long)
    labels[0, 7] = 2
    out = MultiBoxLoss()(loc_pred, cls_logits, loc_targets, labels)
    expected = F.smooth_l1_loss(loc_pred[0, 7], loc_targets[0, 7], reduction="sum")
    assert out["loss_box"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss_box"].item() > 0


@pytest.mark.parametrize(("ratio", "min_neg"), [(3.0, 0), (1.5, 0), (3.0, 4), (0.0, 2)])
def test_mined_negatives_are_the_hardest_and_counted_per_image(ratio, min_neg):
    loc_pred, cls_logits, loc_targets, labels = random_batch()
    chosen = rows_with_gradient(
        MultiBoxLoss(ratio, min_negatives=min_neg), loc_pred, cls_logits, loc_targets, labels
    )
    background_ce = -F.log_softmax(cls_logits, -1)[..., 0]
    for b in range(labels.shape[0]):
        pos, neg = labels[b] > 0, labels[b] == 0
        quota = min(max(math.floor(ratio * int(pos.sum())), min_neg), int(neg.sum()))
        assert torch.equal(chosen[b] & pos, pos)  # every positive contributes
        mined = chosen[b] & neg
        assert int(mined.sum()) == quota  # min(ratio * pos, negatives), at least min_negatives
        hardest = background_ce[b][neg].sort(descending=True).values[:quota]
        assert torch.allclose(background_ce[b][mined].sort(descending=True).values, hardest)


def test_ignored_boxes_are_neither_positive_nor_mined():
    loc_pred, cls_logits, loc_targets, labels = random_batch()
    cls_logits[:, :10, 0] = -20.0  # the hardest background boxes of every image ...
    labels[:, :10] = -1  # ... are ignored (e.g. crowd)
    chosen = rows_with_gradient(MultiBoxLoss(), loc_pred, cls_logits, loc_targets, labels)
    assert not chosen[:, :10].any()
    out = MultiBoxLoss()(loc_pred, cls_logits, loc_targets, labels)
    ref = reference_loss(loc_pred, cls_logits, loc_targets, labels)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)


def test_num_positives_sets_the_normaliser():
    batch = random_batch()
    loss_fn = MultiBoxLoss()
    default = loss_fn(*batch)
    num_pos = int((batch[3] > 0).sum())
    doubled = loss_fn(*batch, num_positives=torch.tensor(2.0 * num_pos))
    assert doubled["loss"].item() == pytest.approx(default["loss"].item() / 2, rel=1e-6)
    zero = loss_fn(*batch, num_positives=0)  # max(1, N): no division by zero
    assert zero["loss"].item() == pytest.approx(default["loss"].item() * num_pos, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("ratio", "min_neg", "alpha"), [(3.0, 0, 1.0), (2.5, 3, 0.5)])
def test_matches_per_image_reference(seed, ratio, min_neg, alpha):
    batch = random_batch(seed=seed)
    out = MultiBoxLoss(ratio, alpha=alpha, min_negatives=min_neg)(*batch)
    ref = reference_loss(*batch, ratio=ratio, min_neg=min_neg)
    assert out["loss_box"].item() == pytest.approx(ref["loss_box"].item(), rel=1e-5)
    assert out["loss_cls"].item() == pytest.approx(ref["loss_cls"].item(), rel=1e-5)
    expected = ref["loss_cls"].item() + alpha * ref["loss_box"].item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_matches_torchvision_ssd_compute_loss():
    # Same default boxes, ground truth and matches on both sides; torchvision encodes the
    # regression targets itself (weights 10, 10, 5, 5 = 1 / variances) in pixel units.
    g = torch.Generator().manual_seed(3)
    anchors = DefaultBoxes(300, [5, 3, 1], aspect_ratios=[[2], [2, 3], [2]])
    coder = SSDBoxCoder(anchors.cxcywh)
    batch, num_classes, size = 3, 6, 300.0
    centre = torch.rand(batch, 4, 2, generator=g) * 0.6 + 0.2
    half = torch.rand(batch, 4, 2, generator=g) * 0.2 + 0.05
    gt = torch.cat([centre - half, centre + half], dim=-1)  # (B, G, 4) normalised
    gt_labels = torch.randint(1, num_classes, (batch, 4), generator=g)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    loc_targets, labels = coder.encode_batch(gt, gt_labels, valid)
    matched = coder.match(gt, valid)
    assert (labels > 0).sum(1).tolist()[2] == 0 and (labels > 0).sum() > 0

    loc_pred = torch.randn(batch, len(anchors), 4, generator=g)
    cls_logits = torch.randn(batch, len(anchors), num_classes, generator=g)
    ours = MultiBoxLoss(neg_pos_ratio=3)(loc_pred, cls_logits, loc_targets, labels)

    targets = [{"boxes": gt[b] * size, "labels": gt_labels[b]} for b in range(batch)]
    fake_ssd = SimpleNamespace(
        box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3
    )
    head = {"bbox_regression": loc_pred, "cls_logits": cls_logits}
    theirs = SSD.compute_loss(fake_ssd, targets, head, [anchors.xyxy * size] * batch, list(matched))
    assert ours["loss_box"].item() == pytest.approx(theirs["bbox_regression"].item(), rel=1e-4)
    assert ours["loss_cls"].item() == pytest.approx(theirs["classification"].item(), rel=1e-5)


def test_gradients_match_reference():
    loc_pred, cls_logits, loc_targets, labels = random_batch(seed=5)
    grads = []
    for fn in (MultiBoxLoss(), reference_loss):
        loc, logits = loc_pred.clone().requires_grad_(), cls_logits.clone().requires_grad_()
        fn(loc, logits, loc_targets, labels)["loss"].backward()
        grads.append((loc.grad, logits.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_half_precision_logits_stay_finite():
    loc_pred, cls_logits, loc_targets, labels = random_batch()
    out = MultiBoxLoss()(loc_pred.half(), (cls_logits * 100).half(), loc_targets, labels)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
