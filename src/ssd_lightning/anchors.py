"""SSD default boxes (anchors): one parameterisation for any number of source maps.

Conventions used across ssd_lightning: boxes at the public API are absolute ``xyxy`` float pixels;
anchors and regression targets are normalised ``cxcywh`` in [0, 1] image units; label 0 is
background and ``num_classes`` counts it.

Scales (``scales_for``). The SSD paper's Eq. 4 and the Caffe VOC/COCO size tables are one family:

- map 1 has its own scale ``first_scale`` (Caffe: VOC 0.1, COCO 0.07), or None for the paper's
  rule where map 1 starts the linear range;
- the other maps are linear from ``s_min`` to ``s_max`` (``integer_percent``: Caffe's step,
  floored to a whole percent, ``floor((90 - 20) / (m - 2)) = 17`` for SSD300 on VOC);
- the extra square of the last map uses ``s_extra``: a number (1.0 in torchvision's Eq. 4
  default) or ``"step"``, one linear step beyond the last map (Caffe: 0.88 + 0.17 = 1.05).

At 300 px with six maps that gives the paper's boxes (0.2..0.9), the VOC table
[30, 60, 111, 162, 213, 264, 315] and the COCO table [21, 45, 99, 153, 207, 261, 315], and the same
settings give a valid set of boxes for a network with any number of maps. An explicit ``sizes``
table (m + 1 pixel sizes) is also accepted; setting it together with any scale is an error.

Aspect ratios (``aspect_ratios_for``) are listed without 1 and without reciprocals
(torchvision's ``DefaultBoxGenerator`` convention), either one list per map, one flat list for
every map, or the rule ``"paper"``: {2} on the first and last two maps, {2, 3} in between
(SSD300's [[2], [2, 3], [2, 3], [2, 3], [2], [2]], SSD512's on seven maps), for any number of
maps. (Python callers may also pass a rule as ``{"first": [[2]], "middle": [2, 3], "last":
[[2], [2]]}``; configs use the name, which a list override can replace.) Each cell of
map k holds ``2 + 2 * len(ratios[k])`` boxes: the square of scale s_k, the extra square of scale
sqrt(s_k * s_(k+1)), and for every ratio r a box of (s_k sqrt(r), s_k / sqrt(r)) and its
transpose.

Steps: None (centres on the map's own grid, (i + 0.5) / f_k), one stride in pixels per map, or
``"power_of_two"``: the map's stride rounded to a power of two when within 10% of one, else the
stride itself (Caffe's SSD300 steps [8, 16, 32, 64, 100, 300] and SSD512's [8, ..., 512]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torchvision.ops import box_convert

# SSD300 (SSD paper, Sec. 3.1): {1, 2, 1/2} on the first and last two maps, {1, 2, 3, 1/2, 1/3}
# in between; any number of maps.
PAPER_ASPECT_RATIOS = "paper"
ASPECT_RATIO_RULES: dict[str, dict[str, Any]] = {
    "paper": {"first": [[2]], "middle": [2, 3], "last": [[2], [2]]},
}
SSD300_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
POWER_OF_TWO = "power_of_two"
ONE_STEP = "step"


class AnchorSettingsError(ValueError):
    """Anchor settings that contradict each other or do not fit the network."""


class HasFeatureMaps(Protocol):
    def feature_map_sizes(self, image_size: Sequence[int]) -> list[tuple[int, int]]: ...


def boxes_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """Default boxes per feature-map cell, one entry per map (SSD300: [4, 6, 6, 6, 4, 4])."""
    return [2 + 2 * len(ratios) for ratios in aspect_ratios]


def aspect_ratios_for(spec: Any, num_maps: int) -> list[list[float]]:
    """The aspect ratios of every map: from per-map lists, one flat list, or a rule.

    Raises:
        AnchorSettingsError: per-map lists for another number of maps, or a rule whose first
            and last maps are more than the network has.
    """
    if isinstance(spec, str):
        if spec not in ASPECT_RATIO_RULES:
            raise AnchorSettingsError(
                f"anchors.aspect_ratios={spec!r}: unknown rule (known: "
                f"{', '.join(ASPECT_RATIO_RULES)}; or give lists)"
            )
        spec = ASPECT_RATIO_RULES[spec]
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"first", "middle", "last"}
        if unknown:
            raise AnchorSettingsError(
                f"anchors.aspect_ratios: unknown rule keys {sorted(unknown)} "
                "(use first, middle, last)"
            )
        first = [list(r) for r in spec.get("first") or []]
        last = [list(r) for r in spec.get("last") or []]
        if len(first) + len(last) > num_maps:
            raise AnchorSettingsError(
                f"anchors.aspect_ratios rule names {len(first)} first and {len(last)} last maps "
                f"but the network has {num_maps} source maps"
            )
        middle = [list(spec.get("middle") or [])] * (num_maps - len(first) - len(last))
        ratios = first + middle + last
    elif all(isinstance(r, int | float) for r in spec):
        ratios = [list(spec)] * num_maps
    else:
        ratios = [list(r) for r in spec]
        if len(ratios) != num_maps:
            raise AnchorSettingsError(
                f"anchors.aspect_ratios has {len(ratios)} per-map lists but the network has "
                f"{num_maps} source maps; give {num_maps} lists, one flat list for every map, "
                "or the rule paper"
            )
    return [[float(r) for r in rs] for rs in ratios]


def scales_for(
    num_maps: int,
    s_min: float = 0.2,
    s_max: float = 0.9,
    first_scale: float | None = None,
    s_extra: float | str = 1.0,
    integer_percent: bool = False,
) -> list[float]:
    """s_1..s_(m+1) relative to the image (see the module docstring).

    Example: ``scales_for(6, 0.2, 0.9, first_scale=0.1, s_extra="step", integer_percent=True)``
    -> [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05] (Caffe's ssd_pascal.py at 300 px).
    """
    linear_maps = num_maps - (first_scale is not None)
    if linear_maps < 1:
        raise AnchorSettingsError(f"anchors: first_scale needs at least 2 maps, got {num_maps}")
    if integer_percent:  # Caffe: whole percents, the step floored
        low, high = round(100 * s_min), round(100 * s_max)
        step_pct = (high - low) // (linear_maps - 1) if linear_maps > 1 else high - low
        linear = [(low + step_pct * k) / 100 for k in range(linear_maps)]
        step = step_pct / 100
        beyond = (low + step_pct * linear_maps) / 100
    else:
        step = (s_max - s_min) / (linear_maps - 1) if linear_maps > 1 else s_max - s_min
        linear = [s_min + step * k for k in range(linear_maps)]
        beyond = linear[-1] + step
    if s_extra == ONE_STEP:
        extra = beyond
    elif isinstance(s_extra, int | float):
        extra = float(s_extra)
    else:
        raise AnchorSettingsError(f"anchors.s_extra must be a number or 'step', got {s_extra!r}")
    return ([float(first_scale)] if first_scale is not None else []) + linear + [extra]


def steps_for(
    spec: Sequence[float] | str | None,
    image_size: tuple[int, int],
    feature_maps: Sequence[tuple[int, int]],
) -> list[float] | None:
    """Strides in pixels per map (None: centres on each map's own grid)."""
    if spec is None:
        return None
    if spec == POWER_OF_TWO:
        steps = []
        for fh, _ in feature_maps:
            stride = image_size[0] / fh
            power = 2.0 ** round(math.log2(stride))
            steps.append(power if abs(stride / power - 1) <= 0.1 else stride)
        return steps
    if isinstance(spec, str):
        raise AnchorSettingsError(f"anchors.steps: unknown rule {spec!r} (use {POWER_OF_TWO!r})")
    if len(spec) != len(feature_maps):
        raise AnchorSettingsError(
            f"anchors.steps has {len(spec)} entries but the network has {len(feature_maps)} "
            f"source maps; give one per map or steps={POWER_OF_TWO}"
        )
    return [float(s) for s in spec]


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
            as measured on the network (never typed by hand; see ``for_network``).
        aspect_ratios: per-map lists, one flat list, or a rule (``"paper"``).
        s_min, s_max: the linear range of scales (SSD paper, Eq. 4); default 0.2, 0.9.
        first_scale: own scale of map 1 (Caffe VOC 0.1, COCO 0.07), None: part of the range.
        s_extra: scale s_(m+1) of the last map's extra square: a number or ``"step"``.
        integer_percent: Caffe's scale step, floored to a whole percent.
        sizes: explicit m + 1 box sizes in pixels at ``image_size`` instead of the scales.
        steps: None, one stride per map in pixels, or ``"power_of_two"``.
        clip: clamp box widths and heights to [0, 1] as most re-implementations do.

    Attributes:
        cxcywh: (A, 4) normalised centre form, map by map, row-major cells, the boxes of a cell
            together, in the order the SSD heads emit them.
        xyxy: (A, 4) the same boxes in normalised corner form.
        aspect_ratios, steps: as resolved for these maps.
        boxes_per_location: boxes per cell of every map.
        map_slices: the rows of ``cxcywh`` of every map.
        map_of_box: (A,) int64, the map of every box.

    Raises:
        AnchorSettingsError: ``sizes`` together with a scale setting, or settings that do not
            fit the number of maps.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        feature_maps: Sequence[int | Sequence[int]],
        aspect_ratios: Any = PAPER_ASPECT_RATIOS,
        s_min: float | None = None,
        s_max: float | None = None,
        first_scale: float | None = None,
        s_extra: float | str | None = None,
        integer_percent: bool = False,
        sizes: Sequence[float] | None = None,
        steps: Sequence[float] | str | None = None,
        clip: bool = True,
    ) -> None:
        self.image_size = _pair(image_size)
        self.feature_maps = [_pair(f) for f in feature_maps]
        m = len(self.feature_maps)
        self._settings = {
            "aspect_ratios": aspect_ratios, "s_min": s_min, "s_max": s_max,
            "first_scale": first_scale, "s_extra": s_extra, "integer_percent": integer_percent,
            "sizes": None if sizes is None else [float(s) for s in sizes],
            "steps": steps if steps is None or isinstance(steps, str) else list(steps),
            "clip": bool(clip),
        }  # fmt: skip
        if sizes is not None:
            scale_keys = ("s_min", "s_max", "first_scale", "s_extra")
            given = [k for k in scale_keys if self._settings[k] is not None]
            given += ["integer_percent"] if integer_percent else []
            if given:
                raise AnchorSettingsError(
                    f"anchors.sizes (an explicit size table) contradicts anchors.{given[0]}"
                    f"={self._settings[given[0]]}: set the table or the scales, not both "
                    "(e.g. anchors.sizes=null)"
                )
            if len(sizes) != m + 1:
                raise AnchorSettingsError(
                    f"anchors.sizes needs {m + 1} entries for {m} maps, got {list(sizes)}"
                )
            self._scales = [float(s) / min(self.image_size) for s in sizes]
        else:
            self._scales = scales_for(
                m,
                0.2 if s_min is None else float(s_min),
                0.9 if s_max is None else float(s_max),
                first_scale,
                1.0 if s_extra is None else s_extra,
                integer_percent,
            )
        self.aspect_ratios = aspect_ratios_for(aspect_ratios, m)
        self.steps = steps_for(steps, self.image_size, self.feature_maps)
        self.clip = bool(clip)
        self.boxes_per_location = boxes_per_location(self.aspect_ratios)
        per_cell = zip(self.feature_maps, self.boxes_per_location, strict=True)
        counts = [h * w * k for (h, w), k in per_cell]
        ends = torch.tensor(counts).cumsum(0).tolist()
        self.map_slices = [slice(end - n, end) for n, end in zip(counts, ends, strict=True)]
        self.map_of_box = torch.repeat_interleave(torch.arange(m), torch.tensor(counts))
        self.cxcywh = self._build()
        self.xyxy = box_convert(self.cxcywh, "cxcywh", "xyxy")

    @classmethod
    def for_network(
        cls, net: HasFeatureMaps, image_size: int | Sequence[int], **settings: Any
    ) -> DefaultBoxes:
        """The default boxes of ``net`` at ``image_size``: the one place they are built."""
        size = _pair(image_size)
        return cls(size, net.feature_map_sizes(size), **settings)

    def with_scales(self, s_min: float, s_max: float) -> DefaultBoxes:
        """The same boxes with another linear scale range (a size table becomes Eq. 4)."""
        settings = self.settings()
        if settings["sizes"] is not None:
            settings.update(sizes=None, first_scale=None, s_extra=None, integer_percent=False)
        return DefaultBoxes(**{**settings, "s_min": s_min, "s_max": s_max})

    def scales(self) -> list[float]:
        """s_1..s_(m+1) relative to the image (SSD paper, Eq. 4, or the size table)."""
        return list(self._scales)

    def _cell_shapes(self, k: int) -> Tensor:
        """(boxes_per_location[k], 2) widths and heights of the boxes of one cell of map k."""
        s, s_next = self._scales[k], self._scales[k + 1]
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in self.aspect_ratios[k]:
            w, h = s * math.sqrt(r), s / math.sqrt(r)
            shapes += [(w, h), (h, w)]
        wh = torch.tensor(shapes, dtype=torch.float32)
        return wh.clamp(0.0, 1.0) if self.clip else wh

    def _build(self) -> Tensor:
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
            wh = self._cell_shapes(k)  # (k, 2)
            cells = centres.expand(-1, len(wh), 2)
            per_map.append(
                torch.cat([cells, wh.expand(len(centres), -1, 2)], dim=-1).reshape(-1, 4)
            )
        return torch.cat(per_map)

    def map_grid(self, k: int) -> Tensor:
        """The boxes of map k as (H_k, W_k, boxes_per_location[k], 4) cxcywh."""
        (fh, fw), per_cell = self.feature_maps[k], self.boxes_per_location[k]
        return self.cxcywh[self.map_slices[k]].view(fh, fw, per_cell, 4)

    def __len__(self) -> int:
        return self.cxcywh.shape[0]

    def settings(self) -> dict[str, Any]:
        """Constructor arguments as plain values (stored in checkpoints; rebuild the boxes)."""
        return {
            "image_size": list(self.image_size),
            "feature_maps": [list(f) for f in self.feature_maps],
            **self._settings,
        }

    def describe(self) -> dict[str, Any]:
        """The resolved geometry: scales, per-map aspect ratios and steps, box counts."""
        return {
            "scales": [round(s, 6) for s in self._scales],
            "sizes_px": [round(s * min(self.image_size), 2) for s in self._scales],
            "aspect_ratios": self.aspect_ratios,
            "steps": self.steps,
            "boxes_per_location": self.boxes_per_location,
            "num_boxes": len(self),
        }

    def __repr__(self) -> str:
        return f"DefaultBoxes({len(self)} boxes, {self.settings()})"


__all__ = [
    "ASPECT_RATIO_RULES",
    "PAPER_ASPECT_RATIOS",
    "POWER_OF_TWO",
    "SSD300_ASPECT_RATIOS",
    "AnchorSettingsError",
    "DefaultBoxes",
    "aspect_ratios_for",
    "boxes_per_location",
    "scales_for",
    "steps_for",
]
