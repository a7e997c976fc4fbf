"""Annotation checks, the bad-sample policy and the dataset report.

Policy ``on_bad_sample``:
    - ``"skip"`` (default): anything that would lose data (an image or an object) is dropped,
      counted in the report under its kind and logged by name on the ``ssd_lightning.data`` logger.
    - ``"raise"``: the first such problem raises ``BadSampleError`` naming the file and the field.

Repairs that keep the object (a box partly outside the image is clipped to it) are counted and
logged under both policies but never raise. Messages read ``<file>: <where>: <what>``, e.g.
``annotations/x.xml: object 3 <bndbox>: xmax (10) <= xmin (12)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np

logger = logging.getLogger("ssd_lightning.data")

OnBadSample = Literal["skip", "raise"]

# Problem kinds, the keys of DatasetReport.problems.
MISSING_ANNOTATION = "missing_annotation"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
PARSE_ERROR = "parse_error"
MALFORMED_ANNOTATION = "malformed_annotation"
SIZE_MISMATCH = "size_mismatch"
DUPLICATE_IMAGE = "duplicate_image"
UNKNOWN_CLASS = "unknown_class"
NONFINITE_BOX = "nonfinite_box"
DEGENERATE_BOX = "degenerate_box"
OUTSIDE_BOX = "outside_box"
CLIPPED_BOX = "clipped_box"


class BadSampleError(ValueError):
    """A sample or annotation is invalid (under ``on_bad_sample="raise"``); names the file."""


class BoxStatus(IntEnum):
    """Outcome of ``check_boxes`` for one box."""

    OK = 0
    CLIPPED = 1  # partly outside the image: clipped, kept
    NONFINITE = 2  # NaN or infinite coordinate: dropped
    DEGENERATE = 3  # xmax <= xmin or ymax <= ymin: dropped
    OUTSIDE = 4  # no overlap with the image: dropped


BOX_STATUS_KIND = {
    BoxStatus.CLIPPED: CLIPPED_BOX,
    BoxStatus.NONFINITE: NONFINITE_BOX,
    BoxStatus.DEGENERATE: DEGENERATE_BOX,
    BoxStatus.OUTSIDE: OUTSIDE_BOX,
}


def check_boxes(
    boxes: np.ndarray, sizes: np.ndarray, raw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and clip boxes against their image, all boxes of a dataset at once.

    Args:
        boxes: xyxy pixel boxes in the output convention.
        sizes: (height, width) of the image of each box.
        raw: The boxes as written in the annotation file, for the degenerate test: VOC's
            1-based boxes are shifted before this call, and a box is degenerate when its
            *written* xmax <= xmin. Defaults to ``boxes``.

    Returns:
        ``(clipped, status)``: boxes clipped to the image (float32) and a ``BoxStatus`` per box.
        Boxes whose status is not OK or CLIPPED must be dropped.

    Shape:
        - boxes, raw: (M, 4); sizes: (M, 2)
        - clipped: (M, 4) float32; status: (M,) int8
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    raw = boxes if raw is None else np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    h, w = np.asarray(sizes, dtype=np.float64).reshape(-1, 2).T
    status = np.zeros(len(boxes), dtype=np.int8)
    with np.errstate(invalid="ignore"):
        x1, y1, x2, y2 = boxes.T
        clipped = np.empty_like(boxes)
        clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, w[:, None])
        clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, h[:, None])
        partly = (clipped != boxes).any(axis=1)
        outside = (x2 <= 0) | (y2 <= 0) | (x1 >= w) | (y1 >= h)
        degenerate = (raw[:, 2] <= raw[:, 0]) | (raw[:, 3] <= raw[:, 1])
    # Later assignments win: non-finite > degenerate > outside > clipped.
    status[partly] = BoxStatus.CLIPPED
    status[outside] = BoxStatus.OUTSIDE
    status[degenerate] = BoxStatus.DEGENERATE
    status[~np.isfinite(boxes).all(axis=1) | ~np.isfinite(raw).all(axis=1)] = BoxStatus.NONFINITE
    return clipped.astype(np.float32), status


def describe_box(status: int, raw: np.ndarray, size: tuple[int, int]) -> str:
    """Human-readable reason for a box status, with the coordinates as written in the file."""
    x1, y1, x2, y2 = (f"{v:g}" for v in raw)
    h, w = size
    if status == BoxStatus.NONFINITE:
        return f"coordinate is NaN or infinite ({x1}, {y1}, {x2}, {y2}), dropped"
    if status == BoxStatus.DEGENERATE:
        if raw[2] <= raw[0]:
            return f"xmax ({x2}) <= xmin ({x1}), dropped"
        return f"ymax ({y2}) <= ymin ({y1}), dropped"
    if status == BoxStatus.OUTSIDE:
        return f"box ({x1}, {y1}, {x2}, {y2}) lies wholly outside the {w}x{h} image, dropped"
    return f"box ({x1}, {y1}, {x2}, {y2}) extends outside the {w}x{h} image, clipped"


@dataclass
class DatasetReport:
    """What a dataset found while reading its annotations.

    Attributes:
        name: Dataset description (paths).
        num_images: Images kept.
        objects_per_class: Objects kept per class name (crowd and difficult objects included).
        images_without_objects: Kept images with no object (all background).
        flagged: Kept objects per flag, ``{"difficult": n, "iscrowd": n}``.
        excluded: Objects left out on purpose, not problems (e.g. ``{"difficult": 12}``).
        problems: Problem kind -> one message per occurrence, naming the file and the field.
    """

    name: str
    num_images: int = 0
    objects_per_class: dict[str, int] = field(default_factory=dict)
    images_without_objects: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_objects(self) -> int:
        return sum(self.objects_per_class.values())

    @property
    def problem_counts(self) -> dict[str, int]:
        return {kind: len(messages) for kind, messages in self.problems.items()}

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.num_images} images, {self.num_objects} objects, "
            f"{self.images_without_objects} images without objects",
            "  objects per class: "
            + ", ".join(f"{k}={v}" for k, v in self.objects_per_class.items()),
        ]
        if any(self.flagged.values()):
            lines.append("  flagged: " + ", ".join(f"{k}={v}" for k, v in self.flagged.items()))
        if self.excluded:
            lines.append("  excluded: " + ", ".join(f"{k}={v}" for k, v in self.excluded.items()))
        for kind, messages in self.problems.items():
            lines.append(f"  {kind}: {len(messages)}")
            lines.extend(f"    {m}" for m in messages[:5])
            if len(messages) > 5:
                lines.append(f"    ... and {len(messages) - 5} more")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


class ProblemRecorder:
    """Applies the ``on_bad_sample`` policy: raise, or record in the report and log by name.

    Args:
        report: Report whose ``problems`` receive the messages.
        on_bad_sample: ``"skip"`` or ``"raise"``.
        max_logged: Warnings logged per problem kind; the rest go to the report (and DEBUG).
    """

    def __init__(
        self, report: DatasetReport, on_bad_sample: OnBadSample, max_logged: int = 20
    ) -> None:
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        self.report = report
        self.on_bad_sample = on_bad_sample
        self.max_logged = max_logged

    def skip(self, kind: str, message: str) -> None:
        """Data is lost (an image or an object): raise under ``"raise"``, else record and log."""
        if self.on_bad_sample == "raise":
            raise BadSampleError(message)
        self._record(kind, message)

    def repair(self, kind: str, message: str) -> None:
        """Data was repaired and kept (e.g. a clipped box): record and log, never raise."""
        self._record(kind, message)

    def _record(self, kind: str, message: str) -> None:
        messages = self.report.problems.setdefault(kind, [])
        messages.append(message)
        if len(messages) <= self.max_logged:
            logger.warning("%s: %s", kind, message)
        else:
            logger.debug("%s: %s", kind, message)

    def log_summary(self) -> None:
        """One INFO line per dataset, plus a WARNING for kinds beyond the per-kind log limit."""
        for kind, messages in self.report.problems.items():
            if len(messages) > self.max_logged:
                logger.warning(
                    "%s: %d more not logged individually (see the dataset's summary())",
                    kind,
                    len(messages) - self.max_logged,
                )
        logger.info("%s", self.report)
