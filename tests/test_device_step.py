"""The GPU-shaped step on the CPU: assignment on the device equals the per-image assignment of
the workers, the training step makes no host sync between checks, the loss compiles whole."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.data import COCODataset, VOCDataset
from ssd_lightning.data.datamodule import SSDDataModule, SSDTargetAssigner, ssd_collate
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.models.layers import L2Norm
from test_module import BoxesDataModule, make_module, tiny_net

SSD300_MAPS = [38, 19, 10, 5, 3, 1]
BCCD = ["RBC", "WBC", "Platelets"]


def coder_300() -> SSDBoxCoder:
    return SSDBoxCoder(DefaultBoxes(300, SSD300_MAPS, first_scale=0.07, s_min=0.15,
                                    s_extra="step", integer_percent=True,
                                    steps="power_of_two").cxcywh)  # fmt: skip


def per_image(coder: SSDBoxCoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the workers compute: the assigner image by image (sparse CPU matching)."""
    assigner = SSDTargetAssigner(coder)
    locs, labels = [], []
    for i in range(len(batch["boxes"])):
        n = int(batch["box_valid"][i].sum())
        pixels = batch["boxes"][i, :n].numpy() * 300
        crowd = batch.get("box_crowd", torch.zeros_like(batch["box_valid"]))[i, :n]
        loc, label = assigner(pixels, batch["box_labels"][i, :n].numpy(),
                              crowd.numpy(), (300, 300))  # fmt: skip
        locs.append(loc)
        labels.append(label)
    return torch.stack(locs), torch.stack(labels)


def assert_same_targets(coder: SSDBoxCoder, batch: dict) -> None:
    loc, labels = coder.encode_batch(
        batch["boxes"], batch["box_labels"], batch["box_valid"], batch.get("box_crowd"), dense=True
    )
    ref_loc, ref_labels = per_image(coder, batch)
    assert torch.equal(labels, ref_labels)
    # Same matches; the offsets of a box normalised by 300 and back differ by float rounding.
    torch.testing.assert_close(loc, ref_loc, atol=2e-5, rtol=1e-5)


def test_batch_assignment_equals_per_image_on_random_batches() -> None:
    coder = coder_300()
    gen = torch.Generator().manual_seed(0)
    batch_size, slots = 6, 12
    wh = 0.02 + 0.6 * torch.rand(batch_size, slots, 2, generator=gen)
    xy = torch.rand(batch_size, slots, 2, generator=gen) * (1 - wh)
    counts = torch.tensor([12, 0, 3, 7, 1, 12])  # padding, an empty image
    batch = {
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "box_labels": torch.randint(1, 5, (batch_size, slots), generator=gen),
        "box_crowd": torch.rand(batch_size, slots, generator=gen) < 0.15,
        "box_valid": torch.arange(slots)[None] < counts[:, None],
    }
    assert_same_targets(coder, batch)


def real_batch(dataset, count: int = 16) -> dict:
    """GT of real images resized to 300x300 (eval transform), padded as the device path sends."""
    dm = SSDDataModule(None, dataset, image_size=300, batch_size=count, num_workers=0,
                       assign_on="device")  # fmt: skip
    dm.set_box_coder(coder_300())
    return next(iter(dm.val_dataloader()))


def test_batch_assignment_equals_per_image_on_bccd(bccd_root: Path) -> None:
    dataset = VOCDataset(bccd_root, BCCD, split="val", image_dir="images",
                         annotation_dir="annotations", split_dir="splits")  # fmt: skip
    batch = real_batch(dataset)
    assert batch["images"].dtype == torch.uint8 and batch["box_valid"].sum() > 100
    assert_same_targets(coder_300(), batch)


def test_batch_assignment_equals_per_image_on_coco128_with_crowds(coco128_root: Path) -> None:
    annotations = next(coco128_root.rglob("*.json"))
    images = next(p for p in coco128_root.rglob("*") if p.is_dir() and any(p.glob("*.jpg")))
    batch = real_batch(COCODataset(annotations, images), count=64)
    assert batch["box_valid"].sum() > 300
    assert batch["box_crowd"].any()  # the crowd flags reach the device when there are any
    assert_same_targets(coder_300(), batch)


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_batches_normalise_and_assign_like_the_workers(channels_last: bool) -> None:
    from test_datamodule import TinyDataset, tiny_coder

    module = make_module(channels_last=channels_last)
    coder = tiny_coder()
    batches = {}
    for where in ("worker", "device"):
        dm = SSDDataModule(TinyDataset(), TinyDataset(), image_size=64, batch_size=4,
                           num_workers=0, assign_on=where)  # fmt: skip
        dm.set_box_coder(coder)
        batches[where] = next(iter(dm.val_dataloader()))
    worker, device = batches["worker"], batches["device"]
    assert set(device) - set(worker) == {"boxes", "box_labels", "box_crowd", "box_valid"}
    assert device["images"].dtype == torch.uint8  # a quarter of the bytes
    module.box_coder = coder  # the datamodule's boxes, not the tiny network's
    moved = module.on_after_batch_transfer(device, 0)
    torch.testing.assert_close(moved["images"], worker["images"], atol=2e-6, rtol=0)
    assert moved["images"].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    assert torch.equal(moved["labels"], worker["labels"].long())
    torch.testing.assert_close(moved["loc_targets"], worker["loc_targets"], atol=2e-5, rtol=1e-5)


def test_training_batches_carry_no_evaluation_lists() -> None:
    from test_datamodule import datamodule

    train = next(iter(datamodule().train_dataloader()))
    assert not {"gt_boxes", "gt_labels", "gt_difficult"} & set(train)
    assert ssd_collate([None, None]) is None


# --- no host syncs ------------------------------------------------------------------------------


class SyncCounter:
    """Counts the calls that make the host wait for the device while ``active``."""

    METHODS = ("item", "tolist", "cpu", "__bool__", "nonzero", "__int__", "__float__")

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.active = False

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch):
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        getitem = torch.Tensor.__getitem__

        def masked(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._count("boolean-mask indexing")
            return getitem(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", masked)
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))
        yield self

    def _wrap(self, name, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self._count(name)
            return original(*args, **kwargs)

        return counted

    def _count(self, name: str) -> None:
        if self.active:
            self.calls[name] += 1


class CountTrainingBatches(L.Callback):
    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counter.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counter.active = False


def test_training_steps_make_one_host_sync_per_log_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forward, loss, backward and the fused optimiser step of 8 batches with
    log_every_n_steps=4: the only host syncs are the two checks of the non-finite count."""
    optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, fused=True)
    # The GPU's way of computing the loss (fixed shapes), on the CPU.
    module = make_module(tiny_net(), optimizer=optimizer, loss=MultiBoxLoss(fixed_shapes=True))
    datamodule = BoxesDataModule(n=32)
    datamodule.set_box_coder(module.box_coder)
    counter = SyncCounter()
    trainer = L.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        log_every_n_steps=4, callbacks=[CountTrainingBatches(counter)],
    )  # fmt: skip
    with counter.installed(monkeypatch):
        trainer.fit(module, datamodule=datamodule)
    assert module._skip_on_device
    assert dict(counter.calls) == {"tolist": 2}, dict(counter.calls)


def test_loss_compiles_as_one_graph() -> None:
    loss = MultiBoxLoss(neg_pos_ratio=3.0, min_negatives=2, fixed_shapes=True)
    gen = torch.Generator().manual_seed(0)
    loc, targets = torch.randn(2, 50, 4, generator=gen), torch.randn(2, 50, 4, generator=gen)
    logits = torch.randn(2, 50, 5, generator=gen)
    labels = torch.randint(-1, 5, (2, 50), generator=gen)
    labels[1] = 0  # an image without positives
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    want, got = loss(loc, logits, targets, labels), compiled(loc, logits, targets, labels)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_l2norm_keeps_the_input_dtype_under_autocast() -> None:
    norm = L2Norm(8)
    x = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    reference = 20 * torch.nn.functional.normalize(x.bfloat16().float(), dim=1)
    torch.testing.assert_close(out.float(), reference, atol=0.2, rtol=0.02)
    np.testing.assert_allclose(norm(x).norm(dim=1).detach().numpy(), 20.0, rtol=1e-5)


def test_progress_bar_reads_the_losses_once_per_log_interval(tmp_path: Path) -> None:
    from conftest import tiny_config
    from ssd_lightning.train import build_trainer

    cfg = tiny_config(
        tmp_path, tmp_path / "cache", "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=7",
    )  # fmt: skip
    assert build_trainer(cfg).progress_bar_callback.refresh_rate == 7
