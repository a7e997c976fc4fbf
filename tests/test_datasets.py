"""Dataset readers on the real bccd / coco128 data and the synthetic shapes generator."""

import json
import pickle
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssd_lightning.data import (
    SHAPE_CLASSES,
    AnnotationRecords,
    COCODataset,
    ShapesDataset,
    VOCDataset,
    ensure_shapes,
)

BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
BCCD_LAYOUT = {"image_dir": "images", "annotation_dir": "annotations", "split_dir": "splits"}
SMALL_SHAPES = {"num_train": 12, "num_val": 4, "image_size": 160, "min_size": 12, "max_size": 100}


def check_contract(sample: dict, num_classes: int) -> None:
    """The sample contract shared by every dataset."""
    image, boxes = sample["image"], sample["boxes"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert sample["orig_size"] == image.shape[:2]
    assert isinstance(sample["image_id"], int)
    n = len(boxes)
    assert boxes.dtype == np.float32 and boxes.shape == (n, 4)
    assert sample["labels"].dtype == np.int64 and sample["labels"].shape == (n,)
    assert sample["difficult"].dtype == bool and sample["difficult"].shape == (n,)
    assert sample["iscrowd"].dtype == bool and sample["iscrowd"].shape == (n,)
    assert ((sample["labels"] >= 1) & (sample["labels"] < num_classes)).all()
    h, w = image.shape[:2]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def check_compact(dataset) -> None:
    """No per-sample Python containers: only numpy arrays scale with the number of samples."""
    assert isinstance(dataset.records, AnnotationRecords)
    for name, value in vars(dataset.records).items():
        assert isinstance(value, np.ndarray) and value.dtype != object, name
    for name, value in vars(dataset).items():
        if isinstance(value, list | dict | set | tuple):
            assert len(value) <= dataset.num_classes, f"{name} grows with the dataset"
    assert len(pickle.dumps(dataset)) < dataset.records.nbytes + 20_000


# --- VOC on bccd -------------------------------------------------------------------------------


def test_voc_bccd_train_counts_and_problems(bccd_root: Path) -> None:
    ds = VOCDataset(bccd_root, BCCD_CLASSES, split="train", **BCCD_LAYOUT)
    assert len(ds) == 205
    assert ds.class_names == ["background", *BCCD_CLASSES] and ds.num_classes == 4
    report = ds.summary()
    # 2382 RBC annotated in train, one of them is the zero-size box of BloodImage_00343.
    assert report.objects_per_class == {"RBC": 2381, "WBC": 214, "Platelets": 209}
    assert report.problem_counts == {"degenerate_box": 1}
    assert (
        "BloodImage_00343.xml: object 4 <bndbox>: xmax (181) <= xmin (181)"
        in (report.problems["degenerate_box"][0])
    )
    assert report.images_without_objects == 0


def test_voc_bccd_all_splits_report_both_zero_size_boxes(bccd_root: Path) -> None:
    ds = VOCDataset(bccd_root, BCCD_CLASSES, split=["train", "val", "test"], **BCCD_LAYOUT)
    assert len(ds) == 364
    report = ds.summary()
    assert report.num_objects == 4888 - 2  # SOURCE.md: 4888 objects, 2 zero-size
    assert report.objects_per_class["RBC"] == 4155 - 2
    names = sorted(Path(m.split(":")[0]).name for m in report.problems["degenerate_box"])
    assert names == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    assert sorted(ds.records.image_ids.tolist()) == list(range(364))
    check_compact(ds)


def test_voc_bccd_samples_and_coordinate_convention(bccd_root: Path) -> None:
    ds = VOCDataset(bccd_root, BCCD_CLASSES, split="val", **BCCD_LAYOUT)
    for i in (0, 1, len(ds) - 1):
        check_contract(ds[i], ds.num_classes)
    # Boxes are the XML values with xmin, ymin shifted by -1 (1-based inclusive -> continuous).
    sample = ds[0]
    xml = bccd_root / "annotations" / (Path(ds.records.path(0)).stem + ".xml")
    objects = ET.parse(xml).getroot().findall("object")
    raw = [
        [float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        for o in objects
    ]
    names = [BCCD_CLASSES.index(o.findtext("name").strip()) + 1 for o in objects]
    np.testing.assert_array_equal(sample["boxes"], np.array(raw, np.float32) - [1, 1, 0, 0])
    np.testing.assert_array_equal(sample["labels"], names)
    assert sample["orig_size"] == (480, 640)


def test_voc_bccd_all_boxes_inside_images(bccd_root: Path) -> None:
    ds = VOCDataset(bccd_root, BCCD_CLASSES, split="trainval", **BCCD_LAYOUT)
    r = ds.records
    per_box_size = np.repeat(r.sizes, np.diff(r.offsets), axis=0)
    assert len(per_box_size) == len(r.boxes) == 3348 + 301 + 292
    assert (r.boxes[:, 2] <= per_box_size[:, 1]).all() and (
        r.boxes[:, 3] <= per_box_size[:, 0]
    ).all()
    assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2:] > r.boxes[:, :2]).all()


def test_voc_concatenates_roots_and_splits(bccd_root: Path) -> None:
    ds = VOCDataset([bccd_root, bccd_root], BCCD_CLASSES, split=["train", "val"], **BCCD_LAYOUT)
    assert len(ds) == 205 + 87
    assert len(set(ds.records.image_ids.tolist())) == 292
    val = VOCDataset(bccd_root, BCCD_CLASSES, split="val", **BCCD_LAYOUT)
    np.testing.assert_array_equal(ds[205]["boxes"], val[0]["boxes"])


# --- COCO on coco128 ---------------------------------------------------------------------------


@pytest.fixture
def coco128(coco128_root: Path) -> COCODataset:
    return COCODataset(
        coco128_root / "annotations" / "instances_train2017.json", coco128_root / "images"
    )


def test_coco128_images_categories_and_crowd(coco128: COCODataset) -> None:
    ds = coco128
    assert len(ds) == 128
    # All 80 categories of the file (71 present), contiguous labels in ascending id order.
    assert ds.num_classes == 81 and len(ds.label_map) == 80
    assert ds.label_map[1] == 1 and ds.label_map[90] == 80
    assert sorted(ds.label_map.values()) == list(range(1, 81))
    assert ds.class_names[:3] == ["background", "person", "bicycle"]
    assert ds.class_names[-1] == "toothbrush"
    report = ds.summary()
    assert report.num_objects == 939 and report.objects_per_class["person"] == 259
    assert sum(v > 0 for v in report.objects_per_class.values()) == 71
    assert report.flagged["iscrowd"] == 10 and int(ds.records.iscrowd.sum()) == 10
    assert report.images_without_objects == 2 and not report.problems
    check_compact(ds)


def test_coco128_samples(coco128: COCODataset, coco128_root: Path) -> None:
    ds = coco128
    ids = ds.records.image_ids.tolist()
    for image_id in (250, 508):  # negative images: kept, all background
        sample = ds[ids.index(image_id)]
        check_contract(sample, ds.num_classes)
        assert sample["boxes"].shape == (0, 4) and sample["image_id"] == image_id
    grey = ds[ids.index(86)]  # greyscale JPEG -> 3 equal channels
    check_contract(grey, ds.num_classes)
    assert (grey["image"][..., 0] == grey["image"][..., 2]).all()
    # Boxes are the JSON xywh converted to xyxy, in the file's annotation order.
    data = json.loads((coco128_root / "annotations" / "instances_train2017.json").read_text())
    image_id = data["annotations"][0]["image_id"]
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    sample = ds[ids.index(image_id)]
    xywh = np.array([a["bbox"] for a in anns])
    expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_allclose(sample["boxes"], expected, rtol=1e-6)
    np.testing.assert_array_equal(sample["labels"], [ds.label_map[a["category_id"]] for a in anns])
    np.testing.assert_array_equal(sample["iscrowd"], [bool(a["iscrowd"]) for a in anns])
    crowd_index = int(np.repeat(np.arange(128), np.diff(ds.records.offsets))[ds.records.iscrowd][0])
    assert ds[crowd_index]["iscrowd"].any()


# --- synthetic shapes --------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_shapes_deterministic_from_seed(tmp_path: Path) -> None:
    a = ensure_shapes(tmp_path / "a", seed=3, **SMALL_SHAPES)
    b = ensure_shapes(tmp_path / "b", seed=3, **SMALL_SHAPES)
    c = ensure_shapes(tmp_path / "c", seed=4, **SMALL_SHAPES)
    files_a = folder_bytes(a.image_dir.parent)
    assert len(files_a) == 12 + 4 + 2
    assert files_a == folder_bytes(b.image_dir.parent)
    files_c = folder_bytes(c.image_dir.parent)
    assert files_c.keys() == files_a.keys() and files_c != files_a
    assert a.image_dir.parent.name == b.image_dir.parent.name != c.image_dir.parent.name


def test_shapes_dataset_reads_through_coco(tmp_path: Path) -> None:
    train = ShapesDataset(tmp_path, "train", seed=1, max_objects=6, **SMALL_SHAPES)
    val = ShapesDataset(tmp_path, "val", seed=1, max_objects=6, **SMALL_SHAPES)
    assert isinstance(train, COCODataset) and (len(train), len(val)) == (12, 4)
    assert train.class_names == ["background", *SHAPE_CLASSES]
    assert train.label_map == {k: k for k in range(1, 6)}
    assert not train.summary().problems
    counts = np.diff(train.records.offsets)
    assert counts.min() >= 1 and counts.max() <= 6
    sides = np.concatenate([train.records.boxes[:, 2:] - train.records.boxes[:, :2]])
    assert sides.max() <= 100 + 1 and sides.min() >= 2
    for i in range(len(train)):
        check_contract(train[i], train.num_classes)
        assert train[i]["image"].shape == (160, 160, 3)
    # The COCO bbox is the bounding box of the polygon drawn (segmentation).
    data = json.loads(ensure_shapes(tmp_path, seed=1, **SMALL_SHAPES).train_json.read_text())
    for ann in data["annotations"]:
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        x1, y1 = poly.min(axis=0)
        x2, y2 = poly.max(axis=0) + 1
        assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_shapes_pixels_match_annotations(tmp_path: Path) -> None:
    """Each annotated polygon is a uniformly coloured region that stands out of its box."""
    files = ensure_shapes(tmp_path, seed=2, max_iou=0.0, clutter=0, **SMALL_SHAPES)
    ds = COCODataset(files.train_json, files.image_dir)
    data = json.loads(files.train_json.read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for i in range(len(ds)):
        sample = ds[i]
        image = sample["image"].astype(np.float32)
        for ann, box in zip(by_image[sample["image_id"]], sample["boxes"], strict=True):
            mask = np.zeros(image.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.array(ann["segmentation"][0]).reshape(-1, 2)], 1)
            mask = cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
            if mask.sum() < 10:
                continue  # too small to erode
            inside = image[mask]
            x1, y1, x2, y2 = box.astype(int)
            box_pixels = image[y1:y2, x1:x2].reshape(-1, 3)
            assert inside.std(axis=0).max() < 8  # one fill colour + noise + JPEG
            # the rest of the box is the background, far from the fill colour
            assert np.abs(box_pixels - inside.mean(axis=0)).sum(axis=1).max() > 100
            checked += 1
    assert checked >= 10


def test_shapes_generated_once_and_race_safe(tmp_path: Path) -> None:
    results, errors = [], []

    def generate() -> None:
        try:
            results.append(ensure_shapes(tmp_path, seed=5, **SMALL_SHAPES))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].image_dir.parent.name]
    mtime = results[0].train_json.stat().st_mtime_ns
    assert ensure_shapes(tmp_path, seed=5, **SMALL_SHAPES) == results[0]
    assert results[0].train_json.stat().st_mtime_ns == mtime


def test_shapes_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_size"):
        ensure_shapes(tmp_path, image_size=100, max_size=200)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(tmp_path, "test", **SMALL_SHAPES)
