import json

import pytest
from mlflow.tracking import MlflowClient

from lm_mini.sweeps.compare import RunRow, pivot, read_runs, render, series, to_records


@pytest.fixture(scope="module")  # creating an MLflow SQLite store costs seconds: share one
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'ml.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp")
    for c in (1, 2):
        for d in (0, 2):
            run = client.create_run(exp, run_name=f"grid={c}__depth={d}", tags={"sweep_id": "s1", "sweep_keys": "model.compressor.grid,model.prefusion.depth"})
            client.log_param(run.info.run_id, "model.compressor.grid", c)
            client.log_param(run.info.run_id, "model.prefusion.depth", d)
            for step, loss in enumerate([3.0, 2.0, 1.0 / (c + d)]):
                client.log_metric(run.info.run_id, "loss", loss, step=step)
            client.log_metric(run.info.run_id, "accuracy", 0.1 * c + 0.01 * d)
            client.set_terminated(run.info.run_id)
    other = client.create_run(exp, run_name="unrelated", tags={"sweep_id": "s2"})
    client.log_metric(other.info.run_id, "accuracy", 0.5)
    return uri


def test_reads_sweep_runs_with_grid_values_and_final_metrics(store):
    rows = read_runs("exp", "s1", store)
    assert len(rows) == 4
    by_name = {r.name: r for r in rows}
    r = by_name["grid=2__depth=2"]
    assert r.values == {"model.compressor.grid": 2, "model.prefusion.depth": 2}
    assert r.metrics["loss"] == pytest.approx(0.25)  # the final value, not the first
    assert r.metrics["accuracy"] == pytest.approx(0.22)
    records = json.loads(render(to_records(rows, ["accuracy"]), "json"))
    assert {rec["run"] for rec in records} == set(by_name)
    assert all(set(rec) == {"run", "status", "model.compressor.grid", "model.prefusion.depth", "accuracy"} for rec in records)


def test_pivot_and_text_formats(store):
    rows = read_runs("exp", "s1", store)
    table = pivot(rows, "accuracy")
    assert [rec["grid \\ depth"] for rec in table] == [1, 2]
    assert table[1]["2"] == pytest.approx(0.22) and table[0]["0"] == pytest.approx(0.1)
    md = render(to_records(rows, ["accuracy"]), "markdown").splitlines()
    assert md[0].startswith("| run | status |") and len(md) == 6
    csv_lines = render(to_records(rows, ["accuracy"]), "csv").strip().splitlines()
    assert csv_lines[0] == "run,status,model.compressor.grid,model.prefusion.depth,accuracy" and len(csv_lines) == 5


def test_unknown_experiment_and_empty_sweep_are_clear(store):
    with pytest.raises(LookupError, match="no MLflow experiment named 'nope'.*Experiments there: .*exp"):
        read_runs("nope", None, store)
    with pytest.raises(LookupError, match="has no runs in sweep 'zzz'"):
        read_runs("exp", "zzz", store)


def test_plot_lines_follow_the_sweep_grid(store):
    rows = read_runs("exp", "s1", store)  # C x depth: C across, one line per depth
    assert series(rows, "accuracy") == {"depth=0": [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))],
                                        "depth=2": [(1, pytest.approx(0.12)), (2, pytest.approx(0.22))]}
    # another grid (learning rate x batch size, in the sweep's order): its first key across, lines by the other
    other = [RunRow(f"r{i}", f"r{i}", "FINISHED", {"train.lr": lr, "data.batch_size": bs}, {"acc": lr * 100 + bs})
             for i, (lr, bs) in enumerate([(1e-3, 16), (1e-4, 16), (1e-3, 8), (1e-4, 8)])]
    assert series(other, "acc") == {"batch_size=8": [(1e-4, 8.01), (1e-3, 8.1)], "batch_size=16": [(1e-4, 16.01), (1e-3, 16.1)]}
    table = pivot(other, "acc")
    assert [rec["lr \\ batch_size"] for rec in table] == [1e-4, 1e-3] and table[1]["16"] == pytest.approx(16.1)
    one_key = [RunRow("a", "a", "FINISHED", {"train.lr": 0.1}, {"acc": 1.0}), RunRow("b", "b", "FINISHED", {"train.lr": 0.01}, {"acc": 2.0})]
    assert series(one_key, "acc") == {"": [(0.01, 2.0), (0.1, 1.0)]} and pivot(one_key, "acc") is None


def test_plot_writes_png(store, tmp_path):
    from lm_mini.sweeps.plots import plot

    out = tmp_path / "p.png"
    plot(read_runs("exp", "s1", store), "accuracy", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_metric_no_run_has(store, capsys):
    from lm_mini.cli import main

    assert main(["compare", "--experiment", "exp", "--metric", "acuracy", "--tracking-uri", store]) == 1
    out = capsys.readouterr().out
    assert "no run has metric(s) acuracy; they have: accuracy, loss" in out
    assert main(["compare", "--experiment", "exp", "--metric", "accuracy", "--tracking-uri", store]) == 0
