"""``ssd-data``: its config, summary statistics, the PASS/FAIL rule and exit status, the decode
check, the files it writes, and YOLO conversion."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from ssd_lightning.config import check_required, compose_config
from ssd_lightning.data import COCODataset, VOCDataset, YOLODataset
from ssd_lightning.data_cli import (
    CONFIG_NAME,
    check_data,
    class_names_override,
    convert_data,
    decode_all,
    summarize,
)
from test_config import _targets
from test_datasets import BCCD_CLASSES, BCCD_LAYOUT
from test_yolo import GOOD_LINE, assert_same_objects, make_yolo, write_image

REPO = Path(__file__).resolve().parents[1]


def data_config(tmp_path: Path, *overrides: str):
    return compose_config(
        ["grid_images=2", "progress=false", *overrides], config_name=CONFIG_NAME,
        output_dir=tmp_path / "run",
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=bccd", "data.root=/d"],
        ["experiment=bccd", "data=yolo", "data.root=/d"],
        ["data=yolo", "data.root=/d", "data.class_names=[a,b]"],
        ["data=coco", "data.root=/d"],
        ["data=voc", "data.root=/d", "convert=yolo", "out=/o"],
    ],
)
def test_every_documented_form_composes_and_its_targets_take_their_keys(
    overrides: list[str], tmp_path: Path
) -> None:
    cfg = data_config(tmp_path, *overrides)
    check_required(cfg)
    OmegaConf.resolve(cfg)
    assert cfg.task_name == "data" and list(cfg.splits) == ["train", "val"]
    for path, node in _targets(cfg.data):
        params = inspect.signature(get_object(node._target_)).parameters
        keys = {k for k in node if not (k.startswith("_") and k.endswith("_"))}
        assert keys <= set(params), f"{path}: {sorted(keys - set(params))} not in {node._target_}"


def pixel_yolo(root: Path, boxes: dict[str, list[tuple[int, float, float, float, float]]],
               size: int = 200) -> Path:  # fmt: skip
    """A YOLO train split of ``size`` x ``size`` images from (class, x1, y1, x2, y2) pixel boxes."""
    labels = {
        name: "".join(
            f"{c} {(x1 + x2) / 2 / size} {(y1 + y2) / 2 / size} {(x2 - x1) / size} "
            f"{(y2 - y1) / size}\n"
            for c, x1, y1, x2, y2 in objects
        )
        for name, objects in boxes.items()
    }
    make_yolo(root, labels)
    for name in boxes:  # replace the 80x60 images by size x size ones
        write_image(root / "images" / "train" / f"{name}.jpg", size, size)
    return root


def test_summary_golden_counts_sizes_and_aspect_ratios(tmp_path: Path) -> None:
    # Sides 31 (small), 33 and 95 (medium), 97 (large, aspect 97/48.5 = 2); one empty image.
    root = pixel_yolo(tmp_path, {
        "a": [(0, 0, 0, 31, 31), (1, 10, 10, 43, 43), (1, 0, 0, 95, 95)],
        "b": [(0, 0, 0, 97 * 2**0.5, 97 / 2**0.5)],
        "c": [],
    })  # fmt: skip
    ds = YOLODataset(root, "train", class_names=["cat", "dog"])
    summary = summarize(ds)
    assert summary["images"] == 3 and summary["images_without_objects"] == 1
    assert summary["objects"] == 4 and summary["objects_per_class"] == {"cat": 2, "dog": 2}
    assert summary["size_split"] == {"small": 1, "medium": 2, "large": 1}
    assert summary["boxes_per_image"]["max"] == 3 and summary["boxes_per_image"]["mean"] == 4 / 3
    np.testing.assert_allclose(summary["box_side_px"]["min"], 31, rtol=1e-5)
    np.testing.assert_allclose(summary["box_side_px"]["max"], 97, rtol=1e-5)
    np.testing.assert_allclose(summary["aspect_ratio"]["max"], 2.0, rtol=1e-5)
    assert summary["image_sizes"] == {"distinct": 1, "most_common": [[200, 200, 3]]}
    assert summary["blocking"] == {} and summary["report"]["images_without_label_file"] == 0
    json.dumps(summary)  # plain JSON types only


def test_coco128_summary_leaves_crowd_regions_out(coco128_root: Path) -> None:
    annotation_file = coco128_root / "annotations" / "instances_train2017.json"
    summary = summarize(COCODataset(annotation_file, coco128_root / "images"))
    anns = [a for a in json.loads(annotation_file.read_text())["annotations"] if not a["iscrowd"]]
    assert summary["objects"] == len(anns) == 929 and summary["crowd_regions"] == 10
    assert summary["images_without_objects"] == 2
    small = sum(a["bbox"][2] * a["bbox"][3] < 32**2 for a in anns)
    assert summary["size_split"]["small"] == small
    assert sum(summary["size_split"].values()) == 929


def test_check_data_passes_with_repairs_and_fails_on_a_dropped_object(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "data", {"a": f"{GOOD_LINE}\n0 1.004 0.5 0.1 0.2\n", "b": None})
    make_yolo(root, {"v": GOOD_LINE}, split="val")
    names = "data.class_names=[cat,dog]"
    result = check_data(data_config(tmp_path, "data=yolo", f"data.root={root}", names))
    train = result["splits"]["train"]
    assert result["passes"] and train["problems"] == {"clipped_box": 1} and not train["blocking"]
    assert train["report"]["images_without_label_file"] == 1
    out = tmp_path / "run"
    for name in ("data_summary.json", "data_summary.md", "class_histogram.png", "box_sizes.png",
                 "samples_train.png", "samples_val.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "data_summary.json").read_text())["passes"] is True
    assert (
        "PASS: no problem would stop an on_bad_sample=raise run"
        in (out / "data_summary.md").read_text()
    )

    (root / "labels" / "val" / "v.txt").write_text(f"{GOOD_LINE}\n0 0.5 0.5\n")
    result = check_data(data_config(tmp_path, "data=yolo", f"data.root={root}", names,
                                    "data.on_bad_sample=raise"))  # fmt: skip
    assert not result["passes"] and result["blocking"] == {"val": {"malformed_annotation": 1}}
    text = (out / "data_summary.md").read_text()
    assert "FAIL: 1 problem(s) would stop an on_bad_sample=raise run" in text
    assert "v.txt: line 2: 3 values, expected 5" in text


def test_decode_finds_images_that_fail_after_setup(tmp_path: Path) -> None:
    ds = YOLODataset(make_yolo(tmp_path, {"a": GOOD_LINE, "b": GOOD_LINE}), "train",
                     class_names=["cat", "dog"])  # fmt: skip
    (tmp_path / "images" / "train" / "b.jpg").write_bytes(b"garbage")
    assert decode_all(ds, workers=2, progress=False, split="train") == 1
    [message] = ds.summary().problems["unreadable_image"]
    assert "b.jpg" in message and message.endswith("(found when decoding)")
    assert summarize(ds)["blocking"] == {"unreadable_image": 1}


def test_exit_status_is_one_when_a_raise_run_would_stop(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "data", {"a": f"{GOOD_LINE}\n7 0.5 0.5 0.1 0.1\n"})
    make_yolo(root, {"v": GOOD_LINE}, split="val")
    args = ["data=yolo", f"data.root={root}", "data.class_names=[cat,dog]",
            f"paths.log_dir={tmp_path / 'logs'}", "progress=false", "grid_images=1"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "ssd_lightning.data_cli", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "FAIL: 1 problem(s) would stop" in run.stdout and "unknown_class 1" in run.stdout
    [summary] = (tmp_path / "logs" / "data" / "runs").glob("*/data_summary.json")
    assert json.loads(summary.read_text())["blocking"] == {"train": {"unknown_class": 1}}


def test_check_data_on_bccd_reports_its_two_zero_size_boxes(bccd_root: Path, tmp_path) -> None:
    result = check_data(data_config(tmp_path, "experiment=bccd", f"data.root={bccd_root}"))
    train, val = result["splits"]["train"], result["splits"]["val"]
    counts = (train["images"], train["objects"], val["images"], val["objects"])
    assert counts == (205, 2804, 87, 1137)
    assert train["objects_per_class"] == {"RBC": 2381, "WBC": 214, "Platelets": 209}
    assert result["blocking"] == {"train": {"degenerate_box": 1}, "val": {"degenerate_box": 1}}
    assert train["image_sizes"]["most_common"] == [[640, 480, 205]]


def test_convert_bccd_to_yolo_reads_back_the_same_boxes(
    bccd_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bccd_yolo"
    cfg = data_config(tmp_path, "experiment=bccd", f"data.root={bccd_root}", "convert=yolo",
                      f"out={out}")  # fmt: skip
    written = convert_data(cfg)
    assert written == {
        "train": {"images": 205, "objects": 2804, "left_out": 0},
        "val": {"images": 87, "objects": 1137, "left_out": 0},
    }
    printed = capsys.readouterr().out
    assert f"data=yolo data.root={out} data.class_names=[RBC,WBC,Platelets]" in printed
    for split in ("train", "val"):
        voc = VOCDataset(bccd_root, BCCD_CLASSES, split=split, **BCCD_LAYOUT)
        ds = YOLODataset(out, split, names_file=out / "data.yaml")
        assert not ds.summary().problems
        assert_same_objects(ds, voc, atol=1e-3)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_data(cfg)


def test_class_names_override_survives_hydra(tmp_path: Path) -> None:
    assert class_names_override(["RBC", "WBC", "Platelets"]) == "[RBC,WBC,Platelets]"
    names = ["person", "traffic light", "teddy bear"]
    override = class_names_override(names)
    assert override == """'["person","traffic light","teddy bear"]'"""
    cfg = compose_config(["data=yolo", "data.root=/d", f"data.class_names={override[1:-1]}"],
                         output_dir=tmp_path)  # fmt: skip
    assert list(cfg.data.class_names) == names and cfg.data.num_classes == 4
