"""Read runs back from MLflow into a table (terminal / Markdown / CSV / JSON), a pivot of one metric over the
sweep's two grid keys, and the paper's benchmark tables. Runs of one grid point over seeds are aggregated and
compared in :mod:`lm_mini.sweeps.stats`; plots (metric vs the first grid key, one line per value of the others;
metric vs FLOPs) are :mod:`lm_mini.sweeps.plots`'. For the default C x depth grid: C across, one line per depth."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lm_mini.config import LoggingConfig
from lm_mini.config import tracking_uri as resolve_tracking_uri
from lm_mini.runs import MLFLOW_FILE, Run, experiment_dir
from lm_mini.tracking_store import sqlite_file

C_KEY = "model.compressor.grid"
DEPTH_KEY = "model.prefusion.depth"
FLOPS_METRIC = "flops_per_sample"  # logged by `lm-mini efficiency --mlflow-run`
SEED_KEY = "seed"  # sweeps repeat a point over seeds through this config key
COMPRESSOR_KEY = "model.compressor.name"
BASELINE_METRIC = "eval/majority_baseline"  # logged by the end-of-training evaluation next to eval/exact_match
VISUAL_TOKENS_METRIC = "visual_tokens"  # vision tokens per image, logged by sweeps (lm_mini.eval.efficiency)


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
        db = sqlite_file(explicit)
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
        named = [u for u in named if sqlite_file(u) is None or sqlite_file(u).is_file()]
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
    from lm_mini.tracking_server import check_tracking_server
    from lm_mini.tracking_store import TrackingUnavailable, mlflow_client

    uri = tracking_uri or resolve_tracking_uri()
    try:  # MLflow's client would retry a dead server for minutes without a word
        check_tracking_server(uri)
    except TrackingUnavailable as e:
        raise LookupError(str(e)) from None
    try:
        client = mlflow_client(uri)  # a missing SQLite file is refused, not created
    except TrackingUnavailable as e:  # no such store, or one an interrupted first run left half-created
        raise LookupError(str(e)) from None
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
