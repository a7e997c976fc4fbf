"""Inference on image files: ``ssd-predict ckpt_path=<file.ckpt> input=<image or folder>``.

Writes into ``output_dir`` (default ``outputs/predict/<timestamp>``):

- ``detections.json``: COCO results, ``[{image_id, category_id, bbox: [x, y, w, h], score}]``,
  category ids mapped back to the dataset's through the checkpoint's label map;
- ``images.json``: the COCO header for them, ``{images: [{id, file_name, height, width}],
  categories: [{id, name}], annotations: []}``, so
  ``COCO("images.json").loadRes("detections.json")`` works;
- ``images/``: every input image with its detections drawn (``draw=false`` to skip);
- ``skipped.json``: the images that could not be read, with the reason
  (``on_bad_sample=skip``, the default; ``raise`` stops at the first one).

Images are read, resized and normalised exactly as in validation (size, mean and std from the
checkpoint), in batches of ``batch_size``. E.g.::

    ssd-predict ckpt_path=outputs/quickstart/runs/<id>/checkpoints/last.ckpt input=photos/ \
        score_threshold=0.5 batch_size=16 output_dir=predictions
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ssd_lightning.checkpoint import load_checkpoint
from ssd_lightning.config import CONFIG_DIR
from ssd_lightning.data import ImageReadError, read_image
from ssd_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS
from ssd_lightning.data.transforms import build_eval_transform
from ssd_lightning.evaluate import module_from_checkpoint
from ssd_lightning.visualize import draw_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find_images(path: str | Path) -> tuple[Path, list[Path]]:
    """The image files of ``path`` (a file, or a folder searched recursively), sorted.

    Returns:
        The folder that names are relative to, and the files.
    """
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} is neither an image file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return path, files


class ImageFiles(Dataset):
    """Image files as the eval transform prepares them, with the original pixels for drawing.

    An unreadable file gives ``{"index", "error"}`` under ``on_bad_sample="skip"`` and raises
    ``ImageReadError`` under ``"raise"``.
    """

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        on_bad_sample: str = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        self.files = list(files)
        self.transform = build_eval_transform(image_size, mean, std)
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = read_image(self.files[index], self.max_image_pixels)
        except ImageReadError as e:
            if self.on_bad_sample == "raise":
                raise
            return {"index": index, "error": str(e)}
        sample = {
            "image": image,
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64),
            "image_id": index,
            "orig_size": image.shape[:2],
        }
        return {"input": self.transform(sample)["image"], "image": image, "index": index}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "error" not in s]
    return {
        "inputs": torch.stack([s["input"] for s in good]) if good else None,
        "images": [s["image"] for s in good],
        "indices": [s["index"] for s in good],
        "errors": [(s["index"], s["error"]) for s in samples if "error" in s],
    }


def coco_results(
    detections: dict[str, torch.Tensor], image_id: int, category_ids: torch.Tensor
) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries (bbox as x, y, width, height).

    Args:
        detections: ``boxes`` (n, 4) xyxy pixels, ``scores`` (n,), ``labels`` (n,) 1..C-1.
        image_id: id of the image in ``images.json``.
        category_ids: dataset category id of every contiguous label, (C,).
    """
    boxes = detections["boxes"].double().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    categories = category_ids[detections["labels"].cpu()].tolist()
    return [
        {"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s}
        for c, b, s in zip(
            categories, xywh.tolist(), detections["scores"].float().cpu().tolist(), strict=True
        )
    ]


def category_ids_of(label_map: dict[int, int] | None, num_classes: int) -> torch.Tensor:
    """Dataset category id of every contiguous label (identity where the map has none).

    The checkpoint's label map is the dataset's: category id -> contiguous label.
    """
    ids = torch.arange(num_classes)
    for category, label in (label_map or {}).items():
        ids[int(label)] = int(category)
    return ids


def predict(
    ckpt_path: str | Path,
    input: str | Path,
    output_dir: str | Path,
    batch_size: int = 8,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    draw: bool = True,
    num_workers: int = 0,
    device: str = "auto",
    channels_last: bool = True,
    on_bad_sample: str = "skip",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[dict[str, Any]]:
    """Detect objects in image files; write COCO JSON and drawn images (see module docstring).

    Args:
        ckpt_path: training checkpoint (network, anchors, input size, classes, label map).
        input: an image file, or a folder searched recursively (``IMAGE_SUFFIXES``); files
            under ``output_dir`` are skipped.
        output_dir: where ``detections.json``, ``images.json`` and ``images/`` go.
        batch_size: images per forward pass.
        score_threshold: detections scoring at or below this are dropped (0.01 for COCO AP).
        max_detections: detections kept per image.
        draw: write the images with their detections drawn.
        num_workers: DataLoader processes reading and resizing the images.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
        channels_last: run the network in channels-last memory format (~1.2x faster on CPU
            with oneDNN, faster on GPUs; same detections).
        on_bad_sample: ``"skip"`` an unreadable image (listed in ``skipped.json`` and
            printed) or ``"raise"``.
        max_image_pixels: images with more pixels are unreadable (None: no limit).

    Returns:
        The COCO result entries written to ``detections.json``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module_from_checkpoint(
        load_checkpoint(ckpt_path),
        score_threshold=score_threshold,
        max_detections=max_detections,
        channels_last=channels_last,
    ).to(device)
    hparams = module.hparams
    out = Path(output_dir)
    root, files = find_images(input)
    resolved = out.resolve()
    files = [f for f in files if resolved not in f.resolve().parents]  # earlier outputs
    dataset = ImageFiles(
        files, hparams.image_size, hparams.mean, hparams.std, on_bad_sample, max_image_pixels
    )
    loader = DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=_collate)
    num_classes = int(hparams.net_config.get("num_classes") or len(module.class_names) + 1)
    names = list(module.class_names or [str(k) for k in range(1, num_classes)])
    category_ids = category_ids_of(module.label_map, num_classes)

    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), unit="img", desc="predict") as bar:
        for batch in loader:
            for index, error in batch["errors"]:
                name = files[index].relative_to(root).as_posix()
                skipped.append({"file_name": name, "error": error})
                bar.update()
            if batch["inputs"] is None:
                continue
            sizes = torch.tensor([im.shape[:2] for im in batch["images"]])
            detections = module.detect(batch["inputs"].to(device), sizes.to(device))
            for index, image, det in zip(
                batch["indices"], batch["images"], detections, strict=True
            ):
                name = files[index].relative_to(root).as_posix()
                h, w = image.shape[:2]
                images.append({"id": index + 1, "file_name": name, "height": h, "width": w})
                results += coco_results(det, index + 1, category_ids)
                if draw:
                    _save_drawn(image, det, names, score_threshold, out / "images" / name)
            bar.update(len(batch["indices"]))

    categories = [{"id": int(category_ids[k]), "name": n} for k, n in enumerate(names, start=1)]
    header = {"images": images, "categories": categories, "annotations": []}
    (out / "images.json").write_text(json.dumps(header, indent=1))
    (out / "detections.json").write_text(json.dumps(results))
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
    print(f"{len(results)} detections in {len(images)} images written to {out}", flush=True)
    if skipped:
        print(f"{len(skipped)} unreadable images skipped (listed in {out / 'skipped.json'}):")
        for entry in skipped[:20]:
            print(f"  {entry['error']}")
    return results


def _save_drawn(
    image: np.ndarray,
    detections: dict[str, torch.Tensor],
    class_names: Sequence[str],
    score_threshold: float,
    path: Path,
) -> None:
    drawn = draw_detections(
        image,
        detections["boxes"].cpu(),
        detections["labels"].cpu(),
        detections["scores"].cpu(),
        class_names=class_names,
        score_threshold=score_threshold,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


# An absolute path: a relative one fails under console scripts (Hydra resolves it against
# the module name there, not the file).
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(
        cfg.ckpt_path,
        cfg.input,
        cfg.output_dir,
        batch_size=cfg.batch_size,
        score_threshold=cfg.score_threshold,
        max_detections=cfg.max_detections,
        draw=cfg.draw,
        num_workers=cfg.num_workers,
        device=cfg.device,
        channels_last=cfg.channels_last,
        on_bad_sample=cfg.on_bad_sample,
        max_image_pixels=cfg.max_image_pixels,
    )


def main() -> None:
    """Console script ``ssd-predict``."""
    _hydra_main()


if __name__ == "__main__":
    main()
