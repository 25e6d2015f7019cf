"""The main job, shortened: ``lm-mini train experiments/demo.yaml`` on the shipped demo shards, image QA
only at batch 32 (321 steps instead of the demo's 810; ~1.3 min on 2 CPU cores). The loss falls, the held-out
evaluation generates greedily and scores exact match, the printed skip counts are those logged to MLflow, the
printed majority baseline is the per-question-type one of the samples that were evaluated, and the held-out
accuracy beats that baseline by a clear margin."""
import json

from mlflow import MlflowClient

from training_helpers import ROOT
from lm_mini.cli import main as cli_main
from lm_mini.data.errors import SKIP_REASONS, SkipCounter, describe_skips
from lm_mini.data.shard_reader import iter_raw_samples, shard_paths
from lm_mini.eval.baseline import majority_baseline
from lm_mini.eval.metrics import ExactMatch

# Shortened demo: image QA only (the eval's first 320 samples are all image questions; video and
# caption steps cost more and do not help them) at batch 32, 3 epochs (demo.yaml trains 6) of
# the instruct shards = 321 steps at lr 1e-3, cosine to 0 (~1.3 min on 2 CPU cores, eval included).
# Using the image sets in abruptly and by chance in short runs: at lr 2e-3 / 3e-3 they stay at the majority
# baseline; at batch 8 (seed 0) 600 steps beat it but 400 and 800 do not. Batch 16 x 600 steps beat it
# too (0.39-0.50 over seeds 0-5), in ~15% more time than this.
N_EVAL = 320  # a multiple of the batch size; the first 400 eval samples are images
SHORT = [
    'data.train=[{"path": "data_shards/demo/instruct"}]', "data.batch_size=32", "train.max_epochs=3",
    "train.checkpoint_every_n_steps=200",
    "train.log_every_n_steps=1", f"eval.max_samples={N_EVAL}", "eval.max_new_tokens=4", "run_name=short",
]
# Held-out exact match of this config on the 320 samples (per-type majority baseline 0.300), measured
# with torch threads = 2 and = 1 (colour and count carry it; position and shape stay near chance):
#   seed       0      1      2      3      4      5
#   2 threads  0.403  0.481  0.403  0.422  0.413  0.503
#   1 thread   0.403  0.481  0.403
# The smallest margin seen is 0.103 (~3.7 standard errors of a 320-sample accuracy near 0.4, ~0.027);
# asserting half of it keeps the test clear of seed / thread noise while still failing a model that
# answers by question type alone (that scores exactly the baseline).
MARGIN = 0.05


def test_short_demo_trains_evaluates_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the demo config names the shards relative to the repository
    db = tmp_path / "mlflow.db"
    rc = cli_main(["train", "experiments/demo.yaml", *SHORT, f"logging.runs_dir={tmp_path / 'runs'}",
                   f"logging.tracking_uri=sqlite:///{db}"])
    out = capsys.readouterr().out
    assert rc == 0
    run_dir = tmp_path / "runs" / "demo" / "short"
    result = json.loads((run_dir / "eval.json").read_text())
    assert f"held-out accuracy (exact match, greedy): {result['accuracy']:.3f} on {N_EVAL} samples" in out
    assert f"majority-answer baseline: {result['majority_baseline']:.3f}" in out
    assert f"MLflow run {json.loads((run_dir / 'mlflow.json').read_text())['run_id']} in sqlite:///{db}" in out

    # the loss falls
    client = MlflowClient(f"sqlite:///{db}")
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    steps = json.loads((run_dir / "finished.json").read_text())["global_step"]
    assert f"finished at step {steps};" in out and 300 < steps < 330  # 3 epochs of the instruct shards
    assert len(losses) == steps and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    # the skip counts are printed as logged (data/skipped/<reason>), zero reasons left out
    logged = client.get_run(run_id).data.metrics
    skipped = {r: int(logged[f"data/skipped/{r}"]) for r in SKIP_REASONS if logged[f"data/skipped/{r}"]}
    assert f"lm-mini: training data: {describe_skips(skipped)}\n" in out

    # accuracy is exact match over the generated answers; the baseline is per question type on the same samples
    preds = result["predictions"]
    assert len(preds) == result["n"] == N_EVAL and len({p["id"] for p in preds}) == N_EVAL
    metric = ExactMatch()
    metric.update([p["prediction"] for p in preds], [p["gold"] for p in preds])
    assert abs(float(metric.compute()) - result["accuracy"]) < 1e-6
    assert client.get_run(run_id).data.metrics["eval/exact_match"] == result["accuracy"]
    ids = {p["id"] for p in preds}
    records = [s.record for s in iter_raw_samples(shard_paths(ROOT / "data_shards/demo/eval"), SkipCounter()) if f"eval/{s.key}" in ids]
    assert len(records) == N_EVAL
    assert abs(majority_baseline(records)["overall"]["accuracy"] - result["majority_baseline"]) < 1e-9

    # the model learned from the images: it beats always giving each question type's most frequent answer
    assert result["accuracy"] > result["majority_baseline"] + MARGIN, (result["accuracy"], result["majority_baseline"])
