"""Writing checkpoints atomically: Lightning's ``CheckpointIO`` for single files, and the helpers the FSDP2 strategy
uses for its folders of shards (``training/strategy.py``).

A checkpoint is ``<run>/checkpoints/step=00000040.ckpt`` (``lm_mini.runs``): a single file (single device, DDP) or
a folder of per-rank shards plus ``meta.pt`` (FSDP2, torch distributed checkpoint). Either kind is first written
under a ``.tmp`` name and renamed when complete, so whatever carries the final name is complete: a job killed
mid-save leaves only a ``.tmp`` leftover, which resume ignores and removes. Reading checkpoints (without running
code from them) is ``lm_mini.interop.checkpoint``'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_mini.interop.checkpoint import refusing_unsafe
from lm_mini.runs import tmp_path
from lm_mini.trust import checkpoints_trusted


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

    def load_checkpoint(self, path: Union[str, Path], map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Lightning's read of a resumed checkpoint file: ``weights_only`` unless checkpoints are trusted
        (or the caller says ``weights_only=False`` itself). FSDP folders do not come here: see ``lm_mini.interop.checkpoint.verified``."""
        kwargs = {} if map_location is None else {"map_location": map_location}  # None: Lightning's default (CPU)
        if weights_only is False or checkpoints_trusted():
            return super().load_checkpoint(path, weights_only=False, **kwargs)
        with refusing_unsafe(path):
            return super().load_checkpoint(path, weights_only=True, **kwargs)
