"""Export: run / checkpoint (single file or FSDP shards) -> model directory -> load_pretrained, losslessly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from interop_helpers import ROOT, image_batch, tiny_config

from lm_mini.cli import main
from lm_mini.config import to_yaml
from lm_mini.interop.export import export, load_model
from lm_mini.interop.pretrained import WEIGHTS_INDEX, WeightsMismatch, load_pretrained, read_safetensors
from lm_mini.models.llava_mini import LlavaMini


def run_dir(root: Path, tokenizer_dir: Path, model: LlavaMini, cfg) -> Path:
    """A run directory as ``lm-mini train`` leaves it: config.yaml, mlflow.json, a Lightning checkpoint."""
    run = root / "runs" / "demo" / "finetune-1"
    (run / "checkpoints").mkdir(parents=True)
    cfg.data.tokenizer = str(tokenizer_dir)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "mlflow.json").write_text(json.dumps({"tracking_uri": "sqlite:///mlflow.db", "run_id": "0123abcd", "experiment": "demo"}))
    # LmMiniModule holds the network as ``self.model``: Lightning stores its weights as model.*
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 6, "epoch": 0}, run / "checkpoints" / "step=00000006.ckpt")
    return run


@pytest.fixture
def trained(tmp_path, tokenizer_dir):
    torch.manual_seed(3)
    cfg = tiny_config(template="vicuna_v1")
    model = LlavaMini.from_config(cfg.model).eval()
    return model, run_dir(tmp_path, tokenizer_dir, model, cfg)


def test_export_round_trip_gives_identical_logits_and_tokens(trained, tmp_path):
    model, run = trained
    out = export(run, tmp_path / "export", max_shard_size="100KB")
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    assert set(index["weight_map"]) == set(model.state_dict())
    for name in ("config.json", "config.yaml", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "0123abcd" in card and "step 6" in card and "## Training config" in card and "template: vicuna_v1" in card
    assert json.loads((out / "config.json").read_text())["compressor_size"] == 2
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert len(set(modes.values())) == 1, f"weights as readable as the other files: {modes}"

    loaded, batch = load_pretrained(out), image_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    prompt = {k: v for k, v in batch.items()}
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6), model.generate(prompt, max_new_tokens=6))


def test_checkpoint_path_and_run_path_export_the_same(trained, tmp_path):
    model, run = trained
    a = read_safetensors(export(run, tmp_path / "a"))
    b = read_safetensors(export(run / "checkpoints" / "step=00000006.ckpt", tmp_path / "b"))
    assert a.keys() == b.keys() == model.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_reads_runs_and_checkpoints(trained):
    model, run = trained
    loaded, cfg = load_model(run)
    assert cfg.data.template == "vicuna_v1" and Path(cfg.data.tokenizer).is_dir()
    batch = image_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def _shard_and_save(rank: int, world: int, store: str, cfg_yaml: str, folder: str) -> None:
    """One FSDP2 rank: build the seeded model, shard it over the ranks, save the shards (DCP) as Lightning does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lm_mini.training.strategy import shard_model

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(3)
    model = LlavaMini.from_config(OmegaConf.create(cfg_yaml).model)
    shard_model(model, init_device_mesh("cpu", (world,)))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert all(isinstance(v, DTensor) for k, v in state.items() if not k.endswith("pos_embed")), "not sharded"
    dcp.save({"state_dict": state}, checkpoint_id=folder)
    if rank == 0:
        torch.save({"global_step": 6, "epoch": 0}, Path(folder) / "meta.pt")  # Lightning's extra file
    # Both ranks done before either tears gloo down: a rank that destroyed its group while the other still held
    # connections aborted now and then ("terminate called without an active exception", SIGABRT in CI).
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_sharded_checkpoint_exports_the_same_tensors(trained, tmp_path):
    model, run = trained
    folder = run / "checkpoints" / "step=00000008.ckpt"
    # spawn, not fork: forking a process that already runs torch/MLflow threads can deadlock the children
    torch.multiprocessing.start_processes(_shard_and_save, nprocs=2, start_method="spawn",
                                          args=(2, str(tmp_path / "store"), (run / "config.yaml").read_text(), str(folder)))
    assert len(list(folder.glob("*.distcp"))) == 2  # one shard file per rank
    sharded = read_safetensors(export(folder, tmp_path / "sharded"))
    unsharded = read_safetensors(export(run / "checkpoints" / "step=00000006.ckpt", tmp_path / "unsharded"))
    assert sharded.keys() == unsharded.keys()
    assert all(torch.equal(sharded[k], unsharded[k]) for k in sharded)
    # the same folder made one file by the training tools (step=N.ckpt.consolidated) exports the same too
    tool = importlib.util.spec_from_file_location("consolidate", ROOT / "tools" / "consolidate_checkpoint.py")
    consolidate = importlib.util.module_from_spec(tool)
    tool.loader.exec_module(consolidate)
    one_file = consolidate.consolidate(folder, folder.with_name(folder.name + ".consolidated"))
    via_tool = read_safetensors(export(one_file, tmp_path / "one"))
    assert via_tool.keys() == sharded.keys() and all(torch.equal(via_tool[k], sharded[k]) for k in sharded)


def test_export_errors_name_the_problem(trained, tmp_path, capsys):
    model, run = trained
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such model directory, run directory or checkpoint" in capsys.readouterr().err
    assert main(["export", str(run / "checkpoints"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    empty = tmp_path / "runs" / "demo" / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["export", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err

    ckpt = run / "checkpoints" / "step=00000006.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["state_dict"]["model.compressor.extra"] = torch.zeros(1)
    del checkpoint["state_dict"]["model.llm.model.norm.weight"]
    torch.save(checkpoint, ckpt)
    with pytest.raises(WeightsMismatch) as info:
        export(run, tmp_path / "o")
    assert info.value.unexpected == ["compressor.extra"] and info.value.missing == ["llm.model.norm.weight"]


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path, tokenizer_dir):
    from interop_helpers import LLAMA

    from lm_mini.interop.pretrained import save_pretrained

    torch.manual_seed(6)
    cfg = tiny_config(llm={"config": {**LLAMA, "tie_word_embeddings": True}})
    model = LlavaMini.from_config(cfg.model).eval()
    out = save_pretrained(tmp_path / "tied", model.state_dict(), cfg, tokenizer_dir, card="# tied\n")
    stored = read_safetensors(out)
    assert len(stored) == len(model.state_dict()) - 1  # embed_tokens and lm_head: one tensor on disk
    loaded, batch = load_pretrained(out), image_batch(seed=8)
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_export_pins_parts_built_from_local_paths(tmp_path, tokenizer_dir):
    """A run whose LLM and encoder came from local directories exports a directory that needs neither."""
    import shutil

    from interop_helpers import CLIP, LLAMA
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(9)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(tmp_path / "clip")
    cfg = tiny_config(llm={"config": {}, "path": str(tmp_path / "llama")}, encoder={"name": "hf_clip", "path": str(tmp_path / "clip")})
    model = LlavaMini.from_config(cfg.model).eval()
    out = export(run_dir(tmp_path, tokenizer_dir, model, cfg), tmp_path / "export")
    shutil.rmtree(tmp_path / "llama"), shutil.rmtree(tmp_path / "clip")
    loaded, batch = load_pretrained(out), image_batch(seed=10)
    exported = OmegaConf.load(out / "config.yaml").model
    assert exported.llm.path is None and exported.llm.config.hidden_size == 64
    assert exported.encoder.path is None and exported.encoder.config.image_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_bfloat16_model_round_trips_in_bfloat16(tmp_path, tokenizer_dir):
    """Released checkpoints are bf16: loading builds in bf16 directly, buffers (rotary, sin-cos) included."""
    from lm_mini.interop.pretrained import save_pretrained

    torch.manual_seed(11)
    cfg = tiny_config()
    cfg.model.dtype = "bfloat16"
    model = LlavaMini.from_config(cfg.model).eval()
    loaded = load_pretrained(save_pretrained(tmp_path / "bf16", model.state_dict(), cfg, tokenizer_dir, card="# bf16\n"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.llm.model.rotary_emb.inv_freq, model.llm.model.rotary_emb.inv_freq)
    batch = image_batch(seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    assert torch.equal(loaded.generate(batch, max_new_tokens=5), model.generate(batch, max_new_tokens=5))


def test_training_can_start_from_a_model_directory(tmp_path, tokenizer_dir):
    """``train.init_from=<model directory>``: fine-tune an imported release or an exported model."""
    from lm_mini.interop.pretrained import save_pretrained
    from lm_mini.training.module import LmMiniModule

    torch.manual_seed(13)
    cfg = tiny_config()
    model = LlavaMini.from_config(cfg.model)
    out = save_pretrained(tmp_path / "release", model.state_dict(), cfg, tokenizer_dir, card="# r\n")
    module = LmMiniModule(cfg, init_from=str(out))
    module.configure_model()
    mine, theirs = module.model.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_load_pretrained_names_what_does_not_fit(trained, tmp_path):
    from safetensors.torch import save_file

    model, run = trained
    out = export(run, tmp_path / "export")
    state = read_safetensors(out)
    state["projector.0.weight"] = torch.zeros(3, 3)
    del state["compressor.query"]
    (out / "model.safetensors").unlink()
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(WeightsMismatch) as info:
        load_pretrained(out)
    assert info.value.missing == ["compressor.query"]
    assert info.value.mismatched == ["projector.0.weight: [3, 3] in the checkpoint, the model has [64, 32]"]


def test_an_exported_model_with_a_user_compressor_names_that_code_in_its_card_and_when_loaded(tmp_path, tokenizer_dir, monkeypatch):
    """A compressor given as package.module:Class is code the model directory does not carry: its card says which,
    and loading it without that import allowed says the same (the name, and --allow-import)."""
    from lm_mini.config import ConfigError
    from lm_mini.trust import ALLOW_IMPORTS_ENV

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))
    monkeypatch.delenv(ALLOW_IMPORTS_ENV, raising=False)
    plugin = "my_compressor:GatedPoolCompressor"
    cfg = tiny_config(template="vicuna_v1", compressor={"name": plugin, "grid": 2, "options": {}})
    model = LlavaMini.from_config(cfg.model).eval()
    monkeypatch.setenv(ALLOW_IMPORTS_ENV, plugin)  # the run's config imports it too: the exporter allows it
    out = export(run_dir(tmp_path, tokenizer_dir, model, cfg), tmp_path / "export")
    monkeypatch.delenv(ALLOW_IMPORTS_ENV)
    card = (out / "README.md").read_text()
    assert "## Code this model needs" in card and f"`model.compressor.name: {plugin}`" in card
    assert f"--allow-import {plugin}" in card and "PYTHONPATH" in card
    with pytest.raises(ConfigError, match=rf"model.compressor.name.*{plugin}.*--allow-import {plugin}"):
        load_pretrained(out)
    monkeypatch.setenv(ALLOW_IMPORTS_ENV, plugin)
    assert type(load_pretrained(out).compressor).__name__ == "GatedPoolCompressor"
    plain = tiny_config(template="vicuna_v1")
    out = export(run_dir(tmp_path / "b", tokenizer_dir, LlavaMini.from_config(plain.model), plain), tmp_path / "plain")
    assert "## Code this model needs" not in (out / "README.md").read_text()


class _RunsCode:
    """Unpickling it creates ``marker``: proof that reading the file ran code from it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_consolidate_tool_refuses_a_code_running_checkpoint_in_one_line_and_takes_trust_checkpoint(trained, tmp_path, capsys, monkeypatch):
    import warnings

    import torch.distributed.checkpoint as dcp

    from lm_mini.trust import TRUST_CHECKPOINTS_ENV

    monkeypatch.delenv(TRUST_CHECKPOINTS_ENV, raising=False)
    model, run = trained
    folder = run / "checkpoints" / "step=00000008.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process saves every shard
        dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=folder)
    marker = tmp_path / "ran"
    torch.save({"global_step": 8, "epoch": 0, "loops": _RunsCode(marker)}, folder / "meta.pt")
    tool = importlib.util.spec_from_file_location("consolidate", ROOT / "tools" / "consolidate_checkpoint.py")
    consolidate = importlib.util.module_from_spec(tool)
    tool.loader.exec_module(consolidate)

    assert consolidate.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"consolidate_checkpoint: {folder / 'meta.pt'}: refused to open this checkpoint") and err.count("\n") == 1
    assert "--trust-checkpoint" in err and "Traceback" not in err
    assert not marker.exists() and not folder.with_name(folder.name + ".consolidated").exists()
    # the flag the message names is the tool's own (and, as it warns, runs the file's code)
    assert consolidate.main([str(folder), "--trust-checkpoint"]) == 0
    assert marker.exists() and folder.with_name(folder.name + ".consolidated").is_file()
    assert TRUST_CHECKPOINTS_ENV not in __import__("os").environ  # the opt-in lasts for the call only
    assert consolidate.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
