"""Against a real ``mlflow server`` on 127.0.0.1: params, tags, metric histories and the config artifact
read back with MlflowClient; a dead port fails fast and clearly; a server that dies mid-run does not
stop training, and the metrics it missed reach it when the run is resumed."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient

from training_helpers import PYTHON, ROOT, TinyData, subprocess_env, tiny_config
from lm_mini.cli import main as cli_main
from lm_mini.cli.train import report
from lm_mini.training.run import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` in its own process group (the server forks workers), stopped as a group."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.uri = folder, port, f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self) -> "Server":
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.folder, env=subprocess_env(), stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server not healthy after 120 s"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, _free_port()).start()
    yield srv
    srv.stop()


def test_params_tags_metrics_and_config_read_back_and_a_dead_server_mid_run_does_not_stop_training(tmp_path, server, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=12", f"logging.tracking_uri={server.uri}", "logging.tags.sweep_id=sw1")
    result = train(cfg, datamodule=TinyData(64))
    client = MlflowClient(server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.compressor.grid"] == "1"
    assert run.data.params["model.llm.config.hidden_size"] == "64"
    tags = run.data.tags
    assert (tags["stage"], tags["compressor"], tags["C"], tags["depth"], tags["sweep_id"]) == ("finetune", "query_attention", "1", "1", "sw1")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(12)) and losses[-1].value < losses[0].value
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr-AdamW/llm")] == list(range(12))
    assert run.data.metrics["data/skipped/corrupt_image"] == 1.0  # the data module's skip counter
    assert result.skipped == {"corrupt_image": 1}  # and what the end-of-run report prints
    report(result)
    assert "lm-mini: training data: skipped corrupt_image 1\n" in capsys.readouterr().out
    assert run.data.metrics["perf/visual_tokens_per_sample"] == 1.0  # C = 1, one image per sample
    assert "perf/samples_per_sec" in run.data.metrics and "perf/tokens_per_sec" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]

    # the server dies at step 4: training goes on to the end, the missed metrics are kept locally ...
    class KillServer(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                server.stop()

    cfg = tiny_config(tmp_path, "train.max_steps=10", f"logging.tracking_uri={server.uri}", "run_name=dies",
                      "logging.flush_timeout_s=3")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="did not take .* steps of metrics within logging.flush_timeout_s=3: written to"):
        result = train(cfg, datamodule=TinyDataWith(KillServer()))
    assert result.global_step == 10 and time.monotonic() - start < 150
    pending = result.run.dir / "mlflow_pending.jsonl"
    assert pending.is_file()

    # ... and sent when the run is resumed against the restarted server: every step exactly once
    server.start()
    train(cfg, resume="auto", datamodule=TinyData(64))
    assert not pending.exists()
    steps = [m.step for m in MlflowClient(server.uri).get_metric_history(result.mlflow_run_id, "train/loss")]
    assert sorted(steps) == list(range(10))


def test_a_run_restarted_from_scratch_gets_a_new_mlflow_run_with_its_own_params_and_steps(tmp_path):
    class Crash(L.Callback):  # the first attempt dies in step 1, before its first checkpoint (step 3)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("node lost")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="node lost"):
        train(tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every_n_steps=3"), datamodule=TinyDataWith(Crash()))
    run_dir = tmp_path / "runs" / "test" / "r"
    first = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(first, "train/loss")] == [0]

    # fixed and started again under the same name: a new MLflow run, with the new config and every step once
    result = train(tiny_config(tmp_path, "train.max_steps=4", "train.lr=1e-3"), resume="auto", datamodule=TinyData(64))
    assert result.mlflow_run_id != first and json.loads((run_dir / "mlflow.json").read_text())["run_id"] == result.mlflow_run_id
    new = client.get_run(result.mlflow_run_id)
    assert new.info.status == "FINISHED" and new.data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss")] == [0, 1, 2, 3]
    old = client.get_run(first)
    assert old.info.lifecycle_stage == "deleted" and "lm_mini.abandoned" in old.data.tags
    assert [r.info.run_id for r in client.search_runs([new.info.experiment_id])] == [result.mlflow_run_id]


class TinyDataWith(TinyData):
    """TinyData that also adds a callback to the trainer (the test's hook into the running fit)."""

    def __init__(self, callback):
        super().__init__(64)
        self.callback = callback

    def setup(self, stage):
        if self.callback not in self.trainer.callbacks:
            self.trainer.callbacks.append(self.callback)


def test_a_dead_tracking_server_fails_fast_with_a_clear_message(tmp_path, capsys):
    port = _free_port()
    start = time.monotonic()
    rc = cli_main(["train", str(ROOT / "experiments" / "demo.yaml"), f"logging.tracking_uri=http://127.0.0.1:{port}",
                   f"logging.runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - start < 15
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in err and "MLFLOW_TRACKING_URI" in err
    assert not (tmp_path / "runs").exists()  # nothing was started


# ----------------------------------------------------------------------------- a fresh SQLite store, interrupted
def _tables(db: Path) -> int:
    """How many tables the SQLite file has now (0 while it is locked or not there)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
        try:
            return con.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _kill_while_creating(cmd, folder: Path, name: str = "mlflow.db", **popen) -> None:
    """Start ``cmd`` and SIGKILL it (no clean-up runs) while it migrates a new store in ``folder``: once any
    file of the store there (``name``, or lm_mini's ``.<name>.tmp-<pid>``) has 20 of MLflow's ~65 tables."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 120
    try:
        while not any(_tables(f) >= 20 for f in [folder / name, *folder.glob(f".{name}.tmp-*")]):
            assert proc.poll() is None, "the process ended before it was caught creating the store"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(240)
def test_a_run_killed_while_it_creates_a_fresh_store_leaves_no_store_and_the_next_run_works(tmp_path):
    """MLflow migrates a new SQLite store in ~50 steps that SQLite cannot make one transaction; lm-mini train
    killed among them (preemption, Ctrl-C, torchrun ending rank 0) left a store that crashed every later run.
    Now the store is built beside its place and appears complete or not at all."""
    db = tmp_path / "mlflow.db"
    _kill_while_creating([PYTHON, "-m", "lm_mini.cli", "train", "experiments/demo.yaml", f"logging.tracking_uri=sqlite:///{db}",
                          f"logging.runs_dir={tmp_path / 'runs'}", "train.max_steps=1"], tmp_path, cwd=ROOT)
    assert not db.exists()
    leftovers = list(tmp_path.glob(".mlflow.db.tmp-*"))  # the killed process's half-built store (and its journal)
    assert any(_tables(f) >= 20 for f in leftovers)
    for f in leftovers:  # an hour later they are known to be abandoned
        os.utime(f, (time.time() - 3600, time.time() - 3600))

    result = train(tiny_config(tmp_path, "train.max_steps=2"), datamodule=TinyData(64))  # the same store, as a new job would
    run = MlflowClient(f"sqlite:///{db}").get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0
    assert not list(tmp_path.glob(".mlflow.db.tmp-*"))


@pytest.mark.timeout(240)
def test_a_store_left_half_created_is_refused_in_one_line_naming_the_file_to_delete(tmp_path, capsys):
    """A store an interrupted first run of an earlier version (or plain MLflow) left half-migrated: every command
    says what it is and what to delete, before anything is created (MLflow's traceback was 'table ... already
    exists' at every start)."""
    from lm_mini.eval.mlflow_scores import log_scores
    from lm_mini.sweeps.compare import read_runs
    from lm_mini.tracking_store import TrackingUnavailable

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    _kill_while_creating([PYTHON, "-c", f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments()"], tmp_path)
    assert 0 < _tables(db) < 60
    expected = f"{db} was left half-created by an interrupted first run"
    rc = cli_main(["train", str(ROOT / "experiments" / "demo.yaml"), f"logging.tracking_uri={uri}", f"logging.runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"lm-mini: {expected}") and err.count("\n") == 1, err
    assert f"holds no runs: delete it (rm {db}) and run again" in err
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made
    with pytest.raises(LookupError, match="left half-created"):
        read_runs("demo", tracking_uri=uri)
    with pytest.raises(TrackingUnavailable, match="left half-created"):
        log_scores({"run_id": "abc", "tracking_uri": uri}, {"eval/x": 1.0})
    db.unlink()  # as the message says: the next run makes a new store
    result = train(tiny_config(tmp_path, "train.max_steps=1"), datamodule=TinyData(64))
    assert MlflowClient(uri).get_run(result.mlflow_run_id).info.status == "FINISHED"
