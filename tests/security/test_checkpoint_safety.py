"""Opening a checkpoint never runs code from it (issue 14).

A checkpoint whose pickle carries a code-running object is refused by export, eval, generate, chat,
analyze, train.init_from and --resume (file or FSDP folder: its .metadata, its pickled items, its meta.pt),
with a message naming the file, the type and the opt-in; the code does not run (its marker file never
appears). ``--trust-checkpoint`` runs it, as it says. Our own checkpoints still open and resume
(tests/training/test_module.py and test_distributed.py prove resume bit-exact under the same reader).
"""
from __future__ import annotations

import os
import pickle

import pytest
from mlflow import MlflowClient
import torch
from PIL import Image

from security_helpers import TOKENIZER, RunsCode, run_with_checkpoint, sharded_checkpoint, with_payload_in_metadata
from training_helpers import ROOT, TinyData, tiny_config
from lm_mini.cli import main
from lm_mini.models.llava_mini import LlavaMini
from lm_mini import runs
from lm_mini.interop import checkpoint as ckpt
from lm_mini.training.module import LmMiniModule, init_weights_from
from lm_mini.training.run import train
from lm_mini.trust import TRUST_CHECKPOINTS_ENV, UntrustedCheckpoint

EVAL_SHARDS = ROOT / "data_shards" / "demo" / "eval"


def _assert_refused(text: str, path, marker) -> None:
    assert "refused to open this checkpoint" in text and str(path) in text, text
    assert "builtins.exec" in text and "--trust-checkpoint" in text and "RUNS ARBITRARY CODE" in text, text
    assert not marker.exists(), "the checkpoint's code ran"


def test_the_payload_runs_when_a_checkpoint_is_unpickled_the_unsafe_way(tmp_path, marker):
    """The hostile file is live: plain unpickling runs its code (so the refusals below are real)."""
    _, _, path = run_with_checkpoint(tmp_path, RunsCode(marker))
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["export", "eval", "generate", "chat", "analyze"])
def test_every_command_that_opens_a_checkpoint_refuses_one_that_runs_code(command, tmp_path, marker, capsys, monkeypatch):
    _, run, path = run_with_checkpoint(tmp_path, RunsCode(marker))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    argv = {
        "export": ["export", str(path), "--out", str(tmp_path / "out")],
        "eval": ["eval", str(run), "--data", str(EVAL_SHARDS), "--no-mlflow", "--device", "cpu"],
        "generate": ["generate", str(path), "--image", str(image), "--prompt", "What colour?", "--device", "cpu"],
        "chat": ["chat", str(run), "--image", str(image), "--device", "cpu"],
        "analyze": ["analyze", "attention", str(path), "--data", str(EVAL_SHARDS)],
    }[command]
    assert main(argv) != 0
    _assert_refused(capsys.readouterr().err, path, marker)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_init_from_refuses_a_checkpoint_that_runs_code(tmp_path, marker):
    cfg, _, path = run_with_checkpoint(tmp_path, RunsCode(marker))
    module = LmMiniModule(cfg, init_from=str(path))
    with pytest.raises(UntrustedCheckpoint) as info:
        module.configure_model()  # where train.init_from is read
    _assert_refused(str(info.value), path, marker)


@pytest.mark.timeout(240)
def test_resume_refuses_a_checkpoint_that_runs_code_and_still_resumes_our_own(tmp_path, marker):
    """--resume auto takes the newest checkpoint: a planted one (file, or FSDP folder) is refused before Lightning
    reads it; with it gone, the run's own checkpoint resumes under the same reader."""
    cfg = tiny_config(tmp_path, f"data.tokenizer={TOKENIZER}", "train.max_steps=2")
    first = train(cfg, datamodule=TinyData(32))
    own = runs.latest_checkpoint(first.run.checkpoints)
    assert own.name == "step=00000002.ckpt"

    planted = first.run.checkpoints / "step=00000004.ckpt"
    torch.save({**torch.load(own, weights_only=True), "global_step": 4, "extra": RunsCode(marker)}, planted)
    cfg.train.max_steps = 6
    config_before = (first.run.dir / "config.yaml").read_text()
    with pytest.raises(UntrustedCheckpoint) as info:
        train(cfg, resume="auto", datamodule=TinyData(32))
    _assert_refused(str(info.value), planted, marker)
    # refused before the run is touched: its config and its MLflow run are as the first session left them
    assert (first.run.dir / "config.yaml").read_text() == config_before
    assert MlflowClient(first.tracking_uri).get_run(first.mlflow_run_id).info.status == "FINISHED"

    planted.unlink()  # an FSDP folder in its place: code in the .metadata that torch's reader unpickles as is
    weights = {f"model.{k}": v for k, v in LlavaMini.from_config(cfg.model).state_dict().items()}
    folder = with_payload_in_metadata(sharded_checkpoint(planted, weights), marker)
    with pytest.raises(UntrustedCheckpoint) as info:
        train(cfg, resume=str(folder), datamodule=TinyData(32))
    _assert_refused(str(info.value), folder / ".metadata", marker)
    assert runs.list_checkpoints(first.run.checkpoints) == [own, folder]  # nothing saved by the refused attempts

    import shutil

    shutil.rmtree(folder)
    cfg.train.max_steps = 4
    resumed = train(cfg, resume="auto", datamodule=TinyData(32))  # our own step-2 checkpoint, weights_only
    assert resumed.global_step == 4 and not marker.exists()


@pytest.mark.parametrize("where", ["metadata", "item", "meta.pt"])
def test_a_sharded_checkpoint_with_code_anywhere_is_refused_by_every_reader(where, tmp_path, marker, capsys):
    """FSDP folders: torch reads .metadata with pickle.load and the shards' non-tensor items with
    torch.load(weights_only=False); Lightning reads meta.pt. Each is refused by export, init_from and resume."""
    cfg, run, _ = run_with_checkpoint(tmp_path, None)
    model = LlavaMini.from_config(cfg.model)
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    folder = run / "checkpoints" / "step=00000004.ckpt"
    sharded_checkpoint(folder, {**weights, **({"model.extra": RunsCode(marker)} if where == "item" else {})},
                       meta={"global_step": 4, "epoch": 0, **({"loops": RunsCode(marker)} if where == "meta.pt" else {})})
    if where == "metadata":
        with_payload_in_metadata(folder, marker)
    offending = {"metadata": folder / ".metadata", "item": folder, "meta.pt": folder / "meta.pt"}[where]

    for read in (lambda: ckpt.read_checkpoint_weights(folder), lambda: ckpt.load_checkpoint(folder),
                 lambda: ckpt.verified(folder), lambda: init_weights_from(model, str(folder))):
        with pytest.raises(UntrustedCheckpoint) as info:
            read()
        _assert_refused(str(info.value), offending, marker)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    _assert_refused(capsys.readouterr().err, offending, marker)


def test_a_sharded_checkpoint_whose_metadata_points_outside_its_folder_is_refused(tmp_path):
    cfg, run, _ = run_with_checkpoint(tmp_path, None)
    weights = {f"model.{k}": v for k, v in LlavaMini.from_config(cfg.model).state_dict().items()}
    folder = sharded_checkpoint(run / "checkpoints" / "step=00000004.ckpt", weights)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../../../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UntrustedCheckpoint, match=r"leaves the checkpoint folder \('\.\./\.\./\.\./\.\./etc/passwd'\)"):
        ckpt.read_checkpoint_weights(folder)


def test_our_own_sharded_checkpoint_opens_under_the_strict_reader(tmp_path):
    """Everything Lightning's FSDP2 save puts in a folder (tensors, optimizer hyper-parameters as pickled items,
    meta.pt) is within the allow-lists: read whole, weights only, and verified for resume."""
    cfg, run, _ = run_with_checkpoint(tmp_path, None)
    model = LlavaMini.from_config(cfg.model)
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    optimizer = {"param_groups": [{"name": "llm", "lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": ["a"]}]}
    folder = sharded_checkpoint(run / "checkpoints" / "step=00000004.ckpt", weights, extra={"optimizer_0": optimizer},
                                meta={"global_step": 4, "epoch": 0, "rng_states": {"torch": torch.get_rng_state()},
                                      "lm_mini_unconfirmed_metrics": [({"train/loss": 1.5}, 3, 1700000000000)]})
    ckpt.verified(folder)
    full = ckpt.load_checkpoint(folder)
    assert full["optimizer_0"] == optimizer and full["global_step"] == 4
    state, info = ckpt.read_checkpoint_weights(folder)
    assert info == {"global_step": 4, "epoch": 0}
    assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], model.state_dict()[k]) for k in state)


def test_trust_checkpoint_runs_the_file_as_it_says_and_only_for_that_command(tmp_path, marker, capsys):
    _, _, path = run_with_checkpoint(tmp_path, RunsCode(marker))
    before = os.environ.get(TRUST_CHECKPOINTS_ENV)
    assert main(["export", str(path), "--out", str(tmp_path / "safe"), "--trust-checkpoint"]) == 0
    assert marker.exists()  # the opt-in is what it says: the file's code ran
    assert os.environ.get(TRUST_CHECKPOINTS_ENV) == before  # and it ended with the command
    marker.unlink()
    # the converted copy is a model directory (safetensors): it opens without trust and without running anything
    assert main(["export", str(tmp_path / "safe"), "--out", str(tmp_path / "again")]) == 0
    assert not marker.exists()


def test_a_sharded_checkpoint_with_only_rank_local_metadata_is_refused(tmp_path, marker):
    """Without .metadata, DCP falls back to the rank-local __N.metadata files and unpickles them as they are."""
    cfg, run, _ = run_with_checkpoint(tmp_path, None)
    weights = {f"model.{k}": v for k, v in LlavaMini.from_config(cfg.model).state_dict().items()}
    folder = sharded_checkpoint(run / "checkpoints" / "step=00000004.ckpt", weights)
    (folder / ".metadata").unlink()
    (folder / "__0.metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    for read in (lambda: ckpt.verified(folder), lambda: ckpt.read_checkpoint_weights(folder)):
        with pytest.raises(UntrustedCheckpoint, match=r"rank-local metadata only \(__0\.metadata, no \.metadata\)"):
            read()
    assert not marker.exists()
