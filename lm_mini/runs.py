"""Run directories: what a run holds, and which run, checkpoint or model a path names.

A run lives in ``<logging.runs_dir>/<experiment>/<run_name>/``::

    config.yaml              the resolved config (every session of the run rewrites it)
    mlflow.json              tracking URI + MLflow run id (a resumed job logs into the same run)
    checkpoints/step=*.ckpt  complete checkpoints only (files, or folders of shards under FSDP); a ``*.tmp``
                             beside them is a save in progress, or one that was killed
    eval.json                held-out results of the final evaluation
    finished.json            the final checkpoint's name, step and length, once the stage completed
    mlflow_pending.jsonl     metrics that could not reach the tracking server (sent on resume)
    eval/                    what ``lm-mini eval`` writes (predictions, answers files)

A **model directory** (``lm-mini import`` / ``lm-mini export``; ``lm_mini.interop.pretrained``) holds
``config.yaml`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).

Commands that take a model accept RUN | CHECKPOINT | MODEL_DIR (:func:`resolve_source`); ``train.init_from``
also takes a run name (:func:`resolve_init_from`); ``--resume`` picks the run and checkpoint
(:func:`resolve_run`); sweeps skip :func:`run_is_finished` runs. Light on purpose (no torch): sweeps and the
CLI read it. A config found in someone else's run or model directory imports no code unasked
(``registry.config_from_directory``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

PathLike = Union[str, Path]

CONFIG_FILE = "config.yaml"
MLFLOW_FILE = "mlflow.json"
CHECKPOINTS_DIR = "checkpoints"
FINISHED_FILE = "finished.json"
EVAL_FILE = "eval.json"
PENDING_FILE = "mlflow_pending.jsonl"
EVAL_DIR = "eval"
# a model directory
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"

TMP_SUFFIX = ".tmp"  # a checkpoint is written under <name>.tmp and renamed once complete
_STEP_RE = re.compile(r"^step=(\d+)\.ckpt$")
RUN_NAME_ENV = "LM_MINI_RUN_NAME"  # processes Lightning launches (DDP/FSDP children) inherit the run's name


# --------------------------------------------------------------------------- checkpoints of a run
def checkpoint_name(step: int) -> str:
    """The file/folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step={step:08d}.ckpt"


def tmp_path(path: PathLike) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def list_checkpoints(directory: PathLike) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def remove_incomplete(directory: PathLike) -> List[Path]:
    """Delete ``.tmp`` leftovers of saves that were killed; returns what was removed."""
    directory = Path(directory)
    removed = []
    for p in directory.glob(f"*{TMP_SUFFIX}") if directory.is_dir() else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p)
    return removed


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The step in a checkpoint's name (``step=00000040.ckpt`` -> 40), None for another name."""
    match = re.match(r"step=(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- the run directory
@dataclass
class Run:
    name: str
    dir: Path
    resume_from: Optional[Path] = None  # checkpoint to continue, None = fresh start

    @classmethod
    def at(cls, run_dir: PathLike) -> "Run":
        return cls(Path(run_dir).name, Path(run_dir))

    @property
    def config_file(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS_DIR

    @property
    def mlflow_file(self) -> Path:
        return self.dir / MLFLOW_FILE

    @property
    def finished_file(self) -> Path:
        return self.dir / FINISHED_FILE

    @property
    def eval_file(self) -> Path:
        return self.dir / EVAL_FILE

    @property
    def pending_file(self) -> Path:  # metrics the tracking server did not take (sent on resume)
        return self.dir / PENDING_FILE

    def mlflow_info(self) -> Dict[str, Any]:
        """``{"tracking_uri", "run_id", "experiment"}`` of the run's MLflow run ({} before it has one).

        The file keeps the URI without credentials; when the session's own tracking URI (``$MLFLOW_TRACKING_URI``)
        is the same store with a ``user:password@``, that one is returned, so the run's store is reached as it was."""
        if not self.mlflow_file.is_file():
            return {}
        info = json.loads(self.mlflow_file.read_text())
        from lm_mini.data.remote import without_credentials

        current = os.environ.get("MLFLOW_TRACKING_URI")
        if current and info.get("tracking_uri") and without_credentials(current) == info["tracking_uri"]:
            info["tracking_uri"] = current
        return info

    def is_finished(self) -> bool:
        """The run wrote ``finished.json`` and the final checkpoint it names still exists (sweeps skip finished
        runs; deleting the final checkpoint makes a re-run resume the run)."""
        if not self.finished_file.is_file():
            return False
        final = json.loads(self.finished_file.read_text())["checkpoint"]
        return final is None or (self.checkpoints / final).exists()


def run_is_finished(run_dir: PathLike) -> bool:
    """:meth:`Run.is_finished` of the run in ``run_dir``."""
    return Run.at(run_dir).is_finished()


def is_run_dir(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CHECKPOINTS_DIR).is_dir()


def is_model_dir(path: PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and ((p / WEIGHTS).is_file() or (p / WEIGHTS_INDEX).is_file())


def experiment_dir(runs_dir: PathLike, experiment: str) -> Path:
    """``<logging.runs_dir>/<experiment>``: the experiment's runs (and a sweep's logs and SLURM script)."""
    return Path(runs_dir) / experiment


def default_run_name(cfg: Any) -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:  # every rank of the job (and its requeued restarts) agrees on this name
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{cfg.train.stage}-slurm{job}" + (f"_{task}" if task else "")
    return f"{cfg.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run(cfg: Any, resume: Optional[str]) -> Run:
    """Which run directory, and which checkpoint (if any) to continue from.

    ``resume``: None (a fresh run; refused if the run already has checkpoints), ``auto`` (the newest complete
    checkpoint of ``run_name``; without one, under SLURM, of the run named after the job, so that a requeued
    job continues its own run and a new job starts its own; elsewhere, of the experiment's unfinished run with
    the newest checkpoint; a fresh start when there is none, so a requeued job can always pass it) or a
    checkpoint path (its run is ``<run>/checkpoints/<ckpt>``)."""
    runs = experiment_dir(cfg.logging.runs_dir, cfg.experiment)
    if resume and resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        run_dir = path.resolve().parent.parent
        return Run(run_dir.name, run_dir, path)
    name = cfg.run_name or os.environ.get(RUN_NAME_ENV)
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if resume == "auto" and not name and not slurm_job:  # the experiment's unfinished run with the newest checkpoint
        candidates = [(c.stat().st_mtime, d) for d in runs.glob("*")
                      if (c := latest_checkpoint(d / CHECKPOINTS_DIR)) and not run_is_finished(d)]
        name = max(candidates)[1].name if candidates else None
    name = name or default_run_name(cfg)
    run = Run(name, runs / name)
    if resume == "auto":
        run.resume_from = latest_checkpoint(run.checkpoints)
    elif latest_checkpoint(run.checkpoints) is not None:
        raise FileExistsError(f"run {run.dir} already has checkpoints: continue it with --resume auto, or pick another run_name")
    return run


def runs_named(name: str, runs_dir: PathLike) -> List[Path]:
    """The run directories called ``name`` under any experiment of ``runs_dir``."""
    return [d for d in Path(runs_dir).glob(f"*/{name}") if d.is_dir()]


def resolve_init_from(value: str, runs_dir: PathLike) -> Path:
    """``train.init_from``: a checkpoint, a run directory or a run name (under any experiment; its newest
    checkpoint), or a model directory (``lm-mini import`` / ``export``) -> what to read the weights from."""
    path = Path(value)
    if not path.exists():
        matches = runs_named(value, runs_dir)
        if len(matches) != 1:
            where = ", ".join(str(m) for m in matches) or "none"
            raise FileNotFoundError(f"train.init_from={value}: not a checkpoint path, and runs named so in {runs_dir}: {where}")
        path = matches[0]
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(path / CHECKPOINTS_DIR)
        if latest is None:
            raise FileNotFoundError(f"train.init_from={value}: run {path} has no complete checkpoint")
        return latest
    if path.is_dir() and not (path / ".metadata").is_file() and not is_model_dir(path):  # an FSDP checkpoint folder has one
        raise FileNotFoundError(f"train.init_from={value}: {path} is a directory with no checkpoints/ (a run that "
                                "saved none?) and not a sharded checkpoint folder")
    return path


# --------------------------------------------------------------------------- RUN | CHECKPOINT | MODEL_DIR
@dataclass
class Source:
    """Where a model's config and weights come from."""

    kind: str  # model_dir | run | checkpoint
    path: Path
    cfg: Any  # the config (DictConfig) found with it
    checkpoint: Optional[Path] = None  # the Lightning checkpoint (run, checkpoint)
    run_dir: Optional[Path] = None
    info: Dict[str, Any] = field(default_factory=dict)  # MLflow run, step: for the model card and scores


def directory_config(config_file: Path) -> Any:
    """A run's or model directory's ``config.yaml``: maybe someone else's, so it imports no code unasked."""
    from lm_mini.config import load_config
    from lm_mini.registry import config_from_directory

    with config_from_directory(config_file):
        return load_config(config_file)


def model_dir_config(path: PathLike) -> Any:
    """A model directory's config, with ``data.tokenizer`` resolved against the directory."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not an lm_mini model directory (needs {CONFIG_FILE} and {WEIGHTS} or {WEIGHTS_INDEX})")
    cfg = directory_config(path / CONFIG_FILE)
    return OmegaConf.merge(cfg, {"data": {"tokenizer": str((path / cfg.data.tokenizer).resolve())}})


def resolve_source(path: PathLike) -> Source:
    """Recognise a model directory, a run directory (its newest complete checkpoint) or a checkpoint (a
    ``*.ckpt`` file or FSDP folder, or the ``*.ckpt.consolidated`` file ``tools/consolidate_checkpoint.py``
    makes); clear errors for anything else. Reads configs only, no weights."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory, run directory or checkpoint")
    if is_model_dir(p):
        return Source("model_dir", p, model_dir_config(p))
    if is_run_dir(p):
        ckpt = latest_checkpoint(p / CHECKPOINTS_DIR)
        if ckpt is None:
            raise FileNotFoundError(f"run {p} has no complete checkpoint in {p / CHECKPOINTS_DIR}")
        kind, run_dir = "run", p
    elif p.name.endswith((".ckpt", ".ckpt.consolidated")):
        ckpt, kind = p, "checkpoint"
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else p.parent
    else:
        raise ValueError(f"{p} is not a model directory (config.yaml + model.safetensors), a run directory "
                         "(config.yaml + checkpoints/) or a checkpoint (*.ckpt, *.ckpt.consolidated)")
    info: Dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": ckpt.name, **Run.at(run_dir).mlflow_info()}
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{p}: its run's config.yaml is not in {run_dir}")
    return Source(kind, p, directory_config(run_dir / CONFIG_FILE), ckpt, run_dir, info)
