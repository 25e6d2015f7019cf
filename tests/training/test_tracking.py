"""BufferedMLFlowLogger without Lightning: what the store has not confirmed is kept in order (a checkpoint
carries it), exact repeats of a step's values are dropped, and a resumed run or a resend skips, metric by
metric, the steps the store already has."""
from mlflow import MlflowClient

from lm_mini.training.tracking import BufferedMLFlowLogger


def _logger(tmp_path, **kwargs):
    logger = BufferedMLFlowLogger(experiment_name="t", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", **kwargs)
    logger.experiment  # creates the MLflow run
    return logger


def _history(logger, name="train/loss"):
    return sorted((m.step, m.value) for m in MlflowClient(logger._tracking_uri).get_metric_history(logger.run_id, name))


def test_unconfirmed_metrics_are_kept_in_order_until_the_store_takes_them(tmp_path, monkeypatch):
    logger = _logger(tmp_path)
    send = BufferedMLFlowLogger._send

    def down(self, items):
        raise ConnectionError("store down")

    monkeypatch.setattr(BufferedMLFlowLogger, "_send", down)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": 0}, step=step)
    logger.log_metrics({"train/loss": 1.0 / 3, "epoch": 0}, step=2)  # an exact repeat: nothing new
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, step=2)  # a new value for the step is kept
    assert not logger.flush(timeout=0.3)
    assert [(m, s) for m, s, _ in logger.unconfirmed()] == [
        ({"train/loss": 1.0, "epoch": 0}, 0), ({"train/loss": 0.5, "epoch": 0}, 1),
        ({"train/loss": 1.0 / 3, "epoch": 0}, 2), ({"train/loss": 0.25}, 2)]

    monkeypatch.setattr(BufferedMLFlowLogger, "_send", send)
    assert logger.flush(timeout=30) and logger.unconfirmed() == []
    assert _history(logger) == [(0, 1.0), (1, 0.5), (2, 0.25), (2, 1.0 / 3)]


def test_a_resumed_run_drops_the_steps_each_metric_has_stored_but_not_the_final_eval(tmp_path):
    first = _logger(tmp_path)
    for step in range(3):
        first.log_metrics({"lr-AdamW/llm": 0.1}, step=step)  # the learning rate goes out before the step's loss
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.log_metrics({"lr-AdamW/llm": 0.1}, step=3)  # the job dies before step 3's loss is logged
    assert first.flush(timeout=30)

    stored = {"train/loss": 2, "lr-AdamW/llm": 3}  # what lm-mini train reads back from the run on resume
    resumed = _logger(tmp_path, run_id=first.run_id, stored_steps=stored)
    for step in range(2, 5):  # resumed from the checkpoint of step 2
        resumed.log_metrics({"lr-AdamW/llm": 0.1}, step=step)
        resumed.log_metrics({"train/loss": 1.0 / (step + 1), **({"eval/exact_match": 0.5} if step == 2 else {})}, step=step)
    assert resumed.flush(timeout=30)
    assert [s for s, _ in _history(resumed)] == [0, 1, 2, 3, 4]
    assert [s for s, _ in _history(resumed, "lr-AdamW/llm")] == [0, 1, 2, 3, 4]
    assert _history(resumed, "eval/exact_match") == [(2, 0.5)]


def test_resend_skips_the_steps_the_store_already_has(tmp_path):
    first = _logger(tmp_path)
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    assert first.flush(timeout=30)
    carried = [({"train/loss": 1.0}, 0, 1), ({"train/loss": 0.5}, 1, 2), ({"train/loss": 0.3}, 2, 3), ({"train/loss": 0.2}, 3, 4)]

    resumed = _logger(tmp_path, run_id=first.run_id, stored_steps={"train/loss": 1})
    assert resumed.resend(carried) == 2 and resumed.stored_steps == {"train/loss": 3}
    resumed.log_metrics({"train/loss": 0.3}, step=2)  # a re-executed step the resend delivered: dropped
    resumed.log_metrics({"train/loss": 0.1}, step=4)
    assert resumed.flush(timeout=30)
    assert _history(resumed) == [(0, 1.0), (1, 0.5), (2, 0.3), (3, 0.2), (4, 0.1)]


# ----------------------------------------------------------------------------- credentials of a tracking server
import base64  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def auth_server():
    """A /health endpoint behind basic auth (alice / s3cret), as an MLflow server behind an auth proxy."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"alice:s3cret").decode()
            self.send_response(200 if ok and self.path == "/health" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_tracking_server_behind_basic_auth_is_checked_with_mlflows_credentials_and_never_printed(auth_server, monkeypatch):
    from lm_mini.tracking_server import check_tracking_server
    from lm_mini.tracking_store import TrackingUnavailable

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    check_tracking_server(f"http://alice:s3cret@{auth_server}")  # user:password@ in the URI, as MLflow takes it
    with pytest.raises(TrackingUnavailable, match="HTTP 401 .credentials: MLFLOW_TRACKING_USERNAME") as info:
        check_tracking_server(f"http://alice:wrong@{auth_server}")
    assert "wrong" not in str(info.value) and "alice:***@" in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # MLflow's own variables
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    check_tracking_server(f"http://{auth_server}")


def test_a_tracking_uri_with_a_password_is_refused_in_the_config_and_kept_out_of_the_run_directory(tmp_path, monkeypatch):
    from lm_mini.config import ConfigError, load_config
    from lm_mini.runs import Run
    from lm_mini.tracking_server import how_to_view

    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") as info:
        load_config(None, ["logging.tracking_uri=http://alice:s3cret@host:5000"])
    assert "s3cret" not in str(info.value)
    # $MLFLOW_TRACKING_URI may hold it (MLflow accepts it): mlflow.json keeps the store without it, and a session
    # with the same variable reaches the run's store as it was
    run = Run.at(tmp_path / "r")
    run.dir.mkdir()
    run.mlflow_file.write_text(json.dumps({"tracking_uri": "http://host:5000", "run_id": "x"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@host:5000")
    assert run.mlflow_info()["tracking_uri"] == "http://alice:s3cret@host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert run.mlflow_info()["tracking_uri"] == "http://host:5000"
    assert how_to_view("http://alice:s3cret@host:5000/", "3", "abc") == "open http://alice:***@host:5000/#/experiments/3/runs/abc"
    assert how_to_view("sqlite:///m.db") == "mlflow ui --backend-store-uri sqlite:///m.db"


# ----------------------------------------------------------------------------- an unreachable store
def test_the_sender_makes_one_attempt_per_request_against_a_tracking_server(monkeypatch):
    """MLflow's client retries a request itself for ~2 minutes (7 retries, backoff factor 2); a sender inside such
    a call did not see the server come back, and the run ended with its metrics spilled. The sender retries with
    its own backoff, so each of its requests fails at once (here: nothing listens on the port)."""
    import concurrent.futures
    import socket
    import time

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # MLflow's defaults, as a user has them
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logger = BufferedMLFlowLogger(experiment_name="t", tracking_uri=f"http://127.0.0.1:{port}", run_id="0" * 32, flush_timeout=5)
    logger._initialized = True  # as setup_tracking leaves it: the run opened (no server here to open it on)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(logger._send, [({"train/loss": 1.0}, 0, 0)])
        with pytest.raises(Exception, match="127.0.0.1"):
            request.result(timeout=20)
        assert time.monotonic() - start < 5


def test_metrics_the_store_did_not_take_are_counted_in_steps_tagged_on_the_run_and_sent_at_close_if_it_is_back(tmp_path, monkeypatch):
    send = BufferedMLFlowLogger._send

    def down(self, items):
        raise ConnectionError("store down")

    def run_with_an_outage(name, back_at_close):
        monkeypatch.setattr(BufferedMLFlowLogger, "_send", down)
        logger = _logger(tmp_path, run_name=name, pending_file=tmp_path / name / "mlflow_pending.jsonl", flush_timeout=0.3)
        for step in range(3):  # two logging calls per step (the learning rate goes out before the loss)
            logger.log_metrics({"lr-AdamW/llm": 0.1}, step=step)
            logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        with pytest.warns(UserWarning, match=r"did not take 3 steps of metrics within logging.flush_timeout_s=0.3: written to"):
            logger.finalize("success")  # Lightning, at the end of fit
        assert len(logger.pending_file.read_text().splitlines()) == 6
        if back_at_close:
            monkeypatch.setattr(BufferedMLFlowLogger, "_send", send)
        logger.close("FINISHED")
        return logger, MlflowClient(logger._tracking_uri).get_run(logger.run_id)

    # the store takes metrics again by the time the run closes: the spilled steps are sent then, nothing is left
    logger, run = run_with_an_outage("back", back_at_close=True)
    assert logger.pending_steps == 0 and not logger.pending_file.exists()
    assert run.info.status == "FINISHED" and "lm_mini.pending_metrics" not in run.data.tags
    assert [s for s, _ in _history(logger)] == [0, 1, 2] and [s for s, _ in _history(logger, "lr-AdamW/llm")] == [0, 1, 2]
    # it does not: the run is not shown as complete without a word (it is marked, where the store answers, and tagged)
    logger, run = run_with_an_outage("still_down", back_at_close=False)
    assert logger.pending_steps == 3 and logger.marked and logger.pending_file.is_file()
    assert run.info.status == "FINISHED" and run.data.tags["lm_mini.pending_metrics"] == "3"
    assert _history(logger) == []


def test_opening_the_run_leaves_the_process_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """Lightning's MLFlowLogger sets MLFLOW_TRACKING_URI in os.environ (through mlflow.set_tracking_uri): a later
    compare or sweep in the same process read the previous run's store ("no experiment named ..."). Not any more."""
    import os

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    logger = _logger(tmp_path, run_name="r")
    assert logger.experiment is logger._mlflow_client and logger.run_id
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # the user's own choice is kept
    mlflow.set_tracking_uri("sqlite:///elsewhere.db")
    _logger(tmp_path, run_name="r2").experiment
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    mlflow.set_tracking_uri(None)
