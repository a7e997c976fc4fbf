"""SSD detector base class: a feature extractor giving the source maps, and the SSD head."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import ClassVar

import torch
from torch import Tensor, nn

from ssd_lightning.models.heads import SSDHead

# ImageNet statistics in 0..1 pixel units, the normalisation torchvision's IMAGENET1K_V1
# backbone weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class SSD(nn.Module):
    """Single Shot MultiBox Detector network (W. Liu et al., ECCV 2016), without anchors.

    ``backbone`` maps images to the list of source feature maps and exposes ``out_channels``;
    the head predicts k boxes per location on each map. Decoding, anchors and NMS live outside
    the network.

    Class attributes ``image_size`` (the paper's input size) and ``mean``/``std`` (input
    normalisation in 0..1 pixel units, ImageNet statistics) describe the expected input.

    Args:
        backbone: Module returning a list of (B, out_channels[i], H_i, W_i) maps.
        num_classes: Number of classes C including background (label 0).
        num_boxes: Default boxes per location of each source map, or a function of the number
            of source maps giving them (how the anchor settings' aspect ratios reach the head
            without the network knowing about anchors).

    Shape:
        - images: (B, 3, H, W), normalised with ``mean``/``std``.
        - output: loc (B, A, 4) box offsets and cls_logits (B, A, C), A default boxes ordered
          map by map, row-major cells, the boxes of a cell together.
    """

    image_size: ClassVar[int] = 300
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_boxes: Sequence[int] | Callable[[int], Sequence[int]],
    ) -> None:
        super().__init__()
        if callable(num_boxes):
            num_boxes = num_boxes(len(backbone.out_channels))
        self.backbone = backbone
        self.head = SSDHead(backbone.out_channels, num_boxes, num_classes)
        self.num_classes = num_classes
        self.num_boxes = [int(k) for k in num_boxes]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(images))

    def feature_map_sizes(
        self, image_size: int | Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """(H, W) of every source map for an input of ``image_size`` (default ``self.image_size``).

        Measured by running the backbone on the meta device (shapes only, no compute, no
        change to the model), so anchors built from it always match the layers.
        """
        h, w = _pair(self.image_size if image_size is None else image_size)
        tensors = chain(self.backbone.named_parameters(), self.backbone.named_buffers())
        meta = {name: torch.empty_like(t, device="meta") for name, t in tensors}
        dtype = next(self.parameters()).dtype
        # batch of 2: BatchNorm in training mode rejects a single value per channel (1x1 maps)
        images = torch.empty(2, 3, h, w, device="meta", dtype=dtype)
        maps = torch.func.functional_call(self.backbone, meta, (images,))
        return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
