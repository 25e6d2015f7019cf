"""A 2x2 sweep end to end on the demo shards with a few steps per run: it runs, a re-run skips every
finished run, deleting one run's final checkpoint makes the re-run resume just that one, and
``compare --format json`` returns the four runs with their grid values and metrics."""
import json
from pathlib import Path


from lm_mini.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


def write_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
base: {ROOT / 'experiments' / 'demo.yaml'}
sweep_id: tiny_cd
experiment: sweep_test
overrides:
  - train.max_steps=4
  - train.max_epochs=1
  - train.checkpoint_every_n_steps=2
  - train.log_every_n_steps=1
  - data.batch_size=4
  - eval.max_samples=8
  - eval.max_new_tokens=2
  - logging.runs_dir={tmp_path / 'runs'}
  - logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}
grid:
  model.compressor.grid: [1, 2]
  model.prefusion.depth: [0, 1]
""")
    return sweep


def test_sweep_runs_skips_resumes_and_compares(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the demo config names its shards relative to the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sweep = write_sweep(tmp_path)
    names = ["grid=1__depth=0", "grid=1__depth=1", "grid=2__depth=0", "grid=2__depth=1"]

    assert cli_main(["sweep", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "finished=4, skipped=0, stopped=0, failed=0" in out
    runs = tmp_path / "runs" / "sweep_test"
    for name in names:
        assert (runs / name / "checkpoints" / "step=00000004.ckpt").exists(), name

    # a re-run skips everything
    assert cli_main(["sweep", str(sweep)]) == 0
    assert "finished=0, skipped=4, stopped=0, failed=0" in capsys.readouterr().out

    # losing one run's final checkpoint: the re-run resumes that run alone, from its step-2 checkpoint
    (runs / names[3] / "checkpoints" / "step=00000004.ckpt").unlink()
    assert cli_main(["sweep", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "finished=1, skipped=3, stopped=0, failed=0" in out and f"{names[3]}: starting" in out
    log = (runs / "_sweep_logs" / f"{names[3]}.log").read_text()
    assert "resuming step=00000002.ckpt" in log
    assert (runs / names[3] / "checkpoints" / "step=00000004.ckpt").exists()

    assert cli_main(["compare", "--experiment", "sweep_test", "--sweep", "tiny_cd", "--format", "json",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    records = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["run"] for r in records) == names  # the resumed run is one MLflow run, not two
    for r in records:
        c, d = (int(x.split("=")[1]) for x in r["run"].split("__"))
        assert (r["model.compressor.grid"], r["model.prefusion.depth"]) == (c, d)
        assert r["status"] == "FINISHED"
        assert 0.0 <= r["eval/exact_match"] <= 1.0 and r["train/loss"] > 0
        assert r["flops_per_sample"] > 0  # logged by the sweep for compare's accuracy-vs-FLOPs plot
    flops = {r["run"]: r["flops_per_sample"] for r in records}
    assert flops["grid=2__depth=1"] > flops["grid=1__depth=1"] > flops["grid=1__depth=0"]  # more tokens, more fusion: more work
