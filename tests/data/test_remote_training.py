"""The demo trains from its shards served by a real HTTP server and a real S3-compatible server (moto) on
127.0.0.1 exactly as from the local files: the same batches in the same order (ledger) and bit-identical
weights, also across a mid-epoch preemption and ``--resume auto``; the new skip reason reaches MLflow.
Shortened: a smaller model than the demo's, batches of 4, 4 steps."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lm_mini.config import ShardSetConfig, load_config
from lm_mini.data.datamodule import LmMiniDataModule
from lm_mini.training.run import train
from remote_servers import ShardServer, put_tree, s3_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data_shards" / "demo"
SETS = [("instruct", 1.0, None), ("video", 1.0, None), ("captions", 0.5, "plain")]  # demo.yaml's training mix
STEPS = 4
SHORT = [  # the demo config with a smaller model and a few short steps
    "model.encoder.config.num_hidden_layers=2", "model.llm.config.num_hidden_layers=2", "model.llm.config.hidden_size=64",
    "model.llm.config.intermediate_size=128", "model.prefusion.depth=1", "data.batch_size=4", "data.max_frames=2",
    f"train.max_steps={STEPS}", "train.checkpoint_every_n_steps=2", "train.keep_last_k=3", "train.log_every_n_steps=1",
    "train.eval_at_end=false", "data.remote.backoff_s=0.01",
]


class Recording(LmMiniDataModule):
    """The demo's data module, recording each training batch's sample ids; ``preempt_at``: SIGTERM this process
    while batch ``preempt_at`` is being trained (as a cluster preempting the job), so the run checkpoints after
    that step and stops."""

    def __init__(self, cfg, preempt_at=None):
        super().__init__(cfg)
        self.seen, self.preempt_at = [], preempt_at

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            self.seen.append(list(batch["sample_ids"]))
            if len(self.seen) == self.preempt_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return batch


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: its tables are made once


def config(tmp_path, store, name, base):
    cfg = load_config(ROOT / "experiments" / "demo.yaml", [*SHORT, f"run_name={name}", f"logging.runs_dir={tmp_path}",
                                                          f"logging.tracking_uri={store}"])
    cfg.data.tokenizer, cfg.data.val = str(DEMO / "tokenizer"), []
    cfg.data.train = [ShardSetConfig(f"{base}/{n}", w, t) for n, w, t in SETS]
    return cfg


def fit(cfg, **kw):
    dm = Recording(cfg, kw.pop("preempt_at", None))
    result = train(cfg, datamodule=dm, **kw)
    weights = {k: v.detach().clone() for k, v in result.trainer.lightning_module.state_dict().items()}
    return result, dm.seen, weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store):
    result, seen, weights = fit(config(tmp_path_factory.mktemp("local"), store, "local", str(DEMO)))
    assert result.global_step == STEPS and len(seen) == STEPS
    return seen, weights


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def http():
    with ShardServer(DEMO) as server:
        yield server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as bucket:
        for name, _, _ in SETS:
            put_tree(DEMO / name, f"{bucket}/demo/{name}")
        yield bucket


@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["http", "s3"])
def test_demo_trains_from_a_server_like_from_local_files_across_a_preemption(reference, tmp_path, store, where, request):
    seen, weights = reference
    base = request.getfixturevalue("http").url() if where == "http" else f"{request.getfixturevalue('s3')}/demo"
    cfg = config(tmp_path, store, where, base)
    first, seen_first, _ = fit(cfg, preempt_at=2)  # SIGTERM during step 2: checkpoint after it, stop
    assert first.preempted and first.global_step == 2
    second, seen_second, final = fit(cfg, resume="auto")
    assert second.global_step == STEPS
    assert seen_first + seen_second == seen  # the same samples in the same order: none repeated, none skipped
    assert same_weights(final, weights)
    if where == "http":  # the shards came from the server
        requests = request.getfixturevalue("http").requests
        assert requests["/instruct/index.json"] >= 2 and any(p.endswith(".tar") for p in requests)

    client = MlflowClient(store)
    run_id = json.loads((tmp_path / "demo" / where / "mlflow.json").read_text())["run_id"]
    lost = client.get_metric_history(run_id, "data/skipped/shard_unavailable")  # logged like every skip reason
    assert sorted(m.step for m in lost) == list(range(STEPS)) and all(m.value == 0 for m in lost)
