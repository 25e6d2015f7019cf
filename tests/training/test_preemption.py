"""Preemption through the real CLI on the demo shards: SIGTERM checkpoints and exits with status 143 (128 + SIGTERM,
Ctrl-C: 130), so that `train && eval` does not evaluate an unfinished run; a SIGKILL
at a random step plus ``--resume auto`` ends bit-identical to an uninterrupted run, with every step
once in the same MLflow run; a SIGKILL right after a checkpoint, with the tracking store lagging, loses
no metric; a kill in the middle of a checkpoint write leaves the previous one usable."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from training_helpers import PYTHON, ROOT, subprocess_env
from lm_mini import runs
from lm_mini.interop import checkpoint as ckpt

STEPS = 10
MICRO_DEMO = [  # the demo config, with a smaller model and short batches
    "model.encoder.config.num_hidden_layers=2", "model.llm.config.num_hidden_layers=2", "model.llm.config.hidden_size=64",
    "model.llm.config.intermediate_size=128", "model.prefusion.depth=1", "data.batch_size=4", "data.max_frames=2",
    f"train.max_steps={STEPS}", "train.checkpoint_every_n_steps=3", "train.keep_last_k=3", "train.log_every_n_steps=1",
    "train.eval_at_end=false",
]
# the module's loss, the callbacks' metrics (logged in on_train_batch_end) and the learning rate (logged before the step)
LOGGED_EVERY_STEP = ("train/loss", "perf/visual_tokens_per_sample", "data/skipped/corrupt_image", "lr-AdamW/llm")


def _cmd(tmp: Path, name: str, *extra: str):
    return [PYTHON, "-m", "lm_mini.cli", "train", "experiments/demo.yaml", *MICRO_DEMO, f"run_name={name}",
            f"logging.runs_dir={tmp / 'runs'}", f"logging.tracking_uri=sqlite:///{tmp / (name + '.db')}", *extra]


def _start(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "a")
    return subprocess.Popen(_cmd(tmp, name, *extra), cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _weights(path: Path):
    return ckpt.model_state_dict(ckpt.load_checkpoint(path))


def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = _start(tmp_path, "reference")  # runs alongside the interrupted one
    checkpoints = tmp_path / "runs" / "demo" / "job" / "checkpoints"

    # 1. SIGTERM (preemption): checkpoint at the next optimizer step, exit 128 + SIGTERM (not finished: not 0)
    job = _start(tmp_path, "job")
    _wait_for(checkpoints / runs.checkpoint_name(3), job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM == 143
    log = (tmp_path / "job.log").read_text()
    assert "received SIGTERM" in log and "stopped by a signal (SIGTERM)" in log and "exit status 143" in log
    assert not (checkpoints.parent / "finished.json").exists()
    stopped = runs.latest_checkpoint(checkpoints)
    step = ckpt.load_checkpoint(stopped)["global_step"]
    assert stopped.name == runs.checkpoint_name(step) and 3 < step < STEPS
    run_id = json.loads((checkpoints.parent / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'job.db'}")
    assert client.get_run(run_id).info.status == "KILLED"

    # 2. resume, then SIGKILL at a random moment after the next checkpoint
    job = _start(tmp_path, "job", "--resume", "auto")
    next_ckpt = 3 * (step // 3 + 1)
    if next_ckpt < STEPS:
        _wait_for(checkpoints / runs.checkpoint_name(next_ckpt), job)
        time.sleep(random.uniform(0.0, 1.0))
    job.kill()
    job.wait(timeout=60)

    # 3. resume to the end
    assert subprocess.run(_cmd(tmp_path, "job", "--resume", "auto"), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, timeout=400).returncode == 0
    assert reference.wait(timeout=400) == 0
    final = _weights(checkpoints / runs.checkpoint_name(STEPS))
    expected = _weights(tmp_path / "runs" / "demo" / "reference" / "checkpoints" / runs.checkpoint_name(STEPS))
    assert set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in expected)

    # one MLflow run, every step's loss exactly once
    assert json.loads((checkpoints.parent / "mlflow.json").read_text())["run_id"] == run_id
    assert len(client.search_runs([client.get_experiment_by_name("demo").experiment_id])) == 1
    for name in LOGGED_EVERY_STEP:
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(STEPS)), name
    assert client.get_run(run_id).info.status == "FINISHED"


def test_ctrl_c_checkpoints_at_the_next_step_with_loader_workers_and_the_run_resumes(tmp_path):
    checkpoints = tmp_path / "runs" / "demo" / "job" / "checkpoints"
    # with gradient accumulation the step boundary needs batches after the Ctrl-C: the workers must live on
    job = _start(tmp_path, "job", "data.num_workers=2", "train.accumulate_grad_batches=2")
    _wait_for(checkpoints / runs.checkpoint_name(3), job)
    job.send_signal(signal.SIGINT)
    for worker in _children(job.pid):  # a terminal's Ctrl-C reaches the whole process group
        os.kill(worker, signal.SIGINT)
    assert job.wait(timeout=120) == 128 + signal.SIGINT == 130
    log = (tmp_path / "job.log").read_text()
    assert "received SIGINT" in log and "Ctrl-C again to stop now" in log and "stopped by a signal" in log
    step = ckpt.load_checkpoint(runs.latest_checkpoint(checkpoints))["global_step"]
    assert 3 < step < STEPS
    run_id = json.loads((checkpoints.parent / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'job.db'}")
    assert client.get_run(run_id).info.status == "KILLED"
    assert subprocess.run(_cmd(tmp_path, "job", "data.num_workers=2", "train.accumulate_grad_batches=2", "--resume", "auto"),
                          cwd=ROOT, env=subprocess_env(),
                          capture_output=True, timeout=400).returncode == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(STEPS))


def _children(pid: int):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


_KILLED_AFTER_A_CHECKPOINT = """
import os, signal, sys, threading
from lm_mini.cli import main
from lm_mini.training import checkpoint_io, tracking

# The store stops confirming from step 3 on (a slow or hung server), and the job is SIGKILLed the
# moment the checkpoint of step 6 is complete: before Lightning has logged step 5 itself.
hang = threading.Event()
send = tracking.BufferedMLFlowLogger._send
def slow_send(self, items):
    stored = [item for item in items if item[1] < 3]
    send(self, stored)
    if len(stored) < len(items):
        hang.wait()
tracking.BufferedMLFlowLogger._send = slow_send
save = checkpoint_io.AtomicCheckpointIO.save_checkpoint
def save_then_die(self, state, path, storage_options=None):
    save(self, state, path, storage_options)
    if state["global_step"] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint_io.AtomicCheckpointIO.save_checkpoint = save_then_die
main(sys.argv[1:])
"""


def test_a_kill_right_after_a_checkpoint_loses_no_metric_the_store_had_not_confirmed(tmp_path):
    killed = subprocess.run([PYTHON, "-c", _KILLED_AFTER_A_CHECKPOINT, *_cmd(tmp_path, "job")[3:]], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    checkpoints = tmp_path / "runs" / "demo" / "job" / "checkpoints"
    assert runs.latest_checkpoint(checkpoints).name == runs.checkpoint_name(6)
    run_id = json.loads((checkpoints.parent / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'job.db'}")
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == {0, 1, 2}  # what the store had

    resumed = subprocess.run(_cmd(tmp_path, "job", "--resume", "auto"), cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "lm-mini: sending 3 steps of metrics that the interrupted session had not delivered" in resumed.stdout
    for name in LOGGED_EVERY_STEP:
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(STEPS)), name


_WRITER = """
import sys, torch
from lm_mini.training.checkpoint_io import AtomicCheckpointIO
io, folder = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, folder + "/step=00000001.ckpt")
print("first saved", flush=True)
io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(100_000_000)}}, folder + "/step=00000002.ckpt")
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_usable(tmp_path):
    writer = subprocess.Popen([PYTHON, "-c", _WRITER, str(tmp_path)], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "first saved"
    partial = tmp_path / (runs.checkpoint_name(2) + runs.TMP_SUFFIX)
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 1_000_000):  # killed while the big one is being written
        assert writer.poll() is None and time.monotonic() < deadline, "the write finished or never started"
        time.sleep(0.01)
    writer.kill()
    writer.wait()
    assert partial.exists() and not (tmp_path / runs.checkpoint_name(2)).exists()
    latest = runs.latest_checkpoint(tmp_path)
    assert latest.name == runs.checkpoint_name(1)
    assert torch.equal(ckpt.load_checkpoint(latest)["state_dict"]["w"], torch.ones(3))
    assert runs.remove_incomplete(tmp_path) == [partial] and not partial.exists()
