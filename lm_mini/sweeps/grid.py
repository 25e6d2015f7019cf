"""Grid sweeps: a YAML names a base config and a grid over any config keys; the Cartesian product
becomes runs with deterministic names, launched locally (in sequence or N at a time) or as a SLURM array.

Sweep file::

    base: ../demo.yaml                 # relative to the sweep file
    sweep_id: demo_c_depth             # default: the file's stem
    experiment: demo_sweep             # default: the base config's experiment
    overrides: [train.max_steps=200]   # applied to every run
    grid:
      model.compressor.grid: [1, 2, 4]
      model.prefusion.depth: [0, 2]
    slurm: {partition: gpu, time: "04:00:00", gpus_per_node: 1, cpus_per_task: 8, mem: 64G}

Re-running a sweep skips finished runs (their final checkpoint exists) and resumes the others with
``--resume auto``. Every grid key is validated against the config schema before any run starts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from lm_mini.config import ConfigError, load_config, tracking_uri


@dataclass
class SweepRun:
    name: str
    values: Dict[str, Any]  # grid key -> value
    overrides: List[str]  # every override this run is launched with (sweep-wide + grid + naming)


@dataclass
class Sweep:
    path: Path
    sweep_id: str
    base: Path
    experiment: str
    overrides: List[str]
    grid: Dict[str, List[Any]]
    slurm: Dict[str, Any] = field(default_factory=dict)
    runs: List[SweepRun] = field(default_factory=list)


def _format_value(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    """Shortest dotted suffix of each key that is unique among the grid keys (grid, depth, ...)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(k.endswith(short) and (k == short or k.endswith("." + short)) for k in keys) == 1:
                out[key] = short
                break
    return out


def _override_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file, expand its grid and validate every run's config (no run starts on an error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # yaml's ScannerError / ParserError and friends
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, grid, overrides, ...) at the top level")
    allowed = {"base", "sweep_id", "experiment", "overrides", "grid", "slurm"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {unknown}. Valid keys: {', '.join(sorted(allowed))}")
    if "base" not in raw or not raw.get("grid"):
        raise ConfigError(f"{path}: a sweep needs 'base' (a config file) and a non-empty 'grid'")
    base = (path.parent / raw["base"]).resolve()
    if not isinstance(raw["grid"], dict):
        raise ConfigError(f"{path}: 'grid' must map config keys to lists of values")
    grid = {str(k): (v if isinstance(v, list) else [v]) for k, v in raw["grid"].items()}
    if not isinstance(raw.get("overrides", []), list):
        raise ConfigError(f"{path}: 'overrides' must be a list of key=value strings, got {raw['overrides']!r:.80}")
    overrides = [str(o) for o in raw.get("overrides", [])]
    base_cfg = load_config(base, overrides)
    sweep = Sweep(
        path=path,
        sweep_id=str(raw.get("sweep_id", path.stem)),
        base=base,
        experiment=str(raw.get("experiment", base_cfg.experiment)),
        overrides=overrides,
        grid=grid,
        slurm=dict(raw.get("slurm", {})),
    )
    keys = list(grid)
    short = _short_names(keys)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "__".join(f"{short[k]}={_format_value(v)}" for k, v in values.items())
        run_overrides = overrides + [f"{k}={_override_value(v)}" for k, v in values.items()] + [
            f"experiment={sweep.experiment}",
            f"run_name={name}",
            f"logging.tags.sweep_id={sweep.sweep_id}",
            f"logging.tags.sweep_keys={','.join(keys)}",  # compare reads the values back from the params
        ]
        try:
            load_config(base, run_overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: grid run '{name}' is invalid: {e}") from None
        if any(r.name == name for r in sweep.runs):  # e.g. 0.001 and 1.0e-3: one run directory for two points
            raise ConfigError(f"{path}: two grid points have the same run name '{name}'; list each value once")
        sweep.runs.append(SweepRun(name=name, values=values, overrides=run_overrides))
    return sweep


def run_dir(sweep: Sweep, run: SweepRun) -> Path:
    cfg = load_config(sweep.base, run.overrides)
    return Path(cfg.logging.runs_dir) / sweep.experiment / run.name


def is_finished(run_directory: Path) -> bool:
    """A run is finished when training wrote its final checkpoint marker."""
    from lm_mini.training.run import run_is_finished

    return run_is_finished(run_directory)


def train_command(sweep: Sweep, run: SweepRun) -> List[str]:
    return [sys.executable, "-m", "lm_mini.cli", "train", str(sweep.base), *run.overrides, "--resume", "auto"]


# --------------------------------------------------------------------------- launchers
def sweep_runs_dir(sweep: Sweep) -> Path:
    """``<logging.runs_dir>/<experiment>``: the sweep's runs, its logs and its SLURM script."""
    return Path(load_config(sweep.base, sweep.overrides).logging.runs_dir) / sweep.experiment


def launch_local(sweep: Sweep, max_parallel: int = 1, log=print) -> Dict[str, str]:
    """Run the unfinished runs, ``max_parallel`` at a time. Returns run name -> finished|skipped|stopped|failed
    (stopped: exited cleanly before its end, e.g. on SIGTERM; running the sweep again resumes it)."""
    status: Dict[str, str] = {}
    pending = []
    for run in sweep.runs:
        if is_finished(run_dir(sweep, run)):
            status[run.name] = "skipped"
            log(f"[sweep {sweep.sweep_id}] {run.name}: finished before, skipped")
        else:
            pending.append(run)
    running: Dict[str, subprocess.Popen] = {}
    logs_dir = sweep_runs_dir(sweep) / "_sweep_logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < max(1, max_parallel):
            run = pending.pop(0)
            log_file = open(logs_dir / f"{run.name}.log", "ab")
            log(f"[sweep {sweep.sweep_id}] {run.name}: starting (log: {log_file.name})")
            running[run.name] = subprocess.Popen(train_command(sweep, run), stdout=log_file, stderr=subprocess.STDOUT)
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            run = next(r for r in sweep.runs if r.name == name)
            # exit 0 is also a run stopped by a signal after its checkpoint (preemption): it is not done
            status[name] = "failed" if rc != 0 else "finished" if is_finished(run_dir(sweep, run)) else "stopped"
            log(f"[sweep {sweep.sweep_id}] {name}: {status[name]} (exit {rc})"
                + (": stopped before its end; run the sweep again to resume it" if status[name] == "stopped" else ""))
            if status[name] == "failed":
                _mark_failed(sweep, name)
            elif status[name] == "finished":
                _log_efficiency(sweep, run)
        time.sleep(0.2)
    return status


def _log_efficiency(sweep: Sweep, run: SweepRun) -> None:
    """FLOPs per sample etc. of the run's model into its MLflow run, so ``compare`` plots accuracy vs FLOPs."""
    try:
        from lm_mini.eval.efficiency import efficiency_report, log_to_mlflow

        info = json.loads((run_dir(sweep, run) / "mlflow.json").read_text())
        log_to_mlflow(efficiency_report(load_config(sweep.base, run.overrides).model), info["run_id"], info["tracking_uri"])
    except Exception as e:  # figures are a bonus; the run itself is done
        print(f"[sweep {sweep.sweep_id}] could not log efficiency figures of {run.name}: {e}", file=sys.stderr)


def _mark_failed(sweep: Sweep, run_name: str) -> None:
    """Make sure a crashed run shows as FAILED in MLflow (the run may have died before it could say so)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(load_config(sweep.base, sweep.overrides)))
        exp = client.get_experiment_by_name(sweep.experiment)
        if exp is None:
            return
        for r in client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'"):
            if r.info.status != "FINISHED":
                client.set_terminated(r.info.run_id, status="FAILED")
    except Exception as e:  # the sweep goes on; the log has the run's own error
        print(f"[sweep {sweep.sweep_id}] could not mark {run_name} failed in MLflow: {e}", file=sys.stderr)


def slurm_script(sweep: Sweep, max_parallel: Optional[int] = None) -> str:
    """An sbatch array script: one array task per grid run, requeued on preemption, resumed with --resume auto."""
    s = {"job_name": f"lm-mini-{sweep.sweep_id}", "time": "24:00:00", "nodes": 1, "gpus_per_node": 1,
         "cpus_per_task": 8, "mem": "64G", **sweep.slurm}
    array = f"0-{len(sweep.runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={s.pop('job_name')}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={s.pop('nodes')}",
        f"#SBATCH --ntasks-per-node={s.get('gpus_per_node', 1)}",
        f"#SBATCH --gpus-per-node={s.pop('gpus_per_node')}",
        f"#SBATCH --cpus-per-task={s.pop('cpus_per_task')}",
        f"#SBATCH --mem={s.pop('mem')}",
        f"#SBATCH --time={s.pop('time')}",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@300",  # to every job step (B: would signal only this shell): the trainer checkpoints and exits
        f"#SBATCH --output={sweep_runs_dir(sweep) / '_sweep_logs' / '%x_%A_%a.out'}",  # cli_sweep creates the folder
    ]
    lines += [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in s.items()]
    lines += ["", "set -euo pipefail", "export HF_HUB_OFFLINE=1", "RUNS=("]
    for run in sweep.runs:
        args = ["train", str(sweep.base), *run.overrides, "--resume", "auto"]
        lines.append("  " + shlex.quote(" ".join(shlex.quote(a) for a in args)))
    lines += [")", "", "# Lightning's SLURM environment reads the task's rank/world size from srun.",
              'eval "srun lm-mini ${RUNS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


def cli_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    print(f"sweep {sweep.sweep_id}: {len(sweep.runs)} runs in experiment '{sweep.experiment}' (base {sweep.base})")
    for run in sweep.runs:
        print(f"  {run.name}: {run.values}")
    if args.launcher == "slurm":
        out = Path(args.slurm_script or (sweep_runs_dir(sweep) / f"{sweep.sweep_id}.sbatch"))
        out.parent.mkdir(parents=True, exist_ok=True)
        (sweep_runs_dir(sweep) / "_sweep_logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create it
        out.write_text(slurm_script(sweep, args.max_parallel if args.max_parallel > 1 else None))
        print(f"wrote {out}")
        if args.submit and not args.dry_run:
            return subprocess.call(["sbatch", str(out)])
        return 0
    if args.dry_run:
        for run in sweep.runs:
            print(" ".join(shlex.quote(a) for a in train_command(sweep, run)))
        return 0
    from lm_mini.training.tracking import TrackingUnavailable, check_tracking_server

    try:  # a dead tracking server fails every run, then hangs marking each failed: say so first
        check_tracking_server(tracking_uri(load_config(sweep.base, sweep.overrides)))
    except TrackingUnavailable as e:
        print(f"lm-mini sweep: {e}", file=sys.stderr)
        return 2
    status = launch_local(sweep, max_parallel=args.max_parallel)
    print(f"sweep {sweep.sweep_id}: " + ", ".join(f"{s}={sum(v == s for v in status.values())}"
                                                 for s in ("finished", "skipped", "stopped", "failed")))
    return 1 if any(s in ("failed", "stopped") for s in status.values()) else 0
