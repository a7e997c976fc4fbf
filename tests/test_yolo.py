"""YOLO txt datasets: coordinates, every bad line under skip and raise, names files, real data
(coco128 converted here, bccd through ``write_yolo``), the config and a tiny training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate
from PIL import Image

from conftest import shared_dataset
from ssd_lightning.config import compose_config
from ssd_lightning.data import BadSampleError, COCODataset, VOCDataset, YOLODataset
from ssd_lightning.data.yolo import read_class_names, write_names_file, write_yolo
from test_datasets import BCCD_CLASSES, BCCD_LAYOUT, check_compact, check_contract

NAMES = ["cat", "dog"]
GOOD_LINE = "0 0.5 0.5 0.25 0.5"  # (30, 15, 50, 45) in an 80x60 image


def write_image(path: Path, height: int = 60, width: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def make_yolo(root: Path, labels: dict[str, str | None], split: str = "train") -> Path:
    """One 80x60 image per name (``a.jpg``, ``sub/b.png``; ``a`` alone means ``a.jpg``) and its
    label text (None: no label file); returns root."""
    for name, text in labels.items():
        image = Path(name) if Path(name).suffix else Path(f"{name}.jpg")
        write_image(root / "images" / split / image)
        label = root / "labels" / split / image.with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            label.write_text(text)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    return root


def yolo(root: Path, **kwargs) -> YOLODataset:
    return YOLODataset(root, "train", class_names=NAMES, **kwargs)


def test_coordinates_sample_contract_and_compact_records(tmp_path: Path) -> None:
    ds = yolo(make_yolo(tmp_path, {"a": f"{GOOD_LINE}\n1 0.25 0.75 0.5 0.5\n", "b": ""}))
    assert len(ds) == 2 and ds.num_classes == 3 and ds.label_map == {0: 1, 1: 2}
    sample = ds[0]
    check_contract(sample, ds.num_classes)
    np.testing.assert_allclose(sample["boxes"], [[30, 15, 50, 45], [0, 30, 40, 60]])
    assert sample["labels"].tolist() == [1, 2]
    assert len(ds[1]["boxes"]) == 0
    report = ds.summary()
    assert report.objects_per_class == {"cat": 1, "dog": 1}
    assert report.images_without_objects == 1 and report.images_without_label_file == 0
    assert not report.problems
    check_compact(ds)


def test_layout_extensions_subfolders_and_classes_txt(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a.PNG": GOOD_LINE, "sub/b.jpeg": GOOD_LINE, "c.webp": ""})
    (root / "labels" / "train" / "classes.txt").write_text("cat\ndog\n")  # labelImg's names
    ds = yolo(root)
    assert [Path(ds.records.path(i)).name for i in range(len(ds))] == ["a.PNG", "c.webp", "b.jpeg"]
    assert np.diff(ds.records.offsets).tolist() == [1, 0, 1]
    assert not ds.summary().problems


def test_polygon_line_gives_its_bounding_box(tmp_path: Path) -> None:
    ds = yolo(make_yolo(tmp_path, {"a": "1 0.1 0.2 0.5 0.1 0.3 0.6\n"}))
    np.testing.assert_allclose(ds[0]["boxes"], [[8, 6, 40, 36]], rtol=1e-6)
    assert ds[0]["labels"].tolist() == [2]


# (bad line 2 of a file whose line 1 is good, problem kind, expected text)
BAD_LINES = [
    ("0 0.5 0.5 0.2", "malformed_annotation", "4 values, expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.9", "malformed_annotation", "6 values, expected 5"),
    ("0 0.5 abc 0.2 0.2", "malformed_annotation", "y_center 'abc' is not a number"),
    ("0 0.1 0.1 0.5 abc 0.3 0.4", "malformed_annotation", "y2 'abc' is not a number"),
    ("0 nan 0.5 0.2 0.2", "nonfinite_box", "x_center is nan"),
    ("1.5 0.5 0.5 0.2 0.2", "malformed_annotation", "class '1.5' is not an integer"),
    ("2 0.5 0.5 0.2 0.2", "unknown_class", "class index 2 has no name (2 names, 0..1)"),
    ("-1 0.5 0.5 0.2 0.2", "unknown_class", "class index -1 has no name"),
    ("0 320 240 50 40", "malformed_annotation", "x_center 320 is outside [0, 1] by more than"),
    ("0 0.5 0.5 0.2 1.2", "malformed_annotation", "height 1.2 is outside [0, 1]"),
    ("0 0.5 0.5 0 0.2", "degenerate_box", "width 0 <= 0 (zero-size box)"),
    ("0 0.5 0.5 0.2 -0.1", "degenerate_box", "height -0.1 <= 0"),
    ("0 1.009 0.5 0.01 0.2", "outside_box", "lies wholly outside the 80x60 image"),
]


@pytest.mark.parametrize(("line", "kind", "text"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_named_by_file_and_line_under_skip_and_raise(
    tmp_path: Path, line: str, kind: str, text: str
) -> None:
    root = make_yolo(tmp_path, {"a": f"{GOOD_LINE}\n\n{line}\n"})  # the bad line is line 3
    where = f"{root / 'labels' / 'train' / 'a.txt'}: line 3: "
    ds = yolo(root)
    assert len(ds[0]["boxes"]) == 1  # the good line is kept
    [message] = ds.summary().problems[kind]
    assert message.startswith(where) and text in message and "dropped" in message
    with pytest.raises(BadSampleError) as error:
        yolo(root, on_bad_sample="raise")
    assert str(error.value) == message


def test_small_overshoot_is_clipped_as_a_repair_and_never_raises(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a": "0 1.004 0.5 0.1 0.2\n"})  # x 0.954..1.054
    for policy in ("skip", "raise"):
        ds = yolo(root, on_bad_sample=policy)
        np.testing.assert_allclose(ds[0]["boxes"], [[76.32, 24, 80, 36]], rtol=1e-6)
        [message] = ds.summary().problems["clipped_box"]
        assert message.startswith(f"{root / 'labels' / 'train' / 'a.txt'}: line 1: ")
        assert "clipped" in message


def test_rounding_at_the_border_is_snapped_silently(tmp_path: Path) -> None:
    ds = yolo(make_yolo(tmp_path, {"a": "0 0.5 0.5 1.000001 1.0\n"}))
    np.testing.assert_array_equal(ds[0]["boxes"], [[0, 0, 80, 60]])
    assert not ds.summary().problems


def test_label_file_without_image_and_image_without_label_file(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a": GOOD_LINE, "b": None, "c": ""})
    orphan = root / "labels" / "train" / "orphan.txt"
    orphan.write_text(GOOD_LINE)
    ds = yolo(root)
    assert len(ds) == 3
    report = ds.summary()
    assert report.images_without_label_file == 1 and report.images_without_objects == 2
    assert "images without a label file: 1" in str(report)
    [message] = report.problems["missing_image"]
    assert message.startswith(f"{orphan}: label file without an image")
    with pytest.raises(BadSampleError, match=r"orphan\.txt: label file without an image"):
        yolo(root, on_bad_sample="raise")
    orphan.unlink()
    assert len(yolo(root, on_bad_sample="raise")) == 3  # no label file is not an error


def test_an_empty_label_folder_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = yolo(make_yolo(tmp_path, {"a": None, "b": None}))
    assert ds.summary().images_without_label_file == 2 and not ds.summary().problems
    assert "labels/train: no label files: all 2 images have no objects" in caplog.text


def test_two_images_sharing_a_label_file(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a.jpg": GOOD_LINE, "a.png": GOOD_LINE})
    ds = yolo(root)
    assert len(ds) == 1 and ds.records.path(0).endswith("a.jpg")
    [message] = ds.summary().problems["duplicate_image"]
    assert "a.png: shares the label file" in message
    with pytest.raises(BadSampleError, match="shares the label file"):
        yolo(root, on_bad_sample="raise")


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a": GOOD_LINE, "b": GOOD_LINE})
    (root / "images" / "train" / "b.jpg").write_bytes(b"not an image")
    ds = yolo(root)
    assert len(ds) == 1
    [message] = ds.summary().problems["unreadable_image"]
    assert "b.jpg: cannot read image header" in message
    with pytest.raises(BadSampleError, match=r"b\.jpg"):
        yolo(root, on_bad_sample="raise")


def test_missing_folders_are_clear_errors(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a": GOOD_LINE})
    with pytest.raises(FileNotFoundError, match="images/val: image folder not found"):
        YOLODataset(root, "val", class_names=NAMES)
    shutil.rmtree(root / "labels")
    with pytest.raises(FileNotFoundError, match="labels/train: label folder not found"):
        yolo(root)


@pytest.mark.parametrize(
    "names",
    [["cat", "dog"], {0: "cat", 1: "dog"}, {"1": "dog", "0": "cat"}],
    ids=["list", "map", "string-keys"],
)
def test_names_file_list_or_index_map(tmp_path: Path, names) -> None:
    root = make_yolo(tmp_path, {"a": "1 0.5 0.5 0.2 0.2"})
    (root / "data.yaml").write_text(yaml.safe_dump({"nc": 2, "names": names}))
    ds = YOLODataset(root, "train", names_file=root / "data.yaml")
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds.summary().objects_per_class == {"cat": 0, "dog": 1}
    agreeing = YOLODataset(root, "train", class_names=["background", *NAMES],
                           names_file=root / "data.yaml")  # fmt: skip
    assert agreeing.class_names == ds.class_names


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ({"names": {0: "cat", 2: "dog"}}, r"names keys must be 0..1, got \[0, 2\]"),
        ({"nc": 3, "names": ["cat", "dog"]}, "nc=3 but 2 names"),
        ({"nc": 2}, "needs 'names:'"),
    ],
)
def test_bad_names_files(tmp_path: Path, content: dict, error: str) -> None:
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=error):
        read_class_names(tmp_path / "data.yaml")


def test_names_must_come_from_somewhere_and_agree(tmp_path: Path) -> None:
    root = make_yolo(tmp_path, {"a": GOOD_LINE})
    with pytest.raises(ValueError, match="needs class_names or a names_file"):
        YOLODataset(root, "train")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["dog", "cat"]}))
    with pytest.raises(ValueError, match=r"differ from the names in .*data.yaml \['dog', 'cat'\]"):
        YOLODataset(root, "train", class_names=NAMES, names_file=root / "data.yaml")


# --- real data ---------------------------------------------------------------------------------


def test_coco128_converted_here_gives_the_coco_boxes(tmp_path: Path, coco128_root: Path) -> None:
    """An independent COCO -> YOLO conversion (names in alphabetical order, so class indices
    differ from COCO's label order) reads back as COCODataset's non-crowd boxes, by name."""
    data = json.loads((coco128_root / "annotations" / "instances_train2017.json").read_text())
    names = sorted(c["name"] for c in data["categories"])
    index_of = {c["id"]: names.index(c["name"]) for c in data["categories"]}
    lines: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            lines.setdefault(ann["image_id"], []).append(ann)
    image_dir, label_dir = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for image in data["images"]:
        (image_dir / image["file_name"]).symlink_to(coco128_root / "images" / image["file_name"])
        w, h = image["width"], image["height"]
        rows = [
            f"{index_of[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
            f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} "
            f"{a['bbox'][3] / h:.6f}"
            for a in lines.get(image["id"], [])
        ]
        if rows:  # images without annotations get no label file
            (label_dir / Path(image["file_name"]).with_suffix(".txt")).write_text("\n".join(rows))
    coco = COCODataset(coco128_root / "annotations" / "instances_train2017.json",
                       coco128_root / "images")  # fmt: skip
    ds = YOLODataset(tmp_path, "train", class_names=names)
    assert len(ds) == len(coco) == 128
    report = ds.summary()
    assert not report.problems
    assert report.images_without_label_file == 2 and report.images_without_objects == 2
    assert report.num_objects == 929
    assert_same_objects(ds, coco, atol=1e-3)


def assert_same_objects(ours, reference, atol: float) -> None:
    """Per image file name: the same (class name, box) pairs, boxes within ``atol`` pixels
    (crowd and difficult objects left out: YOLO has no ignore flag)."""

    def by_file(ds) -> dict[str, tuple[np.ndarray, list[str]]]:
        out = {}
        for i in range(len(ds)):
            objects = ds.records.objects(i)
            keep = ~(objects["iscrowd"] | objects["difficult"])
            names = [ds.class_names[k] for k in objects["labels"][keep]]
            rounded = np.round(objects["boxes"][keep], 1)  # rounding must not reorder ties
            order = np.lexsort((*rounded.T[::-1], names))
            out[Path(ds.records.path(i)).name] = (
                objects["boxes"][keep][order],
                [names[k] for k in order],
            )
        return out

    got, expected = by_file(ours), by_file(reference)
    assert got.keys() == expected.keys()
    for name, (boxes, names) in expected.items():
        assert got[name][1] == names, name
        np.testing.assert_allclose(got[name][0], boxes, atol=atol, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def bccd_yolo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, VOCDataset]]:
    """bccd's train and val splits written by ``write_yolo``, and the VOC datasets read."""
    root = shared_dataset("bccd")
    out = tmp_path_factory.mktemp("bccd_yolo")
    voc = {s: VOCDataset(root, BCCD_CLASSES, split=s, **BCCD_LAYOUT) for s in ("train", "val")}
    for split, dataset in voc.items():
        assert write_yolo(dataset, out, split) == {
            "images": len(dataset), "objects": dataset.summary().num_objects, "left_out": 0,
        }  # fmt: skip
    write_names_file(out, BCCD_CLASSES, {"train": "train", "val": "val"})
    return out, voc


def test_bccd_written_by_write_yolo_reads_back_the_same_boxes(bccd_yolo) -> None:
    out, voc = bccd_yolo
    for split in ("train", "val"):
        ds = YOLODataset(out, split, names_file=out / "data.yaml")
        assert len(ds) == len(voc[split]) and not ds.summary().problems
        assert ds.summary().objects_per_class == voc[split].summary().objects_per_class
        assert_same_objects(ds, voc[split], atol=1e-3)
    assert read_class_names(out / "data.yaml") == BCCD_CLASSES
    assert yaml.safe_load((out / "data.yaml").read_text())["train"] == "images/train"


def test_bccd_experiment_with_yolo_data_builds_the_datamodule(bccd_yolo, tmp_path: Path) -> None:
    out, _ = bccd_yolo
    names = "data.class_names=[RBC,WBC,Platelets]"
    cfg = compose_config(
        ["experiment=bccd", "data=yolo", f"data.root={out}", names,
         f"data.names_file={out / 'data.yaml'}"],
        output_dir=tmp_path,
    )  # fmt: skip
    datamodule = instantiate(cfg.data.datamodule)
    assert type(datamodule.train_dataset) is YOLODataset
    assert datamodule.num_classes == cfg.data.num_classes == 4
    assert [len(datamodule.train_dataset), len(datamodule.val_dataset)] == [205, 87]
    assert cfg.model.image_size == 256  # the experiment's network, unchanged


def test_yolo_config_composes_and_builds_without_real_data(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "data", {"a": GOOD_LINE})
    make_yolo(root, {"v": "1 0.5 0.5 0.5 0.5"}, split="val")
    cfg = compose_config(
        ["data=yolo", f"data.root={root}", "data.class_names=[cat,dog]", "data.num_workers=0"],
        output_dir=tmp_path,
    )
    datamodule = instantiate(cfg.data.datamodule)
    assert datamodule.class_names == ["background", "cat", "dog"] and cfg.data.num_classes == 3
    assert datamodule.val_dataset.summary().objects_per_class == {"cat": 0, "dog": 1}


def test_tiny_training_run_on_converted_bccd_subset(bccd_yolo, tmp_path: Path) -> None:
    from ssd_lightning.train import train

    out, _ = bccd_yolo
    subset = tmp_path / "subset"
    for split, count in (("train", 8), ("val", 4)):
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            (subset / kind / split).mkdir(parents=True)
            for path in sorted((out / kind / split).glob(f"*{suffix}"))[:count]:
                shutil.copyfile(path, subset / kind / split / path.name)
    names = "data.class_names=[RBC,WBC,Platelets]"
    cfg = compose_config(
        ["experiment=tiny", "data=yolo", f"data.root={subset}", names, "data.batch_size=4",
         "data.num_workers=0", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         f"paths.log_dir={tmp_path / 'logs'}"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    metrics = train(cfg)
    assert 0.0 <= metrics["val/mAP_50"] <= 1.0
    assert Path(metrics["last_checkpoint"]).is_file()


def test_data_yolo_reads_the_class_names_of_the_data_yaml_in_its_root(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("names: {0: cat, 1: dog, 2: bird}\n")
    cfg = compose_config(["data=yolo", f"data.root={tmp_path}"], output_dir=tmp_path)
    assert list(cfg.data.class_names) == ["cat", "dog", "bird"] and cfg.data.num_classes == 4
    given = compose_config(
        ["data=yolo", f"data.root={tmp_path}", "data.class_names=[a,b]"], output_dir=tmp_path
    )
    assert given.data.num_classes == 3  # given names win; data.yaml is not read
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(["data=yolo", f"data.root={empty}"], output_dir=tmp_path)
    with pytest.raises(Exception, match=r"empty/data\.yaml: no Ultralytics data\.yaml"):
        _ = cfg.data.num_classes
