"""Read runs back from MLflow into a table (terminal / Markdown / CSV / JSON), a pivot of one metric
over the sweep's two grid keys, and plots (metric vs the first grid key, one line per value of the
others; metric vs FLOPs). For the default C x depth grid: C across, one line per depth."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from lm_mini.config import LoggingConfig
from lm_mini.config import tracking_uri as resolve_tracking_uri
from lm_mini.runs import MLFLOW_FILE, Run, experiment_dir

C_KEY = "model.compressor.grid"
DEPTH_KEY = "model.prefusion.depth"
FLOPS_METRIC = "flops_per_sample"  # logged by `lm-mini efficiency --mlflow-run`


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    values: Dict[str, Any]  # grid key -> value (from the run's params)
    metrics: Dict[str, float]  # final (latest) value of each metric


def _parse(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def find_tracking_store(experiment: str, tracking_uri: Optional[str] = None, runs_dir: Optional[str] = None,
                        cwd: Optional[Path] = None) -> Tuple[str, str]:
    """``(uri, how it was found)`` of the MLflow store that holds ``experiment``'s runs.

    An explicit URI (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``) is taken as given. Otherwise, in order: the
    stores the experiment's runs name in ``<runs_dir>/<experiment>/*/mlflow.json`` (``runs_dir``, else ``./runs``),
    ``./mlflow.db``, and the same two in each parent directory. A ``sqlite:`` store whose file does not exist is
    never opened (MLflow would create an empty one). Raises LookupError saying where it looked."""
    cwd = Path(cwd or Path.cwd())
    explicit = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        db = _sqlite_file(explicit)
        if db is not None and not db.is_file():
            source = "--tracking-uri" if tracking_uri else "$MLFLOW_TRACKING_URI"
            raise LookupError(f"no MLflow store at {db} ({source}={explicit}): the file does not exist")
        return explicit, "--tracking-uri" if tracking_uri else "$MLFLOW_TRACKING_URI"
    looked: List[str] = []
    places = [(Path(runs_dir), cwd)] if runs_dir else []
    places += [(d / LoggingConfig().runs_dir, d) for d in (cwd, *cwd.parents)]
    for runs, folder in places:
        looked.append(str(experiment_dir(runs, experiment) / "*" / MLFLOW_FILE))
        named = sorted({Run.at(d).mlflow_info().get("tracking_uri", "") for d in experiment_dir(runs, experiment).glob("*")} - {""})
        named = [u for u in named if _sqlite_file(u) is None or _sqlite_file(u).is_file()]
        if len(named) > 1:
            raise LookupError(f"the runs of '{experiment}' in {runs} logged to {len(named)} MLflow stores ({', '.join(named)}); "
                              "pick one with --tracking-uri")
        if named:
            return named[0], f"named by the runs in {runs / experiment}"
        if runs_dir and runs == Path(runs_dir):
            continue
        db = folder / "mlflow.db"
        looked.append(str(db))
        if db.is_file():
            return f"sqlite:///{db.resolve()}", ("./mlflow.db" if folder == cwd else f"found in {folder}")
    raise LookupError(f"no MLflow store found for experiment '{experiment}'; looked for " + ", ".join(looked[:6])
                      + (f" and {len(looked) - 6} more up to {places[-1][1]}" if len(looked) > 6 else "")
                      + ". Run compare from the directory you trained in, or pass --tracking-uri (e.g. "
                      "sqlite:////path/to/mlflow.db) or --runs-dir DIR (logging.runs_dir of the runs)")


def read_runs(experiment: str, sweep: Optional[str] = None, tracking_uri: Optional[str] = None,
              keys: Sequence[str] = ()) -> List[RunRow]:
    """Runs of an experiment (optionally one sweep), oldest first, with the values of their sweep's keys (and of
    ``keys``, any config keys, e.g. ``--group-by``). Raises LookupError with a clear message."""
    from mlflow.tracking import MlflowClient

    from lm_mini.training.tracking import TrackingUnavailable, check_tracking_server

    uri = tracking_uri or resolve_tracking_uri()
    try:  # MLflow's client would retry a dead server for minutes without a word
        check_tracking_server(uri)
    except TrackingUnavailable as e:
        raise LookupError(str(e)) from None
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():  # opening it would create an empty store there
        raise LookupError(f"no MLflow store at {db}: the file does not exist")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no MLflow experiment named '{experiment}' in {uri}. Experiments there: {', '.join(known) or '(none)'}")
    query = f"tags.sweep_id = '{sweep}'" if sweep else ""
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=10000)
    if not runs:
        raise LookupError(f"experiment '{experiment}' has no runs" + (f" in sweep '{sweep}'" if sweep else ""))
    grid_keys: List[str] = []
    for r in runs:
        for k in (r.data.tags.get("sweep_keys") or "").split(","):
            if k and k not in grid_keys:
                grid_keys.append(k)
    if not grid_keys:
        grid_keys = [k for k in (C_KEY, DEPTH_KEY) if any(k in r.data.params for r in runs)]
    grid_keys += [k for k in keys if k not in grid_keys]
    return [
        RunRow(
            run_id=r.info.run_id,
            name=r.info.run_name,
            status=r.info.status,
            values={k: _parse(r.data.params.get(k)) for k in grid_keys},
            metrics=dict(r.data.metrics),
        )
        for r in runs
    ]


def _metric_names(rows: Sequence[RunRow], wanted: Sequence[str]) -> List[str]:
    if wanted:
        return list(wanted)
    names = sorted({m for r in rows for m in r.metrics})
    return [m for m in names if not m.startswith("system/")]


def to_records(rows: Sequence[RunRow], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    return [{"run": r.name, "status": r.status, **r.values, **{m: r.metrics.get(m) for m in metrics}} for r in rows]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(records: List[Dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2)
    columns = list(records[0]) if records else []
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue()
    cells = [[_fmt(r[c]) for c in columns] for r in records]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells])


def grid_axes(rows: Sequence[RunRow]) -> List[str]:
    """The runs' grid keys, the one plotted across first: C (then depth) when swept, else sweep order."""
    keys = list(dict.fromkeys(k for r in rows for k in r.values))
    return sorted(keys, key=lambda k: (k != C_KEY, k != DEPTH_KEY))


def pivot(rows: Sequence[RunRow], metric: str, row_key: Optional[str] = None, col_key: Optional[str] = None) -> Optional[List[Dict[str, Any]]]:
    """One record per value of ``row_key`` with a column per value of ``col_key`` (default: the first two
    of :func:`grid_axes`, C x depth for the default grid); None unless every run has both keys."""
    axes = grid_axes(rows)
    row_key = row_key or (axes[0] if len(axes) == 2 else None)
    col_key = col_key or (axes[1] if len(axes) == 2 else None)
    if row_key is None or col_key is None or not all(row_key in r.values and col_key in r.values for r in rows):
        return None
    row_vals = sorted({r.values[row_key] for r in rows}, key=_sort_key)
    col_vals = sorted({r.values[col_key] for r in rows}, key=_sort_key)
    table = []
    for rv in row_vals:
        rec: Dict[str, Any] = {f"{row_key.split('.')[-1]} \\ {col_key.split('.')[-1]}": rv}
        for cv in col_vals:
            hits = [r.metrics.get(metric) for r in rows if r.values[row_key] == rv and r.values[col_key] == cv]
            rec[str(cv)] = hits[-1] if hits else None
        table.append(rec)
    return table


def _sort_key(v: Any):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _short(key: str) -> str:
    return {C_KEY: "C", DEPTH_KEY: "depth"}.get(key, key.split(".")[-1])


def series(rows: Sequence[RunRow], metric: str) -> Dict[str, List[Tuple[Any, float]]]:
    """The left plot's lines: label -> [(value of the first grid key, metric)], one line per combination
    of the other grid keys ("depth=2"; "" when there is one key); runs without the metric are left out.
    Without grid keys, one point per run, by name."""
    axes = grid_axes(rows)
    lines: Dict[tuple, List[Tuple[Any, float]]] = {}
    for r in rows:
        if metric in r.metrics:
            x = r.values.get(axes[0]) if axes else r.name
            lines.setdefault(tuple(r.values.get(k) for k in axes[1:]), []).append((x, r.metrics[metric]))
    return {", ".join(f"{_short(k)}={v}" for k, v in zip(axes[1:], others)): sorted(pts, key=lambda p: _sort_key(p[0]))
            for others, pts in sorted(lines.items(), key=lambda kv: [_sort_key(v) for v in kv[0]])}


def plot(rows: Sequence[RunRow], metric: str, path: str, group_by: Optional[Sequence[str]] = None, alpha: float = 0.05,
         baseline: Optional[float] = None, upper_bound: Optional[Mapping[str, Any]] = None) -> None:
    """Left: metric vs the first grid key (vision tokens per image when the compressors differ), one line per value
    of the others; right: metric vs FLOPs per sample (when logged). Runs of one grid point that differ by seed are
    one point with its (1 - alpha) interval as error bar (:func:`plot_groups`)."""
    if should_aggregate(rows, group_by):
        groups, _ = aggregate(rows, [metric, FLOPS_METRIC, VISUAL_TOKENS_METRIC, BASELINE_METRIC], group_by, alpha)
    else:  # one point per run, whatever its status (as the table lists them)
        groups = [Group(dict(r.values) or {"run": r.name}, [r], {m: summarize([r.metrics[m]], alpha) for m in
                  (metric, FLOPS_METRIC, VISUAL_TOKENS_METRIC, BASELINE_METRIC) if m in r.metrics}) for r in rows]
    plot_groups(groups, metric, path, baseline=baseline, upper_bound=upper_bound)


# --------------------------------------------------------------------------- seeds: aggregation and significance
SEED_KEY = "seed"  # sweeps repeat a point over seeds through this config key
COMPRESSOR_KEY = "model.compressor.name"
BASELINE_METRIC = "eval/majority_baseline"  # logged by the end-of-training evaluation next to eval/exact_match


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


# --------------------------------------------------------------------------- plots with error bars
VISUAL_TOKENS_METRIC = "visual_tokens"  # vision tokens per image, logged by sweeps (lm_mini.eval.efficiency)


def upper_bound_group(groups: Sequence[Group], wanted: Optional[Mapping[str, Any]] = None) -> Optional[Group]:
    """The group a plot draws as the upper bound: the one matching ``wanted`` (key -> value), else LLaVA-1.5's
    place in the paper's ablation (the identity compressor without pre-fusion) when the runs have it."""
    if wanted:
        hits = [g for g in groups if all(str(g.values.get(k)) == str(v) for k, v in wanted.items())]
        if len(hits) != 1:
            raise ValueError(f"--upper-bound {wanted}: {len(hits)} grid points match (expected one): "
                             + "; ".join(g.label for g in (hits or groups)))
        return hits[0]
    hits = [g for g in groups if g.values.get(COMPRESSOR_KEY) == "identity" and str(g.values.get(DEPTH_KEY, 0)) == "0"]
    return hits[0] if len(hits) == 1 else None


def _x_of(groups: Sequence[Group]) -> Tuple[str, Dict[int, Any], List[str]]:
    """(axis title, group index -> x value, the keys that make the lines): the first grid key across, or the vision
    tokens per image when the groups differ in compressor (the identity compressor's C is not its token count)."""
    keys = list(dict.fromkeys(k for g in groups for k in g.values))
    keys = sorted(keys, key=lambda k: (k != C_KEY, k != DEPTH_KEY))
    compressors = {g.values.get(COMPRESSOR_KEY) for g in groups}
    if len(compressors) > 1 and all(VISUAL_TOKENS_METRIC in g.stats for g in groups):
        return ("vision tokens per image", {i: int(round(g.stats[VISUAL_TOKENS_METRIC].mean)) for i, g in enumerate(groups)},
                [k for k in keys if k not in (C_KEY, COMPRESSOR_KEY)])
    if not keys:
        return "run", {i: g.label for i, g in enumerate(groups)}, []
    title = "C (compressor grid; C² vision tokens)" if keys[0] == C_KEY else keys[0]
    return title, {i: g.values.get(keys[0]) for i, g in enumerate(groups)}, keys[1:]


def place_labels(ax: Any, points: Sequence[Tuple[float, float]], labels: Sequence[str], fontsize: float = 7.5) -> List[Any]:
    """Write each label next to its point (data coordinates) where it overlaps no label placed before it and no
    point: a few offsets around the point are tried in turn, the least-overlapping one is kept when none is free.
    Returns the text artists."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    marker = [to_px(p) for p in points]
    frame = ax.get_window_extent(renderer)
    boxes: List[Any] = []
    placed = []
    offsets = [(6, 5), (6, -12), (-6, 5), (-6, -12), (0, 11), (0, -17), (10, -3), (-10, -3),
               (14, 16), (14, -24), (-14, 16), (-14, -24), (0, 26), (0, -32), (22, -3), (-22, -3)]
    for (x, y), label in zip(points, labels):
        best, best_overlap = None, None
        for dx, dy in offsets:
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center",
                               arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if abs(dx) + abs(dy) > 20 else None)
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            outside = box.width * box.height - _area(box, frame)  # cut off by the axes' edge
            overlap = sum(_area(box, b) for b in boxes) + sum(_area(box, _marker_box(m)) for m in marker) + outside
            if best is None or overlap < best_overlap:
                if best is not None:
                    best[0].remove()
                best, best_overlap = (text, box), overlap
            else:
                text.remove()
            if overlap == 0:
                break
        placed.append(best[0])
        boxes.append(best[1])
    return placed


def _marker_box(center: Any) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(center[0] - 4, center[1] - 4, center[0] + 4, center[1] + 4)


def _area(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _reference_lines(ax: Any, baseline: Optional[float], upper: Optional[Tuple[str, float]]) -> None:
    if baseline is not None:
        ax.axhline(baseline, color="0.45", ls="--", lw=1, label=f"majority-answer baseline ({baseline:.3f})")
    if upper is not None:
        ax.axhline(upper[1], color="tab:green", ls=":", lw=1.2, label=f"upper bound: {upper[0]} ({upper[1]:.3f})")


def plot_groups(groups: Sequence[Group], metric: str, path: str, baseline: Optional[float] = None,
                upper_bound: Optional[Mapping[str, Any]] = None) -> None:
    """Each grid point's mean of ``metric`` with its confidence interval as error bar (none for a single run) and its
    runs as dots; horizontal lines at the majority-answer baseline (``baseline``, else the mean of the runs'
    ``eval/majority_baseline`` when ``metric`` is an eval score) and at the upper-bound group's mean
    (:func:`upper_bound_group`); every point labelled, labels placed apart (:func:`place_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in groups if metric in g.stats]
    if not groups:
        raise ValueError(f"no grid point has {metric}")
    if baseline is None and metric.startswith("eval/"):
        seen = [v for g in groups if BASELINE_METRIC in g.stats for v in g.stats[BASELINE_METRIC].values]
        baseline = math.fsum(seen) / len(seen) if seen else None
    top = upper_bound_group(groups, upper_bound)
    upper = (top.label, top.stats[metric].mean) if top is not None else None
    has_flops = all(FLOPS_METRIC in g.stats for g in groups)
    fig, axes = plt.subplots(1, 2 if has_flops else 1, figsize=(12 if has_flops else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    title, xs, line_keys = _x_of(groups)
    positions = {x: i for i, x in enumerate(sorted(set(xs.values()), key=_sort_key))}  # categorical, evenly spaced
    lines: Dict[str, List[int]] = {}
    for i, g in enumerate(groups):
        lines.setdefault(", ".join(f"{_short(k)}={g.values.get(k)}" for k in line_keys), []).append(i)
    points, labels = [], []
    for n, (name, members) in enumerate(sorted(lines.items())):
        members = sorted(members, key=lambda i: positions[xs[i]])
        color = f"C{n % 10}"
        _errorbar(ax, [positions[xs[i]] for i in members], [groups[i].stats[metric] for i in members], color, name or None)
        for i in members:
            points.append((positions[xs[i]], groups[i].stats[metric].mean))
            labels.append(groups[i].label)
    ax.set_xticks(list(positions.values()), [str(x) for x in positions])
    ax.set_xlim(-0.6, len(positions) - 0.4)
    _reference_lines(ax, baseline, upper)
    ax.set_xlabel(title)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {title.split(' (')[0]}" + (f" (mean, {_interval_note(groups, metric)})" if _interval_note(groups, metric) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    place_labels(ax, points, labels)
    if has_flops:
        ax = axes[0][1]
        peak = max(g.stats[FLOPS_METRIC].mean for g in groups)
        scale, unit = next(((s, u) for s, u in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")) if peak >= s), (1.0, "FLOPs"))
        for n, g in enumerate(groups):
            _errorbar(ax, [g.stats[FLOPS_METRIC].mean / scale], [g.stats[metric]], f"C{n % 10}", None)
        _reference_lines(ax, baseline, upper)
        ax.margins(x=0.2)
        ax.set_xlabel(f"{unit} per sample")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs FLOPs")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        place_labels(ax, [(g.stats[FLOPS_METRIC].mean / scale, g.stats[metric].mean) for g in groups], [g.label for g in groups])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interval_note(groups: Sequence[Group], metric: str) -> str:
    return "95% CI over seeds" if any(g.stats[metric].n > 1 for g in groups) else ""


def _errorbar(ax: Any, xs: Sequence[float], stats: Sequence[Summary], color: str, label: Optional[str]) -> None:
    """Means joined by a line, the interval as error bar where there is one, each run as a small dot."""
    means = [s.mean for s in stats]
    err = [[s.mean - s.ci_low if s.n > 1 else 0.0 for s in stats], [s.ci_high - s.mean if s.n > 1 else 0.0 for s in stats]]
    ax.errorbar(xs, means, yerr=err, color=color, marker="o", ms=5, capsize=4, lw=1.2, label=label)
    for x, s in zip(xs, stats):
        if s.n > 1:
            ax.scatter([x] * s.n, s.values, color=color, s=9, alpha=0.45, zorder=3)


# --------------------------------------------------------------------------- benchmark tables (the paper's layout)
# Columns of the paper's tables: (header, benchmark registry name). Scores are read from eval/<benchmark>/<headline>,
# the benchmark's headline score (``Benchmark.headline``), as ``lm-mini eval --benchmark/--suite`` logs them.
PAPER_TABLES = {
    # LLaVA-Mini (ICLR 2025) Table 1: image benchmarks
    "paper": [("VQAv2", "vqav2"), ("GQA", "gqa"), ("VisWiz", "vizwiz"), ("SciQA", "scienceqa"), ("VQA-T", "textvqa"),
              ("POPE", "pope"), ("MME", "mme"), ("MMB", "mmbench"), ("SEED", "seed_bench"), ("LLaVA-W", "llava_bench"),
              ("MM-Vet", "mmvet")],
    # the video tables: open-ended QA (GPT-judged accuracy) and multiple choice
    "paper_video": [("MSVD-QA", "msvd_qa"), ("MSRVTT-QA", "msrvtt_qa"), ("ActivityNet-QA", "activitynet_qa"),
                    ("MVBench", "mvbench"), ("MLVU", "mlvu"), ("EgoSchema", "egoschema")],
}


def headline(benchmark: str) -> str:
    """The score key the paper reports for a registered benchmark (``accuracy`` for anything else)."""
    from lm_mini.eval.benchmarks.base import BENCHMARKS

    try:
        return BENCHMARKS.get(benchmark).headline
    except KeyError:
        return "accuracy"


def benchmark_columns(rows: Sequence[RunRow], layout: str) -> List[Tuple[str, str]]:
    """(header, MLflow metric) per column: the paper's layout, or (``benchmarks``) every benchmark the runs have
    scores for, in name order, each with its headline score."""
    from lm_mini.eval.mlflow_scores import metric_name

    if layout in PAPER_TABLES:
        return [(header, metric_name("eval", name, headline(name))) for header, name in PAPER_TABLES[layout]]
    if layout != "benchmarks":
        raise ValueError(f"unknown table layout {layout!r}; expected {', '.join([*PAPER_TABLES, 'benchmarks'])}")
    found = sorted({m.split("/")[1] for r in rows for m in r.metrics if m.startswith("eval/") and m.count("/") >= 2})
    columns = []
    for label in found:
        wanted = metric_name("eval", label, headline(label))
        have = sorted(m for r in rows for m in r.metrics if m.startswith(f"eval/{label}/"))
        columns.append((label, wanted if any(wanted in r.metrics for r in rows) else have[0]))
    return columns


def benchmark_table(rows: Sequence[RunRow], layout: str = "paper") -> List[Dict[str, Any]]:
    """One record per run: its name, its grid values (C with its C² vision tokens, pre-fusion depth, ...), then
    one column per benchmark (the paper's units; None where the run has no score)."""
    columns = benchmark_columns(rows, layout)
    table = []
    for r in rows:
        rec: Dict[str, Any] = {"run": r.name}
        for key, value in r.values.items():
            rec[_short(key)] = value
            if key == C_KEY and isinstance(value, int):
                rec["#vision tokens"] = value * value
        for header, metric in columns:
            value = r.metrics.get(metric)
            rec[header] = round(value, 1) if isinstance(value, (int, float)) and not math.isnan(value) else None
        table.append(rec)
    return table
