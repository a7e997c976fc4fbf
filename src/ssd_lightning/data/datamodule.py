"""SSD DataModule: augmentation in the DataLoader workers, GT assignment there or on the device.

Each sample is decoded and augmented (``data.transforms``) in the workers. The GT-to-default-box
assignment (``SSDBoxCoder``, SSD paper Sec. 2.2 "Matching strategy") runs where ``assign_on``
says:

- ``"worker"`` (the CPU default): per image in the workers, images normalised there; a batch
  carries dense targets.
- ``"device"`` (the GPU default): workers send uint8 images and the padded GT boxes;
  ``SSDModule.on_after_batch_transfer`` normalises the images and assigns the whole batch on
  the device (``SSDBoxCoder.encode_batch``, the same matches). Batches are ~4x smaller and
  the workers do no matching.

Batch (dict):
    - ``images``: (B, 3, H, W) float32 normalised (worker) or uint8 (device).
    - ``loc_targets``: (B, A, 4) float32 encoded offsets (zero on background), and ``labels``:
      (B, A) int16 default-box classes, 0 background, -1 ignore (crowd regions) (worker); or
      ``boxes`` (B, G, 4) float32 normalised xyxy, ``box_labels`` (B, G) int64, ``box_crowd``
      and ``box_valid`` (B, G) bool, G the most boxes of an image of the batch (device).
    - Validation and test only: ``gt_boxes``: list of (n_i, 4) float32 xyxy pixels in the
      ORIGINAL image (before any transform), ``gt_labels``: list of (n_i,) int64,
      ``gt_difficult``: list of (n_i,) bool (difficult or crowd: ignored by evaluation).
    - ``image_ids``: (B,) int64; ``orig_sizes``: (B, 2) int64 (height, width).

DDP: Lightning injects a DistributedSampler for training. For validation and test it would
inject one too, and that sampler pads the last rank by repeating images, which double-counts
them in mAP. When the trainer runs several processes (``trainer.world_size > 1``), val/test
loaders therefore carry Lightning's ``UnrepeatedDistributedSampler`` (indices
``rank::world_size``, no padding); being a DistributedSampler subclass, Lightning leaves it in
place under the default ``use_distributed_sampler=True``. Ranks may then run one batch fewer
than others: evaluation must sync once per epoch, never per step.

Workers: ``num_workers="auto"`` gives each device's loader the CPUs of the job (its CPU
affinity, e.g. SLURM's cpus-per-task) divided by the local devices, less one for the main
process; every worker runs OpenCV single-threaded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ssd_lightning.data.transforms import (
    DetectionTransform,
    build_eval_transform,
    build_train_transform,
)
from ssd_lightning.encoder import SSDBoxCoder

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSDTargetAssigner:
    """Dense SSD targets for one transformed sample (``SSDBoxCoder.encode_batch`` of one image).

    Crowd boxes (COCO ``iscrowd``) take no part in matching; background boxes mostly inside a
    crowd region are labelled -1 (ignore), see ``SSDBoxCoder.encode_batch``.

    Args:
        box_coder: the encoder built from the model's default boxes (a CPU copy).
    """

    def __init__(self, box_coder: SSDBoxCoder) -> None:
        self.box_coder = box_coder

    def __call__(
        self,
        boxes: np.ndarray,
        labels: np.ndarray,
        iscrowd: np.ndarray,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Encode the boxes of one image.

        Args:
            boxes: xyxy pixels of the (transformed) image.
            labels: classes 1..C-1.
            iscrowd: crowd flags.
            image_size: (height, width) of the image the boxes refer to.

        Shape:
            boxes: (n, 4); labels: (n,); iscrowd: (n,) bool.
            Returns loc_targets (A, 4) float32 and labels (A,) int64.
        """
        normalised, labels_t, crowd = gt_tensors(boxes, labels, iscrowd, image_size)
        valid = torch.ones(1, len(labels_t), dtype=torch.bool)
        loc, target = self.box_coder.encode_batch(
            normalised[None], labels_t[None], valid, crowd[None] if crowd.any() else None
        )
        return loc[0], target[0]


def gt_tensors(
    boxes: np.ndarray, labels: np.ndarray, iscrowd: np.ndarray, image_size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes normalised by the image size, labels and crowd flags of one image, as tensors.

    Shape:
        -> (n, 4) float32 xyxy in [0, 1], (n,) int64, (n,) bool
    """
    h, w = image_size
    normalised = np.asarray(boxes, np.float32).reshape(-1, 4) / np.float32((w, h, w, h))
    return (
        torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32)),
        torch.from_numpy(np.asarray(labels, np.int64).reshape(-1)),
        torch.from_numpy(np.asarray(iscrowd, dtype=bool).reshape(-1)),
    )


class SSDTargetDataset(Dataset):
    """Wraps a sample-contract dataset: transform, then targets or GT boxes, plus the original GT.

    Args:
        dataset: returns sample-contract dicts (see ``ssd_lightning.data.dataset``).
        transform: augmentation or eval transform.
        assigner: GT-to-default-box assignment in the worker, or None to send the GT boxes
            for assignment on the device.
        drop_bad: a sample that cannot be read becomes None (dropped by ``ssd_collate``)
            instead of being replaced by another one (evaluation: no image scored twice).
            Needs a dataset with ``get(index, substitute)`` (``DetectionDataset``).
        keep_gt: add the original-pixel GT for evaluation (validation and test).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: DetectionTransform,
        assigner: SSDTargetAssigner | None,
        drop_bad: bool = False,
        keep_gt: bool = True,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.assigner = assigner
        self.drop_bad = drop_bad and hasattr(dataset, "get")
        self.keep_gt = keep_gt

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.dataset.get(index, substitute=False) if self.drop_bad else self.dataset[index]
        if sample is None:
            return None
        item: dict[str, Any] = {
            "image_id": int(sample["image_id"]),
            "orig_size": tuple(int(v) for v in sample["orig_size"]),
        }
        if self.keep_gt:  # original GT for evaluation, copied before the transform runs
            item.update(_original_gt(sample))
        out = self.transform(sample)
        image = out["image"]
        size = (image.shape[-2], image.shape[-1])
        item["image"] = image
        if self.assigner is not None:
            loc, labels = self.assigner(out["boxes"], out["labels"], out["iscrowd"], size)
            item.update(loc_targets=loc, labels=labels.to(torch.int16))  # lean: -1..C-1
        else:
            boxes, labels, crowd = gt_tensors(out["boxes"], out["labels"], out["iscrowd"], size)
            item.update(boxes=boxes, box_labels=labels, box_crowd=crowd)
        return item


def _original_gt(sample: Mapping[str, Any]) -> dict[str, Tensor]:
    n = len(sample["boxes"])
    ignored = np.zeros(n, bool)
    for flag in ("difficult", "iscrowd"):
        if flag in sample:
            ignored |= np.asarray(sample[flag], dtype=bool).reshape(n)
    return {
        "gt_boxes": torch.from_numpy(np.array(sample["boxes"], dtype=np.float32).reshape(n, 4)),
        "gt_labels": torch.from_numpy(np.array(sample["labels"], dtype=np.int64).reshape(n)),
        "gt_difficult": torch.from_numpy(ignored),
    }


def ssd_collate(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Stack ``SSDTargetDataset`` samples into the batch dict (see the module docstring).

    Dropped samples (None) are left out; a batch of only dropped samples is None.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    first = samples[0]
    batch: dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
    }
    if "loc_targets" in first:
        batch["loc_targets"] = torch.stack([s["loc_targets"] for s in samples])
        batch["labels"] = torch.stack([s["labels"] for s in samples])
    if "boxes" in first:  # padded to the most boxes of an image of the batch
        for key in ("boxes", "box_labels", "box_crowd"):
            batch[key] = pad_sequence([s[key] for s in samples], batch_first=True)
        if not batch["box_crowd"].any():  # decided here, on the CPU: no crowd work on the GPU
            del batch["box_crowd"]
        counts = torch.tensor([len(s["box_labels"]) for s in samples])
        batch["box_valid"] = torch.arange(batch["boxes"].shape[1])[None] < counts[:, None]
    for key in ("gt_boxes", "gt_labels", "gt_difficult"):
        if key in first:
            batch[key] = [s[key] for s in samples]
    return batch


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: Lightning's worker seeding plus the augmentation's own.

    albumentations keeps its own generators, copied unchanged into every forked worker; they
    are reseeded here from the worker's torch seed (base seed + worker id, drawn from the
    main process generator, so ``seed_everything`` makes it reproducible) and the global rank.
    """
    pl_worker_init_function(worker_id, rank=rank)
    info = get_worker_info()
    if info is None:
        return
    seed = np.random.SeedSequence([info.seed, rank]).generate_state(1)[0]
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, DetectionTransform):
        transform.set_random_seed(int(seed))


class SSDDataModule(LightningDataModule):
    """Train / val / test loaders with SSD augmentation and dense targets.

    ``set_box_coder`` must be called (by the training code, with the coder built from the
    model's real feature maps) before ``setup``; the module compares ``datamodule.box_coder``
    with its own.

    Args:
        train_dataset: sample-contract dataset for training, or None.
        val_dataset: sample-contract dataset for validation, or None.
        test_dataset: sample-contract dataset for testing, or None.
        image_size: model input size, int or (h, w).
        mean: RGB normalisation mean in 0-1 units (the backbone's).
        std: RGB normalisation std in 0-1 units.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes per device, or ``"auto"`` (the job's CPUs
            divided by the local devices, less one).
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        augment: keyword arguments of ``build_train_transform``.
        seed: augmentation seed when loading in the main process (num_workers=0).
        assign_on: ``"worker"`` or ``"device"`` (see the module docstring).
    """

    def __init__(
        self,
        train_dataset: Dataset | None,
        val_dataset: Dataset | None,
        test_dataset: Dataset | None = None,
        image_size: int | Sequence[int] = 300,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 32,
        num_workers: int | Literal["auto"] = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        assign_on: Literal["worker", "device"] = "worker",
    ) -> None:
        super().__init__()
        if assign_on not in ("worker", "device"):
            raise ValueError(f"assign_on must be 'worker' or 'device', got {assign_on!r}")
        if num_workers != "auto" and int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0 or 'auto', got {num_workers!r}")
        if train_dataset is None and val_dataset is None and test_dataset is None:
            raise ValueError("SSDDataModule needs at least one dataset")
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.test_dataset = test_dataset
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.batch_size = int(batch_size)
        self.num_workers = num_workers if num_workers == "auto" else int(num_workers)
        self.assign_on = assign_on
        self.persistent_workers = bool(persistent_workers)
        self.pin_memory = bool(pin_memory)
        self.augment = dict(augment or {})
        self.seed = int(seed)
        self.box_coder: SSDBoxCoder | None = None
        self._wrapped: dict[str, SSDTargetDataset] = {}

    @property
    def _reference(self) -> Any:
        datasets = (self.train_dataset, self.val_dataset, self.test_dataset)
        return next(d for d in datasets if d is not None)

    @property
    def class_names(self) -> list[str]:
        """Names by label, index 0 = background (from the training dataset)."""
        return list(self._reference.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names)

    @property
    def label_map(self) -> dict[int, int]:
        """Dataset category id -> contiguous label (goes into the checkpoint)."""
        return dict(getattr(self._reference, "label_map", {}))

    def set_box_coder(self, box_coder: SSDBoxCoder) -> None:
        """Encode the targets with (a CPU copy of) the model's box coder (before ``setup``)."""
        self.box_coder = box_coder.cpu_copy()
        self._wrapped.clear()

    def setup(self, stage: str | None = None) -> None:
        if self.box_coder is None:
            raise RuntimeError(
                "SSDDataModule.set_box_coder(coder) must be called before setup: the targets "
                "are encoded against the model's default boxes"
            )
        in_workers = self.assign_on == "worker"
        assigner = SSDTargetAssigner(self.box_coder) if in_workers else None
        train_tf = build_train_transform(
            self.image_size, self.mean, self.std,
            **{"seed": self.seed, **self.augment, "normalize": in_workers},
        )  # fmt: skip
        eval_tf = build_eval_transform(self.image_size, self.mean, self.std, in_workers)
        for split, dataset, transform in (
            ("train", self.train_dataset, train_tf),
            ("val", self.val_dataset, eval_tf),
            ("test", self.test_dataset, eval_tf),
        ):
            if dataset is None or split in self._wrapped:
                continue
            evaluation = split != "train"
            self._wrapped[split] = SSDTargetDataset(
                dataset, transform, assigner, drop_bad=evaluation, keep_gt=evaluation
            )
            if self.trainer is None or self.trainer.is_global_zero:
                summary = dataset.summary() if hasattr(dataset, "summary") else ""
                log.info("%s dataset: %d images\n%s", split, len(dataset), summary)

    def _wrapped_split(self, split: str) -> SSDTargetDataset:
        if split not in self._wrapped:
            self.setup(split)
        if split not in self._wrapped:
            raise RuntimeError(f"SSDDataModule has no {split} dataset")
        return self._wrapped[split]

    def _loader(
        self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None, train: bool = False
    ) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        workers = self.workers_per_loader()
        if workers > 0:
            # One OpenCV thread per worker (many workers each starting a pool oversubscribe
            # the CPUs). Set here, before the workers fork, and inherited: setting it inside a
            # forked worker can deadlock on the parent's thread pool.
            cv2.setNumThreads(1)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=ssd_collate,
            worker_init_fn=functools.partial(seed_worker, rank=rank),
            # Training: full batches only (a short last batch would recompile a compiled
            # network for its shape, and weigh its few images like a full batch).
            drop_last=train,
        )

    def workers_per_loader(self) -> int:
        """``num_workers``, or for ``"auto"`` the job's CPUs per local device less one."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return suggested_max_num_workers(max(1, devices))  # CPU affinity // devices - 1

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self._wrapped_split(split)
        sampler = None
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:  # unpadded: every image exactly once across the ranks
            rank = self.trainer.global_rank
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=False
            )
        return self._loader(dataset, shuffle=False, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._wrapped_split("train"), shuffle=True, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
