import pytest
from omegaconf import OmegaConf

from lm_mini.config import ConfigError, apply_overrides, flatten, load_config


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    write(tmp_path / "model.yaml", "model:\n  compressor:\n    grid: 2\n  prefusion:\n    depth: 3\n")
    cfg_path = write(tmp_path / "run.yaml", "defaults: [model.yaml]\nexperiment: exp\nmodel:\n  compressor:\n    grid: 4\n")
    cfg = load_config(cfg_path, ["model.prefusion.depth=0", "train.lr=0.001"])
    assert cfg.experiment == "exp"
    assert cfg.model.compressor.grid == 4  # the file beats its defaults
    assert cfg.model.prefusion.depth == 0  # overrides beat the file
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.compressor.name == "query_attention"  # dataclass default kept


def test_unknown_key_in_yaml_names_path_and_valid_keys(tmp_path):
    cfg_path = write(tmp_path / "bad.yaml", "model:\n  compresor:\n    grid: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    msg = str(e.value)
    assert "bad.yaml" in msg and "model.compresor" in msg
    assert "compressor" in msg and "prefusion" in msg and "Did you mean 'compressor'" in msg


def test_wrong_type_is_refused_with_key():
    with pytest.raises(ConfigError, match=r"model\.compressor\.grid"):
        load_config(None, ["model.compressor.grid=many"])


def test_unknown_override_and_malformed_override():
    with pytest.raises(ConfigError, match=r"train\.parts\.llm\.lrr.*Valid keys here: lr, train"):
        load_config(None, ["train.parts.llm.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.compressor.grid"])


def test_free_form_mappings_accept_any_key(tmp_path):
    cfg_path = write(tmp_path / "m.yaml", "model:\n  llm:\n    config:\n      model_type: llama\n      hidden_size: 64\n")
    cfg = load_config(cfg_path, ["model.llm.config.num_hidden_layers=2", "model.compressor.options.heads=4"])
    assert OmegaConf.to_container(cfg.model.llm.config) == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    assert cfg.model.compressor.options.heads == 4


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_gives_dotted_keys():
    cfg = apply_overrides(load_config(), ["model.compressor.grid=3"])
    flat = flatten(cfg)
    assert flat["model.compressor.grid"] == 3
    assert flat["train.parts.encoder.train"] is False
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize("override, key, known", [
    ("model.compressor.name=nope", "model.compressor.name", "avg_pool, identity, qformer, query_attention"),
    ("model.encoder.name=clip", "model.encoder.name", "hf_clip"),
    ("data.template=vicuna", "data.template", "llama3, llava_llama_3_1, plain, vicuna_v1"),
    ("model.projector.name=my.mod:Nothing", "model.projector.name", "cannot import module 'my.mod'"),
])
def test_unknown_component_name_is_refused_at_load_with_the_known_ones(override, key, known):
    """Not a traceback after the run directory and MLflow run were created."""
    with pytest.raises(ConfigError, match=f"bad value for config key '{key}'") as err:
        load_config("experiments/demo.yaml", [override])
    assert known in str(err.value)


def test_unknown_template_of_a_shard_set_is_refused():
    with pytest.raises(ConfigError, match=r"'data.train.0.template'.*unknown conversation template 'plane'"):
        load_config("experiments/demo.yaml", ["data.train.0.template=plane"])


@pytest.mark.parametrize("option, value", [("--chunk-frames", "0"), ("--frames", "-3"), ("--text-tokens", "0"),
                                           ("--budget-gb", "-5"), ("--repeats", "0")])
def test_efficiency_refuses_impossible_options(option, value, capsys):
    from lm_mini.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["efficiency", "experiments/demo.yaml", option, value])
    assert exit_.value.code == 2 and f"argument {option}: {value}: expected" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["efficiency", "experiments/demo.yaml", "--measure-latency"],
                                     ["analyze", "attention", "experiments/demo.yaml", "--data", "data_shards/demo/eval"]])
def test_a_device_the_machine_lacks_is_an_argument_error(command, capsys):
    import torch

    from lm_mini.cli import main

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, if any
    for device, message in [(missing, f"this machine has {torch.cuda.device_count()} CUDA device(s)"), ("gpu", "not a device")]:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--device", device])
        assert exit_.value.code == 2 and f"argument --device: {device}: {message}" in capsys.readouterr().err


def test_efficiency_names_an_unknown_mlflow_run(tmp_path, monkeypatch, capsys):
    from lm_mini.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["efficiency", "experiments/demo.yaml", "--mlflow-run", "deadbeef"]) == 1
    assert "cannot log to MLflow run 'deadbeef'" in capsys.readouterr().err


def test_defaults_are_looked_up_next_to_the_file_then_among_the_presets(tmp_path):
    """A YAML outside experiments/ builds on the shipped presets; a file beside it wins; the error says where it looked."""
    from lm_mini.config import PRESETS_DIR

    mine = write(tmp_path / "mine.yaml", "defaults: [base.yaml, models/tiny.yaml]\nexperiment: mine\n")
    cfg = load_config(mine)
    assert cfg.experiment == "mine" and cfg.model == load_config(PRESETS_DIR / "models" / "tiny.yaml").model
    write(tmp_path / "base.yaml", "seed: 7\n")  # the user's own base.yaml, next to the file
    assert load_config(mine).seed == 7
    missing = write(tmp_path / "typo.yaml", "defaults: [models/tinny.yaml]\n")
    with pytest.raises(ConfigError, match=rf"config file not found: models/tinny.yaml \(listed in the defaults of {missing}\); "
                                          rf"looked for {tmp_path / 'models' / 'tinny.yaml'} and {PRESETS_DIR / 'models' / 'tinny.yaml'}"):
        load_config(missing)


@pytest.mark.parametrize("value, problem", [
    ("${nosuch.key}", "Interpolation key 'nosuch.key' not found"),
    ('${oc.decode:"[1,2]"}', "Cannot convert 'list' to string"),
    ("${oc.env:LM_MINI_TEST_UNSET_VARIABLE}", "LM_MINI_TEST_UNSET_VARIABLE"),
    ("${nosuch", None),  # does not parse: found when the file is read
])
def test_a_bad_interpolation_in_a_yaml_file_is_a_config_error_naming_the_file_and_key(tmp_path, value, problem):
    """As the same mistake in a key=value override: one line naming the file, the key and the interpolation,
    not OmegaConf's traceback (whichever key it sits in: a checked field, a free-form mapping, a list item)."""
    for key, text in (("run_name", f"run_name: '{value}'\n"), ("logging.tags.who", f"logging:\n  tags:\n    who: '{value}'\n"),
                      ("data.train.0.path", f"data:\n  train:\n    - path: '{value}'\n")):
        path = write(tmp_path / "interp.yaml", text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        msg = str(e.value)
        if problem is None:
            assert msg.startswith(f"{path}: config key '{key}': not a valid interpolation: ") and "'${nosuch'" in msg, msg
        else:
            assert msg.startswith(f"{path}: config key '{key}': interpolation {value}: ") and problem in msg, msg
        assert "\n" not in msg and "full_key" not in msg
    with pytest.raises(ConfigError, match=rf"^override 'run_name=\${{nosuch.key}}': .*'nosuch.key' not found$"):
        load_config(None, ["run_name=${nosuch.key}"])
    good = write(tmp_path / "good.yaml", "experiment: e1\nrun_name: ${experiment}-r\n")  # a good one still resolves
    assert load_config(good).run_name == "e1-r"
