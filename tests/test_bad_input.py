"""Bad input: every case is reported by name (skip) or raised (raise), never dropped silently."""

import json
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from ssd_lightning.data import (
    BadSampleError,
    COCODataset,
    ImageReadError,
    VOCDataset,
    read_image,
)
from ssd_lightning.data.validation import BoxStatus, check_boxes

CLASSES = ["cat", "dog"]


def write_jpeg(path: Path, height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)
    return rgb


def voc_xml(objects: list[tuple], size: tuple[int, int] | None = (80, 60)) -> str:
    """objects: (name, (xmin, ymin, xmax, ymax)[, difficult]); size: (width, height)."""
    parts = ["<annotation>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, box, *rest in objects:
        coords = "".join(
            f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        difficult = f"<difficult>{int(rest[0])}</difficult>" if rest else ""
        parts.append(f"<object><name>{name}</name>{difficult}<bndbox>{coords}</bndbox></object>")
    return "\n".join([*parts, "</annotation>"])


def make_voc(root: Path, xmls: dict[str, str], split: list[str] | None = None) -> Path:
    """Write a VOC folder with one 80x60 JPEG per id; returns root."""
    for image_id, xml in xmls.items():
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    lines = list(xmls) if split is None else split
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def voc(root: Path, **kwargs) -> VOCDataset:
    return VOCDataset(root, CLASSES, split="train", **kwargs)


GOOD = voc_xml([("cat", (11, 21, 40, 50))])


# --- box checks --------------------------------------------------------------------------------


def test_check_boxes_golden() -> None:
    boxes = np.array(
        [
            [10, 10, 20, 20],  # ok
            [-5, 10, 20, 70],  # partly outside: clipped to (0, 10, 20, 60)
            [90, 10, 95, 20],  # wholly right of the 80x60 image
            [10, 10, 10, 20],  # zero width
            [10, 30, 20, 25],  # ymax < ymin
            [np.nan, 0, 5, 5],  # NaN
            [-10, -10, -1, -1],  # negative, wholly outside
        ]
    )
    clipped, status = check_boxes(boxes, np.tile([60, 80], (7, 1)))
    s = BoxStatus
    assert status.tolist() == [
        s.OK,
        s.CLIPPED,
        s.OUTSIDE,
        s.DEGENERATE,
        s.DEGENERATE,
        s.NONFINITE,
        s.OUTSIDE,
    ]
    np.testing.assert_array_equal(clipped[:2], [[10, 10, 20, 20], [0, 10, 20, 60]])
    assert clipped.dtype == np.float32


# --- VOC fixtures ------------------------------------------------------------------------------


def test_good_fixture_and_voc_coordinates(tmp_path: Path) -> None:
    ds = voc(make_voc(tmp_path, {"a": GOOD}))
    sample = ds[0]
    np.testing.assert_array_equal(sample["boxes"], [[10, 20, 40, 50]])  # (x1-1, y1-1, x2, y2)
    assert sample["labels"].tolist() == [1] and not ds.summary().problems


def test_missing_image_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": GOOD})
    (root / "JPEGImages" / "b.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        ds = voc(root)
    assert len(ds) == 1
    (message,) = ds.summary().problems["missing_image"]
    assert "b.jpg: image file not found" in message and "train.txt:2" in message
    assert "b.jpg" in caplog.text
    with pytest.raises(BadSampleError, match=r"b\.jpg: image file not found"):
        voc(root, on_bad_sample="raise")


def test_missing_annotation_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": GOOD})
    (root / "Annotations" / "b.xml").unlink()
    ds = voc(root)
    assert (
        len(ds) == 1
        and "b.xml: annotation file not found" in ds.summary().problems["missing_annotation"][0]
    )


def test_truncated_image_detected_at_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": GOOD})
    path = root / "JPEGImages" / "a.jpg"
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageReadError, match=r"a\.jpg"):
        read_image(path)  # OpenCV alone would return a grey-filled image without error
    ds = voc(root, check_images=False)  # found only when decoded
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        sample = ds[0]  # skip: the next valid sample is served
    assert Path(ds.records.path(1)).name == "b.jpg" and sample["image_id"] == 1
    assert "a.jpg" in caplog.text and "skipped" in caplog.text
    assert len(ds.summary().problems["unreadable_image"]) == 1
    ds[0]  # known bad: substituted again without a second report
    assert len(ds.summary().problems["unreadable_image"]) == 1 and ds.skipped_at_read == 1
    with pytest.raises(ImageReadError, match=r"a\.jpg"):
        voc(root, check_images=False, on_bad_sample="raise")[0]


def test_unreadable_image_found_at_setup_with_check_images(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": GOOD})
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not an image at all")
    ds = voc(root, check_images=True)
    assert (
        len(ds) == 1
        and "a.jpg: cannot read image header" in ds.summary().problems["unreadable_image"][0]
    )
    with pytest.raises(BadSampleError, match=r"a\.jpg"):
        voc(root, check_images=True, on_bad_sample="raise")


def test_xml_that_does_not_parse(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": "<annotation>\n<size>\n<object></size>\n"})
    ds = voc(root)
    assert len(ds) == 1
    (message,) = ds.summary().problems["parse_error"]
    assert "b.xml: XML parse error at line 3, column" in message
    with pytest.raises(BadSampleError, match=r"b\.xml: XML parse error at line 3, column \d+"):
        voc(root, on_bad_sample="raise")


@pytest.mark.parametrize(
    ("box", "expected"),
    [((12, 5, 10, 20), "xmax (10) <= xmin (12)"), ((5, 20, 30, 20), "ymax (20) <= ymin (20)")],
)
def test_degenerate_box(tmp_path: Path, box: tuple, expected: str) -> None:
    root = make_voc(tmp_path, {"a": voc_xml([("cat", (11, 21, 40, 50)), ("dog", box)])})
    ds = voc(root)
    assert ds[0]["labels"].tolist() == [1]  # the dog box is dropped, labels stay aligned
    (message,) = ds.summary().problems["degenerate_box"]
    assert f"a.xml: object 2 <bndbox>: {expected}" in message
    with pytest.raises(BadSampleError, match=re.escape(f"a.xml: object 2 <bndbox>: {expected}")):
        voc(root, on_bad_sample="raise")


def test_box_partly_outside_is_clipped_wholly_outside_dropped(tmp_path: Path) -> None:
    objects = [("cat", (50, 30, 120, 90)), ("dog", (100, 10, 130, 20)), ("dog", (-9, -4, 20, 30))]
    root = make_voc(tmp_path, {"a": voc_xml(objects)})
    for policy in ("skip", "raise"):  # clipping never raises; dropping does under raise
        if policy == "raise":
            with pytest.raises(BadSampleError, match=r"object 2 .* wholly outside the 80x60 image"):
                voc(root, on_bad_sample=policy)
            continue
        ds = voc(root, on_bad_sample=policy)
        sample = ds[0]
        np.testing.assert_array_equal(sample["boxes"], [[49, 29, 80, 60], [0, 0, 20, 30]])
        assert sample["labels"].tolist() == [1, 2]
        counts = ds.summary().problem_counts
        assert counts == {"clipped_box": 2, "outside_box": 1}


def test_clipping_alone_does_not_raise(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": voc_xml([("cat", (50, 30, 120, 90))])})
    ds = voc(root, on_bad_sample="raise")
    np.testing.assert_array_equal(ds[0]["boxes"], [[49, 29, 80, 60]])
    assert (
        "a.xml: object 1 <bndbox>: box (50, 30, 120, 90) extends outside the 80x60 image"
        in (ds.summary().problems["clipped_box"][0])
    )


def test_nan_and_non_numeric_coordinates(tmp_path: Path) -> None:
    objects = [("cat", ("nan", 5, 20, 20)), ("dog", (5, "abc", 20, 20)), ("dog", (3, 4, 30, 40))]
    ds = voc(make_voc(tmp_path, {"a": voc_xml(objects)}))
    assert ds[0]["labels"].tolist() == [2]
    problems = ds.summary().problems
    assert "object 1 <bndbox>: coordinate is NaN" in problems["nonfinite_box"][0]
    assert (
        "object 2 <bndbox>: <ymin> is missing or not a number ('abc')"
        in problems["malformed_annotation"][0]
    )


def test_unknown_class_name(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": voc_xml([("cat", (1, 1, 9, 9)), ("horse", (2, 2, 9, 9))])})
    ds = voc(root)
    assert ds[0]["labels"].tolist() == [1]
    assert (
        "a.xml: object 2 <name>: unknown class 'horse' (known: cat, dog)"
        in (ds.summary().problems["unknown_class"][0])
    )
    with pytest.raises(BadSampleError, match="unknown class 'horse'"):
        voc(root, on_bad_sample="raise")


def test_image_without_objects_is_kept(tmp_path: Path) -> None:
    ds = voc(make_voc(tmp_path, {"a": voc_xml([]), "b": GOOD}), on_bad_sample="raise")
    sample = ds[0]
    assert sample["boxes"].shape == (0, 4) and sample["boxes"].dtype == np.float32
    assert sample["labels"].shape == (0,) and sample["labels"].dtype == np.int64
    assert ds.summary().images_without_objects == 1 and not ds.summary().problems


def test_difficult_excluded_by_default_or_kept_flagged(tmp_path: Path) -> None:
    xml = voc_xml([("cat", (1, 1, 9, 9), 1), ("dog", (2, 2, 20, 20), 0)])
    root = make_voc(tmp_path, {"a": xml})
    train = voc(root)
    assert train[0]["labels"].tolist() == [2] and train.summary().excluded == {"difficult": 1}
    full = voc(root, keep_difficult=True)
    assert full[0]["labels"].tolist() == [1, 2] and full[0]["difficult"].tolist() == [True, False]


def test_duplicate_image_ids_in_split(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": GOOD, "b": GOOD}, split=["a", "b", "a"])
    ds = voc(root)
    assert len(ds) == 2
    assert "a.jpg: listed again (" in ds.summary().problems["duplicate_image"][0]
    with pytest.raises(BadSampleError, match="listed again"):
        voc(root, on_bad_sample="raise")


def test_missing_size_read_from_header_and_size_mismatch(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path,
        {"a": voc_xml([("cat", (1, 1, 9, 9))], size=None), "b": voc_xml([], size=(100, 60))},
    )
    ds = voc(root, check_images=False)
    assert ds.records.sizes.tolist() == [[60, 80], [60, 100]]
    ds[1]  # annotated 100x60, the file is 80x60: skipped at read time, next served
    assert "b.jpg: image is 80x60" in ds.summary().problems["size_mismatch"][0]
    assert len(voc(root, check_images=True)) == 1  # found at setup instead


def test_invalid_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_sample"):
        voc(make_voc(tmp_path, {"a": GOOD}), on_bad_sample="ignore")


# --- decoding: grey, RGBA, CMYK, 16-bit, EXIF -------------------------------------------------


def test_grey_rgba_cmyk_16bit_decode_to_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(
        read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, axis=2)
    )
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    cv2.imwrite(str(tmp_path / "c16.png"), rgb[..., ::-1].astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(tmp_path / "c16.png"), rgb)
    cv2.imwrite(str(tmp_path / "g16.png"), rgb[..., 0].astype(np.uint16) * 256 + 100)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), np.repeat(rgb[..., :1], 3, 2))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    reference = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
    assert cmyk.shape == (30, 40, 3) and np.abs(cmyk.astype(int) - reference).max() <= 2
    for name in ("grey.png", "rgba.png", "c16.png", "cmyk.jpg"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == (30, 40, 3)


@pytest.mark.parametrize(("orientation", "turns"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_applied(tmp_path: Path, orientation: int, turns: int) -> None:
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:10, :10] = (255, 0, 0)  # red top-left corner marks the orientation
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    image = read_image(tmp_path / "r.jpg")
    expected = np.rot90(rgb, turns)  # np.rot90 turns counter-clockwise
    assert image.shape == expected.shape
    red, expected_red = image[..., 0] > 128, expected[..., 0] > 128
    assert (red & expected_red).sum() / (red | expected_red).sum() > 0.8  # marker where expected
    pil = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")).convert("RGB"))
    assert np.abs(image.astype(int) - pil).max() <= 1


def test_exif_rotated_image_in_dataset(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {"a": voc_xml([("cat", (1, 1, 9, 9))], size=(60, 80))})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x60 (WxH), displayed 60x80
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(
        root / "JPEGImages" / "a.jpg", exif=exif.tobytes()
    )
    sample = voc(root, check_images=True, on_bad_sample="raise")[0]
    assert sample["image"].shape == (80, 60, 3) and sample["orig_size"] == (80, 60)


# --- COCO fixtures -----------------------------------------------------------------------------


def make_coco(root: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    images = images or [
        {"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
        {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60},
    ]
    for entry in images:
        if not (root / "images" / entry["file_name"]).exists():
            write_jpeg(root / "images" / entry["file_name"])
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    (root / "ann.json").write_text(json.dumps(data, indent=1))
    return root / "ann.json"


def ann(id: int, image_id: int, category_id: int, bbox: list, iscrowd: int = 0) -> dict:
    return {
        "id": id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def coco(path: Path, **kwargs) -> COCODataset:
    return COCODataset(path, path.parent / "images", **kwargs)


def test_coco_label_map_crowd_and_empty_image(tmp_path: Path) -> None:
    path = make_coco(
        tmp_path, [ann(1, 1, 7, [10, 20, 30, 5]), ann(2, 1, 3, [0, 0, 80, 60], iscrowd=1)]
    )
    ds = coco(path, on_bad_sample="raise")
    assert ds.label_map == {3: 1, 7: 2} and ds.class_names == ["background", "cat", "dog"]
    sample = ds[0]
    np.testing.assert_array_equal(sample["boxes"], [[10, 20, 40, 25], [0, 0, 80, 60]])
    assert sample["labels"].tolist() == [2, 1] and sample["iscrowd"].tolist() == [False, True]
    assert ds[1]["boxes"].shape == (0, 4) and ds.summary().images_without_objects == 1


def test_coco_json_that_does_not_parse(tmp_path: Path) -> None:
    path = make_coco(tmp_path, [])
    text = path.read_text().splitlines()
    text[3] = text[3] + ","  # trailing comma inside the first image entry
    path.write_text("\n".join(text))
    for policy in ("skip", "raise"):  # a whole-file error raises under both policies
        with pytest.raises(
            BadSampleError, match=r"ann\.json: JSON parse error at line 4, column \d+"
        ):
            coco(path, on_bad_sample=policy)
    path.write_text('{"annotations": []}')
    with pytest.raises(BadSampleError, match="missing or invalid 'images'"):
        coco(path)


def test_coco_bad_annotations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = make_coco(
        tmp_path,
        [
            ann(1, 1, 3, [10, 10, 0, 5]),  # zero width
            ann(2, 1, 5, [10, 10, 5, 5]),  # unknown category
            ann(3, 9, 3, [10, 10, 5, 5]),  # unknown image
            {"id": 4, "image_id": 1, "category_id": 3},  # no bbox
            ann(5, 1, 3, [70, 50, 20, 20]),  # partly outside: clipped
            ann(6, 1, 3, [-30, 5, 10, 10]),  # wholly outside
            ann(7, 2, 7, [float("nan"), 1, 2, 3]),  # NaN
            ann(8, 2, 7, [1, 2, 3, 4]),  # fine
        ],
    )
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        ds = coco(path)
    problems = ds.summary().problems
    assert {k: len(v) for k, v in problems.items()} == {
        "unknown_class": 1, "malformed_annotation": 2, "degenerate_box": 1,
        "clipped_box": 1, "outside_box": 1, "nonfinite_box": 1,
    }  # fmt: skip
    assert (
        "annotation id 1 (image a.jpg) bbox: xmax (10) <= xmin (10)"
        in problems["degenerate_box"][0]
    )
    assert "(id 2) category_id: unknown category 5" in problems["unknown_class"][0]
    assert "(id 3) image_id: unknown image 9" in problems["malformed_annotation"][0]
    assert "annotation id 1 (image a.jpg)" in caplog.text
    np.testing.assert_array_equal(ds[0]["boxes"], [[70, 50, 80, 60]])
    np.testing.assert_array_equal(ds[1]["boxes"], [[1, 2, 4, 6]])
    with pytest.raises(BadSampleError, match="unknown category 5"):
        coco(path, on_bad_sample="raise")


def test_coco_duplicate_image_ids_and_missing_file(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
        {"id": 1, "file_name": "b.jpg", "width": 80, "height": 60},
        {"id": 2, "file_name": "c.jpg", "width": 80, "height": 60},
    ]
    path = make_coco(tmp_path, [ann(1, 1, 3, [1, 1, 5, 5])], images)
    (tmp_path / "images" / "c.jpg").unlink()
    ds = coco(path)
    assert len(ds) == 1 and ds.records.path(0).endswith("a.jpg")
    problems = ds.summary().problems
    assert (
        "images[1] (b.jpg): duplicate image id 1; first entry kept"
        in problems["duplicate_image"][0]
    )
    assert "c.jpg: image file not found (id 2)" in problems["missing_image"][0]
    with pytest.raises(BadSampleError, match="duplicate image id 1"):
        coco(path, on_bad_sample="raise")
