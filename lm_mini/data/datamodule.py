"""The ``LightningDataModule``: streaming train/val loaders built from the whole config.

The work is done in :mod:`lm_mini.data.streaming` (planned, resumable loader; see its docstring
and :mod:`lm_mini.data.plan` for how shards are split by rank, then worker) and
:mod:`lm_mini.data.samples` (records -> batches). Lightning saves and restores the train
loader's position itself, because the loader has ``state_dict``/``load_state_dict``.

Skip counts: :meth:`LmMiniDataModule.skip_counts` is this rank's running total per reason for the
training samples delivered so far, resumed runs included (the total lives in the loader's state);
summing over ranks is the logger's job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import lightning as L

from lm_mini.data.samples import SampleProcessor
from lm_mini.data.streaming import StreamingLoader, build_loader, build_processor


class LmMiniDataModule(L.LightningDataModule):
    """Train/val loaders from ``cfg.data`` (+ ``cfg.model`` for pixels, ``cfg.seed``).

    ``rank`` / ``world_size`` default to the trainer's (0 / 1 without one); tests pass them to
    simulate the ranks of a distributed job in one process.
    """

    def __init__(self, cfg: Any, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.cfg, self._rank, self._world = cfg, rank, world_size
        self._processor: Optional[SampleProcessor] = None
        self.train_loader: Optional[StreamingLoader] = None

    @property
    def processor(self) -> SampleProcessor:
        """Tokenizer + image processing, built once (the tokenizer loads from disk)."""
        if self._processor is None:
            self._processor = build_processor(self.cfg)
        return self._processor

    def _placement(self) -> Tuple[int, int]:
        trainer = self.trainer
        rank = self._rank if self._rank is not None else (trainer.global_rank if trainer else 0)
        world = self._world if self._world is not None else (trainer.world_size if trainer else 1)
        return rank, world

    def train_dataloader(self) -> StreamingLoader:
        # A loader made anew mid-fit (reload_dataloaders_every_n_epochs) starts at the trainer's epoch.
        start = self.trainer.current_epoch if self.trainer else 0
        rank, world = self._placement()
        self.train_loader = build_loader(self.cfg, True, rank, world, start, self.processor)
        return self.train_loader

    def val_dataloader(self, batch_size: Optional[int] = None, max_samples_per_set: Optional[int] = None) -> StreamingLoader:
        """``data.val`` in order; the generation eval asks for ``eval.batch_size`` (validation loss: ``data.batch_size``)
        and the first ``eval.max_samples`` of each set."""
        rank, world = self._placement()
        return build_loader(self.cfg, False, rank, world, processor=self.processor, batch_size=batch_size,
                            max_samples_per_set=max_samples_per_set)

    def skip_counts(self) -> Dict[str, int]:
        """Skipped (or truncated / mask-unaligned) training samples per reason so far on this rank."""
        return self.train_loader.skips.as_dict() if self.train_loader is not None else {}


def check_data_paths(cfg: Any) -> None:
    """Raise ``FileNotFoundError`` naming the config key when a shard set or the tokenizer is not where
    ``cfg.data`` says, or a set's index says it is empty, before a run directory or MLflow run exists
    (relative paths are relative to the working directory, as in ``experiments/demo.yaml``). A remote set
    (URL, ``pipe:``) must have its ``index.json`` readable, with the environment's credentials, now."""
    from lm_mini.data.remote import RemoteOptions, is_remote
    from lm_mini.data.shard_reader import find_shards

    remote = RemoteOptions.from_config(getattr(cfg.data, "remote", None))
    where = f"(relative paths are relative to the working directory, {Path.cwd()})"
    for key in ("train", "val"):
        for i, shard_set in enumerate(cfg.data[key]):
            try:
                counts = find_shards(shard_set.path, remote)[1]
            except (OSError, ValueError) as e:
                hint = "" if is_remote(shard_set.path) else f" {where}"
                raise FileNotFoundError(f"data.{key}[{i}].path: {e}{hint}") from e
            if counts is not None and sum(counts) == 0:  # its index.json says so (every record was skipped)
                raise FileNotFoundError(f"data.{key}[{i}].path: {shard_set.path} holds no samples (see its skipped.json)")
    if not Path(cfg.data.tokenizer).is_dir():
        raise FileNotFoundError(f"data.tokenizer: tokenizer directory not found: {cfg.data.tokenizer} {where}")


def build_datamodule(cfg: Any, rank: Optional[int] = None, world_size: Optional[int] = None) -> LmMiniDataModule:
    return LmMiniDataModule(cfg, rank=rank, world_size=world_size)
