import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from ssd_lightning.data.transforms import (
    DetectionTransform,
    NormalizeToTensor,
    SSDPhotometricDistort,
    SSDRandomIoUCrop,
    SSDZoomOut,
    build_eval_transform,
    build_train_transform,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Pure colours per label, far from the grey background and from the mean-colour canvas.
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}


def painted_sample(height: int = 240, width: int = 320) -> dict:
    """Grey image with three disjoint solid rectangles, one colour per label."""
    image = np.full((height, width, 3), 128, np.uint8)
    boxes = np.array([[20, 30, 100, 90], [150, 40, 290, 200], [40, 140, 120, 230]], np.float32)
    for (x0, y0, x1, y1), label in zip(boxes.astype(int), (1, 2, 3), strict=True):
        image[y0:y1, x0:x1] = COLOURS[label]
    return {
        "image": image,
        "boxes": boxes,
        "labels": np.array([1, 2, 3], np.int64),
        "iscrowd": np.array([False, True, False]),
        "difficult": np.array([True, False, False]),
        "image_id": 7,
        "orig_size": (height, width),
    }


def denormalise(image) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float pixels 0-255."""
    chw = image.numpy()
    return (chw * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]).transpose(
        1, 2, 0
    ) * 255


def colour_mask(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.abs(pixels - np.array(colour)).max(axis=-1) < 30


def compose(*transforms) -> A.Compose:
    params = A.BboxParams(format="pascal_voc", label_fields=["labels"])
    return A.Compose(list(transforms), bbox_params=params, seed=0)


@pytest.mark.parametrize("seed", range(40))
def test_train_boxes_cover_their_pixels(seed):
    transform = build_train_transform(300, MEAN, STD, photometric=False, seed=seed)
    sample = painted_sample()
    out = transform(sample)
    pixels = denormalise(out["image"])
    kept = set(out["labels"].tolist())
    for box, label in zip(out["boxes"], out["labels"], strict=True):
        mask = colour_mask(pixels, COLOURS[int(label)])
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, f"label {label} kept but its colour is gone"
        # The coloured region lies within the box (bilinear resampling blurs edges by < 2 px).
        x0, y0, x1, y1 = box
        assert xs.min() >= x0 - 2 and xs.max() + 1 <= x1 + 2
        assert ys.min() >= y0 - 2 and ys.max() + 1 <= y1 + 2
        if x1 - x0 > 8 and y1 - y0 > 8:
            inner = mask[int(y0) + 3 : int(y1) - 3, int(x0) + 3 : int(x1) - 3]
            assert inner.all(), f"label {label}: box interior is not its colour"
    # Flags travel with their boxes: label 1 is difficult, label 2 is crowd.
    for label, difficult, crowd in zip(
        out["labels"], out["difficult"], out["iscrowd"], strict=True
    ):
        assert difficult == (label == 1) and crowd == (label == 2)
    assert out["labels"].dtype == np.int64 and out["boxes"].dtype == np.float32
    assert kept <= {1, 2, 3}


def test_eval_transform_resizes_normalises_and_keeps_original_size():
    sample = painted_sample(240, 320)
    out = build_eval_transform(300, MEAN, STD)(sample)
    assert tuple(out["image"].shape) == (3, 300, 300)
    assert out["orig_size"] == (240, 320) and out["image_id"] == 7
    grey = (128 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out["image"][:, 5, 150].numpy(), grey, atol=1e-5)
    expected = sample["boxes"] * np.array([300 / 320, 300 / 240] * 2, np.float32)
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-3)
    np.testing.assert_array_equal(out["labels"], [1, 2, 3])
    assert out["labels"].dtype == np.int64


def test_eval_transform_rectangular_size():
    out = build_eval_transform((200, 400), MEAN, STD)(painted_sample())
    assert tuple(out["image"].shape) == (3, 200, 400)


def test_degenerate_boxes_dropped_with_labels_and_flags_aligned():
    sample = painted_sample()
    sample["boxes"] = np.array(
        [[10, 10, 50, 50], [60, 60, 60, 80], [20, 20, 100, 90], [70, 70, 90, 70]], np.float32
    )
    sample["labels"] = np.array([1, 2, 3, 1], np.int64)
    sample["difficult"] = np.array([True, False, False, False])
    sample["iscrowd"] = np.array([False, False, True, False])
    out = build_eval_transform(300, MEAN, STD)(sample)
    np.testing.assert_array_equal(out["labels"], [1, 3])
    np.testing.assert_array_equal(out["difficult"], [True, False])
    np.testing.assert_array_equal(out["iscrowd"], [False, True])
    assert out["boxes"].shape == (2, 4)


def test_boxes_below_min_size_dropped_after_resize():
    sample = painted_sample()
    sample["boxes"] = np.array([[10, 10, 50, 50], [100, 100, 101.5, 140]], np.float32)
    sample["labels"] = np.array([1, 2], np.int64)
    sample["difficult"] = sample["iscrowd"] = np.zeros(2, bool)
    # 1.5 px wide at 320 wide -> 0.47 px at 100 wide: below min_box_size = 1 px.
    transform = build_train_transform(
        100, MEAN, STD, zoom_out_p=0, crop=False, photometric=False, flip_p=0
    )
    out = transform(sample)
    np.testing.assert_array_equal(out["labels"], [1])


def test_no_boxes_gives_empty_int64_arrays():
    sample = painted_sample()
    sample.update(
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros(0, np.int64),
        iscrowd=np.zeros(0, bool),
        difficult=np.zeros(0, bool),
    )
    for seed in range(10):
        out = build_train_transform(300, MEAN, STD, seed=seed)(sample)
        assert out["boxes"].shape == (0, 4) and out["labels"].dtype == np.int64
        assert out["iscrowd"].shape == (0,) and tuple(out["image"].shape) == (3, 300, 300)


def test_flip_mirrors_boxes():
    transform = build_train_transform(
        300, MEAN, STD, zoom_out_p=0, crop=False, photometric=False, flip_p=1.0
    )
    sample = painted_sample(300, 300)
    out = transform(sample)
    expected = sample["boxes"][:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array(
        [300, 0, 300, 0]
    )
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-3)
    pixels = denormalise(out["image"])
    assert colour_mask(pixels[35:85, 205:275], COLOURS[1]).all()  # mirrored red box


def test_zoom_out_keeps_every_object_and_places_image_on_mean_canvas():
    fill = (124.0, 116.0, 104.0)
    zoom = SSDZoomOut(fill=fill, max_scale=4.0, p=1.0)
    sample = painted_sample()
    pipeline = compose(zoom)
    sizes = []
    for _ in range(30):
        out = pipeline(image=sample["image"], bboxes=sample["boxes"], labels=sample["labels"])
        left, top, right, bottom = zoom.params["pad_ltrb"]
        canvas = out["image"]
        h, w = sample["image"].shape[:2]
        assert canvas.shape == (h + top + bottom, w + left + right, 3)
        assert 1.0 <= canvas.shape[1] / w <= 4.0 and 1.0 <= canvas.shape[0] / h <= 4.0
        np.testing.assert_array_equal(canvas[top : top + h, left : left + w], sample["image"])
        fill_pixels = np.all(canvas == np.array([124, 116, 104]), axis=-1).sum()
        assert fill_pixels == canvas.shape[0] * canvas.shape[1] - h * w
        np.testing.assert_array_equal(out["labels"], [1, 2, 3])
        np.testing.assert_allclose(
            out["bboxes"], sample["boxes"] + [left, top, left, top], atol=1e-3
        )
        sizes.append(canvas.shape[1] / w)
    assert max(sizes) > 2.0 and min(sizes) < 2.0  # the scale is drawn, not fixed


def _iou(patch, boxes):
    lt = np.maximum(patch[:2], boxes[:, :2])
    rb = np.minimum(patch[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(patch) + area(boxes) - inter)


@pytest.mark.parametrize(
    ("rule", "min_iou"), [("any", 0.1), ("any", 0.3), ("any", 0.5), ("any", 0.7), ("all", 0.1)]
)
def test_crop_respects_iou_rule_and_centre_rule(rule, min_iou):
    crop = SSDRandomIoUCrop(min_ious=(min_iou,), iou_rule=rule, max_option_draws=5)
    sample = painted_sample()
    boxes = sample["boxes"]
    pipeline = compose(crop)
    h, w = sample["image"].shape[:2]
    cropped = 0
    for _ in range(40):
        out = pipeline(image=sample["image"], bboxes=boxes, labels=sample["labels"])
        patch = np.array(crop.params["crop_coords"], np.float64)
        if tuple(patch) == (0, 0, w, h):
            continue  # no patch found in the bounded draws: whole image kept
        cropped += 1
        pw, ph = patch[2] - patch[0], patch[3] - patch[1]
        assert 0.3 * w - 1 <= pw <= w and 0.3 * h - 1 <= ph <= h and 0.5 <= pw / ph <= 2.0
        iou = _iou(patch, boxes)
        assert (iou.max() if rule == "any" else iou.min()) >= min_iou
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((centres > patch[:2]) & (centres < patch[2:]), axis=1)
        on_edge = np.any(np.isclose(centres, patch[:2]) | np.isclose(centres, patch[2:]), axis=1)
        if on_edge.any():
            continue  # a centre exactly on the patch edge: float rounding decides
        assert inside.any()
        np.testing.assert_array_equal(out["labels"], sample["labels"][inside])
        expected = np.clip(boxes[inside] - np.tile(patch[:2], 2), 0, [pw, ph, pw, ph])
        np.testing.assert_allclose(out["bboxes"], expected, atol=1e-3)
        assert out["image"].shape == (ph, pw, 3)
    assert cropped > 0


def test_crop_unsatisfiable_keeps_whole_image():
    # Two far-apart boxes: no patch has IoU >= 0.9 with both.
    crop = SSDRandomIoUCrop(min_ious=(0.9,), iou_rule="all", max_option_draws=3)
    sample = painted_sample()
    out = compose(crop)(image=sample["image"], bboxes=sample["boxes"], labels=sample["labels"])
    assert out["image"].shape == sample["image"].shape
    np.testing.assert_allclose(out["bboxes"], sample["boxes"])


def test_crop_without_boxes_crops_freely():
    crop = SSDRandomIoUCrop(min_ious=(0.7,))
    image = np.zeros((200, 300, 3), np.uint8)
    pipeline = compose(crop)
    shapes = {
        pipeline(image=image, bboxes=np.zeros((0, 4)), labels=[])["image"].shape for _ in range(5)
    }
    assert any(s != image.shape for s in shapes)


def test_crop_options_are_all_drawn():
    crop = SSDRandomIoUCrop()
    sample = painted_sample()
    pipeline = compose(crop)
    whole = 0
    for _ in range(140):
        pipeline(image=sample["image"], bboxes=sample["boxes"], labels=sample["labels"])
        whole += crop.params["crop_coords"] == (0, 0, 320, 240)
    # "keep the whole image" is one of seven options, and unsatisfied draws retry: ~1/7 of calls.
    assert 5 <= whole <= 45


def test_photometric_golden_brightness_then_contrast():
    image = np.array([[[0, 100, 250]]], np.uint8)
    distort = SSDPhotometricDistort()
    out = distort.apply(image, brightness=20.0, contrast=1.5, contrast_first=True)
    np.testing.assert_array_equal(out, [[[30, 180, 255]]])  # (x + 20) * 1.5, saturated
    out = distort.apply(image, brightness=-20.0, contrast=0.5, contrast_first=False)
    np.testing.assert_array_equal(out, [[[0, 40, 115]]])


def test_photometric_saturation_and_hue():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    distort = SSDPhotometricDistort()
    grey = distort.apply(image, saturation=0.0)
    assert np.abs(grey.astype(int) - grey[..., :1]).max() == 0  # no saturation: R = G = B
    # Full turn of hue: back to the image up to the uint8 HSV round trip.
    turn = distort.apply(image, hue=360.0, saturation=1.0001)
    assert np.abs(turn.astype(int) - image).max() <= 8
    # +120 deg maps pure red to pure green.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    green = distort.apply(red, hue=120.0)
    assert green[0, 0, 1] > 240 and green[0, 0, 0] < 15 and green[0, 0, 2] < 15


def test_photometric_matches_float_reference():
    """uint8 LUT path vs a float re-implementation of the Caffe steps (per-step saturation)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    distort = SSDPhotometricDistort()
    for brightness, contrast, first, saturation in [(12, 1.3, True, 0.7), (-25, 0.8, False, 1.4)]:
        out = distort.apply(
            image,
            brightness=brightness,
            contrast=contrast,
            contrast_first=first,
            saturation=saturation,
        )
        x = np.clip(image.astype(np.float32) + brightness, 0, 255)
        if first:
            x = np.clip(x * contrast, 0, 255)
        hsv = cv2.cvtColor(x / 255.0, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
        if not first:
            x = np.clip(x * contrast, 0, 255)
        assert np.abs(out.astype(np.float32) - x).mean() < 2.0


def test_photometric_draws_each_step_with_its_probability():
    distort = SSDPhotometricDistort()
    distort.set_random_seed(0)
    params = [distort.get_params() for _ in range(2000)]
    for key, identity in [
        ("brightness", 0.0),
        ("contrast", 1.0),
        ("saturation", 1.0),
        ("hue", 0.0),
    ]:
        rate = np.mean([p[key] != identity for p in params])
        assert 0.45 < rate < 0.55, key
    assert all(abs(p["hue"]) <= 18 and abs(p["brightness"]) <= 32 for p in params)
    assert 0.45 < np.mean([p["contrast_first"] for p in params]) < 0.55


def test_seeded_pipeline_is_reproducible_and_draws_independently():
    sample = painted_sample()
    a = build_train_transform(300, MEAN, STD, seed=3)
    b = build_train_transform(300, MEAN, STD, seed=3)
    c = build_train_transform(300, MEAN, STD, seed=4)
    outs_a = [a(sample)["boxes"] for _ in range(5)]
    outs_b = [b(sample)["boxes"] for _ in range(5)]
    outs_c = [c(sample)["boxes"] for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(
        x.shape == y.shape and np.allclose(x, y) for x, y in zip(outs_a, outs_c, strict=True)
    )
    # albumentations' Compose(seed=s) would give zoom-out and flip (both p=0.5) the same
    # generator state, so they would always fire together; ours must not.
    transform = build_train_transform(300, MEAN, STD, crop=False, photometric=False, seed=0)
    zoom, flip = (
        t for t in transform.compose.transforms if isinstance(t, (SSDZoomOut, A.HorizontalFlip))
    )
    fired = []
    for _ in range(100):
        transform(sample)
        fired.append((bool(zoom.params), bool(flip.params)))
    assert sum(z != f for z, f in fired) > 20


def test_detection_transform_accepts_samples_without_flags():
    sample = painted_sample()
    del sample["iscrowd"], sample["difficult"]
    out = DetectionTransform(build_eval_transform(300, MEAN, STD).compose.transforms)(sample)
    assert not out["iscrowd"].any() and not out["difficult"].any() and len(out["labels"]) == 3


def test_normalize_to_tensor_matches_albumentations():
    image = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ours = NormalizeToTensor(MEAN, STD)(image=image)["image"]
    reference = A.Compose([A.Normalize(mean=MEAN, std=STD), ToTensorV2()])(image=image)["image"]
    assert ours.shape == (3, 30, 40) and ours.is_contiguous() and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_crop_with_size_resizes_the_patch():
    crop = SSDRandomIoUCrop(min_ious=(0.3,), size=(50, 60))
    sample = painted_sample()
    for _ in range(10):
        out = compose(crop)(image=sample["image"], bboxes=sample["boxes"], labels=sample["labels"])
        x0, y0, x1, y1 = crop.params["crop_coords"]
        assert out["image"].shape == (50, 60, 3)
        # Boxes are in the resized patch's pixels.
        scale = np.array([60 / (x1 - x0), 50 / (y1 - y0)] * 2)
        kept = np.isin(sample["labels"], out["labels"])
        shifted = np.clip(sample["boxes"][kept] - [x0, y0, x0, y0], 0, [x1 - x0, y1 - y0] * 2)
        np.testing.assert_allclose(out["bboxes"], shifted * scale, atol=1e-2)


def test_normalisation_in_pixel_units_is_rejected():
    with pytest.raises(ValueError, match="0-1 units"):
        build_eval_transform(300, (123.0, 117.0, 104.0), (1.0, 1.0, 1.0))
