"""YOLO txt labels (Ultralytics layout): ``images/<split>/**/x.jpg``, ``labels/<split>/**/x.txt``.

One object per line, ``class x_center y_center width height``: ``class`` a 0-based index into the
class names, the four values normalised to 0-1 by the image width and height, e.g.
``1 0.512500 0.410417 0.178125 0.245833``. A line ``class x1 y1 x2 y2 x3 y3 ...`` (an odd number of
at least 7 values) is an Ultralytics segmentation polygon; its bounding box is used, as
Ultralytics does. Class names come from the config or from an Ultralytics ``data.yaml``
(``names:`` a list, or an index-to-name map with keys 0..K-1); label = class index + 1.

Coordinates: xyxy pixels = ``((cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H)``. Labels
hold no image size, so every image header is read at setup (``read_image_size``, EXIF orientation
applied); ``check_images`` adds the shared checks of ``DetectionDataset`` (truncation, pixel
limit).

Reported by file and line number, under the ``on_bad_sample`` policy (the object is dropped, or
the first one raises):

- ``malformed_annotation``: a line with another number of values, a value that is not a number,
  a class that is not an integer, or a value outside [-tolerance, 1 + tolerance] (pixel values
  written where normalised ones belong: clipping them would invent a box);
- ``nonfinite_box``: NaN or infinity; ``unknown_class``: an index without a name;
  ``degenerate_box``: width or height <= 0; ``outside_box``: no overlap with the image;
- ``missing_image``: a label file without an image; ``duplicate_image``: two images that share
  one label file (``a.jpg`` and ``a.png``), the first kept; ``unreadable_image``: the header.

Repairs (kept, counted, logged, never raised): a box that extends past the image border, by a
rounding overshoot within the tolerance or because its centre is near the border, is clipped to
the image (``clipped_box``). Overshoot below ``EDGE_EPS`` (text rounding of 6-digit values) is
snapped to the border silently. Not problems: an empty label file, and an image without a label
file (both images without objects; the latter counted as ``images_without_label_file``).
``classes.txt`` in the label folder (written by labelImg) is not a label file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ssd_lightning.data.dataset import DetectionDataset, Sample
from ssd_lightning.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    read_image_size,
)
from ssd_lightning.data.records import RecordsBuilder
from ssd_lightning.data.validation import (
    DEGENERATE_BOX,
    DUPLICATE_IMAGE,
    IMAGE_TOO_LARGE,
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    NONFINITE_BOX,
    UNKNOWN_CLASS,
    UNREADABLE_IMAGE,
    DatasetReport,
    OnBadSample,
    ProblemRecorder,
    logger,
)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
BOX_FIELDS = ("class", "x_center", "y_center", "width", "height")
# Normalised edges within EDGE_EPS outside [0, 1] are text rounding (6 digits), not a repair.
EDGE_EPS = 1e-6
NOT_LABEL_FILES = ("classes.txt",)


@dataclass
class YOLOReport(DatasetReport):
    """``DatasetReport`` plus the images that have no label file (kept, without objects).

    Attributes:
        images_without_label_file: Kept images with no ``.txt`` (counted in
            ``images_without_objects`` too); all of them means a wrong ``label_dir``.
    """

    images_without_label_file: int = 0

    def __str__(self) -> str:
        lines = super().__str__().split("\n")
        if self.images_without_label_file:
            lines.insert(1, f"  images without a label file: {self.images_without_label_file}")
        return "\n".join(lines)


class YOLODataset(DetectionDataset):
    """YOLO txt detection dataset, one or several splits of one root concatenated.

    Args:
        root: Dataset root holding ``<image_dir>/<split>`` and ``<label_dir>/<split>``.
        split: Split folder name(s).
        class_names: Names in class-index order (index 0 -> label 1; a leading
            ``"background"`` is accepted).
        names_file: An Ultralytics ``data.yaml`` with ``names:``; if ``class_names`` is given
            too, both must agree.
        image_dir, label_dir: Folder names under ``root``.
        tolerance: Coordinates in [-tolerance, 1 + tolerance] are accepted (the box is then
            clipped to the image); beyond it the object is malformed.
        check_images: Check every image file at setup (see ``DetectionDataset``); headers are
            read either way, for the image sizes.
        max_image_pixels: Images with more pixels are bad samples (None: no limit).
        on_bad_sample: ``"skip"`` or ``"raise"`` (see ``ssd_lightning.data.validation``).
        transform: Optional callable applied to each sample dict.

    Image ids are positions in the dataset (0..N-1), images in sorted path order per split.

    Raises:
        FileNotFoundError: an image or label folder of a split does not exist.
        ValueError: no class names, or names that disagree.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | Sequence[str] = "train",
        class_names: Sequence[str] | None = None,
        names_file: str | os.PathLike[str] | None = None,
        image_dir: str = "images",
        label_dir: str = "labels",
        tolerance: float = 0.01,
        check_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        names = _class_names(class_names, names_file)
        splits = [split] if isinstance(split, str) else list(split)
        report = YOLOReport(name=f"YOLO {os.fspath(root)}:{','.join(splits)}")
        recorder = ProblemRecorder(report, on_bad_sample)
        parser = _YOLOParser(len(names), float(tolerance), recorder)
        for name in splits:
            parser.read_split(Path(root) / image_dir / name, Path(root) / label_dir / name)
        label_paths = parser.label_paths
        records = parser.builder.build(
            recorder, ["background", *names], lambda i, line: f"{label_paths[i]}: line {line}"
        )
        report.images_without_label_file = parser.without_label_file
        super().__init__(
            records, ["background", *names], {k: k + 1 for k in range(len(names))}, report,
            on_bad_sample, transform, check_images, max_image_pixels,
        )  # fmt: skip


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names of an Ultralytics ``data.yaml``: ``names: [a, b]`` or ``{0: a, 1: b}``.

    Raises:
        ValueError: no ``names``, keys other than 0..K-1, or an ``nc`` that disagrees.
    """
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, Mapping):
        try:
            by_index = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)}: names keys must be class indices ({e})") from e
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(
                f"{os.fspath(path)}: names keys must be 0..{len(by_index) - 1}, "
                f"got {sorted(by_index)}"
            )
        names = [by_index[k] for k in range(len(by_index))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{os.fspath(path)}: needs 'names:', a list or an index-to-name map")
    if "nc" in data and int(data["nc"]) != len(names):
        raise ValueError(f"{os.fspath(path)}: nc={data['nc']} but {len(names)} names")
    return [str(n) for n in names]


def _class_names(
    class_names: Sequence[str] | None, names_file: str | os.PathLike[str] | None
) -> list[str]:
    given = None if class_names is None else [str(n) for n in class_names]
    if given is not None and given[:1] == ["background"]:
        given = given[1:]
    from_file = None if names_file is None else read_class_names(names_file)
    if given is not None and from_file is not None and given != from_file:
        raise ValueError(
            f"class_names {given} differ from the names in {os.fspath(names_file)} {from_file}"
        )
    names = given if given is not None else from_file
    if not names:
        raise ValueError("YOLODataset needs class_names or a names_file (data.yaml with names:)")
    return names


class _YOLOParser:
    """Reads image folders and label files into a RecordsBuilder (setup only)."""

    def __init__(self, num_names: int, tolerance: float, recorder: ProblemRecorder) -> None:
        self.num_names = num_names
        self.tolerance = tolerance
        self.recorder = recorder
        self.builder = RecordsBuilder()
        self.label_paths: list[str] = []
        self.without_label_file = 0

    def read_split(self, image_root: Path, label_root: Path) -> None:
        for folder, what in ((image_root, "image"), (label_root, "label")):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder}: {what} folder not found (a split without objects needs an "
                    "empty label folder)"
                )
        labels = {
            path.relative_to(label_root).with_suffix(""): path
            for path in _files(label_root, (".txt",))
            if path.name not in NOT_LABEL_FILES
        }
        owner: dict[Path, Path] = {}
        for image_path in _files(image_root, IMAGE_EXTENSIONS):
            key = image_path.relative_to(image_root).with_suffix("")
            if key in owner:
                self.recorder.skip(
                    DUPLICATE_IMAGE,
                    f"{image_path}: shares the label file {label_root / key}.txt with "
                    f"{owner[key]}; first one kept",
                )
                continue
            owner[key] = image_path
            self.read_image(image_path, labels.get(key))
        for key in sorted(labels.keys() - owner.keys()):
            self.recorder.skip(
                MISSING_IMAGE,
                f"{labels[key]}: label file without an image ({image_root / key}.* not found)",
            )
        if owner and not labels:
            logger.warning("%s: no label files: all %d images have no objects", label_root,
                           len(owner))  # fmt: skip

    def read_image(self, image_path: Path, label_path: Path | None) -> None:
        try:
            height, width = read_image_size(image_path)
        except ImageReadError as e:
            kind = IMAGE_TOO_LARGE if isinstance(e, ImageTooLargeError) else UNREADABLE_IMAGE
            self.recorder.skip(kind, str(e))
            return
        text = ""
        if label_path is None:
            self.without_label_file += 1
        else:
            try:
                text = label_path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                self.recorder.skip(
                    MALFORMED_ANNOTATION,
                    f"{label_path}: cannot read label file ({e.strerror or e}), image dropped",
                )
                return
        normalised, labels, lines = parse_labels(
            text, label_path, self.num_names, self.tolerance, self.recorder
        )
        index = self.builder.add_image(image_path, len(self.builder), (height, width))
        self.label_paths.append(os.fspath(label_path) if label_path is not None else "")
        boxes = normalised * np.array([width, height, width, height], dtype=np.float64)
        self.builder.add_objects(index, boxes, labels, lines)


def parse_labels(
    text: str,
    path: str | os.PathLike[str] | None,
    num_names: int,
    tolerance: float,
    recorder: ProblemRecorder,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects of one label file; bad lines go to ``recorder`` named by file and line.

    Returns:
        ``(boxes, labels, lines)``: normalised xyxy boxes (edges within ``EDGE_EPS`` of the
        border snapped to it), labels (class index + 1) and 1-based line numbers.

    Shape:
        boxes: (n, 4) float64; labels, lines: (n,) int64.
    """
    boxes, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        parsed = _parse_line(fields, f"{os.fspath(path)}: line {number}", num_names, tolerance,
                             recorder)  # fmt: skip
        if parsed is not None:
            labels.append(parsed[0] + 1)
            boxes.append(parsed[1])
            lines.append(number)
    box_array = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    box_array[(box_array < 0) & (box_array >= -EDGE_EPS)] = 0.0
    box_array[(box_array > 1) & (box_array <= 1 + EDGE_EPS)] = 1.0
    return box_array, np.array(labels, dtype=np.int64), np.array(lines, dtype=np.int64)


def _parse_line(
    fields: list[str], where: str, num_names: int, tolerance: float, recorder: ProblemRecorder
) -> tuple[int, tuple[float, float, float, float]] | None:
    """(class index, normalised xyxy box) of one line, or None after reporting it."""
    n = len(fields)
    if n != 5 and (n < 7 or n % 2 == 0):
        recorder.skip(
            MALFORMED_ANNOTATION,
            f"{where}: {n} values, expected 5 (class x_center y_center width height) or a "
            "polygon (class x1 y1 x2 y2 x3 y3 ...), object dropped",
        )
        return None
    values = []
    for k, text in enumerate(fields):
        try:
            values.append(float(text))
        except ValueError:
            recorder.skip(
                MALFORMED_ANNOTATION,
                f"{where}: {_field_name(k, n)} {text!r} is not a number, object dropped",
            )
            return None
        if not math.isfinite(values[-1]):
            recorder.skip(NONFINITE_BOX, f"{where}: {_field_name(k, n)} is {text}, object dropped")
            return None
    if not values[0].is_integer():
        recorder.skip(
            MALFORMED_ANNOTATION, f"{where}: class {fields[0]!r} is not an integer, object dropped"
        )
        return None
    index = int(values[0])
    if not 0 <= index < num_names:
        recorder.skip(
            UNKNOWN_CLASS,
            f"{where}: class index {index} has no name ({num_names} names, 0..{num_names - 1}), "
            "object dropped",
        )
        return None
    if n == 5 and min(values[3:]) <= 0:
        name, text = ("width", fields[3]) if values[3] <= 0 else ("height", fields[4])
        recorder.skip(DEGENERATE_BOX, f"{where}: {name} {text} <= 0 (zero-size box), dropped")
        return None
    for k, value in enumerate(values[1:], start=1):
        if not -tolerance <= value <= 1 + tolerance:
            recorder.skip(
                MALFORMED_ANNOTATION,
                f"{where}: {_field_name(k, n)} {fields[k]} is outside [0, 1] by more than the "
                f"tolerance {tolerance:g} (YOLO values are normalised by the image size), "
                "object dropped",
            )
            return None
    if n > 5:  # polygon: its bounding box
        xs, ys = values[1::2], values[2::2]
        return index, (min(xs), min(ys), max(xs), max(ys))
    cx, cy, w, h = values[1:]
    return index, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _field_name(k: int, n: int) -> str:
    if n == 5 or k == 0:
        return BOX_FIELDS[k]
    return f"{'xy'[(k - 1) % 2]}{(k + 1) // 2}"


def _files(folder: Path, extensions: Sequence[str]) -> Iterator[Path]:
    """Files under ``folder`` (recursively, following links) with these extensions, sorted."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(tuple(extensions)):
                yield Path(dirpath) / name


def write_yolo(
    dataset: DetectionDataset,
    root: str | os.PathLike[str],
    split: str,
    link: bool = True,
    progress: bool = False,
) -> dict[str, int]:
    """Write a dataset's images and boxes as ``root/images/<split>/``, ``root/labels/<split>/``.

    Every image gets a label file (empty: no objects) holding ``class cx cy w h`` with 6
    decimals (under 1e-3 px of rounding for images up to 1000 px). Crowd regions and difficult
    objects are left out: YOLO has no ignore flag (Ultralytics' VOC and COCO converters drop
    them too). Images are hard-linked where ``root`` is on their filesystem, else copied.

    Returns:
        ``{"images": n, "objects": m, "left_out": k}``.

    Raises:
        ValueError: two images of the dataset have the same file name.
    """
    import shutil

    from tqdm import tqdm

    records = dataset.records
    image_dir, label_dir = Path(root) / "images" / split, Path(root) / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    keep = ~(records.difficult | records.iscrowd)
    seen: set[str] = set()
    for i in tqdm(range(len(records)), desc=f"writing {split}", unit="img", disable=not progress):
        source = Path(records.path(i))
        if source.name in seen:
            raise ValueError(f"{source}: a second image named {source.name} in {split}")
        seen.add(source.name)
        target = image_dir / source.name
        if not target.exists():
            try:
                if not link:
                    raise OSError
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        start, stop = records.offsets[i], records.offsets[i + 1]
        height, width = (float(v) for v in records.sizes[i])
        x1, y1, x2, y2 = (records.boxes[start:stop][keep[start:stop]].astype(np.float64).T
                          / np.array([[width], [height], [width], [height]]))  # fmt: skip
        labels = records.labels[start:stop][keep[start:stop]] - 1
        rows = zip(labels, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, strict=True)
        text = "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in rows)
        (label_dir / source.with_suffix(".txt").name).write_text(text, encoding="utf-8")
    return {
        "images": len(records),
        "objects": int(keep.sum()),
        "left_out": int((~keep).sum()),
    }


def write_names_file(
    root: str | os.PathLike[str], class_names: Sequence[str], splits: Mapping[str, str]
) -> Path:
    """Ultralytics ``data.yaml``: ``path``, one ``<role>: images/<split>`` per split, ``names``.

    Args:
        root: The YOLO dataset folder.
        class_names: Foreground names in class-index order (no background).
        splits: Role (``train``, ``val``) -> split folder name.
    """
    path = Path(root) / "data.yaml"
    data = {
        "path": os.path.abspath(root),
        **{role: f"images/{name}" for role, name in splits.items()},
        "nc": len(class_names),
        "names": dict(enumerate(class_names)),
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
