"""Runs of one grid point over seeds: mean, sample standard deviation and t-interval per metric (:func:`aggregate`),
and every pair of grid points compared by Welch's t-test, Holm-adjusted (:func:`differences`, :func:`ordering`);
the rows ``lm-mini compare`` prints of them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from lm_mini.sweeps.compare import (C_KEY, COMPRESSOR_KEY, DEPTH_KEY, SEED_KEY, RunRow, _short, _sort_key,
                                    grid_axes)


@dataclass
class Summary:
    """One metric over the runs of a group: mean, sample standard deviation, two-sided t-interval of the mean."""

    n: int
    mean: float
    std: float  # ddof=1; nan for n = 1
    ci_low: float  # mean -/+ t(1 - alpha/2, n-1) * std / sqrt(n); nan for n = 1
    ci_high: float
    values: List[float]


def summarize(values: Sequence[float], alpha: float = 0.05) -> Summary:
    """:class:`Summary` of ``values`` with a (1 - alpha) confidence interval from Student's t distribution."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"), values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, values)


@dataclass
class Group:
    """The runs of one grid point (equal values of the group-by keys), with a :class:`Summary` per metric."""

    values: Dict[str, Any]  # group-by key -> value
    runs: List[RunRow]
    stats: Dict[str, Summary]  # metric -> summary over the runs that have it

    @property
    def label(self) -> str:
        return group_label(self.values)


def group_label(values: Mapping[str, Any]) -> str:
    """'C=1, depth=0', 'identity, depth=0', 'avg_pool, C=2, depth=0': the compressor named unless it is the paper's
    (the default), C left out for the identity compressor (it keeps every token: its C means nothing)."""
    from lm_mini.config import CompressorConfig

    parts = []
    identity = values.get(COMPRESSOR_KEY) == "identity"
    for key, value in sorted(values.items(), key=lambda kv: (kv[0] != COMPRESSOR_KEY, kv[0] != C_KEY, kv[0] != DEPTH_KEY)):
        if key == COMPRESSOR_KEY:
            if value != CompressorConfig.name:
                parts.append(str(value))
        elif not (identity and key == C_KEY):
            parts.append(f"{_short(key)}={value}")
    return ", ".join(parts) or "all runs"


def group_keys(rows: Sequence[RunRow], group_by: Optional[Sequence[str]] = None) -> List[str]:
    """The keys that make a grid point: ``group_by``, else every sweep key but the seed."""
    if group_by:
        return list(group_by)
    return [k for k in grid_axes(rows) if k != SEED_KEY]


def should_aggregate(rows: Sequence[RunRow], group_by: Optional[Sequence[str]] = None) -> bool:
    """Aggregate when asked to (``group_by``), when the runs sweep seeds, or when two runs are the same grid point."""
    if group_by or any(SEED_KEY in r.values for r in rows):
        return True
    keys = group_keys(rows)
    points = [tuple(json.dumps(r.values.get(k), sort_keys=True) for k in keys) for r in rows]
    return bool(keys) and len(set(points)) < len(points)


def aggregate(rows: Sequence[RunRow], metrics: Sequence[str], group_by: Optional[Sequence[str]] = None,
              alpha: float = 0.05) -> Tuple[List[Group], List[RunRow]]:
    """Groups of FINISHED runs by the values of :func:`group_keys` (sorted by those values), each metric summarised
    over the runs that have it; and the runs left out (not FINISHED: stopped, failed or still running)."""
    keys = group_keys(rows, group_by)
    done = [r for r in rows if r.status == "FINISHED"]
    left_out = [r for r in rows if r.status != "FINISHED"]
    found: Dict[str, Group] = {}
    for r in done:
        values = {k: r.values.get(k) for k in keys}
        found.setdefault(json.dumps(values, sort_keys=True, default=str), Group(values, [], {})).runs.append(r)
    groups = sorted(found.values(), key=lambda g: [_sort_key(v) for v in g.values.values()])
    for g in groups:
        for m in metrics:
            have = [r.metrics[m] for r in g.runs if m in r.metrics and not math.isnan(r.metrics[m])]
            if have:
                g.stats[m] = summarize(have, alpha)
    return groups, left_out


@dataclass
class Difference:
    """``a`` minus ``b`` in one metric: Welch's t-test (unequal variances) and its (1 - alpha) interval; ``p_holm``
    is the p-value adjusted (Holm) over every pair compared at once."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float = float("nan")
    significant: bool = False  # p_holm < alpha
    intervals_overlap: bool = True  # the groups' own confidence intervals overlap


def welch(a: Summary, b: Summary, alpha: float = 0.05) -> Tuple[float, float, float]:
    """(p, interval low, high) of mean(a) - mean(b) by Welch's t-test; nan where a group has fewer than 2 runs."""
    from scipy import stats

    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return float("nan"), float("nan"), float("nan")
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # every run of both groups scored the same: the difference is what it is
        return (0.0 if diff else 1.0), diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))  # Welch-Satterthwaite
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return p, diff - half, diff + half


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment (controls the family-wise error rate); nan p-values are left out and stay nan."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [float("nan")] * len(p_values)
    running, m = 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def differences(groups: Sequence[Group], metric: str, alpha: float = 0.05) -> List[Difference]:
    """Every pair of groups that have ``metric``, the better one first (by mean), tested at once (Holm)."""
    have = sorted((g for g in groups if metric in g.stats), key=lambda g: -g.stats[metric].mean)
    out = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            sa, sb = a.stats[metric], b.stats[metric]
            p, low, high = welch(sa, sb, alpha)
            overlap = not (sa.n > 1 and sb.n > 1 and (sa.ci_low > sb.ci_high or sb.ci_low > sa.ci_high))
            out.append(Difference(a.label, b.label, sa.mean - sb.mean, low, high, p, intervals_overlap=overlap))
    for d, adjusted in zip(out, holm([d.p for d in out])):
        d.p_holm = adjusted
        d.significant = not math.isnan(adjusted) and adjusted < alpha
    return out


def ordering(groups: Sequence[Group], metric: str, diffs: Sequence[Difference]) -> str:
    """'A > B ~ C': the groups by mean, '>' between neighbours whose difference is significant, '~' where not."""
    have = sorted((g for g in groups if metric in g.stats), key=lambda g: -g.stats[metric].mean)
    if not have:
        return ""
    by_pair = {(d.a, d.b): d for d in diffs}
    text = have[0].label
    for a, b in zip(have, have[1:]):
        d = by_pair.get((a.label, b.label))
        text += (" > " if d is not None and d.significant else " ~ ") + b.label
    return text


def group_records(groups: Sequence[Group], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """One record per group: its keys (short names), n, and per metric mean / std / CI bounds."""
    out = []
    for g in groups:
        rec: Dict[str, Any] = {"group": g.label, **{_short(k): v for k, v in g.values.items()}, "n": len(g.runs)}
        for m in metrics:
            s = g.stats.get(m)
            rec.update({f"{m} mean": s.mean if s else None, f"{m} std": s.std if s else None,
                        f"{m} ci95 low": s.ci_low if s else None, f"{m} ci95 high": s.ci_high if s else None})
            if s and s.n != len(g.runs):
                rec[f"{m} n"] = s.n
        out.append(rec)
    return out


def difference_records(diffs: Sequence[Difference]) -> List[Dict[str, Any]]:
    return [{"a": d.a, "b": d.b, "a - b": d.diff, "ci95 low": d.ci_low, "ci95 high": d.ci_high, "p (Welch)": d.p,
             "p (Holm)": d.p_holm, "significant": d.significant, "intervals overlap": d.intervals_overlap} for d in diffs]


def _fmt_summary(s: Optional[Summary]) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.mean:.4g} (n=1)"
    return f"{s.mean:.3f} ± {s.std:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def summary_table(groups: Sequence[Group], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """For terminal / Markdown: one row per group, each metric as 'mean ± std [95% CI]'."""
    rows = []
    for g in groups:
        rec: Dict[str, Any] = {"grid point": g.label, "n": len(g.runs)}
        for m in metrics:
            rec[m + " (mean ± std [95% CI])"] = _fmt_summary(g.stats.get(m))
        rows.append(rec)
    return rows


def _fmt_p(p: float) -> str:
    return "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def difference_table(diffs: Sequence[Difference]) -> List[Dict[str, Any]]:
    return [{"a": d.a, "b": d.b, "a - b [95% CI]": f"{d.diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]" if not math.isnan(d.ci_low)
             else f"{d.diff:+.3f}", "p (Welch)": _fmt_p(d.p), "p (Holm)": _fmt_p(d.p_holm),
             "significant": "yes" if d.significant else "no", "95% CIs overlap": "yes" if d.intervals_overlap else "no"}
            for d in diffs]
