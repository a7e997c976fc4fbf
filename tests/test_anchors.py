import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from ssd_lightning.anchors import SSD300_ASPECT_RATIOS, DefaultBoxes, boxes_per_location

SSD300_MAPS = [38, 19, 10, 5, 3, 1]
SSD512_MAPS = [64, 32, 16, 8, 4, 2, 1]
SSD512_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]
COCO_SIZES = [21, 45, 99, 153, 207, 261, 315]
STEPS = [8, 16, 32, 64, 100, 300]


def torchvision_boxes(image_size, maps, ratios, **kwargs):
    generator = DefaultBoxGenerator([list(r) for r in ratios], **kwargs)
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    features = [torch.zeros(1, 1, h, w) for h, w in maps]
    return generator(images, features)[0] / torch.tensor(image_size[::-1] * 2)


def test_counts_match_the_paper():
    assert boxes_per_location(SSD300_ASPECT_RATIOS) == [4, 6, 6, 6, 4, 4]
    assert len(DefaultBoxes(300, SSD300_MAPS)) == 8732
    assert len(DefaultBoxes(512, SSD512_MAPS, aspect_ratios=SSD512_RATIOS)) == 24564


def test_one_cell_map_written_out_by_hand():
    # One 1x1 map, s_min = 0.2, s_(m+1) = 1: square 0.2, extra square sqrt(0.2), ratio 2 pair.
    boxes = DefaultBoxes(100, [1], aspect_ratios=[[2]], s_min=0.2, s_max=0.9)
    r2 = math.sqrt(2)
    expected = torch.tensor(
        [
            [0.5, 0.5, 0.2, 0.2],
            [0.5, 0.5, math.sqrt(0.2), math.sqrt(0.2)],
            [0.5, 0.5, 0.2 * r2, 0.2 / r2],
            [0.5, 0.5, 0.2 / r2, 0.2 * r2],
        ]
    )
    torch.testing.assert_close(boxes.cxcywh, expected)
    torch.testing.assert_close(boxes.xyxy[0], torch.tensor([0.4, 0.4, 0.6, 0.6]))


def test_layout_is_row_major_cells_with_boxes_of_a_cell_together():
    boxes = DefaultBoxes(300, [2, 1], aspect_ratios=[[2], [2]])
    centres = boxes.cxcywh[:16, :2].reshape(4, 4, 2)
    assert (centres == centres[:, :1]).all()  # 4 boxes of a cell share a centre
    torch.testing.assert_close(
        centres[:, 0], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    )


@pytest.mark.parametrize("image_size", [(300, 300), (240, 320)])
def test_equal_to_torchvision_with_scale_formula(image_size):
    maps = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    ours = DefaultBoxes(image_size, maps, s_min=0.2, s_max=0.9)
    theirs = torchvision_boxes(image_size, maps, SSD300_ASPECT_RATIOS, min_ratio=0.2, max_ratio=0.9)
    torch.testing.assert_close(ours.xyxy, theirs)


def test_equal_to_torchvision_ssd300_coco_table_with_steps():
    maps = [(s, s) for s in SSD300_MAPS]
    ours = DefaultBoxes(300, maps, sizes=COCO_SIZES, steps=STEPS)
    scales = [s / 300 for s in COCO_SIZES]
    theirs = torchvision_boxes((300, 300), maps, SSD300_ASPECT_RATIOS, scales=scales, steps=STEPS)
    torch.testing.assert_close(ours.xyxy, theirs)


def test_clip_modes():
    clipped = DefaultBoxes(300, SSD300_MAPS, s_max=0.95)
    free = DefaultBoxes(300, SSD300_MAPS, s_max=0.95, clip=False)
    assert clipped.cxcywh[:, 2:].max() <= 1.0
    assert free.cxcywh[:, 2:].max() > 1.0


def test_settings_rebuild_the_same_boxes():
    boxes = DefaultBoxes(300, SSD300_MAPS, sizes=COCO_SIZES, steps=STEPS, clip=False)
    assert torch.equal(DefaultBoxes(**boxes.settings()).cxcywh, boxes.cxcywh)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aspect_ratios": [[2]] * 5}, "aspect-ratio lists"),
        ({"sizes": [10, 20, 30]}, "sizes needs 7"),
        ({"steps": [8, 16]}, "steps needs 6"),
    ],
)
def test_inconsistent_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DefaultBoxes(300, SSD300_MAPS, **kwargs)
