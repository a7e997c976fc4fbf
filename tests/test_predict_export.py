"""ssd-predict and ssd-export on a checkpoint of a real one-epoch tiny training run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssd_lightning.config import compose_config
from ssd_lightning.data import read_image
from ssd_lightning.data.transforms import build_eval_transform
from ssd_lightning.evaluate import load_checkpoint, module_from_checkpoint
from ssd_lightning.export import export_onnx, matched_detections, run_onnx, with_postprocess
from ssd_lightning.predict import category_ids_of, predict
from ssd_lightning.train import train

onnx = pytest.importorskip("onnx", reason="export extra not installed")
ort = pytest.importorskip("onnxruntime", reason="export extra not installed")

SCORE_THRESHOLD = 0.2  # after one epoch: ~250 (box, class) pairs per image above it


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of the tiny experiment; its checkpoint and some images of other sizes."""
    out = tmp_path_factory.mktemp("train")
    overrides = [
        "experiment=tiny",
        "trainer.max_epochs=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={out / 'cache'}",
        "~callbacks.prediction_images",
        "~callbacks.lr_monitor",
        "~callbacks.throughput",
    ]
    metrics = train(compose_config(overrides, output_dir=out))
    images = out / "inputs"
    (images / "sub").mkdir(parents=True)
    val = sorted((out / "cache").rglob("val_*.jpg"))[:5]
    for path in val[:3]:
        shutil.copy(path, images / path.name)
    # Other sizes and formats: boxes must come back in each image's own pixels.
    cv2.imwrite(str(images / "sub" / "wide.png"), cv2.resize(cv2.imread(str(val[3])), (150, 80)))
    cv2.imwrite(str(images / "sub" / "tall.bmp"), cv2.resize(cv2.imread(str(val[4])), (64, 120)))
    return {"ckpt": Path(metrics["last_checkpoint"]), "images": images}


def eval_inputs(module, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images prepared as in validation, and their original (h, w)."""
    hp = module.hparams
    transform = build_eval_transform(hp.image_size, hp.mean, hp.std)
    tensors, sizes = [], []
    for path in files:
        image = read_image(path)
        sample = {
            "image": image,
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64),
            "image_id": 0,
            "orig_size": image.shape[:2],
        }
        tensors.append(transform(sample)["image"])
        sizes.append(image.shape[:2])
    return torch.stack(tensors), torch.tensor(sizes)


def console_script(module: str) -> list[str]:
    """The command a console script runs: ``main()`` imported from the module (not ``-m``)."""
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


# ---------------------------------------------------------------- predict


def test_predict_writes_coco_results_and_drawn_images(run, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    results = predict(
        run["ckpt"],
        run["images"],
        out,
        batch_size=2,
        score_threshold=SCORE_THRESHOLD,
        max_detections=20,
    )
    header = json.loads((out / "images.json").read_text())
    names = [im["file_name"] for im in header["images"]]
    assert names == [
        "sub/tall.bmp",
        "sub/wide.png",
        *sorted(p.name for p in run["images"].glob("*.jpg")),
    ]
    assert [im["id"] for im in header["images"]] == [1, 2, 3, 4, 5]
    assert (header["images"][0]["height"], header["images"][0]["width"]) == (120, 64)
    assert [c["name"] for c in header["categories"]] == [
        "circle",
        "square",
        "triangle",
        "ellipse",
        "star",
    ]
    assert json.loads((out / "detections.json").read_text()) == results

    # The same detections as SSDModule.detect on the same images, one at a time, with the
    # network in the default layout (predict runs it channels-last).
    module = module_from_checkpoint(
        load_checkpoint(run["ckpt"]), score_threshold=SCORE_THRESHOLD, max_detections=20
    )
    files = [run["images"] / name for name in names]
    for image_id, path in enumerate(files, start=1):
        images, sizes = eval_inputs(module, [path])
        expected = module.detect(images, sizes)[0]
        got = [r for r in results if r["image_id"] == image_id]
        assert 0 < len(got) == len(expected["scores"]) <= 20
        # bbox rounded to 0.01 px in the JSON; batches of 2 there, of 1 here
        xywh = torch.tensor([r["bbox"] for r in got], dtype=torch.float64)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        torch.testing.assert_close(xyxy, expected["boxes"].double(), atol=0.02, rtol=0)
        assert [r["category_id"] for r in got] == expected["labels"].tolist()  # identity map
        assert min(r["score"] for r in got) > SCORE_THRESHOLD
        drawn = read_image(out / "images" / names[image_id - 1])
        assert drawn.shape == read_image(path).shape and not np.array_equal(drawn, read_image(path))

    pycocotools = pytest.importorskip("pycocotools.coco")
    coco = pycocotools.COCO(str(out / "images.json"))
    assert len(coco.loadRes(str(out / "detections.json")).getAnnIds()) == len(results)


def test_category_ids_come_from_the_label_map() -> None:
    # label_map is the dataset's: category id -> contiguous label (COCO: 1..90 -> 1..80).
    assert category_ids_of({1: 1, 3: 2, 90: 3}, 4).tolist() == [0, 1, 3, 90]
    assert category_ids_of(None, 3).tolist() == [0, 1, 2]


def test_predict_maps_labels_back_to_dataset_category_ids(run, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(run["ckpt"])
    checkpoint["ssd"]["label_map"] = {10 * k: k for k in range(1, 6)}
    ckpt = tmp_path / "mapped.ckpt"
    torch.save(checkpoint, ckpt)
    one = run["images"] / "sub" / "wide.png"
    plain = predict(run["ckpt"], one, tmp_path / "a", score_threshold=0.3, draw=False)
    mapped = predict(ckpt, one, tmp_path / "b", score_threshold=0.3, draw=False)
    assert plain and [r["category_id"] for r in mapped] == [10 * r["category_id"] for r in plain]
    categories = json.loads((tmp_path / "b" / "images.json").read_text())["categories"]
    assert categories[0] == {"id": 10, "name": "circle"} and len(categories) == 5
    assert not (tmp_path / "b" / "images").exists()


def test_predict_cli(run, tmp_path: Path) -> None:
    command = [
        *console_script("ssd_lightning.predict"),
        f"ckpt_path={run['ckpt']}",
        f"input={run['images'] / 'sub'}",
        f"output_dir={tmp_path / 'cli'}",
        "batch_size=4",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "detections in 2 images" in done.stdout
    assert sorted(p.name for p in (tmp_path / "cli" / "images").iterdir()) == [
        "tall.bmp",
        "wide.png",
    ]
    assert (tmp_path / "cli" / ".hydra" / "config.yaml").is_file()


# ---------------------------------------------------------------- export


def test_export_network_matches_pytorch_in_onnxruntime(run, tmp_path: Path) -> None:
    module = module_from_checkpoint(load_checkpoint(run["ckpt"]))
    path = export_onnx(module, tmp_path / "net.onnx")
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["image_size"] == [96, 96] and meta["class_names"][0] == "circle"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["postprocess"] is False

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, _ = eval_inputs(module, sorted(run["images"].rglob("*.*")))
    for batch in (images[:1], images):  # dynamic batch axis: 1 and 5
        loc, logits = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            want_loc, want_logits = module(batch)
        assert loc.shape == (len(batch), len(module.default_boxes), 4)
        torch.testing.assert_close(torch.from_numpy(loc), want_loc, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(logits), want_logits, atol=1e-4, rtol=1e-4)


def test_export_with_postprocess_gives_the_same_detections(run, tmp_path: Path) -> None:
    module = module_from_checkpoint(
        load_checkpoint(run["ckpt"]), score_threshold=SCORE_THRESHOLD, max_detections=30
    )
    path = export_onnx(module, tmp_path / "full.onnx", postprocess=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    all_images, all_sizes = eval_inputs(module, sorted(run["images"].rglob("*.*")))
    for images, sizes in ((all_images[:1], all_sizes[:1]), (all_images, all_sizes)):
        boxes, scores, labels, index = session.run(
            None, {"images": images.numpy(), "image_sizes": sizes.numpy()}
        )
        expected = module.detect(images, sizes)
        assert max(len(want["scores"]) for want in expected) == 30  # the per-image cap is used
        for i, want in enumerate(expected):
            mine = index == i
            assert 0 < mine.sum() == len(want["scores"])
            got = torch.from_numpy(boxes[mine])
            torch.testing.assert_close(got, want["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(
                torch.from_numpy(scores[mine]), want["scores"], atol=1e-5, rtol=0
            )
            assert labels[mine].tolist() == want["labels"].tolist()
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert (meta["score_threshold"], meta["max_detections"]) == (SCORE_THRESHOLD, 30)
    assert (meta["candidates_per_class"], meta["candidates"]) == (200, 1000)


def test_export_runs_the_post_processors_pass_with_a_fixed_pool(run, tmp_path: Path) -> None:
    # A pool too small for some images: the graph gives what one pass of
    # PostProcessor.detect gives (the same code), and the exact detections where it is final.
    module = module_from_checkpoint(
        load_checkpoint(run["ckpt"]), score_threshold=0.05, max_detections=25
    )
    path = export_onnx(module, tmp_path / "pool.onnx", postprocess=True, candidates=40)
    images, sizes = eval_inputs(module, sorted(run["images"].rglob("*.*")))
    boxes, scores, labels, index = run_onnx(path, (images, sizes))
    model = with_postprocess(module, candidates=40)
    with torch.no_grad():
        loc, cls_logits = module(images)
        found = model.post.detect(loc, cls_logits, sizes, pool=40, export=True)
    image, slot = found.keep.nonzero().unbind(1)
    assert index.tolist() == image.tolist()
    assert labels.tolist() == found.labels[image, slot].tolist()
    torch.testing.assert_close(boxes, found.boxes[image, slot], atol=1e-3, rtol=0)
    torch.testing.assert_close(scores, found.scores[image, slot], atol=1e-5, rtol=0)
    exact = module.detect(images, sizes)
    assert not bool(found.final.all())  # too small a pool for some images
    for i in found.final.nonzero()[:, 0].tolist():
        assert labels[index == i].tolist() == exact[i]["labels"].tolist()


def test_export_cli_checks_in_onnxruntime(run, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(run["ckpt"], ckpt)
    command = [*console_script("ssd_lightning.export"), f"ckpt_path={ckpt}", "format=onnx"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model.onnx").is_file()
    diffs = json.loads(done.stdout.split("per output: ")[1].splitlines()[0])
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.onnx"]


def test_matched_detections_ignores_order_but_not_labels_or_images() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]])
    want = (boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), torch.tensor([0, 0]))
    swapped = tuple(t.flip(0) for t in want)
    assert matched_detections(swapped, want) == 1.0
    relabelled = (boxes, want[1], torch.tensor([1, 3]), want[3])
    assert matched_detections(relabelled, want) == 0.5
    other_image = (boxes, want[1], want[2], torch.tensor([0, 1]))
    assert matched_detections(other_image, want) == 0.5
    moved = (boxes + torch.tensor([0.0, 0.0, 1.0, 0.0]), *want[1:])
    assert matched_detections(moved, want) == 0.0  # IoU 0.91 and 0.94 < 0.99
