"""Checkpoint files: atomic writes, finding the newest complete checkpoint, reading weights back.

A checkpoint is ``<run>/checkpoints/step=00000040.ckpt``: a single file (single device, DDP) or a
folder of per-rank shards plus ``meta.pt`` (FSDP2, torch distributed checkpoint). Either kind is
first written under a ``.tmp`` name and renamed when complete, so whatever carries the final name
is complete: a job killed mid-save leaves only a ``.tmp`` leftover, which resume ignores and removes.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"
_STEP_RE = re.compile(r"^step=(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    """The file/folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step={step:08d}.ckpt"


def tmp_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a rename durable: flush the directory entry itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp`` in the same folder, fsync, then ``os.replace``.

    Lightning's own ``_atomic_save`` goes through an fsspec transaction whose temporary file lives in
    the system temp folder; committing it is a copy across file systems (not atomic) whenever that
    folder is on another disk, which is the usual case on clusters (node-local /tmp).
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Union[str, Path], storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def list_checkpoints(directory: Union[str, Path]) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def remove_incomplete(directory: Union[str, Path]) -> List[Path]:
    """Delete ``.tmp`` leftovers of saves that were killed; returns what was removed."""
    directory = Path(directory)
    removed = []
    for p in directory.glob(f"*{TMP_SUFFIX}") if directory.is_dir() else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p)
    return removed


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A checkpoint as one dict (``state_dict``, ``global_step``, ...), whether a file or a sharded folder.

    Sharded folders are gathered into full tensors on the CPU (Lightning's own reader), so this
    needs the whole model in CPU memory.
    """
    path = Path(path)
    if path.is_dir():
        return _load_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def model_state_dict(checkpoint: Dict[str, Any], prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """The wrapped model's weights from a Lightning checkpoint (keys without the LightningModule prefix)."""
    state = checkpoint["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint_weights(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(model weights without the "model." prefix, the checkpoint's other small entries)`` of a Lightning checkpoint.

    Only the weights are read: a file is memory-mapped, and of a folder of FSDP shards (torch distributed
    checkpoint) only ``state_dict`` is gathered into full tensors. The optimizer states, twice the size of
    the model under Adam, never reach memory (:func:`load_checkpoint` reads everything).
    """
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        checkpoint: Dict[str, Any] = {}
        _load_state_dict(checkpoint, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
                         no_dist=True)
        extra = torch.load(path / "meta.pt", map_location="cpu", weights_only=False) if (path / "meta.pt").is_file() else {}
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        extra = checkpoint
    info = {k: extra[k] for k in ("global_step", "epoch") if k in extra}
    # contiguous CPU copies: safetensors wants plain storage, not views into a mapped file
    return {k: v.detach().contiguous() for k, v in model_state_dict(checkpoint).items()}, info
