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
