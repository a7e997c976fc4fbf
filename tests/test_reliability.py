"""Reliability: checkpoints that cannot run code or vanish, evaluation that refuses the wrong
data, bad images found up front. Each case is reproduced from small files in tmp_path."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import fsspec.implementations.local
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from conftest import tiny_config
from ssd_lightning.callbacks import CheckpointNotSavedError, check_writable
from ssd_lightning.checkpoint import (
    CheckpointError,
    build_network,
    load_checkpoint,
    weights_digest,
)
from ssd_lightning.data import COCODataset, ImageReadError, VOCDataset, read_image
from ssd_lightning.data.datamodule import SSDDataModule
from ssd_lightning.data.images import ImageTooLargeError
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.evaluate import evaluate, module_from_checkpoint
from ssd_lightning.module import ClassMismatchError
from ssd_lightning.predict import predict
from ssd_lightning.train import summary, train

NAMES = ["circle", "square", "triangle", "ellipse", "star"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """A 2-epoch tiny run: its metrics and config."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, cache_dir, "trainer.max_epochs=2")
    return {"out": out, "cfg": cfg, "metrics": train(cfg)}


def resave(checkpoint: dict, path: Path) -> Path:
    """Write a modified checkpoint with a fresh weights hash (as a careful forger would)."""
    checkpoint["ssd"]["weights_sha256"] = weights_digest(checkpoint["state_dict"])
    torch.save(checkpoint, path)
    return path


# --- 1. a checkpoint cannot run code -----------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        {"_target_": "builtins.open", "file": "{marker}", "mode": "w"},
        {"_target_": "shutil.copyfile", "src": "{ckpt}", "dst": "{marker}"},
        {"_target_": "torch.load", "f": {"_target_": "io.BytesIO"}, "weights_only": False},
    ],
)
def test_checkpoint_naming_other_code_is_refused_by_eval_predict_export(
    run: dict, tmp_path: Path, target: dict
) -> None:
    ckpt = run["metrics"]["last_checkpoint"]
    marker = tmp_path / "pwned"
    text = json.dumps(target).replace("{marker}", str(marker)).replace("{ckpt}", ckpt)
    checkpoint = load_checkpoint(ckpt)
    checkpoint["hyper_parameters"]["net_config"]["backbone"] = json.loads(text)
    evil = resave(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not one of this project's network classes"):
        module_from_checkpoint(load_checkpoint(evil))  # what ssd-eval and ssd-export call
    with pytest.raises(CheckpointError, match=r"net_config\.backbone\._target_"):
        predict(evil, run["out"], tmp_path / "pred", draw=False)
    assert not marker.exists()


def test_allow_listed_network_is_rebuilt_exactly(run: dict) -> None:
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    net = build_network(checkpoint["hyper_parameters"]["net_config"])
    keys = {k.removeprefix("net.") for k in checkpoint["state_dict"] if k.startswith("net.")}
    assert set(net.state_dict()) == keys


# --- 2. checkpoints never silently missing -----------------------------------------------------


def test_checkpoint_that_cannot_be_written_stops_training(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's atomic save swallows a PermissionError (seen with chattr +i on the folder)."""
    local = fsspec.implementations.local.LocalFileSystem
    original = local._open

    def refuse(self, path, mode="rb", *args, **kwargs):
        if "checkpoints" in str(path) and "w" in mode:
            raise PermissionError(13, "Operation not permitted", str(path))
        return original(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(local, "_open", refuse)
    cfg = tiny_config(tmp_path, cache_dir, "trainer.max_epochs=1")
    with pytest.raises(CheckpointNotSavedError, match=r"checkpoints/.*was not written"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_unwritable_run_folder_is_an_error_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointNotSavedError, match=r"run folder .*file/run is not writable"):
        check_writable(blocker / "run", "run folder")


# --- 3. last.ckpt is the last state --------------------------------------------------------------


def test_last_checkpoint_is_the_state_after_the_last_epoch(tmp_path: Path, cache_dir: Path) -> None:
    # Validation (and so a top-k save) only after epoch 1 of 0..2.
    cfg = tiny_config(
        tmp_path, cache_dir, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2",

    )  # fmt: skip
    metrics = train(cfg)
    last = load_checkpoint(metrics["last_checkpoint"])
    assert last["epoch"] == 2 and last["global_step"] == 3 * 4  # 32 images / batch 8
    best = load_checkpoint(metrics["best_checkpoint"])
    assert best["epoch"] == 1


# --- 4. resume keeps the best ------------------------------------------------------------------


class WorseValidation(Callback):
    """Makes every validation of this run score below anything before."""

    def on_validation_end(self, trainer, pl_module) -> None:
        trainer.callback_metrics["val/mAP"] = torch.tensor(-0.5)


def test_resume_into_a_new_folder_keeps_best_score_and_checkpoint(
    run: dict, tmp_path: Path, cache_dir: Path
) -> None:
    before = run["metrics"]
    cfg = tiny_config(
        tmp_path, cache_dir, "trainer.max_epochs=3", f"ckpt_path={before['last_checkpoint']}",

    )  # fmt: skip
    after = train(cfg, extra_callbacks=[WorseValidation()])
    assert after["best_mAP"] == pytest.approx(before["best_mAP"])
    best = Path(after["best_checkpoint"])
    assert (
        best.parent == tmp_path / "checkpoints"
        and best.name == Path(before["best_checkpoint"]).name
    )
    assert load_checkpoint(best)["epoch"] == load_checkpoint(before["best_checkpoint"])["epoch"]


# --- 5. ssd-eval refuses data with other classes -----------------------------------------------


def eval_config(run: dict, ckpt: Path, *overrides: str):
    return tiny_config(
        run["out"], Path(run["cfg"].paths.cache_dir), f"ckpt_path={ckpt}",
        f"output_json={ckpt.with_suffix('.json')}", *overrides, name="eval",
    )  # fmt: skip


def test_eval_refuses_a_checkpoint_with_fewer_classes(run: dict, tmp_path: Path) -> None:
    """3-class weights on 5-class data crashed inside cross_entropy."""
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    checkpoint["ssd"]["class_names"] = NAMES[:3]
    checkpoint["hyper_parameters"]["net_config"]["num_classes"] = 4
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith("net.head.cls.")]:
        value = state[key]  # (k * 6, ...) -> (k * 4, ...): the first 4 of 6 classes per box
        state[key] = value.view(-1, 6, *value.shape[1:])[:, :4].reshape(-1, *value.shape[1:])
    ckpt = resave(checkpoint, tmp_path / "three.ckpt")
    with pytest.raises(ClassMismatchError) as error:
        evaluate(eval_config(run, ckpt))
    assert str(NAMES) in str(error.value) and str(NAMES[:3]) in str(error.value)


def test_eval_reorders_classes_only_when_asked(run: dict, tmp_path: Path) -> None:
    original = eval_config(run, Path(run["metrics"]["last_checkpoint"]))
    want = evaluate(original)
    # The same network with its classes genuinely stored in reverse order.
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    module = module_from_checkpoint(checkpoint)
    module.net.head.permute_classes([0, 5, 4, 3, 2, 1])
    checkpoint["state_dict"] = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoint["ssd"]["class_names"] = NAMES[::-1]
    ckpt = resave(checkpoint, tmp_path / "reversed.ckpt")
    with pytest.raises(ClassMismatchError, match="match_classes=by_name"):
        evaluate(eval_config(run, ckpt))
    got = evaluate(eval_config(run, ckpt, "match_classes=by_name"))
    for name in NAMES:
        assert got[f"AP/{name}"] == pytest.approx(want[f"AP/{name}"], abs=1e-6), name
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)


# --- 6. huge images, and image files checked at setup ------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def make_voc(root: Path, names: list[str]) -> Path:
    """A VOC folder of 80x60 images named ``names``, one cat each."""
    rng = np.random.default_rng(0)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg"
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            "<annotation><size><width>80</width><height>60</height></size><object><name>cat"
            "</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>40</xmax><ymax>40</ymax>"
            "</bndbox></object></annotation>"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names))
    return root


def test_huge_image_is_a_bad_sample_naming_the_file(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(40000, 40000))  # OpenCV raised a bare cv2.error on it
    for limit in (None, 2_000_000_000):  # beyond Pillow's own limit: its message, our file name
        with pytest.raises(ImageTooLargeError, match=r"huge\.png: image too large to decode"):
            read_image(huge, max_pixels=limit)
    huge.write_bytes(png_header_only(12000, 10000))
    with pytest.raises(ImageTooLargeError, match=r"huge\.png: image is 12000x10000 \(120 mega"):
        read_image(huge)  # the default limit, 100 megapixels


def test_pixel_limit_skips_or_raises_at_setup_and_at_read(tmp_path: Path) -> None:
    root = make_voc(tmp_path, ["a", "b"])
    Image.new("RGB", (200, 150)).save(root / "JPEGImages" / "a.jpg")  # 30,000 pixels
    xml = (root / "Annotations" / "a.xml").read_text().replace("80<", "200<").replace("60<", "150<")
    (root / "Annotations" / "a.xml").write_text(xml)
    ds = VOCDataset(root, ["cat"], split="train", max_image_pixels=20000)
    assert len(ds) == 1 and "a.jpg: image is 200x150" in ds.summary().problems["image_too_large"][0]
    with pytest.raises(Exception, match=r"a\.jpg: image is 200x150"):
        VOCDataset(root, ["cat"], split="train", max_image_pixels=20000, on_bad_sample="raise")
    late = VOCDataset(root, ["cat"], split="train", max_image_pixels=20000, check_images=False)
    assert late[0]["image_id"] == 1 and late.skipped_at_read == 1  # found at read, next served


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "cannot read image header"),
        (b"hello", "cannot read image header"),
        (None, "truncated JPEG"),
    ],
)
def test_bad_image_files_are_found_at_setup(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    root = make_voc(tmp_path, ["a", "b"])
    path = root / "JPEGImages" / "a.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50] if content is None else content)
    ds = VOCDataset(root, ["cat"], split="train")  # default: checked at setup
    assert len(ds) == 1 and why in ds.summary().problems["unreadable_image"][0]
    assert "a.jpg" in ds.summary().problems["unreadable_image"][0]


def write_coco(root: Path, width: int = 80) -> Path:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (80, 60)).save(root / "images" / "a.jpg")
    Image.new("RGB", (80, 60)).save(root / "images" / "b.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": width, "height": 60},
            {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_coco_size_that_disagrees_with_the_file_is_found_at_setup(tmp_path: Path) -> None:
    root = write_coco(tmp_path, width=100)
    ds = COCODataset(root / "ann.json", root / "images")
    assert len(ds) == 1
    assert "a.jpg: image is 80x60" in ds.summary().problems["size_mismatch"][0]


def test_missing_coco_file_and_folder_are_named(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json: COCO annotation file not found"):
        COCODataset(root / "nope.json", root / "images")
    with pytest.raises(FileNotFoundError, match=r"pics: image folder not found"):
        COCODataset(root / "ann.json", root / "pics")


# --- validation drops, never substitutes; run-level counts -------------------------------------


def test_validation_drops_a_bad_image_and_the_run_counts_it(
    tmp_path: Path, cache_dir: Path
) -> None:
    root = make_voc(tmp_path, ["a", "b", "c"])
    path = root / "JPEGImages" / "b.jpg"
    path.write_bytes(path.read_bytes()[:400])
    val = VOCDataset(root, ["cat"], split="train", check_images=False)  # found only at read
    datamodule = SSDDataModule(None, val, image_size=64, batch_size=2, num_workers=1)
    datamodule.set_box_coder(SSDBoxCoder(torch.tensor([[0.5, 0.5, 0.5, 0.5]])))
    batches = list(datamodule.val_dataloader())
    ids = torch.cat([b["image_ids"] for b in batches if b is not None]).tolist()
    assert ids == [0, 2]  # before: [0, 2, 2], image c scored twice in place of b
    assert val.skipped_at_read == 1  # found in a DataLoader worker, counted for the run


def test_summary_reports_skipped_steps_and_data_problems() -> None:
    text = summary(
        {"val/mAP": 0.5, "nonfinite_steps": 30, "optimizer_steps": 70,
         "data_problems": {"train": {"unreadable_image": 2, "skipped_at_read": 1}}}
    )  # fmt: skip
    assert "WARNING: 30 training steps skipped as non-finite (30.0% of 100)" in text
    assert "data problems (train): unreadable_image=2, skipped_at_read=1" in text


def test_run_metrics_carry_the_health_counts(run: dict) -> None:
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    assert metrics["nonfinite_steps"] == 0 and metrics["optimizer_steps"] == 8
    assert set(metrics["data_problems"]) == {"train", "val"}


class NaNWeightsBeforeValidation(Callback):
    def on_validation_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.net.parameters()).fill_(float("nan"))


def test_non_finite_weights_are_never_saved_as_best(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_config(tmp_path, cache_dir, "trainer.max_epochs=1")
    with pytest.warns(UserWarning, match="not all finite; not saved as a best checkpoint"):
        metrics = train(cfg, extra_callbacks=[NaNWeightsBeforeValidation()])
    assert metrics["best_checkpoint"] is None
    assert not list((tmp_path / "checkpoints").glob("best-*.ckpt"))


# --- checkpoint files: clear errors, content hash ----------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"random bytes, not a zip", "truncated"])
def test_broken_checkpoint_files_get_a_clear_error(
    run: dict, tmp_path: Path, content: bytes | str
) -> None:
    path = tmp_path / "broken.ckpt"
    good = Path(run["metrics"]["last_checkpoint"]).read_bytes()
    path.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    with pytest.raises(CheckpointError, match=rf"not a valid checkpoint: {path}: \S"):
        load_checkpoint(path)


def test_corrupted_weights_are_refused_on_every_load(
    run: dict, tmp_path: Path, cache_dir: Path
) -> None:
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    key = next(k for k in checkpoint["state_dict"] if k.endswith("weight"))
    checkpoint["state_dict"][key].view(-1)[0] += 1.0  # one bit-flip-like change, hash kept
    path = tmp_path / "corrupt.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="do not match the content hash"):
        load_checkpoint(path)
    cfg = tiny_config(tmp_path / "resume", cache_dir, "trainer.max_epochs=3", f"ckpt_path={path}")
    with pytest.raises(CheckpointError, match="do not match the content hash"):
        train(cfg)


# --- ssd-predict: skip|raise ---------------------------------------------------------------------


def test_predict_skips_an_unreadable_image_and_lists_it(run: dict, tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (96, 96), (200, 30, 30)).save(images / "good.jpg")
    (images / "bad.jpg").write_bytes(b"not an image")
    ckpt = run["metrics"]["last_checkpoint"]
    predict(ckpt, images, tmp_path / "out", draw=False)
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [s["file_name"] for s in skipped] == ["bad.jpg"] and "bad.jpg" in skipped[0]["error"]
    header = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [i["file_name"] for i in header["images"]] == ["good.jpg"]
    with pytest.raises(ImageReadError, match=r"bad\.jpg"):
        predict(ckpt, images, tmp_path / "out2", draw=False, on_bad_sample="raise")


# --- anchors in checkpoints ----------------------------------------------------------------------


def test_checkpoint_whose_boxes_differ_from_its_settings_is_refused(
    run: dict, tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    assert checkpoint["ssd"]["anchors"]["s_min"] == 0.2  # the tiny experiment's preset, ssd300
    checkpoint["ssd"]["anchors"]["s_min"] = 0.25  # settings that rebuild other boxes
    with pytest.raises(CheckpointError, match=r"map 0 \(12x12\) differs first"):
        module_from_checkpoint(load_checkpoint(resave(checkpoint, tmp_path / "boxes.ckpt")))


def test_evaluation_uses_the_loss_settings_the_weights_were_trained_with(
    run: dict, tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(run["metrics"]["last_checkpoint"])
    assert checkpoint["ssd"]["loss"] == {"neg_pos_ratio": 3.0, "alpha": 1.0, "min_negatives": 0}
    checkpoint["ssd"]["loss"]["neg_pos_ratio"] = 7.0  # as if swept
    module = module_from_checkpoint(load_checkpoint(resave(checkpoint, tmp_path / "np7.ckpt")))
    assert module.loss.neg_pos_ratio == 7.0 and module.loss.min_negatives == 0
