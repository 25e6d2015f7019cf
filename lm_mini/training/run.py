"""``lm-mini train CONFIG [key=value ...] [--resume auto|PATH]``: one stage, end to end.

A run lives in ``<logging.runs_dir>/<experiment>/<run_name>/``::

    config.yaml              the resolved config
    mlflow.json              tracking URI + MLflow run id (a resumed job logs into the same run)
    checkpoints/step=*.ckpt  complete checkpoints only (files, or folders of shards under FSDP)
    eval.json                held-out results of the final evaluation
    mlflow_pending.jsonl     metrics that could not reach the tracking server (sent on resume)

``--resume auto`` continues the newest complete checkpoint of the run (``run_name``, else the
experiment's most recent run) and starts fresh when there is none, so a requeued job can always pass it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig

from lm_mini.config import flatten, load_config, to_yaml, tracking_uri
from lm_mini.data.errors import describe_skips
from lm_mini.training import checkpoint as ckpt
from lm_mini.trust import UntrustedCheckpoint
from lm_mini.training.distributed import (Heartbeat, LaunchError, StartFailed, check_launch, detect_launch, from_rank_zero,
                                          join_process_group, lost_rank_message)
from lm_mini.training.callbacks import (PerRankLoaderState, PreemptionHandler, SkippedSamplesLogger, StepCheckpoint, ThroughputLogger,
                                       requeue_slurm_job, skip_counts_over_ranks)
from lm_mini.training.module import LmMiniModule
from lm_mini.training.strategy import build_strategy, cluster_plugins
from lm_mini.training.tracking import (BufferedMLFlowLogger, CheckpointedMetrics, OtherRankLogger, TrackingUnavailable,
                                      check_tracking_server)

RUN_NAME_ENV = "LM_MINI_RUN_NAME"  # processes Lightning launches (DDP/FSDP children) inherit the run's name


# --------------------------------------------------------------------------- run directory
@dataclass
class Run:
    name: str
    dir: Path
    resume_from: Optional[Path] = None  # checkpoint to continue, None = fresh start

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def mlflow_file(self) -> Path:
        return self.dir / "mlflow.json"

    @property
    def finished_file(self) -> Path:
        return self.dir / "finished.json"

    @property
    def pending_file(self) -> Path:  # metrics the tracking server did not take (sent on resume)
        return self.dir / "mlflow_pending.jsonl"


def run_is_finished(run_dir: Path) -> bool:
    """A run finished when it wrote ``finished.json`` and the final checkpoint it names still exists
    (sweeps skip finished runs; deleting the final checkpoint makes a re-run resume the run)."""
    run = Run(Path(run_dir).name, Path(run_dir))
    if not run.finished_file.is_file():
        return False
    final = json.loads(run.finished_file.read_text())["checkpoint"]
    return final is None or (run.checkpoints / final).exists()


def _default_run_name(cfg: DictConfig) -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:  # every rank of the job (and its requeued restarts) agrees on this name
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{cfg.train.stage}-slurm{job}" + (f"_{task}" if task else "")
    return f"{cfg.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run(cfg: DictConfig, resume: Optional[str]) -> Run:
    """Which run directory, and which checkpoint (if any) to continue from."""
    experiment_dir = Path(cfg.logging.runs_dir) / cfg.experiment
    if resume and resume != "auto":  # an explicit checkpoint: its run is <run>/checkpoints/<ckpt>
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        run_dir = path.resolve().parent.parent
        return Run(run_dir.name, run_dir, path)
    name = cfg.run_name or os.environ.get(RUN_NAME_ENV)
    if resume == "auto" and not name:  # the experiment's run with the newest checkpoint
        candidates = [(c.stat().st_mtime, d) for d in experiment_dir.glob("*") if (c := ckpt.latest_checkpoint(d / "checkpoints"))]
        name = max(candidates)[1].name if candidates else None
    name = name or _default_run_name(cfg)
    run = Run(name, experiment_dir / name)
    if resume == "auto":
        run.resume_from = ckpt.latest_checkpoint(run.checkpoints)
    elif ckpt.latest_checkpoint(run.checkpoints) is not None:
        raise FileExistsError(f"run {run.dir} already has checkpoints: continue it with --resume auto, or pick another run_name")
    return run


class ResumeMismatch(ValueError):
    """``--resume`` with a configuration the run's checkpoint cannot continue."""


# What a resumed run may change: how long it goes on, how often it checkpoints / logs / validates, how it
# is evaluated and tracked. Anything else (model, data, optimiser, schedule, seed, devices) the checkpoint
# holds or the loader's saved position depends on: a change would be ignored (the restored optimiser and
# schedule win, so config.yaml and MLflow would record a config the run does not follow) or crash.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_epochs", "train.checkpoint_every_n_steps", "train.keep_last_k",
                     "train.eval_at_end", "train.val_every_n_steps", "train.log_every_n_steps", "train.init_from", "train.dist_timeout_s",
                     "data.val", "data.remote", "eval", "logging", "experiment", "run_name",
                     "model.attn_implementation", "model.llm.attn_implementation")  # another kernel, the same function


def check_resumable(saved_config: Path, cfg: DictConfig) -> None:
    """Refuse, naming the keys, a resume whose config differs from the run's outside ``RESUME_MAY_CHANGE``."""
    from lm_mini.config import flatten, load_config

    if not saved_config.is_file():
        return
    saved, now = flatten(load_config(saved_config)), flatten(cfg)
    fixed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
             and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)]
    if fixed:
        changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in fixed]
        raise ResumeMismatch(f"cannot resume {saved_config.parent}: its checkpoint was trained with another configuration ("
                             + "; ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
                             + "); a resumed run may change only " + ", ".join(RESUME_MAY_CHANGE)
                             + ". Use a new run_name, or train.init_from to start from its weights")


def length_change(saved_config: Path, cfg: DictConfig, resume_from: Path) -> Optional[str]:
    """What a resume changes about how long the run goes on (``train.max_steps`` / ``train.max_epochs``), said so
    that a run does not silently end earlier or later than it last ran to; None when nothing changes."""
    from lm_mini.config import load_config

    if not saved_config.is_file():
        return None
    saved = load_config(saved_config).train
    changed = [f"train.{k} {saved[k]} -> {cfg.train[k]}" for k in ("max_steps", "max_epochs") if saved[k] != cfg.train[k]]
    if not changed:
        return None
    match = re.match(r"step=(\d+)", Path(resume_from).name)
    at = int(match.group(1)) if match else None
    steps, epochs = cfg.train.max_steps, cfg.train.max_epochs
    ends = " or ".join(([f"at step {steps}"] if steps and steps > 0 else []) + ([f"after epoch {epochs}"] if epochs and epochs > 0 else []))
    past = at is not None and steps is not None and 0 < steps <= at
    return (f"resuming {Path(resume_from).parent.parent} with {', '.join(changed)} (it last ran with max_steps "
            f"{saved.max_steps}, max_epochs {saved.max_epochs}): it now ends {ends or 'never'}"
            + (f"; its checkpoint is at step {at}, so training stops at once" if past else "")
            + "; the learning-rate schedule follows the new length from here on (unlike a run started with it)")


def check_same_tracking_store(run: Run, uri: str) -> None:
    """A resumed run continues its MLflow run, which lives in the store it was started with."""
    started = json.loads(run.mlflow_file.read_text()).get("tracking_uri") if run.mlflow_file.is_file() else None
    if started and started != uri:
        raise TrackingUnavailable(
            f"cannot resume {run.dir}: its MLflow run is in {started}, but this session logs to {uri} "
            f"(logging.tracking_uri / MLFLOW_TRACKING_URI). Resume with logging.tracking_uri={started}, or delete "
            f"{run.mlflow_file} to continue in a new MLflow run there")


def resolve_init_from(value: str, runs_dir: str) -> Path:
    """``train.init_from``: a checkpoint, a run directory, or a run name (under any experiment) -> checkpoint."""
    path = Path(value)
    if not path.exists():
        matches = [d for d in Path(runs_dir).glob(f"*/{value}") if d.is_dir()]
        if len(matches) != 1:
            where = ", ".join(str(m) for m in matches) or "none"
            raise FileNotFoundError(f"train.init_from={value}: not a checkpoint path, and runs named so in {runs_dir}: {where}")
        path = matches[0]
    if (path / "checkpoints").is_dir():
        latest = ckpt.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"train.init_from={value}: run {path} has no complete checkpoint")
        return latest
    if path.is_dir() and not (path / ".metadata").is_file():  # an FSDP checkpoint folder has one
        raise FileNotFoundError(f"train.init_from={value}: {path} is a directory with no checkpoints/ (a run that "
                                "saved none?) and not a sharded checkpoint folder")
    return path


# --------------------------------------------------------------------------- MLflow
def run_tags(cfg: DictConfig) -> Dict[str, str]:
    m = cfg.model
    tags = {
        "stage": cfg.train.stage,
        "encoder": str(m.encoder.path or m.encoder.config.get("model_name") or m.encoder.name),
        "compressor": m.compressor.name,
        "C": str(m.compressor.grid),
        "depth": str(m.prefusion.depth),
        "llm": str(m.llm.path or m.llm.config.get("model_type") or m.llm.name),
    }
    tags.update({str(k): str(v) for k, v in cfg.logging.tags.items()})  # sweep_id and anything else the user adds
    return tags


def replace_abandoned_attempt(uri: str, run_id: str, run: Run) -> None:
    """A run that starts from scratch although an earlier attempt opened an MLflow run (it died before its
    first checkpoint, or its checkpoints were deleted) gets a new MLflow run: params are immutable, so the
    old one would show the old config, and its steps would hide the new ones. The old run is marked
    FAILED, tagged and soft-deleted (``mlflow runs restore --run-id ...`` brings it back)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "lm_mini.abandoned", "restarted from scratch; replaced by a new MLflow run")
        client.delete_run(run_id)
    except Exception as e:  # e.g. not in this store (the tracking URI changed): nothing to replace there
        rank_zero_warn(f"could not retire MLflow run {run_id} of an earlier attempt of {run.dir}: {e}")
    run.mlflow_file.unlink(missing_ok=True)
    run.pending_file.unlink(missing_ok=True)  # that attempt's unsent metrics
    print(f"lm-mini: {run.dir} starts from scratch; its earlier attempt's MLflow run {run_id} is replaced", flush=True)


def setup_tracking(cfg: DictConfig, run: Run) -> BufferedMLFlowLogger:
    """Rank 0's MLflow logger: it opens the MLflow run (params, tags and the config artifact) or, when resuming,
    reopens it and reads the steps it already has (logged once only). No other rank touches the store."""
    uri = tracking_uri(cfg)
    previous = json.loads(run.mlflow_file.read_text()) if run.mlflow_file.is_file() else {}
    run_id = previous.get("run_id")  # the MLflow run of an earlier session of this run
    stored: Dict[str, int] = {}
    if run_id is not None and run.resume_from is None:
        replace_abandoned_attempt(uri, run_id, run)
        run_id = None
    if run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        for name in client.get_run(run_id).data.metrics:  # each metric's last stored step
            stored[name] = max((m.step for m in client.get_metric_history(run_id, name)), default=-1)
        client.update_run(run_id, status="RUNNING")
    logger = BufferedMLFlowLogger(
        experiment_name=cfg.experiment, run_name=run.name, tracking_uri=uri, tags=run_tags(cfg), run_id=run_id,
        stored_steps=stored, pending_file=run.pending_file, flush_timeout=cfg.logging.flush_timeout_s,
    )
    if run_id is None:
        logger.log_hyperparams(flatten(cfg))
        logger.experiment.log_artifact(logger.run_id, str(run.dir / "config.yaml"))
        run.mlflow_file.write_text(json.dumps({"tracking_uri": uri, "run_id": logger.run_id, "experiment": cfg.experiment}))
    else:
        sent = logger.replay_pending()  # steps the run already has are skipped, like any re-logged step
        if sent:
            print(f"lm-mini: sent {sent} metric steps that an earlier session could not deliver")
    return logger


# --------------------------------------------------------------------------- trainer
def build_trainer(cfg: DictConfig, run: Run, logger: Any) -> tuple:
    t = cfg.train
    checkpoints = StepCheckpoint(str(run.checkpoints), t.checkpoint_every_n_steps, t.keep_last_k)
    preemption = PreemptionHandler(checkpoints)
    validate = t.val_every_n_steps is not None and len(cfg.data.val) > 0
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t),
        precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module places samples on ranks itself
        default_root_dir=str(run.dir),
        logger=logger,
        # The preemption save comes after every callback that logs the step (Lightning puts checkpoint
        # callbacks last), so the checkpoint carries all of its step's metrics.
        callbacks=[checkpoints, LearningRateMonitor(logging_interval="step"), ThroughputLogger(), SkippedSamplesLogger(),
                   preemption, CheckpointedMetrics(), PerRankLoaderState()],
        plugins=[ckpt.AtomicCheckpointIO(), *cluster_plugins()],
    )
    return trainer, preemption


# --------------------------------------------------------------------------- the stage
@dataclass
class TrainResult:
    run: Run
    preempted: bool = False
    global_step: int = 0
    eval: Dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    tracking_uri: str = ""
    trainer: Optional[L.Trainer] = None  # for programmatic use: trainer.lightning_module.model is the trained model
    skipped: Optional[Dict[str, int]] = None  # training samples skipped/altered per reason, all ranks (None: no batch ran)
    stopped_by: Optional[int] = None  # the signal that stopped a preempted run (as this rank received it)


def prepare_run(cfg: DictConfig, resume: Optional[str], check_data: bool) -> Tuple[Run, Optional[str]]:
    """Rank 0's set-up, before any training: every check that can refuse the run, then the run directory and its
    ``config.yaml``. Returns the run and the resolved ``train.init_from`` checkpoint (None: none, or resuming)."""
    check_tracking_server(tracking_uri(cfg), cfg.logging.connect_timeout_s)  # an unreachable server: an error before any work
    run = resolve_run(cfg, resume)
    if run.resume_from is not None:  # before anything of the run is touched
        check_resumable(run.dir / "config.yaml", cfg)
        check_same_tracking_store(run, tracking_uri(cfg))
        ckpt.verify_checkpoint(run.resume_from)  # a checkpoint that would run code is refused now, not at fit
    change = length_change(run.dir / "config.yaml", cfg, run.resume_from) if run.resume_from is not None else None
    if check_data:
        from lm_mini.data.datamodule import check_data_paths

        if not cfg.data.train:
            raise FileNotFoundError("data.train is empty: no shard set to train on")
        check_data_paths(cfg)  # a wrong path (or working directory) leaves no run behind
    from lm_mini.models.attention import check_model_backends

    check_model_backends(cfg.model, cfg.train.accelerator)  # an attention backend this machine cannot run, likewise
    # Checked before the run directory and MLflow run exist: a bad init_from leaves nothing behind.
    init_from = str(resolve_init_from(cfg.train.init_from, cfg.logging.runs_dir)) if cfg.train.init_from and run.resume_from is None else None
    if init_from is not None:
        ckpt.verify_checkpoint(init_from)
    if change:
        print(f"lm-mini: {change}", flush=True)
    run.dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_incomplete(run.checkpoints)  # leftovers of a save that was killed
    (run.dir / "config.yaml").write_text(to_yaml(cfg))
    return run, init_from


# A run stopped by a signal (preemption, Ctrl-C) after its checkpoint exits 128 + the signal's number, the shell's
# convention for "ended by that signal": non-zero, so `lm-mini train ... && lm-mini eval ...` does not evaluate an
# unfinished run, and a sweep tells it from a crash (1) or a user error (2).
STOPPED_EXIT_CODES = tuple(128 + int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))

# Errors that are the user's to fix (exit code 2, no traceback); anything else is a crash (1).
USER_ERRORS = (TrackingUnavailable, FileExistsError, FileNotFoundError, ResumeMismatch, LaunchError, UntrustedCheckpoint)


def _exit_code(error: BaseException) -> int:
    return 2 if isinstance(error, USER_ERRORS) else 1


def train(cfg: DictConfig, resume: Optional[str] = None, model_factory: Optional[Callable] = None,
          datamodule: Optional[L.LightningDataModule] = None) -> TrainResult:
    """Train one stage as ``cfg`` says; evaluate on ``data.val`` at the end (``train.eval_at_end``).

    Only rank 0 touches the tracking store and writes the run directory; under torchrun/srun the other ranks
    wait for its decisions (``training/distributed.py``). A rank lost mid-run raises :class:`LostRank`."""
    launch = detect_launch()
    check_launch(launch, cfg.train.num_nodes)
    heartbeat = None
    if launch.started_together:
        join_process_group(launch, cfg.train.accelerator, cfg.train.dist_timeout_s)
        heartbeat = Heartbeat(launch).start()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loggers: Dict[str, Any] = {}

    def set_up() -> Tuple[Run, Optional[str]]:  # rank 0
        run, init_from = prepare_run(cfg, resume, check_data=datamodule is None)
        loggers["rank0"] = setup_tracking(cfg, run)
        return run, init_from

    if launch.started_by_lightning:  # rank 0 set the run up before starting this process: find it as rank 0 did
        run = resolve_run(cfg, resume)
        init_from = str(resolve_init_from(cfg.train.init_from, cfg.logging.runs_dir)) if cfg.train.init_from and run.resume_from is None else None
    else:
        run, init_from = from_rank_zero(launch, set_up, _exit_code)
    logger = loggers.get("rank0") or OtherRankLogger(cfg.experiment)
    try:
        return _fit(cfg, run, init_from, logger, model_factory, datamodule)
    except BaseException as e:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launch.world_size
        # Lightning's launcher starts the other ranks inside fit: only now is the job's size known
        lost = lost_rank_message(replace(launch, world_size=world), heartbeat, e, cfg.train.dist_timeout_s) if world > 1 else None
        if lost is not None:
            raise LostRank(lost) from e
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()


class LostRank(RuntimeError):
    """A collective operation failed mid-run: another rank died or stopped answering."""


def _fit(cfg: DictConfig, run: Run, init_from: Optional[str], logger: Any, model_factory: Optional[Callable],
         datamodule: Optional[L.LightningDataModule]) -> TrainResult:
    previous_name = os.environ.get(RUN_NAME_ENV)
    try:  # from here on a failure (a precision Lightning refuses, a crash in fit) closes the MLflow run as FAILED
        module = LmMiniModule(cfg, model_factory=model_factory, init_from=init_from)
        if datamodule is None:
            from lm_mini.data.datamodule import build_datamodule

            datamodule = build_datamodule(cfg)
        trainer, preemption = build_trainer(cfg, run, logger)
        if rank_zero_only.rank == 0:
            print(f"lm-mini: run {run.dir}" + (f" (resuming {run.resume_from.name})" if run.resume_from else ""), flush=True)
        os.environ[RUN_NAME_ENV] = run.name  # the processes Lightning starts for DDP/FSDP join this run
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt.verified(run.resume_from), weights_only=not ckpt.checkpoints_trusted())
    except BaseException:
        logger.close("FAILED")
        raise
    finally:
        os.environ.pop(RUN_NAME_ENV, None) if previous_name is None else os.environ.update({RUN_NAME_ENV: previous_name})
    skipped = next(c.totals for c in trainer.callbacks if isinstance(c, SkippedSamplesLogger))
    result = TrainResult(run, preemption.preempted, trainer.global_step, tracking_uri=tracking_uri(cfg),
                         mlflow_run_id=logger.run_id if trainer.is_global_zero else None, trainer=trainer, skipped=skipped,
                         stopped_by=preemption.received)
    if preemption.preempted:
        if trainer.is_global_zero and preemption.received != signal.SIGINT and requeue_slurm_job():  # not a Ctrl-C
            print("lm-mini: SLURM job requeued", flush=True)
        logger.close("KILLED")
        # Every rank now exits non-zero, and srun --kill-on-bad-exit stops the job at the first: no rank may leave
        # before rank 0 has requeued the job and closed the MLflow run.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return result
    if cfg.train.eval_at_end and len(cfg.data.val) > 0:
        from lm_mini.eval.evaluate import evaluate, records_by_id, score_other_metrics

        records = records_by_id([v.path for v in cfg.data.val])  # read once: for the baseline and the scores
        result.eval = evaluate(trainer, module, datamodule, cfg, records)
        if trainer.is_global_zero:
            # next to eval/exact_match, so that lm-mini compare can draw the line a model must clear
            logger.log_metrics({"eval/majority_baseline": result.eval["majority_baseline"]}, step=trainer.global_step)
            score_other_metrics(result.eval, cfg, logger, trainer.global_step, records)
            (run.dir / "eval.json").write_text(json.dumps(result.eval, indent=2))
    if trainer.is_global_zero:
        final = ckpt.latest_checkpoint(run.checkpoints)
        run.finished_file.write_text(json.dumps({"checkpoint": final.name if final else None, "global_step": trainer.global_step,
                                                 "max_steps": cfg.train.max_steps, "max_epochs": cfg.train.max_epochs}))
    logger.close("FINISHED")
    return result


def _report(result: TrainResult) -> None:
    print(f"lm-mini: finished at step {result.global_step}; run directory {result.run.dir}")
    if result.skipped is not None:  # the data module's counts, as logged to MLflow (data/skipped/<reason>)
        print(f"lm-mini: training data: {describe_skips(result.skipped)}")
    if result.eval:
        e = result.eval
        print(f"lm-mini: held-out accuracy (exact match, greedy): {e['accuracy']:.3f} on {e['n']} samples; "
              f"majority-answer baseline: {e['majority_baseline']:.3f}")
        if e.get("scores"):
            shown = ", ".join(f"{k.removeprefix('all/')} {v:.3f}" for k, v in e["scores"].items() if k.startswith("all/") and k != "all/n")
            print(f"lm-mini: held-out scores: {shown}")
        if e.get("skipped"):
            print(f"lm-mini: held-out data: {describe_skips(e['skipped'])}")
    print(f"lm-mini: MLflow run {result.mlflow_run_id} in {result.tracking_uri} "
          f"(view: mlflow ui --backend-store-uri {result.tracking_uri})")


def cli_train(args: Any) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except USER_ERRORS as e:
        print(f"lm-mini: {e}", file=sys.stderr)
        return 2
    except StartFailed as e:  # another rank's copy of rank 0's error, which rank 0 prints in full
        print(f"lm-mini: rank {rank_zero_only.rank}: {e}", file=sys.stderr)
        return e.exit_code
    except LostRank as e:
        print(f"lm-mini: {e}", file=sys.stderr, flush=True)
        return 1
    if result.preempted:
        signum = result.stopped_by or signal.SIGTERM  # a rank the signal did not reach stopped with the others
        if rank_zero_only.rank == 0:
            print(f"lm-mini: stopped by a signal ({signal.Signals(signum).name}) at step {result.global_step}, before the "
                  f"run's end; continue with --resume auto (checkpoints in {result.run.checkpoints}); exit status "
                  f"{128 + int(signum)}", flush=True)
        return 128 + int(signum)
    if rank_zero_only.rank == 0:
        _report(result)
    return 0
