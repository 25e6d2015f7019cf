"""Streaming shards into batches: the planned, resumable ``IterableDataset`` and its loader.

- :class:`ShardSet` — a shard set's shard files and sample counts (its ``index.json``), weight, template.
- :class:`StreamingDataset` — in each DataLoader worker, reads exactly the samples that
  :class:`lm_mini.data.plan.EpochPlan` assigns to this (rank, worker) for the epoch, in the plan's
  shuffled order. A sample that fails (corrupt image, malformed record, truncated shard, ...) is
  replaced by a padding sample (``sample_id`` None, labels IGNORE) and counted, so every rank still
  yields its planned number of batches. The iterator's state is just ``(epoch, samples delivered)``:
  on resume the plan is rebuilt and the delivered prefix stepped over without decoding anything.
  Shards may be remote (``http(s)://``, ``s3://`` and other fsspec URLs, ``pipe:``): positions are
  the same, and a shard that fails mid-read is re-opened and read on from the record where it failed
  (``shards.read_shard``), so retries neither repeat nor skip a sample; one that stays unreachable
  gives ``shard_unavailable`` padding for each of its samples this worker had still to read.
- :class:`StreamingLoader` — a torchdata ``StatefulDataLoader`` whose ``__len__`` comes from the
  index counts (so Lightning does not fetch a batch ahead, see STACK_NOTES). It numbers epochs and
  keeps the running skip tally: it pops each batch's ``skipped`` entry (made in the worker that
  built the batch) as it hands the batch out, and saves the total in its ``state_dict`` — so the
  counts cover exactly the delivered batches, from every worker, across resumes.

Epochs: Lightning's ``set_epoch`` hook only reaches a loader's sampler, and an ``IterableDataset``
loader has none of its own, so the loader counts passes itself: each fresh pass is the next epoch
(starting at ``start_epoch``), a restored state continues its own epoch, ``set_epoch(e)`` sets the
next one. Workers must not be persistent: they copy the dataset (and its epoch) when they start.

Sample ids are ``"<set name>/<shard key>"`` (the set's directory name, with parent folders where two
sets' folders share a name: :func:`shard_set_names`): unique across a loader's sets, so a ledger over a
mixed epoch counts each sample's repeats exactly.

Length-grouped batches (``data.group_by_length = k``): each worker regroups its emitted samples in windows
of ``k`` batches by modality and length (:mod:`lm_mini.data.grouping`); windows start at batch edges, so
the guarantees above hold, and a resume regroups the window it stopped in.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from lm_mini.data.errors import SampleError, SkipCounter
from lm_mini.data.grouping import group_by_length, window_start
from lm_mini.data.plan import PAD, EpochPlan, SetSpec, Slot, fingerprint
from lm_mini.data.samples import SKIPPED, Collator, SampleProcessor
from lm_mini.data.remote import RemoteOptions, is_remote, local_path, redact, split
from lm_mini.data.shard_reader import Shard, count_tar_samples, list_shards, names_shards, read_shard


# ------------------------------------------------------------------------------------- shard sets
@dataclass(frozen=True)
class ShardSet:
    """Shard files or URLs (in ``index.json`` order) with their sample counts, plus mixing weight and template;
    ``sizes`` / ``checksums``: bytes and sha256 per shard from the index (empty without one)."""

    name: str
    urls: tuple
    counts: tuple
    weight: float = 1.0
    template: Optional[str] = None  # None: the record's own, else data.template
    sizes: tuple = ()
    checksums: tuple = ()

    @classmethod
    def from_config(cls, cfg: Any, name: Optional[str] = None, remote: Optional[RemoteOptions] = None) -> "ShardSet":
        """From a ``ShardSetConfig``: a directory with ``index.json``, or tars without one (a directory of
        them, e.g. img2dataset output, a tar, a glob/brace pattern), counted once from their headers; or a
        remote set (URL, ``pipe:``), read through its ``index.json`` (``remote``: how it is fetched).
        ``name``: from :func:`shard_set_names` over all the loader's sets (default: this set alone)."""
        path = str(cfg.path)
        shards = list_shards(path, remote)
        counts = [s.samples if s.samples is not None else count_tar_samples(s.url) for s in shards]
        indexed = all(s.samples is not None for s in shards)
        name = name or shard_set_names([path])[0]
        return cls(name, tuple(s.url for s in shards), tuple(int(c) for c in counts), float(cfg.weight), cfg.template,
                   tuple(s.bytes for s in shards) if indexed else (), tuple(s.sha256 for s in shards) if indexed else ())

    @property
    def spec(self) -> SetSpec:
        return SetSpec(self.counts, self.weight)

    def shard(self, i: int) -> Shard:
        """Shard ``i`` with what the index says of it (its count is the one the plan uses)."""
        return Shard(self.urls[i], self.counts[i], self.sizes[i] if self.sizes else None,
                     self.checksums[i] if self.checksums else None)


def shard_set_names(paths: Sequence[Any]) -> List[str]:
    """The sets' names in their sample ids (``<name>/<key>``): each set's directory name (for a tar or a
    pattern, the folder holding it), with as many parent folders as it takes to tell apart sets whose
    folders share a name (``coco/val``, ``gqa/val``); the same folder again is ``<name>#2``, ``#3``, ..."""
    dirs = [_folder_parts(str(p)) for p in paths]
    distinct = list(dict.fromkeys(dirs))
    depth = {d: 1 for d in distinct}
    while True:  # lengthen the names that two different folders share
        by_name: Dict[tuple, List[tuple]] = {}
        for d in distinct:
            by_name.setdefault(d[-depth[d]:], []).append(d)
        grow = [d for same in by_name.values() if len(same) > 1 for d in same if depth[d] < len(d)]
        if not grow:
            break
        for d in grow:
            depth[d] += 1
    names, seen = [], Counter()
    for d in dirs:
        name = "/".join(d[-depth[d]:])
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def _folder_parts(path: str) -> tuple:
    """The folder a set's path names, as parts: a directory or folder URL itself, else the folder of its tars."""
    if not is_remote(path):
        local = local_path(path)
        return Path(os.path.abspath(local if Path(local).is_dir() else Path(local).parent)).parts
    folder = split(path)[0] if names_shards(path) else path
    return tuple(part for part in folder.split("/") if part)


# ------------------------------------------------------------------------------------- one worker
class _SetCursor:
    """Reads one set's epoch stream forward: ``read(p)`` gives the record at stream position ``p``."""

    def __init__(self, shard_set: ShardSet, stream: Any, remote: Optional[RemoteOptions] = None):
        self.set, self.stream, self.remote = shard_set, stream, remote
        self._open: Optional[tuple] = None  # (pass, shard) being read
        self._records: Iterator[Any] = iter(())
        self._next = 0  # offset of the next record in the open shard
        self._ended: Optional[SampleError] = None  # why the open shard stopped early, once it has

    def read(self, position: int) -> Any:  # RawSample | SampleError
        shard, offset = self.stream.locate(position)
        where = (position // self.stream.spec.size, shard)
        if where != self._open or offset < self._next:
            self._open, self._next, self._ended = where, 0, None
            self._records = self._watch(read_shard(self.set.shard(shard), self.remote))
        # Records before ``offset`` belong to other workers or were delivered before a resume:
        # step over them undecoded.
        record = next(itertools.islice(self._records, offset - self._next, None), None)
        self._next = offset + 1
        if record is None:  # every later sample of a shard that stopped early counts under the same reason
            ended = self._ended
            return SampleError(ended.reason if ended else "truncated_tar",
                               f"{redact(self.set.urls[shard])} ends before its sample {offset}"
                               + (f" ({ended})" if ended else ""))
        return record

    def _watch(self, records: Iterator[Any]) -> Iterator[Any]:
        for record in records:
            if isinstance(record, SampleError) and record.reason in ("truncated_tar", "shard_unavailable"):
                self._ended = record
            yield record


class _WorkerStream:
    """One worker's samples for one epoch, in plan order. State: (epoch, samples delivered)."""

    def __init__(self, dataset: "StreamingDataset", worker: int):
        self.dataset, self.worker = dataset, worker
        self.epoch, self.delivered = dataset.epoch, 0
        self._samples: Optional[Iterator[Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "delivered": self.delivered, "plan": self._fingerprint()}

    def _fingerprint(self) -> dict:
        """What a saved position needs to mean the same samples: the plan's, and the grouping when on
        (left out when off, so positions saved before grouping existed stay valid)."""
        fp = fingerprint(self.dataset.plan(self.epoch), self.worker)
        if self.dataset.group_by_length:
            fp["group_by_length"] = self.dataset.group_by_length
        return fp

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._samples is not None:
            raise RuntimeError("cannot load a state into a stream that has started")
        self.epoch, self.delivered = int(state["epoch"]), int(state["delivered"])
        expected = self._fingerprint()
        if state["plan"] != expected:
            raise ValueError(f"the saved data position was made with {state['plan']}, this run has {expected}: "
                             "resuming needs the same seed, world size, workers, batch size, shuffle buffer, "
                             "length grouping and shard sets")

    def __iter__(self) -> "_WorkerStream":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._samples is None:  # started lazily: a restored state is loaded after iter()
            self._samples = self._generate()
        sample = next(self._samples)
        self.delivered += 1
        return sample

    def _generate(self) -> Iterator[Dict[str, Any]]:
        """The samples still to deliver this epoch. Grouped: from the start of the window the stream
        stopped in (regrouped as before), skipping what was delivered."""
        d, k = self.dataset, self.dataset.group_by_length
        start = window_start(self.delivered, d.batch_size, k)
        samples = self._emitted(start)
        if k:
            samples = group_by_length(samples, d.batch_size, k, (d.seed, self.epoch, d.rank, self.worker),
                                      first_window=start // (d.batch_size * k))
        return itertools.islice(samples, self.delivered - start, None)

    def _emitted(self, start: int) -> Iterator[Dict[str, Any]]:
        """Processed samples in the order the shuffle buffer emits them, from emit position ``start``."""
        plan = self.dataset.plan(self.epoch)
        slots = plan.worker_slots(self.worker)
        order = plan.emit_order(len(slots), self.worker)[start:].tolist()
        wanted = set(order)  # read indices still to emit; the others were delivered before a resume
        cursors: Dict[int, _SetCursor] = {}
        held: Dict[int, Any] = {}  # read, waiting in the shuffle buffer (at most shuffle_buffer of them)
        next_read = 0
        for i in order:
            while i not in held:
                if next_read in wanted:
                    held[next_read] = self._read(slots[next_read], plan, cursors)
                next_read += 1
            yield self._process(held.pop(i), slots[i])

    def _read(self, slot: Slot, plan: EpochPlan, cursors: Dict[int, _SetCursor]) -> Any:
        if slot.set_index == PAD:
            return None
        if slot.set_index not in cursors:
            cursors[slot.set_index] = _SetCursor(self.dataset.sets[slot.set_index], plan.stream(slot.set_index),
                                                 self.dataset.remote)
        return cursors[slot.set_index].read(slot.position)

    def _process(self, raw: Any, slot: Slot) -> Dict[str, Any]:
        processor = self.dataset.processor
        if raw is None:
            return processor.padding()
        if isinstance(raw, SampleError):
            return processor.padding(raw.reason)
        shard_set = self.dataset.sets[slot.set_index]
        try:
            return processor(raw, f"{shard_set.name}/{raw.key}", shard_set.template)
        except SampleError as e:
            return processor.padding(e.reason)


# ------------------------------------------------------------------------------------- dataset, loader
class StreamingDataset(IterableDataset):
    """The shard sets' samples for one rank; ``len()`` counts padding too and is equal on every rank.
    ``group_by_length``: batches per length-grouping window (0: off; see :mod:`lm_mini.data.grouping`).
    ``remote``: retries, timeouts and cache for shards read from URLs."""

    def __init__(self, sets: Sequence[ShardSet], processor: SampleProcessor, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, group_by_length: int = 0, remote: Optional[RemoteOptions] = None):
        self.sets, self.processor, self.remote = list(sets), processor, remote or RemoteOptions()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        if group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 (0: off), got {group_by_length}")
        self.group_by_length = group_by_length
        self.epoch = 0

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(tuple(s.spec for s in self.sets), seed=self.seed, epoch=epoch, rank=self.rank,
                         world_size=self.world_size, num_workers=self.num_workers,
                         batch_size=self.batch_size, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer)

    def __len__(self) -> int:
        return self.plan(self.epoch).per_rank

    def __iter__(self) -> _WorkerStream:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != max(self.num_workers, 1):
            raise RuntimeError(f"dataset planned for {self.num_workers} workers runs in {workers}")
        if info is not None:
            # Ctrl-C reaches the workers too; the trainer decides what it means (checkpoint at the next step,
            # then stop) and shuts its workers down itself, so a worker must not die of it first.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return _WorkerStream(self, info.id if info is not None else 0)


class StreamingLoader(StatefulDataLoader):
    """``StatefulDataLoader`` over a :class:`StreamingDataset` that numbers epochs and totals skips.

    A restored state in which every batch of its epoch had been delivered counts as a finished
    epoch: the next pass is the next epoch. (Lightning restores a checkpoint taken at an epoch's
    last batch and then starts the next epoch with one pass; resuming the spent epoch would make
    that pass empty and lose a whole epoch — as it does with a plain ``StatefulDataLoader``.)
    """

    def __init__(self, dataset: StreamingDataset, *, start_epoch: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep the previous epoch in their dataset copy")
        super().__init__(dataset, batch_size=dataset.batch_size, num_workers=dataset.num_workers,
                         collate_fn=Collator(dataset.processor.pad_id), **kwargs)
        self.epoch = self._next_epoch = start_epoch
        self.delivered = 0  # batches of this epoch handed out
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next fresh pass."""
        self._next_epoch = epoch

    def _get_iterator(self):
        if self.next_iter_state is None:  # a fresh pass, not a restored one
            self.epoch, self._next_epoch, self.delivered = self._next_epoch, self._next_epoch + 1, 0
        self.dataset.epoch = self.epoch
        return super()._get_iterator()

    def __iter__(self) -> "_TallyingIterator":
        return _TallyingIterator(super().__iter__(), self)

    def state_dict(self) -> Dict[str, Any]:
        loader = super().state_dict()  # first: it may start the upcoming pass, which fixes its epoch
        return {"epoch": self.epoch, "next_epoch": self._next_epoch, "delivered": self.delivered,
                "skips": self.skips.as_dict(), "loader": loader}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self._next_epoch = int(state["epoch"]), int(state["next_epoch"])
        self.delivered, self.skips = int(state["delivered"]), SkipCounter(state["skips"])
        spent = self.delivered >= len(self)
        super().load_state_dict({} if spent else state["loader"])  # {}: start the next epoch fresh


class _TallyingIterator:
    """Hands batches on, counting them and moving each one's ``skipped`` tally into the loader's total."""

    def __init__(self, inner: Iterator[Dict[str, Any]], loader: StreamingLoader):
        self.inner, self.loader = inner, loader

    def __iter__(self) -> "_TallyingIterator":
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = next(self.inner)
        self.loader.skips.update(batch.pop(SKIPPED))
        self.loader.delivered += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)


# ------------------------------------------------------------------------------------- from the config
def build_processor(cfg: Any) -> SampleProcessor:
    """The sample processor for a whole ``Config`` (tokenizer, template, pixels of ``cfg.model``'s encoder)."""
    from lm_mini.data.media import ImageProcessor
    from lm_mini.data.tokenizer import load_tokenizer

    d = cfg.data
    return SampleProcessor(load_tokenizer(d.tokenizer), d.template, d.max_length, ImageProcessor.from_config(cfg),
                           d.video_fps, d.max_frames, getattr(d, "train_video_frames", None))


def build_loader(cfg: Any, train: bool, rank: int = 0, world_size: int = 1, start_epoch: int = 0,
                 processor: Optional[SampleProcessor] = None, batch_size: Optional[int] = None,
                 max_samples_per_set: Optional[int] = None) -> StreamingLoader:
    """Train loader (weighted mix, shuffled) or val loader (every sample once, in index order);
    ``batch_size`` defaults to ``data.batch_size``. ``max_samples_per_set`` (val only): the first N samples
    of each set (a weight below 1 takes a prefix of the set's unshuffled stream).

    The val loader pads nothing on one rank; with several ranks, at most ``world_size - 1`` padding
    samples (on the last rank) give every rank the same number of batches, as for training.
    """
    d = cfg.data
    configs = d.train if train else d.val
    remote = RemoteOptions.from_config(getattr(d, "remote", None))
    sets = [ShardSet.from_config(s, name, remote) for s, name in zip(configs, shard_set_names([s.path for s in configs]))]
    if not train:  # a weight shapes the training mix only
        sets = [dataclasses.replace(s, weight=1.0 if max_samples_per_set is None or s.spec.size == 0
                                    else min(1.0, max_samples_per_set / s.spec.size)) for s in sets]
    processor = processor or build_processor(cfg)
    processor = processor if train else processor.for_inference()  # held-out videos: inference's frames
    dataset = StreamingDataset(sets, processor, seed=cfg.seed, rank=rank,
                               world_size=world_size, batch_size=batch_size or d.batch_size, num_workers=d.num_workers,
                               shuffle=train, shuffle_buffer=d.shuffle_buffer, remote=remote,
                               group_by_length=d.group_by_length if train else 0)
    return StreamingLoader(dataset, start_epoch=start_epoch)
