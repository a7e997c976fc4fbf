"""Training entry point: ``python -m ssd_lightning.train`` / ``ssd-train`` (Hydra app).

``train(cfg)`` is a plain function (tests compose a config and call it); ``main`` only wraps it
with ``@hydra.main``. Examples::

    ssd-train                                   # experiment=quickstart: synthetic shapes, CPU
    ssd-train experiment=bccd data.root=/data/bccd
    ssd-train -m anchors.s_min=0.1,0.2 loss.neg_pos_ratio=2,3,5
    ssd-train experiment=voc0712_ssd300 data.root=/data/VOCdevkit trainer=gpu
    ssd-train experiment=tiny run_id=my-run     # run again: resumes or skips (runs.py)

A run stopped by a signal (``preemption`` settings) exits with ``preemption.exit_code`` and
resumes when launched again into the same run folder (``ssd_lightning.preemption``,
``ssd_lightning.runs``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.anchor_analysis import coverage_fraction
from ssd_lightning.callbacks import ReseedEveryEpoch, check_writable, tensorboard
from ssd_lightning.checkpoint import load_checkpoint
from ssd_lightning.config import (
    CONFIG_DIR,
    build_network,
    check_required,
    launch_rank,
    scheduler_run_id,
    to_plain,
)
from ssd_lightning.ddp import launched_local_ranks
from ssd_lightning.module import SSDModule
from ssd_lightning.preemption import (
    StopOnSignal,
    StopRequest,
    TrainingStopped,
    exit_after_stop,
    stop_on_signals,
)
from ssd_lightning.runs import METRICS_FILE, RunPlan, RunRecord, plan_run, read_json, write_json
from ssd_lightning.sweeps import fingerprint, format_plan, write_fingerprint


def build_module(cfg: DictConfig) -> SSDModule:
    """The LightningModule from the model, anchors, loss, optim, sched and module groups."""
    scheduler = instantiate(cfg.sched) if cfg.get("sched") else None
    net = build_network(cfg)
    return SSDModule(
        net=net,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=scheduler,
        anchors=to_plain(cfg.anchors),
        image_size=to_plain(cfg.model.image_size),
        mean=to_plain(cfg.model.mean),
        std=to_plain(cfg.model.std),
        no_decay_bias_norm=cfg.optim.no_decay_bias_norm,
        base_batch_size=cfg.optim.base_batch_size,
        batch_size=cfg.data.batch_size,
        net_config={**to_plain(cfg.model.net), "num_boxes": list(net.num_boxes)},
        **to_plain(cfg.module),
    )


def build_datamodule(cfg: DictConfig, module: SSDModule) -> Any:
    """The DataModule of ``cfg.data``, encoding targets with the module's box coder."""
    datamodule = instantiate(cfg.data.datamodule)
    if datamodule.num_classes != cfg.data.num_classes:
        raise ValueError(
            f"data.num_classes={cfg.data.num_classes} but the dataset has "
            f"{datamodule.num_classes} classes including background ({datamodule.class_names})"
        )
    datamodule.set_box_coder(module.box_coder)
    return datamodule


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a dict-of-configs group (callbacks, logger)."""
    if not node:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_trainer(
    cfg: DictConfig,
    extra_callbacks: Sequence[Callback] = (),
    ckpt_path: str | None = None,
    stop: StopRequest | None = None,
) -> L.Trainer:
    """The trainer of ``cfg.trainer`` with the configured callbacks and loggers, per-epoch
    reseeding (``seed``; ``ckpt_path``: the checkpoint resumed from) and, given ``stop``, a
    graceful stop on its signals."""
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if cfg.get("seed") is not None:
        callbacks.append(ReseedEveryEpoch(int(cfg.seed), ckpt_path))
    if stop is not None and stop.signals:
        every = int(cfg.get("preemption", {}).get("check_every_n_steps", 1))
        callbacks.append(StopOnSignal(stop, every))
    if cfg.trainer.get("enable_progress_bar", True):
        # The bar reads the logged losses from the device at each refresh: once per log
        # interval keeps the training step free of host syncs (the default reads every step).
        callbacks.append(TQDMProgressBar(refresh_rate=int(cfg.trainer.log_every_n_steps)))
    return instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *extra_callbacks],
        logger=_instantiate_all(cfg.get("logger")) or False,
    )


def train(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train and validate as configured; returns the final validation metrics.

    A run folder that already holds this run is skipped when the run finished (or failed,
    unless ``retry_failed``), else resumed from its newest valid checkpoint (``runs.plan_run``).
    A stop signal (``preemption.signals``) ends training at the next optimizer step with a
    resumable ``last.ckpt`` on every rank.

    Returns:
        ``val/*`` metrics of the last validation, plus ``best_mAP``, ``best_checkpoint``,
        ``last_checkpoint``, ``log_dir``, ``train_time_s`` (wall time of fitting, seconds),
        ``status`` (``finished``) and ``resumes``. A stopped run returns ``status``
        ``preempted`` with ``stop_signal``, ``checkpoint``, ``global_step`` and ``epoch``; a
        skipped run ``status`` ``skipped``, ``previous_status`` and its recorded metrics.
    """
    check_required(cfg)
    if cfg.get("dry_run"):
        print_ = fingerprint(cfg)
        print(format_plan([[]], [print_]), flush=True)
        return {"fingerprint": print_["id"]}
    out = Path(cfg.paths.output_dir)
    check_writable(out, "run folder")
    print_ = fingerprint(cfg)
    identity = {"fingerprint": print_["id"], "seed": cfg.get("seed")}
    plan = plan_run(out, checkpoint_dir(cfg), identity, bool(cfg.get("retry_failed")))
    if plan.action == "skip":
        return _skip(out, plan)
    ckpt_path = plan.checkpoint or cfg.get("ckpt_path")
    if plan.resumes:
        print(f"{out}: {plan.reason} from {plan.checkpoint} (step {plan.step})", flush=True)
    elif ckpt_path:
        load_checkpoint(ckpt_path)  # a clear error for a broken file, before any work
    record = RunRecord(out, enabled=_global_rank_zero())
    with stop_on_signals(cfg.get("preemption", {}).get("signals", ())) as stop:
        record.start(plan, identity)
        try:
            metrics = _fit(cfg, ckpt_path, stop, extra_callbacks, print_)
        except Exception as e:
            record.end("failed", error=f"{type(e).__name__}: {e}")
            raise
        except BaseException as e:  # Ctrl-C, a SystemExit: resumable like a killed run
            record.end("incomplete", error=f"{type(e).__name__}: {e}")
            raise
    if metrics["status"] == "preempted":
        record.end("preempted", stopped={k: metrics[k] for k in _STOP_KEYS})
        return metrics
    metrics["resumes"] = record.resumes
    if _global_rank_zero():
        write_json(out / METRICS_FILE, metrics)
    signaled = {"stop_signal": metrics["stop_signal"]} if metrics.get("stop_signal") else {}
    record.end("finished", **signaled)
    if _global_rank_zero():
        print(summary(metrics), flush=True)
    return metrics


_STOP_KEYS = ("stop_signal", "checkpoint", "global_step", "epoch")


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run keeps its checkpoints (the checkpoint callback's folder)."""
    configured = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(configured.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")


def _fit(
    cfg: DictConfig,
    ckpt_path: str | None,
    stop: StopRequest,
    extra_callbacks: Sequence[Callback],
    print_: dict[str, Any],
) -> dict[str, Any]:
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, extra_callbacks, ckpt_path, stop)
    study = study_record(cfg, print_, module, datamodule) if trainer.is_global_zero else {}
    start = time.perf_counter()
    stopped = None
    with launched_local_ranks(trainer, cfg, cfg.paths.output_dir):
        try:
            # Our checkpoints hold only tensors and plain values: resume without unpickling code.
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except TrainingStopped as e:
            stopped = e
    train_time = round(time.perf_counter() - start, 1)
    if stopped is not None:
        return _stopped(cfg, stopped, stop, train_time)
    metrics = final_metrics(trainer)
    metrics.update(run_health(trainer, module, datamodule))
    metrics.update(study)
    metrics["train_time_s"] = train_time
    metrics["status"] = "finished"
    if stop.requested:  # during the last validation: the run finished all the same
        metrics["stop_signal"] = stop.name
    if trainer.is_global_zero:
        _log_hparams(trainer, cfg, metrics)
    return metrics


def _stopped(
    cfg: DictConfig, stopped: TrainingStopped, stop: StopRequest, train_time: float
) -> dict[str, Any]:
    checkpoint = stopped.checkpoint
    if checkpoint is None:  # stopped where last.ckpt (if any) was already current
        last = checkpoint_dir(cfg) / "last.ckpt"
        checkpoint = str(last) if last.is_file() else None
    metrics = {
        "status": "preempted",
        "stop_signal": stopped.signal_name or stop.name,
        "checkpoint": checkpoint,
        "global_step": stopped.global_step,
        "epoch": stopped.epoch,
        "train_time_s": train_time,
    }
    if _global_rank_zero():
        print(
            f"stopped by {metrics['stop_signal'] or 'a signal to another rank'} at step "
            f"{stopped.global_step} (epoch {stopped.epoch}); resumable checkpoint: {checkpoint}\n"
            "run the same command again (same run folder) to continue",
            flush=True,
        )
    return metrics


def _skip(out: Path, plan: RunPlan) -> dict[str, Any]:
    RunRecord(out, enabled=_global_rank_zero()).skipped(plan)
    if _global_rank_zero():
        print(f"{out}: {plan.reason}; skipped", flush=True)
    recorded = read_json(out / METRICS_FILE) if plan.previous.get("status") != "failed" else {}
    return {**recorded, "status": "skipped", "previous_status": plan.previous.get("status")}


def _global_rank_zero() -> bool:
    """Global rank 0 of the launch: torchrun/SLURM rank 0 and not a local rank that
    ``ssd_lightning.ddp`` started (known before the trainer exists)."""
    local = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    return launch_rank() == 0 and local


def final_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """Last validation metrics, best score and where the checkpoints and logs are."""
    metrics: dict[str, Any] = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/")
    }
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint):
        best = checkpoint.best_model_score
        metrics["best_mAP"] = float(best) if best is not None else None
        best_path = checkpoint.best_model_path
        metrics["best_checkpoint"] = best_path if best_path and Path(best_path).is_file() else None
        last = Path(checkpoint.dirpath or "") / "last.ckpt"
        metrics["last_checkpoint"] = str(last) if last.is_file() else None
    logger = tensorboard(trainer)
    metrics["log_dir"] = logger.log_dir if logger is not None else None
    return metrics


def study_record(
    cfg: DictConfig, print_: dict[str, Any], module: SSDModule, datamodule: Any
) -> dict[str, Any]:
    """What a sweep compares this run by: its fingerprint ``print_`` (written to
    ``fingerprint.json``) and the anchor coverage of its training set."""
    write_fingerprint(cfg.paths.output_dir, print_)
    records = getattr(datamodule.train_dataset, "records", None)
    covered = None
    if records is not None:
        covered = coverage_fraction(records, module.anchors, module.box_coder.iou_threshold)
    return {"fingerprint": print_["id"], "anchor_coverage": covered}


def run_health(trainer: L.Trainer, module: SSDModule, datamodule: Any) -> dict[str, Any]:
    """What a healthy-looking mAP could hide: skipped steps and skipped or repaired data."""
    steps = max(int(trainer.global_step), 0)
    return {
        "nonfinite_steps": module.nonfinite_steps,
        "optimizer_steps": steps,
        "data_problems": data_problems(datamodule),
    }


def data_problems(datamodule: Any) -> dict[str, dict[str, int]]:
    """Per split: problems found at setup (by kind) and samples skipped when read."""
    problems = {}
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is None or not hasattr(dataset, "summary"):
            continue
        counts = dict(dataset.summary().problem_counts)
        skipped = getattr(dataset, "skipped_at_read", 0)
        if skipped:
            counts["skipped_at_read"] = skipped
        problems[split] = counts
    return problems


def summary(metrics: dict[str, Any]) -> str:
    """The lines printed at the end of training."""

    def pct(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = [
        f"validation mAP {pct('val/mAP')}  mAP_50 {pct('val/mAP_50')}  "
        f"(best mAP {pct('best_mAP')}) after {metrics.get('train_time_s', 0) / 60:.1f} min",
        f"best checkpoint: {metrics.get('best_checkpoint')}",
        f"last checkpoint: {metrics.get('last_checkpoint')}",
        f"TensorBoard logs: tensorboard --logdir {metrics.get('log_dir')}",
    ]
    nonfinite, steps = metrics.get("nonfinite_steps", 0), metrics.get("optimizer_steps", 0)
    if nonfinite:
        share = nonfinite / max(nonfinite + steps, 1)
        warn = "WARNING: " if share > 0.1 else ""
        lines.append(
            f"{warn}{nonfinite} training steps skipped as non-finite "
            f"({100 * share:.1f}% of {nonfinite + steps})"
        )
    for split, counts in (metrics.get("data_problems") or {}).items():
        if counts:
            listed = ", ".join(f"{k}={v}" for k, v in counts.items())
            lines.append(f"data problems ({split}): {listed} (see the log for each file)")
    return "\n".join(lines)


def _log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Hyperparameters with the final metrics, for TensorBoard's HParams view."""
    logger = tensorboard(trainer)
    if logger is None:
        return
    params = _flatten(OmegaConf.to_container(cfg, resolve=True))
    params["fingerprint"] = metrics.get("fingerprint") or ""
    finals = {
        f"hp/{key.split('/', 1)[1]}": value
        for key, value in metrics.items()
        if key in ("val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_voc07")
    }
    if metrics.get("anchor_coverage") is not None:
        finals["hp/anchor_coverage"] = metrics["anchor_coverage"]
    if metrics.get("best_mAP") is not None:
        finals["hp/best_mAP"] = metrics["best_mAP"]
    logger.log_hyperparams(params, metrics=finals)
    logger.finalize("success")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    value = tree if isinstance(tree, int | float | str | bool) else str(tree)
    return {prefix.rstrip("."): value}


def _hydra_overrides_for_other_ranks(argv: list[str]) -> list[str]:
    """Keep ranks > 0 of torchrun/SLURM jobs from writing into run folders.

    Their outputs (logs, checkpoints) are written by global rank 0 only, so they run Hydra
    without saving a config or a log file. When the run's name is the same in every process
    (``run_id=``, a SLURM job, torchrun ``--rdzv-id``) they use rank 0's run folder, where a
    restarted job finds the checkpoint to resume; else (a timestamp) the current directory.
    """
    if launch_rank() == 0 or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    named = any(a.startswith("run_id=") for a in argv) or scheduler_run_id() is not None
    return [*argv, *quiet] if named else [*argv, "hydra.run.dir=.", *quiet]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    settings = cfg.get("preemption", {})
    code = int(settings.get("exit_code", 75))
    if metrics.get("status") == "preempted":
        signal_name = metrics.get("stop_signal")
        if signal_name is None:  # another rank received it
            raise SystemExit(code)
        exit_after_stop(signal_name, code, settings.get("requeue_signals", ()))
    signaled = metrics.get("status") == "finished" and metrics.get("stop_signal")
    if signaled and _sequential_multirun():  # the process was asked to stop: no next job
        raise SystemExit(code)
    return metrics.get("val/mAP")  # the value a Hydra sweeper optimises


def _sequential_multirun() -> bool:
    """A multirun whose jobs run one after another in this process (Hydra's basic launcher)."""
    hydra_cfg = HydraConfig.get()
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    return hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith("BasicLauncher")


def main() -> None:
    """Console script ``ssd-train``."""
    sys.argv = [sys.argv[0], *_hydra_overrides_for_other_ranks(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
