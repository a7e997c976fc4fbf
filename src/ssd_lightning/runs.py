"""Run folders across restarts: what a run folder holds, and what a new launch does with it.

A run folder is ``outputs/<task>/runs/<run_id>`` or ``<sweep dir>/<job number>``; launching
the same run again (a SLURM requeue keeps the job id, ``run_id=<name>``, the same
``hydra.sweep.dir``) reaches the same folder. ``ssd-train`` (global rank 0) keeps its history in
``job_status.json``::

    status       running | preempted | finished | failed | incomplete
    error        the exception of a failed run (incomplete: interrupted, e.g. Ctrl-C)
    time_s       wall time of all attempts
    attempts     launches that trained; resumes: those that continued from a checkpoint here
    fingerprint  what the run trains (ssd_lightning.sweeps.fingerprint) and its seed
    resumed_from checkpoint and step the latest attempt started from
    stopped      signal, checkpoint, step and epoch of the latest graceful stop
    last_launch  trained | resumed | skipped

``plan_run`` decides, identically on every rank (it only reads what no rank writes before
training starts):

- a folder of another run (different fingerprint or seed): ``RunFolderMismatchError``;
- ``finished``: skipped, its results kept;
- ``failed``: skipped unless ``retry_failed`` (then as below);
- ``preempted``, ``incomplete``, ``running`` (killed: node failure, SIGKILL, out of time) or
  no record with checkpoints: resumed from the folder's newest valid checkpoint
  (``newest_checkpoint``);
- an empty folder: trained from the start (or from ``ckpt_path``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
METRICS_FILE = "metrics.json"
FINGERPRINT_FILE = "fingerprint.json"


class RunFolderMismatchError(ValueError):
    """The run folder holds another run (different settings or seed); nothing was written."""


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_status(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(folder) / STATUS_FILE)


def recorded_identity(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"fingerprint": id, "seed": seed}`` of the run in ``folder`` (keys absent if unknown)."""
    status = read_status(folder)
    identity = {k: status[k] for k in ("fingerprint", "seed") if k in status}
    if "fingerprint" not in identity:
        print_id = read_json(Path(folder) / FINGERPRINT_FILE).get("id")
        if print_id:
            identity["fingerprint"] = print_id
    return identity


def identity_mismatch(folder: str | os.PathLike[str], identity: dict[str, Any]) -> str | None:
    """Why ``folder`` holds another run than ``identity`` describes (None: same or unknown)."""
    recorded = recorded_identity(folder)
    differ = [
        f"{key} {recorded[key]} there, {identity[key]} here"
        for key in ("fingerprint", "seed")
        if key in recorded and key in identity and recorded[key] != identity[key]
    ]
    return "; ".join(differ) or None


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """Global step recorded in a checkpoint file (memory-mapped), None if it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, empty, not a checkpoint
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else None


def newest_checkpoint(folder: str | os.PathLike[str]) -> tuple[str, int] | None:
    """(path, global step) of the newest valid ``*.ckpt`` in ``folder`` (``last.ckpt`` wins a
    tie): one that ``ssd_lightning.checkpoint.load_checkpoint`` accepts, weights hash included.
    Invalid files are passed over with a warning."""
    candidates = []
    for path in Path(folder).glob("*.ckpt"):
        step = checkpoint_step(path)
        if step is None:
            log.warning("%s is not a readable checkpoint; not resumed from", path)
        else:
            candidates.append((step, path.name == "last.ckpt", str(path)))
    for step, _, path in sorted(candidates, reverse=True):
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            log.warning("%s; not resumed from", e)
            continue
        return path, step
    return None


@dataclass
class RunPlan:
    """What this launch does with its run folder (see the module docstring)."""

    action: str  # "train" or "skip"
    reason: str
    checkpoint: str | None = None  # the folder's own checkpoint to resume from
    step: int | None = None
    previous: dict[str, Any] = field(default_factory=dict)  # the status found

    @property
    def resumes(self) -> bool:
        return self.checkpoint is not None


def plan_run(
    folder: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    identity: dict[str, Any],
    retry_failed: bool = False,
) -> RunPlan:
    """Skip, resume or start the run of ``folder`` (see the module docstring).

    Raises:
        RunFolderMismatchError: the folder holds a run of other settings or another seed.
    """
    why = identity_mismatch(folder, identity)
    if why is not None:
        raise RunFolderMismatchError(
            f"the run folder {os.fspath(folder)} holds another run ({why}): give this run "
            "another run_id or hydra.sweep.dir, or remove the folder to start it again"
        )
    status = read_status(folder)
    state = status.get("status")
    if state is None and Path(folder, METRICS_FILE).is_file():
        state = "finished"  # recorded before job_status.json kept a history
    if state == "finished":
        return RunPlan("skip", "finished before; its results are kept", previous=status)
    if state == "failed" and not retry_failed:
        error = status.get("error") or "unknown error"
        return RunPlan(
            "skip", f"failed before ({error}); retry_failed=true runs it again", previous=status
        )
    found = newest_checkpoint(checkpoint_dir)
    if found is None:
        reason = "no checkpoint to resume from; training from the start" if state else "new run"
        return RunPlan("train", reason, previous=status)
    path, step = found
    return RunPlan("train", f"{state or 'interrupted'}; resuming", path, step, status)


class RunRecord:
    """Writes ``job_status.json`` of this launch (a no-op unless ``enabled``: global rank 0)."""

    def __init__(self, folder: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(folder) / STATUS_FILE
        self.enabled = enabled
        self._start = time.time()
        self._status: dict[str, Any] = {}

    def start(self, plan: RunPlan, identity: dict[str, Any]) -> None:
        self._start = time.time()
        status = dict(plan.previous)
        status.update(
            status="running",
            error=None,
            attempts=int(status.get("attempts", 0)) + 1,
            resumes=int(status.get("resumes", 0)) + int(plan.resumes),
            resumed_from={"checkpoint": plan.checkpoint, "global_step": plan.step}
            if plan.resumes
            else None,
            last_launch="resumed" if plan.resumes else "trained",
            host=socket.gethostname(),
            pid=os.getpid(),
            **identity,
        )
        status.setdefault("time_s", 0.0)
        self._status = status
        self._write()

    def skipped(self, plan: RunPlan) -> None:
        """A failed run left alone by this launch (a finished run's folder is not touched)."""
        if plan.previous.get("status") == "failed":
            self._status = {**plan.previous, "last_launch": "skipped"}
            self._write(add_time=False)

    def end(self, status: str, **fields: Any) -> None:
        self._status.update(status=status, **fields)
        self._write()

    def _write(self, add_time: bool = True) -> None:
        if not self.enabled:
            return
        status = dict(self._status)
        if add_time:
            elapsed = time.time() - self._start
            status["time_s"] = round(float(status.get("time_s") or 0.0) + elapsed, 1)
        write_json(self.path, status)

    @property
    def resumes(self) -> int:
        """Attempts of this run that continued from one of its checkpoints, this one included."""
        return int(self._status.get("resumes", 0))


__all__ = [
    "RunFolderMismatchError",
    "RunPlan",
    "RunRecord",
    "newest_checkpoint",
    "plan_run",
    "read_status",
    "recorded_identity",
]
