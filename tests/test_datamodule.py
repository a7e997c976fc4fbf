from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.data.datamodule import SSDDataModule, SSDTargetAssigner, ssd_collate
from ssd_lightning.encoder import SSDBoxCoder

SIZE = 64


def tiny_coder() -> SSDBoxCoder:
    """340 default boxes on a 64x64 input (maps 8, 4, 2, 1; ratio 2)."""
    return SSDBoxCoder(DefaultBoxes(SIZE, [8, 4, 2, 1], aspect_ratios=[[2]] * 4).cxcywh)


class TinyDataset(Dataset):
    """Sample-contract dataset: 80x120 images, two objects, every third image adds a crowd box."""

    def __init__(self, n: int = 10, same: bool = False) -> None:
        self.class_names = ["background", "cat", "dog"]
        self.label_map = {17: 1, 18: 2}
        self.n = n
        self.same = same

    def __len__(self) -> int:
        return self.n

    def summary(self) -> str:
        return f"tiny: {self.n} images"

    def __getitem__(self, index: int) -> dict:
        key = 0 if self.same else index
        rng = np.random.default_rng(key)
        image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
        boxes = [[10, 10, 50, 60], [60 + key % 5, 20, 110, 70]]
        labels = [1, 2]
        crowd = [False, False]
        if key % 3 == 0 and not self.same:
            boxes.append([0, 0, 120, 30])
            labels.append(1)
            crowd.append(True)
        n = len(labels)
        return {
            "image": image,
            "boxes": np.array(boxes, np.float32),
            "labels": np.array(labels, np.int64),
            "iscrowd": np.array(crowd),
            "difficult": np.array([key % 2 == 1] + [False] * (n - 1)),
            "image_id": 100 + index,
            "orig_size": (80, 120),
        }


def datamodule(num_workers: int = 0, **kwargs) -> SSDDataModule:
    options = {
        "train_dataset": TinyDataset(),
        "val_dataset": TinyDataset(),
        "image_size": SIZE,
        "batch_size": 4,
        "num_workers": num_workers,
    } | kwargs
    dm = SSDDataModule(**options)
    dm.set_box_coder(tiny_coder())
    return dm


def test_assigner_equals_encoder_on_same_boxes():
    coder = tiny_coder()
    boxes = np.array([[4, 8, 30, 40], [20, 20, 60, 50]], np.float32)
    labels = np.array([2, 1])
    loc, target = SSDTargetAssigner(coder)(boxes, labels, np.zeros(2, bool), (SIZE, SIZE))
    ref_loc, ref_labels = coder.encode(torch.from_numpy(boxes) / SIZE, torch.from_numpy(labels))
    torch.testing.assert_close(loc, ref_loc)
    torch.testing.assert_close(target, ref_labels)
    assert loc.shape == (len(coder), 4) and target.dtype == torch.int64 and (target > 0).any()


def test_assigner_rectangular_image_normalises_each_axis():
    coder = tiny_coder()
    boxes = np.array([[10, 5, 90, 40]], np.float32)
    loc, target = SSDTargetAssigner(coder)(boxes, np.array([1]), np.zeros(1, bool), (50, 100))
    ref = coder.encode(torch.tensor([[0.1, 0.1, 0.9, 0.8]]), torch.tensor([1]))
    torch.testing.assert_close(loc, ref[0])
    torch.testing.assert_close(target, ref[1])


def test_assigner_crowd_excluded_from_matching_and_ignored():
    coder = tiny_coder()
    boxes = np.array([[4, 4, 24, 24], [32, 0, 64, 64]], np.float32)  # object, crowd region
    crowd = np.array([False, True])
    loc, target = SSDTargetAssigner(coder)(boxes, np.array([1, 2]), crowd, (SIZE, SIZE))
    ref_loc, ref_labels = coder.encode(torch.from_numpy(boxes[:1]) / SIZE, torch.tensor([1]))
    # The crowd box never becomes a positive; the object's positives are unchanged.
    assert not (target == 2).any()
    torch.testing.assert_close(target[ref_labels > 0], ref_labels[ref_labels > 0])
    torch.testing.assert_close(loc, ref_loc)
    # Background boxes mostly inside the crowd region (right half) are ignored, the rest stay 0.
    d = coder.default_boxes.numpy()
    x0, y0 = np.clip(d[:, 0] - d[:, 2] / 2, 0, 1), np.clip(d[:, 1] - d[:, 3] / 2, 0, 1)
    x1, y1 = np.clip(d[:, 0] + d[:, 2] / 2, 0, 1), np.clip(d[:, 1] + d[:, 3] / 2, 0, 1)
    ioa = np.clip(x1 - np.maximum(x0, 0.5), 0, None) * (y1 - y0) / ((x1 - x0) * (y1 - y0))
    background = (ref_labels == 0).numpy()
    expected = np.where(background & (ioa >= 0.7 - 1e-6), -1, ref_labels.numpy())
    np.testing.assert_array_equal(target.numpy(), expected)
    assert (expected == -1).sum() > 10 and ((expected == 0) & (ioa > 0)).any()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_carry_dense_targets_and_original_ground_truth(num_workers):
    dm = datamodule(num_workers)
    dm.setup("fit")
    coder = dm.box_coder
    num_default = len(coder)
    train = next(iter(dm.train_dataloader()))
    assert train["images"].shape == (4, 3, SIZE, SIZE) and train["images"].dtype == torch.float32
    assert train["loc_targets"].shape == (4, num_default, 4)
    assert train["labels"].shape == (4, num_default) and train["labels"].dtype == torch.int16
    assert train["image_ids"].dtype == torch.int64 and train["orig_sizes"].shape == (4, 2)

    val = next(iter(dm.val_dataloader()))
    dataset = TinyDataset()
    torch.testing.assert_close(val["image_ids"], torch.tensor([100, 101, 102, 103]))
    torch.testing.assert_close(val["orig_sizes"], torch.tensor([[80, 120]] * 4))
    for i in range(4):
        sample = dataset[i]
        # Ground truth for evaluation: original pixels, difficult or crowd flagged.
        torch.testing.assert_close(val["gt_boxes"][i], torch.from_numpy(sample["boxes"]))
        torch.testing.assert_close(val["gt_labels"][i], torch.from_numpy(sample["labels"]))
        flagged = sample["difficult"] | sample["iscrowd"]
        torch.testing.assert_close(val["gt_difficult"][i], torch.from_numpy(flagged))
        # Dense targets: the encoder on the resized boxes (crowd ignored, not matched).
        objects = ~sample["iscrowd"]
        scaled = torch.from_numpy(sample["boxes"][objects]) / torch.tensor([120.0, 80.0] * 2)
        loc, labels = coder.encode(scaled, torch.from_numpy(sample["labels"][objects]))
        torch.testing.assert_close(val["loc_targets"][i], loc, atol=1e-4, rtol=1e-4)
        positives = labels > 0
        torch.testing.assert_close(val["labels"][i][positives].long(), labels[positives])
        assert (val["labels"][i] == -1).any() == bool(sample["iscrowd"].any())


def _first_images(dm: SSDDataModule, count: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    images = []
    for batch in loader:
        images.append(batch["images"][0])
        if len(images) == count:
            break
    return images


def test_workers_draw_different_and_reproducible_augmentations():
    # Every index holds the same sample: batch k comes from worker k % 2.
    dm = datamodule(2, train_dataset=TinyDataset(8, same=True), batch_size=1)
    dm.persistent_workers = False
    torch.manual_seed(0)
    first = _first_images(dm, 4)
    assert not torch.equal(first[0], first[1]), "workers 0 and 1 drew the same augmentation"
    torch.manual_seed(0)
    again = _first_images(dm, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_setup_requires_box_coder():
    dm = SSDDataModule(TinyDataset(), None, image_size=SIZE)
    with pytest.raises(RuntimeError, match="set_box_coder"):
        dm.setup("fit")


def test_class_names_and_label_map_come_from_the_dataset():
    dm = SSDDataModule(None, TinyDataset(), image_size=SIZE)
    assert dm.class_names == ["background", "cat", "dog"]
    assert dm.num_classes == 3 and dm.label_map == {17: 1, 18: 2}
    with pytest.raises(ValueError):
        SSDDataModule(None, None)


def test_distributed_eval_covers_every_image_once():
    seen = []
    for rank in range(3):
        dm = datamodule(val_dataset=TinyDataset(10), batch_size=2)
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, is_global_zero=rank == 0)
        loader = dm.val_dataloader()
        # A DistributedSampler subclass: Lightning keeps it instead of a padding sampler.
        assert isinstance(loader.sampler, DistributedSampler)
        seen += [int(i) for batch in loader for i in batch["image_ids"]]
    assert sorted(seen) == list(range(100, 110))


def test_single_process_eval_is_sequential():
    dm = datamodule(val_dataset=TinyDataset(5), batch_size=2)
    ids = [int(i) for batch in dm.val_dataloader() for i in batch["image_ids"]]
    assert ids == [100, 101, 102, 103, 104]


def test_collate_handles_images_without_objects():
    coder = tiny_coder()
    sample = {
        "image": torch.zeros(3, SIZE, SIZE),
        "loc_targets": torch.zeros(len(coder), 4),
        "labels": torch.zeros(len(coder), dtype=torch.int64),
        "gt_boxes": torch.zeros(0, 4),
        "gt_labels": torch.zeros(0, dtype=torch.int64),
        "gt_difficult": torch.zeros(0, dtype=torch.bool),
        "image_id": 5,
        "orig_size": (10, 20),
    }
    batch = ssd_collate([sample, sample])
    assert batch["images"].shape == (2, 3, SIZE, SIZE) and len(batch["gt_boxes"]) == 2
    assert batch["orig_sizes"].tolist() == [[10, 20], [10, 20]]


def test_bccd_validation_batch(bccd_root):
    from ssd_lightning.data import VOCDataset

    val = VOCDataset(
        bccd_root,
        ["RBC", "WBC", "Platelets"],
        split="val",
        keep_difficult=True,
        image_dir="images",
        annotation_dir="annotations",
        split_dir="splits",
    )
    dm = SSDDataModule(None, val, image_size=300, batch_size=2, num_workers=0)
    dm.set_box_coder(SSDBoxCoder(DefaultBoxes(300, [38, 19, 10, 5, 3, 1]).cxcywh))
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (2, 3, 300, 300) and batch["labels"].shape == (2, 8732)
    assert batch["orig_sizes"].tolist() == [[480, 640], [480, 640]]
    for i in range(2):
        torch.testing.assert_close(batch["gt_boxes"][i], torch.from_numpy(val[i]["boxes"]))
        assert (batch["labels"][i] > 0).sum() >= len(batch["gt_boxes"][i])


def test_auto_workers_are_the_job_cpus_per_local_device_less_one(monkeypatch):
    from types import SimpleNamespace

    import lightning.fabric.utilities.data as fabric_data

    monkeypatch.setattr(
        fabric_data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False
    )
    dm = SSDDataModule(TinyDataset(), None, image_size=SIZE, num_workers="auto")
    assert dm.workers_per_loader() == 15  # no trainer yet: one device
    dm.trainer = SimpleNamespace(num_devices=4)
    assert dm.workers_per_loader() == 3
    assert (
        SSDDataModule(TinyDataset(), None, image_size=SIZE, num_workers=2).workers_per_loader() == 2
    )
