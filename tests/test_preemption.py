"""Preemption, time limits and restarts: a stop signal ends training at a step with a resumable
checkpoint on every rank, the run folder records it, and launching the same run again resumes
it exactly (or skips it when it is done)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_config
from ssd_lightning.config import CONFIG_DIR, register_resolvers
from ssd_lightning.preemption import (
    EX_TEMPFAIL,
    StopOnSignal,
    exit_after_stop,
    parse_signal,
    stop_on_signals,
)
from ssd_lightning.runs import RunFolderMismatchError, newest_checkpoint
from ssd_lightning.sweep_report import scan_multirun as scan
from ssd_lightning.train import _hydra_overrides_for_other_ranks, train

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 4  # tiny: 32 images / batch 8; 2 epochs


class SignalAtStep(Callback):
    """Sends ``signum`` to this process after optimizer step ``step`` (after the stop check of
    that step: StopOnSignal comes before callbacks passed to train)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PauseAtStep(Callback):
    """Test hook for subprocess runs (``+callbacks.pause._target_=test_preemption.PauseAtStep``):
    after optimizer step ``step`` every rank writes ``<folder>/paused-<tag>-rank<r>`` and waits
    for ``<folder>/go-<tag>`` (one-shot: no pause once that file exists). While waiting, a rank
    whose stop signal has arrived writes ``signalled-<tag>-rank<r>``. Only the job whose ``tag``
    equals ``only`` pauses, when ``only`` is set."""

    def __init__(self, step: int, folder: str, tag: str = "run", only: str | None = None) -> None:
        self.step, self.folder, self.tag, self.only = step, Path(folder), str(tag), only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        go = self.folder / f"go-{self.tag}"
        if trainer.global_step != self.step or go.exists():
            return
        if self.only is not None and str(self.only) != self.tag:
            return
        rank = trainer.global_rank
        stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
        (self.folder / f"paused-{self.tag}-rank{rank}").touch()
        deadline = time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            if stop.request.requested:
                (self.folder / f"signalled-{self.tag}-rank{rank}").touch()
            time.sleep(0.05)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables of a cluster launch, tests/ importable
    for the pause hook, and this process's torch threads (the same numbers as a run in it)."""
    threads = str(torch.get_num_threads())
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(TESTS), OMP_NUM_THREADS=threads)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_", "SUBMITIT_"))]:
        env.pop(key)
    env.update(extra)
    return env


def _status(folder: Path) -> dict:
    return json.loads((folder / "job_status.json").read_text())


def _assert_same_training(a: dict, b: dict) -> None:
    """Final validation metrics and weights of two runs are identical."""
    for key in ("val/mAP", "val/mAP_50", "val/loss", "best_mAP"):
        assert a[key] == b[key], key
    first = torch.load(a["last_checkpoint"], weights_only=True)
    second = torch.load(b["last_checkpoint"], weights_only=True)
    assert (first["global_step"], first["epoch"]) == (second["global_step"], second["epoch"])
    for name, value in first["state_dict"].items():
        assert torch.equal(second["state_dict"][name], value), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """The uninterrupted tiny run (2 epochs, 8 steps)."""
    return train(tiny_config(tmp_path_factory.mktemp("reference"), cache_dir))


# --- in one process: stop, record, resume exactly, skip ---------------------------------------


@pytest.mark.parametrize(
    ("signal_after", "stopped_at", "epoch", "batches_done"),
    [(2, 3, 0, 3), (4, 4, 1, 0)],  # mid-epoch; after an epoch's last step: the next epoch start
    ids=["mid-epoch", "epoch-end"],
)
def test_stop_signal_saves_a_checkpoint_and_the_restart_equals_an_uninterrupted_run(
    reference: dict,
    tmp_path: Path,
    cache_dir: Path,
    signal_after: int,
    stopped_at: int,
    epoch: int,
    batches_done: int,
) -> None:
    cfg = tiny_config(tmp_path, cache_dir)
    before = signal.getsignal(signal.SIGTERM)
    stopped = train(cfg, extra_callbacks=[SignalAtStep(signal_after)])
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert stopped["status"] == "preempted" and stopped["stop_signal"] == "SIGTERM"
    assert (stopped["global_step"], stopped["epoch"]) == (stopped_at, epoch)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped["checkpoint"] == str(last)
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == stopped_at
    position = checkpoint["callbacks"]["ReseedEveryEpoch"]
    assert position == {"next_epoch": epoch, "batches_done": batches_done}
    status = _status(tmp_path)
    assert status["status"] == "preempted" and status["attempts"] == 1
    assert status["stopped"]["stop_signal"] == "SIGTERM"
    assert status["stopped"]["global_step"] == stopped_at
    assert not (tmp_path / "metrics.json").exists()

    resumed = train(cfg)  # the same run again: resumes from last.ckpt in its own folder
    _assert_same_training(reference, resumed)
    status = _status(tmp_path)
    assert (status["status"], status["attempts"], status["resumes"]) == ("finished", 2, 1)
    assert status["resumed_from"] == {"checkpoint": str(last), "global_step": stopped_at}
    assert resumed["resumes"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["resumes"] == 1

    # TensorBoard continues in the same folder: every step logged once, no new version folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tensorboard")] == [
        "tensorboard"
    ]
    steps = []
    for events in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            steps += [e.step for e in accumulator.Scalars("train/loss")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 2 * STEPS_PER_EPOCH

    # Launched once more: finished, so skipped with its results kept and nothing rewritten.
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    skipped = train(cfg)
    assert skipped["status"] == "skipped" and skipped["previous_status"] == "finished"
    assert skipped["val/mAP"] == resumed["val/mAP"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written


def test_signal_during_the_last_validation_finishes_the_run(
    reference: dict, tmp_path: Path, cache_dir: Path
) -> None:
    metrics = train(tiny_config(tmp_path, cache_dir), extra_callbacks=[SignalAtStep(8)])
    assert metrics["status"] == "finished" and metrics["stop_signal"] == "SIGTERM"
    assert metrics["val/mAP"] == reference["val/mAP"]
    assert _status(tmp_path)["status"] == "finished"


def test_lightning_slurm_auto_requeue_does_not_take_the_signal(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a SLURM step Lightning's SLURMEnvironment (auto_requeue) would save an hpc
    checkpoint from within the USR1 handler; ours is installed first, so the stop is ours."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "77",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    stopped = train(tiny_config(tmp_path, cache_dir), [SignalAtStep(2, signal.SIGUSR1)])
    assert stopped["stop_signal"] == "SIGUSR1" and stopped["global_step"] == 3
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


def test_stop_signals_are_a_setting(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_config(tmp_path, cache_dir, "preemption.signals=[SIGUSR2]")
    stopped = train(cfg, extra_callbacks=[SignalAtStep(1, signal.SIGUSR2)])
    assert stopped["stop_signal"] == "SIGUSR2" and stopped["global_step"] == 2
    assert parse_signal("USR1") == parse_signal("SIGUSR1") == signal.SIGUSR1
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        parse_signal("SIGNOPE")


def test_failed_run_is_skipped_unless_retry_failed(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_config(tmp_path, cache_dir, "loss.neg_pos_ratio=-1")
    with pytest.raises(Exception, match="neg_pos_ratio"):
        train(cfg)
    status = _status(tmp_path)
    assert status["status"] == "failed" and "neg_pos_ratio" in status["error"]
    skipped = train(cfg)
    assert skipped == {"status": "skipped", "previous_status": "failed"}
    status = _status(tmp_path)
    assert (status["status"], status["last_launch"], status["attempts"]) == ("failed", "skipped", 1)
    retry = tiny_config(tmp_path, cache_dir, "loss.neg_pos_ratio=-1", "retry_failed=true")
    with pytest.raises(Exception, match="neg_pos_ratio"):
        train(retry)
    assert _status(tmp_path)["attempts"] == 2


def test_a_folder_of_another_run_is_refused_untouched(
    reference: dict, tmp_path: Path, cache_dir: Path
) -> None:
    folder = Path(reference["last_checkpoint"]).parents[1]
    written = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    for change in ("anchors.s_min=0.3", "seed=7"):
        with pytest.raises(RunFolderMismatchError, match="holds another run"):
            train(tiny_config(folder, cache_dir, change))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == written


def test_resume_uses_the_newest_valid_checkpoint(reference: dict, tmp_path: Path) -> None:
    """last.ckpt wins a tie; a truncated file or weights that fail their hash are passed over
    for the next newest."""
    last, best = Path(reference["last_checkpoint"]), Path(reference["best_checkpoint"])
    best_step = torch.load(best, weights_only=True)["global_step"]
    for name, source in (("last.ckpt", last), ("copy.ckpt", last), (best.name, best)):
        shutil.copy(source, tmp_path / name)
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "last.ckpt"), 8)
    (tmp_path / "last.ckpt").write_bytes(b"truncated")  # e.g. a full disk
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "copy.ckpt"), 8)
    checkpoint = torch.load(last, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("weight"))
    checkpoint["state_dict"][key].view(-1)[0] += 1.0  # no longer matches its hash
    torch.save(checkpoint, tmp_path / "copy.ckpt")
    assert newest_checkpoint(tmp_path) == (str(tmp_path / best.name), best_step)
    assert newest_checkpoint(tmp_path / "none") is None


# --- identity: which run folder a restarted job finds -----------------------------------------


def test_run_folder_names(monkeypatch: pytest.MonkeyPatch) -> None:
    register_resolvers()
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def dirs(*overrides: str) -> tuple[str, str]:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        return cfg.hydra.run.dir, cfg.hydra.sweep.dir

    monkeypatch.setenv("SLURM_JOB_ID", "1234")  # a job requeued keeps its job id
    assert dirs() == (
        "./outputs/quickstart/runs/slurm-1234",
        "./outputs/quickstart/multiruns/slurm-1234",
    )
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert dirs()[0] == "./outputs/quickstart/runs/slurm-1200_7"
    assert dirs("run_id=anchors-v2")[1] == "./outputs/quickstart/multiruns/anchors-v2"
    with pytest.raises(Exception, match="names one folder"):
        dirs("run_id=../elsewhere")


def test_other_ranks_use_rank_zeros_run_folder_when_it_has_a_shared_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    assert _hydra_overrides_for_other_ranks(["x=1"]) == ["x=1", "hydra.run.dir=.", *quiet]
    assert _hydra_overrides_for_other_ranks(["run_id=a"]) == ["run_id=a", *quiet]
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert _hydra_overrides_for_other_ranks([]) == quiet
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _hydra_overrides_for_other_ranks(["x=1"]) == ["x=1"]


# --- the end of a stopped process: requeue, submitit's handler, exit code ---------------------


def test_exit_after_stop_requeues_under_slurm_and_hands_over_to_the_previous_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fake_scontrol(tmp_path, monkeypatch)
    for var in ("SLURM_ARRAY_JOB_ID", "SUBMITIT_FOLDER", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    with pytest.raises(SystemExit) as done:
        exit_after_stop("SIGUSR1", EX_TEMPFAIL, ["SIGUSR1"])
    assert done.value.code == 75 and log.read_text() == "requeue 555\n"
    with pytest.raises(SystemExit):
        exit_after_stop("SIGTERM", EX_TEMPFAIL, ["SIGUSR1"])  # scancel: never requeued
    assert log.read_text() == "requeue 555\n"

    # submitit's handler was installed before training; it is called after the checkpoint.
    called = []

    def submitit_like(signum: int, frame) -> None:
        called.append(signum)
        raise SystemExit(-1)  # submitit exits after requeueing

    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with stop_on_signals(["SIGUSR2"]) as request:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert request.name == "SIGUSR2"
        assert called == []  # recorded only while training
        with pytest.raises(SystemExit) as done:
            exit_after_stop("SIGUSR2", EX_TEMPFAIL, ["SIGUSR1", "SIGUSR2"])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert called == [signal.SIGUSR2] and done.value.code == -1
    assert log.read_text() == "requeue 555\n"  # under submitit, submitit requeues


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """A ``scontrol`` on PATH that appends its arguments to a log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    script.chmod(0o755)
    if monkeypatch is not None:
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_slurm_launcher_requeues_and_signals_early() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="sweep extra not installed")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.signal_delay_s == 300 and cfg.hydra.launcher.max_num_timeout == 20
    from submitit.slurm.slurm import SlurmJobEnvironment

    # submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) stops training
    assert f"SIG{SlurmJobEnvironment.USR_SIG}" in cfg.preemption.signals


# --- the command line: SLURM time limit, one process and DDP ----------------------------------


def _cli(tmp_path: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ssd_lightning.train", "experiment=tiny",
        "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={cache_dir}", *extra,
    ]  # fmt: skip


def _pause(step: int, folder: Path, tag: str = "run", only: str | None = None) -> list[str]:
    args = [
        "+callbacks.pause._target_=test_preemption.PauseAtStep",
        f"+callbacks.pause.step={step}",
        f"+callbacks.pause.folder={folder}",
        f"+callbacks.pause.tag={tag}",
    ]
    return args if only is None else [*args, f"+callbacks.pause.only={only}"]


def _stop_when_paused(
    command: list[str], cwd: Path, env: dict, folder: Path, tag: str, sig: int, ranks: int = 1
) -> tuple[int, str]:
    """Run ``command`` until its ranks pause at their step (``_pause``), send ``sig`` to the
    process, let it go on once rank 0 has seen the signal; its exit code and output."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for rank in range(ranks):
        _wait_for(folder / f"paused-{tag}-rank{rank}", process)
    process.send_signal(sig)
    _wait_for(folder / f"signalled-{tag}-rank0", process)
    (folder / f"go-{tag}").touch()
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


def test_cli_slurm_time_limit_signal_requeues_and_the_requeued_job_resumes(
    reference: dict, tmp_path: Path, cache_dir: Path
) -> None:
    """sbatch --signal=USR1@<s> in a job array task: ssd-train stops at the step, requeues the
    task with scontrol and exits 75; the requeued task (same ids) resumes in its folder and
    ends where the uninterrupted run ends."""
    log = _fake_scontrol(tmp_path)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}
    env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", **slurm)
    command = _cli(tmp_path, cache_dir, *_pause(2, tmp_path))
    code, output = _stop_when_paused(command, tmp_path, env, tmp_path, "run", signal.SIGUSR1)
    assert code == 75, output[-3000:]
    run = tmp_path / "logs" / "tiny" / "runs" / "slurm-4200_3"
    assert log.read_text() == "requeue 4200_3\n"
    status = _status(run)
    assert status["status"] == "preempted" and status["stopped"]["stop_signal"] == "SIGUSR1"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert "stopped by SIGUSR1 at step 2 (epoch 0)" in output

    requeued = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "preempted; resuming from" in requeued.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    _assert_same_training(reference, metrics)
    assert _status(run)["resumes"] == 1 and log.read_text() == "requeue 4200_3\n"


def test_cli_ddp_signal_to_rank_zero_stops_both_ranks(tmp_path: Path, cache_dir: Path) -> None:
    """trainer=ddp_cpu (rank 1 started by ssd-train): SIGTERM to rank 0 alone stops both ranks
    at the same step; the restart with the same run_id resumes and finishes."""
    command = _cli(tmp_path, cache_dir, "trainer=ddp_cpu", "run_id=ddp", *_pause(1, tmp_path))
    env = _env(OMP_NUM_THREADS="1")  # SIGTERM to rank 0 only
    code, output = _stop_when_paused(command, tmp_path, env, tmp_path, "run", signal.SIGTERM, 2)
    assert code == 75, output[-4000:]
    assert not (tmp_path / "signalled-run-rank1").exists()
    run = tmp_path / "logs" / "tiny" / "runs" / "ddp"
    # 32 images / (8 per rank x 2 ranks) = 2 steps per epoch; stopped after the first
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    status = _status(run)
    assert (status["status"], status["attempts"]) == ("preempted", 1)  # rank 1 wrote nothing
    assert output.count("stopped by") == 1

    restarted = subprocess.run(command, cwd=tmp_path, env=_env(OMP_NUM_THREADS="1"),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    status = _status(run)
    assert (status["status"], status["attempts"], status["resumes"]) == ("finished", 2, 1)


@pytest.mark.slow
def test_cli_ddp_signal_to_every_process_and_exact_resume(tmp_path: Path, cache_dir: Path) -> None:
    """As SLURM signals a job (every process of the step): both ranks stop at the step; the
    restarted DDP run equals an uninterrupted DDP run, weight for weight."""
    base = _cli(tmp_path, cache_dir, "trainer=ddp_cpu")
    env = _env(OMP_NUM_THREADS="1")
    done = subprocess.run([*base, "run_id=reference"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    command = [*base, "run_id=stopped", *_pause(3, tmp_path)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    _wait_for(tmp_path / "paused-run-rank0", process)
    _wait_for(tmp_path / "paused-run-rank1", process)
    os.killpg(process.pid, signal.SIGTERM)  # rank 0 and rank 1
    _wait_for(tmp_path / "signalled-run-rank0", process)
    _wait_for(tmp_path / "signalled-run-rank1", process)
    (tmp_path / "go-run").touch()
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 75, output[-4000:]
    runs = tmp_path / "logs" / "tiny" / "runs"
    assert torch.load(runs / "stopped/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    restarted = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    reference = json.loads((runs / "reference" / "metrics.json").read_text())
    _assert_same_training(reference, json.loads((runs / "stopped" / "metrics.json").read_text()))


# --- a sweep re-launched into its folder finishes it ------------------------------------------


def _multirun(tmp_path: Path, cache_dir: Path, sweep: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ssd_lightning.train", "-m", "experiment=tiny", sweep,
        "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path / 'multi'}", *extra,
    ]  # fmt: skip


def _unchanged_files(job: Path) -> dict[Path, int]:
    """Files of a job folder that a re-launch must leave alone (Hydra rewrites .hydra/ and
    appends to the log of every job it launches)."""
    return {
        p: p.stat().st_mtime_ns
        for p in job.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_relaunched_multirun_trains_only_the_killed_job_again(
    tmp_path: Path, cache_dir: Path
) -> None:
    """A 3-job sweep killed (SIGKILL, as a dead node) during job 1's second epoch; job 2 never
    started. The same command again: job 0 is skipped untouched, job 1 resumes from its last
    end-of-epoch checkpoint, job 2 trains; the report lists all three, finished."""
    from ssd_lightning.sweep_report import main as sweep_report

    markers = tmp_path / "markers"
    markers.mkdir()
    pause = [*_pause(6, markers, "${hydra:job.num}", only="1")]
    command = _multirun(tmp_path, cache_dir, "loss.neg_pos_ratio=1,2,3", *pause)
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(markers / "paused-1-rank0", process)
    process.kill()
    process.communicate(timeout=60)
    sweep = tmp_path / "multi"
    assert _status(sweep / "0")["status"] == "finished"
    assert _status(sweep / "1")["status"] == "running" and not (sweep / "2").exists()
    records = scan(sweep)
    assert [(r["run"], r["status"]) for r in records] == [
        ("0", "finished"), ("1", "incomplete"), ("2", "not started")
    ]  # fmt: skip

    (markers / "go-1").touch()
    job0 = _unchanged_files(sweep / "0")
    overrides0 = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert (
        "1 finished: skipped; 1 running: resumed (killed while running); 1 new: started" in output
    )
    assert output.count("finished before; its results are kept; skipped") == 1
    assert output.count("resuming from") == 1 and output.count("validation mAP") == 2
    assert _unchanged_files(sweep / "0") == job0  # metrics, checkpoints, TensorBoard, status
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == overrides0
    statuses = [_status(sweep / str(n)) for n in range(3)]
    assert [(s["status"], s["attempts"], s["resumes"]) for s in statuses] == [
        ("finished", 1, 0), ("finished", 2, 1), ("finished", 1, 0)
    ]  # fmt: skip
    assert statuses[1]["resumed_from"]["global_step"] == STEPS_PER_EPOCH  # end of epoch 0

    sweep_report([str(sweep)])
    with (sweep / "report" / "sweep_report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["resumes"]) for r in rows] == [
        ("0", "finished", "0"), ("1", "finished", "1"), ("2", "finished", "0")
    ]  # fmt: skip
    assert all(r["best_mAP"] for r in rows)


@pytest.mark.slow
def test_multirun_stopped_by_a_signal_exits_75_and_the_relaunch_resumes_mid_epoch(
    tmp_path: Path, cache_dir: Path
) -> None:
    """SIGTERM during job 1 of a local (sequential) sweep: job 1 stops at the step with its
    checkpoint, the sweep ends there with exit code 75 (job 2 does not start); the same command
    resumes job 1 mid-epoch and runs job 2."""
    markers = tmp_path / "markers"
    markers.mkdir()
    pause = _pause(6, markers, "${hydra:job.num}", only="1")
    command = _multirun(tmp_path, cache_dir, "loss.neg_pos_ratio=1,2,3", *pause)
    code, output = _stop_when_paused(command, tmp_path, _env(), markers, "1", signal.SIGTERM)
    assert code == 75, output[-4000:]
    sweep = tmp_path / "multi"
    assert [(r["run"], r["status"]) for r in scan(sweep)] == [
        ("0", "finished"), ("1", "preempted"), ("2", "not started")
    ]  # fmt: skip
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert _status(sweep / "1")["resumed_from"]["global_step"] == 6  # mid-epoch 1
    assert [(r["status"], r["resumes"]) for r in scan(sweep)] == [
        ("finished", 0), ("finished", 1), ("finished", 0)
    ]  # fmt: skip


@pytest.mark.slow
def test_relaunched_multirun_reruns_a_failed_job_only_when_asked(
    tmp_path: Path, cache_dir: Path
) -> None:
    command = _multirun(tmp_path, cache_dir, "loss.neg_pos_ratio=1,-1", "trainer.max_epochs=1")
    first = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 1, first.stderr[-3000:]  # Hydra re-raises the failed job's error
    sweep = tmp_path / "multi"
    assert [r["status"] for r in scan(sweep)] == ["finished", "failed"]
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    records = scan(sweep)
    assert [r["status"] for r in records] == ["finished", "skipped"]
    assert "neg_pos_ratio and min_negatives must be >= 0" in records[1]["error"]
    retried = subprocess.run([*command, "retry_failed=true"], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert retried.returncode == 1
    assert [r["status"] for r in scan(sweep)] == ["finished", "failed"]
    assert [_status(sweep / n)["attempts"] for n in ("0", "1")] == [1, 2]
