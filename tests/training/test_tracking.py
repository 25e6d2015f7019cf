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
