"""Synthetic "shapes" detection dataset, generated on first use as JPEG files + COCO JSON.

Five classes (circle, square, triangle, ellipse, star) of sizes from ``min_size`` to
``max_size`` pixels (log-uniform, so small objects are common), randomly rotated and coloured,
overlapping up to ``max_iou``, on textured backgrounds (noise, gradients, stripes, blotches)
with thin clutter strokes that are not objects. Every image is a pure function of
``(seed, split, index)`` and the settings, so the files are byte-identical across runs.

The files live in ``<root>/shapes-<hash of the settings>/``: ``images/{train,val}_NNNNNN.jpg``,
``train.json`` and ``val.json``. They are written to a temporary folder that is then renamed
into place, so concurrent generation (e.g. two DDP ranks) is safe: the loser of the rename race
discards its copy. The real ``COCODataset`` reads the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from ssd_lightning.data.coco import COCODataset
from ssd_lightning.data.dataset import Sample
from ssd_lightning.data.validation import OnBadSample

SHAPE_CLASSES = ("circle", "square", "triangle", "ellipse", "star")
GENERATOR_VERSION = 1  # bump when the drawing code changes, so caches are regenerated
SPLITS = ("train", "val")


class ShapesFiles(NamedTuple):
    """Paths of a generated shapes dataset."""

    train_json: Path
    val_json: Path
    image_dir: Path


class ShapesDataset(COCODataset):
    """One split of the synthetic shapes dataset; generates it under ``root`` if needed.

    Args:
        root: Cache folder (e.g. ``${paths.cache_dir}``); created if missing.
        split: ``"train"`` or ``"val"``.
        Other arguments: see ``generate_shapes``; train and val datasets must share them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        num_train: int = 1000,
        num_val: int = 200,
        image_size: int | Sequence[int] = 300,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        min_size: int = 20,
        max_size: int = 200,
        max_iou: float = 0.3,
        clutter: int = 6,
        check_images: bool = True,
        on_bad_sample: OnBadSample = "skip",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        files = ensure_shapes(
            root, num_train, num_val, image_size, seed, min_objects, max_objects,
            min_size, max_size, max_iou, clutter,
        )  # fmt: skip
        super().__init__(
            files.train_json if split == "train" else files.val_json,
            files.image_dir,
            check_images=check_images,
            on_bad_sample=on_bad_sample,
            transform=transform,
        )


def ensure_shapes(
    root: str | os.PathLike[str],
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int | Sequence[int] = 300,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 6,
    min_size: int = 20,
    max_size: int = 200,
    max_iou: float = 0.3,
    clutter: int = 6,
) -> ShapesFiles:
    """Return the shapes dataset for these settings, generating it under ``root`` if absent.

    Args:
        root: Cache folder; the data goes to ``root/shapes-<hash>``.
        num_train, num_val: Images per split.
        image_size: ``size`` or ``(height, width)`` of every image.
        seed: Base seed; image ``i`` of a split uses ``default_rng([seed, split, i])``.
        min_objects, max_objects: Objects per image (inclusive range; fewer if no free place).
        min_size, max_size: Object extent in pixels before rotation (log-uniform).
        max_iou: Largest IoU between the boxes of two objects of one image.
        clutter: Most thin distractor strokes per image.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    settings = {
        "version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
        "image_size": [int(height), int(width)], "seed": int(seed),
        "min_objects": int(min_objects), "max_objects": int(max_objects),
        "min_size": int(min_size), "max_size": int(max_size), "max_iou": float(max_iou),
        "clutter": int(clutter),
    }  # fmt: skip
    _check_settings(settings)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(root) / f"shapes-{digest}"
    files = ShapesFiles(final / "train.json", final / "val.json", final / "images")
    if final.is_dir():
        return files
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(tmp, settings)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def generate_shapes(
    root: str | os.PathLike[str],
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int | Sequence[int] = 300,
    seed: int = 0,
    **settings: Any,
) -> ShapesFiles:
    """Alias of ``ensure_shapes`` (generation is skipped when the files exist)."""
    return ensure_shapes(root, num_train, num_val, image_size, seed, **settings)


def _check_settings(s: dict[str, Any]) -> None:
    if not 0 <= s["min_objects"] <= s["max_objects"]:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {s}")
    if not 4 <= s["min_size"] <= s["max_size"] <= min(s["image_size"]):
        raise ValueError(f"need 4 <= min_size <= max_size <= image side, got {s}")
    if min(s["num_train"], s["num_val"]) < 1:
        raise ValueError(f"need at least one image per split, got {s}")


def _write_dataset(folder: Path, s: dict[str, Any]) -> None:
    (folder / "images").mkdir(parents=True)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPE_CLASSES)]
    for split_index, split in enumerate(SPLITS):
        images, annotations = [], []
        for i in range(s[f"num_{split}"]):
            rng = np.random.default_rng([s["seed"], split_index, i])
            image, objects = draw_image(rng, s)
            file_name = f"{split}_{i:06d}.jpg"
            ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok, "JPEG encoding failed"
            (folder / "images" / file_name).write_bytes(data.tobytes())
            image_id = i + 1
            height, width = image.shape[:2]
            images.append(
                {"id": image_id, "file_name": file_name, "height": height, "width": width}
            )
            for label, polygon in objects:
                x1, y1 = polygon.min(axis=0)
                x2, y2 = polygon.max(axis=0) + 1  # pixel indices -> continuous box edges
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                    "bbox": [int(x1), int(y1), int(x2 - x1), int(y2 - y1)],
                    "area": float(cv2.contourArea(polygon.astype(np.float32))),
                    "iscrowd": 0, "segmentation": [polygon.reshape(-1).tolist()],
                })  # fmt: skip
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (folder / f"{split}.json").write_text(json.dumps(coco))


def draw_image(
    rng: np.random.Generator, s: dict[str, Any]
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image.

    Returns:
        The RGB image (H, W, 3) uint8 and its objects as (category id 1..5, polygon (P, 2) int32
        pixel coordinates, all inside the image).
    """
    height, width = s["image_size"]
    image = _background(rng, height, width)
    objects = _place_objects(rng, s)
    # Largest first, so smaller objects stay visible on top of larger ones.
    objects.sort(key=lambda obj: -_box_area(obj[1]))
    for _label, polygon in objects:
        x1, y1 = polygon.min(axis=0)
        x2, y2 = polygon.max(axis=0) + 1
        colour = _contrasting_colour(rng, image[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0))
        cv2.fillPoly(image, [polygon], colour, lineType=cv2.LINE_AA)
    _clutter(rng, image, int(rng.integers(0, s["clutter"] + 1)))
    # Pixel noise in [-6, 6]: saturating add then subtract, both on uint8.
    image = cv2.subtract(cv2.add(image, rng.integers(0, 13, image.shape, dtype=np.uint8)), 6)
    return image, objects


def _place_objects(rng: np.random.Generator, s: dict[str, Any]) -> list[tuple[int, np.ndarray]]:
    height, width = s["image_size"]
    count = int(rng.integers(s["min_objects"], s["max_objects"] + 1))
    objects: list[tuple[int, np.ndarray]] = []
    boxes: list[np.ndarray] = []
    for _ in range(count * 20):  # placement trials
        if len(objects) == count:
            break
        label = int(rng.integers(len(SHAPE_CLASSES))) + 1
        size = float(np.exp(rng.uniform(np.log(s["min_size"]), np.log(s["max_size"]))))
        points = _shape_outline(rng, SHAPE_CLASSES[label - 1]) * (size / 2)
        extent = points.max(axis=0) - points.min(axis=0)
        if extent[0] >= width - 1 or extent[1] >= height - 1:
            continue
        offset = rng.uniform(-points.min(axis=0), [width - 1, height - 1] - points.max(axis=0))
        polygon = np.round(points + offset).astype(np.int32)
        box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0) + 1]).astype(np.float64)
        if boxes and _iou(box, np.array(boxes)).max() > s["max_iou"]:
            continue
        objects.append((label, polygon))
        boxes.append(box)
    return objects


def _shape_outline(rng: np.random.Generator, name: str) -> np.ndarray:
    """Polygon of a shape of unit radius, randomly rotated. Shape: (P, 2) float64."""
    angle = rng.uniform(0, 2 * np.pi)
    if name == "circle":
        t, r = np.linspace(0, 2 * np.pi, 48, endpoint=False), 1.0
    elif name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ratio = rng.uniform(0.35, 0.65)
        r = ratio / np.sqrt((ratio * np.cos(t)) ** 2 + np.sin(t) ** 2)
    elif name == "square":
        t, r = np.arange(4) * np.pi / 2 + np.pi / 4, 1.0
    elif name == "triangle":
        t, r = np.arange(3) * 2 * np.pi / 3, 1.0
    else:  # star: 5 outer and 5 inner vertices
        t = np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
    t = t + angle
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background: flat, linear gradient, stripes or smooth blotches. (H, W, 3) uint8."""
    c1, c2 = rng.uniform(40, 215, size=(2, 3))
    kind = int(rng.integers(4))
    if kind == 0:
        return np.broadcast_to(c1.astype(np.uint8), (height, width, 3)).copy()
    if kind == 3:
        small = rng.uniform(40, 215, size=(max(2, height // 40), max(2, width // 40), 3))
        smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        return smooth.clip(0, 255).astype(np.uint8)
    theta = rng.uniform(0, np.pi)
    # Position along direction theta, (H, W), from the outer sum of two 1-D ramps.
    along = np.add.outer(np.arange(height) * np.sin(theta), np.arange(width) * np.cos(theta))
    if kind == 1:
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    else:
        t = 0.5 + 0.5 * np.sin(along * (2 * np.pi / rng.uniform(8, 40)))
    # Blend through a 256-entry palette: one gather instead of float maths on (H, W, 3).
    palette = (c1 + (c2 - c1) * np.linspace(0, 1, 256)[:, None]).astype(np.uint8)
    return palette[(t * 255).astype(np.uint8)]


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 150 (L1 over RGB) away from the background mean."""
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).sum() >= 150:
            break
    else:
        colour = np.where(background < 128, 255, 0)
    return int(colour[0]), int(colour[1]), int(colour[2])


def _clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Thin distractor strokes (lines and open arcs) that are not objects."""
    height, width = image.shape[:2]
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        thickness = int(rng.integers(1, 3))
        x, y = int(rng.integers(width)), int(rng.integers(height))
        if rng.random() < 0.5:
            length, theta = rng.uniform(5, 40), rng.uniform(0, 2 * np.pi)
            end = (int(x + length * np.cos(theta)), int(y + length * np.sin(theta)))
            cv2.line(image, (x, y), end, colour, thickness, cv2.LINE_AA)
        else:
            axes = (int(rng.integers(4, 20)), int(rng.integers(4, 20)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                image,
                (x, y),
                axes,
                0.0,
                start,
                start + rng.uniform(60, 200),
                colour,
                thickness,
                cv2.LINE_AA,
            )


def _box_area(polygon: np.ndarray) -> float:
    extent = polygon.max(axis=0) - polygon.min(axis=0) + 1
    return float(extent[0] * extent[1])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with (K, 4) boxes. Shape: (K,)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)
