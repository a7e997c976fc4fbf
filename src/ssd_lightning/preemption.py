"""Graceful stop on a signal: the handler, the exception that ends ``fit``, and the exit.

Clusters ask a job to stop with a signal and kill it a little later: SLURM sends ``SIGTERM`` on
preemption, ``scancel`` and at the time limit (then ``SIGKILL`` after ``GraceTime`` /
``KillWait``), and the ``--signal=USR1@<s>`` of ``sbatch`` ``<s>`` seconds before the time limit;
submitit's launcher sends ``USR2`` (``signal_delay_s``). ``ssd-train`` handles the signals of
``preemption.signals`` like this:

1. The handler only records the signal (``StopRequest``); nothing else is safe inside it (a
   collective or a checkpoint there would interleave with the training step).
2. ``StopOnSignal`` makes the ranks agree at optimizer-step boundaries, saves
   ``last.ckpt`` and raises ``TrainingStopped`` on every rank at the same step.
3. ``train()`` records status ``preempted`` in the run folder and returns.
4. ``exit_after_stop`` (in the ``ssd-train`` process): under SLURM without submitit,
   ``scontrol requeue`` after a signal of ``preemption.requeue_signals``; the signal is then given
   to the handler that was installed before training (submitit's requeues the job); the process
   exits with ``preemption.exit_code`` (75, ``EX_TEMPFAIL``: stopped with a resumable checkpoint,
   run the same command again to continue).

Lightning's own SIGTERM handling is replaced while training: it runs a broadcast inside the
signal handler and stops without a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ssd_lightning.callbacks import SSDCheckpoint, verify_saved
from ssd_lightning.config import launch_rank, slurm_job_id

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75  # sysexits.h: "temporary failure; the user is invited to retry"


def parse_signal(name: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"`` or ``15`` -> ``signal.SIGTERM``."""
    if isinstance(name, int) or str(name).isdigit():
        return signal.Signals(int(name))
    text = str(name).upper()
    try:
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except KeyError:
        raise ValueError(f"preemption.signals: unknown signal {name!r}") from None


class StopRequest:
    """The stop signal this process received, if any. The handler only records it."""

    def __init__(self, signals: Sequence[str | int] = ()) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> dict[signal.Signals, Any]:
        """Make ``handler`` the handler of every stop signal; returns the handlers replaced.

        Signal handlers can only be set from the main thread; elsewhere nothing is installed.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self.handler) for sig in self.signals}


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[str | int]) -> Iterator[StopRequest]:
    """Record the stop signals of ``signals`` while the body runs; restore the handlers after."""
    request = StopRequest(signals)
    previous = request.install()
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class TrainingStopped(Exception):
    """Raised on every rank at the step where the ranks agreed to stop.

    Args:
        signal_name: the signal this rank received (None: another rank received it).
        checkpoint: the resumable checkpoint of this step (None: nothing new to save).
        global_step: optimizer steps done.
        epoch: the epoch the run resumes in.
    """

    def __init__(
        self, signal_name: str | None, checkpoint: str | None, global_step: int, epoch: int
    ) -> None:
        super().__init__(f"stopped by {signal_name or 'a signal to another rank'}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.global_step = global_step
        self.epoch = epoch


class StopOnSignal(Callback):
    """Stops training on every rank at the same optimizer step after a stop signal, with a
    resumable checkpoint (see ``ssd_lightning.preemption``).

    Every ``check_every_n_steps`` optimizer steps the ranks agree on the flag of ``request``
    (one all-reduce of an int: a signal that reached one rank stops them all), then ``last.ckpt``
    is written through the run's ``SSDCheckpoint`` (verified, best score kept) and every rank
    raises ``TrainingStopped`` when the next batch starts (after Lightning has logged the step).
    The check after an epoch's last step waits for the next epoch's start: that epoch's
    validation and ``last.ckpt`` come first (a checkpoint before them would skip the validation
    on resume). A signal during setup stops the run before its first step.

    Args:
        request: the stop request the signal handler sets.
        check_every_n_steps: optimizer steps between two agreements.
    """

    def __init__(self, request: StopRequest, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1")
        self.request = request
        self.check_every_n_steps = check_every_n_steps
        self._start_step = 0
        self._stopped: TrainingStopped | None = None  # raised when the next batch starts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has just installed its SIGTERM handler, which broadcasts inside the handler.
        self.request.install()
        self._start_step = trainer.global_step
        self._stop_if_agreed(trainer, save=False)  # a signal during setup

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint, step = trainer.checkpoint_callback, trainer.global_step
        saved = step == self._start_step or (
            isinstance(checkpoint, SSDCheckpoint) and checkpoint.last_saved_at == step
        )
        if saved:  # else the first step of the epoch stops and saves
            self._stop_if_agreed(trainer, save=False)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        done = batch_idx + 1
        if done >= trainer.num_training_batches:  # checked at the next epoch's start
            return
        if done % (trainer.accumulate_grad_batches * self.check_every_n_steps) == 0:
            self._stopped = self._agreed_stop(trainer, save=True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stopped is not None:
            raise self._stopped

    def _stop_if_agreed(self, trainer: L.Trainer, save: bool) -> None:
        stopped = self._agreed_stop(trainer, save)
        if stopped is not None:
            raise stopped

    def _agreed_stop(self, trainer: L.Trainer, save: bool) -> TrainingStopped | None:
        """The stop, with its checkpoint written, when any rank received a stop signal."""
        if not trainer.strategy.reduce_boolean_decision(self.request.requested, all=False):
            return None
        path = _save_last(trainer) if save else None
        return TrainingStopped(
            self.request.name, path, int(trainer.global_step), trainer.current_epoch
        )


def _save_last(trainer: L.Trainer) -> str:
    """``last.ckpt`` of the current state through the run's checkpoint callback (every rank)."""
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, SSDCheckpoint) and checkpoint.save_last:
        return checkpoint.save_last_now(trainer)
    # where the run's checkpoints are, so that the restart finds it (train.checkpoint_dir)
    folder = getattr(checkpoint, "dirpath", None) or os.path.join(
        trainer.default_root_dir, "checkpoints"
    )
    path = os.path.join(folder, "last.ckpt")
    trainer.save_checkpoint(path)
    if trainer.is_global_zero:
        verify_saved(path, trainer.global_step)
    return path


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (as Lightning's SLURM auto-requeue does); True on success.

    Not under submitit (``SUBMITIT_FOLDER`` set): its own handler requeues.
    """
    job = slurm_job_id()
    if job is None or "SUBMITIT_FOLDER" in os.environ:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed with code %d", job, done.returncode)
    else:
        log.info("requeued SLURM job %s", job)
    return done.returncode == 0


def exit_after_stop(
    signal_name: str, exit_code: int = EX_TEMPFAIL, requeue_signals: Sequence[str | int] = ()
) -> None:
    """End the process of a run stopped by ``signal_name`` (after ``train()`` returned).

    Rank 0 requeues the SLURM job when the signal is one of ``requeue_signals``. The handler
    that ``signal_name`` had before training (e.g. submitit's, which checkpoints its launcher
    and requeues) is then called; if it returns, the process exits with ``exit_code``.
    """
    signum = parse_signal(signal_name)
    if launch_rank() == 0 and signum in {parse_signal(s) for s in requeue_signals}:
        requeue_slurm_job()
    previous = signal.getsignal(signum)
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, None)
    raise SystemExit(exit_code)


__all__ = [
    "EX_TEMPFAIL",
    "StopOnSignal",
    "StopRequest",
    "TrainingStopped",
    "exit_after_stop",
    "parse_signal",
    "requeue_slurm_job",
    "stop_on_signals",
]
