"""Benchmark: training images/s of ssd-train's loop vs a plain PyTorch loop vs torchvision's SSD.

Paths, each fed by the same ``SSDDataModule`` loader (workers decode, apply the SSD augmentation
and, with ``--assign-on worker``, assign the GT to the default boxes; with ``device`` the module
assigns the batch after the transfer):

- lightning: what ``ssd-train`` runs, built by the project's builders (``build_module``,
  ``build_datamodule``, ``build_trainer``) from a config composed like ``ssd-train <overrides>``:
  Lightning Trainer, MultiBox loss, optimiser and schedule, ``self.log`` of the losses, the
  TensorBoard logger, ``LearningRateMonitor`` and ``ThroughputMonitor``. Validation, sanity
  check and checkpointing are off (they are not training steps).
- plain: a hand-written loop over the same loader training the same network (same seed, same
  weights) with the same loss, optimiser and schedule: to device, (normalise and assign on the
  device,) forward and loss under the same autocast, zero_grad, backward, step.
- plain-cached (``--paths``): the plain step on a few batches kept on the device (targets
  assigned once), no loader: the compute bound of the step.
- torchvision: ``torchvision.models.detection`` SSD trained with its own transform, matcher and
  loss (list of images in [0, 1], targets as a list of dicts of pixel boxes), fed by the
  device-assignment loader (it needs the GT boxes, which the worker path replaces by targets).
  With ``--full``: ``ssd300_vgg16(weights=None, weights_backbone=None)``, as ours SSD300-VGG16 at
  300x300; its transform resizes the 300x300 batch to 300x300 again (an interpolation ours does
  not need). Otherwise torchvision's ``SSD`` around a copy of OUR backbone (same layers, same
  width), its ``DefaultBoxGenerator`` with the same boxes per location and its ``SSDHead``, at our
  image size: the same network compute, so the ratio measures everything around it.
- plain-loss-REV (``--compare-loss REV``): the plain loop with ``MultiBoxLoss`` as it was at
  git revision REV (e.g. ``fd819f9^``, before the sync-free step) and the optimiser unfused, as
  the configs were then; shows whether the sync-free step costs anything on the CPU.

Each run is a fresh fit of ``--warmup`` + ``--steps`` optimiser steps inside one epoch; images/s
is ``--steps`` x batch over the wall time from the end of the last warm-up step to the end of
the last step (CUDA synchronised at both ends), and per second of the training process's CPU
time (loader workers not counted; what load from other processes does not change). Runs of all
paths are interleaved, ``--repeats`` times, every other repeat in reverse order, and medians
reported; ratios are medians of the ratios within a repeat, so load on a shared machine hits
all alike. Data wait: time the
training process spends blocked in ``next()`` of the loader's iterator (all DataLoader
iterators are timed while the benchmark runs), as a fraction of the timed wall time. Gap: wall
time between a step's ``on_train_batch_end`` and the next ``on_train_batch_start`` (fetch,
transfer, ``on_after_batch_transfer`` with the device assignment, Lightning's bookkeeping).
Memory: CUDA ``max_memory_allocated`` on the GPU; on the CPU the peak RSS of the training process
during the run (VmHWM reset through /proc/self/clear_refs; loader workers not included) and what
the run added to it.

Defaults (CPU): ``experiment=quickstart`` (SSD300's design at 160x160, VGG16-BN at 1/4 width,
batch 16, channels-last), 1 loader worker (the quickstart's: on 2 cores the second one trains),
torch's default threads. ``--full``: SSD300-VGG16 (full width) at 300x300 on the synthetic
shapes with the full SSD augmentation, batch 32. ``--device cuda`` composes ``trainer=gpu``
(bf16-mixed, channels-last, cuDNN benchmark, ``num_workers=auto``, pinned memory); the flags
override it. ``--devices N`` trains the Lightning path with ``trainer=ddp`` (``ddp_cpu`` on CPU)
on N devices through the project's launcher; images/s then counts the global batch.

Targets (printed met / not met): Lightning images/s >= 0.95 x the plain loop's (CPU; by wall
and by CPU time), data wait < 5% of the step time for the Lightning runs with the worker count
used. The ratio ours (Lightning) / torchvision is printed, not judged.

    python scripts/bench_train.py [--device cuda] [--precision bf16-mixed] [--channels-last]
        [--compile] [--full] [--assign-on worker device] [--workers N] [--repeats 3]
        [--warmup 5] [--steps 20] [--compare-loss fd819f9^] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.utils.data import dataloader as torch_dataloader
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from ssd_lightning.config import compose_config
from ssd_lightning.data.datamodule import SSDDataModule
from ssd_lightning.ddp import launched_local_ranks
from ssd_lightning.module import SSDModule
from ssd_lightning.optim import param_groups
from ssd_lightning.train import build_datamodule, build_module, build_trainer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
PATHS = ("lightning", "plain", "plain-cached", "torchvision")
DEFAULT_PATHS = ("lightning", "plain", "torchvision")
# Callbacks of conf/callbacks/default.yaml that act only at validation or on checkpoints.
VALIDATION_CALLBACKS = ("model_checkpoint", "prediction_images", "error_analysis")
CACHED_BATCHES = 4


# ---------------------------------------------------------------- configuration


def bench_overrides(args: argparse.Namespace, assign_on: str, devices: int = 1) -> list[str]:
    """``ssd-train`` overrides of one benchmark configuration (see the module docstring)."""
    cuda = args.device == "cuda"
    if devices > 1:
        trainer = ["trainer=ddp" if cuda else "trainer=ddp_cpu", f"trainer.devices={devices}"]
    else:
        trainer = ["trainer=gpu" if cuda else "trainer=cpu"]
    overrides = ["~experiment"] if args.full else [f"experiment={args.experiment}"]
    overrides += [
        *trainer,
        f"paths.cache_dir={args.cache_dir}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.max_epochs=-1",
        "++trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.enable_checkpointing=false",
        f"data.assign_on={assign_on}",
        f"data.num_workers={args.workers}",
        f"data.pin_memory={cuda}",
    ]
    if args.full:
        overrides.append("task_name=bench_train")
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    elif args.full:
        overrides.append("data.batch_size=32")
    if args.precision is not None:
        overrides.append(f"trainer.precision={args.precision}")
    if args.channels_last is not None:
        overrides.append(f"module.channels_last={args.channels_last}")
    if args.compile:
        overrides.append("module.compile=true")
    return overrides + list(args.override)


def compose(args: argparse.Namespace, assign_on: str, devices: int = 1) -> DictConfig:
    """The composed config, with enough training images for one epoch of the run and the
    validation-only callbacks removed."""
    cfg = compose_config(bench_overrides(args, assign_on, devices), output_dir=args.out)
    with open_dict(cfg):
        for name in VALIDATION_CALLBACKS:
            (cfg.get("callbacks") or {}).pop(name, None)
    shapes = cfg.data.get("shapes")
    needed = (args.warmup + args.steps) * int(cfg.data.batch_size) * devices
    if shapes is not None and int(shapes.num_train) < needed:
        shapes.num_train = needed  # one epoch holds the run: no epoch boundary in the window
    return cfg


def run_config(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of ``cfg`` writing into its own folder (one per run)."""
    cfg = copy.deepcopy(cfg)
    cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / name)
    return cfg


# ---------------------------------------------------------------- timing


class StepTimes:
    """Per-step host timestamps, CUDA synchronised at the ends of the timed window."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.created = time.perf_counter()
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # CPU time of this process (all its threads)

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        index = len(self.ends)
        if index in (self.warmup - 1, self.warmup + self.steps - 1):
            synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    @property
    def done(self) -> bool:
        return len(self.ends) >= self.warmup + self.steps

    def summary(self, images_per_step: int, waits: Sequence[tuple[float, float]]) -> dict:
        """images/s, data wait, gap and warm-up figures of the timed window."""
        if not self.done:
            raise RuntimeError(f"only {len(self.ends)} of {self.warmup + self.steps} steps ran")
        first, last = self.warmup - 1, self.warmup + self.steps - 1
        t0, t1 = self.ends[first], self.ends[last]
        seconds = t1 - t0
        cpu_seconds = self.cpu_ends[last] - self.cpu_ends[first]
        window = range(self.warmup, self.warmup + self.steps)
        gap = sum(self.starts[i] - self.ends[i - 1] for i in window)
        wait = sum(end - start for start, end in waits if t0 <= start < t1)
        return {
            "images_per_s": self.steps * images_per_step / seconds,
            "images_per_cpu_s": self.steps * images_per_step / cpu_seconds,
            "step_ms": 1e3 * seconds / self.steps,
            "data_wait": wait / seconds,
            "gap": gap / seconds,
            "first_step_s": self.ends[0] - self.starts[0],
            "warmup_s": t0 - self.created,
        }


class LightningStepTimer(Callback):
    """Feeds ``StepTimes`` from the batch hooks."""

    def __init__(self, times: StepTimes) -> None:
        self.times = times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.end()


@contextlib.contextmanager
def timed_loader_next() -> Iterator[list[tuple[float, float]]]:
    """Record (start, end) of every ``next()`` on a DataLoader iterator while inside.

    Patches ``_BaseDataLoaderIter.__next__`` (private torch API, the one method all its
    iterators share), so the loader Lightning builds is timed without touching it.
    """
    base = torch_dataloader._BaseDataLoaderIter
    original = base.__next__
    calls: list[tuple[float, float]] = []

    def timed(self: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            calls.append((start, time.perf_counter()))

    base.__next__ = timed
    try:
        yield calls
    finally:
        base.__next__ = original


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory of the body: CUDA ``max_memory_allocated`` (MiB), or on the CPU the
    process's peak RSS during the body and what it added (MiB; NaN where not measurable)."""
    gc.collect()
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["added_mib"] = out["peak_mib"] - base / 2**20
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        base = proc_status_kib("VmRSS")
    except OSError:
        base = None
    yield out
    peak = proc_status_kib("VmHWM")
    if base is None or peak is None:
        out["peak_mib"] = out["added_mib"] = float("nan")
    else:
        out["peak_mib"], out["added_mib"] = peak / 1024, (peak - base) / 1024


# ---------------------------------------------------------------- the paths


def run_lightning(cfg: DictConfig, warmup: int, steps: int) -> dict[str, Any]:
    """ssd-train's loop; under DDP (``trainer.devices > 1``) this process is rank 0 and the
    other ranks run ``ddp_rank`` through the project's launcher."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    times = StepTimes(warmup, steps, device)
    trainer = build_trainer(cfg, [LightningStepTimer(times)])
    with (
        peak_memory(device) as memory,
        timed_loader_next() as waits,
        launched_local_ranks(trainer, cfg, cfg.paths.output_dir, "bench_train:ddp_rank"),
    ):
        trainer.fit(module, datamodule=datamodule)
    images = int(cfg.data.batch_size) * trainer.world_size
    result = {**times.summary(images, waits), **memory, "world_size": trainer.world_size}
    result["workers"] = datamodule.workers_per_loader()
    return result


def ddp_rank(cfg: DictConfig) -> None:
    """Entry of DDP ranks > 0 (``python -m ssd_lightning.ddp <config> bench_train:ddp_rank``)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    build_trainer(cfg).fit(module, datamodule=datamodule)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (None: no autocast)."""
    precision = str(precision)
    if precision in ("32-true", "32"):
        return None
    if precision == "bf16-mixed":
        return torch.bfloat16
    raise ValueError(
        f"the plain and torchvision loops support 32-true and bf16-mixed, not {precision}"
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype)


class PlainStep:
    """One training step of the plain loop: ``SSDModule``'s objects without Lightning."""

    def __init__(self, module: SSDModule, cfg: DictConfig, device: torch.device, loss=None) -> None:
        self.module = module
        self.loss = loss or module.loss
        self.device = device
        self.dtype = autocast_dtype(cfg.trainer.precision)
        self.optimizer = module.optimizer_factory(
            param_groups(module.net, bool(cfg.optim.no_decay_bias_norm))
        )
        self.scheduler = None
        if module.scheduler_factory is not None:
            total = int(cfg.trainer.max_steps)
            self.scheduler = module.scheduler_factory(
                self.optimizer, total_steps=total, steps_per_epoch=total
            )
        if cfg.module.compile:
            module.net.compile()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The batch's tensors on the device, images normalised and targets assigned."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                 if isinstance(v, Tensor)}  # fmt: skip
        return self.module.on_after_batch_transfer(batch, 0)  # as the Lightning path

    def __call__(self, batch: dict[str, Tensor]) -> None:
        with autocast(self.device, self.dtype):
            loc, logits = self.module(batch["images"])  # channels-last as configured
            losses = self.loss(loc, logits, batch["loc_targets"], batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def fit_setup(cfg: DictConfig) -> tuple[SSDModule, SSDDataModule, torch.device]:
    """The seeded module, its DataModule set up for fitting, and the device (cuDNN autotuning as
    Lightning sets it): the start of the hand-written paths."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    datamodule.setup("fit")
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark"))
    return module, datamodule, device_of(cfg)


def run_plain(
    cfg: DictConfig, warmup: int, steps: int, cached: bool = False, loss: nn.Module | None = None
) -> dict[str, Any]:
    """The hand-written loop over the same loader (or over batches cached on the device)."""
    module, datamodule, device = fit_setup(cfg)
    module.to(device)
    module.train()
    if loss is not None:  # a loss of another revision, with the optimiser it had (unfused)
        factory = module.optimizer_factory
        keywords = {k: v for k, v in factory.keywords.items() if k != "fused"}
        module.optimizer_factory = functools.partial(factory.func, *factory.args, **keywords)
    with peak_memory(device) as memory, timed_loader_next() as waits:
        step = PlainStep(module, cfg, device, loss)
        times = StepTimes(warmup, steps, device)
        batches = loader_batches(datamodule, cached, step)
        while not times.done:
            batch = next(batches)
            batch = batch if cached else step.to_device(batch)
            times.start()
            step(batch)
            times.end()
        del batches
    result = {**times.summary(int(cfg.data.batch_size), waits), **memory}
    result["workers"] = 0 if cached else datamodule.workers_per_loader()
    return result


def loader_batches(
    datamodule: Any, cached: bool = False, step: PlainStep | None = None
) -> Iterator[Any]:
    """Batches of the training loader, epoch after epoch; ``cached``: a few, kept on the
    device (targets assigned once), repeated."""
    if cached:
        loader = iter(datamodule.train_dataloader())
        kept = [step.to_device(next(loader)) for _ in range(CACHED_BATCHES)]
        del loader
        while True:
            yield from kept
    while True:
        yield from datamodule.train_dataloader()


def device_of(cfg: DictConfig) -> torch.device:
    return torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")


class _FeatureDict(nn.Module):
    """Our backbone's list of maps as the OrderedDict torchvision's SSD takes."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = backbone

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((str(i), m) for i, m in enumerate(self.body(x)))


def torchvision_model(module: SSDModule, cfg: DictConfig, full: bool) -> nn.Module:
    """torchvision's SSD300-VGG16 (``full``), else torchvision's SSD around a copy of our
    backbone with the same boxes per location, at our image size."""
    classes = int(cfg.data.num_classes)
    torch.manual_seed(int(cfg.seed))
    if full:
        return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=classes)
    size = to_pair(module.hparams.image_size)
    by_count = {4: [2], 6: [2, 3]}  # torchvision: 2 + 2 x len(ratios) boxes per location
    if any(k not in by_count for k in module.net.num_boxes):
        raise ValueError(f"no torchvision aspect ratios give {module.net.num_boxes} boxes")
    ratios = [by_count[k] for k in module.net.num_boxes]
    backbone = _FeatureDict(copy.deepcopy(module.net.backbone))
    return SSD(backbone, DefaultBoxGenerator(ratios), size, classes)


def run_torchvision(cfg: DictConfig, warmup: int, steps: int, full: bool) -> dict[str, Any]:
    """torchvision's SSD with its own transform and loss, fed by the same loader (GT boxes)."""
    if cfg.data.assign_on != "device":
        raise ValueError("the torchvision path reads GT boxes: compose it with assign_on=device")
    module, datamodule, device = fit_setup(cfg)
    model = torchvision_model(module, cfg, full).to(device).train()
    if cfg.module.channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(cfg.trainer.precision)
    optimizer = module.optimizer_factory(param_groups(model, bool(cfg.optim.no_decay_bias_norm)))
    size = float(max(to_pair(module.hparams.image_size)))
    with peak_memory(device) as memory, timed_loader_next() as waits:
        times = StepTimes(warmup, steps, device)
        batches = loader_batches(datamodule)
        while not times.done:
            images, targets = torchvision_inputs(next(batches), device, size)
            times.start()
            with autocast(device, dtype):
                loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.end()
        del batches
    result = {**times.summary(int(cfg.data.batch_size), waits), **memory}
    result["workers"] = datamodule.workers_per_loader()
    return result


def to_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def torchvision_inputs(
    batch: dict[str, Any], device: torch.device, size: float
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A device-path batch as torchvision's detection models take it: images in [0, 1] and
    per-image dicts of pixel ``xyxy`` boxes and labels (square images: one scale)."""
    images = batch["images"].to(device, non_blocking=True).float().div_(255)
    boxes = batch["boxes"].to(device, non_blocking=True) * size
    labels = batch["box_labels"].to(device, non_blocking=True)
    counts = batch["box_valid"].sum(1).tolist()  # on the host: no device sync
    targets = [{"boxes": boxes[i, :n], "labels": labels[i, :n]} for i, n in enumerate(counts)]
    return list(images), targets


def loss_at_revision(revision: str) -> nn.Module:
    """``MultiBoxLoss`` as in ``src/ssd_lightning/loss.py`` at git ``revision`` (labels cast
    to int64 first, as the data gave them then)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:src/ssd_lightning/loss.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    namespace = types.ModuleType(f"loss_at_{revision}")
    exec(compile(source, f"{revision}:loss.py", "exec"), namespace.__dict__)
    old = namespace.MultiBoxLoss()

    class Int64Labels(nn.Module):
        def forward(self, loc, logits, loc_targets, labels):
            return old(loc, logits, loc_targets, labels.long())

    return Int64Labels()


# ---------------------------------------------------------------- the benchmark


def run_path(path: str, cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    if path == "lightning":
        return run_lightning(cfg, args.warmup, args.steps)
    if path in ("plain", "plain-cached"):
        return run_plain(cfg, args.warmup, args.steps, cached=path == "plain-cached")
    if path == "torchvision":
        return run_torchvision(cfg, args.warmup, args.steps, args.full)
    if path.startswith("plain-loss-"):
        loss = loss_at_revision(path.removeprefix("plain-loss-"))
        return run_plain(cfg, args.warmup, args.steps, loss=loss)
    raise ValueError(f"unknown path {path!r}")


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(path, assign_on) of every row, in the order runs are interleaved."""
    rows = []
    for assign_on in args.assign_on:
        for path in args.paths:
            if path == "torchvision" and assign_on != "device":
                continue  # it needs the GT boxes of the device path
            if args.devices > 1 and path != "lightning":
                continue
            rows.append((path, assign_on))
        if args.compare_loss:
            rows.append((f"plain-loss-{args.compare_loss}", assign_on))
    if "torchvision" in args.paths and "device" not in args.assign_on:
        rows.append(("torchvision", "device"))
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved runs of every row; returns the per-run results and their medians."""
    rows = plan(args)
    configs = {a: compose(args, a, args.devices) for a in {a for _, a in rows}}
    runs: dict[str, list[dict[str, Any]]] = {f"{p} / {a}": [] for p, a in rows}
    for repeat in range(args.repeats):
        # Every other repeat in reverse order: drift in load and order effects cancel.
        for path, assign_on in rows if repeat % 2 == 0 else rows[::-1]:
            key = f"{path} / {assign_on}"
            cfg = run_config(configs[assign_on], f"r{repeat}-{path}-{assign_on}")
            result = run_path(path, cfg, args)
            runs[key].append(result)
            progress(
                f"repeat {repeat + 1}/{args.repeats} {key:<32} "
                f"{result['images_per_s']:8.1f} images/s, data wait {result['data_wait']:.1%}"
            )
            gc.collect()
    medians = {key: median_of(results) for key, results in runs.items()}
    first = configs[rows[0][1]]
    return {
        "runs": runs,
        "medians": medians,
        "ratios": ratios(runs),
        "config": describe(first, args),
    }


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Median over repeats of the ratio of images/s between runs of the same repeat (adjacent
    in time, so a change of load on a shared machine cancels), by wall and by CPU time:
    every path against the plain loop with the same assignment, and ours against
    torchvision."""
    out = {}
    pairs = [(key, f"plain / {key.split(' / ')[1]}") for key in runs]
    pairs += [(f"lightning / {key.split(' / ')[1]}", key) for key in runs
              if key.startswith("torchvision")]  # fmt: skip
    for a, b in pairs:
        if a == b or a not in runs or b not in runs:
            continue
        out[f"{a} vs {b}"] = {
            clock: statistics.median(
                x[field] / y[field] for x, y in zip(runs[a], runs[b], strict=True)
            )
            for clock, field in (("wall", "images_per_s"), ("cpu", "images_per_cpu_s"))
        }
    return out


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, value in results[0].items():
        values = [r[name] for r in results]
        out[name] = statistics.median(values) if isinstance(value, float) else value
    rates = [r["images_per_s"] for r in results]
    out["images_per_s_min"], out["images_per_s_max"] = min(rates), max(rates)
    return out


def describe(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What the figures depend on, printed and saved with them."""
    net = cfg.model.net
    width = net.get("width_mult", (net.get("backbone") or {}).get("width_mult"))
    return {
        "network": str(net._target_).rsplit(".", 1)[-1],
        "width_mult": width,
        "image_size": OmegaConf.to_container(cfg.model, resolve=True)["image_size"],
        "batch_size": int(cfg.data.batch_size),
        "precision": str(cfg.trainer.precision),
        "channels_last": bool(cfg.module.channels_last),
        "compile": bool(cfg.module.compile),
        "num_workers": cfg.data.num_workers,
        "optimizer": str(cfg.optim.optimizer._target_).rsplit(".", 1)[-1],
        "fused": bool(cfg.optim.optimizer.get("fused", False)),
        "augment": OmegaConf.to_container(cfg.data.augment, resolve=True),
        "train_images": int(cfg.data.shapes.num_train) if "shapes" in cfg.data else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "devices": args.devices,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "torch_threads": args.torch_threads,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the targets; returns the targets."""
    medians, paired = result["medians"], result["ratios"]
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS (added)"
    print()
    header = (
        f"{'path / assignment':<34}{'images/s':>9}{'(min-max)':>14}{'per CPU s':>10}"
        f"{'step ms':>9}{'vs plain wall, CPU':>20}{'data wait':>10}{'gap':>7}{'workers':>8}"
        f"   {memory} MiB"
    )
    print(header)
    print("-" * len(header))
    for key, m in medians.items():
        ratio = paired.get(f"{key} vs plain / {key.split(' / ')[1]}")
        ratio_text = f"{ratio['wall']:.3f}, {ratio['cpu']:.3f}" if ratio else "-"
        spread = f"({m['images_per_s_min']:.1f}-{m['images_per_s_max']:.1f})"
        mem = f"{m['peak_mib']:.0f}"
        if args.device != "cuda":
            mem += f" ({m['added_mib']:+.0f})"
        print(
            f"{key:<34}{m['images_per_s']:>9.1f}{spread:>14}{m['images_per_cpu_s']:>10.1f}"
            f"{m['step_ms']:>9.1f}{ratio_text:>20}{m['data_wait']:>10.1%}{m['gap']:>7.1%}"
            f"{m['workers']:>8}   {mem}"
        )
    print(
        "per CPU s: images per second of CPU time of the training process (loader workers not "
        "counted); vs plain: median over repeats of the paired ratio"
    )
    for name, ratio in paired.items():
        if "vs torchvision" in name:
            print(f"{name}: {ratio['wall']:.2f}x (wall), {ratio['cpu']:.2f}x (CPU time)")
    targets = judge(medians, paired, args)
    print("targets:" if targets else "targets: none (they judge the Lightning path)")
    for name, met in targets.items():
        if isinstance(met, dict):
            verdict = ", ".join(
                f"{'met' if ok else 'NOT met'} by {'CPU' if clock == 'cpu' else clock} time"
                for clock, ok in met.items()
            )
        else:
            verdict = "met" if met else "NOT met"
        print(f"  {name:<66} {verdict}")
    return targets


def judge(
    medians: dict[str, dict[str, Any]],
    paired: dict[str, dict[str, float]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Targets: name (with the figure) -> met, or per clock {"wall": met, "cpu": met}."""
    targets: dict[str, Any] = {}
    for key, m in medians.items():
        path, assign_on = key.split(" / ")
        if path != "lightning":
            continue
        ratio = paired.get(f"{key} vs plain / {assign_on}")
        if ratio is not None and args.device == "cpu":
            name = (
                f"Lightning within 5% of the plain loop (assign on {assign_on}): "
                f"{ratio['wall']:.3f} wall, {ratio['cpu']:.3f} CPU"
            )
            targets[name] = {clock: value >= 0.95 for clock, value in ratio.items()}
        name = (
            f"data wait < 5% of step time (assign on {assign_on}, {m['workers']} workers): "
            f"{m['data_wait']:.1%}"
        )
        targets[name] = m["data_wait"] < 0.05
    return targets


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet() -> None:
    """Lightning's per-fit banners and the known harmless warnings off (one fit per run)."""
    for name in ("lightning.pytorch", "lightning.fabric", "ssd_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Consider setting `persistent_workers=True`.*")
    warnings.filterwarnings("ignore", message=".*set_float32_matmul_precision.*")
    warnings.filterwarnings("ignore", message=".*is an invalid version and will not be supported.*")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--experiment", default="quickstart", help="the network and data")
    parser.add_argument("--full", action="store_true", help="SSD300-VGG16 at 300x300, batch 32")
    parser.add_argument("--precision", help="trainer.precision (32-true, bf16-mixed)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", help="module.compile=true")
    parser.add_argument("--assign-on", nargs="+", choices=("worker", "device"),
                        default=["worker", "device"])  # fmt: skip
    parser.add_argument("--workers", default=None, help="loader workers (default: 1; cuda auto)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--devices", type=int, default=1, help="> 1: Lightning path under DDP")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(DEFAULT_PATHS))
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run (>= 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compare-loss", metavar="REV",
                        help="also the plain loop with the loss of git revision REV")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache", help="shapes data")
    parser.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--override", nargs="*", default=[], help="more ssd-train overrides")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.workers is None:
        args.workers = "auto" if args.device == "cuda" else 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the report; returns everything measured."""
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the datasets' image checks at every setup
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.torch_threads = torch.get_num_threads()  # before Lightning's DDP changes it
    # DDP ranks > 0 import this file as a module: scripts/ on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH")) if p
    )
    with contextlib.ExitStack() as stack:
        if args.out is None:
            args.out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train-")))
        progress(
            f"bench_train: {args.device}, paths {' '.join(args.paths)}, assign on "
            f"{' and '.join(args.assign_on)}, {args.warmup} warm-up + {args.steps} timed steps, "
            f"{args.repeats} repeats, load average {os.getloadavg()[0]:.2f}"
        )
        result = measure(args)
        config = result["config"]
        print("settings: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "augment"))
        print(f"augmentation: {config['augment']}")
        result["targets"] = report(result, args)
        result["load_average_end"] = os.getloadavg()
        print(f"load average at the end: {result['load_average_end'][0]:.2f}")
    if args.json is not None:
        write_json(args.json, result)
    return result


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON (NaN and infinities as null, other objects as text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=1))


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


if __name__ == "__main__":
    main()
