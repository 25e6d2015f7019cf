"""Epoch plan: which sample each (rank, worker) reads, in which order — pure index arithmetic, no I/O.

Every process computes the same plan from the same inputs (the shard sets' ``index.json`` counts,
weights, seed, epoch, world size, workers, batch size), so nothing has to be communicated and a
resumed job can rebuild it exactly. How one epoch is laid out:

1. **Set streams.** Shard set ``s`` (``n_s`` samples) contributes ``m_s = round(weight * n_s)``
   samples: its shards in a seeded, per-epoch shuffled order, repeated in freshly shuffled passes
   when the weight is above 1, cut at ``m_s`` (a weight below 1 takes a prefix, i.e. whole shards).
   A position ``p < m_s`` of the stream names (pass, shard, offset in shard).
2. **Mixing.** The epoch's global sequence holds ``m_s`` slots labelled ``s`` for each set, in a
   seeded random order. Drawing the next set with probability proportional to the samples it has
   left is exactly a uniform shuffle of this multiset, so one ``permutation`` does it.
3. **Split by node (rank), then by worker — at sample granularity.** Each rank takes a contiguous
   chunk of ``N = ceil(M / world)`` global slots; the short last chunk is filled with padding slots
   so every rank has the same ``N`` and hence the same number of batches (DDP would hang
   otherwise). Within a rank, batch ``b`` (slots ``[b*B, (b+1)*B)``) belongs to worker
   ``b % W`` — the order in which the DataLoader collects batches from its workers — so only the
   very last batch can be partial and ``len(loader) = ceil(N / B)`` on every rank. A worker reads
   each set's samples from one contiguous sub-range of that set's stream (its share follows
   those of lower ranks and lower workers), so it opens few shards and skips within at most one
   shard per set. Sample ranges rather than whole shards are assigned because shard counts rarely
   divide evenly among ranks x workers; whole shards would need far more padding.
4. **Local shuffle.** A bounded shuffle buffer (``shuffle_buffer`` samples, seeded by epoch, rank
   and worker) is simulated on indices: the result is the worker's emit order, and at most
   ``shuffle_buffer`` read samples wait in memory at any time.

Together: every sample of every set appears exactly ``round(weight * n)`` times per epoch over all
ranks and workers, in an order determined by (seed, epoch, rank, worker).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

PAD = -1  # set label of a padding slot


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (seed, epoch, purpose, ...)."""
    return np.random.default_rng([int(k) for k in key])


# Purposes folded into the seed so that the shuffles are independent of one another.
_SHARD_ORDER, _MIX, _BUFFER = 1, 2, 3


@dataclass(frozen=True)
class SetSpec:
    """One shard set as the plan sees it: sample count per shard and a mixing weight."""

    shard_counts: Tuple[int, ...]
    weight: float = 1.0

    @property
    def size(self) -> int:
        return int(sum(self.shard_counts))

    @property
    def epoch_samples(self) -> int:
        return int(round(self.weight * self.size))


@dataclass(frozen=True)
class Slot:
    """One sample a worker reads: ``set_index`` (PAD for padding) and its position in the set stream."""

    set_index: int
    position: int


class SetStream:
    """Maps a position of one set's epoch stream to (shard index, offset in that shard)."""

    def __init__(self, spec: SetSpec, seed: int, epoch: int, set_index: int, shuffle: bool):
        self.spec, self._seed, self._epoch, self._set, self._shuffle = spec, seed, epoch, set_index, shuffle
        self._passes: dict = {}

    def _pass_order(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Shard order of pass ``k`` and the stream offset at which each of its shards starts."""
        if k not in self._passes:
            n = len(self.spec.shard_counts)
            order = _rng(self._seed, self._epoch, _SHARD_ORDER, self._set, k).permutation(n) if self._shuffle else np.arange(n)
            counts = np.asarray(self.spec.shard_counts, dtype=np.int64)[order]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._passes[k] = (order, starts)
        return self._passes[k]

    def locate(self, position: int) -> Tuple[int, int]:
        """(shard index in the set's index.json, offset of the sample within that shard)."""
        k, q = divmod(int(position), self.spec.size)
        order, starts = self._pass_order(k)
        i = int(np.searchsorted(starts, q, side="right") - 1)
        # Empty shards share a start with the next one; searchsorted(right) picks the last of them,
        # which is the non-empty shard that really holds position q.
        return int(order[i]), int(q - starts[i])


@dataclass(frozen=True)
class EpochPlan:
    """The plan of one epoch for one rank; ``worker_slots(w)`` gives worker ``w``'s read order."""

    sets: Tuple[SetSpec, ...]
    seed: int
    epoch: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1  # DataLoader workers; 0 and 1 both mean one reader
    batch_size: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    # ---------------------------------------------------------------- global layout
    @property
    def total(self) -> int:
        """M: samples in the epoch over all ranks (before padding)."""
        return sum(s.epoch_samples for s in self.sets)

    @property
    def per_rank(self) -> int:
        """N: slots of this rank, padding included (the same on every rank)."""
        return math.ceil(self.total / self.world_size)

    @property
    def num_batches(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def _rank_bounds(self) -> Tuple[int, int]:
        n = math.ceil(self.total / self.world_size)
        return min(self.rank * n, self.total), min((self.rank + 1) * n, self.total)

    def _labels(self) -> np.ndarray:
        """Set label of every global slot (the mixed order)."""
        labels = np.repeat(np.arange(len(self.sets), dtype=np.int32), [s.epoch_samples for s in self.sets])
        if self.shuffle:
            labels = _rng(self.seed, self.epoch, _MIX).permutation(labels)
        return labels

    # ---------------------------------------------------------------- per worker
    def _worker_batches(self, worker: int) -> List[range]:
        w = max(self.num_workers, 1)
        if not 0 <= worker < w:
            raise ValueError(f"worker {worker} outside {w} workers")
        n = self.per_rank
        return [range(b * self.batch_size, min((b + 1) * self.batch_size, n)) for b in range(worker, self.num_batches, w)]

    def worker_slots(self, worker: int = 0) -> List[Slot]:
        """The samples worker ``worker`` of this rank reads, in read order (before the shuffle buffer)."""
        labels = self._labels()
        start, stop = self._rank_bounds()
        rank_labels = np.full(self.per_rank, PAD, dtype=np.int32)
        rank_labels[: stop - start] = labels[start:stop]
        n_sets = len(self.sets)
        # Where this rank's share of each set begins: samples of the set in earlier ranks' chunks.
        first = np.bincount(labels[:start], minlength=n_sets).astype(np.int64)
        for w in range(worker):
            idx = np.concatenate([np.arange(r.start, r.stop) for r in self._worker_batches(w)] or [np.zeros(0, int)])
            first += np.bincount(rank_labels[idx][rank_labels[idx] >= 0], minlength=n_sets)
        idx = np.concatenate([np.arange(r.start, r.stop) for r in self._worker_batches(worker)] or [np.zeros(0, int)])
        slots, nxt = [], first.copy()
        for s in rank_labels[idx].tolist():
            if s == PAD:
                slots.append(Slot(PAD, -1))
            else:
                slots.append(Slot(s, int(nxt[s])))
                nxt[s] += 1
        return slots

    def emit_order(self, n: int, worker: int) -> np.ndarray:
        """Indices into a worker's read order (of ``n`` samples), in the order its shuffle buffer emits them.

        The buffer fills up to ``shuffle_buffer`` items, then each newly read item replaces a random
        one that is emitted; at the end the rest drains in random order (webdataset's scheme).
        """
        buffer_size = self.shuffle_buffer
        if not self.shuffle or buffer_size <= 1:
            return np.arange(n)
        rng = _rng(self.seed, self.epoch, _BUFFER, self.rank, worker)
        picks = rng.random(n)
        buf: List[int] = []
        out = np.empty(n, dtype=np.int64)
        k = 0
        for i in range(n):
            if len(buf) < buffer_size:
                buf.append(i)
                continue
            j = int(picks[i] * len(buf))
            out[k], buf[j] = buf[j], i
            k += 1
        rng.shuffle(buf)
        out[k:] = buf
        return out

    def stream(self, set_index: int) -> SetStream:
        return SetStream(self.sets[set_index], self.seed, self.epoch, set_index, self.shuffle)


def fingerprint(plan: EpochPlan, worker: int) -> dict:
    """What must match for a saved position to mean the same samples after a restart."""
    return {
        "seed": plan.seed,
        "rank": plan.rank,
        "world_size": plan.world_size,
        "num_workers": max(plan.num_workers, 1),
        "worker": worker,
        "batch_size": plan.batch_size,
        "shuffle": plan.shuffle,
        "shuffle_buffer": plan.shuffle_buffer,
        "sets": [list(s.shard_counts) + [s.weight] for s in plan.sets],
    }


def set_specs(counts: Sequence[Sequence[int]], weights: Optional[Sequence[float]] = None) -> Tuple[SetSpec, ...]:
    weights = weights or [1.0] * len(counts)
    return tuple(SetSpec(tuple(int(c) for c in cs), float(w)) for cs, w in zip(counts, weights))
