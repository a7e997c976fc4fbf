"""Sweeps that change what they sweep: job fingerprints and the check at launch.

A job's *fingerprint* is a short hash of what it effectively trains: the default boxes
themselves (not the settings that produced them), the loss, the network and its input, the
data and augmentation, the optimiser and schedule, and the matching settings. The seed, the
loaders' worker counts, logging, checkpoints and output paths are left out: two jobs that
differ only in those train the same experiment. ``ssd-train`` writes it into every run folder
(``fingerprint.json``) and TensorBoard's HParams; ``ssd-sweep-report`` groups runs by it.

``SweepCheckCallback`` (enabled in ``conf/hydra/default.yaml``) composes every job of a Hydra
multirun before any starts, and refuses the sweep when two jobs have the same fingerprint,
naming the overrides that change nothing. Jobs that differ only in ``seed`` are replicates
and always allowed; ``allow_duplicate_runs=true`` allows the rest on purpose. Sweepers that
choose their jobs as they go (Optuna) are not checked. ``ssd-train -m ... dry_run=true``
prints every job's fingerprint and default boxes and trains nothing.

Re-launching a multirun into its sweep folder (the same command with the same
``hydra.sweep.dir`` or ``run_id``) finishes it: each job's ``train()`` skips a finished job,
resumes an interrupted one and skips a failed one unless ``retry_failed=true``
(``ssd_lightning.runs``). Before any job starts, ``check_sweep`` refuses a sweep folder whose
job folders hold runs of other settings (Hydra would write its files into them) and prints
what the launch will do with the jobs found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.config import launch_rank, network_on_meta, to_plain
from ssd_lightning.runs import (
    FINGERPRINT_FILE,
    STATUS_FILE,
    RunFolderMismatchError,
    identity_mismatch,
    read_status,
    write_json,
)

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Overrides that never change what a job trains (replicates, loaders, outputs).
REPLICATE_KEYS = ("seed",)
_LOADER_KEYS = ("num_workers", "persistent_workers", "pin_memory", "seed")
_SCHEDULE_KEYS = (
    "max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val", "precision",
    "devices", "num_nodes",
)  # fmt: skip


class DuplicateRunsError(ValueError):
    """Jobs of a sweep would train the same thing; the message names the overrides."""


def fingerprint(cfg: DictConfig, default_boxes: DefaultBoxes | None = None) -> dict[str, Any]:
    """``{"id": 12 hex digits, "parts": what it hashes}`` for a composed training config.

    Args:
        cfg: the job's config (``ssd-train`` composition).
        default_boxes: the job's default boxes if already built (else measured on a network
            built on the meta device: no memory, no weights read).
    """
    if default_boxes is None:
        net = network_on_meta(cfg)
        default_boxes = DefaultBoxes.for_network(
            net, to_plain(cfg.model.image_size), **to_plain(cfg.anchors)
        )
    boxes = default_boxes.cxcywh.contiguous()
    data = to_plain(cfg.data.datamodule)
    parts = {
        "default_boxes": {
            "sha256": hashlib.sha256(boxes.numpy().tobytes()).hexdigest()[:16],
            **default_boxes.describe(),
        },
        "loss": to_plain(cfg.loss),
        "network": {
            "net": to_plain(cfg.model.net),
            **{k: to_plain(cfg.model[k]) for k in ("image_size", "mean", "std")},
        },
        "matching": {k: to_plain(cfg.module[k]) for k in ("iou_threshold", "variances")},
        "data": {k: v for k, v in data.items() if k not in _LOADER_KEYS},
        "schedule": {
            "optim": to_plain(cfg.optim),
            "sched": to_plain(cfg.get("sched")),
            **{k: to_plain(cfg.trainer.get(k)) for k in _SCHEDULE_KEYS},
        },
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return {"id": hashlib.sha256(text.encode()).hexdigest()[:12], "parts": parts}


def write_fingerprint(folder: str | os.PathLike[str], print_: dict[str, Any]) -> Path:
    path = Path(folder) / FINGERPRINT_FILE
    write_json(path, print_)
    return path


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job of a basic-sweeper multirun (None for other sweepers)."""
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    # unresolved: an override may hold an interpolation of its own job (${hydra:job.num})
    params += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or [])
    overrides = OverridesParser.create().parse_overrides(params)
    return BasicSweeper.split_arguments(overrides, None)[0]


def duplicate_groups(
    jobs: Sequence[Sequence[str]], ids: Sequence[str]
) -> list[tuple[list[int], list[str]]]:
    """Jobs sharing a fingerprint other than replicates: (job numbers, overrides that differ)."""
    groups: dict[str, list[int]] = {}
    for number, job_id in enumerate(ids):
        groups.setdefault(job_id, []).append(number)
    found = []
    for members in groups.values():
        values = [dict(o.split("=", 1) for o in jobs[m]) for m in members]
        keys = sorted({k for v in values for k in v})
        differ = [k for k in keys if len({v.get(k) for v in values}) > 1]
        if len(members) > 1 and any(k.lstrip("+~") not in REPLICATE_KEYS for k in differ):
            found.append((members, [k for k in differ if k.lstrip("+~") not in REPLICATE_KEYS]))
    return found


def check_sweep(config: DictConfig) -> list[dict[str, Any]] | None:
    """Compose every job of the multirun and refuse duplicates (see the module docstring).

    With ``dry_run=true`` prints one line per job (overrides, fingerprint, default boxes).

    Returns:
        The fingerprint of every job, or None when the sweeper is not checked.

    Raises:
        DuplicateRunsError: naming the jobs and the overrides that have no effect.
        ValueError: a job that cannot be built (e.g. anchors that do not fit the network),
            naming the job.
    """
    jobs = sweep_jobs(config)
    if jobs is None:
        log.info("sweep check: %s chooses its own jobs; not checked", config.hydra.sweeper._target_)
        return None
    prints, seeds = [], []
    for number, job in enumerate(jobs):
        try:
            cfg = compose(config_name=config.hydra.job.config_name, overrides=list(job))
            prints.append(fingerprint(cfg))
        except ValueError as e:
            raise type(e)(f"sweep job #{number} ({' '.join(job)}) cannot be built: {e}") from e
        seeds.append(cfg.get("seed"))
    ids = [p["id"] for p in prints]
    if config.get("dry_run"):
        print(format_plan(jobs, prints), flush=True)
    relaunch = check_sweep_folder(config, ids, seeds)
    if relaunch:
        (print if config.get("dry_run") else log.info)(relaunch)
    duplicates = duplicate_groups(jobs, ids)
    if duplicates and not config.get("allow_duplicate_runs"):
        lines = []
        for members, keys in duplicates:
            listed = "; ".join(f"#{m}: " + " ".join(jobs[m]) for m in members)
            lines.append(
                f"  jobs {', '.join(f'#{m}' for m in members)} train the same thing "
                f"(fingerprint {ids[members[0]]}): {', '.join(keys)} change nothing here\n"
                f"    ({listed})"
            )
        raise DuplicateRunsError(
            f"{len(jobs)} sweep jobs, of which some would train exactly what another trains:\n"
            + "\n".join(lines)
            + "\nRemove those values from the sweep (e.g. the anchor preset sets what they "
            "change), or set allow_duplicate_runs=true to run them anyway. Jobs that differ "
            "only in seed are replicates and always allowed."
        )
    log.info("sweep check: %d jobs, %d distinct settings", len(jobs), len(set(ids)))
    return prints


def job_folders(config: DictConfig) -> Path | None:
    """The sweep folder when job N runs in ``<sweep folder>/N`` (Hydra's default subdir)."""
    raw = OmegaConf.to_container(config.hydra.sweep, resolve=False)
    if raw.get("subdir") != "${hydra.job.num}":
        return None
    return Path(str(config.hydra.sweep.dir))


def check_sweep_folder(config: DictConfig, ids: Sequence[str], seeds: Sequence[Any]) -> str:
    """Refuse a sweep folder whose job folders hold runs of other settings or seeds; describe
    what this launch does with the jobs already there ("" for a new sweep folder).

    Raises:
        RunFolderMismatchError: naming the jobs and what differs.
    """
    root = job_folders(config)
    if root is None or not root.is_dir():
        return ""
    mismatched, counts = [], {}
    for number, (print_id, seed) in enumerate(zip(ids, seeds, strict=True)):
        folder = root / str(number)
        why = identity_mismatch(folder, {"fingerprint": print_id, "seed": seed})
        if why is not None:
            mismatched.append(f"  job #{number} ({folder}): {why}")
            continue
        state = read_status(folder).get("status")
        if state is None and (folder / "metrics.json").is_file():
            state = "finished"
        if state == "failed" and config.get("retry_failed"):
            state = "failed, retried"
        counts[state or "new"] = counts.get(state or "new", 0) + 1
    if mismatched:
        raise RunFolderMismatchError(
            f"the sweep folder {root} holds runs of other settings than this sweep's jobs:\n"
            + "\n".join(mismatched)
            + "\nRe-launch the sweep that wrote it (same overrides), or give this sweep another "
            "hydra.sweep.dir / run_id."
        )
    actions = {
        "finished": "skipped", "failed": "skipped (retry_failed=true re-runs them)",
        "preempted": "resumed", "running": "resumed (killed while running)",
        "incomplete": "resumed", "failed, retried": "resumed or restarted", "new": "started",
    }  # fmt: skip
    parts = [f"{n} {state}: {actions.get(state, 'resumed')}" for state, n in counts.items()]
    return f"sweep folder {root} re-launched: " + "; ".join(parts)


def format_plan(jobs: Sequence[Sequence[str]], prints: Sequence[dict[str, Any]]) -> str:
    """One line per job: number, overrides, fingerprint, the default boxes it trains."""
    lines = [f"{len(jobs)} jobs, {len({p['id'] for p in prints})} distinct fingerprints:"]
    for number, (job, print_) in enumerate(zip(jobs, prints, strict=True)):
        boxes = print_["parts"]["default_boxes"]
        sizes = ",".join(f"{s:g}" for s in boxes["sizes_px"])
        lines.append(
            f"  #{number} {print_['id']}  {boxes['num_boxes']} boxes, sizes {sizes} px, "
            f"boxes/cell {boxes['boxes_per_location']}  <- {' '.join(job)}"
        )
    return "\n".join(lines)


class SweepCheckCallback(Callback):
    """Hydra callback: ``check_sweep`` before a multirun starts any job; with
    ``dry_run=true`` it prints the plan and ends the process instead of training."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and launches the jobs anyway, so
        # a refused sweep ends the process here: the error on stderr, exit status 1.
        try:
            check_sweep(config)
        except Exception as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from e
        if config.get("dry_run"):
            raise SystemExit(0)


class JobStatusCallback(Callback):
    """Hydra callback: makes sure ``<run folder>/job_status.json`` says how every job ended.

    ``ssd-train`` keeps that file itself (``ssd_lightning.runs``: status, error, attempts,
    resumes, time); this callback adds what ``train()`` cannot record: a job that failed before
    its record started (e.g. a missing setting), with the exception that Hydra keeps in the
    launching process only, and a job of another entry point. It never rewrites a status that
    ``ssd-train`` wrote, nor a folder that holds another run. Processes of rank > 0 started by
    torchrun/SLURM (no saved config) write nothing.
    """

    def __init__(self) -> None:
        self._start = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None or launch_rank() != 0:
            return
        folder = Path(config.hydra.runtime.output_dir)
        status = read_status(folder)
        elapsed = time.time() - self._start
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # .return_value would re-raise
            if isinstance(error, RunFolderMismatchError) or status.get("status") == "failed":
                return
            status.update(status="failed", error=f"{type(error).__name__}: {error}")
            status.setdefault("time_s", elapsed)
        elif status.get("status"):
            return
        else:
            status = {"status": "finished", "error": None, "time_s": elapsed}
        write_json(folder / STATUS_FILE, status)


__all__ = [
    "FINGERPRINT_FILE",
    "DuplicateRunsError",
    "JobStatusCallback",
    "SweepCheckCallback",
    "check_sweep",
    "check_sweep_folder",
    "duplicate_groups",
    "fingerprint",
    "sweep_jobs",
]
