"""Ground-truth to default-box matching and SSD box encoding (SSD paper, Sec. 2.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

# Background boxes at least this much inside a crowd region are ignored (Detectron's
# CROWD_FILTER_THRESH).
CROWD_IOA_THRESHOLD = 0.7
# Largest log-size delta decoded: boxes at most 1000/16 times their default box (as torchvision),
# so early, untrained regressions cannot overflow exp() to inf.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def batched_box_iou(boxes1: Tensor, boxes2_t: Tensor, area2: Tensor | None = None) -> Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2``, batched.

    Same values as ``torchvision.ops.box_iou`` per image (torchvision has no batched form). Works
    on coordinate planes rather than an (..., 2) stack: about 4x faster on CPU.

    Shape:
        boxes1: (B, G, 4) xyxy; boxes2_t: (4, A) xyxy, transposed and contiguous; area2: (A,)
        areas of boxes2 when precomputed. Returns (B, G, A).
    """
    x1, y1, x2, y2 = (c[..., None] for c in boxes1.unbind(-1))  # (B, G, 1) each
    ax1, ay1, ax2, ay2 = boxes2_t  # (A,) each
    inter = (torch.minimum(x2, ax2) - torch.maximum(x1, ax1)).clamp_(min=0)
    inter.mul_((torch.minimum(y2, ay2) - torch.maximum(y1, ay1)).clamp_(min=0))
    if area2 is None:
        area2 = (ax2 - ax1) * (ay2 - ay1)
    union = ((x2 - x1) * (y2 - y1)) + area2 - inter
    return inter.div_(union)


def bipartite_match(iou: Tensor, col_max: Tensor | None = None) -> Tensor:
    """The unique one-to-one step of SSD matching, for a batch.

    Equivalent to repeatedly taking the globally best remaining (GT, default box) pair and removing
    its row and column (original Caffe ``BipartiteMatching``), so two GT boxes never steal each
    other's guaranteed box. Instead of one pair per step, every round accepts all pairs that are
    the maximum of both their row and their column: nothing larger involves either side, so the
    sequential rule takes exactly these pairs too. Most GT boxes are settled in the first round;
    later rounds work only on the rows still in conflict.

    Args:
        iou: (B, G, A) IoU; rows of padding GT boxes must hold a negative value.
        col_max: optional (B, A) ``iou.amax(dim=1)`` when the caller has it already.

    Returns:
        (B, A) index of the GT box forced onto each default box, -1 where none. A pair with IoU 0
        never matches.
    """
    batch, num_gt, num_default = iou.shape
    rows = iou.reshape(batch * num_gt, num_default)  # one row per (image, GT box)
    image_of = torch.arange(batch, device=iou.device).repeat_interleave(num_gt)
    gt_of = torch.arange(num_gt, device=iou.device).repeat(batch)
    forced = torch.full((batch * num_default,), -1, dtype=torch.long, device=iou.device)
    if col_max is None:
        col_max = iou.amax(dim=1)
    while True:
        row_max, row_arg = _row_max(rows)  # each GT's best free default box
        active = row_max > 0
        flat = image_of * num_default + row_arg
        accept = active & (row_max >= col_max.view(-1)[flat])
        # Ties (two GT boxes with the same best IoU on one box): the lower index wins, the other
        # stays for the next round.
        owner = torch.full_like(forced, num_gt)
        owner.scatter_reduce_(0, flat, torch.where(accept, gt_of, num_gt), reduce="amin")
        forced = torch.where(owner < num_gt, owner, forced)
        left = active & ~(accept & (owner[flat] == gt_of))
        if not bool(left.any()):
            return forced.view(batch, num_default)
        rows, image_of, gt_of = rows[left], image_of[left], gt_of[left]
        rows.masked_fill_(forced.view(batch, num_default)[image_of] >= 0, -1.0)
        col_max = torch.full((batch, num_default), -1.0, dtype=rows.dtype, device=rows.device)
        col_max.scatter_reduce_(0, image_of[:, None].expand_as(rows), rows, reduce="amax")


def bipartite_match_dense(iou: Tensor, check_every: int = 4) -> Tensor:
    """``bipartite_match`` with fixed shapes, for GPUs: the same rounds on the whole (B, G, A)
    tensor, settled rows and taken columns masked instead of removed.

    Every round settles at least one GT box per image (its best remaining pair is the maximum
    of its row and column), so G rounds always suffice; whether any row is left is read back
    from the device only every ``check_every`` rounds (one host sync in most batches).

    Shape:
        iou: (B, G, A), padding rows negative; returns (B, A) int64 as ``bipartite_match``.
    """
    batch, num_gt, num_default = iou.shape
    work = iou.clone()
    gt_index = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
    forced = torch.full((batch, num_default), -1, dtype=torch.long, device=iou.device)
    for round_ in range(num_gt):
        row_max, row_arg = work.max(dim=2)  # (B, G): each GT's best free default box
        col_max = work.amax(dim=1)  # (B, A)
        accept = (row_max > 0) & (row_max >= col_max.gather(1, row_arg))
        # Ties on one default box: the lower GT index wins, the other stays for a later round.
        owner = torch.full_like(forced, num_gt)
        owner.scatter_reduce_(1, row_arg, torch.where(accept, gt_index, num_gt), reduce="amin")
        won = accept & (owner.gather(1, row_arg) == gt_index)
        taken = owner < num_gt
        forced = torch.where(taken, owner, forced)
        work.masked_fill_(won[:, :, None] | taken[:, None, :], -1.0)
        if (round_ + 1) % check_every == 0 and not bool((work.amax(dim=2) > 0).any()):
            break
    return forced


def _row_max(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows.max(dim=1)`` (first index on ties); amax plus a sparse search is ~4x faster on CPU."""
    row_max = rows.amax(dim=1)
    row, col = (rows == row_max[:, None]).nonzero(as_tuple=True)
    first = torch.full_like(row_max, rows.shape[1], dtype=torch.long)
    return row_max, first.scatter_reduce_(0, row, col, reduce="amin")


class SSDBoxCoder(nn.Module):
    """Assigns ground truth to default boxes and encodes / decodes box offsets.

    An ``nn.Module`` whose default boxes are buffers: it moves with the model it belongs to
    (one instance in ``SSDModule``, shared by the post-processing); ``default_boxes`` is
    persistent, so checkpoints carry the exact boxes the weights were trained with. The
    DataModule encodes with a CPU copy (``cpu_copy``).

    Args:
        default_boxes_cxcywh: (A, 4) normalised default boxes (``DefaultBoxes.cxcywh``).
        iou_threshold: IoU from which a default box is positive for its best GT box.
        variances: (v0, v1) scaling of centre and log-size offsets.
    """

    def __init__(
        self,
        default_boxes_cxcywh: Tensor,
        iou_threshold: float = 0.5,
        variances: Sequence[float] = (0.1, 0.2),
    ) -> None:
        super().__init__()
        d = default_boxes_cxcywh.detach().float().clone()
        self.iou_threshold = float(iou_threshold)
        self.variances = (float(variances[0]), float(variances[1]))
        v0, v1 = self.variances
        xyxy = box_convert(d, "cxcywh", "xyxy")
        self.register_buffer("default_boxes", d)
        # Derived, rebuilt from default_boxes: not stored in checkpoints.
        self.register_buffer("default_xyxy", xyxy, persistent=False)
        self.register_buffer("default_planes", xyxy.t().contiguous(), persistent=False)  # (4, A)
        self.register_buffer("default_area", d[:, 2] * d[:, 3], persistent=False)
        # the part of each default box inside the image (outside it holds no pixels), its area
        inside = xyxy.clamp(0.0, 1.0)
        self.register_buffer("default_inside", inside, persistent=False)
        inside_area = ((inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])).clamp(1e-12)
        self.register_buffer("default_inside_area", inside_area, persistent=False)
        # targets = ((cx, cy, log w, log h) of the GT - offset) * scale, all (A, 4).
        offset = torch.cat([d[:, :2], d[:, 2:].log()], dim=-1)
        scale = torch.cat([1.0 / (v0 * d[:, 2:]), torch.full_like(d[:, 2:], 1.0 / v1)], dim=-1)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def __len__(self) -> int:
        return self.default_boxes.shape[0]

    def __bool__(self) -> bool:  # not len(): a coder is never "empty" in an if
        return True

    def cpu_copy(self) -> SSDBoxCoder:
        """A separate coder on the CPU with the same boxes and settings (for data workers)."""
        return SSDBoxCoder(self.default_boxes.cpu(), self.iou_threshold, self.variances)

    def extra_repr(self) -> str:
        settings = f"iou_threshold={self.iou_threshold}, variances={self.variances}"
        return f"{len(self)} default boxes, {settings}"

    def match(self, gt_boxes: Tensor, valid: Tensor, dense: bool | None = None) -> Tensor:
        """Index of the GT box matched to every default box, -1 for background.

        SSD paper, Sec. 2.2 "Matching strategy": the bipartite step first, then every other
        default box with IoU >= threshold goes to its best GT box.

        Args:
            gt_boxes, valid: the padded GT of the batch.
            dense: fixed-shape computation (``bipartite_match_dense``, dense argmax), which
                GPUs prefer; the default picks it on CUDA. The sparse one (rows removed as
                they settle, argmax only where a box is positive) is faster on CPU. Both give
                the same matches.

        Shape:
            gt_boxes: (B, G, 4) normalised xyxy; valid: (B, G) bool; returns (B, A) int64.
        """
        dense = gt_boxes.is_cuda if dense is None else dense
        iou = batched_box_iou(gt_boxes, self.default_planes, self.default_area)
        if dense or not bool(valid.all()):  # padding rows never match
            iou.masked_fill_(~valid[:, :, None], -1.0)
        best_iou = iou.amax(dim=1)  # (B, A)
        positive = (best_iou >= self.iou_threshold) & (best_iou > 0)
        if dense:
            matched = torch.where(positive, iou.argmax(dim=1), -1)
            forced = bipartite_match_dense(iou)
        else:  # amax and a sparse argmax beat max(dim=1) on CPU
            matched = torch.full_like(best_iou, -1, dtype=torch.long)
            image, box = positive.nonzero(as_tuple=True)
            matched[image, box] = iou[image, :, box].argmax(dim=1)
            forced = bipartite_match(iou, best_iou)
        return torch.where(forced >= 0, forced, matched)

    def encode_batch(
        self,
        boxes: Tensor,
        labels: Tensor,
        valid: Tensor,
        crowd: Tensor | None = None,
        dense: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Dense targets for a batch of padded ground truth.

        ``dense`` as for ``match``: fixed shapes for the GPU, the positives only on the CPU.
        Crowd regions (COCO ``iscrowd``) take no part in matching; background boxes lying
        mostly inside one (intersection over the default box's in-image area >=
        ``CROWD_IOA_THRESHOLD``, Detectron's CROWD_FILTER_THRESH) get label -1 (ignore).

        Shape:
            boxes: (B, G, 4) normalised xyxy; labels: (B, G) in 1..C-1; valid, crowd: (B, G)
            bool. Returns loc_targets (B, A, 4) float32 (zero on background) and labels
            (B, A) int64.
        """
        batch, num_default = boxes.shape[0], len(self)
        dense = boxes.is_cuda if dense is None else dense
        labels = labels.long()
        objects = valid if crowd is None else valid & ~crowd
        if boxes.shape[1] == 0:
            return boxes.new_zeros(batch, num_default, 4), labels.new_zeros(batch, num_default)
        matched = self.match(boxes, objects, dense)
        if dense:  # every default box gathers a GT (background GT 0), masked after
            index = matched.clamp(min=0)
            target_labels = torch.where(matched >= 0, labels.gather(1, index), 0)
            gt = boxes.gather(1, index[..., None].expand(-1, -1, 4))
            loc = self._offsets(gt, self.offset, self.scale).masked_fill_(
                (matched < 0)[..., None], 0
            )
        else:  # only the positives, ~1% of the boxes: 2x faster per image on CPU
            image, box = (matched >= 0).nonzero(as_tuple=True)
            gt_index = matched[image, box]
            target_labels = torch.zeros_like(matched)
            target_labels[image, box] = labels[image, gt_index]
            loc = boxes.new_zeros(batch, num_default, 4)
            loc[image, box] = self._offsets(
                boxes[image, gt_index], self.offset[box], self.scale[box]
            )
        if crowd is not None:
            regions = crowd & valid
            inside = self._crowd_ioa(boxes, regions) >= CROWD_IOA_THRESHOLD
            target_labels = torch.where((target_labels == 0) & inside, -1, target_labels)
        return loc, target_labels

    @staticmethod
    def _offsets(gt_xyxy: Tensor, offset: Tensor, scale: Tensor) -> Tensor:
        """Encoded offsets of GT boxes against their default boxes (SSD box encoding)."""
        gt = box_convert(gt_xyxy, "xyxy", "cxcywh")
        gt = torch.cat([gt[..., :2], gt[..., 2:].clamp(min=1e-8).log()], dim=-1)
        return (gt - offset) * scale

    def _crowd_ioa(self, boxes: Tensor, regions: Tensor) -> Tensor:
        """Largest fraction of each default box's in-image area covered by one crowd region.

        Shape:
            boxes: (B, G, 4) normalised xyxy; regions: (B, G) bool; returns (B, A).
        """
        d = self.default_inside
        lt = torch.maximum(boxes[:, :, None, :2], d[:, :2])  # (B, G, A, 2)
        rb = torch.minimum(boxes[:, :, None, 2:], d[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (B, G, A)
        ioa = inter / self.default_inside_area
        return ioa.masked_fill_(~regions[:, :, None], 0.0).amax(dim=1)

    def encode(self, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Targets for one image.

        Shape:
            gt_boxes: (G, 4) normalised xyxy; gt_labels: (G,) int64 in 1..C-1.
            Returns loc_targets (A, 4) and labels (A,).
        """
        valid = torch.ones(1, gt_boxes.shape[0], dtype=torch.bool, device=gt_boxes.device)
        loc, labels = self.encode_batch(gt_boxes[None].float(), gt_labels[None].long(), valid)
        return loc[0], labels[0]

    def decode(self, loc: Tensor, anchors: Tensor | None = None) -> Tensor:
        """Inverse of the encoding: predicted offsets to normalised xyxy boxes.

        Args:
            loc: Offsets against every default box, or against the boxes ``anchors`` indexes.
            anchors: Default box of every row of ``loc`` (None: all, in order).

        Shape:
            loc: (B, A, 4) (or (A, 4)), or (B, T, 4) with anchors (B, T); returns loc's shape,
            xyxy normalised.
        """
        d = self.default_boxes.to(device=loc.device, dtype=loc.dtype)
        if anchors is not None:
            d = d[anchors]  # (B, T, 4)
        v0, v1 = self.variances
        centre = d[..., :2] + loc[..., :2] * v0 * d[..., 2:]
        size = d[..., 2:] * torch.exp((loc[..., 2:] * v1).clamp(max=MAX_LOG_SCALE))
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
