"""SSD default boxes (anchors).

Conventions used across ssd_lightning: boxes at the public API are absolute ``xyxy`` float pixels;
anchors and regression targets are normalised ``cxcywh`` in [0, 1] image units; label 0 is
background and ``num_classes`` counts it.

Aspect ratios are listed per feature map without 1 and without reciprocals (torchvision's
``DefaultBoxGenerator`` convention): ``[[2], [2, 3], ...]``. Each cell of map k then holds
``2 + 2 * len(ratios[k])`` boxes: the square of scale s_k, the extra square of scale
sqrt(s_k * s_(k+1)), and for every ratio r a box of (s_k sqrt(r), s_k / sqrt(r)) and its transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

SSD300_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def boxes_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """Default boxes per feature-map cell, one entry per map (SSD300: [4, 6, 6, 6, 4, 4])."""
    return [2 + 2 * len(ratios) for ratios in aspect_ratios]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class DefaultBoxes:
    """The fixed set of SSD default boxes for one image size and one set of feature maps.

    Args:
        image_size: network input size, an int or (height, width).
        feature_maps: size of every source feature map, an int or (height, width) each,
            as measured on the network (never typed by hand).
        aspect_ratios: extra aspect ratios per map (see module docstring).
        s_min: scale of the first map (SSD paper, Eq. 4).
        s_max: scale of the last map.
        sizes: optional explicit table of m + 1 box sizes in pixels at ``image_size``
            (e.g. COCO [21, 45, 99, 153, 207, 261, 315]); overrides s_min and s_max.
        steps: optional strides in pixels per map (Caffe variant, e.g. [8, 16, 32, 64, 100, 300]);
            the centre grid of map k then has image_size / steps[k] cells per unit.
        clip: clamp box widths and heights to [0, 1] as most re-implementations do.

    Attributes:
        cxcywh: (A, 4) normalised centre form, map by map, row-major cells, the boxes of a cell
            together, in the order the SSD heads emit them.
        xyxy: (A, 4) the same boxes in normalised corner form.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        feature_maps: Sequence[int | Sequence[int]],
        aspect_ratios: Sequence[Sequence[float]] = SSD300_ASPECT_RATIOS,
        s_min: float = 0.2,
        s_max: float = 0.9,
        sizes: Sequence[float] | None = None,
        steps: Sequence[float] | None = None,
        clip: bool = True,
    ) -> None:
        self.image_size = _pair(image_size)
        self.feature_maps = [_pair(f) for f in feature_maps]
        self.aspect_ratios = [[float(r) for r in ratios] for ratios in aspect_ratios]
        self.s_min, self.s_max = float(s_min), float(s_max)
        self.sizes = None if sizes is None else [float(s) for s in sizes]
        self.steps = None if steps is None else [float(s) for s in steps]
        self.clip = bool(clip)
        m = len(self.feature_maps)
        if len(self.aspect_ratios) != m:
            raise ValueError(
                f"anchors: {len(self.aspect_ratios)} aspect-ratio lists for {m} feature maps"
            )
        if self.sizes is not None and len(self.sizes) != m + 1:
            raise ValueError(f"anchors: sizes needs {m + 1} entries for {m} maps, got {self.sizes}")
        if self.steps is not None and len(self.steps) != m:
            raise ValueError(f"anchors: steps needs {m} entries, got {self.steps}")
        self.boxes_per_location = boxes_per_location(self.aspect_ratios)
        self.cxcywh = self._build()
        self.xyxy = box_convert(self.cxcywh, "cxcywh", "xyxy")

    def scales(self) -> list[float]:
        """s_1..s_(m+1) relative to the image (SSD paper, Eq. 4; s_(m+1) = 1 unless tabulated)."""
        m = len(self.feature_maps)
        if self.sizes is not None:
            return [s / min(self.image_size) for s in self.sizes]
        if m == 1:
            return [self.s_min, 1.0]
        step = (self.s_max - self.s_min) / (m - 1)
        return [self.s_min + step * k for k in range(m)] + [1.0]

    def _cell_shapes(self, k: int, scales: list[float]) -> Tensor:
        """(boxes_per_location[k], 2) widths and heights of the boxes of one cell of map k."""
        s, s_next = scales[k], scales[k + 1]
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in self.aspect_ratios[k]:
            w, h = s * math.sqrt(r), s / math.sqrt(r)
            shapes += [(w, h), (h, w)]
        wh = torch.tensor(shapes, dtype=torch.float32)
        return wh.clamp(0.0, 1.0) if self.clip else wh

    def _build(self) -> Tensor:
        scales = self.scales()
        height, width = self.image_size
        per_map = []
        for k, (fh, fw) in enumerate(self.feature_maps):
            # Centres ((j + 0.5) / |f_k|, (i + 0.5) / |f_k|); Caffe variant: |f_k| = size / step.
            units_y = height / self.steps[k] if self.steps else fh
            units_x = width / self.steps[k] if self.steps else fw
            cy = (torch.arange(fh, dtype=torch.float32) + 0.5) / units_y
            cx = (torch.arange(fw, dtype=torch.float32) + 0.5) / units_x
            grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
            centres = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 1, 2)  # (cells, 1, 2)
            wh = self._cell_shapes(k, scales)  # (k, 2)
            cells = centres.expand(-1, len(wh), 2)
            per_map.append(
                torch.cat([cells, wh.expand(len(centres), -1, 2)], dim=-1).reshape(-1, 4)
            )
        return torch.cat(per_map)

    def __len__(self) -> int:
        return self.cxcywh.shape[0]

    def settings(self) -> dict:
        """Constructor arguments as plain values (stored in checkpoints)."""
        return {
            "image_size": list(self.image_size),
            "feature_maps": [list(f) for f in self.feature_maps],
            "aspect_ratios": self.aspect_ratios,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "sizes": self.sizes,
            "steps": self.steps,
            "clip": self.clip,
        }

    def __repr__(self) -> str:
        return f"DefaultBoxes({len(self)} boxes, {self.settings()})"
