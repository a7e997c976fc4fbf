"""Drawing detections for inspection and TensorBoard: boxes coloured per class, label and score.

Images are RGB. Boxes are absolute xyxy pixels; label k (1..C-1) is named ``class_names[k - 1]``
(label 0 is background). Drawing loops over boxes, which is fine here: this is never a hot path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

# Fixed RGB palette (matplotlib's tab10 then tab20's light shades); label k -> PALETTE[k % 20].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of a class label from the fixed palette."""
    return PALETTE[int(label) % len(PALETTE)]


def draw_detections(
    image: np.ndarray,
    boxes: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    scores: Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    thickness: int = 2,
) -> np.ndarray:
    """Draw boxes with their class name (and score) on a copy of an image.

    Args:
        image: RGB image, uint8.
        boxes: Absolute xyxy pixel boxes.
        labels: Class labels (1..C-1).
        scores: Detection scores; boxes scoring below ``score_threshold`` are not drawn. None for
            ground truth (everything drawn, no score shown).
        class_names: Foreground class names; without them the label number is shown.
        score_threshold: Minimum score of a drawn detection.
        thickness: Box line width in pixels.

    Returns:
        A new uint8 RGB image; the input is never modified.

    Shape:
        image: (H, W, 3); boxes: (N, 4); labels, scores: (N,) -> (H, W, 3)
    """
    canvas = np.ascontiguousarray(image, dtype=np.uint8).copy()
    boxes, labels = _numpy(boxes).reshape(-1, 4), _numpy(labels).reshape(-1)
    keep = np.ones(len(labels), dtype=bool)
    if scores is not None:
        scores = _numpy(scores).reshape(-1)
        keep = scores >= score_threshold
    for i in np.flatnonzero(keep):
        x1, y1, x2, y2 = (round(float(v)) for v in boxes[i])
        color = class_color(labels[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        name = _class_name(int(labels[i]), class_names)
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        _put_label(canvas, text, (x1, y1), color)
    return canvas


def prediction_grid(
    images: Tensor,
    preds: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_pixel_value: float = 255.0,
    orig_sizes: Tensor | None = None,
    score_threshold: float = 0.3,
    max_images: int = 8,
) -> Tensor:
    """Grid of network inputs, each as predictions (left) beside ground truth (right).

    Images are denormalised as the inverse of albumentations' ``Normalize(mean, std,
    max_pixel_value)``: ``pixel = x * std * max_pixel_value + mean * max_pixel_value``.
    Two image pairs per row.

    Args:
        images: Normalised network inputs.
        preds: Per image ``boxes``, ``scores``, ``labels`` (e.g. from the post-processor).
        targets: Per image ``boxes``, ``labels``.
        class_names: Foreground class names.
        mean, std, max_pixel_value: The normalisation applied to the images.
        orig_sizes: (h, w) per image that the boxes refer to (the original image); boxes are
            rescaled to the network input size. None: boxes are already in input pixels.
        score_threshold: Minimum score of a drawn prediction.
        max_images: Only the first ``max_images`` images are shown.

    Returns:
        uint8 image grid for ``SummaryWriter.add_image`` (dataformats "CHW").

    Shape:
        images: (B, 3, H, W); orig_sizes: (B, 2) -> (3, H_grid, W_grid)
    """
    n = min(len(images), max_images)
    height, width = images.shape[-2:]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * max_pixel_value
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * max_pixel_value
    pixels = images[:n].detach().float().cpu() * std_t + mean_t  # (n, 3, H, W) in 0..255
    pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tiles = []
    for i in range(n):
        factor = torch.ones(4)
        if orig_sizes is not None:
            h, w = (float(v) for v in orig_sizes[i])
            factor = torch.tensor([width / w, height / h, width / w, height / h])
        pred_boxes = preds[i]["boxes"].detach().float().cpu() * factor
        gt_boxes = targets[i]["boxes"].detach().float().cpu() * factor
        left = draw_detections(
            pixels[i],
            pred_boxes,
            preds[i]["labels"],
            preds[i]["scores"],
            class_names,
            score_threshold,
        )
        right = draw_detections(pixels[i], gt_boxes, targets[i]["labels"], None, class_names)
        _put_label(left, "pred", (0, 0), (255, 255, 255), inside=True)
        _put_label(right, "GT", (0, 0), (255, 255, 255), inside=True)
        tiles += [torch.from_numpy(left).permute(2, 0, 1), torch.from_numpy(right).permute(2, 0, 1)]
    return make_grid(tiles, nrow=4, padding=2, pad_value=0)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 1 <= label <= len(class_names):
        return class_names[label - 1]
    return str(label)


def _put_label(
    canvas: np.ndarray,
    text: str,
    corner: tuple[int, int],
    color: tuple[int, int, int],
    inside: bool = False,
) -> None:
    """Text on a filled box of ``color``, above ``corner`` (or below it when ``inside`` or when
    there is no room above), in black or white whichever reads better."""
    (tw, th), baseline = cv2.getTextSize(text, _FONT, 0.4, 1)
    x, y = corner
    top = y if inside or y - th - baseline < 0 else y - th - baseline
    cv2.rectangle(canvas, (x, top), (x + tw, top + th + baseline), color, -1)
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 128 else (255, 255, 255)
    cv2.putText(canvas, text, (x, top + th), _FONT, 0.4, ink, 1, cv2.LINE_AA)
