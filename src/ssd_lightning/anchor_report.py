"""Formatting and plots of anchor coverage reports (``ssd-anchors``): the Markdown table, the
scale suggestion and the PNG of GT sizes over the default-box sizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.anchor_analysis import (
    POSITIVE_BINS,
    QUANTILES,
    SIZE_NAMES,
    CoverageReport,
    ScaleSuggestion,
    summarize,
)

ASPECT_TICKS = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)


def format_report(reports: Sequence[CoverageReport]) -> str:
    """A Markdown table, one column per anchor configuration, one row per statistic."""
    summaries = [summarize(r) for r in reports]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(s) for s in summaries]))

    thr = reports[0].iou_threshold if reports else 0.5
    add("default boxes", lambda s: str(s["num_defaults"]))
    add("scales", lambda s: _scales(s["anchors"]))
    add("aspect ratios", lambda s: _ratios(s["anchors"]["resolved"]["aspect_ratios"]))
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
    resolved = anchors["resolved"]
    text = "sizes " + ",".join(f"{s:g}" for s in resolved["sizes_px"]) + " px"
    if resolved["steps"] is not None:
        text += " steps " + ",".join(f"{s:g}" for s in resolved["steps"])
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
