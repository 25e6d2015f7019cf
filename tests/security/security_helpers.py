"""Hostile inputs for the security tests: a pickle that runs code, and checkpoints that carry it.

``RunsCode(marker)`` unpickles as ``exec("open(marker, 'w').close()")``: harmless, but the marker file
appearing is proof that opening the file ran code from it (the issue's report used a shell command).
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from training_helpers import ROOT, tiny_config
from lm_mini.config import to_yaml
from lm_mini.models.llava_mini import LlavaMini

TOKENIZER = ROOT / "data_shards" / "demo" / "tokenizer"


class RunsCode:
    """Unpickling this object creates ``marker`` (pickle calls what ``__reduce__`` names: here ``exec``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def run_with_checkpoint(tmp: Path, payload=None, *overrides: str):
    """``(cfg, run directory, checkpoint)``: a run as ``lm-mini train`` leaves it (config.yaml + one checkpoint
    of real weights), the checkpoint carrying ``payload`` among its entries when given."""
    cfg = tiny_config(tmp, f"data.tokenizer={TOKENIZER}", *overrides)
    run = Path(cfg.logging.runs_dir) / cfg.experiment / cfg.run_name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    model = LlavaMini.from_config(cfg.model)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 2, "epoch": 0}
    if payload is not None:
        checkpoint["callbacks"] = {"StepCheckpoint": {"monitor": payload}}
    path = run / "checkpoints" / "step=00000002.ckpt"
    torch.save(checkpoint, path)
    return cfg, run, path


def sharded_checkpoint(folder: Path, state_dict, extra=None, meta=None) -> Path:
    """A torch distributed checkpoint folder as Lightning's FSDP2 saves it (DCP shards + ``meta.pt``), from one
    process. ``extra``: more entries saved into the shards (non-tensors become pickled items); ``meta``: meta.pt."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": one process saves every shard, as intended here
        dcp.save({"state_dict": dict(state_dict), **(extra or {})}, checkpoint_id=folder)
    torch.save(meta if meta is not None else {"global_step": 2, "epoch": 0}, folder / "meta.pt")
    return folder


def with_payload_in_metadata(folder: Path, marker: Path) -> Path:
    """``folder``'s ``.metadata`` (which torch reads with plain pickle.load) replaced by a code-running pickle."""
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    return folder


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to
