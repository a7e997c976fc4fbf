"""COCO annotation JSON + image folder.

The JSON is read with ``json`` and interpreted as pycocotools' ``COCO`` does (``bbox`` is
``[x, y, w, h]`` in pixels, ``iscrowd`` marks crowd regions, category ids are arbitrary
integers), without building a ``COCO`` index: that reports parse errors with their line and
column, finds duplicate image ids (``COCO.createIndex`` keeps the last one silently) and keeps
no per-annotation Python dicts after setup. Evaluation can build ``pycocotools.coco.COCO`` from
``annotation_file`` and map labels back through ``label_map``.

Crowd annotations are kept with ``iscrowd=True``: training treats them as ignore regions and
COCO evaluation matches detections to them without counting them as misses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ssd_lightning.data.dataset import DetectionDataset, Sample
from ssd_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image_size
from ssd_lightning.data.records import RecordsBuilder
from ssd_lightning.data.validation import (
    DUPLICATE_IMAGE,
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    UNKNOWN_CLASS,
    BadSampleError,
    DatasetReport,
    OnBadSample,
    ProblemRecorder,
)


class COCODataset(DetectionDataset):
    """COCO-format detection dataset.

    Args:
        annotation_file: COCO ``instances`` JSON.
        image_dir: Folder that ``images[].file_name`` is relative to.
        check_images: Check every image file at setup (header, size against the JSON's
            width/height, pixel limit, truncation; see ``DetectionDataset``).
        max_image_pixels: Images with more pixels are bad samples (None: no limit).
        on_bad_sample: ``"skip"`` or ``"raise"`` (see ``ssd_lightning.data.validation``).
        transform: Optional callable applied to each sample dict.

    Category ids map to contiguous labels 1..C-1 in ascending id order over *all* categories
    of the file (present in images or not), kept in ``label_map``; ``class_names[k]`` is the
    name of label k. Image ids are the JSON ids.

    Raises:
        BadSampleError: the JSON does not parse (message has file, line and column) or lacks
            ``images``/``categories``; always raised, whatever ``on_bad_sample`` says.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        image_dir: str | os.PathLike[str],
        check_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.annotation_file = os.fspath(annotation_file)
        self.image_dir = os.fspath(image_dir)
        data = load_coco_json(self.annotation_file)
        report = DatasetReport(name=f"COCO {self.annotation_file}")
        recorder = ProblemRecorder(report, on_bad_sample)
        label_map, names = _categories(data["categories"], self.annotation_file)
        builder = RecordsBuilder()
        index_of_id, file_names, all_ids = _read_images(
            data["images"], self.annotation_file, Path(image_dir), builder, recorder
        )
        _read_annotations(
            data.get("annotations", []), self.annotation_file, index_of_id, all_ids,
            label_map, builder, recorder,
        )  # fmt: skip
        records = builder.build(
            recorder,
            ["background", *names],
            lambda i, ann_id: (
                f"{self.annotation_file}: annotation id {ann_id} (image {file_names[i]}) bbox"
            ),
        )
        super().__init__(
            records, ["background", *names], label_map, report, on_bad_sample, transform,
            check_images, max_image_pixels,
        )  # fmt: skip


def load_coco_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a COCO JSON file; errors name the file and the position."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: COCO annotation file not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise BadSampleError(
                f"{os.fspath(path)}: JSON parse error at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from e
    if not isinstance(data, dict):
        raise BadSampleError(f"{os.fspath(path)}: top level is not a JSON object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise BadSampleError(f"{os.fspath(path)}: missing or invalid '{key}' list")
    return data


def _categories(categories: list[Any], path: str) -> tuple[dict[int, int], list[str]]:
    try:
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError) as e:
        raise BadSampleError(f"{path}: categories need integer 'id' and 'name' ({e!r})") from e
    if len(by_id) != len(categories):
        raise BadSampleError(f"{path}: duplicate category ids")
    ids = sorted(by_id)
    return {cat_id: k + 1 for k, cat_id in enumerate(ids)}, [by_id[i] for i in ids]


def _read_images(
    images: list[Any],
    path: str,
    image_dir: Path,
    builder: RecordsBuilder,
    recorder: ProblemRecorder,
) -> tuple[dict[int, int], list[str], set[int]]:
    """Add valid image entries to the builder.

    Returns:
        Image id -> index of kept images, their file names, and every image id listed.
    """
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found (for {path})")
    present = set(os.listdir(image_dir))
    index_of_id: dict[int, int] = {}
    file_names: list[str] = []
    all_ids: set[int] = set()
    for position, entry in enumerate(images):
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            recorder.skip(MALFORMED_ANNOTATION, f"{path}: images[{position}] lacks id/file_name")
            continue
        image_path = image_dir / file_name
        if image_id in all_ids:
            recorder.skip(
                DUPLICATE_IMAGE,
                f"{path}: images[{position}] ({file_name}): duplicate image id {image_id}; "
                "first entry kept",
            )
            continue
        all_ids.add(image_id)
        if file_name not in present and not image_path.is_file():
            recorder.skip(MISSING_IMAGE, f"{image_path}: image file not found (id {image_id})")
            continue
        size = _image_size(entry, image_path, path, recorder)
        if size is None:
            continue
        index_of_id[image_id] = builder.add_image(image_path, image_id, size)
        file_names.append(file_name)
    return index_of_id, file_names, all_ids


def _image_size(
    entry: dict[str, Any], image_path: Path, path: str, recorder: ProblemRecorder
) -> tuple[int, int] | None:
    """(height, width) from the entry, or from the image header when absent or invalid."""
    try:
        height, width = int(entry["height"]), int(entry["width"])
        if height > 0 and width > 0:
            return height, width
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return read_image_size(image_path)
    except ImageReadError as e:
        recorder.skip(MALFORMED_ANNOTATION, f"{path}: no valid height/width and {e}")
        return None


def _read_annotations(
    annotations: list[Any],
    path: str,
    index_of_id: dict[int, int],
    all_ids: set[int],
    label_map: dict[int, int],
    builder: RecordsBuilder,
    recorder: ProblemRecorder,
) -> None:
    """Add every well-formed annotation of a kept image to the builder in one call."""
    image_index, boxes, labels, crowd, ann_ids = [], [], [], [], []
    for position, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{path}: annotations[{position}] (id {ann_id})"
        try:
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            recorder.skip(
                MALFORMED_ANNOTATION, f"{where}: needs image_id, category_id and bbox [x, y, w, h]"
            )
            continue
        if image_id not in index_of_id:
            if image_id not in all_ids:
                recorder.skip(MALFORMED_ANNOTATION, f"{where} image_id: unknown image {image_id}")
            continue  # else the image was skipped and reported
        if category_id not in label_map:
            recorder.skip(UNKNOWN_CLASS, f"{where} category_id: unknown category {category_id}")
            continue
        image_index.append(index_of_id[image_id])
        boxes.append((x, y, x + w, y + h))  # xywh -> xyxy
        labels.append(label_map[category_id])
        crowd.append(bool(ann.get("iscrowd", 0)))
        ann_ids.append(int(ann.get("id", position)))
    builder.add_objects(
        np.array(image_index, dtype=np.int64),
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(labels, dtype=np.int64),
        np.array(ann_ids, dtype=np.int64),
        iscrowd=np.array(crowd, dtype=bool),
    )
