"""Grid sweeps: a YAML names a base config and the grid points to run (a Cartesian grid over any config keys,
listed points, or both), each repeated over seeds; the runs get deterministic names and are launched locally (in
sequence or N at a time) or as a SLURM array.

Sweep file::

    base: ../demo.yaml                 # relative to the sweep file
    sweep_id: demo_c_depth             # default: the file's stem
    experiment: demo_sweep             # default: the base config's experiment
    overrides: [train.max_steps=200]   # applied to every run
    grid:                              # the Cartesian product of these values
      model.compressor.grid: [1, 2, 4]
      model.prefusion.depth: [0, 2]
    points:                            # and/or: points listed one by one (combined with every grid combination)
      - {model.compressor.name: identity, model.prefusion.depth: 0}
    seeds: [0, 1, 2]                   # every point once per seed (config key `seed`; also allowed as a grid key)
    slurm: {partition: gpu, time: "04:00:00", gpus_per_node: 1, cpus_per_task: 8, mem: 64G}

Re-running a sweep skips the runs that finished with the settings the sweep gives them now (their final
checkpoint exists, and they ended under the same ``train.max_steps`` / ``train.max_epochs``) and resumes the
others with ``--resume auto``; a run that finished past the sweep's end is reported, not skipped. Every run's
config is validated against the schema before any run starts. ``lm-mini compare`` aggregates the runs of a point
over its seeds (mean, std, 95% CI).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from lm_mini.config import ConfigError, apply_overrides, differences, load_config, read_saved_config, tracking_uri
from lm_mini.runs import Run, experiment_dir, latest_checkpoint, run_is_finished


_log = logging.getLogger(__name__)
SEED_KEY = "seed"  # the config key a sweep's `seeds` list sets


@dataclass
class SweepRun:
    name: str
    values: Dict[str, Any]  # sweep key -> value (the point's keys, the grid's, and the seed)
    overrides: List[str]  # every override this run is launched with (sweep-wide + point + naming)


@dataclass
class Sweep:
    path: Path
    sweep_id: str
    base: Path
    experiment: str
    overrides: List[str]
    grid: Dict[str, List[Any]]  # Cartesian axes (the seed axis last, when the sweep has `seeds`)
    points: List[Dict[str, Any]] = field(default_factory=lambda: [{}])  # listed points, each combined with the grid
    slurm: Dict[str, Any] = field(default_factory=dict)
    runs: List[SweepRun] = field(default_factory=list)

    @property
    def keys(self) -> List[str]:
        """Every key a run's values may have: the points' keys (in order of appearance), then the grid's (seed last)."""
        keys = [k for p in self.points for k in p] + list(self.grid)
        return list(dict.fromkeys(keys))


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


def _read_points(path: Path, raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    points = raw.get("points")
    if points is None:
        return [{}]
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{path}: 'points' must be a non-empty list of mappings of config keys to one value each, "
                          f"got {points!r:.80}")
    for i, point in enumerate(points):
        listed = [k for k, v in point.items() if isinstance(v, list)]
        if listed:
            raise ConfigError(f"{path}: points[{i}] gives a list for {', '.join(map(str, listed))}; a point has one value per "
                              "key (put lists of values under 'grid', or list each point)")
    return [{str(k): v for k, v in p.items()} for p in points]


def _read_seeds(path: Path, raw: Dict[str, Any], grid: Dict[str, List[Any]], points: List[Dict[str, Any]]) -> None:
    """``seeds: [0, 1, 2]`` becomes the grid's last axis, ``seed``; a seed given twice is refused."""
    seeds = raw.get("seeds")
    if seeds is None:
        return
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r:.80}")
    if SEED_KEY in grid or any(SEED_KEY in p for p in points):
        raise ConfigError(f"{path}: the seed is given twice ('seeds' and a '{SEED_KEY}' key in grid/points); keep one")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: 'seeds' lists a seed twice: {seeds}")
    grid[SEED_KEY] = list(seeds)


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file, expand its points x grid x seeds and validate every run's config (no run starts on an error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # yaml's ScannerError / ParserError and friends
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, grid, overrides, ...) at the top level")
    allowed = {"base", "sweep_id", "experiment", "overrides", "grid", "points", "seeds", "slurm"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {unknown}. Valid keys: {', '.join(sorted(allowed))}")
    if "base" not in raw or not (raw.get("grid") or raw.get("points")):
        raise ConfigError(f"{path}: a sweep needs 'base' (a config file) and a non-empty 'grid' or 'points'")
    base = (path.parent / raw["base"]).resolve()
    if not isinstance(raw.get("grid") or {}, dict):
        raise ConfigError(f"{path}: 'grid' must map config keys to lists of values")
    grid = {str(k): (v if isinstance(v, list) else [v]) for k, v in (raw.get("grid") or {}).items()}
    points = _read_points(path, raw)
    _read_seeds(path, raw, grid, points)
    both = sorted({k for p in points for k in p} & set(grid))
    if both:
        raise ConfigError(f"{path}: {', '.join(both)} given both in 'points' and in 'grid'; give each key in one of them")
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
        points=points,
        slurm=dict(raw.get("slurm", {})),
    )
    keys = sweep.keys
    short = _short_names(keys)
    for point in points:
        for combo in itertools.product(*grid.values()):
            values = {**point, **dict(zip(grid, combo))}  # named in the point's own order, then the grid's
            name = "__".join(f"{short[k]}={_format_value(v)}" for k, v in values.items())
            run_overrides = overrides + [f"{k}={_override_value(v)}" for k, v in values.items()] + [
                f"experiment={sweep.experiment}",
                f"run_name={name}",
                f"logging.tags.sweep_id={sweep.sweep_id}",
                f"logging.tags.sweep_keys={','.join(keys)}",  # compare reads the values back from the params
            ]
            try:
                apply_overrides(base_cfg, run_overrides[len(overrides):])  # the base file is read once, not per run
            except ConfigError as e:
                raise ConfigError(f"{path}: grid run '{name}' is invalid: {e}") from None
            if any(r.name == name or r.values == values for r in sweep.runs):  # e.g. 0.001 and 1.0e-3: one run directory
                raise ConfigError(f"{path}: two grid points have the same run name '{name}'; list each value once")
            sweep.runs.append(SweepRun(name=name, values=values, overrides=run_overrides))
    return sweep


def run_dir(sweep: Sweep, run: SweepRun) -> Path:
    return experiment_dir(load_config(sweep.base, run.overrides).logging.runs_dir, sweep.experiment) / run.name


def is_finished(run_directory: Path) -> bool:
    """A run is finished when training wrote its final checkpoint marker (``lm_mini.runs``)."""
    return run_is_finished(run_directory)


# Keys whose value does not change what a run computes or reports: a run that differs from the sweep only in these
# is still the sweep's run.
LOGISTICS = ("train.checkpoint_every_n_steps", "train.keep_last_k", "train.log_every_n_steps", "train.dist_timeout_s",
             "train.val_every_n_steps", "data.remote", "logging", "experiment", "run_name",
             "model.attn_implementation", "model.llm.attn_implementation")
LENGTH = ("train.max_steps", "train.max_epochs")


def settings_mismatch(sweep: Sweep, run: SweepRun) -> List[str]:
    """How the run's recorded configuration (``config.yaml``, rewritten by every session) differs from what the sweep
    gives it now: every key outside :data:`LOGISTICS` for a finished run (its result would not be the sweep's), the
    length (:data:`LENGTH`) for a run with checkpoints (resuming it under another length changes its schedule; the
    training command itself refuses other changes). Empty: the run is the sweep's."""
    found = Run.at(run_dir(sweep, run))
    if not found.config_file.is_file() or (not found.is_finished() and latest_checkpoint(found.checkpoints) is None):
        return []
    differ = differences(read_saved_config(found.config_file), load_config(sweep.base, run.overrides), ignore=LOGISTICS,
                         only=None if found.is_finished() else LENGTH)
    return [f"{k}={was!r} (sweep: {now!r})" for k, was, now in differ]


def train_command(sweep: Sweep, run: SweepRun) -> List[str]:
    return [sys.executable, "-m", "lm_mini.cli", "train", str(sweep.base), *run.overrides, "--resume", "auto"]


# --------------------------------------------------------------------------- launchers
def sweep_runs_dir(sweep: Sweep) -> Path:
    """``<logging.runs_dir>/<experiment>``: the sweep's runs, its logs and its SLURM script."""
    return experiment_dir(load_config(sweep.base, sweep.overrides).logging.runs_dir, sweep.experiment)


def launch_local(sweep: Sweep, max_parallel: int = 1, log: Callable[[str], None] = _log.info) -> Dict[str, str]:
    """Run the unfinished runs, ``max_parallel`` at a time. Returns run name -> finished|skipped|stopped|failed|mismatch
    (stopped: ended by a signal after a checkpoint, e.g. preempted; running the sweep again resumes it. mismatch: the
    run's recorded settings are not the ones the sweep gives it now (:func:`settings_mismatch`); it is neither
    counted as the sweep's run nor launched)."""
    from lm_mini.training.run import STOPPED_EXIT_CODES

    status: Dict[str, str] = {}
    pending = []
    for run in sweep.runs:
        directory = run_dir(sweep, run)
        differ = settings_mismatch(sweep, run)
        if differ:
            status[run.name] = "mismatch"
            done = "finished" if is_finished(directory) else "has checkpoints"
            log(f"[sweep {sweep.sweep_id}] {run.name}: {done} with other settings than this sweep gives it: {'; '.join(differ)}. "
                f"Not counted and not launched: delete {directory} to run it afresh with the sweep's settings, or set the "
                "sweep file back to the settings it ran with")
        elif is_finished(directory):
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
            finished = is_finished(run_dir(sweep, run))
            # lm-mini train exits 128 + the signal's number when a signal stopped the run after its checkpoint
            status[name] = ("finished" if rc == 0 and finished else "stopped" if rc in STOPPED_EXIT_CODES and not finished
                            else "failed")
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

        info = Run.at(run_dir(sweep, run)).mlflow_info()
        log_to_mlflow(efficiency_report(load_config(sweep.base, run.overrides).model), info["run_id"], info["tracking_uri"])
    except Exception as e:  # figures are a bonus; the run itself is done
        _log.warning("[sweep %s] could not log efficiency figures of %s: %s", sweep.sweep_id, run.name, e)


def _mark_failed(sweep: Sweep, run_name: str) -> None:
    """Make sure a crashed run shows as FAILED in MLflow (the run may have died before it could say so)."""
    try:
        from lm_mini.tracking_store import mlflow_client

        client = mlflow_client(tracking_uri(load_config(sweep.base, sweep.overrides)))
        exp = client.get_experiment_by_name(sweep.experiment)
        if exp is None:
            return
        for r in client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'"):
            if r.info.status != "FINISHED":
                client.set_terminated(r.info.run_id, status="FAILED")
    except Exception as e:  # the sweep goes on; the log has the run's own error
        _log.warning("[sweep %s] could not mark %s failed in MLflow: %s", sweep.sweep_id, run_name, e)


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
