"""Which setting of a sweep wins, beyond seed noise (used by ``ssd-sweep-report``).

Runs that differ only in ``seed`` are replicates of one *setting*. Each setting gets the mean,
standard deviation and count of its runs' best mAP; settings are ranked by mean, and each is
compared with the best one by the rule in ``NOISE_RULE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

SEED_KEYS = ("seed",)
P_VALUE = 0.05
NOISE_RULE = (
    "A setting differs from the best one when a two-sided t-test of their mean best mAP gives "
    f"p < {P_VALUE}, with the seed-to-seed standard deviation pooled over every setting run with "
    "two or more seeds (so a setting run once is still compared); otherwise the difference is "
    "within noise. Without any seed replicates nothing can be told from noise: add seed=1,2,3."
)


@dataclass
class Setting:
    """The finished runs of one setting (the swept overrides other than the seed)."""

    overrides: dict[str, str]
    runs: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # best mAP of each run
    mAP_50: list[float] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    fingerprints: set[str] = field(default_factory=set)
    verdict: str = ""
    p_value: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None for one run)."""
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def mean_coverage(self) -> float | None:
        return sum(self.coverage) / len(self.coverage) if self.coverage else None


def group_settings(records: Sequence[dict[str, Any]], swept: Sequence[str]) -> list[Setting]:
    """Finished runs with a best mAP grouped by their swept overrides other than the seed."""
    keys = [k for k in swept if k not in SEED_KEYS]
    settings: dict[tuple[str, ...], Setting] = {}
    for record in records:
        if record["status"] != "finished" or record.get("best_mAP") is None:
            continue
        values = tuple(record["overrides"].get(k, "") for k in keys)
        setting = settings.setdefault(values, Setting(dict(zip(keys, values, strict=True))))
        setting.runs.append(record["run"])
        setting.values.append(float(record["best_mAP"]))
        if record.get("mAP_50") is not None:
            setting.mAP_50.append(float(record["mAP_50"]))
        if record.get("anchor_coverage") is not None:
            setting.coverage.append(float(record["anchor_coverage"]))
        if record.get("fingerprint"):
            setting.fingerprints.add(record["fingerprint"])
    return list(settings.values())


def pooled_std(settings: Sequence[Setting]) -> tuple[float | None, int]:
    """Seed-to-seed standard deviation pooled over settings with 2+ runs, and its degrees of
    freedom (sum of n - 1)."""
    dof = sum(s.n - 1 for s in settings if s.n > 1)
    if dof == 0:
        return None, 0
    squares = sum(sum((v - s.mean) ** 2 for v in s.values) for s in settings if s.n > 1)
    return math.sqrt(squares / dof), dof


def rank(settings: Sequence[Setting]) -> tuple[list[Setting], float | None, int]:
    """Settings by decreasing mean, each with its verdict against the best (``NOISE_RULE``).

    Returns:
        The ranked settings, the pooled seed standard deviation and its degrees of freedom.
    """
    ranked = sorted(settings, key=lambda s: s.mean, reverse=True)
    sd, dof = pooled_std(ranked)
    if not ranked:
        return ranked, sd, dof
    best = ranked[0]
    best.verdict = "best"
    for other in ranked[1:]:
        if sd is None:
            other.verdict = "no replicates"
            continue
        if sd == 0:  # identical replicates: any difference is real
            other.p_value = 0.0 if other.mean != best.mean else 1.0
        else:
            t = (best.mean - other.mean) / (sd * math.sqrt(1 / best.n + 1 / other.n))
            other.p_value = float(2 * stats.t.sf(abs(t), dof))
        other.verdict = "worse" if other.p_value < P_VALUE else "within noise"
    return ranked, sd, dof


__all__ = ["NOISE_RULE", "P_VALUE", "Setting", "group_settings", "pooled_std", "rank"]
