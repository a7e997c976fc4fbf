"""Error analysis: the confusion matrix on a hand-made scene (golden counts) and against the
sequential rule, PR curves as slices of the COCO precision array, the files, the text report,
the validation callback on a tiny run, ssd-eval and the benchmark."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ssd_lightning.error_analysis as ea
from conftest import tiny_config
from ssd_lightning.coco_eval import COCOEvaluator
from ssd_lightning.error_analysis import (
    BELOW_THRESHOLD,
    FALSE_POSITIVE,
    IGNORED,
    analyse,
    confusion_matrix,
    match_detections,
    normalise_rows,
    pr_curves,
)
from ssd_lightning.error_report import format_report, save
from test_coco_eval import synthetic

NAMES = ["a", "b", "c"]


def rows(*boxes):
    """Result-array rows from ``(image, x1, y1, x2, y2, score | crowd, label)`` tuples."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 7)
    out[:, 3:5] -= out[:, 1:3]  # xyxy -> xywh
    return out


# Ground truth (label 1 a, 2 b, 3 c; the 6th value is the crowd flag).
GTS = rows(
    (0, 0, 0, 10, 10, 0, 1),  # g0 a: found (d0), then found again (d2: duplicate)
    (0, 20, 0, 30, 10, 0, 2),  # g1 b: detected as c (d1)
    (0, 40, 0, 50, 10, 0, 3),  # g2 c: its only detection scores below the threshold: missed
    (0, 100, 100, 200, 200, 1, 1),  # g3 crowd region a: d3 inside is ignored
    (1, 0, 0, 10, 10, 0, 1),  # g4 a: taken by d6 (b, higher score) before d7 (a)
    (1, 5, 0, 15, 10, 0, 1),  # g5 a: IoU 0.33 with d7, missed
    (2, 0, 0, 10, 10, 0, 1),  # g6 a: d9
    (2, 2, 0, 12, 10, 0, 2),  # g7 b: d8 (IoU 1 beats 0.67 with g6)
    (3, 0, 0, 20, 20, 1, 2),  # g8 crowd b without detections: not missed
)
DETS = rows(
    (0, 0, 0, 10, 10, 0.9, 1),  # d0 -> g0: [a, a]
    (0, 20, 0, 30, 10, 0.8, 3),  # d1 -> g1: [b, c]
    (0, 0, 0, 10, 8, 0.7, 1),  # d2: g0 taken: false positive [bg, a]
    (0, 110, 110, 150, 150, 0.6, 2),  # d3: in the crowd region: ignored
    (0, 300, 300, 310, 310, 0.5, 2),  # d4: false positive [bg, b]
    (0, 40, 0, 50, 10, 0.2, 3),  # d5: below 0.3
    (1, 1, 0, 11, 10, 0.95, 2),  # d6 -> g4 (IoU 0.82; 0.43 with g5): [a, b]
    (1, 0, 0, 10, 10, 0.9, 1),  # d7: g4 taken, g5 at 0.33: false positive [bg, a]
    (2, 2, 0, 12, 10, 0.9, 2),  # d8 -> g7: [b, b]
    (2, 0, 0, 10, 10, 0.8, 1),  # d9 -> g6: [a, a]
    (2, 1, 0, 11, 10, 0.7, 1),  # d10: both taken: false positive [bg, a]
    (4, 0, 0, 5, 5, 0.4, 3),  # d11: image without objects: false positive [bg, c]
)
# Rows: true background, a, b, c; columns: predicted background, a, b, c.
GOLDEN = np.array(
    [
        [0, 3, 1, 1],  # false positives: d2, d7, d10 (a), d4 (b), d11 (c)
        [1, 2, 1, 0],  # a: g5 missed, d0 + d9 right, g4 detected as b
        [0, 0, 1, 1],  # b: d8 right, g1 detected as c
        [1, 0, 0, 0],  # c: g2 missed
    ]
)


def test_golden_matches_and_counts():
    match = match_detections(DETS, GTS)
    fp, ignored, below = FALSE_POSITIVE, IGNORED, BELOW_THRESHOLD
    expected = [0, 1, fp, ignored, fp, below, 4, fp, 7, 6, fp, fp]
    np.testing.assert_array_equal(match, expected)
    np.testing.assert_array_equal(confusion_matrix(DETS, GTS, 4), GOLDEN)
    # Row order and image order do not matter.
    perm = np.random.default_rng(0).permutation(len(DETS))
    np.testing.assert_array_equal(confusion_matrix(DETS[perm], GTS[::-1], 4), GOLDEN)


def test_thresholds():
    low = confusion_matrix(DETS, GTS, 4, score_threshold=0.1)
    assert low[3, 3] == 1 and low[3, 0] == 0  # d5 now finds g2
    # At IoU 0.9, d2 (IoU 0.8 with g0) stays a false positive, d6 (0.82) misses g4 and d7
    # takes it: a right instead of a seen as b.
    strict = confusion_matrix(DETS, GTS, 4, iou_threshold=0.9)
    assert strict[1, 2] == 0 and strict[1, 1] == 3 and strict[0, 2] == 2


def test_crowd_and_difficult_are_ignored():
    """Crowd / difficult objects are neither matched nor missed; detections on them are not
    false positives; without the crowd flag they count."""
    np.testing.assert_array_equal(GOLDEN.sum(axis=1)[1:], [4, 2, 1])  # non-crowd objects
    plain = GTS.copy()
    plain[:, 5] = 0
    counts = confusion_matrix(DETS, plain, 4)
    assert counts[0, 2] == GOLDEN[0, 2] + 1  # d3 is now a false positive
    assert counts[1, 0] == GOLDEN[1, 0] + 1 and counts[2, 0] == GOLDEN[2, 0] + 1  # g3, g8 missed


def test_normalised_rows_and_ranking():
    fractions = normalise_rows(GOLDEN)
    np.testing.assert_allclose(fractions[1], [0.25, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(fractions[0], [0.0, 0.6, 0.2, 0.2])
    assert np.isnan(normalise_rows(np.zeros((2, 2), dtype=int))).all()
    analysis = ea.ErrorAnalysis(NAMES, GOLDEN, None, 0.3, 0.5)
    pairs = analysis.confused_pairs(5)
    # b as c (1 of 2 objects) before a as b (1 of 4): same count, larger fraction first.
    assert [(p.true, p.predicted, p.count) for p in pairs] == [("b", "c", 1), ("a", "b", 1)]
    assert pairs[0].fraction == pytest.approx(0.5)


def test_empty_inputs():
    empty = np.zeros((0, 7))
    assert confusion_matrix(empty, empty, 3).sum() == 0
    np.testing.assert_array_equal(confusion_matrix(empty, GTS, 4)[1:, 0], [4, 2, 1])
    np.testing.assert_array_equal(confusion_matrix(DETS, empty, 4)[0], [0, 5, 4, 2])
    with pytest.raises(ValueError, match=r"label 5 outside 1\.\.3"):
        confusion_matrix(rows((0, 0, 0, 1, 1, 0.9, 5)), empty, 4)


def sequential_match(dets, gts, score_threshold=0.3, iou_threshold=0.5):
    """The rule of the module docstring, one detection at a time (the reference)."""
    match = np.full(len(dets), BELOW_THRESHOLD)
    taken = set()
    order = sorted(range(len(dets)), key=lambda i: (dets[i, 0], -dets[i, 5], i))
    for i in order:
        if dets[i, 5] < score_threshold:
            continue
        best, best_iou, covered = FALSE_POSITIVE, iou_threshold, False
        for g in range(len(gts)):
            if gts[g, 0] != dets[i, 0]:
                continue
            (dx, dy, dw, dh), (gx, gy, gw, gh) = dets[i, 1:5], gts[g, 1:5]
            width = min(dx + dw, gx + gw) - max(dx, gx)
            height = min(dy + dh, gy + gh) - max(dy, gy)
            inter = max(width, 0.0) * max(height, 0.0)
            det_area = dets[i, 3] * dets[i, 4]
            if gts[g, 5] > 0:
                covered |= det_area > 0 and inter / det_area >= iou_threshold
                continue
            union = det_area + gts[g, 3] * gts[g, 4] - inter
            iou = inter / union if union > 0 else 0.0
            if g not in taken and iou >= best_iou and (best < 0 or iou > best_iou):
                best, best_iou = g, iou
        if best >= 0:
            taken.add(best)
        match[i] = best if best >= 0 else (IGNORED if covered else FALSE_POSITIVE)
    return match


def synthetic_rows(num_images=40, seed=0):
    targets, preds = synthetic(num_images, seed)
    evaluator = COCOEvaluator([1, 2, 3])
    evaluator.update(preds, targets)
    return evaluator.compute()


@pytest.mark.parametrize("chunk", [None, 7])
def test_vectorised_equals_sequential_rule(monkeypatch, chunk):
    """Jittered, duplicated, misclassified and false detections, crowd objects, empty images;
    also in chunks of 7 (detection, GT) pairs."""
    if chunk is not None:
        monkeypatch.setattr(ea, "_CHUNK_PAIRS", chunk)
    curves = synthetic_rows()
    dets, gts = curves.dets, curves.gts
    assert (gts[:, 5] > 0).any() and len(dets) > 500
    for score_threshold in (0.6, 0.3, 0.0):
        got = match_detections(dets, gts, score_threshold)
        np.testing.assert_array_equal(got, sequential_match(dets, gts, score_threshold))
    assert (got >= 0).sum() > 100 and (got == FALSE_POSITIVE).sum() > 500
    assert (got == IGNORED).sum() > 5


def test_pr_curves_are_the_precision_array_slices():
    curves = synthetic_rows()
    pr = pr_curves(curves, 4)
    for k, label in enumerate(curves.labels):
        np.testing.assert_array_equal(pr.precision_50[label - 1], curves.precision[0, :, k, 0, 2])
        np.testing.assert_array_equal(pr.scores_50[label - 1], curves.scores[0, :, k, 0, 2])
        np.testing.assert_allclose(
            pr.precision[label - 1], curves.precision[:, :, k, 0, 2].mean(axis=0)
        )
    np.testing.assert_array_equal(pr.recall, np.linspace(0, 1, 101))
    np.testing.assert_allclose(pr.ap, list(curves.per_class_ap().values()), atol=1e-12)
    np.testing.assert_allclose(np.nanmean(pr.ap_50), curves.summary()["mAP_50"], atol=1e-12)


def test_class_without_ground_truth_has_no_curve():
    targets, preds = synthetic(20)
    targets = [{k: v[t["labels"] != 3] for k, v in t.items()} for t in targets]
    evaluator = COCOEvaluator([1, 2, 3])
    evaluator.update(preds, targets)
    analysis = analyse(evaluator.compute(), NAMES)
    assert np.isnan(analysis.curves.precision_50[2]).all() and np.isnan(analysis.curves.ap[2])
    assert [name for name, *_ in analysis.worst_classes(5)] in (["a", "b"], ["b", "a"])
    assert analysis.matrix[3].sum() == 0 and analysis.matrix[0, 3] > 0  # c: only false positives


def test_files_and_report(tmp_path):
    curves = synthetic_rows()
    dets = curves.dets.copy()
    dets[::4, 6] = dets[::4, 6] % 3 + 1  # every 4th detection of another class: confusions
    analysis = analyse(dataclasses.replace(curves, dets=dets), NAMES)
    paths = save(analysis, tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {
        "pr_curves.png",
        "pr_curves.csv",
        "confusion_matrix.png",
        "confusion_matrix.csv",
        "confusion_matrix_normalised.csv",
    }
    for path in paths:
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = np.genfromtxt(tmp_path / "out/confusion_matrix.csv", delimiter=",", dtype=str)
    assert list(counts[0]) == ["true \\ predicted", "background", *NAMES]
    assert list(counts[1:, 0]) == ["background", *NAMES]
    np.testing.assert_array_equal(counts[1:, 1:].astype(int), analysis.matrix)
    fractions = np.genfromtxt(tmp_path / "out/confusion_matrix_normalised.csv", delimiter=",")
    np.testing.assert_allclose(fractions[2:, 1:], normalise_rows(analysis.matrix)[1:], atol=1e-6)
    pr = np.genfromtxt(tmp_path / "out/pr_curves.csv", delimiter=",", dtype=str)
    assert list(pr[0]) == ["class", "iou", "recall", "precision", "score"]
    assert len(pr) == 1 + 3 * 2 * 101
    at_50 = pr[(pr[:, 0] == "b") & (pr[:, 1] == "0.50")]
    np.testing.assert_allclose(
        at_50[:, 3].astype(float), analysis.curves.precision_50[1], atol=1e-6
    )

    text = format_report(analysis, top=2)
    worst = analysis.worst_classes(2)
    assert "worst classes" in text and "most confused pairs" in text
    lines = text.splitlines()
    assert lines[2].split()[:2] == [worst[0][0], f"{worst[0][1]:.3f}"]
    pair = analysis.confused_pairs(1)[0]
    assert any(line.split()[:3] == [pair.true, pair.predicted, str(pair.count)] for line in lines)


def test_many_classes_figures(tmp_path):
    """80 classes: the PR figure names only the worst, the matrix drops the cell counts."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(400, 2, generator=gen) * 300
    boxes = torch.cat([boxes, boxes + 30], 1)
    labels = torch.randint(1, 81, (400,), generator=gen)
    targets = [{"boxes": boxes[i::20], "labels": labels[i::20]} for i in range(20)]
    preds = [
        {"boxes": t["boxes"] + 2, "scores": torch.rand(20, generator=gen), "labels": t["labels"]}
        for t in targets
    ]
    evaluator = COCOEvaluator(range(1, 81))
    evaluator.update(preds, targets)
    names = [f"class{k}" for k in range(1, 81)]
    paths = save(analyse(evaluator.compute(), names), tmp_path)
    assert sum(p.suffix == ".png" for p in paths) == 2


# ---------------------------------------------------------------- training and ssd-eval


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    from ssd_lightning.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, cache_dir, "trainer.max_epochs=1")
    return out, cfg, train(cfg)


def test_validation_writes_analysis_and_tensorboard_figures(one_epoch_run):
    out, _, _ = one_epoch_run
    files = {p.name for p in (out / "analysis").iterdir()}
    assert {"pr_curves.png", "confusion_matrix.png", "confusion_matrix.csv"} <= files
    tags = []
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags += acc.Tags()["images"]
    assert {"val/pr_curves", "val/confusion_matrix"} <= set(tags)


def test_ssd_eval_prints_worst_classes_and_confused_pairs(one_epoch_run, capsys):
    from ssd_lightning.evaluate import evaluate

    out, cfg, metrics = one_epoch_run
    eval_dir = out / "eval"
    cfg = tiny_config(
        eval_dir,
        Path(cfg.paths.cache_dir),
        f"ckpt_path={metrics['last_checkpoint']}",
        "error_analysis.score_threshold=0.05",
        name="eval",
    )
    evaluate(cfg)
    printed = capsys.readouterr().out
    assert "worst classes" in printed and "most confused pairs" in printed
    assert any(name in printed for name in ("circle", "square", "triangle", "ellipse", "star"))
    folder = Path(cfg.output_json).parent
    for name in ("pr_curves.png", "confusion_matrix.png", "pr_curves.csv", "confusion_matrix.csv"):
        assert (folder / name).is_file(), name
    counts = np.genfromtxt(folder / "confusion_matrix.csv", delimiter=",", dtype=str)
    assert counts[2:, 1:].astype(int).sum() > 0


def test_bench_small_run(coco128_root, tmp_path, capsys):
    """scripts/bench_error_analysis.py on coco128 (crowd objects included): the vectorised
    matrix equals the per-image loop's."""
    spec = importlib.util.spec_from_file_location(
        "bench_error_analysis", Path(__file__).parents[1] / "scripts/bench_error_analysis.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = str(torch.get_num_threads())  # unchanged for the tests that follow
    args = ["--root", str(coco128_root), "--images", "128", "--repeats", "1", "--threads", threads]
    out = bench.main([*args, "--output", str(tmp_path)])
    assert out["identical"]
    assert "confusion matrix (vectorised)" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} >= {"confusion_matrix.png", "pr_curves.csv"}
