"""Anchor coverage analysis: golden cases, known answers on synthetic boxes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from ssd_lightning.anchor_analysis import (
    POSITIVE_BINS,
    coverage,
    grid_iou_stats,
    records_boxes,
    suggest_scales,
    summarize,
)
from ssd_lightning.anchor_report import format_report, format_suggestion, plot_sizes
from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.anchors_cli import analyse
from ssd_lightning.config import compose_config, compose_option
from ssd_lightning.data import AnnotationRecords
from ssd_lightning.encoder import SSDBoxCoder

SSD300_MAPS = [38, 19, 10, 5, 3, 1]


def two_map_boxes() -> DefaultBoxes:
    """2x2 map of squares 0.5 and sqrt(0.5 * 0.8), 1x1 map of squares 0.8 and sqrt(0.8)."""
    return DefaultBoxes(100, [2, 1], [[], []], s_min=0.5, s_max=0.8)


def map_of_default(db: DefaultBoxes) -> torch.Tensor:
    counts = [h * w * k for (h, w), k in zip(db.feature_maps, db.boxes_per_location, strict=True)]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def random_images(n: int, max_boxes: int, size: tuple[int, int], seed: int = 0):
    """Random xyxy pixel boxes, 0..max_boxes per image, sides from 2 px to most of the image."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = []
    for _ in range(n):
        k = int(torch.randint(0, max_boxes + 1, (1,), generator=g))
        wh = (0.01 + 0.9 * torch.rand(k, 2, generator=g) ** 2) * torch.tensor([w, h])
        xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
        images.append(torch.cat([xy, xy + wh], dim=1))
    return images, [size] * n


def test_golden_two_map_case():
    db = two_map_boxes()
    gt = [
        torch.tensor([[0.0, 0, 50, 50], [0, 0, 100, 100]]),  # = map-0 cell (0,0); whole image
        torch.tensor([[200.0, 100, 400, 200]]),  # 400x200 image: map-0 cell (1,1) after resize
        torch.tensor([[0.0, 0, 10, 10]]),  # far smaller than every default box
        torch.zeros(0, 4),  # an image without objects
    ]
    report = coverage(gt, [(100, 100), (200, 400), (100, 100), (50, 50)], db)
    # [0,0,.5,.5]: IoU 1 with its square, 0.25/0.4 = 0.625 with the extra square of its cell.
    # Whole image: IoU 0.8 with sqrt(0.8)^2 = 0.8 and 0.64 with 0.8^2, both on map 1.
    # 10x10 box: best 0.01/0.25 = 0.04, only the forced match.
    torch.testing.assert_close(report.best_iou, torch.tensor([1.0, 0.8, 1.0, 0.04]))
    assert report.best_map.tolist() == [0, 1, 0, 0]
    assert report.positives_per_map.tolist() == [[2, 0], [0, 2], [2, 0], [1, 0]]
    assert report.covered.tolist() == [True, True, True, False]
    assert report.size_class.tolist() == [1, 2, 2, 0]  # 2500 px^2 medium, 10000 / 20000 large
    torch.testing.assert_close(report.size[2], torch.tensor([50.0, 50.0]))  # after the resize
    assert report.num_images == 4 and report.num_defaults == 10
    summary = summarize(report)
    assert summary["all"]["coverage"] == 0.75
    assert summary["all"]["positives_hist"]["1"] == 0.25
    assert summary["by_size"]["small"]["coverage"] == 0.0
    assert [m["best_share"] for m in summary["by_map"]] == [0.75, 0.25]
    assert summary["by_map"][1]["positives_per_gt"] == 0.5


def test_bipartite_step_takes_a_positive_from_a_better_fitting_box():
    """The tiny box in the same image is forced onto the extra square of the 50 px box."""
    report = coverage(
        [torch.tensor([[0.0, 0, 50, 50], [0, 0, 10, 10]])], [(100, 100)], two_map_boxes()
    )
    assert report.positives.tolist() == [1, 1]


def test_gt_equal_to_default_boxes_is_fully_covered():
    db = DefaultBoxes(300, SSD300_MAPS)
    maps = map_of_default(db)
    g = torch.Generator().manual_seed(0)
    chosen = torch.randperm(int((maps <= 3).sum()), generator=g)[:60]  # maps 0-3: unclipped
    pixels = db.xyxy[chosen] * 300
    # Three images of different original sizes, boxes scaled to them: the same after the resize.
    sizes = [(300, 300), (600, 450), (150, 900)]
    scale = [torch.tensor([w / 300, h / 300] * 2) for h, w in sizes]
    gt = [pixels[i::3] * scale[i] for i in range(3)]
    report = coverage(gt, sizes, db)
    assert report.covered.all()
    torch.testing.assert_close(report.best_iou, torch.ones(60), atol=1e-5, rtol=0)
    assert report.best_map.tolist() == torch.cat([maps[chosen][i::3] for i in range(3)]).tolist()
    assert (report.positives >= 1).all()
    assert summarize(report)["all"]["coverage"] == 1.0


def test_tiny_gt_boxes_get_only_the_forced_match():
    db = DefaultBoxes(300, SSD300_MAPS)  # smallest default box side: 0.2 * 300 = 60 px
    xy = torch.rand(40, 2, generator=torch.Generator().manual_seed(1)) * 290
    gt = torch.cat([xy, xy + 3], dim=1)
    report = coverage([gt[:25], gt[25:]], [(300, 300)] * 2, db)
    stats = summarize(report)["all"]
    assert stats["coverage"] == 0.0 and stats["unmatched"] == 0.0
    assert report.positives.tolist() == [1] * 40  # exactly the forced (bipartite) one
    assert (report.best_iou > 0).all() and (report.best_iou < 0.01).all()
    assert (report.best_map == 0).all()
    assert stats["positives_hist"]["1"] == 1.0
    assert (report.size_class == 0).all()


@pytest.mark.parametrize(
    "db",
    [
        DefaultBoxes(300, SSD300_MAPS),
        DefaultBoxes(
            300,
            SSD300_MAPS,
            sizes=[21, 45, 99, 153, 207, 261, 315],
            steps=[8, 16, 32, 64, 100, 300],
        ),
        DefaultBoxes((200, 300), [(25, 38), (13, 19), (1, 1)], [[2], [3], [2, 3]], clip=False),
    ],
    ids=["ssd300", "coco-table-steps", "non-square-no-clip"],
)
def test_grid_stats_equal_the_full_iou_matrix(db):
    boxes = random_images(1, 3000, (1, 1))[0][0]
    best, best_map, count = grid_iou_stats(boxes, db, 0.5)
    iou = box_iou(boxes, db.xyxy)  # (N, A) torchvision reference
    full_best, full_arg = iou.max(dim=1)
    torch.testing.assert_close(best, full_best, atol=1e-5, rtol=0)
    clear = (full_best - iou.topk(2, dim=1).values[:, 1]) > 1e-4  # a unique best box
    assert torch.equal(best_map[clear], map_of_default(db)[full_arg][clear])
    near_threshold = ((iou - 0.5).abs() < 1e-5).any(dim=1)
    assert torch.equal(count[~near_threshold], (iou >= 0.5).sum(dim=1)[~near_threshold])


def test_positives_equal_per_image_matching_and_do_not_depend_on_batching():
    db = DefaultBoxes(300, SSD300_MAPS)
    gt, sizes = random_images(16, 12, (240, 320), seed=2)
    small_batches = coverage(gt, sizes, db, iou_threshold=0.4, max_iou_elements=1)
    big_batch = coverage(gt, sizes, db, iou_threshold=0.4, max_iou_elements=2**30)
    assert torch.equal(small_batches.positives_per_map, big_batch.positives_per_map)
    coder, maps = SSDBoxCoder(db.cxcywh, 0.4), map_of_default(db)
    expected = []
    for boxes in gt:  # reference: one image at a time
        if len(boxes) == 0:
            continue
        normalised = boxes / torch.tensor([320.0, 240.0] * 2)
        matched = coder.match(normalised[None], torch.ones(1, len(boxes), dtype=torch.bool))[0]
        per_map = torch.zeros(len(boxes), len(SSD300_MAPS), dtype=torch.long)
        positive = matched >= 0
        per_map.index_put_((matched[positive], maps[positive]), torch.tensor(1), accumulate=True)
        expected.append(per_map)
    assert torch.equal(big_batch.positives_per_map, torch.cat(expected))


def test_records_boxes_leave_out_crowd_regions():
    records = AnnotationRecords(
        paths=np.array([b"a.jpg", b"b.jpg", b"c.jpg"]),
        image_ids=np.arange(3),
        sizes=np.array([[100, 200], [50, 60], [10, 10]]),
        offsets=np.array([0, 2, 2, 4]),
        boxes=np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2], [0, 0, 9, 9]], np.float32),
        labels=np.array([1, 2, 1, 1]),
        difficult=np.zeros(4, bool),
        iscrowd=np.array([False, True, False, False]),
    )
    boxes, sizes = records_boxes(records)
    assert [b.tolist() for b in boxes] == [[[0, 0, 10, 10]], [], [[1, 1, 2, 2], [0, 0, 9, 9]]]
    assert sizes.tolist() == [[100, 200], [50, 60], [10, 10]]
    assert [len(b) for b in records_boxes(records, include_crowd=True)[0]] == [2, 0, 2]


def test_suggest_scales_recovers_the_generating_scales():
    truth = DefaultBoxes(300, SSD300_MAPS, s_min=0.15, s_max=0.75)
    pick = torch.randperm(len(truth), generator=torch.Generator().manual_seed(3))[:400]
    gt = [truth.xyxy[pick] * 300]
    suggestion = suggest_scales(gt, [(300, 300)], DefaultBoxes(300, SSD300_MAPS))
    assert (suggestion.s_min, suggestion.s_max) == (0.15, 0.75)
    assert suggestion.coverage == 1.0
    assert suggestion.mean_best_iou == pytest.approx(1.0, abs=1e-5)
    assert len(suggestion.grid) == 6 * 9 and suggestion.grid[0]["s_min"] == 0.15


def test_suggest_scales_is_close_on_jittered_boxes():
    """150 boxes per map around the s_min=0.1, s_max=0.8 default boxes, 10 % size noise."""
    truth = DefaultBoxes(300, SSD300_MAPS, s_min=0.1, s_max=0.8)
    g = torch.Generator().manual_seed(0)
    maps = map_of_default(truth)
    per_map = [torch.nonzero(maps == k).flatten() for k in range(len(SSD300_MAPS))]
    pick = torch.cat([idx[torch.randint(len(idx), (150,), generator=g)] for idx in per_map])
    cxcywh = truth.cxcywh[pick].clone()
    cxcywh[:, 2:] *= 1 + 0.1 * torch.randn(len(pick), 2, generator=g).clamp(-2, 2)
    cxcywh[:, :2] += 0.01 * torch.randn(len(pick), 2, generator=g)
    xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
    gt = [xyxy.clamp(0, 1) * 300]
    template = DefaultBoxes(300, SSD300_MAPS, sizes=[21, 45, 99, 153, 207, 261, 315])
    by_coverage = suggest_scales(gt, [(300, 300)], template)
    assert by_coverage.s_min == 0.1 and abs(by_coverage.s_max - 0.8) <= 0.15 + 1e-9
    paper = next(g for g in by_coverage.grid if (g["s_min"], g["s_max"]) == (0.2, 0.9))
    assert by_coverage.coverage > paper["coverage"] + 0.1
    by_iou = suggest_scales(gt, [(300, 300)], template, objective="iou")
    assert by_iou.s_min == 0.1 and abs(by_iou.s_max - 0.8) <= 0.1 + 1e-9


def test_suggest_scales_rejects_empty_input_and_grid():
    db = DefaultBoxes(300, SSD300_MAPS)
    with pytest.raises(ValueError, match="no GT boxes"):
        suggest_scales([torch.zeros(0, 4)], [(300, 300)], db)
    with pytest.raises(ValueError, match="s_min < s_max"):
        suggest_scales([torch.tensor([[0.0, 0, 9, 9]])], [(300, 300)], db, [0.5], [0.4])


def test_report_table_json_and_plot(tmp_path: Path):
    gt, sizes = random_images(20, 8, (300, 300), seed=5)
    reports = [
        coverage(gt, sizes, DefaultBoxes(300, SSD300_MAPS), name="paper"),
        coverage(gt, sizes, DefaultBoxes(300, SSD300_MAPS, s_min=0.1), name="small_first"),
    ]
    table = format_report(reports)
    lines = table.splitlines()
    assert lines[0] == "|  | paper | small_first |"
    assert all(line.count("|") == 4 for line in lines)  # no cell breaks the columns
    coverage_row = next(line for line in lines if line.startswith("| coverage"))
    assert f"{100 * float(reports[0].covered.float().mean()):.1f}%" in coverage_row
    summary = summarize(reports[0])
    assert json.loads(json.dumps(summary)) == summary
    assert sum(summary["by_size"][k]["num_gt"] for k in summary["by_size"]) == len(
        reports[0].best_iou
    )
    assert sum(summary["all"]["positives_hist"].values()) == pytest.approx(1.0)
    assert len(summary["all"]["positives_hist"]) == len(POSITIVE_BINS)
    path = plot_sizes(reports, tmp_path / "sizes.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_format_suggestion_flags_grid_edges():
    truth = DefaultBoxes(300, SSD300_MAPS, s_min=0.15, s_max=0.75)
    gt = [truth.xyxy[:500] * 300]
    text = format_suggestion(suggest_scales(gt, [(300, 300)], truth, [0.1, 0.15, 0.2], [0.7, 0.75]))
    assert "s_min=0.15 s_max=0.75" in text and "anchors.s_min=0.15 anchors.s_max=0.75" in text
    assert "s_max=0.75 is on the edge" in text and "s_min=0.15 is on the edge" not in text


def test_cli_analyse_on_tiny_experiment(tmp_path: Path, cache_dir: Path):
    cfg = compose_config(
        [
            "experiment=tiny",
            f"paths.cache_dir={cache_dir}",
            "compare=[ssd300,ssd300_coco]",  # presets composed by Hydra, as anchors=<name>
            "suggest=true",
            "s_min_values=[0.1,0.2]",
            "s_max_values=[0.8,0.9]",
            "progress=false",
        ],
        config_name="anchor_coverage",
        output_dir=tmp_path / "run",
    )
    result = analyse(cfg)
    names = [r["name"] for r in result["reports"]]
    assert names == ["anchors", "ssd300", "ssd300_coco", "suggested"]
    paper, coco = result["reports"][1], result["reports"][2]
    assert paper["anchors"]["feature_maps"] == [[12, 12], [6, 6], [3, 3], [1, 1]]  # measured
    assert result["reports"][0]["all"] == paper["all"]  # the tiny experiment uses ssd300
    assert coco["anchors"]["first_scale"] == 0.07 and paper["all"]["num_gt"] > 32
    assert coco["anchors"]["resolved"]["sizes_px"] == [6.72, 14.4, 49.92, 85.44, 120.96]
    assert result["suggestion"]["s_min"] in (0.1, 0.2) and len(result["suggestion"]["grid"]) == 4
    written = json.loads((tmp_path / "run" / "anchor_coverage.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "run" / "anchor_sizes.png").stat().st_size > 10_000
    assert "| suggested |" in (tmp_path / "run" / "anchor_coverage.md").read_text()


def test_cli_rejects_anchor_configs_that_do_not_fit_the_network(tmp_path, cache_dir):
    overrides = ["experiment=tiny", f"paths.cache_dir={cache_dir}", "progress=false"]
    cfg = compose_config(
        [*overrides, "anchors.aspect_ratios=[[2],[2],[2],[2],[2],[2]]"],
        config_name="anchor_coverage",
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="6 per-map lists but the network has 4 source maps"):
        analyse(cfg)
    cfg = compose_config(
        [*overrides, "compare=[nonexistent]"], config_name="anchor_coverage", output_dir=tmp_path
    )
    with pytest.raises(FileNotFoundError, match=r"known: .*ssd300_coco"):
        analyse(cfg)


def test_bccd_coverage_from_annotations_only(bccd_root: Path):
    cfg = compose_config(
        # SSD300's six maps at 300x300 (the experiment's own CPU network has five, at 256x256)
        [
            "experiment=bccd",
            f"data.root={bccd_root}",
            "model=ssd300_vgg16",
            "model.image_size=300",
            "anchors=ssd300",
        ],
        config_name="anchor_coverage",
        output_dir="unused",
    )
    from ssd_lightning.anchors_cli import dataset_boxes
    from ssd_lightning.config import network_on_meta

    gt, sizes = dataset_boxes(cfg.data.datamodule.train_dataset)
    assert len(gt) == 205 and sum(len(b) for b in gt) == 2804  # after one degenerate box is dropped
    net = network_on_meta(cfg)
    report = coverage(
        gt, sizes, DefaultBoxes.for_network(net, 300, **compose_option("anchors", "ssd300_coco"))
    )
    assert report.covered.float().mean() > 0.99  # blood cells fit the COCO size table
