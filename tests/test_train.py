"""End-to-end training runs on the tiny experiment: outputs, resume, evaluation, CLI, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_config
from ssd_lightning.config import MissingSettingError, compose_config
from ssd_lightning.evaluate import evaluate, load_checkpoint, module_from_checkpoint
from ssd_lightning.train import train

REPO = Path(__file__).resolve().parents[1]


class StopAfterEpoch(Callback):
    """Ends fit after ``epoch`` as if the process had been killed during the next epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, cache_dir, "trainer.max_epochs=2")
    return out, cfg, train(cfg)


def test_run_writes_metrics_checkpoints_and_tensorboard(two_epoch_run) -> None:
    out, _, metrics = two_epoch_run
    for key in ("val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_small", "val/mAP_voc07"):
        assert 0.0 <= metrics[key] <= 1.0 or metrics[key] == -1.0
    assert set(json.loads((out / "metrics.json").read_text())) == set(metrics)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(p.startswith("best-") for p in checkpoints)
    assert Path(metrics["best_checkpoint"]).is_file()
    assert 0 < metrics["train_time_s"] < 600

    tags: dict[str, list[str]] = {"scalars": [], "images": []}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind in tags:
            tags[kind] += acc.Tags()[kind]
    expected = {"train/loss", "train/loss_box", "train/loss_cls", "train/images_per_sec",
                "lr/decay", "val/mAP", "val/mAP_50", "val/AP/circle", "hp/mAP"}  # fmt: skip
    assert expected <= set(tags["scalars"])
    assert "val/predictions" in tags["images"]


def test_checkpoint_is_plain_and_carries_anchors_and_classes(two_epoch_run) -> None:
    _, _, metrics = two_epoch_run
    checkpoint = load_checkpoint(metrics["last_checkpoint"])  # weights_only=True
    meta = checkpoint["ssd"]
    assert meta["class_names"] == ["circle", "square", "triangle", "ellipse", "star"]
    assert meta["anchors"]["feature_maps"] == [[12, 12], [6, 6], [3, 3], [1, 1]]
    assert checkpoint["hyper_parameters"]["net_config"]["_target_"] == "ssd_lightning.models.SSD"
    module = module_from_checkpoint(checkpoint)
    assert torch.equal(module.default_boxes, checkpoint["state_dict"]["box_coder.default_boxes"])


def test_evaluate_reproduces_final_validation(two_epoch_run, capsys) -> None:
    out, cfg, metrics = two_epoch_run
    cfg = tiny_config(
        out, Path(cfg.paths.cache_dir), f"ckpt_path={metrics['last_checkpoint']}", name="eval"
    )
    results = evaluate(cfg)
    for key in ("mAP", "mAP_50", "mAP_voc07", "AP/star"):
        assert results[key] == pytest.approx(metrics[f"val/{key}"], abs=1e-6)
    printed = capsys.readouterr().out
    assert "COCO AP50" in printed and "VOC07 mAP" in printed and "star" in printed
    assert json.loads(Path(cfg.output_json).read_text())["mAP"] == pytest.approx(results["mAP"])


def test_resumed_run_matches_uninterrupted_run(two_epoch_run, tmp_path, cache_dir) -> None:
    _, _, uninterrupted = two_epoch_run
    first = tiny_config(tmp_path / "a", cache_dir, "trainer.max_epochs=2")
    train(first, extra_callbacks=[StopAfterEpoch(0)])  # "killed" after epoch 0
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed_cfg = tiny_config(
        tmp_path / "b", cache_dir, "trainer.max_epochs=2", f"ckpt_path={last}"
    )
    resumed = train(resumed_cfg)
    for key in ("val/mAP", "val/mAP_50", "val/loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-4, abs=1e-6), key
    a = load_checkpoint(uninterrupted["last_checkpoint"])
    b = load_checkpoint(resumed["last_checkpoint"])
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-4, atol=1e-5)


def test_required_data_root_is_reported(tmp_path) -> None:
    cfg = compose_config(["experiment=bccd"], output_dir=tmp_path)
    with pytest.raises(MissingSettingError, match=r"data\.root="):
        train(cfg)


def test_bccd_real_data_fast_dev_run(bccd_root, tmp_path, cache_dir) -> None:
    cfg = compose_config(
        [
            "experiment=bccd",
            f"data.root={bccd_root}",
            "data.batch_size=2",
            "data.num_workers=0",
            "+trainer.fast_dev_run=true",
            "trainer.enable_progress_bar=false",
        ],
        output_dir=tmp_path,
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/mAP_50"] <= 1.0


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "ssd_lightning.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_multirun_sweeps_anchors_and_loss(tmp_path, cache_dir) -> None:
    result = _run_cli(
        [
            "-m",
            "experiment=tiny",
            "anchors.s_min=0.1,0.2",
            "loss.neg_pos_ratio=3",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.cache_dir={cache_dir}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "logs" / "tiny" / "multiruns").glob("*/*/metrics.json"))
    assert len(jobs) == 2
    s_min = {
        (job.parent / ".hydra" / "overrides.yaml").read_text().split("anchors.s_min=")[1][:3]
        for job in jobs
    }
    assert s_min == {"0.1", "0.2"}
    assert result.stdout.count("validation mAP") == 2


@pytest.mark.slow
def test_overfits_a_small_batch(tmp_path, cache_dir) -> None:
    """Trained and validated on the same 8 images without augmentation: mAP_50 > 0.9."""
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "data.shapes.num_train=8",
        "data.datamodule.val_dataset.split=train",
        "data/augment=none",
        "optim.optimizer.lr=0.02",
        "optim.optimizer.weight_decay=0",
        "trainer.max_epochs=300",
        "trainer.check_val_every_n_epoch=100",
        "logger=none",
        "callbacks=none",
    )
    metrics = train(cfg)
    assert metrics["val/mAP_50"] > 0.9
