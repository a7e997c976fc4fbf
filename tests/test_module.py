"""SSDModule: anchors from the measured network, coder check, loss normalisation, skipping
non-finite steps, optimiser set-up."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.data.datamodule import ssd_collate
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.models import SSD, VGG16Features
from ssd_lightning.models.layers import ExtraSpec
from ssd_lightning.module import BoxCoderMismatchError, NonFiniteLossError, SSDModule
from ssd_lightning.optim import warmup_multistep

ANCHORS = {"aspect_ratios": [[2], [2, 3], [2, 3], [2]], "s_min": 0.2, "s_max": 0.9}
SIZE = 96


def tiny_net(num_classes: int = 3, batch_norm: bool = True) -> SSD:
    torch.manual_seed(0)
    backbone = VGG16Features(
        [ExtraSpec(32, 64), ExtraSpec(32, 64, stride=1, padding=0)], 0.125, batch_norm
    )
    return SSD(backbone, num_classes, [4, 6, 6, 4])


def make_module(net: nn.Module | None = None, **kwargs) -> SSDModule:
    args = {
        "loss": MultiBoxLoss(),
        "optimizer": functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        "anchors": ANCHORS,
        "image_size": SIZE,
        "class_names": ["a", "b"],
        **kwargs,
    }
    return SSDModule(net=net or tiny_net(), **args)


class BoxesDataset(Dataset):
    """Images with one bright square each, encoded with the module's coder (batch contract)."""

    def __init__(self, coder: SSDBoxCoder, n: int = 8) -> None:
        self.coder, self.n = coder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x0, y0 = torch.randint(0, 48, (2,), generator=g).tolist()
        image = torch.zeros(3, SIZE, SIZE)
        image[:, y0 : y0 + 40, x0 : x0 + 40] = 1.0
        box = torch.tensor([[x0, y0, x0 + 40, y0 + 40]], dtype=torch.float32)
        label = torch.tensor([1 + i % 2])
        loc, labels = self.coder.encode(box / SIZE, label)
        return {  # an SSDTargetDataset sample, for the DataModule's ssd_collate
            "image": image,
            "loc_targets": loc,
            "labels": labels,
            "gt_boxes": box,
            "gt_labels": label,
            "gt_difficult": torch.zeros(1, dtype=torch.bool),
            "image_id": i,
            "orig_size": (SIZE, SIZE),
        }


class BoxesDataModule(L.LightningDataModule):
    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.n = n
        self.box_coder: SSDBoxCoder | None = None
        self.class_names = ["background", "a", "b"]

    def set_box_coder(self, coder: SSDBoxCoder) -> None:
        self.box_coder = coder

    def train_dataloader(self) -> DataLoader:
        dataset = BoxesDataset(self.box_coder, self.n)
        return DataLoader(dataset, batch_size=4, collate_fn=ssd_collate)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def fit(
    module: SSDModule, steps: int, datamodule: BoxesDataModule | None = None, **trainer_args
) -> L.Trainer:
    datamodule = datamodule or BoxesDataModule()
    if datamodule.box_coder is None:
        datamodule.set_box_coder(module.box_coder)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_default_boxes_come_from_the_measured_network() -> None:
    module = make_module()
    expected = DefaultBoxes(SIZE, [(12, 12), (6, 6), (3, 3), (1, 1)], **ANCHORS)
    assert torch.equal(module.default_boxes, expected.cxcywh)
    assert module.anchor_settings["feature_maps"] == [[12, 12], [6, 6], [3, 3], [1, 1]]
    loc, _ = module(torch.zeros(2, 3, SIZE, SIZE))
    assert loc.shape[1] == len(expected) == 12 * 12 * 4 + 36 * 6 + 9 * 6 + 4
    # one copy: the coder's buffer, saved in checkpoints and shared by the post-processing
    assert [k for k in module.state_dict() if "default_boxes" in k] == ["box_coder.default_boxes"]
    assert module.postprocess.box_coder is module.box_coder
    moved = module.to("meta")  # moves with the module: no hook copies it by hand
    assert moved.box_coder.default_boxes.is_meta and moved.box_coder.offset.is_meta


def test_other_image_size_changes_anchors_with_the_network() -> None:
    module = make_module(image_size=128)
    assert module.anchor_settings["feature_maps"] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    loc, _ = module(torch.zeros(1, 3, 128, 128))
    assert loc.shape[1] == len(module.default_boxes)


def test_datamodule_with_other_default_boxes_is_refused() -> None:
    module = make_module()
    datamodule = BoxesDataModule()
    other = DefaultBoxes(SIZE, [(12, 12), (6, 6), (3, 3), (1, 1)], **{**ANCHORS, "s_min": 0.1})
    datamodule.set_box_coder(SSDBoxCoder(other.cxcywh))
    with pytest.raises(BoxCoderMismatchError, match="s_min"):
        fit(module, 1, datamodule)
    module.check_box_coder(SSDBoxCoder(module.default_boxes.clone()))  # identical: accepted
    with pytest.raises(BoxCoderMismatchError, match="iou_threshold"):
        module.check_box_coder(SSDBoxCoder(module.default_boxes.clone(), iou_threshold=0.4))


def test_loss_is_normalised_by_the_positive_count() -> None:
    module = make_module()
    batch = ssd_collate([BoxesDataset(module.box_coder)[i] for i in range(4)])
    losses, nonfinite = module._losses(batch)
    loc, logits = module(batch["images"])
    reference = MultiBoxLoss()(loc, logits, batch["loc_targets"], batch["labels"])
    assert not nonfinite
    for key in ("loss", "loss_box", "loss_cls"):
        torch.testing.assert_close(losses[key], reference[key])


def test_class_names_from_datamodule_drop_background() -> None:
    module = make_module(class_names=None)
    fit(module, 1)
    assert module.class_names == ["a", "b"]


class NaNAfter(nn.Module):
    """Wraps a network; outputs NaN on the calls listed in ``bad``."""

    def __init__(self, net: SSD, bad: set[int]) -> None:
        super().__init__()
        self.net, self.bad, self.calls = net, bad, 0

    def feature_map_sizes(self, size):
        return self.net.feature_map_sizes(size)

    def forward(self, images):
        loc, logits = self.net(images)
        self.calls += 1
        if self.calls in self.bad:
            loc = loc * float("nan")
        return loc, logits


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_steps_are_skipped_and_counted(fused: bool) -> None:
    """Fused optimisers skip on the device (found_inf); others are asked on the host."""
    net = NaNAfter(tiny_net(), bad={2, 3})
    optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, fused=fused)
    module = make_module(net, optimizer=optimizer)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            params = pl_module.net.parameters()
            snapshots.append(torch.cat([p.detach().flatten() for p in params]))

    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Snapshot()], log_every_n_steps=2,
    )  # fmt: skip
    datamodule = BoxesDataModule(n=24)
    datamodule.set_box_coder(module.box_coder)
    with pytest.warns(UserWarning, match="non-finite loss"):
        trainer.fit(module, datamodule=datamodule)
    assert module._skip_on_device == fused
    assert module.nonfinite_steps == 2 and module._nonfinite.tolist()[1] == 0  # none in a row now
    # Batches 2 and 3 (calls 2, 3) were skipped: no update between their starts and the next.
    assert torch.equal(snapshots[1], snapshots[2]) and torch.equal(snapshots[2], snapshots[3])
    assert not torch.equal(snapshots[0], snapshots[1])
    assert not torch.equal(snapshots[3], snapshots[4])
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2


def test_too_many_non_finite_steps_in_a_row_stop_training() -> None:
    module = make_module(NaNAfter(tiny_net(), bad=set(range(3, 100))), max_nonfinite_steps=4)
    with (
        pytest.raises(NonFiniteLossError, match="4 non-finite losses in a row"),
        pytest.warns(UserWarning),
    ):
        fit(module, 20, BoxesDataModule(n=64))


def test_optimizer_groups_lr_scaling_and_step_schedule() -> None:
    module = make_module(
        scheduler=functools.partial(warmup_multistep, milestones=(0.5,), warmup_epochs=0),
        batch_size=4,
        base_batch_size=2,
    )
    trainer = fit(module, 4)
    optimizer = trainer.optimizers[0]
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    # lr 0.01 x (4 images x 1 process / 2), then x0.1 at step 2 of 4 (stepped every step).
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(0.02)


def test_channels_last_trains_on_cpu() -> None:
    module = make_module(tiny_net(batch_norm=True), channels_last=True)
    fit(module, 2)
    assert module.net.backbone.conv4_3[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_mixed_precision_trains_on_cpu() -> None:
    module = make_module()
    before = [p.detach().clone() for p in module.net.parameters()]
    fit(module, 2, precision="bf16-mixed")
    after = list(module.net.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert module.nonfinite_steps == 0


def test_detect_returns_boxes_in_original_pixels() -> None:
    module = make_module().eval()
    detections = module.detect(torch.zeros(2, 3, SIZE, SIZE), torch.tensor([[480, 640], [96, 96]]))
    assert len(detections) == 2
    boxes = detections[0]["boxes"]
    assert (
        boxes.shape[1] == 4 and float(boxes[:, 2].max()) <= 640 and float(boxes[:, 3].max()) <= 480
    )


@pytest.mark.slow
def test_compile_trains_on_cpu() -> None:
    module = make_module(tiny_net(batch_norm=True), compile=True)
    fit(module, 2)
    assert module._compiled
    assert set(module.state_dict()) == set(make_module(tiny_net(batch_norm=True)).state_dict())
