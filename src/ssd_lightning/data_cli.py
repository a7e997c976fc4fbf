"""``ssd-data``: validate and summarise a dataset config without training (Hydra app).

Composes the training config tree (``conf/train.yaml``), so ``data=``, ``experiment=`` and every
``data.*`` setting mean what they mean for ``ssd-train``. Builds each split's dataset from
``data.datamodule.<split>_dataset`` exactly as training setup does (same checks, same
``DatasetReport``), but always under ``on_bad_sample=skip`` and with ``check_images=true`` so
that every problem is listed, then (``decode=true``) decodes every image as training would.
Prints one table with a column per split: images, image sizes, objects per class, boxes per
image, box sizes with COCO's small / medium / large split (box area in original pixels:
< 32^2, < 96^2, the rest), aspect ratios, problems; writes ``data_summary.json``,
``data_summary.md``, ``class_histogram.png``, ``box_sizes.png`` and ``samples_<split>.png`` (GT
boxes drawn) into the run folder. Exits with status 1 when a problem would stop an
``on_bad_sample=raise`` run (every kind but the repairs of ``REPAIR_KINDS``). Examples::

    ssd-data experiment=bccd data.root=/data/bccd
    ssd-data data=yolo data.root=/data/mine data.class_names=[cat,dog]
    ssd-data experiment=bccd data.root=/data/bccd convert=yolo out=/data/bccd_yolo

``convert=yolo out=<folder>`` writes the splits in YOLO txt format instead (``write_yolo``), with
an Ultralytics ``data.yaml``, and prints the ``ssd-train data=yolo`` command for it.
``check_data(cfg)`` and ``convert_data(cfg)`` are the plain functions behind it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from ssd_lightning.anchor_analysis import SIZE_AREA_LIMITS, SIZE_NAMES
from ssd_lightning.config import CONFIG_DIR, MissingSettingError, check_required
from ssd_lightning.data import BadSampleError, DetectionDataset, ImageReadError
from ssd_lightning.data.images import ImageTooLargeError
from ssd_lightning.data.records import AnnotationRecords
from ssd_lightning.data.validation import (
    CLIPPED_BOX,
    IMAGE_TOO_LARGE,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    ProblemRecorder,
)
from ssd_lightning.data.yolo import write_names_file, write_yolo
from ssd_lightning.visualize import draw_detections

CONFIG_NAME = "data_check"
# The entry config: the training tree plus these settings (registered in Hydra's ConfigStore,
# so conf/ stays the training tree).
ENTRY_CONFIG = {
    "defaults": ["train", "_self_"],
    "task_name": "data",
    "splits": ["train", "val"],  # datasets of data.datamodule: <split>_dataset
    "decode": True,  # decode every image, as training would (finds corrupt image data)
    "workers": 4,  # decoding threads
    "grid_images": 12,  # sample images drawn per split
    "progress": True,
    "convert": None,  # yolo: write the splits in YOLO txt format into `out` instead
    "out": None,
}
ConfigStore.instance().store(name=CONFIG_NAME, node=ENTRY_CONFIG)
# Problem kinds that keep the data (repairs): they never stop an on_bad_sample=raise run.
REPAIR_KINDS = frozenset({CLIPPED_BOX})
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ASPECT_TICKS = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
SIDE_TICKS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 256, 512, 1024, 2048, 4096)


def check_data(cfg: DictConfig) -> dict[str, Any]:
    """Validate and summarise the configured splits; writes the run folder's files.

    Returns:
        The content of ``data_summary.json``: ``{"splits": {split: summary}, "blocking":
        {split: {kind: count}}, "passes": bool}``; ``passes`` is False when a problem would
        stop an ``on_bad_sample=raise`` run.
    """
    check_required(cfg)
    datasets = build_datasets(cfg)
    if cfg.decode:
        for split, dataset in datasets.items():
            decode_all(dataset, int(cfg.workers), bool(cfg.progress), split)
    summaries = {split: summarize(dataset) for split, dataset in datasets.items()}
    blocking = {split: s["blocking"] for split, s in summaries.items() if s["blocking"]}
    result = {"splits": summaries, "blocking": blocking, "passes": not blocking}
    text = "\n\n".join(
        [format_table(summaries), *_problem_lines(summaries), verdict(summaries, bool(cfg.decode))]
    )
    print(text, flush=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_summary.json").write_text(json.dumps(result, indent=2))
    (out / "data_summary.md").write_text(text + "\n")
    names = next(iter(datasets.values())).class_names[1:]
    plot_class_histogram(summaries, names, out / "class_histogram.png")
    plot_box_sizes({s: d.records for s, d in datasets.items()}, out / "box_sizes.png")
    for split, dataset in datasets.items():
        sample_grid(dataset, int(cfg.grid_images), out / f"samples_{split}.png", seed=cfg.seed)
    print(f"written: {out}/data_summary.json, .md, class_histogram.png, box_sizes.png, "
          f"samples_*.png", flush=True)  # fmt: skip
    return result


def build_datasets(cfg: DictConfig) -> dict[str, DetectionDataset]:
    """Each split's dataset, checked at setup and with every problem kept (skip policy)."""
    datasets = {}
    for split in cfg.splits:
        node = cfg.data.datamodule.get(f"{split}_dataset")
        if node is None:
            known = [k.removesuffix("_dataset") for k in cfg.data.datamodule if "_dataset" in k]
            raise ValueError(f"split {split!r}: data.datamodule has no {split}_dataset ({known})")
        params = inspect.signature(get_object(node._target_)).parameters
        forced = {"on_bad_sample": "skip", "check_images": True}
        overrides = {k: v for k, v in forced.items() if k in params}
        datasets[split] = instantiate(node, _convert_="all", **overrides)
    return datasets


def decode_all(dataset: DetectionDataset, workers: int, progress: bool, split: str) -> int:
    """Decode every image in threads; failures go to the dataset's report. Returns their count."""
    from tqdm import tqdm

    def load(index: int) -> tuple[str, str] | None:
        try:
            dataset.load_sample(index)
        except ImageTooLargeError as e:
            return IMAGE_TOO_LARGE, str(e)
        except ImageReadError as e:
            return UNREADABLE_IMAGE, str(e)
        except BadSampleError as e:
            return SIZE_MISMATCH, str(e)
        return None

    recorder = ProblemRecorder(dataset.summary(), "skip")
    failures = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(load, range(len(dataset)))
        for problem in tqdm(results, total=len(dataset), desc=f"decoding {split}", unit="img",
                            disable=not progress):  # fmt: skip
            if problem is not None:
                failures += 1
                recorder.skip(problem[0], f"{problem[1]} (found when decoding)")
    return failures


def box_geometry(records: AnnotationRecords) -> dict[str, np.ndarray]:
    """Per object (crowd regions left out): side sqrt(w*h) and area in original pixels, w/h,
    label, and its image's index."""
    keep = ~records.iscrowd
    boxes = records.boxes[keep].astype(np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    image_of = np.repeat(np.arange(len(records)), np.diff(records.offsets))[keep]
    return {"side": np.sqrt(w * h), "area": w * h, "aspect": w / h,
            "label": records.labels[keep], "image": image_of}  # fmt: skip


def summarize(dataset: DetectionDataset) -> dict[str, Any]:
    """Counts and distributions of one split, plus its report and the blocking problems."""
    records, report = dataset.records, dataset.summary()
    geometry = box_geometry(records)
    per_image = np.bincount(geometry["image"], minlength=len(records))
    per_class = np.bincount(geometry["label"], minlength=dataset.num_classes)
    size_class = np.searchsorted(SIZE_AREA_LIMITS, geometry["area"], side="right")
    sizes, size_counts = np.unique(records.sizes, axis=0, return_counts=True)
    order = np.argsort(-size_counts, kind="stable")[:3]
    counts = report.problem_counts
    return {
        "dataset": report.name,
        "images": len(records),
        "images_without_objects": int((per_image == 0).sum()),
        "objects": len(geometry["side"]),
        "objects_per_class": dict(
            zip(dataset.class_names[1:], per_class[1:].tolist(), strict=True)
        ),
        "crowd_regions": int(records.iscrowd.sum()),
        "difficult": int(records.difficult.sum()),
        "boxes_per_image": _describe(per_image),
        "image_sizes": {
            "distinct": len(sizes),
            "most_common": [
                [int(sizes[i][1]), int(sizes[i][0]), int(size_counts[i])] for i in order
            ],
        },
        "box_side_px": _describe(geometry["side"]),
        "aspect_ratio": _describe(geometry["aspect"]),
        "size_split": {name: int((size_class == k).sum()) for k, name in enumerate(SIZE_NAMES)},
        "problems": counts,
        "blocking": {k: n for k, n in counts.items() if k not in REPAIR_KINDS},
        "report": dataclasses.asdict(report),
    }


def _describe(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        keys = ["min", *(f"q{round(100 * q):02d}" for q in QUANTILES), "mean", "max"]
        return dict.fromkeys(keys)
    stats = {"min": float(values.min())}
    stats.update({f"q{round(100 * q):02d}": float(np.quantile(values, q)) for q in QUANTILES})
    stats.update(mean=float(values.mean()), max=float(values.max()))
    return stats


def format_table(summaries: Mapping[str, dict[str, Any]]) -> str:
    """The dataset names, then a Markdown table with one column per split."""
    rows: list[tuple[str, list[str]]] = []
    columns = list(summaries.values())

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(s) for s in columns]))

    add("images", lambda s: f"{s['images']:,}")
    add("  without objects", lambda s: f"{s['images_without_objects']:,}")
    if any("images_without_label_file" in s["report"] for s in columns):
        add("  without a label file", lambda s: str(s["report"].get("images_without_label_file")))
    add("image sizes WxH (images)", _image_sizes)
    add("objects", lambda s: f"{s['objects']:,}")
    add("objects/image min / median / mean / max", lambda s: _per_image(s["boxes_per_image"]))
    for name in columns[0]["objects_per_class"]:
        add(f"  {name}", lambda s, n=name: _share(s["objects_per_class"].get(n, 0), s["objects"]))
    for label, key in (("crowd regions (ignored)", "crowd_regions"), ("difficult", "difficult")):
        if any(s[key] for s in columns):
            add(label, lambda s, k=key: f"{s[k]:,}")
    limits = [f"{np.sqrt(a):g}^2" for a in SIZE_AREA_LIMITS]
    bounds = [f"area < {limits[0]}", f"< {limits[1]}", f">= {limits[1]}"]
    for name, bound in zip(SIZE_NAMES, bounds, strict=True):
        add(f"{name} ({bound} px)", lambda s, n=name: _share(s["size_split"][n], s["objects"]))
    quantiles = " / ".join(f"q{round(100 * q):02d}" for q in QUANTILES)
    add(f"box side sqrt(w*h) px {quantiles}", lambda s: _quantiles(s["box_side_px"], "{:.0f}"))
    add("box side px min / max", lambda s: _min_max(s["box_side_px"], "{:.1f}"))
    add(f"aspect w/h {quantiles}", lambda s: _quantiles(s["aspect_ratio"], "{:.2f}"))
    add("problems that stop a raise run", lambda s: _kinds(s["blocking"]))
    add("repairs (kept)", lambda s: _kinds({k: n for k, n in s["problems"].items()
                                            if k in REPAIR_KINDS}))  # fmt: skip
    names = [f"{split}: {s['dataset']}" for split, s in summaries.items()]
    lines = [*names, "", _row(["", *summaries]), _row(["---"] + ["---:"] * len(columns))]
    lines += [_row([label, *cells]) for label, cells in rows]
    return "\n".join(lines)


def _problem_lines(summaries: Mapping[str, dict[str, Any]], per_kind: int = 5) -> list[str]:
    blocks = []
    for split, summary in summaries.items():
        problems = summary["report"]["problems"]
        if not problems:
            continue
        lines = [f"{split} problems:"]
        for kind, messages in problems.items():
            lines.append(f"  {kind}: {len(messages)}")
            lines.extend(f"    {m}" for m in messages[:per_kind])
            if len(messages) > per_kind:
                lines.append(f"    ... and {len(messages) - per_kind} more (data_summary.json)")
        blocks.append("\n".join(lines))
    return blocks


def verdict(summaries: Mapping[str, dict[str, Any]], decoded: bool) -> str:
    """One line: would an ``on_bad_sample=raise`` run start, and what ``skip`` does instead."""
    blocking = {split: s["blocking"] for split, s in summaries.items() if s["blocking"]}
    scope = "" if decoded else " (images not decoded: decode=true checks them all)"
    if not blocking:
        return f"PASS: no problem would stop an on_bad_sample=raise run{scope}"
    total = sum(sum(kinds.values()) for kinds in blocking.values())
    where = "; ".join(f"{split}: {_kinds(kinds)}" for split, kinds in blocking.items())
    return (
        f"FAIL: {total} problem(s) would stop an on_bad_sample=raise run ({where}); "
        f"on_bad_sample=skip (the default) drops them as listed{scope}"
    )


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _share(count: int, total: int) -> str:
    return f"{count:,} ({100 * count / total:.1f}%)" if total else f"{count:,}"


def _image_sizes(summary: dict[str, Any]) -> str:
    sizes = summary["image_sizes"]
    text = ", ".join(f"{w}x{h} ({n})" for w, h, n in sizes["most_common"])
    extra = sizes["distinct"] - len(sizes["most_common"])
    return text + (f" +{extra} more" if extra > 0 else "")


def _per_image(stats: dict[str, float | None]) -> str:
    if stats["min"] is None:
        return "-"
    return f"{stats['min']:.0f} / {stats['q50']:g} / {stats['mean']:.1f} / {stats['max']:.0f}"


def _quantiles(stats: dict[str, float | None], fmt: str) -> str:
    values = [stats[f"q{round(100 * q):02d}"] for q in QUANTILES]
    return "-" if None in values else " / ".join(fmt.format(v) for v in values)


def _min_max(stats: dict[str, float | None], fmt: str) -> str:
    if stats["min"] is None:
        return "-"
    return f"{fmt.format(stats['min'])} / {fmt.format(stats['max'])}"


def _kinds(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "-"


def plot_class_histogram(
    summaries: Mapping[str, dict[str, Any]], class_names: Sequence[str], path: str | Path
) -> Path:
    """PNG bar chart of the objects per class, one bar per split."""
    plt = _pyplot()
    x = np.arange(len(class_names))
    width = 0.8 / max(1, len(summaries))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(class_names) + 2), 4))
    for k, (split, summary) in enumerate(summaries.items()):
        counts = [summary["objects_per_class"].get(n, 0) for n in class_names]
        ax.bar(x + (k - (len(summaries) - 1) / 2) * width, counts, width, label=split)
    ax.set_xticks(x, class_names, rotation=90 if len(class_names) > 8 else 0)
    ax.set_ylabel("objects")
    ax.set_title("objects per class")
    ax.legend()
    return _save(fig, path)


def plot_box_sizes(records: Mapping[str, AnnotationRecords], path: str | Path) -> Path:
    """PNG scatter of box side sqrt(w*h) against aspect ratio w/h (log axes), per split, with
    COCO's small / medium / large limits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for split, split_records in records.items():
        geometry = box_geometry(split_records)
        ax.scatter(geometry["side"], geometry["aspect"], s=4, alpha=0.4, rasterized=True,
                   label=f"{split} ({len(geometry['side'])})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    low, high = ax.get_xlim()
    edges = [low, *(float(np.sqrt(a)) for a in SIZE_AREA_LIMITS), high]
    for k, name in enumerate(SIZE_NAMES):
        if k:
            ax.axvline(edges[k], color="0.4", linestyle="--", linewidth=1)
        if edges[k + 1] > edges[k]:
            ax.text(np.sqrt(edges[k] * edges[k + 1]), 1.01, name, ha="center", fontsize=8,
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xlim(low, high)
    ticks = [t for t in SIDE_TICKS if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_yticks(ASPECT_TICKS, [f"{t:.2g}" for t in ASPECT_TICKS])
    ax.minorticks_off()
    ax.set_xlabel("box side sqrt(w*h), original pixels")
    ax.set_ylabel("aspect ratio w/h")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def sample_grid(
    dataset: DetectionDataset, count: int, path: str | Path, seed: int = 0, tile: int = 320
) -> Path | None:
    """PNG grid of ``count`` random images (4 per row) with their GT boxes and class names.

    Each image is scaled to fit a ``tile`` x ``tile`` square before drawing, so labels stay
    legible, and padded to the largest; images that fail to decode are left out. None when
    nothing could be drawn.
    """
    import cv2
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(count, len(dataset)), replace=False)
    drawings = []
    for index in sorted(indices.tolist()):
        try:
            sample = dataset.load_sample(index)
        except (ImageReadError, BadSampleError):
            continue
        image = sample["image"]
        scale = tile / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        names = dataset.class_names[1:]
        drawn = draw_detections(image, sample["boxes"] * scale, sample["labels"], None, names, 0, 1)
        drawings.append(drawn)
    if not drawings:
        return None
    height, width = (max(d.shape[k] for d in drawings) for k in (0, 1))
    tiles = []
    for drawn in drawings:  # pad to the largest tile
        canvas = np.zeros((height, width, 3), np.uint8)
        canvas[: drawn.shape[0], : drawn.shape[1]] = drawn
        tiles.append(torch.from_numpy(canvas).permute(2, 0, 1))
    grid = make_grid(tiles, nrow=4, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def convert_data(cfg: DictConfig) -> dict[str, dict[str, int]]:
    """Write the configured splits in YOLO txt format into ``cfg.out`` (a new folder).

    Returns:
        Per split, ``write_yolo``'s counts.
    """
    if cfg.convert != "yolo":
        raise ValueError(f"convert={cfg.convert!r}: the only output format is yolo")
    if not cfg.out:
        raise MissingSettingError("convert=yolo needs out=<folder for the YOLO dataset>")
    check_required(cfg)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; convert writes into a new folder")
    written, names = {}, None
    for split, dataset in build_datasets(cfg).items():
        names = dataset.class_names[1:]
        written[split] = write_yolo(dataset, out, split, progress=bool(cfg.progress))
        counts, problems = written[split], dataset.summary().problem_counts
        notes = []
        if counts["left_out"]:
            notes.append(f"{counts['left_out']} crowd or difficult objects left out (no YOLO flag)")
        if problems:
            notes.append(f"read with on_bad_sample=skip: {_kinds(problems)}, as logged above")
        print(f"{split}: {counts['images']} images, {counts['objects']} objects written to "
              f"{out}/images/{split} and labels/{split}"
              + "".join(f"\n  {note}" for note in notes), flush=True)  # fmt: skip
    assert names is not None
    names_file = write_names_file(out, names, {split: split for split in written})
    experiment = _choice("experiment")
    command = ["ssd-train", *([f"experiment={experiment}"] if experiment else []), "data=yolo",
               f"data.root={out}", f"data.class_names={class_names_override(names)}"]  # fmt: skip
    print(f"class names: {names_file}\ntrain on it: {' '.join(command)}", flush=True)
    return written


def class_names_override(names: Sequence[str]) -> str:
    """``[a,b]`` for a Hydra command line, quoted where a name needs it."""
    if all(re.fullmatch(r"[A-Za-z_][\w-]*", n) for n in names):
        return "[" + ",".join(names) + "]"
    return "'[" + ",".join(json.dumps(n) for n in names) + "]'"


def _choice(group: str) -> str | None:
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    if cfg.convert:
        convert_data(cfg)
    elif not check_data(cfg)["passes"]:
        sys.exit(1)


def main() -> None:
    """Console script ``ssd-data``."""
    _hydra_main()


if __name__ == "__main__":
    main()
