"""GPU check: SSD300-VGG16 training speed and memory, data pipeline, post-processing, evaluation
and DDP scaling in one command, under 8 minutes, into one JSON + Markdown summary.

    .venv/bin/python scripts/gpu_check.py [--out outputs/gpu_check/<timestamp>] [--quick]
    scripts/gpu_check.sh [options]   # the same; without a .venv: python3 + carried wheels

Sections (each in its own try/except: a failure is recorded in the summary and the rest runs;
the JSON and Markdown are rewritten after every section, so a run cut short keeps what it
measured; progress lines carry the clock and the seconds since the start):

- environment: GPUs, driver, torch / CUDA / cuDNN, TF32 flags, CPUs, load, git commit.
- data: the synthetic shapes (300x300 JPEGs, 1-6 objects, project generator, nothing downloaded)
  generated once into ``--cache-dir``, enough images that every timed run stays in one epoch.
- training (GPU): ssd-train's Lightning loop (``scripts/bench_train.py``'s ``run_lightning``:
  the project's builders, ``trainer=gpu``, loader workers ``auto``) for SSD300-VGG16, full
  width, 300x300, batch 32, SSD augmentation on, in fp32 (``32-true``; cuDNN's TF32 default),
  bf16-mixed, bf16-mixed + channels_last, and + torch.compile, each with the GT assigned on the
  GPU (``data.assign_on=device``, the new path) and in the workers (``worker``). Per run:
  ``--warmup`` untimed steps (compile and cuDNN autotuning happen there and are reported as the
  first step's and the warm-up's seconds), then ``--steps`` timed steps; images/s, step ms, the
  share of the time blocked on the loader, CUDA ``max_memory_allocated``. Then the compute bound
  (the plain step on 4 batches kept on the GPU, targets assigned once, bf16 + channels_last)
  and torchvision's ``ssd300_vgg16`` trained with its own loss in bf16 on the same loader.
- data_pipeline: the training loader alone (workers decode, augment, collate; with and
  without the GT assignment in the workers), one worker per CPU core, images/s.
- postprocess (GPU): ``PostProcessor`` (what ``SSDModule.postprocess`` is) vs torchvision's
  ``postprocess_detections`` at batch 32 on the GPU, random and trained-like logits, 21 and 91
  classes (``scripts/bench_loss_postprocess.py``'s workloads).
- evaluation: ``DetectionMetrics`` (COCO + VOC) fed as ``scripts/bench_eval.py`` feeds it
  (batches of 32 per-image dicts, 100 detections per image, its seeded detection generator)
  on 5,000 synthetic COCO-like images (80 classes, ~7 objects per image) whose tensors are on
  the GPU as in validation; seconds per 5k images.
- ddp (2+ GPUs): the Lightning loop (bf16, channels_last, assignment on the GPU) on 1 GPU
  (``trainer=gpu``) and on all N (``trainer=ddp``, the project's launcher), each in a
  subprocess of bench_train.py; efficiency = images/s per GPU at N / images/s at 1.

Goals (printed met / not met when a GPU is present): >= 2,000 training images/s in bf16 on one
H100/H200 (the compute bound of SSD300-VGG16 is ~4,700); <= 10 GB (1e10 bytes) peak at batch
32; DDP >= 90% efficiency. A machine without CUDA skips the GPU sections with a line each and
still writes the summary (``--quick``: tiny settings, seconds; the CI smoke test).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
GB = 1e9
# (name, trainer.precision, channels_last, compile): the training configurations, in order.
TRAIN_CONFIGS = (
    ("fp32", "32-true", False, False),
    ("bf16", "bf16-mixed", False, False),
    ("bf16+channels_last", "bf16-mixed", True, False),
    ("bf16+channels_last+compile", "bf16-mixed", True, True),
)
ASSIGN = ("device", "worker")
# Seconds a training run needs at least (with compile: the compilation); runs that would not
# fit the time left are skipped with a line.
RUN_COST_S = {False: 25.0, True: 120.0}


class Check:
    """Summary, clock and output files of one GPU check."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.cuda = torch.cuda.is_available() and not args.cpu
        # The GPU sections run where CUDA is, or on the CPU when asked (tests of their code).
        self.gpu_sections = self.cuda or args.gpu_sections_on_cpu
        self.device = "cuda" if self.cuda else "cpu"
        self.devices = torch.cuda.device_count() if self.cuda else args.cpu_devices
        # Run folders (TensorBoard logs, DDP configs): outside --out, which keeps two files.
        self.work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.summary: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sections": {},
            "goals": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {message}", flush=True)

    def section(self, name: str, run: Callable[[Check], dict[str, Any]], needs_gpu: bool) -> None:
        """Run one section, recording its results or why it was skipped or failed."""
        record: dict[str, Any]
        if needs_gpu and not self.gpu_sections:
            record = {"status": "skipped", "reason": "no CUDA device"}
            self.log(f"{name}: skipped (no CUDA device)")
        else:
            self.log(f"{name}: start")
            begin = time.perf_counter()
            # A hang prints every thread's stack instead of waiting silently.
            faulthandler.dump_traceback_later(max(self.left(), 60.0), exit=False)
            try:
                record = {"status": "ok", **run(self)}
            except Exception as e:  # recorded, and the next section runs
                record = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=8),
                }
                self.log(f"{name}: ERROR {type(e).__name__}: {e}")
            finally:
                faulthandler.cancel_dump_traceback_later()
                free_cuda()
            record["seconds"] = round(time.perf_counter() - begin, 1)
            self.log(f"{name}: {record['status']} in {record['seconds']:.1f} s")
        self.summary["sections"][name] = record
        self.write()

    def write(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(jsonable(self.summary), indent=1))
        (out / "gpu_check.md").write_text(markdown(self.summary))

    def bench_options(self, warmup: int, steps: int, images: int, *extra: str) -> list[str]:
        """bench_train.py's options for SSD300-VGG16 (``--quick``: the tiny network) on this
        check's device, batch size, data cache and run folder."""
        network = "--experiment tiny" if self.args.quick else "--full"
        common = f"{network} --device {self.device} --warmup {warmup} --steps {steps}"
        return [
            *common.split(),
            *("--batch-size", str(self.args.batch_size), "--cache-dir", str(self.args.cache_dir)),
            *("--out", str(self.work / "runs")),
            *extra,
            *("--override", f"data.shapes.num_train={images}"),
        ]

    def bench_args(self, *extra: str) -> argparse.Namespace:
        """bench_train.py's settings of the training, data and pipeline sections."""
        import bench_train

        options = self.bench_options(self.args.warmup, self.args.steps, self.train_images())
        return bench_train.parse_args([*options, *extra])

    def train_images(self) -> int:
        """Training images so that every run (and the pipeline's batches) fits one epoch."""
        pipeline = self.args.pipeline_warmup + self.args.pipeline_batches  # one epoch's batches
        batches = max(self.args.warmup + self.args.steps, pipeline)
        return int(math.ceil(batches * self.args.batch_size / 64) * 64)


# ---------------------------------------------------------------- sections


def environment(check: Check) -> dict[str, Any]:
    import importlib.metadata as metadata

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average": os.getloadavg(),
        "processor": platform.processor() or platform.machine(),
        "git_commit": git_commit(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "gpus": [],
    }
    for name in (
        "torchvision",
        "lightning",
        "hydra-core",
        "albumentations",
        "faster-coco-eval",
        "opencv-python-headless",
        "numpy",
    ):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    if check.cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append(
                {
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
        env["driver"] = nvidia_smi("driver_version")
    gpus = ", ".join(g["name"] for g in env["gpus"]) or "none"
    check.log(
        f"environment: GPUs: {gpus}; torch {env['torch']} (CUDA {env['cuda_runtime']}, "
        f"cuDNN {env['cudnn']}); {env['cpus']} CPUs, load {env['load_average'][0]:.2f}"
    )
    return env


def data(check: Check) -> dict[str, Any]:
    """Generate the shapes images (once per settings) outside every timed run."""
    from hydra.utils import instantiate

    import bench_train

    cfg = bench_train.compose(check.bench_args(), "device")
    begin = time.perf_counter()
    dataset = instantiate(cfg.data.datamodule.train_dataset)
    seconds = time.perf_counter() - begin
    check.log(
        f"data: {len(dataset)} training images of {cfg.data.shapes.image_size} px ready "
        f"in {seconds:.1f} s ({cfg.data.shapes.root})"
    )
    return {
        "train_images": len(dataset),
        "image_size": cfg.data.shapes.image_size,
        "seconds": round(seconds, 1),
    }


def training(check: Check) -> dict[str, Any]:
    """The Lightning loop in every configuration, then the compute bound and torchvision."""
    network = "tiny (--quick)" if check.args.quick else "SSD300-VGG16, 300x300"
    runs = [*lightning_runs(check), *reference_runs(check)]
    return {"runs": runs, "batch_size": check.args.batch_size, "network": network}


def lightning_runs(check: Check) -> list[dict[str, Any]]:
    """ssd-train's loop in each configuration, GT assigned on the device and in the workers."""
    import bench_train

    rows = []
    for name, precision, channels_last, compiled in TRAIN_CONFIGS:
        if name not in check.args.configs:
            continue
        flags = [
            *("--precision", precision),
            "--channels-last" if channels_last else "--no-channels-last",
            *(["--compile"] if compiled else []),
        ]
        for assign_on in ASSIGN:
            label = f"{name}, assign on {assign_on}"
            row = {
                "config": name,
                "precision": precision,
                "channels_last": channels_last,
                "compile": compiled,
                "assign_on": assign_on,
                "path": "lightning",
            }
            rows.append(row)
            if fits(check, row, label, RUN_COST_S[compiled]):
                cfg = bench_train.compose(check.bench_args(*flags), assign_on)
                cfg = bench_train.run_config(cfg, slug(label))
                guarded(check, row, label, functools.partial(bench_train.run_lightning, cfg))
    return rows


def reference_runs(check: Check) -> list[dict[str, Any]]:
    """bf16 + channels_last: the plain step on batches kept on the GPU (the compute bound), and
    torchvision's SSD300 with its own loss on the same loader."""
    import bench_train

    rows = []
    extras = (
        ("compute bound: plain step on 4 batches kept on the GPU", "plain-cached"),
        ("torchvision ssd300_vgg16 (--quick: SSD around our backbone), its loss", "torchvision"),
    )
    for label, path in extras:
        row = {
            "config": "bf16+channels_last",
            "precision": "bf16-mixed",
            "channels_last": True,
            "compile": False,
            "assign_on": "device",
            "path": path,
            "label": label,
        }
        rows.append(row)
        if not fits(check, row, label, RUN_COST_S[False]):
            continue
        args = check.bench_args("--precision", "bf16-mixed", "--channels-last")
        cfg = bench_train.run_config(bench_train.compose(args, "device"), path)
        if path == "plain-cached":
            run = functools.partial(bench_train.run_plain, cfg, cached=True)
        else:
            run = functools.partial(bench_train.run_torchvision, cfg, full=not check.args.quick)
        guarded(check, row, label, run)
    return rows


def fits(check: Check, row: dict[str, Any], label: str, cost: float) -> bool:
    """Whether a run of ``cost`` seconds fits the time left (else recorded as skipped)."""
    if check.left() >= cost + reserve(check):
        return True
    row["skipped"] = f"not enough time left ({check.left():.0f} s)"
    check.log(f"training: {label}: skipped, {row['skipped']}")
    return False


def reserve(check: Check) -> float:
    """Seconds kept for the sections after training."""
    later = 75.0  # data pipeline, post-processing, evaluation
    if check.gpu_sections and check.devices > 1:
        later += 150.0
    return 0.0 if check.args.quick else later


def guarded(check: Check, row: dict[str, Any], label: str, run: Callable[..., dict]) -> None:
    """One run of ``--warmup`` + ``--steps`` steps into ``row`` (its error recorded there, not
    raised)."""
    try:
        row.update(run(warmup=check.args.warmup, steps=check.args.steps))
        check.log(
            f"training: {label}: {row['images_per_s']:7.0f} images/s, step {row['step_ms']:.1f} "
            f"ms, data wait {row['data_wait']:.1%}, peak {row['peak_mib'] / 1024:.2f} GiB, first "
            f"step {row['first_step_s']:.1f} s, warm-up {row['warmup_s']:.1f} s"
        )
    except Exception as e:  # the next configuration runs
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
        check.log(f"training: {label}: ERROR {row['error']}")
    finally:
        free_cuda()


def data_pipeline(check: Check) -> dict[str, Any]:
    """The training loader alone, one worker per core, with the GT assigned on the device
    (workers decode + augment) and in the workers."""
    import bench_train

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for assign_on in ASSIGN:
        args = check.bench_args("--workers", str(cores))
        cfg = bench_train.compose(args, assign_on)
        rate = loader_rate(cfg, check.args.pipeline_warmup, check.args.pipeline_batches)
        rows.append({"assign_on": assign_on, "workers": cores, **rate})
        check.log(
            f"data_pipeline: assign on {assign_on}, {cores} workers: "
            f"{rate['images_per_s']:.0f} images/s"
        )
    return {
        "runs": rows,
        "image_size": int(cfg.data.shapes.image_size),
        "augment": dict(cfg.data.augment),
        "batch_size": int(cfg.data.batch_size),
    }


def loader_rate(cfg: Any, warmup: int, batches: int) -> dict[str, float]:
    """images/s of the training loader over ``batches`` batches after ``warmup``."""
    import bench_train

    module = bench_train.build_module(cfg)
    datamodule = bench_train.build_datamodule(cfg, module)
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    for _ in range(warmup):
        next(iterator)
    images, begin = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(iterator)["images"])
    seconds = time.perf_counter() - begin
    del iterator
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds}


def postprocess(check: Check) -> dict[str, Any]:
    """PostProcessor vs torchvision's postprocess_detections on the GPU, batch 32."""
    import bench_loss_postprocess as blp

    device = torch.device(check.device)
    gen = torch.Generator().manual_seed(0)
    anchors = blp.DefaultBoxes(300, blp.FEATURE_MAPS, sizes=blp.SIZES, steps=blp.STEPS)
    coder = blp.SSDBoxCoder(anchors.cxcywh).to(device)
    batch, objects = check.args.post_batch, 13
    workloads = [
        ("random", 21, None),
        ("random", 91, None),
        ("trained-like", 91, 2000.0),
        ("trained-like", 21, 0.13),
    ]
    rows = []
    for kind, classes, pairs in workloads:
        if pairs is None:
            loc, logits = blp.random_outputs(batch, classes, gen, anchors)
        else:
            loc, logits = blp.trained_like_outputs(batch, classes, pairs, gen, coder, objects)
        fns, agree, note = blp.bench_postprocess(loc, logits, device, gen, anchors, coder)
        ms = blp.interleaved_medians(fns, device, check.args.post_repeats, check.args.post_warmup)
        rows.append(
            {
                "workload": kind,
                "classes": classes,
                "batch": batch,
                "ours_ms": ms["ours"],
                "torchvision_ms": ms["torchvision"],
                "speedup": ms["torchvision"] / ms["ours"],
                "same_detections": agree,
                "note": note,
            }
        )
        check.log(
            f"postprocess: {kind} C{classes} B{batch}: ours {ms['ours']:.2f} ms, "
            f"torchvision {ms['torchvision']:.2f} ms, same detections: {agree}"
        )
    return {"runs": rows, "device": device.type, "batch": batch}


def evaluation(check: Check) -> dict[str, Any]:
    """DetectionMetrics over synthetic COCO-like images, tensors on the GPU, seconds per 5k."""
    import bench_eval
    from ssd_lightning.metrics import DetectionMetrics

    device = torch.device(check.device)
    count, classes = check.args.eval_images, 80
    targets, sizes = coco_like_targets(count, classes)
    preds = bench_eval.make_detections(targets, sizes, classes + 1, per_image=100, seed=0)
    preds = [{k: v.to(device) for k, v in p.items()} for p in preds]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    metrics = DetectionMetrics([f"class{k}" for k in range(1, classes + 1)]).to(device)
    begin = time.perf_counter()
    for start in range(0, count, bench_eval.BATCH):
        metrics.update(
            preds[start : start + bench_eval.BATCH], targets[start : start + bench_eval.BATCH]
        )
    updated = time.perf_counter()
    results = metrics.compute()
    end = time.perf_counter()
    per_5k = (end - begin) * 5000 / count
    check.log(
        f"evaluation: {count} images on {device.type}: update {updated - begin:.1f} s, "
        f"compute {end - updated:.1f} s; {per_5k:.1f} s per 5k images "
        f"(mAP {results['mAP']:.3f})"
    )
    return {
        "images": count,
        "device": device.type,
        "update_s": updated - begin,
        "compute_s": end - updated,
        "seconds_per_5k": per_5k,
        "mAP": results["mAP"],
        "gt_boxes": sum(len(t["labels"]) for t in targets),
    }


def coco_like_targets(count: int, classes: int, seed: int = 0):
    """Seeded COCO-like ground truth: 640x480-ish images, ~7 objects (0-30), sides 8 px to the
    image side (log-uniform), labels 1..classes, 1% crowd; as bench_eval's targets."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[480, 640], [640, 480], [427, 640], [375, 500]])
    targets, sizes = [], []
    for _ in range(count):
        h, w = shapes[torch.randint(len(shapes), (1,), generator=gen)][0].tolist()
        n = min(int(torch.poisson(torch.tensor(7.0), generator=gen)), 30)
        side = torch.exp(torch.rand(n, 2, generator=gen) * math.log(min(h, w) / 8)) * 8
        corner = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - side)
        targets.append(
            {
                "boxes": torch.cat([corner, corner + side], 1).float(),
                "labels": torch.randint(1, classes + 1, (n,), generator=gen),
                "difficult": torch.rand(n, generator=gen) < 0.01,
            }
        )
        sizes.append((h, w))
    return targets, sizes


def ddp(check: Check) -> dict[str, Any]:
    """Images/s per GPU on all GPUs (trainer=ddp) against one (trainer=gpu), in subprocesses."""
    gpus = check.devices
    if gpus < 2:
        check.log(f"ddp: skipped ({gpus} GPU; DDP scaling needs 2 or more)")
        return {"status": "skipped", "reason": f"{gpus} GPU"}
    from hydra.utils import instantiate

    import bench_train

    # Every rank's share of the data holds its run: one dataset for both runs, made here once
    # (not by every rank at the same time).
    warmup, timed = check.args.ddp_warmup, check.args.ddp_steps
    images = int(math.ceil((warmup + timed) * check.args.batch_size * gpus / 64) * 64)
    ddp_flags = "--precision bf16-mixed --channels-last --assign-on device --paths lightning"
    options = check.bench_options(warmup, timed, images, *ddp_flags.split(), "--repeats", "1")
    cfg = bench_train.compose(bench_train.parse_args(options), "device")
    instantiate(cfg.data.datamodule.train_dataset)
    rows = []
    for devices in (1, gpus):
        out = check.work / f"ddp-{devices}.json"
        command = [
            sys.executable,
            str(SCRIPTS / "bench_train.py"),
            *options,
            "--devices",
            str(devices),
            "--json",
            str(out),
        ]
        timeout = max(check.left() / (2 if devices == 1 else 1), 60.0)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"bench_train on {devices} GPUs failed: {done.stderr[-3000:]}")
        run = json.loads(out.read_text())["medians"]["lightning / device"]
        per_gpu = run["images_per_s"] / devices
        rows.append(
            {
                "devices": devices,
                "images_per_s": run["images_per_s"],
                "per_gpu": per_gpu,
                "data_wait": run["data_wait"],
                "workers_per_gpu": run["workers"],
            }
        )
        check.log(
            f"ddp: {devices} GPU(s): {run['images_per_s']:.0f} images/s "
            f"({per_gpu:.0f} per GPU, data wait {run['data_wait']:.1%}, "
            f"{run['workers']} workers per GPU)"
        )
    efficiency = rows[1]["per_gpu"] / rows[0]["per_gpu"]
    check.log(f"ddp: efficiency 1 -> {gpus} GPUs {efficiency:.1%}")
    return {
        "runs": rows,
        "efficiency": efficiency,
        "gpus": gpus,
        "warmup": warmup,
        "steps": timed,
        "train_images": images,
    }


# ---------------------------------------------------------------- goals and summary


def goals(check: Check) -> dict[str, Any]:
    """The goals, judged where a GPU ran the sections they need."""
    if not check.cuda:
        return {"all": {"met": None, "detail": "not judged: no CUDA device"}}
    return judge_goals(check.summary["sections"], torch.cuda.get_device_name(0))


def judge_goals(sections: dict[str, Any], gpu: str) -> dict[str, dict[str, Any]]:
    """Each goal: ``met`` (True, False, or None when not judged) and the figures behind it.

    Speed and memory are judged on the fastest bf16 run of ssd-train's loop.
    """
    training = sections.get("training", {})
    runs = [r for r in training.get("runs", []) if r.get("path") == "lightning"]
    bf16 = [r for r in runs if r["precision"] == "bf16-mixed" and "images_per_s" in r]
    out: dict[str, dict[str, Any]] = {}
    speed, memory = "train >= 2,000 images/s, bf16, one GPU", "peak memory <= 10 GB at batch 32"
    if not bf16:
        why = training.get("error") or training.get("reason") or "no bf16 run finished"
        out[speed] = out[memory] = {"met": None, "detail": f"not judged: {why}"}
    else:
        best = max(bf16, key=lambda r: r["images_per_s"])
        which = f"{best['config']}, assign on {best['assign_on']}"
        where = (
            "" if any(k in gpu for k in ("H100", "H200")) else f"; set for H100/H200, ran on {gpu}"
        )
        out[speed] = {
            "met": best["images_per_s"] >= 2000,
            "detail": f"{best['images_per_s']:.0f} images/s ({which}{where})",
        }
        gigabytes = [r["peak_mib"] * 2**20 / GB for r in bf16]
        batch = training.get("batch_size")
        out[memory] = {
            "met": best["peak_mib"] * 2**20 <= 10 * GB if batch == 32 else None,
            "detail": f"{best['peak_mib'] * 2**20 / GB:.2f} GB ({which}, batch {batch}); bf16 "
            f"runs {min(gigabytes):.2f}-{max(gigabytes):.2f} GB",
        }
    scaling = sections.get("ddp", {})
    if "efficiency" in scaling:
        out["DDP >= 90% efficiency"] = {
            "met": scaling["efficiency"] >= 0.9,
            "detail": f"{scaling['efficiency']:.1%} from 1 to {scaling['gpus']} GPUs",
        }
    else:
        why = scaling.get("error") or scaling.get("reason") or "not run"
        out["DDP >= 90% efficiency"] = {"met": None, "detail": f"not judged: {why}"}
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: environment, sections' status, one table per section, goals."""
    s = summary["sections"]
    env = s.get("environment", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", []))
    lines = [
        f"# GPU check {summary['started']}",
        "",
        f"`{summary['command']}`",
        "",
        f"GPUs: {gpus or 'none'}; driver {env.get('driver')}; torch {env.get('torch')} "
        f"(CUDA {env.get('cuda_runtime')}, cuDNN {env.get('cudnn')}); "
        f"{env.get('cpus')} CPUs, load {fmt(env.get('load_average', [None])[0])}; "
        f"commit {env.get('git_commit')}; {summary.get('elapsed_s')} s in all",
    ]
    status = [
        [n, r["status"], r.get("seconds", ""), r.get("reason") or r.get("error") or ""]
        for n, r in s.items()
    ]
    lines += table("", ["section", "status", "seconds", "note"], status)
    for name, render in MARKDOWN_TABLES.items():
        if s.get(name, {}).get("status") == "ok" and s[name].get("runs"):
            lines += render(s[name])
    ev = s.get("evaluation", {})
    if "seconds_per_5k" in ev:
        lines += [
            "",
            "## Evaluation",
            "",
            f"DetectionMetrics (COCO + VOC), {ev['images']} images on {ev['device']}: "
            f"update {ev['update_s']:.1f} s + compute {ev['compute_s']:.1f} s = "
            f"**{ev['seconds_per_5k']:.1f} s per 5k images**",
        ]
    lines += ["", "## Goals", ""]
    for name, goal in summary.get("goals", {}).items():
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        lines.append(f"- {name}: **{verdict}** ({goal['detail']})")
    return "\n".join(lines) + "\n"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown lines of a table (numbers right-aligned), under a ``##`` title if given."""
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]
    lines = ["", f"## {title}", ""] if title else [""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---:" if n else "---" for n in numeric) + " |")
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def training_table(rec: dict[str, Any]) -> list[str]:
    header = [
        "configuration",
        "path",
        "assign on",
        "images/s",
        "step ms",
        "data wait",
        "peak GiB",
        "first step s",
        "warm-up s",
        "workers",
    ]
    rows = []
    for r in rec["runs"]:
        head = [r["config"], r["path"], r["assign_on"]]
        if "images_per_s" not in r:
            rows.append([*head, r.get("skipped") or r.get("error"), *[""] * 6])
            continue
        rows.append(
            [
                *head,
                round(r["images_per_s"]),
                round(r["step_ms"], 1),
                f"{r['data_wait']:.1%}",
                round(r["peak_mib"] / 1024, 2),
                round(r["first_step_s"], 1),
                round(r["warmup_s"], 1),
                r["workers"],
            ]
        )
    return table(f"Training, {rec['network']}, batch {rec['batch_size']}", header, rows)


def pipeline_table(rec: dict[str, Any]) -> list[str]:
    where = {"worker": "in the workers", "device": "on the device (not in the loader)"}
    rows = [[where[r["assign_on"]], r["workers"], round(r["images_per_s"])] for r in rec["runs"]]
    title = f"Data pipeline, {rec['image_size']} px, batch {rec['batch_size']}"
    return table(title, ["GT assignment", "workers", "images/s"], rows)


def postprocess_table(rec: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["workload"],
            r["classes"],
            round(r["ours_ms"], 2),
            round(r["torchvision_ms"], 2),
            f"{r['speedup']:.1f}x",
            r["same_detections"],
        ]
        for r in rec["runs"]
    ]
    header = ["workload", "classes", "ours ms", "torchvision ms", "speed-up", "same"]
    return table(f"Post-processing on {rec['device']}, batch {rec['batch']}", header, rows)


def ddp_table(rec: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["devices"],
            round(r["images_per_s"]),
            round(r["per_gpu"]),
            f"{r['data_wait']:.1%}",
            r["workers_per_gpu"],
        ]
        for r in rec["runs"]
    ]
    header = ["GPUs", "images/s", "per GPU", "data wait", "workers per GPU"]
    return [*table("DDP", header, rows), "", f"efficiency: {rec['efficiency']:.1%}"]


MARKDOWN_TABLES = {
    "training": training_table,
    "data_pipeline": pipeline_table,
    "postprocess": postprocess_table,
    "ddp": ddp_table,
}


# ---------------------------------------------------------------- helpers


def free_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def nvidia_smi(field: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default: outputs/gpu_check/<timestamp>")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds; CI)")
    parser.add_argument("--cpu", action="store_true", help="as on a machine without CUDA")
    parser.add_argument(
        "--gpu-sections-on-cpu",
        action="store_true",
        help="run the GPU sections on the CPU (tests of their code; figures mean nothing)",
    )
    parser.add_argument("--cpu-devices", type=int, default=2, help="DDP processes on the CPU")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=[c[0] for c in TRAIN_CONFIGS],
        default=[c[0] for c in TRAIN_CONFIGS],
        help="training configurations",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="seconds the sections may take; runs that would not fit are skipped",
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per training run")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per training run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pipeline-warmup", type=int, default=10, help="loader batches")
    parser.add_argument("--pipeline-batches", type=int, default=50, help="timed loader batches")
    parser.add_argument("--ddp-warmup", type=int, default=10)
    parser.add_argument("--ddp-steps", type=int, default=30)
    parser.add_argument("--post-batch", type=int, default=32)
    parser.add_argument("--post-warmup", type=int, default=3)
    parser.add_argument("--post-repeats", type=int, default=20)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache", help="shapes data")
    parser.add_argument(
        "--work-dir", type=Path, help="run folders, kept (default: a temporary folder, removed)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=[n for n, _, _ in SECTIONS],
        default=[n for n, _, _ in SECTIONS],
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.batch_size = 1, 2, 4
        args.ddp_warmup, args.ddp_steps = 1, 2
        args.pipeline_warmup, args.pipeline_batches = 1, 2
        args.post_batch, args.post_warmup, args.post_repeats, args.eval_images = 2, 0, 1, 64
    if args.out is None:
        args.out = REPO / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return args


# (name, function, needs a GPU)
SECTIONS = (
    ("environment", environment, False),
    ("data", data, False),
    ("training", training, True),
    ("data_pipeline", data_pipeline, False),
    ("postprocess", postprocess, True),
    ("evaluation", evaluation, False),
    ("ddp", ddp, True),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the check; returns the summary (also written as JSON and Markdown)."""
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the datasets' image checks at every setup
    if str(SCRIPTS) not in sys.path:  # the sibling benchmark scripts
        sys.path.insert(0, str(SCRIPTS))
    check = Check(args)
    check.log(
        f"gpu_check: writing {args.out}/gpu_check.json and .md; budget {args.budget_s:.0f} s"
        + ("" if check.cuda else "; no CUDA device: the GPU sections are skipped")
    )
    try:
        import bench_train

        bench_train.quiet()
    except Exception as e:  # recorded by the sections that need it
        check.log(f"gpu_check: the project does not import: {type(e).__name__}: {e}")
    for name, run, needs_gpu in SECTIONS:
        if name in args.sections:
            check.section(name, run, needs_gpu)
    check.summary["goals"] = goals(check)
    check.write()
    for name, goal in check.summary["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        check.log(f"goal: {name}: {verdict} ({goal['detail']})")
    if args.work_dir is None:
        shutil.rmtree(check.work, ignore_errors=True)
    check.log(f"gpu_check: done in {check.elapsed():.0f} s; summary in {args.out}")
    return check.summary


if __name__ == "__main__":
    main()
