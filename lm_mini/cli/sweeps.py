"""``lm-mini sweep SWEEP.yaml`` (a grid of runs, locally or as a SLURM array: ``lm_mini.sweeps.grid``) and
``lm-mini compare --experiment E`` (MLflow runs -> tables with intervals, tests, plots: ``lm_mini.sweeps.compare``)."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lm_mini.cli.common import at_least


def add_commands(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a grid sweep (locally or as a SLURM array)")
    p.add_argument("sweep", help="sweep YAML (base config + grid)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (and write the sbatch script) without running")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--max-parallel", type=int, default=1, help="runs at a time (local) / array throttle (slurm)")
    p.add_argument("--submit", action="store_true", help="slurm: submit the written script with sbatch")
    p.add_argument("--slurm-script", default=None, help="where to write the sbatch script")
    p.set_defaults(func=sweep)

    p = sub.add_parser("compare", help="compare MLflow runs: tables and plots")
    p.add_argument("--experiment", required=True)
    p.add_argument("--sweep", default=None, help="only runs of this sweep id")
    p.add_argument("--metric", nargs="*", default=None, help="metrics to show (default: all)")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    p.add_argument("--plot", default=None, help="write plots to this PNG")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the store the experiment's "
                   "runs name in runs/<experiment>/*/mlflow.json, else ./mlflow.db (also searched in parent directories)")
    p.add_argument("--runs-dir", default=None, help="where the runs live (their logging.runs_dir), to find their MLflow store")
    p.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                   help="config keys that make a grid point; runs with equal values are aggregated (mean, std, CI, n). "
                        "Default: the sweep's keys except the seed")
    p.add_argument("--alpha", type=at_least(0.0, float, inclusive=False), default=0.05,
                   help="confidence intervals at 1 - alpha, significance at alpha (default 0.05)")
    p.add_argument("--baseline", type=float, default=None,
                   help="plot: the majority-answer line (default: the runs' eval/majority_baseline)")
    p.add_argument("--upper-bound", nargs="+", default=None, metavar="KEY=VALUE",
                   help="plot: the grid point drawn as the upper bound (default: identity compressor at depth 0)")
    p.add_argument("--table", choices=["paper", "paper_video", "benchmarks"], default=None,
                   help="benchmark scores (eval/<benchmark>/...), one column per benchmark: paper = the paper's Table 1 "
                   "(image benchmarks), paper_video = its video benchmarks, benchmarks = every benchmark scored")
    p.set_defaults(func=compare)


# --------------------------------------------------------------------------- sweep
def sweep(args: argparse.Namespace) -> int:
    from lm_mini.config import load_config, tracking_uri
    from lm_mini.sweeps import grid

    sweep = grid.load_sweep(args.sweep)
    print(f"sweep {sweep.sweep_id}: {len(sweep.runs)} runs in experiment '{sweep.experiment}' (base {sweep.base})")
    for run in sweep.runs:
        print(f"  {run.name}: {run.values}")
    if args.launcher == "slurm":
        out = Path(args.slurm_script or (grid.sweep_runs_dir(sweep) / f"{sweep.sweep_id}.sbatch"))
        out.parent.mkdir(parents=True, exist_ok=True)
        (grid.sweep_runs_dir(sweep) / "_sweep_logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create it
        out.write_text(grid.slurm_script(sweep, args.max_parallel if args.max_parallel > 1 else None))
        print(f"wrote {out}")
        if args.submit and not args.dry_run:
            return subprocess.call(["sbatch", str(out)])
        return 0
    if args.dry_run:
        for run in sweep.runs:
            print(" ".join(shlex.quote(a) for a in grid.train_command(sweep, run)))
        return 0
    from lm_mini.tracking_server import check_tracking_server
    from lm_mini.tracking_store import TrackingUnavailable

    try:  # a dead tracking server fails every run, then hangs marking each failed: say so first
        check_tracking_server(tracking_uri(load_config(sweep.base, sweep.overrides)))
    except TrackingUnavailable as e:
        print(f"lm-mini sweep: {e}", file=sys.stderr)
        return 2
    status = grid.launch_local(sweep, max_parallel=args.max_parallel, log=print)
    print(f"sweep {sweep.sweep_id}: " + ", ".join(f"{s}={sum(v == s for v in status.values())}"
                                                 for s in ("finished", "skipped", "stopped", "failed", "mismatch")))
    return 1 if any(s in ("failed", "stopped", "mismatch") for s in status.values()) else 0


# --------------------------------------------------------------------------- compare
def compare(args: argparse.Namespace) -> int:
    from lm_mini.sweeps import compare as c

    try:
        uri, found = c.find_tracking_store(args.experiment, args.tracking_uri, getattr(args, "runs_dir", None))
        if found not in ("--tracking-uri", "$MLFLOW_TRACKING_URI", "./mlflow.db"):
            print(f"lm-mini compare: reading {uri} ({found})", file=sys.stderr)
        rows = c.read_runs(args.experiment, args.sweep, uri, keys=getattr(args, "group_by", None) or ())
    except LookupError as e:
        print(f"lm-mini compare: {e}")
        return 1
    if getattr(args, "table", None):
        try:
            table, headers = c.benchmark_table(rows, args.table), [h for h, _ in c.benchmark_columns(rows, args.table)]
        except ValueError as e:
            print(f"lm-mini compare: {e}")
            return 1
        if not any(rec[h] is not None for rec in table for h in headers):
            print(f"lm-mini compare: no run of '{args.experiment}' has benchmark scores (eval/<benchmark>/...); "
                  "log them with lm-mini eval RUN --benchmark NAME ... or --suite FILE")
        print(c.render(table, "markdown" if args.format == "table" else args.format))
        return 0
    metrics = c._metric_names(rows, args.metric or [])
    known = sorted({m for r in rows for m in r.metrics})
    unknown = [m for m in metrics if m not in known]
    if unknown:  # a typo would print a table of '-' and an empty plot
        print(f"lm-mini compare: no run has metric(s) {', '.join(unknown)}; they have: {', '.join(known) or 'none'}")
        return 1
    return _print_comparison(args, rows, metrics)


def _print_comparison(args: argparse.Namespace, rows: Sequence[Any], metrics: Sequence[str]) -> int:
    """The runs; when they repeat grid points over seeds, each point's mean / std / CI / n and the pairwise
    differences of the first metric with their significance; the pivot; the plot."""
    from lm_mini.sweeps import compare as c
    from lm_mini.sweeps import plots, stats

    group_by, alpha = getattr(args, "group_by", None), getattr(args, "alpha", 0.05)
    fmt = args.format
    text = "markdown" if fmt == "markdown" else "table"
    upper = _parse_assignments(getattr(args, "upper_bound", None))
    records = c.to_records(rows, metrics)
    out: Dict[str, Any] = {"runs": records}
    main_metric = metrics[0] if metrics else None
    groups: List[Any] = []
    if stats.should_aggregate(rows, group_by):
        groups, left_out = stats.aggregate(rows, metrics, group_by, alpha)
        if group_by and not all(k in r.values and r.values[k] is not None for r in rows for k in group_by):
            missing = sorted({k for r in rows for k in group_by if r.values.get(k) is None})
            print(f"lm-mini compare: some runs have no value for --group-by {', '.join(missing)}; they form their own group")
        diffs = stats.differences(groups, main_metric, alpha) if main_metric else []
        out.update({"group_by": stats.group_keys(rows, group_by), "alpha": alpha, "groups": stats.group_records(groups, metrics),
                    "differences": {"metric": main_metric, "test": "Welch's t-test, Holm-adjusted over all pairs",
                                    "pairs": stats.difference_records(diffs)},
                    "ordering": stats.ordering(groups, main_metric, diffs) if main_metric else "",
                    "left_out": [{"run": r.name, "status": r.status} for r in left_out]})
    if fmt == "json":
        print(json.dumps(out, indent=2, default=_json_default))
    elif fmt == "csv":  # one table: the grid points when aggregating (a row each), else the runs
        print(c.render(stats.group_records(groups, metrics) if groups else records, "csv"), end="")
    else:
        print(c.render(records, text))
        if groups:
            level = f"{100 * (1 - alpha):g}%"
            print(f"\nover seeds, per grid point ({', '.join(c._short(k) for k in out['group_by']) or 'all runs'}): "
                  f"mean ± std [{level} t-interval], n runs:")
            print(c.render(stats.summary_table(groups, metrics), text))
            if out["left_out"]:
                print("left out (not FINISHED): " + ", ".join(f"{r['run']} ({r['status']})" for r in out["left_out"]))
            if out["differences"]["pairs"]:
                print(f"\n{main_metric}: differences between grid points (Welch's t-test, Holm-adjusted over "
                      f"{len(out['differences']['pairs'])} pairs; significant: p (Holm) < {alpha:g}):")
                print(c.render(stats.difference_table(stats.differences(groups, main_metric, alpha)), text))
                print(f"\nordering ('>' significant, '~' not): {out['ordering']}")
        table = c.pivot(_mean_rows(groups) if groups else rows, main_metric) if main_metric else None
        if table:
            axes = c.grid_axes(_mean_rows(groups) if groups else rows)
            print(f"\n{main_metric}{' (mean over seeds)' if groups else ''} over {c._short(axes[0])} x {c._short(axes[1])}:")
            print(c.render(table, text))
    if args.plot:
        if not metrics:
            print("lm-mini compare: no metric to plot")
            return 1
        try:
            plots.plot(rows, metrics[0], args.plot, group_by=group_by, alpha=alpha, baseline=getattr(args, "baseline", None),
                 upper_bound=upper)
        except ValueError as e:
            print(f"lm-mini compare: {e}")
            return 1
        if fmt not in ("json", "csv"):
            print(f"\nplot written to {args.plot}")
    return 0


def _mean_rows(groups: Sequence[Any]) -> List[Any]:
    """Each group as one row of its means (for the pivot)."""
    from lm_mini.sweeps.compare import RunRow

    return [RunRow("", g.label, "FINISHED", dict(g.values), {m: s.mean for m, s in g.stats.items()}) for g in groups]


def _parse_assignments(items: Optional[Sequence[str]]) -> Optional[Dict[str, Any]]:
    """``["model.compressor.name=identity", "model.prefusion.depth=0"]`` -> {key: value}."""
    from lm_mini.sweeps.compare import _parse

    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"lm-mini compare: --upper-bound takes KEY=VALUE, got {item!r}")
        out[key] = _parse(value)
    return out


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)
