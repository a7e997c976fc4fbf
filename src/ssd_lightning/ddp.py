"""Launching the local DDP ranks of a Hydra run, and the entry point those ranks run.

Lightning's ``strategy="ddp"`` starts ranks > 0 by re-executing the launching command. Inside a
Hydra app that is the wrong command in two common cases: under pytest it re-runs pytest, and
under ``--multirun`` it re-runs the whole sweep into new folders. Here rank 0 instead writes its
fully resolved config into its own run folder and starts every other local rank as

    python -m ssd_lightning.ddp <run_dir>/ddp/config.yaml ssd_lightning.train:train

which calls ``train(cfg)`` (or the given entry, e.g. ``evaluate``) with exactly that config:
same run folder, no Hydra in the children, no duplicated outputs. The environment
(``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) is the one
Lightning's own launcher sets, so Lightning's ``LightningEnvironment`` sees processes created
externally and launches nothing itself.

When processes are already created by a cluster (torchrun / TorchElastic, SLURM ``srun``, or
``LOCAL_RANK`` set by hand) nothing is launched here and Lightning's environment detection
applies as usual; that is how multi-node jobs run.

Stop signals (``preemption.signals``): a signal that reaches rank 0 only, or every process (as
SLURM sends it), stops all ranks at the same step (``ssd_lightning.callbacks.StopOnSignal``
agrees on it across ranks). The ranks started here ignore those signals until their
``train()`` takes them over, so one arriving while they start up cannot kill them half-way (rank
0 has seen it and stops everyone at the first step); other entries get the default handlers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.preemption import parse_signal

_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def needs_launch(trainer: L.Trainer) -> bool:
    """Whether this process must start the other local ranks itself.

    True for a subprocess-script DDP strategy with several local devices whose processes no
    cluster (torchrun, SLURM, a user-set ``LOCAL_RANK``) has created.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or trainer.num_devices < 2:
        return False
    if getattr(strategy, "_start_method", "popen") != "popen":  # ddp_spawn / ddp_fork
        return False
    return not strategy.cluster_environment.creates_processes_externally


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launched_local_ranks(
    trainer: L.Trainer,
    cfg: DictConfig,
    run_dir: str | os.PathLike[str],
    entry: str = "ssd_lightning.train:train",
) -> Iterator[list[subprocess.Popen]]:
    """Start local ranks 1..N-1 with ``cfg`` (resolved) and run the body as local rank 0.

    The children call ``entry`` (``module:function`` taking the config) with the same config.

    On exit waits for the children and raises if one failed; if a child dies early the
    parent is killed (it would otherwise hang in a collective), as Lightning's launcher does.
    """
    if not needs_launch(trainer):
        yield []
        return
    config_path = Path(run_dir) / "ddp" / "config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), config_path)

    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    num_processes, num_nodes = trainer.num_devices, trainer.num_nodes
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("NODE_RANK", "0")
    os.environ["WORLD_SIZE"] = str(num_processes * num_nodes)
    os.environ["LOCAL_RANK"] = "0"
    children = []
    ignore = functools.partial(_ignore_signals, _stop_signals(cfg))
    for local_rank in range(1, num_processes):
        env = dict(os.environ, LOCAL_RANK=str(local_rank))
        command = [sys.executable, "-m", "ssd_lightning.ddp", str(config_path), entry]
        children.append(subprocess.Popen(command, env=env, preexec_fn=ignore))
    watcher = _Watcher(children)
    watcher.start()
    try:
        yield children
    except BaseException:
        for child in children:  # they would wait for rank 0 in a collective forever
            child.kill()
        raise
    finally:
        watcher.stop()
        # A later job of a sweep in this process must start a new process group.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    codes = [child.wait() for child in children]
    if any(codes):
        raise RuntimeError(f"DDP ranks 1..{num_processes - 1} exited with codes {codes}")


def _stop_signals(cfg: DictConfig) -> list[signal.Signals]:
    return [parse_signal(s) for s in (cfg.get("preemption") or {}).get("signals", ())]


def _ignore_signals(signals: list[signal.Signals]) -> None:
    """In a child between fork and exec: ignore ``signals`` (kept across exec)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class _Watcher(threading.Thread):
    """Kills this process if a child rank fails, so rank 0 never waits forever on it."""

    def __init__(self, children: list[subprocess.Popen], period: float = 2.0) -> None:
        super().__init__(daemon=True, name="ddp-rank-watcher")
        self.children = children
        self.period = period
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(self.period):
            failed = [c for c in self.children if c.poll() not in (None, 0)]
            if failed:
                print(
                    f"DDP rank process {failed[0].pid} exited with code {failed[0].returncode}; "
                    "stopping all ranks.",
                    file=sys.stderr,
                    flush=True,
                )
                for child in self.children:
                    if child.poll() is None:
                        child.kill()
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    """Entry point of a local rank > 0: ``python -m ssd_lightning.ddp <config.yaml> <entry>``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or "LOCAL_RANK" not in os.environ:
        raise SystemExit(
            "usage: LOCAL_RANK=<r> python -m ssd_lightning.ddp <resolved config.yaml> <module:fn>"
        )
    module_name, function = argv[1].split(":")
    entry = getattr(importlib.import_module(module_name), function)
    cfg = OmegaConf.load(argv[0])
    if argv[1] != "ssd_lightning.train:train":  # only train() takes the stop signals over
        for sig in _stop_signals(cfg):
            signal.signal(sig, signal.SIG_DFL)
    entry(cfg)


if __name__ == "__main__":
    main()
