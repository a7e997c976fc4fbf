"""Base detection dataset: serves the sample contract from compact annotation records.

Sample contract (a dict), the same for every dataset:
    - ``image``: (H, W, 3) uint8 RGB, EXIF orientation applied.
    - ``boxes``: (n, 4) float32 xyxy pixels, inside the image, xmax > xmin and ymax > ymin.
    - ``labels``: (n,) int64 in 1..num_classes-1 (0 is background).
    - ``difficult``: (n,) bool, VOC difficult objects (True only with ``keep_difficult``).
    - ``iscrowd``: (n,) bool, COCO crowd regions (ignore regions for training and evaluation).
    - ``image_id``: int; ``orig_size``: (height, width) of ``image``.

Bad images at read time: images are only opened at setup with ``check_images=True`` (a header
read, ~40 us each); a truncated or corrupt image is otherwise found when ``__getitem__`` decodes
it. Under ``on_bad_sample="raise"`` that raises ``ImageReadError``/``BadSampleError`` naming the
file. Under ``"skip"`` the failure is logged with the file name, counted in this process's
``summary()`` (DataLoader workers count in their own copy, so run with ``check_images=True`` to
have them in the setup report), remembered, and the next valid index is served instead. A
substituted sample repeats an image within an epoch (in evaluation too), which beats a crash
or a silent hole in the batch; the warning says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from ssd_lightning.data.images import ImageReadError, read_image, read_image_size
from ssd_lightning.data.records import AnnotationRecords
from ssd_lightning.data.validation import (
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    BadSampleError,
    DatasetReport,
    OnBadSample,
    ProblemRecorder,
)

Sample = dict[str, Any]


class DetectionDataset(Dataset):
    """Detection samples from ``AnnotationRecords``; subclasses parse a format into records.

    Args:
        records: The annotations.
        class_names: Names by label, index 0 = ``"background"``.
        label_map: Dataset category id -> contiguous label (COCO ids; identity for VOC).
        report: What reading the annotations found.
        on_bad_sample: ``"skip"`` (log, count, serve the next valid sample) or ``"raise"``.
        transform: Optional callable applied to each sample dict.
    """

    def __init__(
        self,
        records: AnnotationRecords,
        class_names: Sequence[str],
        label_map: Mapping[int, int],
        report: DatasetReport,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        if len(records) == 0:
            raise ValueError(f"{report.name}: no usable images\n{report}")
        self.records = records
        self.class_names = list(class_names)
        self.label_map = dict(label_map)
        self.on_bad_sample = on_bad_sample
        self.transform = transform
        self._recorder = ProblemRecorder(report, on_bad_sample)
        self._bad: set[int] = set()
        self._recorder.log_summary()

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
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            if candidate in self._bad:
                continue
            try:
                sample = self.load_sample(candidate)
            except (ImageReadError, BadSampleError) as e:
                if self.on_bad_sample == "raise":
                    raise
                self._bad.add(candidate)
                kind = SIZE_MISMATCH if isinstance(e, BadSampleError) else UNREADABLE_IMAGE
                self._recorder.skip(kind, f"{e} (sample {candidate} skipped, next one served)")
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
        image = read_image(path)
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


def verify_image(
    path: str | os.PathLike[str], size: tuple[int, int], recorder: ProblemRecorder
) -> bool:
    """Setup-time check: the header is readable and matches the annotated (height, width)."""
    try:
        actual = read_image_size(path)
    except ImageReadError as e:
        recorder.skip(UNREADABLE_IMAGE, str(e))
        return False
    if actual != tuple(size):
        recorder.skip(SIZE_MISMATCH, _size_mismatch(os.fspath(path), actual, size))
        return False
    return True


def _size_mismatch(path: str, actual: tuple[int, int], expected: Sequence[int]) -> str:
    return (
        f"{path}: image is {actual[1]}x{actual[0]} (WxH, EXIF orientation applied) but the "
        f"annotation says {expected[1]}x{expected[0]}"
    )
