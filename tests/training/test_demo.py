"""The main job, shortened: ``lm-mini train experiments/demo.yaml`` on the shipped demo shards with a
few dozen steps instead of three epochs. The loss falls, the held-out evaluation generates greedily and
scores exact match, and the printed majority baseline is the per-question-type one of the samples
that were evaluated."""
import json

from mlflow import MlflowClient

from training_helpers import ROOT
from lm_mini.cli import main as cli_main
from lm_mini.data.errors import SkipCounter
from lm_mini.data.shards import iter_raw_samples, shard_paths
from lm_mini.data.synthetic import majority_baseline
from lm_mini.eval.metrics import ExactMatch

SHORT = [
    "train.max_steps=40", "train.lr=3e-3", "train.checkpoint_every_n_steps=20", "train.log_every_n_steps=1", "eval.max_samples=48",
    "eval.max_new_tokens=4", "run_name=short",
]


def test_short_demo_trains_evaluates_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the demo config names the shards relative to the repository
    db = tmp_path / "mlflow.db"
    rc = cli_main(["train", "experiments/demo.yaml", *SHORT, f"logging.runs_dir={tmp_path / 'runs'}",
                   f"logging.tracking_uri=sqlite:///{db}"])
    out = capsys.readouterr().out
    assert rc == 0
    run_dir = tmp_path / "runs" / "demo" / "short"
    result = json.loads((run_dir / "eval.json").read_text())
    assert f"held-out accuracy (exact match, greedy): {result['accuracy']:.3f} on 48 samples" in out
    assert f"majority-answer baseline: {result['majority_baseline']:.3f}" in out
    assert f"MLflow run {json.loads((run_dir / 'mlflow.json').read_text())['run_id']} in sqlite:///{db}" in out

    # the loss falls
    client = MlflowClient(f"sqlite:///{db}")
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    # accuracy is exact match over the generated answers; the baseline is per question type on the same samples
    preds = result["predictions"]
    assert len(preds) == result["n"] == 48 and len({p["id"] for p in preds}) == 48
    metric = ExactMatch()
    metric.update([p["prediction"] for p in preds], [p["gold"] for p in preds])
    assert abs(float(metric.compute()) - result["accuracy"]) < 1e-6
    assert client.get_run(run_id).data.metrics["eval/exact_match"] == result["accuracy"]
    ids = {p["id"] for p in preds}
    records = [s.record for s in iter_raw_samples(shard_paths(ROOT / "data_shards/demo/eval"), SkipCounter()) if f"eval/{s.key}" in ids]
    assert len(records) == 48
    assert abs(majority_baseline(records)["overall"]["accuracy"] - result["majority_baseline"]) < 1e-9
