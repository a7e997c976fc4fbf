"""COCO evaluation from arrays: equal to pycocotools on real COCO boxes, crowd objects, empty
and padding images, the torchmetrics backend, two DDP ranks on uneven shards, the benchmark."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from ssd_lightning.coco_eval import STAT_KEYS, COCOEvaluator, batch_rows
from ssd_lightning.error_analysis import confusion_matrix
from ssd_lightning.metrics import DetectionMetrics

TESTS = Path(__file__).resolve().parent
NAMES = ["a", "b", "c"]


@functools.cache
def bench() -> ModuleType:
    """scripts/bench_eval.py: its workload and pycocotools reference are the ones tested here."""
    spec = importlib.util.spec_from_file_location(
        "bench_eval", TESTS.parent / "scripts/bench_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(targets, preds, labels, batch=16):
    evaluator = COCOEvaluator(labels)
    for start in range(0, len(preds), batch):
        evaluator.update(preds[start : start + batch], targets[start : start + batch])
    return evaluator.compute()


def pycocotools_reference(targets, preds, sizes, num_classes):
    """pycocotools COCOeval on the same boxes, through a JSON ground-truth dict and loadRes."""
    ref = bench()
    gt = ref.coco_json(targets, sizes, num_classes)
    return ref.pycocotools_eval(gt, ref.result_json(ref.result_array(preds)))


def assert_same_as_pycocotools(curves, reference):
    diff = np.abs(curves.stats - reference.stats)
    assert diff.max() <= 1e-3, dict(zip(STAT_KEYS, diff, strict=True))
    # The arrays behind them too (what per-class PR curves will be drawn from).
    np.testing.assert_allclose(curves.precision, reference.eval["precision"], atol=1e-9)
    np.testing.assert_allclose(curves.recall, reference.eval["recall"], atol=1e-9)
    np.testing.assert_array_equal(curves.labels, reference.params.catIds)


@pytest.mark.parametrize(("seed", "per_image"), [(0, 100), (1, 20)])
def test_equals_pycocotools_on_coco128(coco128_root, seed, per_image):
    """Jittered, duplicated, missed, misclassified and false detections on coco128's GT."""
    targets, preds, sizes, names, _ = bench().workload(coco128_root, 128, per_image, seed)
    curves = evaluate(targets, preds, range(1, len(names) + 1))
    reference = pycocotools_reference(targets, preds, sizes, len(names) + 1)
    assert_same_as_pycocotools(curves, reference)
    assert 0.2 < curves.stats[0] < 0.8  # a workload where matching decides the figures


def test_crowd_objects_equal_pycocotools(coco128_root):
    """A quarter of the objects also difficult (found ones included): COCO's crowd rules."""
    targets, preds, sizes, names, _ = bench().workload(coco128_root, 128, 100, seed=2)
    gen = torch.Generator().manual_seed(0)
    targets = [
        {**t, "difficult": t["difficult"] | (torch.rand(len(t["labels"]), generator=gen) < 0.25)}
        for t in targets
    ]
    curves = evaluate(targets, preds, range(1, len(names) + 1))
    reference = pycocotools_reference(targets, preds, sizes, len(names) + 1)
    assert_same_as_pycocotools(curves, reference)


def test_detection_inside_crowd_box_is_ignored():
    # One object and one crowd region of class 1; a detection on each. The crowd one is
    # ignored (neither TP nor FP) even with the higher score.
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 300.0, 300.0]]),
        "labels": torch.tensor([1, 1]),
        "difficult": torch.tensor([False, True]),
    }
    pred = {
        "boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [150.0, 150.0, 200.0, 200.0]]),
        "scores": torch.tensor([0.5, 0.9]),
        "labels": torch.tensor([1, 1]),
    }
    stats = evaluate([target], [pred], [1]).summary()
    assert stats["mAP"] == pytest.approx(1.0)
    assert stats["AR_10"] == pytest.approx(1.0)
    assert stats["AR_1"] == 0.0  # maxDets=1 keeps only the top-scored one, on the crowd
    assert stats["mAP_large"] == -1.0  # the only large object is the crowd region


def test_rows_layout():
    rows = batch_rows(
        [torch.tensor([[1.0, 2.0, 4.0, 8.0]]), torch.zeros(0, 4), torch.tensor([[0, 0, 3, 3.0]])],
        [torch.tensor([0.9]), torch.zeros(0), torch.tensor([0.25])],
        [torch.tensor([2]), torch.zeros(0, dtype=torch.long), torch.tensor([1])],
        first_image=5,
    )
    expected = [[5, 1, 2, 3, 6, 0.9, 2], [7, 0, 0, 3, 3, 0.25, 1]]
    torch.testing.assert_close(rows, torch.tensor(expected, dtype=torch.float64))


def synthetic(num_images=11, seed=0):
    """Random objects of 3 classes (some difficult, some images empty) and their detections."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(num_images):
        n = int(torch.randint(0, 8, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 200
        wh = 8 + torch.rand(n, 2, generator=gen) * 150
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(1, 4, (n,), generator=gen),
                "difficult": torch.rand(n, generator=gen) < 0.15,
            }
        )
    preds = bench().make_detections(targets, [(400, 400)] * num_images, 4, 30, seed)
    return targets, preds


def empty_images(count):
    boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    pred = {"boxes": boxes, "scores": torch.zeros(0), "labels": labels}
    target = {"boxes": boxes, "labels": labels, "difficult": torch.zeros(0, dtype=torch.bool)}
    return [pred] * count, [target] * count


def test_empty_images_change_nothing():
    targets, preds = synthetic()
    plain = evaluate(targets, preds, [1, 2, 3], batch=4)
    pad_preds, pad_targets = empty_images(3)
    padded = evaluate(
        targets[:5] + pad_targets + targets[5:], preds[:5] + pad_preds + preds[5:], [1, 2, 3]
    )
    np.testing.assert_array_equal(padded.stats, plain.stats)
    np.testing.assert_array_equal(padded.precision, plain.precision)


def test_nothing_to_evaluate_is_undefined_and_no_detection_is_zero():
    assert set(COCOEvaluator([1, 2]).compute().summary().values()) == {-1.0}
    targets, _ = synthetic()
    no_preds, _ = empty_images(len(targets))
    stats = evaluate(targets, no_preds, [1, 2, 3]).summary()
    assert stats["mAP"] == 0.0
    assert stats["AR_100"] == 0.0


def test_torchmetrics_backend_agrees():
    """Same figures and arrays (to torchmetrics' float32 output) once its thresholds are
    pycocotools' float64 ones; with its float32 defaults mAP_large differs here by 1.6e-3."""
    targets, preds = synthetic(num_images=24, seed=3)
    results, precision = {}, {}
    for backend in ("faster_coco_eval", "torchmetrics"):
        metrics = DetectionMetrics(NAMES, backend=backend)
        for start in range(0, len(preds), 8):
            metrics.update(preds[start : start + 8], targets[start : start + 8])
        results[backend] = metrics.compute()
        curves = metrics.last_coco_eval
        assert curves.precision.shape == (10, 101, 3, 4, 3)
        assert curves.recall.shape == (10, 3, 4, 3)
        np.testing.assert_array_equal(curves.labels, [1, 2, 3])
        precision[backend] = curves.precision
    assert results["torchmetrics"] == pytest.approx(results["faster_coco_eval"], abs=1e-6)
    np.testing.assert_allclose(precision["torchmetrics"], precision["faster_coco_eval"], atol=1e-6)


# ---------------------------------------------------------------- DDP

WORKER = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_coco_eval import rank_results
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
url = f"tcp://127.0.0.1:{{port}}"
dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
with open(out, "w") as f:
    json.dump(rank_results(rank), f)
dist.destroy_process_group()
"""

_ORDER = torch.randperm(11, generator=torch.Generator().manual_seed(0)).tolist()
# Scenario -> images of rank 0 and of rank 1 (of 11), and empty images rank 1 adds.
SPLITS = {
    "uneven 7/4": (_ORDER[:7], _ORDER[7:], 0),
    "rank 1 padded": (_ORDER[:7], _ORDER[7:], 3),
    "rank 1 idle": (_ORDER, [], 0),
}


def run_metrics(targets, preds):
    """DetectionMetrics over the images in batches of 3: results and COCO precision."""
    metrics = DetectionMetrics(NAMES)
    for start in range(0, len(preds), 3):
        metrics.update(preds[start : start + 3], targets[start : start + 3])
    results = metrics.compute()
    curves = metrics.last_coco_eval
    return {
        "results": results,
        "precision": curves.precision.tolist(),
        # From the rows gathered on this rank: independent of the image order.
        "confusion": confusion_matrix(curves.dets, curves.gts, len(NAMES) + 1).tolist(),
    }


def rank_results(rank: int) -> dict[str, dict]:
    """This rank's share of each scenario, evaluated (a collective call per scenario)."""
    targets, preds = synthetic()
    out = {}
    for scenario, (*shards, padding) in SPLITS.items():
        images = shards[rank]
        shard_targets, shard_preds = [targets[i] for i in images], [preds[i] for i in images]
        if rank == 1:
            pad_preds, pad_targets = empty_images(padding)
            shard_targets, shard_preds = shard_targets + pad_targets, shard_preds + pad_preds
        out[scenario] = run_metrics(shard_targets, shard_preds)
    return out


def test_two_ranks_on_uneven_shards_equal_one_process(tmp_path):
    """gloo, 2 CPU processes: 7 + 4 images (also with empty padding, and with an idle rank)
    give every rank the one-process results of all 11 images, COCO and VOC, and the same
    confusion matrix from the gathered rows."""
    # Imported here: both import Lightning, which the workers (importing this file) need not.
    from ssd_lightning.ddp import _free_port
    from test_ddp import _env

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", port, str(tmp_path / f"{r}.json")],
            env=_env(),
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    targets, preds = synthetic()
    single = run_metrics(targets, preds)
    assert single["results"]["mAP"] > 0.1
    for scenario in SPLITS:
        for rank in ranks:
            got = rank[scenario]
            assert got["results"] == pytest.approx(single["results"], abs=1e-9), scenario
            np.testing.assert_allclose(got["precision"], single["precision"], atol=1e-12)
            assert got["confusion"] == single["confusion"], scenario


# ---------------------------------------------------------------- benchmark


def test_bench_eval_small_run(coco128_root, capsys):
    threads = str(torch.get_num_threads())  # unchanged for the tests that follow
    args = ["--root", str(coco128_root), "--images", "256", "--repeats", "1", "--threads", threads]
    out = bench().main(args)
    printed = capsys.readouterr().out
    assert "targets:" in printed and "pycocotools/ours" in printed
    assert out["targets"]["all 12 stats within 1e-3 of pycocotools"]
    assert max(out["stat_diff"].values()) <= 1e-3
    assert out["class_ap_diff"] <= 1e-3
    assert set(out["seconds"]) >= {"ours", "DetectionMetrics", "direct", "pycocotools"}
