import numpy as np
import torch

from ssd_lightning.visualize import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PALETTE,
    class_color,
    draw_detections,
    prediction_grid,
)

NAMES = ["circle", "square"]
GREY = (90, 100, 110)


def grey_image(h=64, w=80):
    return np.broadcast_to(np.array(GREY, dtype=np.uint8), (h, w, 3)).copy()


def test_draw_detections_colours_box_edges_by_class():
    image = grey_image()
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0], [45.0, 5.0, 75.0, 60.0]])
    labels = torch.tensor([1, 2])
    out = draw_detections(image, boxes, labels, torch.tensor([0.9, 0.8]), NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == GREY).all(), "input modified in place"
    # Middle of each box's left and bottom edges (away from the label above the box).
    assert tuple(out[35, 10]) == class_color(1) == PALETTE[1]
    assert tuple(out[50, 25]) == class_color(1)
    assert tuple(out[32, 45]) == class_color(2) == PALETTE[2]
    assert tuple(out[35, 25]) == GREY  # inside the box: untouched


def test_no_boxes_or_all_below_threshold_returns_image_unchanged():
    image = grey_image()
    empty = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    np.testing.assert_array_equal(empty, image)
    low = draw_detections(
        image, np.array([[10, 10, 30, 30]]), np.array([1]), np.array([0.1]), score_threshold=0.3
    )
    np.testing.assert_array_equal(low, image)


def test_ground_truth_without_scores_is_drawn():
    out = draw_detections(grey_image(), np.array([[10, 10, 30, 30]]), np.array([22]))
    assert tuple(out[27, 10]) == class_color(22) == PALETTE[2]  # palette wraps around


def normalise(pixels_hwc):
    x = torch.from_numpy(pixels_hwc).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )


def tile_origin(index, h, w, ncol=4, pad=2):
    return pad + (index // ncol) * (h + pad), pad + (index % ncol) * (w + pad)


def test_prediction_grid_layout_denormalisation_and_box_scaling():
    h, w = 64, 80
    images = torch.stack([normalise(grey_image(h, w))] * 3)
    # Boxes are given in the original image (twice the network input size) and rescaled.
    orig_sizes = torch.tensor([[2 * h, 2 * w]] * 3)
    preds = [
        {
            "boxes": torch.tensor([[20.0, 40.0, 80.0, 100.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        }
    ] * 3
    targets = [
        {"boxes": torch.tensor([[90.0, 10.0, 150.0, 120.0]]), "labels": torch.tensor([2])}
    ] * 3
    grid = prediction_grid(images, preds, targets, NAMES, orig_sizes=orig_sizes)
    assert grid.dtype == torch.uint8
    # 6 tiles (pred, GT per image), 4 per row, padding 2.
    assert grid.shape == (3, 2 * (h + 2) + 2, 4 * (w + 2) + 2)
    pixels = grid.permute(1, 2, 0).numpy()
    for i in range(3):
        py, px = tile_origin(2 * i, h, w)
        gy, gx = tile_origin(2 * i + 1, h, w)
        # Denormalised background is the original grey (within rounding).
        assert np.abs(pixels[py + 40, px + 30].astype(int) - GREY).max() <= 1
        # Prediction box (10, 20, 40, 50) in input pixels: left edge at x=10.
        assert tuple(pixels[py + 35, px + 10]) == class_color(1)
        assert np.abs(pixels[gy + 35, gx + 10].astype(int) - GREY).max() <= 1  # not on GT tile
        # GT box (45, 5, 75, 60): left edge at x=45.
        assert tuple(pixels[gy + 32, gx + 45]) == class_color(2)


def test_prediction_grid_caps_images():
    images = torch.zeros(10, 3, 16, 16)
    preds = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 10
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 10
    grid = prediction_grid(images, preds, targets, max_images=3)
    assert grid.shape == (3, 2 * 18 + 2, 4 * 18 + 2)  # 6 tiles -> 2 rows of 4
