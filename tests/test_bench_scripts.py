"""scripts/bench_train.py and scripts/gpu_check.py: their measurements on fake clocks, and CPU
smoke runs in tiny settings (subprocesses, so their global settings stay theirs), writing only
into tmp_path."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import dataloader as torch_dataloader

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@functools.cache
def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, cwd: Path) -> str:
    """Run a script as its users do; returns its output, fails the test with it otherwise."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


# ---------------------------------------------------------------- measurement


def test_step_times_window_waits_and_gap() -> None:
    """images/s over the steps after warm-up; waits counted only inside that window."""
    times = script("bench_train").StepTimes(warmup=2, steps=3, device=torch.device("cpu"))
    times.created = 0.0
    times.starts = [0.5, 1.2, 2.1, 3.3, 4.1]
    times.ends = [1.0, 2.0, 3.0, 4.0, 5.0]  # window: 2.0 -> 5.0, 3 steps
    times.cpu_ends = [0.5, 1.0, 1.5, 2.0, 2.5]  # half a CPU second per step
    waits = [(0.1, 0.5), (2.0, 2.1), (3.1, 3.3), (5.5, 6.0)]  # first and last outside
    out = times.summary(images_per_step=8, waits=waits)
    assert out["images_per_s"] == pytest.approx(8 * 3 / 3.0)
    assert out["images_per_cpu_s"] == pytest.approx(8 * 3 / 1.5)
    assert out["step_ms"] == pytest.approx(1000.0)
    assert out["data_wait"] == pytest.approx((0.1 + 0.2) / 3.0)
    assert out["gap"] == pytest.approx((0.1 + 0.3 + 0.1) / 3.0)
    assert out["first_step_s"] == pytest.approx(0.5)
    assert out["warmup_s"] == pytest.approx(2.0)


def test_step_times_refuse_an_unfinished_run() -> None:
    times = script("bench_train").StepTimes(warmup=1, steps=2, device=torch.device("cpu"))
    times.start()
    times.end()
    with pytest.raises(RuntimeError, match="only 1 of 3 steps"):
        times.summary(4, [])


def test_loader_next_is_timed_then_restored() -> None:
    original = torch_dataloader._BaseDataLoaderIter.__next__
    loader = DataLoader(list(range(10)), batch_size=3)
    with script("bench_train").timed_loader_next() as calls:
        batches = list(loader)
    assert len(batches) == 4 and len(calls) == 5  # 4 batches and the StopIteration
    assert all(end >= start for start, end in calls)
    assert torch_dataloader._BaseDataLoaderIter.__next__ is original
    list(loader)
    assert len(calls) == 5


def test_goals_judged_on_the_fastest_bf16_run() -> None:
    judge = script("gpu_check").judge_goals
    run = {"path": "lightning", "precision": "bf16-mixed", "assign_on": "device"}
    sections = {
        "training": {
            "batch_size": 32,
            "runs": [
                {**run, "config": "bf16", "images_per_s": 1900.0, "peak_mib": 9000.0},
                {**run, "config": "bf16+cl", "images_per_s": 2100.0, "peak_mib": 9000.0},
                {**run, "config": "fp32", "precision": "32-true", "images_per_s": 5000.0,
                 "peak_mib": 20000.0},
                {**run, "config": "bf16+cl+compile", "skipped": "not enough time left"},
            ],
        },
        "ddp": {"efficiency": 0.85, "gpus": 8},
    }  # fmt: skip
    goals = judge(sections, "NVIDIA H200")
    speed = goals["train >= 2,000 images/s, bf16, one GPU"]
    assert speed["met"] and "2100 images/s (bf16+cl" in speed["detail"]
    assert goals["peak memory <= 10 GB at batch 32"]["met"]  # 9000 MiB = 9.44 GB
    assert goals["DDP >= 90% efficiency"]["met"] is False
    sections["training"]["runs"][1]["peak_mib"] = 9600.0  # 10.07 GB
    assert not judge(sections, "NVIDIA H200")["peak memory <= 10 GB at batch 32"]["met"]
    goals = judge({"training": {"status": "error", "error": "OOM"}}, "NVIDIA A100")
    assert all(goal["met"] is None for goal in goals.values())
    assert "OOM" in goals["train >= 2,000 images/s, bf16, one GPU"]["detail"]


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    gpu_check = script("gpu_check")
    options = ["--quick", "--cpu", "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")]
    check = gpu_check.Check(gpu_check.parse_args(options))
    check.section("broken", lambda c: {"value": 1 / 0}, needs_gpu=False)
    check.section("fine", lambda c: {"value": 1}, needs_gpu=False)
    check.section("gpu only", lambda c: {"value": 2}, needs_gpu=True)
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["broken"]["status"] == "error"
    assert "ZeroDivisionError" in sections["broken"]["error"]
    assert sections["fine"] == {"status": "ok", "value": 1, "seconds": sections["fine"]["seconds"]}
    assert sections["gpu only"] == {"status": "skipped", "reason": "no CUDA device"}
    assert "| broken | error |" in (tmp_path / "gpu_check.md").read_text()


# ---------------------------------------------------------------- smoke runs


def test_bench_train_tiny_run(tmp_path: Path) -> None:
    """All three paths with the GT assigned on the device, one timed run each."""
    out = tmp_path / "result.json"
    printed = run_script(
        "bench_train", "--experiment", "tiny", "--warmup", "1", "--steps", "2", "--repeats", "1",
        "--workers", "0", "--assign-on", "device", "--threads", "1",
        "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {
        "lightning / device",
        "plain / device",
        "torchvision / device",
    }
    for row in result["medians"].values():
        assert row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0
        assert 0 <= row["data_wait"] < 1
    assert set(result["ratios"]) == {
        "lightning / device vs plain / device",
        "torchvision / device vs plain / device",
        "lightning / device vs torchvision / device",
    }
    assert result["config"]["batch_size"] == 8 and result["config"]["image_size"] == 96
    assert "Lightning within 5% of the plain loop (assign on device)" in printed
    assert "lightning / device vs torchvision / device:" in printed
    assert {p.name for p in tmp_path.iterdir()} == {"result.json", "runs", "cache"}


def test_gpu_check_without_gpu_writes_its_summary(tmp_path: Path) -> None:
    """The CPU path (as in CI): GPU sections skipped with a line each, the rest measured."""
    out = tmp_path / "check"
    printed = run_script(
        "gpu_check", "--quick", "--cpu", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
        "--work-dir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((out / "gpu_check.json").read_text())
    sections = summary["sections"]
    for name in ("training", "postprocess", "ddp"):
        assert sections[name] == {"status": "skipped", "reason": "no CUDA device"}
        assert f"{name}: skipped (no CUDA device)" in printed
    for name in ("environment", "data", "data_pipeline", "evaluation"):
        assert sections[name]["status"] == "ok", sections[name]
    assert {r["assign_on"] for r in sections["data_pipeline"]["runs"]} == {"device", "worker"}
    assert sections["evaluation"]["seconds_per_5k"] > 0
    assert summary["goals"]["all"]["met"] is None
    text = (out / "gpu_check.md").read_text()
    assert "| training | skipped |" in text and "## Evaluation" in text
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md"}
    assert {p.name for p in tmp_path.iterdir()} <= {"check", "cache", "work"}


@pytest.mark.slow
def test_gpu_sections_run_on_the_cpu(tmp_path: Path) -> None:
    """The GPU sections' code on the CPU: training rows, post-processing, DDP on 2 processes."""
    out = tmp_path / "check"
    run_script(
        "gpu_check", "--quick", "--cpu", "--gpu-sections-on-cpu", "--configs", "fp32",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
        "--work-dir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    runs = sections["training"]["runs"]
    assert [(r["path"], r["assign_on"]) for r in runs] == [
        ("lightning", "device"), ("lightning", "worker"),
        ("plain-cached", "device"), ("torchvision", "device"),
    ]  # fmt: skip
    assert all(r["images_per_s"] > 0 for r in runs), runs
    assert all(r["same_detections"] for r in sections["postprocess"]["runs"])
    assert [r["devices"] for r in sections["ddp"]["runs"]] == [1, 2]
    assert sections["ddp"]["efficiency"] > 0


@pytest.mark.slow
def test_bench_train_worker_path_and_loss_before_the_sync_free_step(tmp_path: Path) -> None:
    revision = "fd819f9^"
    known = subprocess.run(["git", "-C", str(SCRIPTS), "cat-file", "-e", revision],
                           capture_output=True)  # fmt: skip
    if known.returncode != 0:
        pytest.skip(f"git revision {revision} is not in this checkout")
    out = tmp_path / "result.json"
    run_script(
        "bench_train", "--experiment", "tiny", "--warmup", "1", "--steps", "2", "--repeats", "1",
        "--workers", "1", "--assign-on", "worker", "--paths", "lightning", "plain",
        "--compare-loss", revision, "--threads", "1", "--out", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache"), "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    medians = json.loads(out.read_text())["medians"]
    assert set(medians) == {
        "lightning / worker",
        "plain / worker",
        f"plain-loss-{revision} / worker",
    }
    assert medians["lightning / worker"]["workers"] == 1
