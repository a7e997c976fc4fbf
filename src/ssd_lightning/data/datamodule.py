"""SSD DataModule: augmentation and GT-to-default-box assignment in the DataLoader workers.

Each sample is decoded, augmented (``data.transforms``) and encoded against the model's default
boxes (``SSDBoxCoder``, SSD paper Sec. 2.2 "Matching strategy") inside the workers, so a batch
carries dense targets and the training step only runs the network and the loss.

Batch (dict):
    - ``images``: (B, 3, H, W) float32, normalised.
    - ``loc_targets``: (B, A, 4) float32 encoded offsets (zero on background).
    - ``labels``: (B, A) int64 default-box classes, 0 background, -1 ignore (crowd regions).
    - ``gt_boxes``: list of (n_i, 4) float32 xyxy pixels in the ORIGINAL image (before any
      transform), ``gt_labels``: list of (n_i,) int64, ``gt_difficult``: list of (n_i,) bool
      (difficult or crowd: ignored by evaluation).
    - ``image_ids``: (B,) int64; ``orig_sizes``: (B, 2) int64 (height, width).

DDP: Lightning injects a DistributedSampler for training. For validation and test it would
inject one too, and that sampler pads the last rank by repeating images, which double-counts
them in mAP. When the trainer runs several processes (``trainer.world_size > 1``), val/test
loaders therefore carry Lightning's ``UnrepeatedDistributedSampler`` (indices
``rank::world_size``, no padding); being a DistributedSampler subclass, Lightning leaves it in
place under the default ``use_distributed_sampler=True``. Ranks may then run one batch fewer
than others: evaluation must sync once per epoch (torchmetrics, ``self.log(..., on_epoch=True,
sync_dist=True)``), never per step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.ops import box_convert

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
    """Dense SSD targets for one transformed sample.

    Crowd boxes (COCO ``iscrowd``) take no part in matching. Default boxes left as background
    that lie mostly inside a crowd region (intersection over the default box's in-image area >=
    ``crowd_ioa_threshold``, Detectron's CROWD_FILTER_THRESH 0.7) get label -1 (ignore), so
    they are neither positives nor mined negatives.

    Args:
        box_coder: the encoder built from the model's default boxes.
        crowd_ioa_threshold: ignore threshold for background boxes inside crowd regions.
    """

    def __init__(self, box_coder: SSDBoxCoder, crowd_ioa_threshold: float = 0.7) -> None:
        self.box_coder = box_coder
        self.crowd_ioa_threshold = float(crowd_ioa_threshold)
        # (A, 4) normalised corners of the coder's default boxes, cut to the image: the part of
        # a border box outside the image holds no pixels a crowd region could cover.
        self.default_xyxy = box_convert(box_coder.default_boxes, "cxcywh", "xyxy").clamp(0, 1)
        d = self.default_xyxy
        self.default_area = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])  # (A,)

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
        h, w = image_size
        normalised = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4) / (w, h, w, h))
        normalised = normalised.float()
        crowd = torch.from_numpy(np.asarray(iscrowd, dtype=bool).reshape(-1))
        objects = ~crowd
        loc, target = self.box_coder.encode(
            normalised[objects], torch.from_numpy(np.asarray(labels, np.int64))[objects]
        )
        if bool(crowd.any()):
            target[(target == 0) & (self._ioa(normalised[crowd]) >= self.crowd_ioa_threshold)] = -1
        return loc, target

    def _ioa(self, regions: Tensor) -> Tensor:
        """Largest fraction of each default box's area covered by one of ``regions``.

        Shape:
            regions: (K, 4) normalised xyxy; returns (A,).
        """
        d = self.default_xyxy
        lt = torch.maximum(d[:, None, :2], regions[None, :, :2])  # (A, K, 2)
        rb = torch.minimum(d[:, None, 2:], regions[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (A, K)
        return (inter / self.default_area[:, None].clamp(min=1e-12)).amax(dim=1)


class SSDTargetDataset(Dataset):
    """Wraps a sample-contract dataset: transform, then dense targets, plus the original GT.

    Args:
        dataset: returns sample-contract dicts (see ``ssd_lightning.data.dataset``).
        transform: augmentation or eval transform.
        assigner: GT-to-default-box assignment.
        drop_bad: a sample that cannot be read becomes None (dropped by ``ssd_collate``)
            instead of being replaced by another one (evaluation: no image scored twice).
            Needs a dataset with ``get(index, substitute)`` (``DetectionDataset``).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: DetectionTransform,
        assigner: SSDTargetAssigner,
        drop_bad: bool = False,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.assigner = assigner
        self.drop_bad = drop_bad and hasattr(dataset, "get")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.dataset.get(index, substitute=False) if self.drop_bad else self.dataset[index]
        if sample is None:
            return None
        n = len(sample["boxes"])
        # Original GT for evaluation, copied before the transform sees the arrays.
        gt_boxes = np.array(sample["boxes"], dtype=np.float32).reshape(n, 4)
        gt_labels = np.array(sample["labels"], dtype=np.int64).reshape(n)
        ignored = np.zeros(n, bool)
        for flag in ("difficult", "iscrowd"):
            if flag in sample:
                ignored |= np.asarray(sample[flag], dtype=bool).reshape(n)
        out = self.transform(sample)
        image = out["image"]
        loc, labels = self.assigner(
            out["boxes"], out["labels"], out["iscrowd"], (image.shape[-2], image.shape[-1])
        )
        return {
            "image": image,
            "loc_targets": loc,
            "labels": labels,
            "gt_boxes": torch.from_numpy(gt_boxes),
            "gt_labels": torch.from_numpy(gt_labels),
            "gt_difficult": torch.from_numpy(ignored),
            "image_id": int(sample["image_id"]),
            "orig_size": tuple(int(v) for v in sample["orig_size"]),
        }


def ssd_collate(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Stack ``SSDTargetDataset`` samples into the batch dict (see the module docstring).

    Dropped samples (None) are left out; a batch of only dropped samples is None.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "loc_targets": torch.stack([s["loc_targets"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "gt_boxes": [s["gt_boxes"] for s in samples],
        "gt_labels": [s["gt_labels"] for s in samples],
        "gt_difficult": [s["gt_difficult"] for s in samples],
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
    }


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
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        augment: keyword arguments of ``build_train_transform``.
        seed: augmentation seed when loading in the main process (num_workers=0).
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
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if train_dataset is None and val_dataset is None and test_dataset is None:
            raise ValueError("SSDDataModule needs at least one dataset")
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.test_dataset = test_dataset
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
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
        assigner = SSDTargetAssigner(self.box_coder)
        train_tf = build_train_transform(
            self.image_size, self.mean, self.std, **{"seed": self.seed, **self.augment}
        )
        eval_tf = build_eval_transform(self.image_size, self.mean, self.std)
        for split, dataset, transform in (
            ("train", self.train_dataset, train_tf),
            ("val", self.val_dataset, eval_tf),
            ("test", self.test_dataset, eval_tf),
        ):
            if dataset is None or split in self._wrapped:
                continue
            self._wrapped[split] = SSDTargetDataset(
                dataset, transform, assigner, drop_bad=split != "train"
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
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=ssd_collate,
            worker_init_fn=functools.partial(seed_worker, rank=rank),
            # Training: full batches only (a short last batch would recompile a compiled
            # network for its shape, and weigh its few images like a full batch).
            drop_last=train,
        )

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
