"""``ssd-anchors``: anchor coverage of a dataset before training (Hydra app).

Composes the training config tree (``conf/train.yaml``), so ``data=``, ``experiment=``,
``model=`` and ``anchors=`` mean what they mean for ``ssd-train``. Builds the training split
from ``cfg.data`` (annotations only, no image is decoded), measures the network's feature maps
from ``cfg.model`` and analyses the anchors of ``cfg.anchors``, plus any named in ``compare``
(files of ``conf/anchors`` or paths to YAML files), plus the ``suggest``ed s_min / s_max.
Prints one table with a column per configuration and writes ``anchor_coverage.json``,
``anchor_coverage.md`` and ``anchor_sizes.png`` into the run folder. Examples::

    ssd-anchors experiment=bccd data.root=/data/bccd suggest=true
    ssd-anchors experiment=bccd data.root=/data/bccd model=ssd300_vgg16 model.image_size=300 \
        anchors=ssd300 compare=[ssd300_voc,ssd300_coco]
    ssd-anchors data=coco data.root=/data/coco anchors=ssd300_coco iou_threshold=0.4

``analyse(cfg)`` is the plain function behind it (tests compose a config and call it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.anchor_analysis import (
    POSITIVE_BINS,
    QUANTILES,
    S_MAX_GRID,
    S_MIN_GRID,
    SIZE_NAMES,
    CoverageReport,
    ScaleSuggestion,
    coverage,
    records_boxes,
    suggest_scales,
    summarize,
)
from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.config import CONFIG_DIR, check_required, to_plain

CONFIG_NAME = "anchor_coverage"
# The entry config: the training tree plus the analysis settings (registered in Hydra's
# ConfigStore, so conf/ stays the training tree).
ENTRY_CONFIG = {
    "defaults": ["train", "_self_"],
    "task_name": "anchors",
    "split": "train",  # which dataset of data.datamodule: train, val or test
    "iou_threshold": "${module.iou_threshold}",
    "compare": [],  # more anchor configs: names in conf/anchors or YAML paths
    "suggest": False,  # grid-search s_min / s_max and add the result as a column
    "objective": "coverage",  # coverage | iou (see suggest_scales)
    "s_min_values": list(S_MIN_GRID),
    "s_max_values": list(S_MAX_GRID),
    "max_boxes": 20000,  # GT boxes sampled for the suggestion
    "progress": True,
}
ConfigStore.instance().store(name=CONFIG_NAME, node=ENTRY_CONFIG)
ASPECT_TICKS = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """Coverage of every configured anchor set on the dataset; writes the run folder's files.

    Returns:
        ``{"reports": [summary per configuration], "suggestion": {...} or None}``, the
        content of ``anchor_coverage.json``.
    """
    check_required(cfg)
    gt_boxes, image_sizes = dataset_boxes(cfg.data.datamodule[f"{cfg.split}_dataset"])
    image_size, feature_maps = network_geometry(cfg.model)
    main_name = _anchors_choice()
    configs = {main_name: to_plain(cfg.anchors)}
    configs.update({Path(name).stem: _load_anchors(name) for name in cfg.compare})
    anchors = {
        name: _default_boxes(name, image_size, feature_maps, settings)
        for name, settings in configs.items()
    }
    suggestion = None
    if cfg.suggest:
        suggestion = suggest_scales(
            gt_boxes, image_sizes, anchors[main_name],
            s_min_values=list(cfg.s_min_values), s_max_values=list(cfg.s_max_values),
            iou_threshold=cfg.iou_threshold, objective=cfg.objective, max_boxes=cfg.max_boxes,
        )  # fmt: skip
        settings = {**anchors[main_name].settings(), "sizes": None}
        settings.update(s_min=suggestion.s_min, s_max=suggestion.s_max)
        anchors["suggested"] = DefaultBoxes(**settings)
    reports = [
        coverage(gt_boxes, image_sizes, db, cfg.iou_threshold, name, progress=cfg.progress)
        for name, db in anchors.items()
    ]
    table = format_report(reports)
    text = table if suggestion is None else f"{table}\n\n{format_suggestion(suggestion)}"
    print(text, flush=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "reports": [summarize(r) for r in reports],
        "suggestion": None if suggestion is None else dataclasses.asdict(suggestion),
    }
    (out / "anchor_coverage.json").write_text(json.dumps(result, indent=2))
    (out / "anchor_coverage.md").write_text(text + "\n")
    plot_sizes(reports, out / "anchor_sizes.png")
    print(f"written: {out / 'anchor_coverage.json'}, {out / 'anchor_sizes.png'}", flush=True)
    return result


def dataset_boxes(dataset_cfg: DictConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """GT boxes (pixels, crowd regions left out) and image sizes of a dataset config node."""
    dataset = instantiate(dataset_cfg, _convert_="all")
    return records_boxes(dataset.records)


def network_geometry(model_cfg: DictConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """Input (height, width) and the feature-map sizes measured on the configured network."""
    net_cfg = model_cfg.net
    # Shapes only: build on the meta device, never read backbone weights.
    kwargs = {"backbone_weights": None} if "backbone_weights" in net_cfg else {}
    with torch.device("meta"):
        net = instantiate(net_cfg, **kwargs)
    size = to_plain(model_cfg.image_size)
    size = [size, size] if isinstance(size, int) else list(size)
    return size, net.feature_map_sizes(size)


def _default_boxes(
    name: str, image_size: list[int], feature_maps: list[tuple[int, int]], settings: dict
) -> DefaultBoxes:
    try:
        return DefaultBoxes(image_size, feature_maps, **settings)
    except ValueError as e:
        raise ValueError(
            f"anchor config {name!r} does not fit the network ({len(feature_maps)} feature maps "
            f"{feature_maps} at input {image_size}): {e}"
        ) from e


def _anchors_choice() -> str:
    """Column name of the main anchors: the conf/anchors option of this Hydra run if any."""
    if not HydraConfig.initialized():
        return "anchors"
    return str(HydraConfig.get().runtime.choices.get("anchors", "anchors"))


def _load_anchors(name: str) -> dict[str, Any]:
    """Settings of a named conf/anchors file or of a YAML path."""
    path = (
        Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / "anchors" / f"{name}.yaml"
    )
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "anchors").glob("*.yaml"))
        raise FileNotFoundError(f"anchor config {name!r} not found ({path}); known: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def format_report(reports: Sequence[CoverageReport]) -> str:
    """A Markdown table, one column per anchor configuration, one row per statistic."""
    summaries = [summarize(r) for r in reports]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(s) for s in summaries]))

    thr = reports[0].iou_threshold if reports else 0.5
    add("default boxes", lambda s: str(s["num_defaults"]))
    add("scales", lambda s: _scales(s["anchors"]))
    add("aspect ratios", lambda s: _ratios(s["anchors"]["aspect_ratios"]))
    add("images / GT boxes", lambda s: f"{s['num_images']} / {s['all']['num_gt']}")
    add(f"coverage (best IoU >= {thr:g})", lambda s: _pct(s["all"]["coverage"]))
    add("positives/GT mean / median", lambda s: _pos(s["all"]))
    for label, _, _ in POSITIVE_BINS:
        add(f"  GT with {label} positives", lambda s, b=label: _pct(s["all"]["positives_hist"][b]))
    add("best IoU mean", lambda s: _num(s["all"]["best_iou_mean"]))
    quantiles = " ".join(f"q{round(100 * q):02d}" for q in QUANTILES)
    add(f"best IoU {quantiles}", lambda s: _quantiles(s["all"]))
    for size in SIZE_NAMES:
        add(f"{size}: share of GT", lambda s, k=size: _share(s, s["by_size"][k]["num_gt"]))
        add(f"{size}: coverage", lambda s, k=size: _pct(s["by_size"][k]["coverage"]))
        add(f"{size}: positives mean / median", lambda s, k=size: _pos(s["by_size"][k]))
        add(f"{size}: best IoU median", lambda s, k=size: _median_iou(s["by_size"][k]))
    for k in range(max(len(s["by_map"]) for s in summaries) if summaries else 0):
        add(f"map {k}: grid, anchor sides", lambda s, k=k: _map(s, k, _grid))
        add(f"map {k}: GT with best box here", lambda s, k=k: _map(s, k, "best_share", _pct))
        add(f"map {k}: coverage of those", lambda s, k=k: _map(s, k, "coverage", _pct))
        add(f"map {k}: positives/GT", lambda s, k=k: _map(s, k, "positives_per_gt", _num))
    header = ["", *(r.name for r in reports)]
    lines = [_row(header), _row(["---"] + ["---:"] * len(reports))]
    lines += [_row([label, *cells]) for label, cells in rows]
    return "\n".join(lines)


def format_suggestion(suggestion: ScaleSuggestion, top: int = 5) -> str:
    """The suggested scales and the best grid points."""
    lines = [
        f"Suggested anchors: s_min={suggestion.s_min:g} s_max={suggestion.s_max:g} "
        f"(objective {suggestion.objective}, {suggestion.num_gt} GT boxes): coverage "
        f"{_pct(suggestion.coverage)}, mean best IoU {suggestion.mean_best_iou:.3f}, "
        f"~{suggestion.mean_positives:.1f} positives/GT (threshold count, no competition)",
        f"override: anchors.s_min={suggestion.s_min:g} anchors.s_max={suggestion.s_max:g} "
        "anchors.sizes=null",
        *_edge_notes(suggestion),
        "",
        _row(["s_min", "s_max", "coverage", "mean best IoU", "positives/GT"]),
        _row(["---:"] * 5),
    ]
    for g in suggestion.grid[:top]:
        cells = [f"{g['s_min']:g}", f"{g['s_max']:g}", _pct(g["coverage"])]
        lines.append(_row([*cells, f"{g['mean_best_iou']:.3f}", f"{g['mean_positives']:.1f}"]))
    return "\n".join(lines)


def _edge_notes(suggestion: ScaleSuggestion) -> list[str]:
    """Warn when the optimum lies on the border of the searched grid."""
    notes = []
    for key in ("s_min", "s_max"):
        values = [g[key] for g in suggestion.grid]
        value = getattr(suggestion, key)
        if len(set(values)) > 1 and value in (min(values), max(values)):
            notes.append(f"note: {key}={value:g} is on the edge of the grid; widen {key}_values")
    return notes


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pos(stats: dict[str, Any]) -> str:
    if stats["positives_mean"] is None:
        return "-"
    return f"{stats['positives_mean']:.1f} / {stats['positives_median']:g}"


def _quantiles(stats: dict[str, Any]) -> str:
    values = stats["best_iou_quantiles"].values()
    return "-" if None in values else " ".join(f"{v:.2f}" for v in values)


def _median_iou(stats: dict[str, Any]) -> str:
    return _num(stats["best_iou_quantiles"]["q50"])


def _share(summary: dict[str, Any], count: int) -> str:
    total = summary["all"]["num_gt"]
    return f"{_pct(count / total if total else None)} ({count})"


def _scales(anchors: dict[str, Any]) -> str:
    if anchors["sizes"] is not None:
        text = "sizes " + ",".join(f"{s:g}" for s in anchors["sizes"])
    else:
        text = f"s {anchors['s_min']:g}-{anchors['s_max']:g}"
    if anchors["steps"] is not None:
        text += " steps " + ",".join(f"{s:g}" for s in anchors["steps"])
    return text + ("" if anchors["clip"] else " no clip")


def _ratios(aspect_ratios: Sequence[Sequence[float]]) -> str:
    return " ".join("[" + ",".join(f"{r:g}" for r in ratios) + "]" for ratios in aspect_ratios)


def _grid(entry: dict[str, Any]) -> str:
    (h, w), (low, high) = entry["feature_map"], entry["anchor_px"]
    return f"{h}x{w}, {low:g}-{high:g}px"


def _map(summary: dict[str, Any], k: int, key: Any, fmt: Any = None) -> str:
    if k >= len(summary["by_map"]):
        return ""
    entry = summary["by_map"][k]
    return key(entry) if callable(key) else fmt(entry[key])


def plot_sizes(reports: Sequence[CoverageReport], path: str | Path) -> Path:
    """PNG of the GT box sizes over the default-box sizes of every map, a column per config.

    Top: histogram of the GT side sqrt(w * h) in network-input pixels, with the range of each
    map's default-box sides shaded. Bottom: GT side against aspect ratio w / h (log-log), the
    default boxes of each map as large markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(reports))
    fig, axes = plt.subplots(2, n, figsize=(5 * n, 8), squeeze=False, sharex="col")
    colours = plt.get_cmap("tab10")
    for column, report in enumerate(reports):
        hist_ax, scatter_ax = axes[0, column], axes[1, column]
        side = report.size.prod(dim=1).clamp(min=1e-6).sqrt()
        aspect = (report.size[:, 0] / report.size[:, 1].clamp(min=1e-6)).clamp(min=1e-3)
        anchor_sides = torch.cat([s.prod(dim=1).sqrt() for s in report.anchor_shapes])
        every_side = torch.cat([anchor_sides, side])
        low, high = max(0.5, float(every_side.min()) / 1.2), float(every_side.max()) * 1.2
        bins = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), 50)
        hist_ax.hist(side.numpy(), bins=bins.numpy(), color="0.3")
        for k, shapes in enumerate(report.anchor_shapes):
            sides = shapes.prod(dim=1).sqrt()
            colour = colours(k % 10)
            hist_ax.axvspan(float(sides.min()), float(sides.max()), color=colour, alpha=0.25,
                            label=f"map {k}")  # fmt: skip
            scatter_ax.scatter(sides.numpy(), (shapes[:, 0] / shapes[:, 1]).numpy(), s=120,
                               marker="s", facecolors="none", edgecolors=[colour], linewidths=2,
                               label=f"map {k} defaults", zorder=3)  # fmt: skip
        scatter_ax.scatter(side.numpy(), aspect.numpy(), s=3, alpha=0.3, color="0.3",
                           label="GT boxes", rasterized=True)  # fmt: skip
        hist_ax.set_xscale("log")
        hist_ax.set_title(f"{report.name}: {len(side)} GT boxes")
        hist_ax.set_ylabel("GT boxes")
        hist_ax.legend(fontsize=7)
        scatter_ax.set_xscale("log")
        scatter_ax.set_yscale("log")
        scatter_ax.set_xlabel("side sqrt(w*h), network-input pixels")
        scatter_ax.set_ylabel("aspect ratio w/h")
        scatter_ax.set_yticks(ASPECT_TICKS, [f"{t:.2g}" for t in ASPECT_TICKS], minor=False)
        scatter_ax.minorticks_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    analyse(cfg)


def main() -> None:
    """Console script ``ssd-anchors``."""
    _hydra_main()


if __name__ == "__main__":
    main()
