"""Streaming data module: WebDataset shards -> padded batches, with exact mid-epoch resume.

Pieces, from the shards up:

- :class:`ShardSet` — one shard set's ``index.json`` (shard files and sample counts), weight and template.
- :class:`SampleProcessor` — one raw record -> token ids, labels and pixel views (or a ``SampleError``).
- :class:`StreamingDataset` — an ``IterableDataset`` that, in each DataLoader worker, reads exactly
  the samples :mod:`lm_mini.data.plan` assigns to this (rank, worker) for the epoch, in the plan's
  shuffled order. A sample that fails (corrupt image, malformed record, truncated shard, ...) is
  replaced by a *padding sample* (``sample_id`` None, every label IGNORE) so that every rank still
  yields the planned number of batches. Its iterator's state is ``(epoch, samples delivered)``:
  the plan is rebuilt on resume and the delivered prefix skipped without decoding anything.
- :func:`collate` — the batch contract of ``docs/internals.md`` plus a ``skipped`` tally per reason.
- :class:`StreamingLoader` — a torchdata ``StatefulDataLoader`` with ``__len__`` from the index
  counts (so Lightning does not fetch ahead, see STACK_NOTES) that numbers epochs itself and
  collects the skip tallies: it pops ``skipped`` from every batch it hands out and keeps the running
  total in its own ``state_dict``, so counts from worker processes reach the main process, match
  exactly the batches delivered, and survive a resume.
- :class:`LmMiniDataModule` — the ``LightningDataModule`` built from the whole config.

Epochs: Lightning's ``set_epoch`` hook only reaches a loader's *sampler*, and an ``IterableDataset``
loader has none of its own, so the loader counts passes: each fresh pass over it is the next epoch
(the first one is the trainer's ``current_epoch`` when the loader is made), a restored state
continues its own epoch, and ``set_epoch`` sets the next one explicitly.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from lm_mini.constants import IGNORE_INDEX
from lm_mini.data.errors import SampleError, SkipCounter
from lm_mini.data.plan import PAD, EpochPlan, SetSpec, fingerprint

SKIPPED = "skipped"  # batch key carrying {reason: count}; the loader pops it


# ------------------------------------------------------------------------------------- shard sets
@dataclass(frozen=True)
class ShardSet:
    """A shard set: its shard files (in ``index.json`` order), their sample counts, weight and template."""

    urls: tuple
    counts: tuple
    weight: float = 1.0
    template: Optional[str] = None  # None: data.template

    @classmethod
    def from_config(cls, cfg: Any) -> "ShardSet":
        root = Path(cfg.path)
        with open(root / "index.json") as f:
            index = json.load(f)
        shards = index["shards"]
        return cls(tuple(str(root / s["name"]) for s in shards), tuple(int(s["count"]) for s in shards),
                   float(cfg.weight), cfg.template)

    @property
    def spec(self) -> SetSpec:
        return SetSpec(self.counts, self.weight)


@dataclass
class _Raw:  # TEMPORARY stand-in for shards.RawSample until lm_mini.data.shards lands
    key: str
    record: Any
    media_kind: Optional[str]
    media_ext: Optional[str]
    media_bytes: Optional[bytes]
    source: Optional[str] = None


def read_shard(url: str) -> Iterator[Any]:
    """Raw records of one shard in order. (Seam for lm_mini.data.shards.iter_raw_samples.)"""
    import webdataset as wds

    for s in wds.tariterators.tarfile_samples([{"url": url}]):
        ext = next((e for e in ("jpg", "png", "webp", "mp4", "webm", "mkv", "avi") if e in s), None)
        kind = None if ext is None else ("image" if ext in ("jpg", "png", "webp") else "video")
        yield _Raw(s["__key__"], json.loads(s["json"]), kind, ext, s.get(ext))


# ------------------------------------------------------------------------------------- samples
class SampleProcessor:
    """Raw shard record -> model-ready sample dict; raises ``SampleError`` for a sample to skip."""

    def __init__(self, tokenizer: Any, template: str, max_length: int, image_processor: Any,
                 video_fps: float = 1.0, max_frames: int = 64):
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.images, self.video_fps, self.max_frames = image_processor, video_fps, max_frames

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def __call__(self, raw: Any, template: Optional[str] = None) -> Dict[str, Any]:
        from lm_mini.data.conversation import tokenize_conversation
        from lm_mini.data.media import decode_image, decode_video

        sid = raw.key
        record = raw.record if isinstance(raw.record, dict) else {}
        # Tokenize first: it is cheap and rejects malformed records before any decoding.
        tok = tokenize_conversation(record.get("conversations"), self.tokenizer, template or self.template,
                                    self.max_length, has_media=raw.media_kind is not None, sample_id=sid)
        pixels, frames = None, 0
        if raw.media_kind == "image":
            pixels, frames = self.images.image(decode_image(raw.media_bytes, sid)), 1
        elif raw.media_kind == "video":
            pixels = self.images.video(decode_video(raw.media_bytes, self.video_fps, self.max_frames, sid))
            frames = pixels.shape[0]
        flags = [r for r, on in (("too_long", tok.truncated), ("unaligned_mask", tok.unaligned)) if on]
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": pixels, "frames": frames,
                "is_video": raw.media_kind == "video", "sample_id": sid, "flags": flags}

    def padding(self, reason: Optional[str] = None) -> Dict[str, Any]:
        """A sample that trains nothing: one attended pad token (an all-masked row would make attention NaN)."""
        return {"input_ids": [self.pad_id], "labels": [IGNORE_INDEX], "pixel_values": None, "frames": 0,
                "is_video": False, "sample_id": None, "flags": [reason] if reason else []}


def collate(samples: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Samples -> the batch of docs/internals.md (right-padded), plus ``skipped`` {reason: count}."""
    length = max(len(s["input_ids"]) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, :k] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(s["labels"], dtype=torch.long)
        attention_mask[i, :k] = 1
    views = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(views) if views else None,
        "frames_per_sample": torch.tensor([s["frames"] for s in samples], dtype=torch.long),
        "is_video": torch.tensor([s["is_video"] for s in samples], dtype=torch.bool),
        "sample_ids": [s["sample_id"] for s in samples],
        SKIPPED: SkipCounter(itertools.chain.from_iterable(s["flags"] for s in samples)).as_dict(),
    }


class Collator:
    """Picklable ``collate`` with the pad id bound (workers receive it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples):
        return collate(samples, self.pad_id)


# ------------------------------------------------------------------------------------- streaming
class _SetCursor:
    """Reads one set's epoch stream forward: ``read(p)`` returns the raw record at stream position p."""

    def __init__(self, shard_set: ShardSet, stream: Any, reader: Callable[[str], Iterator[Any]]):
        self.set, self.stream, self.reader = shard_set, stream, reader
        self._open: Optional[tuple] = None  # (pass, shard) being read
        self._records: Iterator[Any] = iter(())
        self._next = 0  # offset of the next record in the open shard

    def read(self, position: int) -> Any:
        shard, offset = self.stream.locate(position)
        where = (position // self.stream.spec.size, shard)
        if where != self._open or offset < self._next:
            self._open, self._records, self._next = where, iter(self.reader(self.set.urls[shard])), 0
        # Records before ``offset`` belong to other workers or were delivered before a resume:
        # step over them without decoding.
        record = next(itertools.islice(self._records, offset - self._next, None), None)
        self._next = offset + 1
        if record is None:
            raise SampleError("truncated_tar", f"{self.set.urls[shard]} ends before sample {offset}")
        return record


class _WorkerStream:
    """One worker's samples for one epoch, in plan order; its state is (epoch, samples delivered)."""

    def __init__(self, dataset: "StreamingDataset", worker: int):
        self.dataset, self.worker = dataset, worker
        self.epoch = dataset.epoch
        self.delivered = 0
        self._gen: Optional[Iterator[Dict[str, Any]]] = None

    def _plan(self) -> EpochPlan:
        return self.dataset.plan(self.epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "delivered": self.delivered, "plan": fingerprint(self._plan(), self.worker)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._gen is not None:
            raise RuntimeError("load_state_dict after iteration started")
        self.epoch, self.delivered = int(state["epoch"]), int(state["delivered"])
        expected = fingerprint(self._plan(), self.worker)
        if state["plan"] != expected:
            raise ValueError(f"saved data position was made with {state['plan']}, this run has {expected}: "
                             "resume needs the same seed, world size, workers, batch size and shard sets")

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._gen is None:  # built lazily: a restored state must be loaded first
            self._gen = self._samples()
        sample = next(self._gen)
        self.delivered += 1
        return sample

    def _samples(self) -> Iterator[Dict[str, Any]]:
        ds, plan = self.dataset, self._plan()
        slots = plan.worker_slots(self.worker)
        order = plan.emit_order(len(slots), self.worker, ds.shuffle_buffer)[self.delivered:]
        pending = set(order.tolist())  # read indices still to emit
        cursors: Dict[int, _SetCursor] = {}
        held: Dict[int, Any] = {}  # read ahead, waiting for the buffer to emit them (<= buffer size)
        next_read = 0
        for i in order.tolist():
            while i not in held:
                j, next_read = next_read, next_read + 1
                if j in pending:
                    held[j] = self._read(slots[j], plan, cursors)
            raw = held.pop(i)
            pending.discard(i)
            yield self._process(raw, slots[i])

    def _read(self, slot: Any, plan: EpochPlan, cursors: Dict[int, _SetCursor]) -> Any:
        if slot.set_index == PAD:
            return None
        if slot.set_index not in cursors:
            cursors[slot.set_index] = _SetCursor(self.dataset.sets[slot.set_index], plan.stream(slot.set_index),
                                                 self.dataset.reader)
        try:
            return cursors[slot.set_index].read(slot.position)
        except SampleError as e:
            return e

    def _process(self, raw: Any, slot: Any) -> Dict[str, Any]:
        ds = self.dataset
        if raw is None:
            return ds.processor.padding()
        if isinstance(raw, SampleError):
            return ds.processor.padding(raw.reason)
        try:
            return ds.processor(raw, ds.sets[slot.set_index].template)
        except SampleError as e:
            return ds.processor.padding(e.reason)


class StreamingDataset(IterableDataset):
    """Samples of the shard sets for one rank, split over DataLoader workers by :class:`EpochPlan`.

    ``len()`` is the rank's sample count including padding — the same on every rank.
    """

    def __init__(self, sets: Sequence[ShardSet], processor: SampleProcessor, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, reader: Callable[[str], Iterator[Any]] = read_shard):
        self.sets, self.processor, self.reader = list(sets), processor, reader
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch = 0

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(tuple(s.spec for s in self.sets), seed=self.seed, epoch=epoch, rank=self.rank,
                         world_size=self.world_size, num_workers=self.num_workers,
                         batch_size=self.batch_size, shuffle=self.shuffle)

    def __len__(self) -> int:
        return self.plan(0).per_rank

    def __iter__(self) -> _WorkerStream:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != max(self.num_workers, 1):
            raise RuntimeError(f"dataset planned for {self.num_workers} workers runs in {workers}")
        return _WorkerStream(self, info.id if info is not None else 0)


class StreamingLoader(StatefulDataLoader):
    """StatefulDataLoader over a :class:`StreamingDataset` that numbers epochs and totals skips."""

    def __init__(self, dataset: StreamingDataset, *, start_epoch: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep the previous epoch's plan")
        super().__init__(dataset, batch_size=dataset.batch_size, num_workers=dataset.num_workers,
                         collate_fn=Collator(dataset.processor.pad_id), **kwargs)
        self.epoch = start_epoch  # epoch of the current (or upcoming) pass
        self._next_epoch = start_epoch
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next fresh pass."""
        self._next_epoch = epoch

    def _get_iterator(self):
        if self.next_iter_state is None:  # a fresh pass, not a restored one
            self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self.dataset.epoch = self.epoch  # workers copy the dataset when this iterator starts them
        return super()._get_iterator()

    def __iter__(self):
        return _TallyingIterator(super().__iter__(), self.skips)

    def state_dict(self) -> Dict[str, Any]:
        loader = super().state_dict()  # first, as it may start the upcoming pass (and fix its epoch)
        return {"epoch": self.epoch, "next_epoch": self._next_epoch, "skips": self.skips.as_dict(), "loader": loader}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self._next_epoch = int(state["epoch"]), int(state["next_epoch"])
        self.skips = SkipCounter(state["skips"])
        super().load_state_dict(state["loader"])


class _TallyingIterator:
    """Hands batches on, moving each batch's ``skipped`` tally into the loader's running total."""

    def __init__(self, inner: Iterator[Dict[str, Any]], total: SkipCounter):
        self.inner, self.total = inner, total

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = next(self.inner)
        self.total.update(batch.pop(SKIPPED, {}))
        return batch

    def __len__(self) -> int:
        return len(self.inner)


# ------------------------------------------------------------------------------------- data module
class LmMiniDataModule(L.LightningDataModule):
    """Train/val loaders from ``cfg.data`` (+ ``cfg.model`` for pixels, ``cfg.seed``).

    ``rank`` / ``world_size`` default to the trainer's (or 0 / 1 without one); tests pass them to
    simulate ranks in one process.
    """

    def __init__(self, cfg: Any, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.cfg, self._rank, self._world = cfg, rank, world_size
        self._processor: Optional[SampleProcessor] = None
        self.train_loader: Optional[StreamingLoader] = None
        self.val_loader: Optional[StreamingLoader] = None

    @property
    def processor(self) -> SampleProcessor:
        if self._processor is None:
            from lm_mini.data.media import ImageProcessor
            from lm_mini.data.tokenizer import load_tokenizer
            from lm_mini.models.encoders import image_preprocessing

            d, m = self.cfg.data, self.cfg.model
            size, mean, std = image_preprocessing(m.encoder)
            images = ImageProcessor(size, mean, std, d.aspect_mode, m.resolution_ratio)
            self._processor = SampleProcessor(load_tokenizer(d.tokenizer), d.template, d.max_length, images,
                                              d.video_fps, d.max_frames)
        return self._processor

    def _placement(self) -> tuple:
        trainer = self.trainer
        rank = self._rank if self._rank is not None else (trainer.global_rank if trainer else 0)
        world = self._world if self._world is not None else (trainer.world_size if trainer else 1)
        return rank, world

    def _dataset(self, sets: Sequence[ShardSet], shuffle: bool) -> StreamingDataset:
        d = self.cfg.data
        rank, world = self._placement()
        return StreamingDataset(sets, self.processor, seed=self.cfg.seed,
                                rank=rank, world_size=world, batch_size=d.batch_size, num_workers=d.num_workers,
                                shuffle=shuffle, shuffle_buffer=d.shuffle_buffer)

    def train_dataloader(self) -> StreamingLoader:
        start = self.trainer.current_epoch if self.trainer else 0
        sets = [ShardSet.from_config(s) for s in self.cfg.data.train]
        self.train_loader = StreamingLoader(self._dataset(sets, shuffle=True), start_epoch=start)
        return self.train_loader

    def val_dataloader(self) -> StreamingLoader:
        # Validation: every sample once, in index order; a weight only shapes the training mix.
        sets = [dataclasses.replace(ShardSet.from_config(s), weight=1.0) for s in self.cfg.data.val]
        self.val_loader = StreamingLoader(self._dataset(sets, shuffle=False))
        return self.val_loader

    def skip_counts(self) -> Dict[str, int]:
        """Skipped/altered training samples per reason so far on this rank (resumed runs included)."""
        return self.train_loader.skips.as_dict() if self.train_loader is not None else {}


def build_datamodule(cfg: Any, rank: Optional[int] = None, world_size: Optional[int] = None) -> LmMiniDataModule:
    return LmMiniDataModule(cfg, rank=rank, world_size=world_size)
