"""``lm-mini compare --table paper``: benchmark scores from MLflow (eval/<benchmark>/<headline>) laid out like the
paper's Table 1, one column per benchmark, one row per run with its C (and C² vision tokens) and depth."""
from __future__ import annotations

from mlflow import MlflowClient

from lm_mini.cli import main
from lm_mini.sweeps.compare import PAPER_TABLES, benchmark_columns, read_runs


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.create_experiment("paper")
    scores = {
        ("2", "4"): {"eval/vqav2/accuracy": 77.61, "eval/gqa/accuracy": 60.87, "eval/pope/f1": 84.44,
                     "eval/mme/perception": 1466.123, "eval/seed_bench/image/accuracy": 57.9, "train/loss": 1.0},
        ("8", "0"): {"eval/vqav2/accuracy": 70.0},
    }
    for (c, depth), metrics in scores.items():
        run = client.create_run(exp, run_name=f"C{c}-d{depth}")
        client.log_param(run.info.run_id, "model.compressor.grid", c)
        client.log_param(run.info.run_id, "model.prefusion.depth", depth)
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
    return client


def test_paper_table_has_the_papers_columns_and_each_runs_scores(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _runs(uri)
    assert main(["compare", "--experiment", "paper", "--table", "paper", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "C", "#vision tokens", "depth"] + [h for h, _ in PAPER_TABLES["paper"]]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    first = dict(zip(header, rows["C2-d4"]))
    assert (first["C"], first["#vision tokens"], first["depth"]) == ("2", "4", "4")
    assert (first["VQAv2"], first["GQA"], first["POPE"], first["MME"], first["SEED"]) == ("77.6", "60.9", "84.4", "1466", "57.9")
    assert first["VisWiz"] == "-" and dict(zip(header, rows["C8-d0"]))["GQA"] == "-"  # not evaluated: no number


def test_benchmark_columns_follow_each_benchmarks_headline(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _runs(uri)
    rows = read_runs("paper", tracking_uri=uri)
    paper = dict(benchmark_columns(rows, "paper"))
    assert (paper["POPE"], paper["MME"], paper["SEED"], paper["SciQA"]) == (
        "eval/pope/f1", "eval/mme/perception", "eval/seed_bench/image/accuracy", "eval/scienceqa/img/accuracy")
    assert [h for h, _ in benchmark_columns(rows, "benchmarks")] == ["gqa", "mme", "pope", "seed_bench", "vqav2"]
    # no benchmark scores at all: said, not an empty table without a word
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("bare"), run_name="r")
    assert main(["compare", "--experiment", "bare", "--table", "paper_video", "--tracking-uri", uri]) == 0
    assert "no run of 'bare' has benchmark scores" in capsys.readouterr().out
