"""Training entry point: ``python -m ssd_lightning.train`` / ``ssd-train`` (Hydra app).

``train(cfg)`` is a plain function (tests compose a config and call it); ``main`` only wraps it
with ``@hydra.main``. Examples::

    ssd-train                                   # experiment=quickstart: synthetic shapes, CPU
    ssd-train experiment=bccd data.root=/data/bccd
    ssd-train -m anchors.s_min=0.1,0.2 loss.neg_pos_ratio=2,3,5
    ssd-train experiment=voc0712_ssd300 data.root=/data/VOCdevkit trainer=gpu
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.anchor_analysis import coverage_fraction
from ssd_lightning.callbacks import ReseedEveryEpoch, check_writable, tensorboard
from ssd_lightning.checkpoint import load_checkpoint
from ssd_lightning.config import CONFIG_DIR, build_network, check_required, to_plain
from ssd_lightning.ddp import launched_local_ranks
from ssd_lightning.module import SSDModule
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


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if cfg.get("seed") is not None:
        callbacks.append(ReseedEveryEpoch(int(cfg.seed), cfg.get("ckpt_path")))
    return instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *extra_callbacks],
        logger=_instantiate_all(cfg.get("logger")) or False,
    )


def train(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train and validate as configured; returns the final validation metrics.

    Returns:
        ``val/*`` metrics of the last validation, plus ``best_mAP``, ``best_checkpoint``,
        ``last_checkpoint``, ``log_dir`` and ``train_time_s`` (wall time of fitting, seconds).
    """
    check_required(cfg)
    if cfg.get("dry_run"):
        print_ = fingerprint(cfg)
        print(format_plan([[]], [print_]), flush=True)
        return {"fingerprint": print_["id"]}
    check_writable(cfg.paths.output_dir, "run folder")
    if cfg.get("ckpt_path"):
        load_checkpoint(cfg.ckpt_path)  # a clear error for a broken file, before any work
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, extra_callbacks)
    study = study_record(cfg, module, datamodule) if trainer.is_global_zero else {}
    start = time.perf_counter()
    with launched_local_ranks(trainer, cfg, cfg.paths.output_dir):
        # Our checkpoints hold only tensors and plain values: resume without unpickling code.
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
        )
    metrics = final_metrics(trainer)
    metrics.update(run_health(trainer, module, datamodule))
    metrics.update(study)
    metrics["train_time_s"] = round(time.perf_counter() - start, 1)
    if trainer.is_global_zero:
        _log_hparams(trainer, cfg, metrics)
        _write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        print(summary(metrics), flush=True)
    return metrics


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


def study_record(cfg: DictConfig, module: SSDModule, datamodule: Any) -> dict[str, Any]:
    """What a sweep compares this run by: its fingerprint (also written to
    ``fingerprint.json``) and the anchor coverage of its training set."""
    print_ = fingerprint(cfg, module.anchors)
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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _rank_zero_of_launch() -> bool:
    """False in processes that a cluster launcher started as global rank > 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def _hydra_overrides_for_other_ranks(argv: list[str]) -> list[str]:
    """Keep ranks > 0 of torchrun/SLURM jobs from creating their own run folders.

    Their outputs (logs, checkpoints) are written by global rank 0 only, so they run Hydra in
    the current directory without saving a config or a log file.
    """
    if _rank_zero_of_launch() or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/mAP")  # the value a Hydra sweeper optimises


def main() -> None:
    """Console script ``ssd-train``."""
    sys.argv = [sys.argv[0], *_hydra_overrides_for_other_ranks(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
