"""torchrun starts every rank at once, each running ``lm-mini train``, against a fresh MLflow store.

Only rank 0 creates the store, the MLflow run and the run directory; the others take its decisions. A rank
that dies (SIGKILL) or hangs (SIGSTOP) makes the others exit within ``train.dist_timeout_s``, naming it, and
``--resume auto`` continues the run: bit-identical to an uninterrupted one, every step once in one MLflow run.
"""
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
import torch
from mlflow import MlflowClient

from training_helpers import PYTHON, ROOT, subprocess_env
from lm_mini.runs import checkpoint_name, latest_checkpoint
from lm_mini.interop import checkpoint as ckpt

SCRIPT = Path(__file__).with_name("cluster_train.py")
STEPS = 8
SETTINGS = [  # the demo config with a smaller model and short batches
    "experiments/demo.yaml", "model.encoder.config.num_hidden_layers=2", "model.llm.config.num_hidden_layers=2",
    "data.batch_size=4", f"train.max_steps={STEPS}", "train.checkpoint_every_n_steps=2", "train.keep_last_k=10",
    "train.log_every_n_steps=1", "train.eval_at_end=false", "run_name=job",
]
pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp: Path, launch: List[str], overrides: List[str], log: str, fault: str = "") -> subprocess.Popen:
    cmd = [PYTHON, "-m", "torch.distributed.run", *launch, str(SCRIPT), "train", *SETTINGS,
           f"logging.runs_dir={tmp / 'runs'}", f"logging.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *overrides]
    env = subprocess_env(**({"LM_MINI_TEST_FAULT": fault} if fault else {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp / log, "a"), stderr=subprocess.STDOUT)


def _one_node(tmp: Path, overrides: List[str], log: str, fault: str = "") -> subprocess.Popen:
    launch = ["--standalone", "--nproc_per_node=2"]
    return _torchrun(tmp, launch, ["train.strategy=ddp", "train.devices=2", *overrides], log, fault)


def _two_nodes(tmp: Path, overrides: List[str], log: str, fault: str = "") -> List[subprocess.Popen]:
    port = _free_port()
    return [_torchrun(tmp, ["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                            f"--master_port={port}"], ["train.strategy=fsdp", "train.num_nodes=2", *overrides], f"{log}{n}", fault)
            for n in (0, 1)]


def _run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "demo" / "job"


def _weights(path: Path):
    return ckpt.model_state_dict(ckpt.load_checkpoint(path))


def _check_one_mlflow_run_with_every_step_once(tmp: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1
    run_id = json.loads((_run_dir(tmp) / "mlflow.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
    for name in ("train/loss", "lr-AdamW/llm"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(STEPS)), name


def test_torchrun_ddp_on_a_fresh_store_a_lost_rank_stops_the_job_and_resume_matches_an_uninterrupted_run(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir(), interrupted.mkdir()
    # the uninterrupted run also evaluates at the end, every rank its share: eval.json and every eval.metrics score
    # cover both ranks' predictions
    straight = _one_node(reference, ["train.eval_at_end=true", "eval.max_samples=15", "eval.batch_size=4", "eval.max_new_tokens=2",
                                     "eval.metrics=[exact_match,vqa_accuracy]"], "log")
    # rank 1 dies after step 3 (the checkpoint of step 2 is complete); torchrun stops rank 0
    job = _one_node(interrupted, [], "log", fault="1:3:kill")
    assert job.wait(timeout=300) != 0
    log = (interrupted / "log").read_text()
    assert "table runs already exists" not in log and "duplicate column" not in log
    assert latest_checkpoint(_run_dir(interrupted) / "checkpoints") is not None

    resumed = _one_node(interrupted, ["--resume", "auto"], "log")
    assert resumed.wait(timeout=300) == 0, (interrupted / "log").read_text()[-3000:]
    assert straight.wait(timeout=300) == 0, (reference / "log").read_text()[-3000:]
    assert "resuming step=" in (interrupted / "log").read_text()
    final = _weights(_run_dir(interrupted) / "checkpoints" / checkpoint_name(STEPS))
    expected = _weights(_run_dir(reference) / "checkpoints" / checkpoint_name(STEPS))
    assert set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in expected)
    for tmp in (reference, interrupted):
        _check_one_mlflow_run_with_every_step_once(tmp)
    evaluated = json.loads((_run_dir(reference) / "eval.json").read_text())
    assert evaluated["n"] == len(evaluated["predictions"]) == 15 and len({p["id"] for p in evaluated["predictions"]}) == 15
    assert evaluated["scores"]["all/n"] == 15 and 0.0 <= evaluated["scores"]["all/vqa_accuracy"] <= 1.0


def test_torchrun_two_nodes_fsdp_a_hung_rank_fails_the_other_within_the_timeout_and_resume_finishes(tmp_path):
    timeout = 15
    nodes = _two_nodes(tmp_path, [f"train.dist_timeout_s={timeout}"], "node", fault="1:3:hang")
    checkpoints = _run_dir(tmp_path) / "checkpoints"
    deadline = time.monotonic() + 300
    while latest_checkpoint(checkpoints) is None or latest_checkpoint(checkpoints).name < checkpoint_name(2):
        assert nodes[0].poll() is None and time.monotonic() < deadline, (tmp_path / "node0").read_text()[-3000:]
        time.sleep(0.2)
    # rank 1 stops itself right after step 3; rank 0's next collective waits at most `timeout` seconds
    try:
        started = time.monotonic()
        assert nodes[0].wait(timeout=timeout + 60) != 0
        waited = time.monotonic() - started
    finally:
        subprocess.run(["pkill", "-KILL", "-f", f"logging.runs_dir={tmp_path / 'runs'}"])
        nodes[1].wait(timeout=60)
    log = (tmp_path / "node0").read_text()
    assert "rank 0 of 2: a collective operation failed: rank 1 died or stopped responding" in log, log[-3000:]
    assert f"train.dist_timeout_s={timeout}" in log and "--resume auto" in log
    assert waited < timeout + 45  # the timeout, the check for silent ranks, and the process's exit

    # the same job, resumed on the store it created: it finishes from its last checkpoint
    nodes = _two_nodes(tmp_path, [f"train.dist_timeout_s={timeout}", "--resume", "auto"], "resumed")
    for n, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"resumed{n}").read_text()[-3000:]
    assert "resuming step=" in (tmp_path / "resumed0").read_text()
    final = latest_checkpoint(checkpoints)
    assert final.name == checkpoint_name(STEPS) and final.is_dir()  # sharded: a folder
    _check_one_mlflow_run_with_every_step_once(tmp_path)


def test_a_failure_of_rank_0_at_start_stops_every_rank_with_its_reason(tmp_path):
    """A bad init_from on a fresh two-node job: rank 0's error reaches rank 1, nobody hangs, nothing is created."""
    nodes = _two_nodes(tmp_path, ["train.init_from=no-such-run", "train.dist_timeout_s=120"], "node")
    assert [node.wait(timeout=100) for node in nodes] == [1, 1]  # torchrun's exit code for any failed worker
    assert "lm-mini: train.init_from=no-such-run: not a checkpoint path" in (tmp_path / "node0").read_text()
    assert "lm-mini: rank 1: rank 0 could not start the run (FileNotFoundError: train.init_from=no-such-run" in (
        tmp_path / "node1").read_text()
    assert not _run_dir(tmp_path).exists() and not (tmp_path / "mlflow.db").exists()


def test_srun_tasks_of_a_slurm_job_share_one_run_named_after_the_job(tmp_path):
    """What tools/slurm/train.sbatch does: srun starts one `lm-mini train` per GPU, each with SLURM's variables
    (here two tasks on this machine, SLURM's environment faked) on a fresh store."""
    settings = [s for s in SETTINGS if not s.startswith("run_name=")]
    cmd = [PYTHON, "-m", "lm_mini.cli", "train", *settings, "train.strategy=ddp", "train.devices=2",
           f"logging.runs_dir={tmp_path / 'runs'}", f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--resume", "auto"]
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lm-mini", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}
    tasks = [subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=open(tmp_path / f"task{r}", "w"), stderr=subprocess.STDOUT) for r in (0, 1)]
    for r, task in enumerate(tasks):
        assert task.wait(timeout=300) == 0, (tmp_path / f"task{r}").read_text()[-3000:]
    run_dir = tmp_path / "runs" / "demo" / "finetune-slurm4242"
    assert latest_checkpoint(run_dir / "checkpoints").name == checkpoint_name(STEPS)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert [r.info.run_name for r in runs] == ["finetune-slurm4242"]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == list(range(STEPS))


class _Heartbeat:
    def __init__(self, silent):
        self._silent = silent

    def silent_ranks(self):
        return self._silent


@pytest.mark.timeout(60)
def test_the_lost_rank_message_names_the_silent_rank_or_says_it_is_this_ranks_own_failure():
    from lm_mini.training.distributed import Launch, lost_rank_message

    launch = Launch("torchrun", 0, 4, 0)
    error = RuntimeError("Application timeout caused pair closure\nmore")
    message = lost_rank_message(launch, _Heartbeat([2, 3]), error, 30)
    assert message.startswith("rank 0 of 4: a collective operation failed: ranks 2, 3 died or stopped responding")
    assert "train.dist_timeout_s=30" in message and "RuntimeError: Application timeout" in message and "more" not in message
    assert "rendezvous store" in lost_rank_message(Launch("srun", 1, 2, 1), _Heartbeat(None), error, 30)
    assert lost_rank_message(launch, _Heartbeat([]), error, 30) is None  # every other rank alive: this rank's own failure
    assert lost_rank_message(launch, _Heartbeat([1]), KeyboardInterrupt(), 30) is None
    # Lightning's launcher (no heartbeats): only errors a lost peer causes count
    lightning = Launch("lightning", 0, 2, 0)
    assert "another rank died" in lost_rank_message(lightning, None, RuntimeError("Connection closed by peer [127.0.0.1]:1"), 30)
    assert lost_rank_message(lightning, None, ValueError("shapes do not match"), 30) is None


def test_ranks_given_different_configurations_stop_at_start_naming_the_keys(tmp_path):
    """Each rank of a torchrun job runs its own command line: another batch size on one node is refused on both."""
    port = _free_port()
    nodes = [_torchrun(tmp_path, ["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                                  f"--master_port={port}"],
                       ["train.strategy=ddp", "train.num_nodes=2", f"data.batch_size={4 if n == 0 else 2}"], f"node{n}")
             for n in (0, 1)]
    assert [node.wait(timeout=200) for node in nodes] == [1, 1]
    for n in (0, 1):
        assert (f"lm-mini: rank {n}: the ranks of this torchrun job were given different configurations "
                "(data.batch_size: 4 on rank 0, 2 on rank 1)") in (tmp_path / f"node{n}").read_text()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(60)
def test_a_launch_that_cannot_run_the_config_is_refused_before_anything_exists(monkeypatch):
    from omegaconf import OmegaConf

    from lm_mini.training.distributed import Launch, LaunchError, check_launch

    def train_cfg(**kw):
        return OmegaConf.create({"num_nodes": 1, "devices": 1, "accelerator": "cpu", **kw})

    with pytest.raises(LaunchError, match=r"rank 1: torchrun started 4 processes, but train.devices x train.num_nodes = 2 x 1 = 2"):
        check_launch(Launch("torchrun", 1, 4, 1), train_cfg(devices=2))
    check_launch(Launch("srun", 3, 4, 1), train_cfg(devices=[0, 1], num_nodes=2))  # 2 per node x 2 nodes
    check_launch(Launch("torchrun", 0, 4, 0), train_cfg(devices="auto"))  # Lightning counts them itself
    with pytest.raises(LaunchError, match="needs every node's processes started by torchrun or srun"):
        check_launch(Launch("lightning", 0, 1, 0), train_cfg(num_nodes=2))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(LaunchError, match="train.accelerator=gpu, but this machine has no CUDA GPU"):
        check_launch(Launch("lightning", 0, 1, 0), train_cfg(accelerator="gpu"))
