"""The ablation, shortened: experiments/sweeps/ablation.yaml's grid points (identity at depth 0, C=1 at depth 0 and
1, C=2 at depth 0) over two seeds, a few steps each, through `lm-mini sweep` on the shipped scenes; `lm-mini compare`
then aggregates each point over its seeds, and its mean / std / t-interval / n and pairwise Welch tests are checked
against the same numbers computed here from the runs' own values. (The full ablation is a documented experiment:
README, "The ablation"; benchmarks/RESULTS.md.)"""
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy import stats

from lm_mini.cli import main as cli_main
from lm_mini.sweeps.grid import load_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "experiments" / "sweeps" / "ablation.yaml"
METRIC = "eval/exact_match"


def test_the_ablation_sweep_file_is_the_issues_grid():
    sweep = load_sweep(SWEEP)
    points = {tuple(sorted((k, v) for k, v in r.values.items() if k != "seed")) for r in sweep.runs}
    assert points == {(("model.compressor.name", "identity"), ("model.prefusion.depth", 0)),
                      (("model.compressor.grid", 1), ("model.prefusion.depth", 0)),
                      (("model.compressor.grid", 1), ("model.prefusion.depth", 1)),
                      (("model.compressor.grid", 2), ("model.prefusion.depth", 0))}
    assert len(sweep.grid["seed"]) >= 3 and len(sweep.runs) == 4 * len(sweep.grid["seed"]) and sweep.experiment == "ablation"


@pytest.mark.timeout(900)  # eight short training runs as subprocesses: ~2-4 min on 2 busy cores
def test_a_shortened_ablation_runs_and_compare_aggregates_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the configs name the shipped shards relative to the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real = OmegaConf.to_container(OmegaConf.load(SWEEP))
    short = {
        "base": str((SWEEP.parent / real["base"]).resolve()), "sweep_id": "ablation_short", "experiment": "ablation_short",
        "points": real["points"], "seeds": [0, 1],
        "overrides": list(real.get("overrides", [])) + [
            "train.max_steps=6", "train.checkpoint_every_n_steps=6", "eval.max_samples=24", "eval.max_new_tokens=2",
            "train.lr=3e-3", f"logging.runs_dir={tmp_path / 'runs'}", f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    }
    path = tmp_path / "ablation_short.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(short)))
    assert cli_main(["sweep", str(path), "--max-parallel", "2"]) == 0
    assert "finished=8, skipped=0, stopped=0, failed=0, mismatch=0" in capsys.readouterr().out

    plot = tmp_path / "ablation.png"
    assert cli_main(["compare", "--experiment", "ablation_short", "--sweep", "ablation_short", "--metric", METRIC,
                     "--format", "json", "--runs-dir", str(tmp_path / "runs"), "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 8 and all(r["status"] == "FINISHED" for r in out["runs"])
    assert out["group_by"] == ["model.compressor.grid", "model.prefusion.depth", "model.compressor.name"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each grid point: its two seeds' values, aggregated as computed here
    def point(r):
        return (r["model.compressor.name"], r["model.compressor.grid"] if r["model.compressor.name"] != "identity" else None,
                r["model.prefusion.depth"])

    runs = {}
    for r in out["runs"]:
        runs.setdefault(point(r), []).append(r[METRIC])
    assert sorted(len(v) for v in runs.values()) == [2, 2, 2, 2]
    t = stats.t.ppf(0.975, 1)  # 12.706: two seeds
    groups = {point({"model.compressor.name": g["name"], "model.compressor.grid": g["C"], "model.prefusion.depth": g["depth"]}): g
              for g in out["groups"]}
    for key, values in runs.items():
        g = groups[key]
        mean = sum(values) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
        assert g["n"] == 2 and g[f"{METRIC} mean"] == pytest.approx(mean, abs=1e-12)
        assert g[f"{METRIC} std"] == pytest.approx(std, abs=1e-12)
        assert g[f"{METRIC} ci95 low"] == pytest.approx(mean - t * std / math.sqrt(2), abs=1e-9)
        assert g[f"{METRIC} ci95 high"] == pytest.approx(mean + t * std / math.sqrt(2), abs=1e-9)
    # every pair, better first, Welch's p as scipy computes it from the runs' values
    pairs = out["differences"]["pairs"]
    assert len(pairs) == 6
    labels = {g["group"]: key for key, g in groups.items()}
    for p in pairs:
        a, b = runs[labels[p["a"]]], runs[labels[p["b"]]]
        assert p["a - b"] == pytest.approx(sum(a) / 2 - sum(b) / 2, abs=1e-12) and p["a - b"] >= 0
        if (max(a) - min(a)) + (max(b) - min(b)) > 0:
            assert p["p (Welch)"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
        assert p["significant"] == (p["p (Holm)"] is not None and p["p (Holm)"] < 0.05)
