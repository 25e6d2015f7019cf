import re
import shlex

import pytest

from lm_mini.config import ConfigError, load_config
from lm_mini.sweeps.grid import load_sweep, slurm_script


def make_sweep(tmp_path, grid="  model.compressor.grid: [1, 2]\n  model.prefusion.depth: [0, 2]\n", extra=""):
    (tmp_path / "base.yaml").write_text("experiment: base_exp\ntrain:\n  max_steps: 3\n")
    path = tmp_path / "sw.yaml"
    path.write_text(f"base: base.yaml\nsweep_id: cd\noverrides: [train.lr=0.01]\n{extra}grid:\n{grid}")
    return path


def test_grid_expands_to_cartesian_product_with_deterministic_names(tmp_path):
    sweep = load_sweep(make_sweep(tmp_path))
    assert sweep.experiment == "base_exp" and sweep.sweep_id == "cd"
    assert [r.name for r in sweep.runs] == ["grid=1__depth=0", "grid=1__depth=2", "grid=2__depth=0", "grid=2__depth=2"]
    assert load_sweep(make_sweep(tmp_path)).runs[3].overrides == sweep.runs[3].overrides  # same file, same runs
    cfg = load_config(sweep.base, sweep.runs[2].overrides)
    assert (cfg.model.compressor.grid, cfg.model.prefusion.depth) == (2, 0)
    assert cfg.train.lr == pytest.approx(0.01) and cfg.train.max_steps == 3
    assert cfg.run_name == "grid=2__depth=0"
    assert cfg.logging.tags.sweep_id == "cd"
    assert cfg.logging.tags.sweep_keys == "model.compressor.grid,model.prefusion.depth"


def test_unknown_grid_key_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"grid run .*model\.compresor.*Valid keys here"):
        load_sweep(make_sweep(tmp_path, grid="  model.compresor.grid: [1, 2]\n"))
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(make_sweep(tmp_path, extra="gird: 3\n"))


def test_name_collisions_use_longer_suffixes(tmp_path):
    grid = "  train.parts.llm.lr: [0.1]\n  train.parts.projector.lr: [0.2]\n"
    sweep = load_sweep(make_sweep(tmp_path, grid=grid))
    assert sweep.runs[0].name == "llm.lr=0.1__projector.lr=0.2"


def test_slurm_script_is_a_valid_array_job(tmp_path):
    sweep = load_sweep(make_sweep(tmp_path, extra="slurm: {partition: gpu, time: '01:00:00'}\n"))
    text = slurm_script(sweep, max_parallel=2)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = dict(re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", l).groups() for l in lines if l.startswith("#SBATCH"))
    assert directives["array"] == "0-3%2"
    assert directives["partition"] == "gpu" and directives["time"] == "01:00:00"
    assert "requeue" in directives and directives["signal"] == "USR1@300"
    # The bash array holds one command line per grid run, in order, each parseable back into the overrides.
    start, end = lines.index("RUNS=("), lines.index(")")
    entries = [shlex.split(shlex.split(l.strip())[0]) for l in lines[start + 1 : end]]
    assert len(entries) == 4
    for entry, run in zip(entries, sweep.runs):
        assert entry[:2] == ["train", str(sweep.base)] and entry[-2:] == ["--resume", "auto"]
        assert entry[2:-2] == run.overrides
    assert 'srun lm-mini ${RUNS[$SLURM_ARRAY_TASK_ID]}' in text


def test_malformed_sweep_files_are_clear_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: base.yaml\ngrid: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_sweep(path)
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 3\n")
    path.write_text("base: base.yaml\noverrides: train.lr=0.01\ngrid:\n  train.lr: [0.1]\n")
    with pytest.raises(ConfigError, match="'overrides' must be a list of key=value strings, got 'train.lr=0.01'"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="two grid points have the same run name 'lr=0.001'"):
        load_sweep(make_sweep(tmp_path, grid="  train.lr: [0.001, 1.0e-3]\n"))


def _sweep_in(tmp_path, runs_dir):
    (tmp_path / "base.yaml").write_text(f"experiment: base_exp\nlogging:\n  runs_dir: {runs_dir}\n")
    (tmp_path / "sw.yaml").write_text("base: base.yaml\nsweep_id: cd\ngrid:\n  model.compressor.grid: [1, 2, 3]\n")
    return tmp_path / "sw.yaml"


def test_slurm_script_and_its_log_folder_live_under_logging_runs_dir(tmp_path, monkeypatch):
    from lm_mini.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(_sweep_in(tmp_path, tmp_path / "elsewhere")), "--launcher", "slurm"]) == 0
    script = tmp_path / "elsewhere" / "base_exp" / "cd.sbatch"
    output = re.search(r"#SBATCH --output=(\S+)", script.read_text()).group(1)
    assert output == str(tmp_path / "elsewhere" / "base_exp" / "_sweep_logs" / "%x_%A_%a.out")
    assert (tmp_path / "elsewhere" / "base_exp" / "_sweep_logs").is_dir()  # sbatch does not create it
    assert not (tmp_path / "runs").exists()


def test_a_run_stopped_by_a_signal_is_reported_stopped_not_finished(tmp_path, monkeypatch, capsys):
    """A SIGTERM-ed run checkpoints and exits 143 (128 + SIGTERM): the sweep reports it stopped, not failed or finished."""
    import json
    import sys

    from lm_mini.cli import main
    from lm_mini.sweeps import grid

    runs = tmp_path / "runs"
    fake = {  # what each run's training does: exit code, and whether it writes the finished marker
        "grid=1": "import sys; sys.exit(143)",  # preempted: checkpointed, exit 128 + SIGTERM, not finished
        "grid=2": "import sys; sys.exit(3)",  # crashed
        "grid=3": (f"import json, pathlib; d = pathlib.Path({str(runs / 'base_exp' / 'grid=3')!r}); (d / 'checkpoints').mkdir(parents=True); "
                   "(d / 'checkpoints' / 'step=00000004.ckpt').touch(); "
                   "(d / 'finished.json').write_text(json.dumps({'checkpoint': 'step=00000004.ckpt'}))"),
    }
    monkeypatch.setattr(grid, "train_command", lambda sweep, run: [sys.executable, "-c", fake[run.name]])
    marked, measured = [], []
    monkeypatch.setattr(grid, "_mark_failed", lambda sweep, name: marked.append(name))
    monkeypatch.setattr(grid, "_log_efficiency", lambda sweep, run: measured.append(run.name))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(_sweep_in(tmp_path, runs))]) == 1
    out = capsys.readouterr().out
    assert "grid=1: stopped (exit 143): stopped before its end; run the sweep again to resume it" in out
    assert "finished=1, skipped=0, stopped=1, failed=1, mismatch=0" in out
    assert marked == ["grid=2"] and measured == ["grid=3"]  # figures only for a finished run, once


def test_a_dead_tracking_server_is_one_clear_error_for_sweep_and_compare(tmp_path, monkeypatch, capsys):
    import socket
    import time

    from lm_mini.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert main(["sweep", str(_sweep_in(tmp_path, tmp_path / "runs"))]) == 2
    assert "is not reachable" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["compare", "--experiment", "base_exp"]) == 1
    assert "is not reachable" in capsys.readouterr().out
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- points and seeds
def _points_sweep(tmp_path, body):
    (tmp_path / "base.yaml").write_text("experiment: base_exp\ntrain:\n  max_steps: 3\n")
    path = tmp_path / "pts.yaml"
    path.write_text("base: base.yaml\nsweep_id: abl\n" + body)
    return path


def test_points_times_seeds_give_one_run_per_point_and_seed(tmp_path):
    sweep = load_sweep(_points_sweep(tmp_path, """
points:
  - {model.compressor.name: identity, model.prefusion.depth: 0}
  - {model.compressor.grid: 1, model.prefusion.depth: 0}
  - {model.compressor.grid: 1, model.prefusion.depth: 1}
seeds: [0, 1]
"""))
    assert [r.name for r in sweep.runs] == [
        "name=identity__depth=0__seed=0", "name=identity__depth=0__seed=1",
        "grid=1__depth=0__seed=0", "grid=1__depth=0__seed=1", "grid=1__depth=1__seed=0", "grid=1__depth=1__seed=1"]
    assert sweep.keys == ["model.compressor.name", "model.prefusion.depth", "model.compressor.grid", "seed"]
    cfg = load_config(sweep.base, sweep.runs[1].overrides)
    assert (cfg.model.compressor.name, cfg.model.prefusion.depth, cfg.seed) == ("identity", 0, 1)
    assert cfg.logging.tags.sweep_keys == "model.compressor.name,model.prefusion.depth,model.compressor.grid,seed"
    cfg = load_config(sweep.base, sweep.runs[5].overrides)
    assert (cfg.model.compressor.name, cfg.model.compressor.grid, cfg.model.prefusion.depth, cfg.seed) == ("query_attention", 1, 1, 1)
    # points combine with a grid; a seed grid key is the same as `seeds`
    sweep = load_sweep(_points_sweep(tmp_path, "points: [{model.prefusion.depth: 0}, {model.prefusion.depth: 1}]\n"
                                                "grid: {train.lr: [0.1, 0.2], seed: [7]}\n"))
    assert [r.name for r in sweep.runs] == ["depth=0__lr=0.1__seed=7", "depth=0__lr=0.2__seed=7",
                                            "depth=1__lr=0.1__seed=7", "depth=1__lr=0.2__seed=7"]
    assert load_config(sweep.base, sweep.runs[3].overrides).seed == 7


def test_bad_points_and_seeds_are_refused_naming_the_problem(tmp_path):
    cases = {
        "points: [{model.prefusion.depth: [0, 1]}]\n": "points\\[0\\] gives a list for model.prefusion.depth",
        "points: {model.prefusion.depth: 0}\n": "'points' must be a non-empty list of mappings",
        "grid: {model.prefusion.depth: [0]}\nseeds: [0, '1']\n": "'seeds' must be a non-empty list of integers",
        "grid: {seed: [0, 1]}\nseeds: [0, 1]\n": "the seed is given twice",
        "grid: {model.prefusion.depth: [0]}\nseeds: [0, 0]\n": "'seeds' lists a seed twice",
        "points: [{model.prefusion.depth: 0}]\ngrid: {model.prefusion.depth: [1]}\n": "given both in 'points' and in 'grid'",
        "seeds: [0, 1]\n": "a non-empty 'grid' or 'points'",
        "points: [{model.prefusion.depth: 0}, {model.prefusion.depth: 0}]\n": "two grid points have the same run name 'depth=0'",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_sweep(_points_sweep(tmp_path, body))


def test_a_run_that_ran_with_other_settings_is_neither_skipped_nor_launched(tmp_path, monkeypatch, capsys):
    """A run finished under train.max_steps=2 (e.g. resumed by hand shortened) is not the sweep's max_steps=3 run:
    a re-run of the sweep must not count it finished; a run with checkpoints and another length is not resumed
    under the sweep's (its schedule would change mid-run); a run whose settings match is skipped / resumed."""
    import json
    import sys

    from lm_mini.cli import main
    from lm_mini.config import to_yaml
    from lm_mini.sweeps import grid

    runs = tmp_path / "runs"
    path = _sweep_in(tmp_path, runs)
    sweep = load_sweep(path)

    def fake_run(run, max_steps, finished):
        directory = runs / "base_exp" / run.name
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "checkpoints" / "step=00000002.ckpt").touch()
        cfg = load_config(sweep.base, run.overrides + [f"train.max_steps={max_steps}"])
        (directory / "config.yaml").write_text(to_yaml(cfg))
        if finished:
            (directory / "finished.json").write_text(json.dumps({"checkpoint": "step=00000002.ckpt"}))

    by_name = {r.name: r for r in sweep.runs}
    fake_run(by_name["grid=1"], 2, finished=True)   # shortened and finished: not the sweep's run
    fake_run(by_name["grid=2"], 2, finished=False)  # shortened, stopped: resuming would change its length
    fake_run(by_name["grid=3"], -1, finished=True)  # the sweep's own settings (base.yaml has no max_steps): skipped
    assert grid.settings_mismatch(sweep, by_name["grid=1"]) == ["train.max_steps=2 (sweep: -1)"]
    assert grid.settings_mismatch(sweep, by_name["grid=3"]) == []
    launched = []
    monkeypatch.setattr(grid, "train_command", lambda sweep, run: launched.append(run.name) or [sys.executable, "-c", "pass"])
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert launched == []
    assert ("grid=1: finished with other settings than this sweep gives it: train.max_steps=2 (sweep: -1). Not counted and "
            f"not launched: delete {runs / 'base_exp' / 'grid=1'}") in out
    assert "grid=2: has checkpoints with other settings than this sweep gives it: train.max_steps=2 (sweep: -1)" in out
    assert "grid=3: finished before, skipped" in out
    assert "finished=0, skipped=1, stopped=0, failed=0, mismatch=2" in out
    # a finished run whose evaluation the sweep now sets differently is not the sweep's result either
    (tmp_path / "sw.yaml").write_text("base: base.yaml\nsweep_id: cd\noverrides: [eval.max_samples=5]\n"
                                       "grid:\n  model.compressor.grid: [1, 2, 3]\n")
    assert grid.settings_mismatch(load_sweep(tmp_path / "sw.yaml"), load_sweep(tmp_path / "sw.yaml").runs[2]) == \
        ["eval.max_samples=None (sweep: 5)"]
