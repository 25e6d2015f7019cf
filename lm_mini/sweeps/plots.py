"""``lm-mini compare --plot``: the metric against the first grid key (vision tokens per image when the compressors
differ) and against FLOPs per sample, each grid point with its interval over seeds, the majority-answer baseline
and the upper bound (identity compressor at depth 0) as lines, labels placed so they neither overlap nor leave
the axes."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from lm_mini.sweeps.compare import (BASELINE_METRIC, C_KEY, COMPRESSOR_KEY, DEPTH_KEY, FLOPS_METRIC, VISUAL_TOKENS_METRIC,
                                    RunRow, _short, _sort_key)
from lm_mini.sweeps.stats import Group, Summary, aggregate, should_aggregate, summarize


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
