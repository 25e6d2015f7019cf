"""``lm-mini compare`` over seeds: the runs of a grid point are aggregated (mean, sample std, t-interval, n) and the
grid points compared pairwise (Welch's t-test, Holm-adjusted); every number is checked against one computed here by
hand (the t quantiles from scipy's distribution, or from a table). Also: the plot's labels never overlap, and the
store is found (or the places searched are named) when compare runs outside the training directory."""
from __future__ import annotations

import json
import math
import os

import pytest
from mlflow import MlflowClient
from scipy import stats

from lm_mini.sweeps.compare import RunRow, find_tracking_store
from lm_mini.sweeps.plots import place_labels, upper_bound_group
from lm_mini.sweeps.stats import Group, aggregate, differences, holm, ordering, should_aggregate, summarize, welch

C, D, NAME = "model.compressor.grid", "model.prefusion.depth", "model.compressor.name"
# Student t's 97.5% quantile by degrees of freedom: df 2 in closed form (t = (2p - 1) sqrt(2 / (4 p (1 - p)))), the
# others as printed in tables (6 digits)
T_975 = {2: 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), 3: 3.182446, 4: 2.776445}


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def test_summary_is_mean_sample_std_and_the_t_interval():
    values = [0.61, 0.66, 0.58]
    s = summarize(values)
    m, sd = (0.61 + 0.66 + 0.58) / 3, math.sqrt(((0.61 - 0.6166666666666667) ** 2 + (0.66 - 0.6166666666666667) ** 2
                                                  + (0.58 - 0.6166666666666667) ** 2) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(m, abs=1e-12), pytest.approx(sd, abs=1e-12))
    assert (s.ci_low, s.ci_high) == (pytest.approx(m - half, abs=1e-12), pytest.approx(m + half, abs=1e-12))
    s5 = summarize([1.0, 2.0, 4.0, 8.0, 16.0], alpha=0.05)
    assert s5.ci_high - s5.mean == pytest.approx(T_975[4] * _std([1, 2, 4, 8, 16]) / math.sqrt(5), rel=1e-6)
    one = summarize([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.ci_low)


def test_welch_against_the_hand_computed_statistic():
    a, b = [0.80, 0.83, 0.78], [0.60, 0.55, 0.62, 0.58]
    va, vb = _std(a) ** 2 / 3, _std(b) ** 2 / 4
    t = (_mean(a) - _mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    p, low, high = welch(summarize(a), summarize(b))
    assert p == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)  # scipy's own Welch test agrees
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (low, high) == (pytest.approx(_mean(a) - _mean(b) - half), pytest.approx(_mean(a) - _mean(b) + half))
    assert all(math.isnan(x) for x in welch(summarize([0.5]), summarize(b)))  # one run: no test
    assert welch(summarize([0.7, 0.7]), summarize([0.5, 0.5]))[0] == 0.0  # no spread at all: the difference is certain


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, float("nan")])[1])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def _runs(points, seeds_metrics, status="FINISHED"):
    """RunRow per (point, seed) with eval/exact_match."""
    rows = []
    for point, values in zip(points, seeds_metrics):
        for seed, v in enumerate(values):
            rows.append(RunRow(f"{point}-{seed}", f"{point}-{seed}", status, {**point, "seed": seed}, {"eval/exact_match": v}))
    return rows


def test_significance_is_reported_where_the_values_say_so():
    ident = {NAME: "identity", C: 1, D: 0}
    c1d0, c1d1, c2d0 = {NAME: "query_attention", C: 1, D: 0}, {NAME: "query_attention", C: 1, D: 1}, {NAME: "query_attention", C: 2, D: 0}
    rows = _runs([ident, c1d0, c1d1, c2d0], [[0.90, 0.91, 0.89], [0.45, 0.30, 0.55], [0.80, 0.79, 0.82], [0.50, 0.47, 0.52]])
    rows.append(RunRow("x", "stopped-one", "KILLED", {**c1d0, "seed": 3}, {}))
    assert should_aggregate(rows)
    groups, left_out = aggregate(rows, ["eval/exact_match"])
    assert [r.name for r in left_out] == ["stopped-one"]
    labels = {g.label: g for g in groups}
    assert set(labels) == {"identity, depth=0", "C=1, depth=0", "C=1, depth=1",
                           "C=2, depth=0"}
    assert labels["C=1, depth=0"].stats["eval/exact_match"].n == 3  # the stopped run does not count
    diffs = {(d.a, d.b): d for d in differences(groups, "eval/exact_match")}
    assert len(diffs) == 6 and all(d.diff > 0 for d in diffs.values())  # better group first
    raw = sorted(d.p for d in diffs.values())
    for (a, b), d in diffs.items():  # Welch's p as scipy computes it, Holm's adjustment by hand
        p = stats.ttest_ind(labels[a].stats["eval/exact_match"].values, labels[b].stats["eval/exact_match"].values,
                            equal_var=False).pvalue
        assert d.p == pytest.approx(p)
        assert d.p_holm == pytest.approx(max(min(1.0, (6 - k) * raw[k]) for k in range(raw.index(d.p) + 1)))
        assert d.significant == (d.p_holm < 0.05)
    clear = diffs[("C=1, depth=1", "C=2, depth=0")]  # 0.80 vs 0.50, tight
    assert clear.significant and clear.p_holm < 0.01 and not clear.intervals_overlap
    noisy = diffs[("C=2, depth=0", "C=1, depth=0")]  # 0.50 vs 0.43, wide spread
    assert not noisy.significant and noisy.intervals_overlap and noisy.p > 0.3
    assert (ordering(groups, "eval/exact_match", list(diffs.values()))
            == "identity, depth=0 > C=1, depth=1 > C=2, depth=0 ~ C=1, depth=0")
    assert upper_bound_group(groups).label == "identity, depth=0"
    assert upper_bound_group(groups, {C: 2}).label == "C=2, depth=0"
    with pytest.raises(ValueError, match="3 grid points match"):
        upper_bound_group(groups, {D: 0})


def test_group_by_picks_the_keys_and_single_runs_are_not_aggregated():
    rows = _runs([{C: 1, D: 0}, {C: 1, D: 1}], [[0.1, 0.3], [0.5, 0.7]])
    groups, _ = aggregate(rows, ["eval/exact_match"], group_by=[C])  # depth folded in with the seeds: 4 runs
    assert len(groups) == 1 and groups[0].stats["eval/exact_match"].n == 4
    assert groups[0].stats["eval/exact_match"].mean == pytest.approx(0.4)
    single = [RunRow(str(c), f"grid={c}", "FINISHED", {C: c}, {"acc": c / 10}) for c in (1, 2)]
    assert not should_aggregate(single) and should_aggregate(single, group_by=[C])


def test_labels_are_placed_apart(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    points = [(0, 0.50), (0, 0.51), (0.02, 0.505), (1, 0.50), (1, 0.502), (0.01, 0.49)]  # crowded
    ax.scatter(*zip(*points))
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(0.4, 0.6)
    fig.tight_layout()
    texts = place_labels(ax, points, [f"avg_pool, C={i}, depth=0" for i in range(len(points))])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)  # none cut off
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    plt.close(fig)


# --------------------------------------------------------------------------- through MLflow and the command line
@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("abl")
    values = {(1, 0): [0.40, 0.44, 0.42], (1, 1): [0.70, 0.74, 0.69]}
    for (c, d), accs in values.items():
        for seed, acc in enumerate(accs):
            run = client.create_run(exp, run_name=f"grid={c}__depth={d}__seed={seed}",
                                    tags={"sweep_id": "s", "sweep_keys": f"{C},{D},seed"})
            for k, v in ((C, c), (D, d), ("seed", seed)):
                client.log_param(run.info.run_id, k, v)
            client.log_metric(run.info.run_id, "eval/exact_match", acc)
            client.log_metric(run.info.run_id, "eval/majority_baseline", 0.2)
            client.log_metric(run.info.run_id, "flops_per_sample", 1e7 * (c * c + 2 * d))
            client.set_terminated(run.info.run_id)
    # a run directory naming the store, as lm-mini train writes it
    run_dir = root / "runs" / "abl" / "grid=1__depth=0__seed=0"
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow.json").write_text(json.dumps({"tracking_uri": uri, "run_id": "x", "experiment": "abl"}))
    return root, uri, values


def test_compare_json_and_csv_carry_the_aggregates(seeded_store, capsys):
    from lm_mini.cli import main

    root, uri, values = seeded_store
    assert main(["compare", "--experiment", "abl", "--metric", "eval/exact_match", "--format", "json", "--tracking-uri", uri]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 6 and out["group_by"] == [C, D]
    by = {(g["C"], g["depth"]): g for g in out["groups"]}
    for key, accs in values.items():
        g = by[key]
        half = T_975[2] * _std(accs) / math.sqrt(3)
        assert g["n"] == 3 and g["eval/exact_match mean"] == pytest.approx(_mean(accs))
        assert g["eval/exact_match std"] == pytest.approx(_std(accs))
        assert (g["eval/exact_match ci95 low"], g["eval/exact_match ci95 high"]) == (
            pytest.approx(_mean(accs) - half), pytest.approx(_mean(accs) + half))
    (pair,) = out["differences"]["pairs"]
    assert (pair["a"], pair["b"]) == ("C=1, depth=1", "C=1, depth=0") and pair["significant"] is True
    assert pair["p (Welch)"] == pytest.approx(stats.ttest_ind(values[(1, 1)], values[(1, 0)], equal_var=False).pvalue)
    assert out["ordering"] == "C=1, depth=1 > C=1, depth=0"

    assert main(["compare", "--experiment", "abl", "--metric", "eval/exact_match", "--format", "csv", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("group,C,depth,n,eval/exact_match mean,eval/exact_match std,eval/exact_match ci95 low")
    assert len(lines) == 3

    plot = root / "p.png"
    assert main(["compare", "--experiment", "abl", "--metric", "eval/exact_match", "--format", "markdown", "--tracking-uri",
                 uri, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "| C=1, depth=1 | 3 | 0.710 ± 0.026 [" in text and "ordering ('>' significant, '~' not): C=1, depth=1 > C=1, depth=0" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_elsewhere_finds_the_runs_store_or_says_where_it_looked(seeded_store, tmp_path, monkeypatch, capsys):
    from lm_mini.cli import main

    root, uri, _ = seeded_store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", "--experiment", "abl", "--format", "json"]) == 1
    out = capsys.readouterr().out
    assert "no MLflow store found for experiment 'abl'; looked for " + str(elsewhere / "runs" / "abl" / "*" / "mlflow.json") in out
    assert str(elsewhere / "mlflow.db") in out and "--tracking-uri" in out
    assert not (elsewhere / "mlflow.db").exists()  # nothing created where it looked
    # from a folder inside the training directory, and with --runs-dir: the store the runs name
    inside = root / "runs"
    assert find_tracking_store("abl", cwd=inside) == (uri, f"named by the runs in {root / 'runs' / 'abl'}")
    assert main(["compare", "--experiment", "abl", "--format", "json", "--runs-dir", str(root / "runs")]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["runs"]) == 6 and f"reading {uri}" in captured.err
    # an explicit store that does not exist is refused, not created
    missing = elsewhere / "nope.db"
    assert main(["compare", "--experiment", "abl", "--tracking-uri", f"sqlite:///{missing}"]) == 1
    assert f"no MLflow store at {missing}" in capsys.readouterr().out and not missing.exists()
    # the training directory's own mlflow.db, found from a sub-folder
    (root / "runs" / "abl" / "grid=1__depth=0__seed=0" / "mlflow.json").unlink()
    sub = root / "analysis"
    sub.mkdir(exist_ok=True)
    assert find_tracking_store("abl", cwd=sub) == (f"sqlite:///{root / 'mlflow.db'}", f"found in {root}")
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
