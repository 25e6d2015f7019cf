"""MLflow: check the store before any work, then log without ever stalling training.

- ``check_tracking_server(uri)``: an ``http(s)`` tracking server must answer ``/health`` within
  ``logging.connect_timeout_s``, else :class:`TrackingUnavailable` with what to do about it. Local
  stores (``sqlite:///mlflow.db``, the default) need no server.
- :class:`BufferedMLFlowLogger`: Lightning's ``MLFlowLogger`` whose metric writes go through a queue
  and a background thread. If the server goes away mid-run, training does not wait: the thread keeps
  the metrics and retries; at the end it waits ``logging.flush_timeout_s`` and then writes what is
  still unsent to ``<run>/mlflow_pending.jsonl`` (with a warning); the next start of the run
  (``--resume auto``) sends that file first.
- Exactly once: a resumed run re-executes the steps after its checkpoint; metrics for steps the MLflow
  run already has are dropped (``skip_through_step``), so every step appears once in the history.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn


Item = Tuple[Dict[str, float], Optional[int], int]  # (metrics, step, timestamp in ms)
_METRIC_NAME = re.compile("[^a-zA-Z0-9_/. -]+")  # characters MLflow refuses in metric names (as Lightning strips them)


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before any work, when an ``http(s)`` tracking server is not reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is not reachable ({url}: {problem}). Start it "
        f"(mlflow server --host ... --port ...), fix MLFLOW_TRACKING_URI / logging.tracking_uri, "
        f"or unset both to log to the local store sqlite:///mlflow.db."
    )


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` with non-blocking metric writes, local fallback and exactly-once steps on resume."""

    def __init__(self, *args: Any, skip_through_step: int = -1, pending_file: Optional[Path] = None,
                 flush_timeout: float = 30.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_through_step = skip_through_step
        self.pending_file = Path(pending_file) if pending_file else None
        self.flush_timeout = flush_timeout
        self._queue: "queue.Queue[Item]" = queue.Queue()
        self._inflight: List[Item] = []
        self._worker: Optional[threading.Thread] = None
        self._closing = False
        self._warned = False
        self.status: Optional[str] = None

    # ------------------------------------------------------------------ writing
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if step is not None and step <= self.skip_through_step:
            # This step's training metrics are already in the run (logged before the job was interrupted);
            # the final evaluation's are not (the job may have died during it), so they go through.
            metrics = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            if not metrics:
                return
        self._queue.put((dict(metrics), step, int(time.time() * 1000)))
        if self._worker is None or not self._worker.is_alive():
            self._closing = False
            self._worker = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
            self._worker.start()

    def _send(self, items: List[Item]) -> None:
        """One ``log_batch`` request per 1000 values (MLflow's limit), names cleaned as Lightning does."""
        from mlflow.entities import Metric

        batch = [Metric(key=_METRIC_NAME.sub("", k), value=float(v), timestamp=ts, step=step or 0)
                 for metrics, step, ts in items for k, v in metrics.items() if not isinstance(v, str)]
        for i in range(0, len(batch), 1000):
            self._mlflow_client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def _send_loop(self) -> None:
        """Send whatever is queued, many steps per request; on failure keep it and retry with backoff."""
        backoff = 0.5
        while not self._closing:
            try:
                items = [self._queue.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(items) < 200:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._inflight = items
            while not self._closing:
                try:
                    self._send(items)
                    backoff = 0.5
                    break
                except Exception as e:  # any transport error: keep the metrics, retry later
                    if not self._warned:
                        rank_zero_warn(f"MLflow tracking store {self._tracking_uri} failed ({type(e).__name__}: "
                                       f"{str(e)[:200]}); training continues, metrics are kept and retried")
                        self._warned = True
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
            else:
                return  # closing: the in-flight items stay in self._inflight for the fallback file
            self._inflight = []
            for _ in items:
                self._queue.task_done()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued metric is sent; False if the store did not take them in time."""
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def _write_pending(self) -> int:
        """Stop the sender and append everything unsent to the pending file; returns the number of steps written."""
        self._closing = True
        if self._worker is not None:
            self._worker.join(timeout=1.0)
        items, self._inflight = list(self._inflight), []
        for _ in items:
            self._queue.task_done()
        while True:
            try:
                items.append(self._queue.get_nowait())
                self._queue.task_done()
            except queue.Empty:
                break
        if items and self.pending_file is not None:
            self.pending_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_file, "a") as f:
                for metrics, step, ts in items:
                    f.write(json.dumps({"step": step, "metrics": metrics, "timestamp": ts}) + "\n")
        return len(items)

    def replay_pending(self) -> int:
        """Send the metrics an earlier, disconnected session of this run wrote locally; returns how many steps."""
        if self.pending_file is None or not self.pending_file.is_file():
            return 0
        lines = [json.loads(line) for line in self.pending_file.read_text().splitlines() if line.strip()]
        sent = [e for e in lines if e["step"] is None or e["step"] > self.skip_through_step]
        self._send([(e["metrics"], e["step"], e["timestamp"]) for e in sent])
        # Steps the resumed training re-executes are now in the run: do not log them twice.
        self.skip_through_step = max([self.skip_through_step] + [e["step"] for e in sent if e["step"] is not None])
        self.pending_file.unlink()
        return len(sent)

    # ------------------------------------------------------------------ ending
    def _flush_or_spill(self) -> bool:
        if self.flush():
            return True
        n = self._write_pending()
        rank_zero_warn(f"MLflow tracking store {self._tracking_uri} unreachable: {n} metric steps written to "
                       f"{self.pending_file}; they are sent when this run is resumed (--resume auto)")
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
        """Flush and mark the MLflow run ``status`` (FINISHED, FAILED, KILLED) without waiting on a dead server."""
        if not self._initialized:
            return
        self.status = status
        if not self._flush_or_spill():
            return

        def terminate() -> None:
            try:
                self._mlflow_client.set_terminated(self.run_id, status)
            except Exception as e:
                rank_zero_warn(f"could not mark MLflow run {self.run_id} {status}: {e}")

        thread = threading.Thread(target=terminate, daemon=True)
        thread.start()
        thread.join(self.flush_timeout)
