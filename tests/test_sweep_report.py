"""Sweep configs (composition) and the sweep report on fake and real multiruns."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from ssd_lightning.config import CONFIG_DIR
from ssd_lightning.sweep_report import main, report, scan_multirun, swept_keys
from ssd_lightning.sweeps import JobStatusCallback

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def sweep_values(cfg) -> dict[str, list[str]]:
    """The values each swept key takes, parsed as Hydra's basic sweeper parses them."""
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.key_or_group: [str(v) for v in o.sweep_iterator()] for o in parsed}


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("anchors", {"anchors.s_min": ["0.1", "0.15", "0.2"], "anchors.s_max": ["0.9", "1.05"]}),
        ("anchor_clip", {"anchors.clip": ["True", "False"]}),
        ("anchor_tables", {"anchors": ["ssd300", "ssd300_voc", "ssd300_coco"]}),
        ("neg_pos", {"loss.neg_pos_ratio": ["1", "2", "3", "5", "7"]}),
        ("demo", {"anchors.s_min": ["0.1", "0.2"], "loss.neg_pos_ratio": ["1", "3"]}),
        ("aspect_ratios", {"anchors.aspect_ratios": ["paper", "[2]", "[2, 3]"]}),
    ],
)
def test_sweep_configs_set_sweeper_params(sweep: str, expected: dict[str, list[str]]) -> None:
    cfg = compose_with_hydra("experiment=quickstart", f"+sweep={sweep}")
    assert sweep_values(cfg) == expected
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert cfg.hydra.callbacks.job_status._target_.endswith("JobStatusCallback")
    own = compose_with_hydra("experiment=quickstart").trainer.max_epochs
    assert cfg.trainer.max_epochs == own  # the experiment's schedule is kept


def test_sweeps_combine() -> None:
    cfg = compose_with_hydra("experiment=quickstart", "+sweep=[anchors,anchor_clip,neg_pos]")
    assert [len(v) for v in sweep_values(cfg).values()] == [3, 2, 2, 5]  # a 60-run grid


def test_optuna_sweeper_config() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="sweep extra not installed")
    cfg = compose_with_hydra("experiment=quickstart", "+sweep=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.params["loss.neg_pos_ratio"] == "choice(1, 2, 3, 5, 7)"


def test_slurm_launcher_config() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="sweep extra not installed")
    cfg = compose_with_hydra("+sweep=neg_pos", "hydra/launcher=slurm", "hydra.launcher.mem_gb=32")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.mem_gb) == (1, 1, 32)


# ---------------------------------------------------------------- report on a fake multirun


def make_run(
    root: Path, num: int, overrides: list[str], metrics: dict | None, log: str = ""
) -> Path:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (run / "train.log").write_text(log)
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def metrics(best: float, last: float, ap50: float, small: float, **extra) -> dict:
    return {"val/mAP": last, "val/mAP_50": ap50, "val/mAP_small": small, "best_mAP": best, **extra}


@pytest.fixture
def fake_multirun(tmp_path: Path) -> Path:
    """Three finished runs and one failed (traceback in its log) over two swept keys.

    Folder 10 sorts after 2 (numeric order, not string order).
    """
    root = tmp_path / "multi"
    common = ["experiment=tiny", "+sweep=neg_pos"]
    make_run(
        root, 0, [*common, "loss.neg_pos_ratio=1", "anchors=ssd300"], metrics(0.5, 0.4, 0.8, 0.1)
    )
    make_run(
        root,
        1,
        [*common, "loss.neg_pos_ratio=3", "anchors=ssd300"],
        metrics(0.6, 0.6, 0.9, 0.2, train_time_s=12.5),
    )
    make_run(
        root,
        2,
        [*common, "loss.neg_pos_ratio=7", "anchors=ssd300_voc"],
        metrics(0.3, 0.2, 0.5, 0.0),
    )
    log = (
        "[INFO] - start\nTraceback (most recent call last):\n  File x\n"
        "ValueError: anchors: steps needs 6 entries\n"
    )
    make_run(root, 10, [*common, "loss.neg_pos_ratio=5", "anchors=ssd300_voc"], None, log)
    return root


def test_scan_lists_finished_and_failed_runs(fake_multirun: Path) -> None:
    records = scan_multirun(fake_multirun)
    assert [r["run"] for r in records] == ["0", "1", "2", "10"]
    assert [r["status"] for r in records] == ["finished"] * 3 + ["failed"]
    assert records[3]["error"] == "ValueError: anchors: steps needs 6 entries"
    assert records[3]["best_mAP"] is None
    assert [r["best_mAP"] for r in records[:3]] == [0.5, 0.6, 0.3]
    assert (records[1]["mAP"], records[1]["mAP_50"], records[1]["mAP_small"]) == (0.6, 0.9, 0.2)
    assert records[1]["time_s"] == 12.5  # recorded by train; others from file times
    assert all(r["time_s"] is not None and r["time_s"] >= 0 for r in records)
    assert swept_keys(records) == ["loss.neg_pos_ratio", "anchors"]


def test_report_writes_csv_markdown_and_plots(fake_multirun: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    main([str(fake_multirun), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| run | loss.neg_pos_ratio | anchors | best_mAP |" in printed
    assert "common overrides: experiment=tiny sweep=neg_pos" in printed
    assert "| 10 | 5 | ssd300_voc |" in printed and "failed" in printed
    assert "best: loss.neg_pos_ratio=3 anchors=ssd300: best_mAP 0.6000 over 1 run(s)" in printed
    assert "no setting was run with two or more seeds" in printed  # so no noise claim

    with (out / "sweep_report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["finished", "finished", "finished", "failed"]
    assert [row["loss.neg_pos_ratio"] for row in rows] == ["1", "3", "7", "5"]
    assert math.isclose(float(rows[2]["mAP_50"]), 0.5)
    assert rows[3]["best_mAP"] == "" and "ValueError" in rows[3]["error"]
    assert (
        rows[0]["overrides"] == "experiment=tiny sweep=neg_pos loss.neg_pos_ratio=1 anchors=ssd300"
    )
    runs_table = (out / "sweep_report.md").read_text().split("Settings")[0]
    assert runs_table.count("\n| ") == 5  # header + 4 runs

    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["mAP_vs_anchors.png", "mAP_vs_loss.neg_pos_ratio.png"]
    assert all((out / p).read_bytes()[:8] == PNG_MAGIC for p in plots)


def seeded_multirun(root: Path, values: dict[str, list[float]], fingerprints: dict) -> Path:
    """Runs of several s_min settings, one per seed, with given best mAPs."""
    number = 0
    for s_min, maps in values.items():
        for seed, best in enumerate(maps, start=1):
            extra = {"anchor_coverage": float(s_min) + 0.5, "fingerprint": fingerprints[s_min]}
            make_run(
                root, number, [f"anchors.s_min={s_min}", f"seed={seed}"],
                metrics(best, best, best + 0.3, 0.1, **extra),
            )  # fmt: skip
            number += 1
    return root


def test_settings_average_seeds_and_judge_noise_by_a_pooled_t_test(tmp_path: Path) -> None:
    from scipy import stats

    values = {"0.1": [0.70, 0.72, 0.71], "0.2": [0.75, 0.76, 0.74], "0.3": [0.74, 0.70]}
    root = seeded_multirun(tmp_path / "multi", values, {"0.1": "a", "0.2": "b", "0.3": "c"})
    records = report(root)
    assert len(records) == 8
    with (root / "report" / "sweep_settings.csv").open() as f:
        rows = {row["setting"]: row for row in csv.DictReader(f)}
    best, worse, close = (
        rows["anchors.s_min=0.2"],
        rows["anchors.s_min=0.1"],
        rows["anchors.s_min=0.3"],
    )
    assert (best["rank"], best["n"], best["verdict"]) == ("1", "3", "best")
    assert float(best["best_mAP_mean"]) == pytest.approx(0.75)
    assert float(best["best_mAP_std"]) == pytest.approx(0.01)
    # pooled std over all three settings: sum of squares / (2 + 2 + 1) degrees of freedom
    squares = sum(sum((v - sum(m) / len(m)) ** 2 for v in m) for m in values.values())
    sd = math.sqrt(squares / 5)
    t = (0.75 - 0.71) / (sd * math.sqrt(1 / 3 + 1 / 3))
    assert float(worse["p_value"]) == pytest.approx(2 * stats.t.sf(t, 5))
    assert worse["verdict"] == "worse" and close["verdict"] == "within noise"
    assert float(close["anchor_coverage"]) == pytest.approx(0.8)
    text = (root / "report" / "sweep_report.md").read_text()
    assert "Rule: A setting differs from the best one when a two-sided t-test" in text
    assert "pooled, 5 degrees of freedom" in text and "**Runs" not in text
    assert (root / "report" / "mAP_vs_anchor_coverage.png").read_bytes()[:8] == PNG_MAGIC
    plots = sorted(p.name for p in (root / "report").glob("*.png"))
    assert plots == ["mAP_vs_anchor_coverage.png", "mAP_vs_anchors.s_min.png"]  # no mAP vs seed


def test_runs_with_one_fingerprint_are_flagged_in_bold(tmp_path: Path) -> None:
    values = {"0.1": [0.70], "0.2": [0.70]}
    root = seeded_multirun(tmp_path / "multi", values, {"0.1": "same", "0.2": "same"})
    report(root)
    text = (root / "report" / "sweep_report.md").read_text()
    assert "**Runs 0, 1 trained the same thing (fingerprint same)" in text
    assert "| 2 | anchors.s_min=0.2 | 1 | 0.7000 |" in text and "no replicates" in text


def test_job_status_file_and_incomplete_runs(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    run = make_run(root, 0, ["loss.neg_pos_ratio=1"], metrics(0.5, 0.5, 0.5, 0.5))
    (run / "job_status.json").write_text(
        json.dumps({"status": "failed", "error": "E: x", "time_s": 3.0})
    )
    make_run(root, 1, ["loss.neg_pos_ratio=2"], None)  # no metrics, no error: killed or running
    records = scan_multirun(root)
    assert [(r["status"], r["error"], r["time_s"]) for r in records[:1]] == [
        ("failed", "E: x", 3.0)
    ]
    assert (records[1]["status"], records[1]["error"]) == ("incomplete", None)
    with pytest.raises(FileNotFoundError):
        report(tmp_path / "empty")


@pytest.mark.parametrize("failed", [False, True])
def test_job_status_callback_writes_status(tmp_path: Path, failed: bool) -> None:
    config = OmegaConf.create(
        {"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(tmp_path)}}}
    )
    job = JobReturn(status=JobStatus.FAILED if failed else JobStatus.COMPLETED)
    job._return_value = ValueError("bad anchors") if failed else 0.5
    callback = JobStatusCallback()
    callback.on_job_start(config)
    callback.on_job_end(config, job)
    status = json.loads((tmp_path / "job_status.json").read_text())
    assert status["status"] == ("failed" if failed else "finished")
    assert status["error"] == ("ValueError: bad anchors" if failed else None)
    assert 0.0 <= status["time_s"] < 60.0


def test_job_status_callback_skips_ranks_without_run_folder(tmp_path: Path) -> None:
    config = OmegaConf.create(
        {"hydra": {"output_subdir": None, "runtime": {"output_dir": str(tmp_path)}}}
    )
    JobStatusCallback().on_job_end(config, JobReturn(status=JobStatus.COMPLETED))
    assert not (tmp_path / "job_status.json").exists()


@pytest.mark.slow
def test_report_on_a_real_tiny_multirun(tmp_path: Path) -> None:
    """Two tiny runs through ``ssd-train -m`` (one fails on purpose), the report, TensorBoard."""
    command = [
        sys.executable, "-m", "ssd_lightning.train", "-m", "experiment=tiny", "+sweep=neg_pos",
        "loss.neg_pos_ratio=1,-1", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # Hydra re-raises the failed job's error
    records = report(tmp_path / "multi")
    assert [(r["run"], r["status"]) for r in records] == [("0", "finished"), ("1", "failed")]
    assert "neg_pos_ratio and min_negatives must be >= 0" in records[1]["error"]
    assert 0.0 <= records[0]["best_mAP"] <= 1.0 and records[0]["time_s"] > 0
    assert (tmp_path / "multi" / "report" / "mAP_vs_loss.neg_pos_ratio.png").is_file()

    # TensorBoard's HParams view of the multirun folder: the finished run with its settings.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "multi"))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)["0/tensorboard"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    assert start.session_start_info.hparams["loss.neg_pos_ratio"].number_value == 1.0
    assert "hp/best_mAP" in mux.GetAccumulator("0/tensorboard").Tags()["scalars"]


# ---------------------------------------------------- restarts: status, resumes, not started


def test_report_shows_each_jobs_status_and_resumes(tmp_path: Path) -> None:
    """What ssd-train records across launches, as the report shows it; a job of the sweep
    without a folder (the sweep was stopped before it) is listed as not started."""
    root = tmp_path / "multi"
    recorded = [
        ({"status": "finished", "resumes": 2, "time_s": 30.0}, metrics(0.5, 0.5, 0.8, 0.1)),
        ({"status": "preempted", "resumes": 0, "time_s": 5.0}, None),
        ({"status": "running", "resumes": 1}, None),  # killed: never ended
        ({"status": "failed", "error": "E: x", "last_launch": "skipped"}, None),
        ({"status": "failed", "error": "E: y", "last_launch": "trained"}, None),
    ]
    for number, (status, result) in enumerate(recorded):
        run = make_run(root, number, [f"loss.neg_pos_ratio={number + 1}"], result)
        (run / "job_status.json").write_text(json.dumps(status))
    plan = {
        "hydra": {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
            "sweep": {"dir": str(root), "subdir": "${hydra.job.num}"},
            "overrides": {"task": ["loss.neg_pos_ratio=1,2,3,4,5,6"]},
        }
    }
    (root / "multirun.yaml").write_text(yaml.safe_dump(plan))
    records = report(root)
    assert [(r["run"], r["status"], r["resumes"]) for r in records] == [
        ("0", "finished", 2), ("1", "preempted", 0), ("2", "incomplete", 1),
        ("3", "skipped", 0), ("4", "failed", 0), ("5", "not started", 0),
    ]  # fmt: skip
    assert records[3]["error"] == "E: x" and records[5]["overrides"] == {"loss.neg_pos_ratio": "6"}
    text = (root / "report" / "sweep_report.md").read_text()
    assert "| status | resumes | error |" in text and "| not started | 0 |" in text


def test_job_status_callback_keeps_what_ssd_train_recorded(tmp_path: Path) -> None:
    from ssd_lightning.runs import RunFolderMismatchError

    config = OmegaConf.create(
        {"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(tmp_path)}}}
    )
    path = tmp_path / "job_status.json"
    for recorded in ({"status": "preempted", "attempts": 1}, {"status": "failed", "error": "E"}):
        path.write_text(json.dumps(recorded))
        for job_status in (JobStatus.COMPLETED, JobStatus.FAILED):
            job = JobReturn(status=job_status)
            job._return_value = ValueError("later") if job_status == JobStatus.FAILED else None
            JobStatusCallback().on_job_end(config, job)
            if recorded["status"] == "preempted" and job_status == JobStatus.FAILED:
                assert json.loads(path.read_text())["status"] == "failed"
                path.write_text(json.dumps(recorded))
            else:
                assert json.loads(path.read_text()) == recorded
    path.unlink()
    refused = JobReturn(status=JobStatus.FAILED)
    refused._return_value = RunFolderMismatchError("another run")
    JobStatusCallback().on_job_end(config, refused)
    assert not path.exists()  # the folder of another run gets nothing written
