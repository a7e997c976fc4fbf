"""Sweep report: ``ssd-sweep-report <multirun folder> [--out DIR]``.

Scans the run folders of a Hydra multirun (any folder holding ``.hydra/overrides.yaml``) and
writes one table of every run: the swept overrides, best val/mAP, last val/mAP, mAP_50 and
mAP_small, training time and status. Failed runs are listed, not hidden. Writes
``sweep_report.csv`` (all overrides in full), ``sweep_report.md`` (printed too) and one PNG per
swept parameter of mAP against it (numeric axis where every value is a number, categorical
otherwise) into ``--out`` (default ``<multirun folder>/report``).

Status, resumes and time come from ``job_status.json``, kept in each run folder by
``ssd-train`` (``ssd_lightning.runs``) and the Hydra callback
``ssd_lightning.sweeps.JobStatusCallback`` (on for every multirun). The status of a job is one of

- ``finished``: trained to the end (also when it was skipped by a later re-launch);
- ``preempted``: stopped by a signal with a resumable checkpoint; a re-launch resumes it;
- ``failed``: ended by an exception (the error column);
- ``incomplete``: started but never ended (killed, node failure, still running); a re-launch
  resumes it from its newest checkpoint;
- ``skipped``: failed in an earlier launch and left alone by the latest (``retry_failed=true``
  re-runs it); the error column keeps its error;
- ``not started``: a job of the sweep (``multirun.yaml``) without a folder yet.

``resumes`` counts the launches that continued the job from one of its checkpoints, and the
time is that of all its launches. Without ``job_status.json``: ``finished`` when
``metrics.json`` exists, ``failed`` when a log file ends in an exception, else ``incomplete``;
the time is then ``train_time_s`` of ``metrics.json`` if present, else the time from the run's
``.hydra/config.yaml`` (written at job start) to its newest file.

Seeds and settings: runs that differ only in ``seed`` are replicates of one setting. A second
table (``sweep_settings.csv``) gives every setting's mean, standard deviation and number of
best-mAP values, its mean anchor coverage (the training boxes with a default box at IoU >= 0.5,
recorded by ``ssd-train``), its rank and whether it differs from the best setting beyond seed
noise (the rule in ``ssd_lightning.sweep_stats.NOISE_RULE``, printed with the table). Runs
whose fingerprints (``fingerprint.json``) are equal trained the same thing: the report says so
in bold. ``mAP_vs_anchor_coverage.png`` shows whether coverage predicted the winner.

TensorBoard's HParams view reads the same sweep: every run logs its resolved config with its
final metrics (``hp/mAP``, ``hp/mAP_50``, ``hp/best_mAP``, ``hp/anchor_coverage``) and its
fingerprint, so ``tensorboard --logdir <multirun folder>`` shows all runs side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ssd_lightning.sweep_stats import NOISE_RULE, Setting, group_settings, rank

METRIC_COLUMNS = ("best_mAP", "mAP", "mAP_50", "mAP_small")
_METRIC_KEYS = {"mAP": "val/mAP", "mAP_50": "val/mAP_50", "mAP_small": "val/mAP_small"}
# The last line of a Python traceback, e.g. "ValueError: anchors: steps needs 6 entries".
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*$")


def scan_multirun(folder: str | Path) -> list[dict[str, Any]]:
    """One record per run folder of a multirun, sorted by folder name (numbers numerically).

    Returns:
        Dicts with ``run`` (folder relative to ``folder``), ``overrides`` (key -> value
        strings as given to Hydra), ``status``, ``resumes``, ``error``, ``time_s`` and the
        metrics of ``METRIC_COLUMNS`` (None when absent); jobs of ``multirun.yaml`` that have
        no folder yet as ``not started``.
    """
    folder = Path(folder)
    runs = [p.parent.parent for p in folder.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    records = [_read_run(run, folder) for run in runs]
    found = {r["run"] for r in records}
    for number, job in enumerate(planned_jobs(folder) or []):
        if str(number) not in found:
            records.append(_not_started(str(number), job))
    return sorted(records, key=lambda r: _natural_key(folder / r["run"], folder))


def planned_jobs(folder: Path) -> list[list[str]] | None:
    """Every job's overrides of the basic-sweeper multirun saved in ``folder/multirun.yaml``,
    when job N runs in ``folder/N``; None otherwise."""
    path = folder / "multirun.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from ssd_lightning.sweeps import job_folders, sweep_jobs  # torch: only when needed

    config = OmegaConf.load(path)
    if job_folders(config) is None:
        return None
    return sweep_jobs(config)


def _not_started(run: str, job: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"run": run, "overrides": dict(_split_override(o) for o in job)}
    record.update(dict.fromkeys((*METRIC_COLUMNS, "anchor_coverage", "fingerprint", "error")))
    record.update(status="not started", resumes=0, time_s=None)
    return record


def _natural_key(path: Path, root: Path) -> list[Any]:
    parts = re.split(r"(\d+)", str(path.relative_to(root)))
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def _read_run(run: Path, root: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    record: dict[str, Any] = {
        "run": str(run.relative_to(root)) if run != root else ".",
        "overrides": dict(_split_override(o) for o in overrides),
    }
    metrics_file = run / "metrics.json"
    metrics = _read_json(metrics_file)
    record["best_mAP"] = metrics.get("best_mAP", metrics.get("val/mAP"))
    for column, key in _METRIC_KEYS.items():
        record[column] = metrics.get(key)
    record["anchor_coverage"] = metrics.get("anchor_coverage")
    record["fingerprint"] = metrics.get("fingerprint") or _read_json(run / "fingerprint.json").get(
        "id"
    )
    job = _read_json(run / "job_status.json")
    if job.get("status"):
        status, error = _job_status(job), job.get("error")
    elif metrics_file.is_file():
        status, error = "finished", None
    else:
        error = _error_from_logs(run)
        status = "failed" if error else "incomplete"
    record["status"], record["error"] = status, error
    record["resumes"] = int(job.get("resumes", 0))
    time_s = job.get("time_s", metrics.get("train_time_s"))
    record["time_s"] = time_s if time_s is not None else _time_from_files(run, metrics_file)
    return record


def _job_status(job: dict[str, Any]) -> str:
    """The report's status of a ``job_status.json`` (see the module docstring)."""
    status = job["status"]
    if status == "running":  # never ended: killed, or still running
        return "incomplete"
    if status == "failed" and job.get("last_launch") == "skipped":
        return "skipped"
    return status


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _error_from_logs(run: Path) -> str | None:
    """The last exception line of the run's log files, if any."""
    error = None
    for log in sorted(run.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if _ERROR_LINE.match(line.strip()):
                error = line.strip()
    return error


def _time_from_files(run: Path, metrics_file: Path) -> float | None:
    start_file = run / ".hydra" / "config.yaml"
    if not start_file.is_file():
        return None
    if metrics_file.is_file():
        end = metrics_file.stat().st_mtime
    else:
        end = max(p.stat().st_mtime for p in run.rglob("*") if p.is_file())
    return max(0.0, end - start_file.stat().st_mtime)


def swept_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between runs (or is missing in some), in order."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record["overrides"] if k not in keys]
    return [k for k in keys if len({r["overrides"].get(k) for r in records}) > 1]


def table_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the report table (swept overrides, metrics, time, status)."""
    params = swept_keys(records)
    extra = ("anchor_coverage", "time_s", "fingerprint", "status", "resumes", "error")
    columns = ["run", *params, *METRIC_COLUMNS, *extra]
    rows = [
        {
            "run": r["run"],
            **{k: r["overrides"].get(k, "") for k in params},
            **{k: r.get(k) for k in (*METRIC_COLUMNS, *extra)},
        }
        for r in records
    ]
    return columns, rows


def same_fingerprint(records: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Fingerprints shared by runs of different settings (seeds aside): (id, runs)."""
    keys = [k for k in swept_keys(records) if k != "seed"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("fingerprint"):
            groups.setdefault(record["fingerprint"], []).append(record)
    shared = []
    for print_id, members in groups.items():
        settings = {tuple(r["overrides"].get(k) for k in keys) for r in members}
        if len(settings) > 1:
            shared.append((print_id, [r["run"] for r in members]))
    return shared


def settings_rows(records: Sequence[dict[str, Any]]) -> tuple[list[Setting], str]:
    """Ranked settings (seeds averaged) and a line on the seed noise they were judged by."""
    ranked, sd, dof = rank(group_settings(records, swept_keys(records)))
    noise = (
        f"seed-to-seed std of best mAP: {sd:.4f} (pooled, {dof} degrees of freedom)"
        if sd is not None
        else "no setting was run with two or more seeds"
    )
    return ranked, noise


def _setting_row(position: int, setting: Setting, best: Setting) -> dict[str, Any]:
    return {
        "rank": position,
        "setting": " ".join(f"{k}={v}" for k, v in setting.overrides.items()) or "(all runs)",
        "n": setting.n,
        "best_mAP_mean": setting.mean,
        "best_mAP_std": setting.std,
        "mAP_50_mean": sum(setting.mAP_50) / len(setting.mAP_50) if setting.mAP_50 else None,
        "anchor_coverage": setting.mean_coverage,
        "delta_vs_best": setting.mean - best.mean,
        "p_value": setting.p_value,
        "verdict": setting.verdict,
        "runs": " ".join(setting.runs),
    }


def write_settings_csv(ranked: Sequence[Setting], path: Path) -> None:
    rows = [_setting_row(i, s, ranked[0]) for i, s in enumerate(ranked, start=1)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        writer.writerows(rows)


def settings_markdown(ranked: Sequence[Setting], noise: str) -> str:
    """The ranked settings as Markdown, with the rule used for 'within noise'."""
    if not ranked:
        return "No finished run to rank."
    lines = [
        "| rank | setting | n | best_mAP mean ± std | mAP_50 mean | anchor coverage | "
        "Δ vs best | p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (_setting_row(i, s, ranked[0]) for i, s in enumerate(ranked, start=1)):
        std = "" if row["best_mAP_std"] is None else f" ± {row['best_mAP_std']:.4f}"
        cells = [
            str(row["rank"]), row["setting"], str(row["n"]), f"{row['best_mAP_mean']:.4f}{std}",
            _cell(row["mAP_50_mean"], 4), _pct(row["anchor_coverage"]),
            f"{row['delta_vs_best']:+.4f}", _cell(row["p_value"], 3), row["verdict"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", f"Rule: {NOISE_RULE}", f"Measured: {noise}."])


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    """The table plus a column with every override of the run."""
    columns, rows = table_rows(records)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*columns, "overrides"])
        writer.writeheader()
        for row, record in zip(rows, records, strict=True):
            overrides = " ".join(f"{k}={v}" for k, v in record["overrides"].items())
            writer.writerow({**row, "overrides": overrides})


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The table as Markdown, preceded by the overrides that all runs share."""
    columns, rows = table_rows(records)
    params = set(swept_keys(records))
    common = {k: v for r in records for k, v in r["overrides"].items() if k not in params}
    lines = [f"{len(records)} runs; common overrides: " + _common_text(common), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [_cell(row[c], 1 if c == "time_s" else 4) for c in columns]
        cells[columns.index("anchor_coverage")] = _pct(row["anchor_coverage"])
        cells[-1] = cells[-1].splitlines()[0][:120] if cells[-1] else ""  # first error line
        lines.append("| " + " | ".join(cells) + " |")
    for print_id, runs in same_fingerprint(records):
        lines.append(
            f"\n**Runs {', '.join(runs)} trained the same thing (fingerprint {print_id}): "
            "the overrides that tell them apart changed nothing.**"
        )
    return "\n".join(lines)


def _common_text(common: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in common.items()) or "none"


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value).replace("|", "\\|")


def plot_swept(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per swept parameter: best mAP and mAP_50 of every finished run against it
    (``seed`` only when nothing else is swept: its replicates are in the coverage plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["status"] == "finished"]
    paths = []
    keys = swept_keys(records)
    for key in [k for k in keys if k != "seed"] or keys:
        values = [r["overrides"].get(key, "") for r in done]
        numbers = [_number(v) for v in values]
        numeric = all(n is not None for n in numbers)
        categories = sorted(set(values), key=lambda v: (_number(v) is None, _number(v) or 0, v))
        xs = numbers if numeric else [categories.index(v) for v in values]
        fig, ax = plt.subplots(figsize=(6, 4))
        for color, (column, marker) in enumerate((("best_mAP", "o"), ("mAP_50", "s"))):
            ys = [r[column] for r in done]
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            style = {"color": f"C{color}"}
            ax.scatter(*_columns(points), marker=marker, label=column, **style)
            if numeric:  # mean over the other swept parameters, joined by a line
                ax.plot(*_columns(_means(points)), alpha=0.5, **style)
            else:  # mean as a bar across the category
                ax.scatter(*_columns(_means(points)), marker="_", s=600, alpha=0.6, **style)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right", fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel("validation mAP")
        ax.set_title(f"mAP against {key} ({len(done)} finished runs)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"mAP_vs_{_file_name(key)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_coverage(ranked: Sequence[Setting], path: Path) -> Path | None:
    """Mean best mAP (± seed std) of every setting against its anchor coverage."""
    points = [s for s in ranked if s.mean_coverage is not None]
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in points:
        colour = "C3" if s.verdict == "best" else ("C0" if s.verdict == "within noise" else "0.4")
        ax.errorbar(100 * s.mean_coverage, s.mean, yerr=s.std or 0.0, fmt="o", color=colour,
                    capsize=3)  # fmt: skip
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in s.overrides.items())
        ax.annotate(f"{label} (n={s.n})", (100 * s.mean_coverage, s.mean), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("anchor coverage of the training boxes (%, best IoU >= 0.5)")
    ax.set_ylabel("best validation mAP (mean ± seed std)")
    ax.set_title(
        "Did coverage predict the winner? (red: best, blue: within noise, grey: worse)", fontsize=9
    )
    ax.margins(x=0.25)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _file_name(key: str) -> str:
    return re.sub(r"[^\w.-]+", "_", key)


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _columns(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _means(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Mean y per x, by increasing x (the other swept parameters averaged out)."""
    groups: dict[float, list[float]] = {}
    for x, y in points:
        groups.setdefault(x, []).append(y)
    return [(x, sum(ys) / len(ys)) for x, ys in sorted(groups.items())]


def report(folder: str | Path, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Scan a multirun, write CSV, Markdown and plots, print the Markdown table."""
    folder = Path(folder)
    records = scan_multirun(folder)
    if not records:
        raise FileNotFoundError(f"{folder}: no run folders (.hydra/overrides.yaml) found")
    out = Path(out_dir) if out_dir is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / "sweep_report.csv")
    ranked, noise = settings_rows(records)
    write_settings_csv(ranked, out / "sweep_settings.csv")
    text = f"{markdown_table(records)}\n\nSettings (seeds averaged):\n\n"
    text += settings_markdown(ranked, noise)
    (out / "sweep_report.md").write_text(text + "\n")
    plots = plot_swept(records, out)
    coverage_plot = plot_coverage(ranked, out / "mAP_vs_anchor_coverage.png")
    plots += [coverage_plot] if coverage_plot else []
    print(text)
    if ranked:
        best = ranked[0]
        std = f" ± {best.std:.4f}" if best.std is not None else ""
        setting = " ".join(f"{k}={v}" for k, v in best.overrides.items()) or "(all runs)"
        print(f"\nbest: {setting}: best_mAP {best.mean:.4f}{std} over {best.n} run(s)")
    print(
        f"\nwritten: {out / 'sweep_report.csv'}, {out / 'sweep_settings.csv'}, "
        f"{out / 'sweep_report.md'}, {len(plots)} plots"
    )
    print(f"TensorBoard HParams view: tensorboard --logdir {folder}")
    return records


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ssd-sweep-report``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="multirun folder (hydra.sweep.dir)")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    args = parser.parse_args(argv)
    report(args.folder, args.out)


if __name__ == "__main__":
    main()
