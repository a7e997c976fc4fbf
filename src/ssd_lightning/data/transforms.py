"""SSD data augmentation on albumentations 2.x and OpenCV.

SSD paper, Sec. 2.2 "Data augmentation" and Sec. 3.6 (zoom-out "expand"): photometric
distortion, zoom-out onto a mean-coloured canvas, the IoU-constrained random crop, horizontal
flip, resize to the model size and normalisation. albumentations has no SSD crop or zoom-out,
so `SSDZoomOut` and `SSDRandomIoUCrop` are written here as DualTransforms, and the Caffe
photometric distortion as `SSDPhotometricDistort` (albumentations' HueSaturationValue shifts
saturation additively and ColorJitter blends torchvision-style; neither is the Caffe recipe).

Boxes enter and leave as absolute xyxy pixels (albumentations 'pascal_voc'). Inside a Compose
albumentations hands a DualTransform its boxes as an (N, 4 + K) float array, xyxy normalised to
the current image, with the K label fields appended as columns, so a transform that drops rows
keeps labels, crowd and difficult flags aligned. Boxes narrower or lower than `min_box_size`
pixels at the end of the pipeline are dropped (torchvision's SanitizeBoundingBoxes rule).

Training order: photometric distortion and channel swap (on the decoded image, as Caffe),
zoom-out, crop + resize in one step, flip (after the resize: the same result on fewer
pixels), normalise into a CHW float tensor.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.type_definitions import Targets

__all__ = [
    "DetectionTransform",
    "NormalizeToTensor",
    "SSDPhotometricDistort",
    "SSDRandomIoUCrop",
    "SSDZoomOut",
    "ToTensorUint8",
    "build_eval_transform",
    "build_train_transform",
]

# Label fields that travel with the boxes through the pipeline, as numeric columns.
LABEL_FIELDS = ("labels", "iscrowd", "difficult")

# SSD paper, Sec. 2.2: keep the whole image (None), a patch whose IoU with the objects is at
# least 0.1/0.3/0.5/0.7/0.9, or a random patch (0.0 = no IoU constraint).
SSD_CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)


def _lut(values: np.ndarray) -> np.ndarray:
    """Round and saturate a 256-entry float table to uint8, as OpenCV's convertTo does."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class SSDPhotometricDistort(A.ImageOnlyTransform):
    """Caffe SSD photometric distortion on uint8 RGB images, with OpenCV lookup tables.

    Caffe SSD (weiliu89 ``DistortImage``) / ssd.pytorch ``PhotometricDistort``: random
    brightness, then either contrast -> saturation -> hue or saturation -> hue -> contrast
    (chance 1/2 each), every step applied with probability `op_prob`. Pixel values saturate to
    [0, 255] after every step, as Caffe's uint8 OpenCV code does. Brightness and contrast are
    256-entry LUTs (fused when adjacent); saturation and hue are LUTs on the S and H planes of
    OpenCV's full-range uint8 HSV (hue in 256 steps per turn), so the whole distortion costs at
    most one HSV round trip. The channel swap of the recipe is albumentations' ChannelShuffle.

    Deviation: ``hue_delta`` is in degrees (ssd.pytorch, 18 deg); Caffe adds 18 to OpenCV's
    half-degree hue unit, i.e. 36 deg, without wrap-around.

    Args:
        brightness_delta: added value uniform in [-delta, delta], in pixel units.
        contrast_range: multiplicative contrast factor range.
        saturation_range: multiplicative saturation factor range.
        hue_delta: hue shift uniform in [-delta, delta] degrees.
        op_prob: probability of each of the four steps.
        p: probability of running the transform at all.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        op_prob: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)
        self.op_prob = float(op_prob)

    def get_params(self) -> dict[str, Any]:
        r = self.py_random

        def maybe(low: float, high: float, identity: float) -> float:
            return r.uniform(low, high) if r.random() < self.op_prob else identity

        d = self.brightness_delta
        return {
            "brightness": maybe(-d, d, 0.0),
            "contrast": maybe(*self.contrast_range, 1.0),
            "contrast_first": r.random() < 0.5,
            "saturation": maybe(*self.saturation_range, 1.0),
            "hue": maybe(-self.hue_delta, self.hue_delta, 0.0),
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float = 0.0,
        contrast: float = 1.0,
        contrast_first: bool = True,
        saturation: float = 1.0,
        hue: float = 0.0,
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(
                f"SSDPhotometricDistort expects uint8 HxWx3 RGB, got {img.dtype} {img.shape}"
            )
        identity = np.arange(256, dtype=np.float32)
        first = _lut(identity + brightness)
        if contrast_first:
            first = _lut(first * contrast)
        last = None if contrast_first or contrast == 1.0 else _lut(identity * contrast)
        if saturation == 1.0 and hue == 0.0:  # no HSV step: one fused LUT, or nothing
            lut = first if last is None else last[first]
            return img if np.array_equal(lut, identity) else cv2.LUT(img, lut)
        if not np.array_equal(first, identity):
            img = cv2.LUT(img, first)
        # One LUT per changed HSV plane (split + two single-channel LUTs + merge is about twice
        # as fast as cv2.LUT with a 3-channel table).
        h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL))
        if hue != 0.0:
            shift = int(np.rint(hue * 256.0 / 360.0))  # full-range hue: 256 steps per turn
            cv2.LUT(h, ((np.arange(256) + shift) % 256).astype(np.uint8), dst=h)
        if saturation != 1.0:
            cv2.LUT(s, _lut(identity * saturation), dst=s)
        img = cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2RGB_FULL)
        if last is not None:
            cv2.LUT(img, last, dst=img)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta", "op_prob")


class SSDZoomOut(A.DualTransform):
    """SSD "expand": place the image at a random position on a larger mean-coloured canvas.

    SSD paper, Sec. 3.6: canvas side up to ``max_scale`` (4) times the image side, filled with
    the mean colour, so that objects get smaller (+2-3 mAP on small objects).

    Args:
        fill: canvas colour in pixel units, one value per channel (the normalisation mean * 255).
        max_scale: largest canvas/image side ratio; the ratio is uniform in [1, max_scale].
        p: probability of applying the zoom-out.
    """

    _targets = (Targets.IMAGE, Targets.BBOXES)

    def __init__(
        self, fill: Sequence[float] = (124.0, 116.0, 104.0), max_scale: float = 4.0, p: float = 0.5
    ) -> None:
        super().__init__(p=p)
        if max_scale < 1.0:
            raise ValueError(f"max_scale must be >= 1, got {max_scale}")
        self.fill = tuple(float(v) for v in fill)
        self.max_scale = float(max_scale)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        scale = self.py_random.uniform(1.0, self.max_scale)
        canvas_h, canvas_w = int(h * scale), int(w * scale)
        left = int(self.py_random.uniform(0, canvas_w - w))
        top = int(self.py_random.uniform(0, canvas_h - h))
        return {"pad_ltrb": (left, top, canvas_w - w - left, canvas_h - h - top)}

    def apply(
        self, img: np.ndarray, pad_ltrb: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        left, top, right, bottom = pad_ltrb
        value = self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[0]
        # One pass that allocates the canvas and copies the image in.
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, pad_ltrb: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        # bboxes: (N, 4 + K) xyxy normalised to the input; returned normalised to the canvas.
        h, w = params["shape"][:2]
        left, top, right, bottom = pad_ltrb
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * w + left) / (w + left + right)
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * h + top) / (h + top + bottom)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("fill", "max_scale")


def _iou_patches_boxes(patches: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU between crop candidates and boxes.

    Shape:
        patches: (T, 4) xyxy pixels; boxes: (G, 4) xyxy pixels; returns (T, G).
    """
    lt = np.maximum(patches[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(patches[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_p = np.prod(patches[:, 2:] - patches[:, :2], axis=-1)
    area_b = np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
    return inter / np.maximum(area_p[:, None] + area_b[None, :] - inter, 1e-9)


class SSDRandomIoUCrop(BaseCrop):
    """SSD IoU-constrained random crop ("random sample crop").

    SSD paper, Sec. 2.2: pick uniformly one of ``min_ious``: None keeps the whole image, a value
    asks for a patch whose IoU with the objects is at least that value (0.0: no constraint).
    Patch width and height are uniform in [min_scale, max_scale] of the image sides with pixel
    aspect ratio w/h in [min_aspect_ratio, max_aspect_ratio]. ``num_trials`` candidates are drawn
    at once; the first that satisfies the constraint and has at least one box centre inside
    wins. When none does, another option is drawn (at most ``max_option_draws`` times, then the
    whole image is kept). Boxes whose centre lies inside the patch are kept and clipped to it;
    the others are dropped with their labels. An image without boxes accepts any patch.

    ``iou_rule``: "any" needs one box with IoU >= min (Caffe ``SatisfySampleConstraint``,
    torchvision RandomIoUCrop); "all" needs every box to reach it (strict; high minimums then
    rarely succeed on crowded images and another option is drawn).

    Args:
        min_ious: the options, see above.
        num_trials: candidate patches per option draw.
        iou_rule: "any" or "all".
        min_scale: smallest patch side relative to the image side.
        max_scale: largest patch side relative to the image side.
        min_aspect_ratio: smallest patch width / height.
        max_aspect_ratio: largest patch width / height.
        max_option_draws: bound on option draws before keeping the whole image.
        size: optional output (height, width): the patch is resized to it in the same step
            (bilinear), which saves copying the patch out of a large zoom-out canvas.
        p: probability of applying the crop.
    """

    _targets = (Targets.IMAGE, Targets.BBOXES)

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_CROP_MIN_IOUS,
        num_trials: int = 50,
        iou_rule: Literal["any", "all"] = "any",
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        max_option_draws: int = 100,
        size: tuple[int, int] | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if iou_rule not in ("any", "all"):
            raise ValueError(f"iou_rule must be 'any' or 'all', got {iou_rule!r}")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if num_trials < 1 or max_option_draws < 1:
            raise ValueError("num_trials and max_option_draws must be >= 1")
        self.min_ious = tuple(None if v is None else float(v) for v in min_ious)
        self.num_trials = int(num_trials)
        self.iou_rule = iou_rule
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.min_aspect_ratio = float(min_aspect_ratio)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.max_option_draws = int(max_option_draws)
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            boxes = np.zeros((0, 4))
        else:  # (G, 4 + K) normalised -> (G, 4) pixels
            boxes = np.asarray(bboxes, dtype=np.float64)[:, :4] * (w, h, w, h)
        for _ in range(self.max_option_draws):
            min_iou = self.py_random.choice(self.min_ious)
            if min_iou is None:
                break
            patch = self._sample_patch(h, w, boxes, min_iou)
            if patch is not None:
                return {"crop_coords": patch}
        return {"crop_coords": (0, 0, w, h)}

    def _sample_patch(
        self, h: int, w: int, boxes: np.ndarray, min_iou: float
    ) -> tuple[int, int, int, int] | None:
        """First of ``num_trials`` random patches that meets the rules, or None.

        Shape:
            boxes: (G, 4) xyxy pixels.
        """
        rng = self.random_generator
        size = rng.uniform(self.min_scale, self.max_scale, (self.num_trials, 2)) * (w, h)
        size = np.maximum(size.astype(np.int64), 1)  # (T, 2) patch w, h
        aspect = size[:, 0] / size[:, 1]
        ok = (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
        origin = (rng.random((self.num_trials, 2)) * (np.array([w, h]) - size)).astype(np.int64)
        patches = np.concatenate([origin, origin + size], axis=1)  # (T, 4) xyxy
        if len(boxes):
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2)
            inside = (
                (centres[None, :, 0] > patches[:, None, 0])
                & (centres[None, :, 0] < patches[:, None, 2])
                & (centres[None, :, 1] > patches[:, None, 1])
                & (centres[None, :, 1] < patches[:, None, 3])
            )  # (T, G) centre rule
            iou = _iou_patches_boxes(patches.astype(np.float64), boxes)  # (T, G)
            reached = iou.max(axis=1) if self.iou_rule == "any" else iou.min(axis=1)
            ok &= inside.any(axis=1) & (reached >= min_iou)
        hits = np.flatnonzero(ok)
        if len(hits) == 0:
            return None
        return tuple(int(v) for v in patches[hits[0]])  # type: ignore[return-value]

    def apply(
        self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        x0, y0, x1, y1 = crop_coords
        patch = img[y0:y1, x0:x1]
        if self.size is None:
            return patch
        return cv2.resize(patch, self.size[::-1], interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        # bboxes: (N, 4 + K) xyxy normalised to the input image; returned normalised to the patch.
        h, w = params["shape"][:2]
        x0, y0, x1, y1 = crop_coords
        if (x0, y0, x1, y1) == (0, 0, w, h):
            return bboxes
        px = bboxes[:, :4] * (w, h, w, h)
        cx, cy = (px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2
        keep = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)  # centre-in-patch rule
        out = bboxes[keep].copy()
        pw, ph = x1 - x0, y1 - y0
        out[:, [0, 2]] = np.clip(px[keep][:, [0, 2]] - x0, 0, pw) / pw
        out[:, [1, 3]] = np.clip(px[keep][:, [1, 3]] - y0, 0, ph) / ph
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return (
            "min_ious",
            "num_trials",
            "iou_rule",
            "min_scale",
            "max_scale",
            "min_aspect_ratio",
            "max_aspect_ratio",
            "max_option_draws",
            "size",
        )


class NormalizeToTensor(A.ImageOnlyTransform):
    """Normalise a uint8 (H, W, C) image into a contiguous (C, H, W) float32 tensor, one pass.

    ``(x / 255 - mean) / std`` per channel through a 256-entry float LUT per channel, written
    straight into CHW planes (A.Normalize + ToTensorV2 give a strided view that is copied again
    when the batch is stacked: about 3x the time).

    Args:
        mean: per-channel mean in 0-1 units.
        std: per-channel std in 0-1 units.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], p: float = 1.0) -> None:
        super().__init__(p=p)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        values = np.arange(256, dtype=np.float64) / 255.0
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")
        if max(self.mean) > 1.0 or min(self.std) <= 0.0:
            raise ValueError(f"mean/std must be in 0-1 units (torchvision), got {mean}, {std}")
        self._luts = [
            ((values - m) / s).astype(np.float32) for m, s in zip(self.mean, self.std, strict=True)
        ]

    def apply(self, img: np.ndarray, **params: Any) -> torch.Tensor:
        if img.dtype != np.uint8:
            raise TypeError(f"NormalizeToTensor expects uint8, got {img.dtype}")
        planes = cv2.split(img)
        out = np.empty((len(planes), *img.shape[:2]), np.float32)
        for plane, lut, dst in zip(planes, self._luts, out, strict=True):
            cv2.LUT(plane, lut, dst=dst)
        return torch.from_numpy(out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std")


class ToTensorUint8(A.ImageOnlyTransform):
    """A uint8 (H, W, C) image as a contiguous uint8 (C, H, W) tensor, normalised later on the
    device (``data.assign_on=device``): a quarter of the bytes of a float32 image."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> torch.Tensor:
        if img.dtype != np.uint8:
            raise TypeError(f"ToTensorUint8 expects uint8, got {img.dtype}")
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class DetectionTransform:
    """Runs an albumentations pipeline over a dataset sample.

    Input: the sample contract {image uint8 (H, W, 3) RGB, boxes float32 (n, 4) xyxy pixels,
    labels int64 (n,), image_id, orig_size, optional iscrowd/difficult bool (n,)}.
    Output: {image float32 (3, h, w) tensor, boxes float32 (m, 4) xyxy pixels of the output
    image, labels int64 (m,), iscrowd bool (m,), difficult bool (m,), image_id, orig_size}; the
    m <= n kept boxes are row-aligned with their labels and flags.

    Args:
        transforms: the albumentations transforms, ending with ``NormalizeToTensor``.
        min_box_size: boxes narrower or lower than this (pixels, after any step) are dropped.
        seed: seed of the pipeline's random generators (see `set_random_seed`).
    """

    def __init__(
        self, transforms: Sequence[A.BasicTransform], min_box_size: float = 1.0, seed: int = 0
    ) -> None:
        bbox_params = A.BboxParams(
            format="pascal_voc",
            label_fields=list(LABEL_FIELDS),
            min_width=min_box_size,
            min_height=min_box_size,
            clip=True,
            filter_invalid_bboxes=True,
            # Filter once at the end, not after every step (~1 ms per sample): our crop drops
            # boxes by the centre rule itself and the other steps cannot empty a box.
            check_each_transform=False,
        )
        self.compose = A.Compose(list(transforms), bbox_params=bbox_params)
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        """Seed one numpy and one Python generator shared by all transforms.

        albumentations 2.0's ``Compose(seed=s)`` gives every transform its own generator with
        the same seed, so two p=0.5 transforms would always fire together; sharing one pair
        keeps their draws independent. Called again in each DataLoader worker.
        """
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        n = len(sample["boxes"])
        flags = {
            k: np.asarray(sample.get(k, np.zeros(n, bool)), dtype=np.uint8)
            for k in LABEL_FIELDS[1:]
        }
        out = self.compose(
            image=sample["image"],
            bboxes=np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(sample["labels"], dtype=np.int64),
            **flags,
        )
        # albumentations returns label columns as floats, or [] when no box is left.
        return {
            "image": out["image"],
            "boxes": np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
            "labels": np.rint(np.asarray(out["labels"], dtype=np.float64)).astype(np.int64),
            "iscrowd": np.asarray(out["iscrowd"], dtype=np.float64) > 0.5,
            "difficult": np.asarray(out["difficult"], dtype=np.float64) > 0.5,
            "image_id": sample["image_id"],
            "orig_size": tuple(sample["orig_size"]),
        }


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def build_train_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    zoom_out_p: float = 0.5,
    max_zoom: float = 4.0,
    crop: bool = True,
    photometric: bool = True,
    flip_p: float = 0.5,
    crop_trials: int = 50,
    crop_iou_rule: Literal["any", "all"] = "any",
    channel_swap_p: float = 0.5,
    min_box_size: float = 1.0,
    seed: int = 0,
    normalize: bool = True,
) -> DetectionTransform:
    """The SSD training augmentation (SSD paper, Sec. 2.2 and 3.6).

    Photometric distortion + channel swap, zoom-out on a mean-coloured canvas, IoU random crop,
    resize (bilinear) to ``image_size``, horizontal flip, normalise with ``mean``/``std`` (0-1
    units, as torchvision), CHW float tensor.

    Args:
        image_size: model input size, int or (h, w).
        mean: per-channel RGB mean in 0-1 units (also the zoom-out fill colour).
        std: per-channel RGB std in 0-1 units.
        zoom_out_p: probability of the zoom-out.
        max_zoom: largest canvas/image side ratio.
        crop: whether to run the IoU random crop.
        photometric: whether to run the photometric distortion and channel swap.
        flip_p: probability of the horizontal flip.
        crop_trials: candidate patches per crop option draw.
        crop_iou_rule: "any" or "all" (see `SSDRandomIoUCrop`).
        channel_swap_p: probability of a random channel permutation.
        min_box_size: boxes smaller than this many pixels on a side are dropped.
        seed: seed of the augmentation generators.
        normalize: end with a normalised float32 tensor; False: a uint8 tensor, normalised
            on the device (``data.assign_on=device``).
    """
    steps: list[A.BasicTransform] = []
    if photometric:
        steps += [SSDPhotometricDistort(), A.ChannelShuffle(p=channel_swap_p)]
    if zoom_out_p > 0:
        fill = tuple(255.0 * m for m in mean)
        steps.append(SSDZoomOut(fill=fill, max_scale=max_zoom, p=zoom_out_p))
    h, w = _size_hw(image_size)
    if crop:  # the crop resizes its patch itself
        steps.append(SSDRandomIoUCrop(num_trials=crop_trials, iou_rule=crop_iou_rule, size=(h, w)))
    else:
        steps.append(A.Resize(h, w, interpolation=cv2.INTER_LINEAR))
    if flip_p > 0:
        # Flipping commutes with the resize; after it, it moves 300x300 pixels, not the patch.
        steps.append(A.HorizontalFlip(p=flip_p))
    steps.append(NormalizeToTensor(mean, std) if normalize else ToTensorUint8())
    return DetectionTransform(steps, min_box_size=min_box_size, seed=seed)


def build_eval_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    normalize: bool = True,
) -> DetectionTransform:
    """Resize (bilinear) + normalise (or a uint8 tensor, ``normalize=False``); ``orig_size``
    travels along to rescale predictions.

    Boxes are only rescaled (min_box_size 0: nothing but zero-size boxes is dropped); the
    original boxes for evaluation are kept by the caller, not taken from here.
    """
    h, w = _size_hw(image_size)
    last = NormalizeToTensor(mean, std) if normalize else ToTensorUint8()
    steps = [A.Resize(h, w, interpolation=cv2.INTER_LINEAR), last]
    return DetectionTransform(steps, min_box_size=0.0)
