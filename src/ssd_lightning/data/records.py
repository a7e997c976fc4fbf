"""Compact in-memory annotation store.

All per-sample data lives in a few flat numpy arrays, never in per-sample Python objects:
DataLoader workers are forked copies of the dataset, and reading a Python dict or list touches
its reference counts, which copies the memory page of every object read into each worker
(the "copy-on-read" growth of PyTorch issue #13246). Numpy arrays of numbers and fixed-width
byte strings hold no per-element objects, so the pages stay shared.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ssd_lightning.data.validation import (
    BOX_STATUS_KIND,
    BoxStatus,
    DatasetReport,
    ProblemRecorder,
    check_boxes,
    describe_box,
)


@dataclass(frozen=True)
class AnnotationRecords:
    """Annotations of N images with M objects in total.

    Objects of image ``i`` are rows ``offsets[i]:offsets[i + 1]`` of the object arrays.

    Attributes:
        paths: Image file paths, ``os.fsencode``-d. Shape (N,), dtype ``S``.
        image_ids: Image ids (COCO ids, or positions for VOC). Shape (N,), int64.
        sizes: (height, width) as annotated. Shape (N, 2), int64.
        offsets: Start of each image's objects. Shape (N + 1,), int64.
        boxes: xyxy pixel boxes inside their image. Shape (M, 4), float32.
        labels: Contiguous labels 1..C-1. Shape (M,), int64.
        difficult: VOC "difficult" flags. Shape (M,), bool.
        iscrowd: COCO crowd flags. Shape (M,), bool.
    """

    paths: np.ndarray
    image_ids: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    iscrowd: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def objects(self, index: int) -> dict[str, np.ndarray]:
        """Copies of the object arrays of one image (safe to modify in place)."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        return {
            "boxes": self.boxes[start:stop].copy(),
            "labels": self.labels[start:stop].copy(),
            "difficult": self.difficult[start:stop].copy(),
            "iscrowd": self.iscrowd[start:stop].copy(),
        }

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.__dataclass_fields__)

    def subset(self, keep: np.ndarray) -> AnnotationRecords:
        """The images where ``keep`` (N,) bool holds, with their objects."""
        counts = np.diff(self.offsets)
        objects = np.repeat(keep, counts)
        return AnnotationRecords(
            paths=self.paths[keep],
            image_ids=self.image_ids[keep],
            sizes=self.sizes[keep],
            offsets=np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64),
            boxes=self.boxes[objects],
            labels=self.labels[objects],
            difficult=self.difficult[objects],
            iscrowd=self.iscrowd[objects],
        )

    def count_into(self, report: DatasetReport, class_names: Sequence[str]) -> None:
        """Fill the report's image and object counts from these records."""
        report.num_images = len(self)
        per_class = np.bincount(self.labels, minlength=len(class_names))
        report.objects_per_class = {
            name: int(c) for name, c in zip(class_names[1:], per_class[1:], strict=False)
        }
        report.images_without_objects = int((np.diff(self.offsets) == 0).sum())
        report.flagged = {
            "difficult": int(self.difficult.sum()),
            "iscrowd": int(self.iscrowd.sum()),
        }


class RecordsBuilder:
    """Collects images and objects while parsing, then checks all boxes at once in ``build``.

    Each object carries ``source``, an integer the dataset uses to name it in messages (the
    object's position in its XML file, or the COCO annotation id).
    """

    def __init__(self) -> None:
        self._paths: list[bytes] = []
        self._image_ids: list[int] = []
        self._sizes: list[tuple[int, int]] = []
        self._image_of_object: list[np.ndarray] = []
        self._chunks: dict[str, list[np.ndarray]] = {
            k: [] for k in ("boxes", "raw", "labels", "difficult", "iscrowd", "source")
        }

    def __len__(self) -> int:
        return len(self._paths)

    def add_image(self, path: str | os.PathLike[str], image_id: int, size: tuple[int, int]) -> int:
        """Add an image; returns its index."""
        self._paths.append(os.fsencode(path))
        self._image_ids.append(int(image_id))
        self._sizes.append((int(size[0]), int(size[1])))
        return len(self._paths) - 1

    def add_objects(
        self,
        image_index: int | np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        source: np.ndarray,
        raw: np.ndarray | None = None,
        difficult: np.ndarray | None = None,
        iscrowd: np.ndarray | None = None,
    ) -> None:
        """Add objects of one image, or of several with a per-object ``image_index`` array.

        Boxes are checked in ``build``; ``raw`` holds them as written (see ``check_boxes``).
        """
        n = len(labels)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
        chunks = self._chunks
        chunks["boxes"].append(boxes)
        chunks["raw"].append(boxes if raw is None else np.asarray(raw, np.float64).reshape(n, 4))
        chunks["labels"].append(np.asarray(labels, dtype=np.int64).reshape(n))
        chunks["source"].append(np.asarray(source, dtype=np.int64).reshape(n))
        for key, flags in (("difficult", difficult), ("iscrowd", iscrowd)):
            chunks[key].append(np.zeros(n, bool) if flags is None else np.asarray(flags, bool))
        self._image_of_object.append(np.broadcast_to(np.asarray(image_index, np.int64), n).copy())

    def build(
        self,
        recorder: ProblemRecorder,
        class_names: Sequence[str],
        where: Callable[[int, int], str],
    ) -> AnnotationRecords:
        """Check every box against its image, drop or clip it, fill the report, return the store.

        Args:
            recorder: Receives one problem per dropped or clipped box (may raise).
            class_names: Names by label, index 0 = background, for the report.
            where: ``where(image_index, source)`` -> message prefix naming file and field.
        """
        n_images = len(self._paths)
        sizes = np.array(self._sizes, dtype=np.int64).reshape(n_images, 2)
        cat = {k: _concat(v, k) for k, v in self._chunks.items()}
        image_of = _concat(self._image_of_object, "source")
        boxes, status = check_boxes(cat["boxes"], sizes[image_of], cat["raw"])
        for j in np.flatnonzero(status != BoxStatus.OK):
            i, message = (
                int(image_of[j]),
                describe_box(status[j], cat["raw"][j], sizes[image_of[j]]),
            )
            kind = BOX_STATUS_KIND[BoxStatus(status[j])]
            text = f"{where(i, int(cat['source'][j]))}: {message}"
            if status[j] == BoxStatus.CLIPPED:
                recorder.repair(kind, text)
            else:
                recorder.skip(kind, text)
        keep = status <= BoxStatus.CLIPPED
        order = np.argsort(image_of[keep], kind="stable")
        counts = np.bincount(image_of[keep], minlength=n_images)
        records = AnnotationRecords(
            paths=np.array(self._paths, dtype=np.bytes_) if n_images else np.empty(0, "S1"),
            image_ids=np.array(self._image_ids, dtype=np.int64),
            sizes=sizes,
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            boxes=np.ascontiguousarray(boxes[keep][order]),
            labels=cat["labels"][keep][order],
            difficult=cat["difficult"][keep][order],
            iscrowd=cat["iscrowd"][keep][order],
        )
        records.count_into(recorder.report, class_names)
        return records


def _concat(chunks: list[np.ndarray], key: str) -> np.ndarray:
    if chunks:
        return np.concatenate(chunks)
    empty = {"boxes": (0, 4), "raw": (0, 4)}.get(key, (0,))
    dtype = {"difficult": bool, "iscrowd": bool, "boxes": np.float64, "raw": np.float64}
    return np.zeros(empty, dtype=dtype.get(key, np.int64))
