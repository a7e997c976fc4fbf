"""Pascal VOC: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt``.

Coordinates: VOC boxes are 1-based inclusive pixel indices (a full-image box is
``(1, 1, W, H)``). They are converted to the continuous xyxy convention of this project as
Detectron2 does: ``(xmin - 1, ymin - 1, xmax, ymax)``, so the full-image box becomes
``(0, 0, W, H)``. The degenerate test uses the values as written: a box with ``xmax <= xmin`` or
``ymax <= ymin`` in the file is dropped (e.g. bccd's zero-size boxes in BloodImage_00338/00343).
Objects are numbered from 1 in messages, in file order.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ssd_lightning.data.dataset import DetectionDataset, Sample
from ssd_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image_size
from ssd_lightning.data.records import RecordsBuilder
from ssd_lightning.data.validation import (
    DUPLICATE_IMAGE,
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    PARSE_ERROR,
    UNKNOWN_CLASS,
    DatasetReport,
    OnBadSample,
    ProblemRecorder,
)

BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


class VOCDataset(DetectionDataset):
    """Pascal VOC XML annotations, several roots and splits concatenated (e.g. VOC07+12).

    Args:
        roots: Dataset root folder(s).
        class_names: Object class names (without background; a leading ``"background"`` is
            accepted). Label ``k`` is ``class_names[k - 1]``.
        split: Split name(s), files ``<root>/<split_dir>/<split>.txt`` of image ids. A single
            root or split is paired with every entry of the other; otherwise they pair up.
        keep_difficult: Keep objects marked ``<difficult>1`` (flagged ``difficult=True`` so that
            evaluation ignores them). By default they are excluded, as for training.
        image_dir, annotation_dir, split_dir: Folder names under each root (bccd uses
            ``images``, ``annotations``, ``splits``).
        image_ext: Image file extension.
        check_images: Check every image file at setup (header, size, pixel limit,
            truncation; see ``DetectionDataset``) so bad files are reported before training.
        max_image_pixels: Images with more pixels are bad samples (None: no limit).
        on_bad_sample: ``"skip"`` or ``"raise"`` (see ``ssd_lightning.data.validation``).
        transform: Optional callable applied to each sample dict.

    Image ids are positions in the concatenated dataset (0..N-1).
    """

    def __init__(
        self,
        roots: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        class_names: Sequence[str],
        split: str | Sequence[str] = "trainval",
        keep_difficult: bool = False,
        image_dir: str = "JPEGImages",
        annotation_dir: str = "Annotations",
        split_dir: str = "ImageSets/Main",
        image_ext: str = ".jpg",
        check_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        names = (
            list(class_names)[1:] if list(class_names)[:1] == ["background"] else list(class_names)
        )
        pairs = _pair(roots, split)
        report = DatasetReport(name="VOC " + ", ".join(f"{r}:{s}" for r, s in pairs))
        recorder = ProblemRecorder(report, on_bad_sample)
        parser = _VOCParser({name: k + 1 for k, name in enumerate(names)}, keep_difficult, recorder)
        for root, split_name in pairs:
            parser.read_split(
                Path(root), split_name, image_dir, annotation_dir, split_dir, image_ext
            )
        if parser.excluded_difficult:
            report.excluded["difficult"] = parser.excluded_difficult
        xml_paths = parser.xml_paths
        records = parser.builder.build(
            recorder,
            ["background", *names],
            lambda i, k: f"{xml_paths[i]}: object {k} <bndbox>",
        )
        super().__init__(
            records,
            ["background", *names],
            {k: k for k in range(1, len(names) + 1)},
            report,
            on_bad_sample,
            transform,
            check_images,
            max_image_pixels,
        )


def _pair(
    roots: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    split: str | Sequence[str],
) -> list[tuple[str, str]]:
    root_list = [os.fspath(roots)] if isinstance(roots, str | os.PathLike) else list(roots)
    split_list = [split] if isinstance(split, str) else list(split)
    if len(root_list) == 1:
        root_list = root_list * len(split_list)
    if len(split_list) == 1:
        split_list = split_list * len(root_list)
    if len(root_list) != len(split_list) or not root_list:
        raise ValueError(f"cannot pair roots {roots!r} with splits {split!r}")
    return [(os.fspath(r), s) for r, s in zip(root_list, split_list, strict=True)]


class _VOCParser:
    """Reads split files and XML into a RecordsBuilder (setup only; discarded afterwards)."""

    def __init__(
        self,
        class_index: dict[str, int],
        keep_difficult: bool,
        recorder: ProblemRecorder,
    ) -> None:
        self.class_index = class_index
        self.keep_difficult = keep_difficult
        self.recorder = recorder
        self.builder = RecordsBuilder()
        self.xml_paths: list[str] = []
        self.excluded_difficult = 0
        self._seen: set[str] = set()

    def read_split(
        self,
        root: Path,
        split: str,
        image_dir: str,
        annotation_dir: str,
        split_dir: str,
        image_ext: str,
    ) -> None:
        split_file = root / split_dir / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file}: split file not found")
        images = root / image_dir
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: image folder not found (data.image_dir)")
        present = set(os.listdir(images))
        for line_no, line in enumerate(split_file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            image_path = images / f"{fields[0]}{image_ext}"
            where = f"{split_file}:{line_no}"
            if image_path.name not in present:
                self.recorder.skip(MISSING_IMAGE, f"{image_path}: image file not found ({where})")
                continue
            key = os.path.realpath(image_path)
            if key in self._seen:
                self.recorder.skip(
                    DUPLICATE_IMAGE, f"{image_path}: listed again ({where}); first one kept"
                )
                continue
            self._seen.add(key)
            self.read_annotation(root / annotation_dir / f"{fields[0]}.xml", image_path)

    def read_annotation(self, xml_path: Path, image_path: Path) -> None:
        try:
            tree = ET.parse(xml_path)
        except FileNotFoundError:
            self.recorder.skip(MISSING_ANNOTATION, f"{xml_path}: annotation file not found")
            return
        except ET.ParseError as e:
            line, column = e.position
            self.recorder.skip(
                PARSE_ERROR, f"{xml_path}: XML parse error at line {line}, column {column}: {e}"
            )
            return
        size = self.image_size(tree.getroot(), xml_path, image_path)
        if size is None:
            return
        objects = self.read_objects(tree.getroot(), xml_path)
        if objects is None:
            return
        raw, labels, difficult, source = objects
        index = self.builder.add_image(image_path, len(self.builder), size)
        self.xml_paths.append(os.fspath(xml_path))
        # 1-based inclusive VOC pixels -> continuous xyxy (Detectron2's convention).
        boxes = raw - np.array([1.0, 1.0, 0.0, 0.0])
        self.builder.add_objects(index, boxes, labels, source, raw=raw, difficult=difficult)

    def image_size(
        self, root: ET.Element, xml_path: Path, image_path: Path
    ) -> tuple[int, int] | None:
        """(height, width) from ``<size>``, or from the image header when absent or zero."""
        try:
            height = int(float(root.findtext("size/height", "")))
            width = int(float(root.findtext("size/width", "")))
            if height > 0 and width > 0:
                return height, width
        except ValueError:
            pass
        try:
            return read_image_size(image_path)
        except ImageReadError as e:
            self.recorder.skip(MALFORMED_ANNOTATION, f"{xml_path}: no valid <size> and {e}")
            return None

    def read_objects(
        self, root: ET.Element, xml_path: Path
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Raw 1-based boxes (n, 4), labels, difficult flags and object numbers of one file."""
        boxes, labels, difficult, source = [], [], [], []
        for number, obj in enumerate(root.findall("object"), start=1):
            where = f"{xml_path}: object {number}"
            name = (obj.findtext("name") or "").strip()
            if name not in self.class_index:
                known = ", ".join(self.class_index)
                self.recorder.skip(
                    UNKNOWN_CLASS, f"{where} <name>: unknown class {name!r} (known: {known})"
                )
                continue
            is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if is_difficult and not self.keep_difficult:
                self.excluded_difficult += 1
                continue
            box = _read_box(obj, where, self.recorder)
            if box is None:
                continue
            boxes.append(box)
            labels.append(self.class_index[name])
            difficult.append(is_difficult)
            source.append(number)
        return (
            np.array(boxes, dtype=np.float64).reshape(-1, 4),
            np.array(labels, dtype=np.int64),
            np.array(difficult, dtype=bool),
            np.array(source, dtype=np.int64),
        )


def _read_box(obj: ET.Element, where: str, recorder: ProblemRecorder) -> list[float] | None:
    bndbox = obj.find("bndbox")
    if bndbox is None:
        recorder.skip(MALFORMED_ANNOTATION, f"{where}: no <bndbox>, object dropped")
        return None
    values = []
    for tag in BOX_TAGS:
        text = bndbox.findtext(tag)
        try:
            values.append(float(text))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            recorder.skip(
                MALFORMED_ANNOTATION,
                f"{where} <bndbox>: <{tag}> is missing or not a number ({text!r}), object dropped",
            )
            return None
    return values
