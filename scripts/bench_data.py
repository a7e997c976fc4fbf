"""Training-pipeline throughput per DataLoader worker: ours vs torchvision v2, same SSD recipe.

One process, one thread (torch and OpenCV), as in a DataLoader worker. Each image is decoded,
augmented (photometric distortion, zoom-out to 4x on the mean colour, IoU random crop, flip,
resize to 300x300, normalise) and encoded against the 8732 SSD300 default boxes.

- ours: ``VOCDataset`` (OpenCV decode) -> ``build_train_transform`` -> ``SSDTargetAssigner``.
- ours, GT assigned on the GPU (``data.assign_on=device``, the GPU default): the same decode
  and augmentation ending in a uint8 tensor, no assignment (the GPU does it per batch). Its
  per-core rate gives the CPU cores a GPU needs for 2,000 training images/s.
- reference: ``torchvision.io.decode_jpeg`` -> torchvision.transforms.v2 (RandomPhotometricDistort,
  RandomZoomOut(fill=mean), RandomIoUCrop, SanitizeBoundingBoxes, RandomHorizontalFlip,
  Resize((300, 300)), ToDtype, Normalize) -> the same ``SSDBoxCoder.encode``.

Both run over the same images in the same process; images/s is the median over passes, by
wall clock and by process CPU time (the machine may be shared: CPU time is the per-core figure).
Usage: ``python scripts/bench_data.py [--root ../shared/data/bccd] [--images 100] [--passes 5]``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.data import VOCDataset
from ssd_lightning.data.datamodule import IMAGENET_MEAN, IMAGENET_STD, SSDTargetAssigner
from ssd_lightning.data.transforms import build_train_transform
from ssd_lightning.encoder import SSDBoxCoder

REPO = Path(__file__).resolve().parents[1]
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
SSD300_FEATURE_MAPS = (38, 19, 10, 5, 3, 1)  # VGG16 SSD300 source maps (as the model measures)
TARGET_RATE = 2000  # training images/s of one GPU (the GPU check's goal)


def ours_pipeline(dataset: VOCDataset, coder: SSDBoxCoder, size: int, args: argparse.Namespace):
    transform = build_train_transform(
        size, IMAGENET_MEAN, IMAGENET_STD, crop_trials=args.crop_trials, crop_iou_rule=args.rule
    )
    assigner = SSDTargetAssigner(coder)

    def run(index: int) -> int:
        out = transform(dataset[index])
        _, labels = assigner(out["boxes"], out["labels"], out["iscrowd"], (size, size))
        return int(labels.shape[0])

    return run


def device_assignment_pipeline(dataset: VOCDataset, size: int, args: argparse.Namespace):
    """What a worker does when the GPU assigns the targets: decode, augment, uint8 tensor."""
    transform = build_train_transform(
        size, IMAGENET_MEAN, IMAGENET_STD, crop_trials=args.crop_trials, crop_iou_rule=args.rule,
        normalize=False,
    )  # fmt: skip

    def run(index: int) -> int:
        return int(transform(dataset[index])["image"].shape[-1])

    return run


def torchvision_pipeline(dataset: VOCDataset, coder: SSDBoxCoder, size: int):
    mean255 = [255.0 * m for m in IMAGENET_MEAN]
    transform = v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill={tv_tensors.Image: mean255, "others": 0}, side_range=(1.0, 4.0)),
            v2.RandomIoUCrop(),
            v2.SanitizeBoundingBoxes(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize((size, size), antialias=False),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )
    records = dataset.records

    def run(index: int) -> int:
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(records.path(index)))
        objects = records.objects(index)
        h, w = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(objects["boxes"]), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.from_numpy(objects["labels"]),
        }
        image, target = transform(tv_tensors.Image(image), target)
        boxes = target["boxes"].as_subclass(torch.Tensor) / size
        _, labels = coder.encode(boxes, target["labels"])
        return int(labels.shape[0])

    return run


def time_passes(run: Callable[[int], int], indices: list[int], passes: int) -> dict[str, float]:
    """Median images/s over ``passes`` passes, by wall clock and by process CPU time."""
    for i in indices[:5]:  # warm-up
        run(i)
    wall, cpu = [], []
    for _ in range(passes):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in indices:
            run(i)
        wall.append(len(indices) / (time.perf_counter() - t0))
        cpu.append(len(indices) / (time.process_time() - c0))
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--images", type=int, default=100, help="images per pass")
    parser.add_argument("--passes", type=int, default=5, help="passes of our pipeline")
    parser.add_argument("--ref-passes", type=int, default=3, help="passes of torchvision's")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--crop-trials", type=int, default=50)
    parser.add_argument("--rule", choices=("any", "all"), default="any")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    import_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dataset = VOCDataset(
        args.root,
        BCCD_CLASSES,
        split=args.split,
        image_dir="images",
        annotation_dir="annotations",
        split_dir="splits",
    )
    coder = SSDBoxCoder(DefaultBoxes(args.image_size, SSD300_FEATURE_MAPS).cxcywh)
    indices = list(range(min(args.images, len(dataset))))
    print(
        f"bench_data: {args.root} {args.split}, {len(indices)} images/pass, "
        f"{args.image_size}x{args.image_size}, {len(coder)} default boxes, 1 thread "
        f"(torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"OpenCV {cv2.__version__}, numpy {np.__version__}, {platform.processor() or 'cpu'})"
    )
    print(f"recipe: crop_trials={args.crop_trials} iou_rule={args.rule}, zoom-out p=0.5 to 4x")

    ours = time_passes(ours_pipeline(dataset, coder, args.image_size, args), indices, args.passes)
    print(
        f"ours        : {ours['cpu']:7.1f} images/s per core (CPU time), "
        f"{ours['wall']:7.1f} wall, median of {args.passes}"
    )
    device = time_passes(device_assignment_pipeline(dataset, args.image_size, args), indices,
                         args.passes)  # fmt: skip
    print(
        f"ours, GT on the GPU: {device['cpu']:7.1f} images/s per core (CPU time), "
        f"{device['wall']:7.1f} wall (decode + augment, uint8; data.assign_on=device)"
    )
    for name, rate in (("GT on the GPU", device["cpu"]), ("GT in the workers", ours["cpu"])):
        print(f"CPU cores for {TARGET_RATE:,} training images/s, {name}: {TARGET_RATE / rate:.1f}")
    if not args.skip_reference:
        ref = time_passes(
            torchvision_pipeline(dataset, coder, args.image_size), indices, args.ref_passes
        )
        print(
            f"torchvision : {ref['cpu']:7.1f} images/s per core (CPU time), "
            f"{ref['wall']:7.1f} wall, median of {args.ref_passes}"
        )
        print(
            f"ratio ours/torchvision: {ours['cpu'] / ref['cpu']:.1f}x (CPU time), "
            f"{ours['wall'] / ref['wall']:.1f}x (wall)"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mib:.0f} MiB ({import_mib:.0f} MiB of it after the imports)")


if __name__ == "__main__":
    main()
