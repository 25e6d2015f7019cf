"""The epoch plan alone (index arithmetic, no data): exact partition, weights, equal lengths, buffer."""
from collections import Counter

import numpy as np
import pytest

from lm_mini.data.plan import PAD, EpochPlan, set_specs

# Uneven shards (one empty) and three weights: once, twice, a half.
SETS = set_specs([[7, 0, 5, 9], [3, 3], [11]], [1.0, 2.0, 0.5])


def ledger(world, workers, batch, epoch=2):
    """(set, sample index) -> times delivered over all ranks and workers; plus slots per rank."""
    seen, per_rank = Counter(), []
    for rank in range(world):
        n = 0
        for w in range(max(workers, 1)):
            plan = EpochPlan(SETS, seed=1, epoch=epoch, rank=rank, world_size=world, num_workers=workers,
                             batch_size=batch, shuffle_buffer=4)
            slots = plan.worker_slots(w)
            n += len(slots)
            for s in slots:
                if s.set_index != PAD:
                    shard, offset = plan.stream(s.set_index).locate(s.position)
                    assert offset < SETS[s.set_index].shard_counts[shard]
                    start = sum(SETS[s.set_index].shard_counts[:shard])
                    seen[s.set_index, start + offset] += 1
        per_rank.append((n, plan.num_batches))
    return seen, per_rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_sample_its_weight_times_and_equal_ranks(world, workers, batch):
    seen, per_rank = ledger(world, workers, batch)
    assert all(seen[0, i] == 1 for i in range(21)) and sum(v for (s, _), v in seen.items() if s == 0) == 21
    assert all(seen[1, i] == 2 for i in range(6)) and sum(v for (s, _), v in seen.items() if s == 1) == 12
    assert sum(v for (s, _), v in seen.items() if s == 2) == 6 and set(v for (s, _), v in seen.items() if s == 2) == {1}
    assert len(set(per_rank)) == 1  # same slots and batches on every rank
    n, batches = per_rank[0]
    assert n == -(-39 // world) and batches == -(-n // batch)


def test_only_the_last_batch_is_partial():
    plan = EpochPlan(SETS, seed=0, epoch=0, num_workers=3, batch_size=4)
    sizes = [len(plan.worker_slots(w)) for w in range(3)]
    assert sum(sizes) == 39 and sorted(sizes) == [12, 12, 15]  # batches 0..9 round-robin; batch 9 has 3


def test_epochs_and_seeds_change_the_order_not_the_content():
    def order(seed, epoch):
        plan = EpochPlan(SETS, seed=seed, epoch=epoch)
        return [(s.set_index, s.position) for s in plan.worker_slots(0)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert Counter(s for s, _ in order(0, 0)) == Counter(s for s, _ in order(0, 1))


def test_shuffle_buffer_is_a_bounded_permutation():
    plan = EpochPlan(SETS, seed=0, epoch=0, shuffle_buffer=5)
    order = plan.emit_order(200, worker=0)
    assert sorted(order.tolist()) == list(range(200)) and not np.array_equal(order, np.arange(200))
    # The k-th emitted item has been read by then: at most k + buffer items read.
    assert all(i < k + 5 for k, i in enumerate(order.tolist()))
    assert EpochPlan(SETS, seed=0, epoch=0, shuffle=False).emit_order(10, 0).tolist() == list(range(10))
