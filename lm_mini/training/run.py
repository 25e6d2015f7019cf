"""Training one stage end to end (``lm-mini train CONFIG [key=value ...] [--resume auto|PATH]``): :func:`train`.

config -> run directory (``lm_mini.runs``: ``--resume``, ``train.init_from``) -> MLflow run (``tracking.py``) ->
``LmMiniModule`` + data module -> :func:`build_trainer` (strategy, callbacks, atomic checkpoints) -> ``fit`` ->
held-out evaluation (``lm_mini.eval.evaluate``) -> ``finished.json``. Under torchrun/srun rank 0 makes every
decision and the other ranks follow it (``distributed.py``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lm_mini.config import differences, flatten, read_saved_config, to_yaml, tracking_uri
from lm_mini.interop import checkpoint as ckpt
from lm_mini.quiet import quiet_libraries
from lm_mini.models.attention import AttentionBackendError
from lm_mini.runs import (RUN_NAME_ENV, Run, checkpoint_step, is_model_dir, latest_checkpoint, remove_incomplete,
                          resolve_init_from, resolve_run)
from lm_mini.training.checkpoint_io import AtomicCheckpointIO
from lm_mini.trust import UntrustedCheckpoint, checkpoints_trusted
from lm_mini.training.distributed import (Heartbeat, LaunchError, check_launch, check_same_config, detect_launch, from_rank_zero,
                                          join_process_group, lost_rank_message)
from lm_mini.training.callbacks import (PartsSummary, PerRankLoaderState, PreemptionHandler, SkippedSamplesLogger, StepCheckpoint,
                                       ThroughputLogger, requeue_slurm_job)
from lm_mini.training.module import LmMiniModule
from lm_mini.training.strategy import build_strategy, cluster_plugins
from lm_mini.tracking_server import check_tracking_server
from lm_mini.tracking_store import TrackingUnavailable, prepare_store
from lm_mini.training.tracking import CheckpointedMetrics, OtherRankLogger, check_same_tracking_store, setup_tracking

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resuming
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
    if not saved_config.is_file():
        return
    fixed = differences(read_saved_config(saved_config), cfg, ignore=RESUME_MAY_CHANGE)
    if fixed:
        changed = [f"{k}: {was!r} -> {now!r}" for k, was, now in fixed]
        raise ResumeMismatch(f"cannot resume {saved_config.parent}: its checkpoint was trained with another configuration ("
                             + "; ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
                             + "); a resumed run may change only " + ", ".join(RESUME_MAY_CHANGE)
                             + ". Use a new run_name, or train.init_from to start from its weights")


def length_change(saved_config: Path, cfg: DictConfig, resume_from: Path) -> Optional[str]:
    """What a resume changes about how long the run goes on (``train.max_steps`` / ``train.max_epochs``), said so
    that a run does not silently end earlier or later than it last ran to; None when nothing changes."""
    if not saved_config.is_file():
        return None
    saved = read_saved_config(saved_config).train
    changed = [f"train.{k} {saved[k]} -> {cfg.train[k]}" for k in ("max_steps", "max_epochs") if saved[k] != cfg.train[k]]
    if not changed:
        return None
    at = checkpoint_step(resume_from)
    steps, epochs = cfg.train.max_steps, cfg.train.max_epochs
    ends = " or ".join(([f"at step {steps}"] if steps and steps > 0 else []) + ([f"after epoch {epochs}"] if epochs and epochs > 0 else []))
    past = at is not None and steps is not None and 0 < steps <= at
    return (f"resuming {Path(resume_from).parent.parent} with {', '.join(changed)} (it last ran with max_steps "
            f"{saved.max_steps}, max_epochs {saved.max_epochs}): it now ends {ends or 'never'}"
            + (f"; its checkpoint is at step {at}, so training stops at once" if past else "")
            + "; the learning-rate schedule follows the new length from here on (unlike a run started with it)")


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
                   preemption, CheckpointedMetrics(), PerRankLoaderState(), PartsSummary()],
        enable_model_summary=False,  # PartsSummary says it in one line (Lightning's table reads 0 FLOPs)
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
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
    mlflow_experiment_id: Optional[str] = None
    tracking_uri: str = ""
    trainer: Optional[L.Trainer] = None  # for programmatic use: trainer.lightning_module.model is the trained model
    skipped: Optional[Dict[str, int]] = None  # training samples skipped/altered per reason, all ranks (None: no batch ran)
    stopped_by: Optional[int] = None  # the signal that stopped a preempted run (as this rank received it)
    pending_metrics: int = 0  # steps of metrics the tracking store did not take (in run.pending_file; sent on resume)
    mlflow_marked: bool = True  # the MLflow run got its final status (False: the store did not answer at the end)


def prepare_run(cfg: DictConfig, resume: Optional[str], check_data: bool) -> Tuple[Run, Optional[str]]:
    """Rank 0's set-up, before any training: every check that can refuse the run, then the run directory and its
    ``config.yaml``. Returns the run and the resolved ``train.init_from`` checkpoint (None: none, or resuming)."""
    check_tracking_server(tracking_uri(cfg), cfg.logging.connect_timeout_s)  # an unreachable server: an error before any work
    run = resolve_run(cfg, resume)
    if run.resume_from is not None:  # before anything of the run is touched
        check_resumable(run.config_file, cfg)
        check_same_tracking_store(run, tracking_uri(cfg))
        ckpt.verify_checkpoint(run.resume_from)  # a checkpoint that would run code is refused now, not at fit
    change = length_change(run.config_file, cfg, run.resume_from) if run.resume_from is not None else None
    if check_data:
        from lm_mini.data.datamodule import check_data_paths

        if not cfg.data.train:
            raise FileNotFoundError("data.train is empty: no shard set to train on")
        check_data_paths(cfg)  # a wrong path (or working directory) leaves no run behind
    from lm_mini.models.attention import check_model_backends

    check_model_backends(cfg.model, cfg.train.accelerator)  # an attention backend this machine cannot run, likewise
    # Checked before the run directory and MLflow run exist: a bad init_from leaves nothing behind.
    init_from = str(resolve_init_from(cfg.train.init_from, cfg.logging.runs_dir)) if cfg.train.init_from and run.resume_from is None else None
    if init_from is not None and not is_model_dir(init_from):  # a model directory's safetensors run no code
        ckpt.verify_checkpoint(init_from)
    if change:
        log.info("%s", change)
    # last of the checks, first of the writes: a broken SQLite store is refused, a new one is made whole
    # (lm_mini/tracking_store.py); a run refused above leaves no store behind either
    prepare_store(tracking_uri(cfg))
    run.dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(run.checkpoints)  # leftovers of a save that was killed
    run.config_file.write_text(to_yaml(cfg))
    return run, init_from


# A run stopped by a signal (preemption, Ctrl-C) after its checkpoint exits 128 + the signal's number, the shell's
# convention for "ended by that signal": non-zero, so `lm-mini train ... && lm-mini eval ...` does not evaluate an
# unfinished run, and a sweep tells it from a crash (1) or a user error (2).
STOPPED_EXIT_CODES = tuple(128 + int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))

# Errors that are the user's to fix (exit code 2, no traceback); anything else is a crash (1).
USER_ERRORS = (TrackingUnavailable, FileExistsError, FileNotFoundError, ResumeMismatch, LaunchError, UntrustedCheckpoint,
               AttentionBackendError)


def _exit_code(error: BaseException) -> int:
    return 2 if isinstance(error, USER_ERRORS) else 1


def train(cfg: DictConfig, resume: Optional[str] = None, model_factory: Optional[Callable] = None,
          datamodule: Optional[L.LightningDataModule] = None) -> TrainResult:
    """Train one stage as ``cfg`` says; evaluate on ``data.val`` at the end (``train.eval_at_end``).

    Only rank 0 touches the tracking store and writes the run directory; under torchrun/srun the other ranks
    wait for its decisions (``training/distributed.py``). A rank lost mid-run raises :class:`LostRank`."""
    quiet_libraries()
    launch = detect_launch()
    check_launch(launch, cfg.train)
    heartbeat = None
    if launch.started_together:
        join_process_group(launch, cfg.train.accelerator, cfg.train.dist_timeout_s)
        check_same_config(launch, flatten(cfg))
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
            log.info("run %s%s", run.dir, f" (resuming {run.resume_from.name})" if run.resume_from else "")
        os.environ[RUN_NAME_ENV] = run.name  # the processes Lightning starts for DDP/FSDP join this run
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt.verified(run.resume_from), weights_only=not checkpoints_trusted())
    except BaseException:
        logger.close("FAILED")
        raise
    finally:
        os.environ.pop(RUN_NAME_ENV, None) if previous_name is None else os.environ.update({RUN_NAME_ENV: previous_name})
    skipped = next(c.totals for c in trainer.callbacks if isinstance(c, SkippedSamplesLogger))
    result = TrainResult(run, preemption.preempted, trainer.global_step, tracking_uri=tracking_uri(cfg),
                         mlflow_run_id=logger.run_id if trainer.is_global_zero else None,
                         mlflow_experiment_id=getattr(logger, "experiment_id", None) if trainer.is_global_zero else None,
                         trainer=trainer, skipped=skipped,
                         stopped_by=preemption.received)
    if preemption.preempted:
        if trainer.is_global_zero and preemption.received != signal.SIGINT and requeue_slurm_job():  # not a Ctrl-C
            log.info("SLURM job requeued")
        logger.close("KILLED")
        # Every rank now exits non-zero, and srun --kill-on-bad-exit stops the job at the first: no rank may leave
        # before rank 0 has requeued the job and closed the MLflow run.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return result
    if cfg.train.eval_at_end and len(cfg.data.val) > 0:
        from lm_mini.eval.evaluate import evaluate, records_by_id, score_other_metrics

        from lm_mini.data.remote import RemoteOptions

        # read once (for the baseline and the scores), remote sets with the config's retries and cache as in training
        records = records_by_id([v.path for v in cfg.data.val], RemoteOptions.from_config(cfg.data.remote))
        result.eval = evaluate(trainer, module, datamodule, cfg, records)
        if trainer.is_global_zero:
            # next to eval/exact_match, so that lm-mini compare can draw the line a model must clear
            logger.log_metrics({"eval/majority_baseline": result.eval["majority_baseline"]}, step=trainer.global_step)
            score_other_metrics(result.eval, cfg, logger, trainer.global_step, records)
            run.eval_file.write_text(json.dumps(result.eval, indent=2))
    if trainer.is_global_zero:
        final = latest_checkpoint(run.checkpoints)
        run.finished_file.write_text(json.dumps({"checkpoint": final.name if final else None, "global_step": trainer.global_step,
                                                 "max_steps": cfg.train.max_steps, "max_epochs": cfg.train.max_epochs}))
    logger.close("FINISHED")
    result.pending_metrics, result.mlflow_marked = getattr(logger, "pending_steps", 0), getattr(logger, "marked", True)
    return result
