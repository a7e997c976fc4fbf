import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from ssd_lightning.anchors import (
    PAPER_ASPECT_RATIOS,
    SSD300_ASPECT_RATIOS,
    AnchorSettingsError,
    DefaultBoxes,
    aspect_ratios_for,
    boxes_per_location,
    scales_for,
)
from ssd_lightning.config import compose_config

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
    # the rule gives both networks their paper ratios
    assert aspect_ratios_for(PAPER_ASPECT_RATIOS, 6) == [list(r) for r in SSD300_ASPECT_RATIOS]
    assert aspect_ratios_for(PAPER_ASPECT_RATIOS, 7) == SSD512_RATIOS
    assert len(DefaultBoxes(512, SSD512_MAPS)) == 24564


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


def preset(name: str) -> dict:
    """A conf/anchors preset as composed by Hydra."""
    cfg = compose_config([f"anchors={name}", "experiment=tiny"], output_dir="/tmp/unused")
    return {k: v for k, v in dict(cfg.anchors).items()}


def plain(settings: dict) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(settings), resolve=True)


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("ssd300_voc", [30, 60, 111, 162, 213, 264, 315]),
        ("ssd300_coco", [21, 45, 99, 153, 207, 261, 315]),
    ],
)
def test_caffe_presets_give_the_caffe_tables_at_300(name, sizes):
    """Caffe's ssd_pascal.py / ssd_coco.py rule reproduces their tables exactly."""
    boxes = DefaultBoxes(300, SSD300_MAPS, **plain(preset(name)))
    assert boxes.describe()["sizes_px"] == sizes and boxes.steps == STEPS
    table = DefaultBoxes(300, SSD300_MAPS, sizes=sizes, steps=STEPS)
    assert torch.equal(boxes.cxcywh, table.cxcywh)
    scales = [s / 300 for s in sizes]
    theirs = torchvision_boxes(
        (300, 300), [(m, m) for m in SSD300_MAPS], SSD300_ASPECT_RATIOS, scales=scales, steps=STEPS
    )
    torch.testing.assert_close(boxes.xyxy, theirs)


def test_ssd512_preset_gives_the_ssd512_table_and_steps():
    boxes = DefaultBoxes(512, SSD512_MAPS, **plain(preset("ssd512")))
    assert boxes.describe()["sizes_px"] == [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]
    assert boxes.steps == [8, 16, 32, 64, 128, 256, 512]


def test_paper_preset_equals_torchvision_default_generator():
    maps = [(m, m) for m in SSD300_MAPS]
    boxes = DefaultBoxes(300, maps, **plain(preset("ssd300")))
    theirs = torchvision_boxes((300, 300), maps, SSD300_ASPECT_RATIOS, min_ratio=0.2, max_ratio=0.9)
    torch.testing.assert_close(boxes.xyxy, theirs)


@pytest.mark.parametrize("name", ["ssd300", "ssd300_voc", "ssd300_coco", "ssd512", "ssd160"])
@pytest.mark.parametrize("maps", [[20, 10, 5, 3, 1], [12, 6, 3, 1], SSD300_MAPS, SSD512_MAPS])
def test_every_preset_fits_any_number_of_maps_and_its_scales_change_the_boxes(name, maps):
    settings = plain(preset(name))
    boxes = DefaultBoxes(160, maps, **settings)
    scales = boxes.scales()
    assert len(scales) == len(maps) + 1 and scales == sorted(scales)
    for key, value in (("s_min", settings["s_min"] + 0.05), ("s_max", settings["s_max"] - 0.1)):
        other = DefaultBoxes(160, maps, **{**settings, key: value})
        assert not torch.equal(other.cxcywh, boxes.cxcywh), key


def test_scales_golden_values():
    assert scales_for(6, 0.2, 0.9, 0.1, "step", True) == [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]
    assert scales_for(5, 0.2, 0.9, 0.1, "step", True) == [0.1, 0.2, 0.43, 0.66, 0.89, 1.12]
    assert scales_for(3, 0.2, 0.8) == pytest.approx([0.2, 0.5, 0.8, 1.0])
    assert scales_for(1, 0.3, 0.9) == [0.3, 1.0]


def test_aspect_ratio_forms():
    assert aspect_ratios_for([2], 3) == [[2.0]] * 3
    assert aspect_ratios_for({"first": [[2]], "middle": [2, 3]}, 3) == [[2.0], [2.0, 3.0]] * 1 + [
        [2.0, 3.0]
    ]
    with pytest.raises(AnchorSettingsError, match="6 per-map lists but the network has 5"):
        aspect_ratios_for(SSD300_ASPECT_RATIOS, 5)
    with pytest.raises(AnchorSettingsError, match=r"1 first and 2 last maps .* has 2"):
        aspect_ratios_for(PAPER_ASPECT_RATIOS, 2)
    with pytest.raises(AnchorSettingsError, match="unknown rule keys"):
        aspect_ratios_for({"begin": [[2]]}, 2)


def test_power_of_two_steps():
    assert DefaultBoxes(160, [20, 10, 5, 3, 1], steps="power_of_two").steps == pytest.approx(
        [8, 16, 32, 160 / 3, 160]
    )


def test_size_table_and_scales_together_are_an_error():
    with pytest.raises(AnchorSettingsError, match=r"anchors\.sizes .* contradicts anchors\.s_min"):
        DefaultBoxes(300, SSD300_MAPS, sizes=COCO_SIZES, s_min=0.1)
    with pytest.raises(AnchorSettingsError, match=r"contradicts anchors\.first_scale"):
        DefaultBoxes(300, SSD300_MAPS, sizes=COCO_SIZES, first_scale=0.1)


def test_map_slices_and_grids_follow_the_layout():
    boxes = DefaultBoxes(300, SSD300_MAPS)
    assert [s.stop - s.start for s in boxes.map_slices] == [5776, 2166, 600, 150, 36, 4]
    assert boxes.map_of_box.bincount().tolist() == [5776, 2166, 600, 150, 36, 4]
    grid = boxes.map_grid(2)  # 10x10 cells, 6 boxes each
    assert grid.shape == (10, 10, 6, 4)
    assert torch.equal(grid[1, 2, 0, :2], torch.tensor([0.25, 0.15]))


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
        ({"aspect_ratios": [[2]] * 5}, "5 per-map lists but the network has 6"),
        ({"sizes": [10, 20, 30]}, "sizes needs 7"),
        ({"steps": [8, 16]}, "steps has 2 entries but the network has 6"),
    ],
)
def test_inconsistent_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DefaultBoxes(300, SSD300_MAPS, **kwargs)
