"""SSD prediction head: one 3x3 conv per source map for box offsets, one for class scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssd_lightning.models.layers import xavier_init


def _flatten(pred: Tensor, columns: int) -> Tensor:
    """Reorders one map's prediction to the default-box layout (same as torchvision).

    Shape:
        - pred: (B, k * columns, H, W), channel ``j * columns + c`` is column c of box j.
        - output: (B, H * W * k, columns): row-major cells, the k boxes of a cell together.
    """
    b, _, h, w = pred.shape
    # (B, k*K, H, W) -> (B, k, K, H, W) -> (B, H, W, k, K) -> (B, H*W*k, K)
    return pred.view(b, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, columns)


class SSDHead(nn.Module):
    """Convolutional box predictors (SSD paper, Sec. 2.1 "Convolutional predictors").

    For each source map with k default boxes per location, a 3x3 conv gives k * 4 offsets and
    another gives k * C class scores (C counts the background). Xavier init, zero biases.

    Args:
        in_channels: Channels of each source map.
        num_boxes: Default boxes per location k of each source map.
        num_classes: Number of classes C including background (label 0).

    Shape:
        - features: list of (B, in_channels[i], H_i, W_i)
        - output: loc (B, A, 4) and cls_logits (B, A, C) with A = sum_i H_i * W_i * k_i,
          map by map in the order of ``features``.
    """

    def __init__(
        self, in_channels: Sequence[int], num_boxes: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_boxes):
            raise ValueError(
                f"{len(num_boxes)} num_boxes entries for {len(in_channels)} source maps"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2: {num_classes}")
        self.num_classes = num_classes
        self.loc = nn.ModuleList(
            nn.Conv2d(c, k * 4, kernel_size=3, padding=1)
            for c, k in zip(in_channels, num_boxes, strict=True)
        )
        self.cls = nn.ModuleList(
            nn.Conv2d(c, k * num_classes, kernel_size=3, padding=1)
            for c, k in zip(in_channels, num_boxes, strict=True)
        )
        xavier_init(self)

    @torch.no_grad()
    def permute_classes(self, order: Sequence[int]) -> None:
        """Reorder the class outputs in place: new class ``c`` is old class ``order[c]``.

        Channel ``j * C + c`` of each classifier is class c of box j (see ``_flatten``).
        """
        if sorted(order) != list(range(self.num_classes)):
            raise ValueError(f"order must permute 0..{self.num_classes - 1}, got {list(order)}")
        index = torch.as_tensor(list(order))
        for conv in self.cls:
            boxes = conv.out_channels // self.num_classes
            channels = (torch.arange(boxes)[:, None] * self.num_classes + index).reshape(-1)
            conv.weight.copy_(conv.weight[channels])
            conv.bias.copy_(conv.bias[channels])

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        loc = [_flatten(conv(x), 4) for conv, x in zip(self.loc, features, strict=True)]
        cls = [
            _flatten(conv(x), self.num_classes) for conv, x in zip(self.cls, features, strict=True)
        ]
        return torch.cat(loc, dim=1), torch.cat(cls, dim=1)
