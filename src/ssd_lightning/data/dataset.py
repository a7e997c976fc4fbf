"""Base detection dataset: serves the sample contract from compact annotation records.

Sample contract (a dict), the same for every dataset:
    - ``image``: (H, W, 3) uint8 RGB, EXIF orientation applied.
    - ``boxes``: (n, 4) float32 xyxy pixels, inside the image, xmax > xmin and ymax > ymin.
    - ``labels``: (n,) int64 in 1..num_classes-1 (0 is background).
    - ``difficult``: (n,) bool, VOC difficult objects (True only with ``keep_difficult``).
    - ``iscrowd``: (n,) bool, COCO crowd regions (ignore regions for training and evaluation).
    - ``image_id``: int; ``orig_size``: (height, width) of ``image``.

Bad images: with ``check_images=True`` (the default) every image's header is checked at setup
(readable, size as annotated, at most ``max_image_pixels``, JPEG/PNG not truncated), in threads
with a progress bar, and failures are reported with the annotation problems. An image that still
fails when decoded (corrupt data inside the file) raises ``ImageReadError``/``BadSampleError``
naming the file under ``on_bad_sample="raise"``. Under ``"skip"`` it is logged once, flagged in
memory shared with the DataLoader workers (so ``skipped_at_read`` counts it once for the run and
no worker decodes it again), and then:

- ``get(index, substitute=True)`` (training, ``dataset[index]``) serves the next valid sample;
- ``get(index, substitute=False)`` (validation and test) returns None: the sample is dropped
  and counted, never replaced by another image that would be scored twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ssd_lightning.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    check_image_file,
    read_image,
)
from ssd_lightning.data.records import AnnotationRecords
from ssd_lightning.data.validation import (
    IMAGE_TOO_LARGE,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    BadSampleError,
    DatasetReport,
    OnBadSample,
    ProblemRecorder,
)

log = logging.getLogger(__name__)

Sample = dict[str, Any]


class DetectionDataset(Dataset):
    """Detection samples from ``AnnotationRecords``; subclasses parse a format into records.

    Args:
        records: The annotations.
        class_names: Names by label, index 0 = ``"background"``.
        label_map: Dataset category id -> contiguous label (COCO ids; identity for VOC).
        report: What reading the annotations found.
        on_bad_sample: ``"skip"`` (log, count, drop or substitute) or ``"raise"``.
        transform: Optional callable applied to each sample dict.
        check_images: Check every image file at setup (see the module docstring).
        max_image_pixels: Larger images are bad samples (None: no limit).
    """

    def __init__(
        self,
        records: AnnotationRecords,
        class_names: Sequence[str],
        label_map: Mapping[int, int],
        report: DatasetReport,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
        check_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.class_names = list(class_names)
        self.label_map = dict(label_map)
        self.on_bad_sample = on_bad_sample
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        self._recorder = ProblemRecorder(report, on_bad_sample)
        if check_images:
            records = self._checked(records)
        if len(records) == 0:
            raise ValueError(f"{report.name}: no usable images\n{report}")
        self.records = records
        # One flag per image in shared memory: DataLoader workers see each other's finds.
        self._bad = torch.zeros(len(records), dtype=torch.bool).share_memory_()
        self._recorder.log_summary()

    def _checked(self, records: AnnotationRecords) -> AnnotationRecords:
        """The records whose image file passes ``check_image_file``; the rest reported."""
        paths = [records.path(i) for i in range(len(records))]
        bar = tqdm(
            total=len(paths), desc="checking images", unit="img", leave=False,
            disable=len(paths) < 2000 or os.environ.get("LOCAL_RANK", "0") != "0"
            or bool(os.environ.get("TQDM_DISABLE")),  # read at tqdm import, before scripts set it
        )  # fmt: skip
        limit = self.max_image_pixels

        def check(path: str) -> tuple[int, int] | ImageReadError:
            try:
                return check_image_file(path, limit)
            except ImageReadError as e:
                return e
            finally:
                bar.update()

        with bar, ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(check, paths, chunksize=64))
        keep = np.ones(len(records), dtype=bool)
        for i, (path, result) in enumerate(zip(paths, results, strict=True)):
            expected = tuple(int(v) for v in records.sizes[i])
            if isinstance(result, ImageReadError):
                keep[i] = False
                self._recorder.skip(_kind(result), str(result))
            elif result != expected:
                keep[i] = False
                self._recorder.skip(SIZE_MISMATCH, _size_mismatch(path, result, expected))
        if keep.all():
            return records
        records = records.subset(keep)
        records.count_into(self._recorder.report, self.class_names)
        return records

    @property
    def skipped_at_read(self) -> int:
        """Images found bad when decoded (not at setup), in any process, this run."""
        return int(self._bad.sum())

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names)

    def summary(self) -> DatasetReport:
        """Images, objects per class and problems found (setup, plus reads in this process)."""
        return self._recorder.report

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        sample = self.get(index, substitute=True)
        assert sample is not None
        return sample

    def get(self, index: int, substitute: bool) -> Sample | None:
        """Sample ``index``; a bad one is replaced by the next valid one or, with
        ``substitute=False``, dropped (None). Both are counted in ``skipped_at_read``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            if self._bad[candidate]:
                if not substitute:
                    return None
                continue
            try:
                sample = self.load_sample(candidate)
            except (ImageReadError, BadSampleError) as e:
                if self.on_bad_sample == "raise":
                    raise
                self._bad[candidate] = True
                action = "next one served" if substitute else "dropped"
                self._recorder.skip(_kind(e), f"{e} (sample {candidate} skipped, {action})")
                if not substitute:
                    return None
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(f"{self.summary().name}: no readable image left")

    def load_sample(self, index: int) -> Sample:
        """Decode one sample without substitution or transform.

        Raises:
            ImageReadError: the image cannot be decoded.
            BadSampleError: the decoded size differs from the annotated one.
        """
        path = self.records.path(index)
        image = read_image(path, self.max_image_pixels)
        size = (image.shape[0], image.shape[1])
        expected = tuple(int(v) for v in self.records.sizes[index])
        if size != expected:
            raise BadSampleError(_size_mismatch(path, size, expected))
        return {
            "image": image,
            **self.records.objects(index),
            "image_id": int(self.records.image_ids[index]),
            "orig_size": size,
        }


def _kind(error: Exception) -> str:
    """The report's problem kind of a read failure."""
    if isinstance(error, ImageTooLargeError):
        return IMAGE_TOO_LARGE
    return SIZE_MISMATCH if isinstance(error, BadSampleError) else UNREADABLE_IMAGE


def _size_mismatch(path: str, actual: tuple[int, int], expected: Sequence[int]) -> str:
    return (
        f"{path}: image is {actual[1]}x{actual[0]} (WxH, EXIF orientation applied) but the "
        f"annotation says {expected[1]}x{expected[0]}"
    )
