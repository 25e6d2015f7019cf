"""MLflow during training: log without ever stalling training, every step once. (Checking a server before any
work and its HTTP calls: ``lm_mini.tracking_server``; opening and creating a store: ``lm_mini.tracking_store``.)

- :class:`BufferedMLFlowLogger`: Lightning's ``MLFlowLogger`` whose metric writes are sent by a
  background thread. If the server goes away mid-run, training does not wait: the thread keeps
  the metrics and retries with its own backoff (at most 10 s apart); its requests make one attempt each
  (:class:`ShortRequestClient`: MLflow's own policy retries one call for ~2 minutes), so metrics flow
  again as soon as the server is back. At the end it waits ``logging.flush_timeout_s`` and then writes
  what is still unsent to ``<run>/mlflow_pending.jsonl`` (with a warning); closing the run tries that
  file once more; what is still pending is counted in steps, tagged on the MLflow run
  (``lm_mini.pending_metrics``) and reported, and the next start of the run (``--resume auto``) sends
  it first.
- Exactly once: a resumed run re-executes the steps after its checkpoint; a metric's steps that the
  MLflow run already has are dropped (``stored_steps``: per metric, the last step stored; per metric,
  since a job can die between the learning rate and the loss of one step). Steps before the checkpoint that the store had
  not confirmed when the job was killed travel in the checkpoint (:class:`CheckpointedMetrics`) and
  are sent on resume, so every step appears once in the history.
- :func:`setup_tracking`: rank 0 opens the run's MLflow run (params = the flattened config, tags, the config
  artifact) or reopens it on resume; the run directory's ``mlflow.json`` names it. A new SQLite store is made
  whole or not at all (``lm_mini.tracking_store``, through which every command opens a store).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lm_mini.data.remote import redact, without_credentials
from lm_mini.runs import Run
from lm_mini.tracking_server import ShortRequestClient, is_server
from lm_mini.tracking_store import TrackingUnavailable, mlflow_client

log = logging.getLogger(__name__)

Item = Tuple[Dict[str, float], Optional[int], int]  # (metrics, step, timestamp in ms)
_METRIC_NAME = re.compile("[^a-zA-Z0-9_/. -]+")  # characters MLflow refuses in metric names (as Lightning strips them)


PENDING_TAG = "lm_mini.pending_metrics"  # on an MLflow run: how many steps of metrics wait in its run's pending file


def _steps(items: List[Item]) -> int:
    """How many steps ``items`` hold metrics of: the one unit every message about unsent metrics counts in."""
    return len({step for _, step, _ in items})


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` with non-blocking metric writes, local fallback and exactly-once steps on resume."""

    def __init__(self, *args: Any, stored_steps: Optional[Mapping[str, int]] = None, pending_file: Optional[Path] = None,
                 flush_timeout: float = 30.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stored_steps: Dict[str, int] = dict(stored_steps or {})  # metric name -> last step the run already has
        self.pending_file = Path(pending_file) if pending_file else None
        self.flush_timeout = flush_timeout
        # Metrics in logging order that the store has not confirmed yet. The sender removes a prefix only
        # once it is stored, so at any moment this list is exactly what a kill would lose (see unconfirmed()).
        self._unsent: List[Item] = []
        self._lock = threading.Condition()
        self._worker: Optional[threading.Thread] = None
        self._closing = False
        self._warned = False
        self._step_logged: Tuple[Optional[int], Dict[str, Any]] = (None, {})  # the latest step and what it logged
        self._short: Any = None
        self.status: Optional[str] = None
        self.pending_steps = 0  # at close: steps of metrics left in the pending file (reported, and tagged on the run)
        self.marked = False  # at close: the MLflow run got its status (and tag): the store answered

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """Lightning's, without its side effect on the process. ``MLFlowLogger`` calls ``mlflow.set_tracking_uri``,
        which also sets ``MLFLOW_TRACKING_URI`` in ``os.environ`` (for subprocesses): a later ``train()``, ``compare``
        or sweep in the same Python process (a notebook; a sweep's child runs inherit the environment) then used this
        run's store instead of its own. Everything here goes through ``MlflowClient(tracking_uri)``, never the global."""
        if self._initialized:
            return self._mlflow_client
        import mlflow

        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return MLFlowLogger.experiment.fget(self)
        finally:
            mlflow.set_tracking_uri(before)  # None: unset again, as it was

    @property
    def _sender(self) -> Any:
        """What the sender writes through: one-attempt requests to a tracking server (:class:`ShortRequestClient`,
        ``logging.flush_timeout_s`` at most each); MLflow's client for a local store."""
        if self._short is None:
            uri = self._tracking_uri
            self._short = (ShortRequestClient(uri, max(1.0, self.flush_timeout)) if is_server(uri)
                           else self._mlflow_client)
        return self._short

    # ------------------------------------------------------------------ writing
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        metrics = self._not_stored(metrics, step)  # a resumed run re-executes steps the run already has
        # A step checkpoint hands its step's metrics over before Lightning does (CheckpointedMetrics):
        # values this step already has are repeats and carry nothing new.
        if step is None or step != self._step_logged[0]:
            self._step_logged = (step, {})
        seen = self._step_logged[1]
        metrics = {k: v for k, v in metrics.items() if k not in seen or repr(seen[k]) != repr(v)}
        if not metrics:
            return
        seen.update(metrics)
        self._enqueue([(dict(metrics), step, int(time.time() * 1000))])

    def _not_stored(self, metrics: Mapping[str, Any], step: Optional[int]) -> Dict[str, Any]:
        if step is None:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if step > self.stored_steps.get(_METRIC_NAME.sub("", k), -1)}

    def _take_unstored(self, items: List[Item]) -> List[Item]:
        """The parts of an earlier session's ``items`` the run does not have yet; from now on they count as
        stored, so the steps the resumed training re-executes do not log them twice."""
        items = [(m, step, ts) for m, step, ts in ((self._not_stored(m, s), s, ts) for m, s, ts in items) if m]
        for metrics, step, _ in items:
            if step is not None:
                for name in (_METRIC_NAME.sub("", k) for k in metrics):
                    self.stored_steps[name] = max(step, self.stored_steps.get(name, -1))
        return items

    def _enqueue(self, items: List[Item]) -> None:
        with self._lock:
            self._unsent.extend(items)
            self._closing = False
            self._lock.notify_all()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
                self._worker.start()

    def _send(self, items: List[Item]) -> None:
        """One ``log_batch`` request per 1000 values (MLflow's limit), names cleaned as Lightning does."""
        from mlflow.entities import Metric

        batch = [Metric(key=_METRIC_NAME.sub("", k), value=float(v), timestamp=ts, step=step or 0)
                 for metrics, step, ts in items for k, v in metrics.items() if not isinstance(v, str)]
        for i in range(0, len(batch), 1000):
            self._sender.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def _send_loop(self) -> None:
        """Send what is unsent, many steps per request, oldest first; on failure keep it and retry with backoff.

        A sender that was replaced (``_write_pending`` gave up on it while a request hung) leaves the
        list alone when its request finally returns."""
        me, backoff, failing = threading.current_thread(), 0.5, False
        while True:
            with self._lock:
                while not self._unsent and not self._closing and self._worker is me:
                    self._lock.wait(0.5)
                if self._closing or self._worker is not me:
                    return
                items = self._unsent[:200]
            try:
                self._send(items)
            except Exception as e:  # any transport error: keep the metrics, retry later
                if not self._warned:
                    rank_zero_warn(f"MLflow tracking store {redact(self._tracking_uri)} failed ({type(e).__name__}: "
                                   f"{str(e)[:200]}); training continues, metrics are kept and retried")
                    self._warned = True
                failing = True
                with self._lock:
                    self._lock.wait(backoff)  # woken early by closing
                backoff = min(backoff * 2, 10.0)
                continue
            if failing:
                log.info("MLflow tracking store %s takes metrics again", redact(self._tracking_uri))
            backoff, failing = 0.5, False
            with self._lock:
                if self._worker is not me:
                    return
                del self._unsent[:len(items)]
                self._lock.notify_all()  # flush() waits for an empty list

    def unconfirmed(self) -> List[Item]:
        """The metrics logged so far that the store has not confirmed, oldest first (a checkpoint carries them)."""
        with self._lock:
            return list(self._unsent)

    def resend(self, items: List[Item]) -> int:
        """Log again what an earlier session of this run had not got into the store (its checkpoint's
        ``unconfirmed()``); steps the store already has are left out. Returns how many steps are re-sent."""
        items = self._take_unstored(items)
        if items:
            self._enqueue(items)
        return _steps(items)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every logged metric is stored; False if the store did not take them in time."""
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        with self._lock:
            while self._unsent and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(min(left, 0.5))
            return not self._unsent

    def _write_pending(self) -> int:
        """Stop the sender and append everything unsent to the pending file; returns how many steps it holds metrics of."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout=1.0)
        with self._lock:
            self._worker = None  # a sender still hanging in a request drops its result (see _send_loop)
            items, self._unsent = self._unsent, []
        if items and self.pending_file is not None:
            self.pending_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_file, "a") as f:
                for metrics, step, ts in items:
                    f.write(json.dumps({"step": step, "metrics": metrics, "timestamp": ts}) + "\n")
        return _steps(items)

    def _read_pending(self) -> List[Item]:
        if self.pending_file is None or not self.pending_file.is_file():
            return []
        lines = [json.loads(line) for line in self.pending_file.read_text().splitlines() if line.strip()]
        return [(e["metrics"], e["step"], e["timestamp"]) for e in lines]

    def replay_pending(self) -> int:
        """Send the metrics that a session of this run could not deliver and wrote locally (an earlier one's, on
        resume; this one's, at close); returns how many steps. Raises if the store does not take them."""
        items = self._read_pending()
        if not items:
            return 0
        items = self._take_unstored(items)
        self._send(items)
        self.pending_file.unlink()
        return _steps(items)

    # ------------------------------------------------------------------ ending
    def _flush_or_spill(self) -> bool:
        if self.flush():
            return True
        n = self._write_pending()
        rank_zero_warn(f"MLflow tracking store {redact(self._tracking_uri)} did not take {n} steps of metrics within "
                       f"logging.flush_timeout_s={self.flush_timeout:g}: written to {self.pending_file}; they are tried "
                       "again when the run closes, else sent when it is resumed (--resume auto)")
        return False

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Lightning calls this when fit ends: flush (bounded wait). ``close`` ends the MLflow run."""
        if not self._initialized:
            return
        if status not in ("success", "finished"):
            self.close("FAILED")
        else:
            self._flush_or_spill()

    @rank_zero_only
    def close(self, status: str = "FINISHED") -> None:
        """Flush, try the pending file once more, and mark the MLflow run ``status`` (FINISHED, FAILED, KILLED),
        tagged ``lm_mini.pending_metrics=N`` when N steps of metrics are still pending (``pending_steps``): a run
        is never shown as complete while its metrics wait on this machine. Does not wait on a dead server."""
        if not self._initialized:
            return
        self.status = status
        self._flush_or_spill()

        def terminate() -> None:
            try:
                sent = self.replay_pending()  # the store may be back by now
                if sent:
                    log.info("sent %d steps of metrics that had been written to %s", sent, self.pending_file)
            except Exception as e:  # still not taken: they stay in the file
                log.debug("pending metrics not sent at close: %s", e)
            self.pending_steps = _steps(self._read_pending())
            try:
                if self.pending_steps:
                    self._sender.set_tag(self.run_id, PENDING_TAG, self.pending_steps)
                self._sender.set_terminated(self.run_id, status)
                self.marked = True
            except Exception as e:
                rank_zero_warn(f"could not mark MLflow run {self.run_id} {status}: {type(e).__name__}: {str(e)[:200]}")

        thread = threading.Thread(target=terminate, daemon=True)
        thread.start()
        thread.join(max(self.flush_timeout, 1.0) * 3)  # a few requests of at most flush_timeout each
        if thread.is_alive():  # counted from the file, whatever the thread has reached
            self.pending_steps = _steps(self._read_pending())


class OtherRankLogger(Logger):
    """The logger of every rank but 0: Lightning logs from rank 0 only, so the others need a logger that never
    opens the tracking store (an ``MLFlowLogger`` creates its client, and a fresh store's tables, when built)."""

    def __init__(self, experiment_name: str):
        super().__init__()
        self._name = experiment_name

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    run_id = None


class CheckpointedMetrics(Callback):
    """Every checkpoint carries the metrics the tracking store has not confirmed; a resume sends them.

    Without it, a job killed right after writing the checkpoint of step N loses the metrics that the
    sender thread had not delivered yet, and always those of step N-1: Lightning hands a step's
    metrics to the logger only after ``on_train_batch_end``, where step checkpoints are written. So a
    checkpoint taken there first hands this step's metrics over (Lightning's own repeat of them is
    dropped by the logger), then stores ``logger.unconfirmed()``.
    """

    KEY = "lm_mini_unconfirmed_metrics"

    def __init__(self) -> None:
        self._step_not_logged = False  # between a batch's start and Lightning logging its metrics

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._step_not_logged = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._step_not_logged = False  # the last step's metrics are logged by now (as at train end)

    on_train_end = on_train_epoch_end

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        logger = trainer.logger
        if not isinstance(logger, BufferedMLFlowLogger):
            return
        if self._step_not_logged:
            # Lightning's own call for this step (it only logs every log_every_n_steps, and not mid
            # gradient accumulation), made early; private, so tests/training pin its effect.
            trainer._logger_connector.update_train_step_metrics()
            self._step_not_logged = False
        # plain floats: a value logged as numpy would make the checkpoint unreadable by torch.load(weights_only=True)
        checkpoint[self.KEY] = [({k: float(v) for k, v in m.items()}, step, ts) for m, step, ts in logger.unconfirmed()] if trainer.is_global_zero else []

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        logger = trainer.logger
        if isinstance(logger, BufferedMLFlowLogger) and trainer.is_global_zero:
            sent = logger.resend([tuple(item) for item in checkpoint.get(self.KEY, [])])
            if sent:
                log.info("sending %d steps of metrics that the interrupted session had not delivered", sent)


# --------------------------------------------------------------------------- the run's MLflow run
def run_tags(cfg: Any) -> Dict[str, str]:
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


def check_same_tracking_store(run: Run, uri: str) -> None:
    """A resumed run continues its MLflow run, which lives in the store it was started with."""
    started = run.mlflow_info().get("tracking_uri")
    if started and without_credentials(started) != without_credentials(uri):
        raise TrackingUnavailable(
            f"cannot resume {run.dir}: its MLflow run is in {redact(started)}, but this session logs to {redact(uri)} "
            f"(logging.tracking_uri / MLFLOW_TRACKING_URI). Resume with logging.tracking_uri={started}, or delete "
            f"{run.mlflow_file} to continue in a new MLflow run there")


def replace_abandoned_attempt(uri: str, run_id: str, run: Run) -> None:
    """A run that starts from scratch although an earlier attempt opened an MLflow run (it died before its
    first checkpoint, or its checkpoints were deleted) gets a new MLflow run: params are immutable, so the
    old one would show the old config, and its steps would hide the new ones. The old run is marked
    FAILED, tagged and soft-deleted (``mlflow runs restore --run-id ...`` brings it back)."""
    client = mlflow_client(uri)
    try:
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "lm_mini.abandoned", "restarted from scratch; replaced by a new MLflow run")
        client.delete_run(run_id)
    except Exception as e:  # e.g. not in this store (the tracking URI changed): nothing to replace there
        rank_zero_warn(f"could not retire MLflow run {run_id} of an earlier attempt of {run.dir}: {e}")
    run.mlflow_file.unlink(missing_ok=True)
    run.pending_file.unlink(missing_ok=True)  # that attempt's unsent metrics
    log.info("%s starts from scratch; its earlier attempt's MLflow run %s is replaced", run.dir, run_id)


def setup_tracking(cfg: Any, run: Run) -> BufferedMLFlowLogger:
    """Rank 0's MLflow logger: it opens the MLflow run (params, tags and the config artifact) or, when resuming,
    reopens it and reads the steps it already has (logged once only). No other rank touches the store."""
    from lm_mini.config import flatten, tracking_uri

    uri = tracking_uri(cfg)
    client = mlflow_client(uri, create=True)  # a new SQLite store is made whole or not at all
    run_id = run.mlflow_info().get("run_id")  # the MLflow run of an earlier session of this run
    stored: Dict[str, int] = {}
    if run_id is not None and run.resume_from is None:
        replace_abandoned_attempt(uri, run_id, run)
        run_id = None
    pending_tag = False
    if run_id is not None:
        earlier = client.get_run(run_id)
        for name in earlier.data.metrics:  # each metric's last stored step
            stored[name] = max((m.step for m in client.get_metric_history(run_id, name)), default=-1)
        pending_tag = PENDING_TAG in earlier.data.tags
        client.update_run(run_id, status="RUNNING")
    logger = BufferedMLFlowLogger(
        experiment_name=cfg.experiment, run_name=run.name, tracking_uri=uri, tags=run_tags(cfg), run_id=run_id,
        stored_steps=stored, pending_file=run.pending_file, flush_timeout=cfg.logging.flush_timeout_s,
    )
    if run_id is None:
        logger.log_hyperparams(flatten(cfg))
        logger.experiment.log_artifact(logger.run_id, str(run.config_file))
        # a password in $MLFLOW_TRACKING_URI stays out of files
        run.mlflow_file.write_text(json.dumps({"tracking_uri": without_credentials(uri), "run_id": logger.run_id,
                                               "experiment": cfg.experiment}))
    else:
        sent = logger.replay_pending()  # steps the run already has are skipped, like any re-logged step
        if sent:
            log.info("sent %d steps of metrics that an earlier session could not deliver", sent)
        if pending_tag:  # delivered: the run no longer waits on this machine
            client.delete_tag(run_id, PENDING_TAG)
    return logger
