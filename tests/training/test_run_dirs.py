"""Run directories: which run and checkpoint ``--resume`` and ``train.init_from`` pick (no training)."""
import pytest

from training_helpers import ROOT, tiny_config
from lm_mini.runs import TMP_SUFFIX, checkpoint_name, resolve_init_from, resolve_run


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint_and_a_fresh_start_never_overwrites(tmp_path):
    cfg = tiny_config(tmp_path)
    checkpoints = tmp_path / "runs" / "test" / "r" / "checkpoints"
    assert resolve_run(cfg, "auto").resume_from is None  # nothing yet: a fresh start (requeue scripts always pass auto)
    _touch(checkpoints / checkpoint_name(20))
    newest = _touch(checkpoints / checkpoint_name(100))
    _touch(checkpoints / (checkpoint_name(120) + TMP_SUFFIX))  # a save that was killed
    run = resolve_run(cfg, "auto")
    assert (run.name, run.dir, run.resume_from) == ("r", checkpoints.parent, newest)
    with pytest.raises(FileExistsError, match="--resume auto"):
        resolve_run(cfg, None)
    explicit = resolve_run(tiny_config(tmp_path, "run_name=other"), str(checkpoints / checkpoint_name(20)))
    assert explicit.name == "r" and explicit.resume_from.name == checkpoint_name(20)
    # without a run name, --resume auto continues the experiment's run with the newest checkpoint
    assert resolve_run(tiny_config(tmp_path, "run_name=null"), "auto").name == "r"


def test_resume_auto_without_a_run_name_never_takes_a_finished_run_nor_under_slurm_another_jobs_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cfg = tiny_config(tmp_path, "run_name=null")
    runs = tmp_path / "runs" / "test"
    _touch(runs / "older" / "checkpoints" / checkpoint_name(10))
    _touch(runs / "done" / "checkpoints" / checkpoint_name(50))
    (runs / "done" / "finished.json").write_text('{"checkpoint": "%s", "global_step": 50}' % checkpoint_name(50))
    assert resolve_run(cfg, "auto").name == "older"  # "done" is newer but finished
    # a SLURM job: its own run, named after the job (a requeue continues it, a new job starts its own)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    run = resolve_run(cfg, "auto")
    assert run.name == "finetune-slurm77" and run.resume_from is None
    _touch(runs / "finetune-slurm77" / "checkpoints" / checkpoint_name(5))
    assert resolve_run(cfg, "auto").resume_from.name == checkpoint_name(5)


def test_init_from_accepts_a_checkpoint_a_run_directory_or_a_run_name(tmp_path):
    runs = tmp_path / "runs"
    latest = _touch(runs / "pre" / "pretrain-1" / "checkpoints" / checkpoint_name(500))
    _touch(runs / "pre" / "pretrain-1" / "checkpoints" / checkpoint_name(250))
    assert resolve_init_from("pretrain-1", str(runs)) == latest
    assert resolve_init_from(str(runs / "pre" / "pretrain-1"), str(runs)) == latest
    assert resolve_init_from(str(latest), str(runs)) == latest
    with pytest.raises(FileNotFoundError, match="not a checkpoint path"):
        resolve_init_from("no-such-run", str(runs))
    model_dir = runs.parent / "exported"  # lm-mini export / import: LmMiniModule loads its safetensors
    _touch(model_dir / "config.yaml")
    _touch(model_dir / "model.safetensors")
    assert resolve_init_from(str(model_dir), str(runs)) == model_dir


def test_init_from_a_run_without_checkpoints_says_so(tmp_path):
    run = tmp_path / "runs" / "pre" / "died-early"
    _touch(run / "config.yaml")
    with pytest.raises(FileNotFoundError, match="died-early is a directory with no checkpoints/"):
        resolve_init_from("died-early", str(tmp_path / "runs"))


def test_resume_with_another_model_is_refused_before_the_run_is_touched(tmp_path):
    """A refused resume used to rewrite config.yaml and mark the finished MLflow run FAILED."""
    from lm_mini.config import to_yaml
    from lm_mini.training.run import ResumeMismatch, train

    cfg = tiny_config(tmp_path)
    run = tmp_path / "runs" / "test" / "r"
    _touch(run / "checkpoints" / checkpoint_name(4))
    (run / "config.yaml").write_text(to_yaml(cfg))
    before = (run / "config.yaml").read_text()
    changed = tiny_config(tmp_path, "model.compressor.grid=2")
    with pytest.raises(ResumeMismatch, match=r"model.compressor.grid: 1 -> 2"):
        train(changed, resume="auto")
    assert (run / "config.yaml").read_text() == before and not (tmp_path / "mlflow.db").exists()


def test_resume_refuses_settings_the_checkpoint_fixes_and_takes_the_ones_it_may_change(tmp_path):
    """A new lr was ignored (the restored schedule won) while config.yaml claimed it; a new batch size crashed."""
    from lm_mini.config import to_yaml
    from lm_mini.training.run import ResumeMismatch, check_resumable

    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(tiny_config(tmp_path)))
    for override, shown in [("train.lr=0.01", "train.lr: 0.003 -> 0.01"), ("data.batch_size=8", "data.batch_size: 4 -> 8"),
                            ("seed=1", "seed: 0 -> 1"), ("train.parts.llm.train=false", "train.parts.llm.train: True -> False")]:
        with pytest.raises(ResumeMismatch, match=rf"{shown}.*may change only train.max_steps"):
            check_resumable(saved, tiny_config(tmp_path, override))
    check_resumable(saved, tiny_config(tmp_path, "train.max_steps=50", "train.checkpoint_every_n_steps=5", "eval.max_samples=3",
                                       "logging.tags.note=longer", "data.val=[]"))


def test_an_empty_training_set_is_refused(tmp_path):
    from lm_mini.training.run import train

    with pytest.raises(FileNotFoundError, match="data.train is empty"):
        train(tiny_config(tmp_path, "data.train=[]"))
    assert not (tmp_path / "runs").exists()


def test_data_that_is_not_where_the_config_says_is_refused_before_a_run_exists(tmp_path, monkeypatch, capsys):
    from lm_mini.cli import main

    monkeypatch.chdir(tmp_path)  # the demo config's paths are relative to the repository root
    assert main(["train", str(ROOT / "experiments" / "demo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data.train[0].path: data_shards/demo/instruct: no index.json and no tar files" in err
    assert f"relative to the working directory, {tmp_path}" in err
    demo = ROOT / "data_shards" / "demo"
    paths = [f"data.train=[{{path: {demo / 'instruct'}}}]", f"data.val=[{{path: {demo / 'eval'}}}]"]
    assert main(["train", str(ROOT / "experiments" / "demo.yaml"), *paths]) == 2
    assert "data.tokenizer: tokenizer directory not found: data_shards/demo/tokenizer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run directory, no MLflow store


def test_resume_against_another_tracking_store_names_the_runs_own(tmp_path):
    import json

    from lm_mini.training.run import train
    from lm_mini.training.tracking import TrackingUnavailable

    run = tmp_path / "runs" / "test" / "r"
    _touch(run / "checkpoints" / checkpoint_name(4))
    first = f"sqlite:///{tmp_path / 'first.db'}"
    (run / "mlflow.json").write_text(json.dumps({"tracking_uri": first, "run_id": "abc", "experiment": "test"}))
    with pytest.raises(TrackingUnavailable, match=rf"its MLflow run is in {first}.*logging.tracking_uri={first}"):
        train(tiny_config(tmp_path), resume="auto")  # tiny_config logs to mlflow.db, not first.db
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "mlflow.json"]  # nothing touched


def test_overrides_after_an_option_are_overrides(tmp_path, capsys):
    from lm_mini.cli import main

    # data.train=[] after --resume reached the config: refused as an empty training set (argparse refused it before)
    assert main(["train", str(ROOT / "experiments" / "demo.yaml"), "--resume", "auto", "data.train=[]",
                 f"logging.runs_dir={tmp_path / 'runs'}"]) == 2
    assert "data.train is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(ROOT / "experiments" / "demo.yaml"), "--resume", "auto", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
