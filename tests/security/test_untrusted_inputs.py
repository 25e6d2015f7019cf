"""Inputs besides checkpoints (issue 14): a model or run directory's config imports no code unless the user
allows it; YAML cannot build Python objects; a shard's tar members named ``../x`` or ``/etc/x`` are skipped
and counted, and reading writes nothing anywhere."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from security_helpers import TOKENIZER, run_with_checkpoint
from lm_mini.cli import main
from lm_mini.config import ConfigError, load_config, to_yaml
from lm_mini.data.errors import SkipCounter
from lm_mini.data.shard_reader import count_tar_samples, iter_raw_samples, read_shard
from lm_mini.interop.pretrained import load_pretrained, save_pretrained
from lm_mini.models.llava_mini import LlavaMini
from lm_mini.trust import ALLOW_IMPORTS_ENV


@pytest.fixture
def plugin(tmp_path, marker, monkeypatch):
    """An importable module whose import leaves the marker: ``sneaky_plugin:Pool`` (a real compressor class)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "sneaky_plugin.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom lm_mini.models.compressors import AvgPoolCompressor as Pool\n")
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.delenv(ALLOW_IMPORTS_ENV, raising=False)
    yield "sneaky_plugin:Pool"
    sys.modules.pop("sneaky_plugin", None)


def _model_dir(tmp_path: Path, compressor: str) -> Path:
    cfg, _, _ = run_with_checkpoint(tmp_path / "run", None, "model.compressor.name=avg_pool")  # what Pool is
    model = LlavaMini.from_config(cfg.model)
    out = save_pretrained(tmp_path / "model", model.state_dict(), cfg, TOKENIZER, card="# m\n")
    saved = OmegaConf.load(out / "config.yaml")
    saved.model.compressor.name = compressor  # as a stranger's model directory could say
    (out / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    return out


def test_a_model_directory_imports_no_code_unless_the_user_allows_that_import(tmp_path, marker, plugin, monkeypatch, capsys):
    out = _model_dir(tmp_path, plugin)
    with pytest.raises(ConfigError) as info:
        load_pretrained(out)
    text = str(info.value)
    assert "model.compressor.name" in text and "sneaky_plugin:Pool" in text and f"--allow-import {plugin}" in text, text
    assert not marker.exists(), "loading the model directory imported its code"
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["generate", str(out), "--image", str(image), "--prompt", "hi"]) != 0  # the CLI too
    assert "would import Python code" in capsys.readouterr().err and not marker.exists()

    monkeypatch.setenv(ALLOW_IMPORTS_ENV, "other_pkg:Thing")  # allowing another name is not allowing this one
    with pytest.raises(ConfigError):
        load_pretrained(out)
    assert not marker.exists()
    monkeypatch.setenv(ALLOW_IMPORTS_ENV, plugin)  # the user asked for that compressor: it is imported and used
    model = load_pretrained(out)
    assert marker.exists() and type(model.compressor).__name__ == "AvgPoolCompressor"


def test_a_run_directory_config_imports_no_code_unless_allowed(tmp_path, marker, plugin, capsys):
    cfg, run, path = run_with_checkpoint(tmp_path, None)
    saved = OmegaConf.load(run / "config.yaml")
    saved.model.compressor.name = plugin
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(run / "config.yaml") in err and "would import Python code" in err and "--allow-import" in err, err
    assert not marker.exists()
    # the user's own config may name it: that is how plugins are used (tests/models/test_plugins.py)
    own = tmp_path / "mine.yaml"
    own.write_text(to_yaml(saved))
    assert load_config(own).model.compressor.name == plugin and marker.exists()


def test_resuming_compares_a_run_config_naming_module_class_without_importing_it(tmp_path, marker, plugin):
    """--resume reads the run's saved config.yaml to refuse a changed configuration: reading it imports nothing."""
    from lm_mini.training.run import ResumeMismatch, check_resumable

    cfg, run, _ = run_with_checkpoint(tmp_path, None)
    saved = OmegaConf.load(run / "config.yaml")
    saved.model.compressor.name = plugin
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ResumeMismatch, match="model.compressor.name: 'sneaky_plugin:Pool' ->"):
        check_resumable(run / "config.yaml", cfg)
    assert not marker.exists()


def test_yaml_cannot_build_python_objects(tmp_path, marker):
    """Configs go through OmegaConf, whose YAML loader is a safe one: a python/object tag is an error, never a call."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"experiment: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').close()\"]\n")
    with pytest.raises(ConfigError, match="could not determine a constructor for the tag"):
        load_config(bad)
    assert not marker.exists()
    yaml.unsafe_load(bad.read_text())  # the same file through an unsafe loader does run (the test is live)
    assert marker.exists()


def _tar(path: Path, members) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)  # names as given: tarfile.add would strip a leading '/'
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _record(sample_id: str) -> bytes:
    return json.dumps({"id": sample_id, "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}).encode()


def _files(root: Path):
    return {p for p in root.rglob("*")}


def test_tar_members_that_leave_the_shard_are_skipped_counted_and_never_written(tmp_path, monkeypatch, capsys):
    here = tmp_path / "a" / "b"  # the working directory: '../x' would land in tmp_path/a
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    shard = _tar(tmp_path / "shard.tar", [
        ("000000000.json", _record("good-0")),
        ("../x", b"outside"), ("/etc/x", b"outside"),
        ("../evil.json", _record("evil-1")), ("/tmp/evil2.json", _record("evil-2")), ("a/../../evil3.json", _record("evil-3")),
        ("000000001.json", _record("good-1")),
    ])
    absolute = [Path("/etc/x"), Path("/tmp/evil2.json")]
    existed = {p: p.exists() for p in absolute}
    before = _files(tmp_path)

    counter = SkipCounter()
    kept = [s.record["id"] for s in iter_raw_samples([str(shard)], counter)]
    assert kept == ["good-0", "good-1"]
    assert counter.as_dict() == {"unsafe_member_name": 5}
    reasons = [str(item) for item in read_shard(str(shard)) if not hasattr(item, "record")]
    assert any("../x" in r for r in reasons) and any("/etc/x" in r for r in reasons), reasons
    assert count_tar_samples(str(shard)) == 7 == len(list(read_shard(str(shard))))  # positions stay what the plan counts
    assert main(["shards", "inspect", str(shard), "-n", "5"]) == 0  # inspecting says why, without crashing
    assert "skipped while reading: {'unsafe_member_name': 5}" in capsys.readouterr().out

    assert _files(tmp_path) == before  # nothing written next to the shard or the working directory
    assert {p: p.exists() for p in absolute} == existed  # nor at the absolute names


@pytest.mark.parametrize("name", ["shard-$(touch${IFS}MARK).tar", "../../outside.tar", "/etc/x.tar", "a/b.tar", ".hidden.tar",
                                  "x.tar; touch MARK", "x`id`.tar"])
def test_a_shard_index_naming_anything_but_a_plain_file_is_refused(tmp_path, name, monkeypatch, capsys):
    """index.json names are joined to the set's folder/URL and spliced into pipe: commands (run by a shell):
    a name with a path or shell syntax is refused, naming the index and the entry, before anything is read or run."""
    from lm_mini.data.shard_reader import list_shards

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "set"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    index = {"format": json.loads((Path(__file__).parents[2] / "data_shards/demo/eval/index.json").read_text())["format"],
             "shards": [{"name": "shard-000000.tar", "samples": 0}, {"name": name, "samples": 1}]}
    (shards / "index.json").write_text(json.dumps(index))
    for path in (str(shards), f"pipe:cat {shards}/shard-*.tar"):
        with pytest.raises(ValueError, match=r"shards\[1\] has name") as info:
            list_shards(path)
        assert repr(name) in str(info.value)
    assert main(["shards", "inspect", f"pipe:cat {shards}/shard-*.tar"]) != 0
    assert not list(tmp_path.rglob("MARK*")) and "shards[1] has name" in capsys.readouterr().out
