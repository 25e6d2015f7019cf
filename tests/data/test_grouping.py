"""Length grouping inside a worker's stream: a permutation of each window, modality-pure sorted batches,
deterministic, resumable from any position."""
import itertools
import random

import numpy as np
import pytest

from lm_mini.data.grouping import group_by_length, grouped_order, length_key, padding_fraction, window_start


def sample(i, tokens, frames=0, video=False):
    return {"input_ids": [0] * tokens, "frames": frames, "is_video": video, "sample_id": f"s{i}"}


def stream(n, seed=0):
    """A mix shaped like LLaVA's: text-only, single images, videos of 2 or 4 frames; lengths 5..200."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["text", "image", "image", "image", "video"])
        frames = {"text": 0, "image": 1, "video": rng.choice([2, 4])}[kind]
        out.append(sample(i, rng.randint(5, 200), frames, kind == "video"))
    return out


def test_length_key_orders_modality_then_frames_then_tokens():
    keys = [length_key(s) for s in (sample(0, 50, 4, True), sample(1, 9, 1), sample(2, 300), sample(3, 7, 2, True))]
    assert sorted(keys) == [(0, 0, 300), (1, 0, 9), (2, 2, 7), (2, 4, 50)]


@pytest.mark.parametrize("n", [0, 5, 64, 67])  # 67: a partial last batch
def test_each_window_is_a_permutation_cut_at_batch_edges(n):
    B, k = 4, 3
    samples = stream(n)
    out = list(group_by_length(samples, B, k, seed=(1, 0, 0, 0)))
    assert sorted(s["sample_id"] for s in out) == sorted(s["sample_id"] for s in samples)  # every sample once
    for w in range(0, n, B * k):  # nothing crosses a window edge, so nothing crosses a rank's batch plan
        assert {s["sample_id"] for s in out[w : w + B * k]} == {s["sample_id"] for s in samples[w : w + B * k]}
    if n % B:  # the partial batch (the rank's last) stays last, with the same samples' count
        assert len(out) == n


def test_batches_are_sorted_runs_of_one_modality_and_pad_less():
    B, k = 8, 16
    samples = stream(B * k * 4, seed=3)
    out = list(group_by_length(samples, B, k, seed=(0, 0, 0, 0)))
    batches = [out[i : i + B] for i in range(0, len(out), B)]
    mixed = sum(len({length_key(s)[:2] for s in b}) > 1 for b in batches)
    assert mixed <= 3 * 4  # at most the few batches where a window's modality groups meet (3 boundaries / window)
    pad = lambda bs: np.mean([padding_fraction([len(s["input_ids"]) for s in b]) for b in bs])  # noqa: E731
    plain = [samples[i : i + B] for i in range(0, len(samples), B)]
    assert pad(batches) < 0.5 * pad(plain)
    # batch order inside a window is shuffled, not shortest-first
    firsts = [length_key(b[0]) for b in batches[:k]]
    assert firsts != sorted(firsts)


def test_order_is_deterministic_and_depends_on_the_seed():
    samples = stream(96)
    run = lambda seed: [s["sample_id"] for s in group_by_length(samples, 4, 6, seed=seed)]  # noqa: E731
    assert run((1, 2, 0, 0)) == run((1, 2, 0, 0))
    assert run((1, 2, 0, 0)) != run((1, 3, 0, 0))  # another epoch: another batch order


@pytest.mark.parametrize("delivered", [0, 1, 23, 24, 25, 70])
def test_resuming_from_any_position_continues_the_same_sequence(delivered):
    B, k = 4, 6
    samples = stream(75)
    whole = [s["sample_id"] for s in group_by_length(samples, B, k, seed=(5, 1, 0, 1))]
    start = window_start(delivered, B, k)
    resumed = group_by_length(samples[start:], B, k, seed=(5, 1, 0, 1), first_window=start // (B * k))
    assert [s["sample_id"] for s in itertools.islice(resumed, delivered - start, None)] == whole[delivered:]


def test_window_start_and_padding_fraction():
    assert window_start(37, 4, 0) == 37 and window_start(37, 4, 3) == 36 and window_start(24, 4, 3) == 24
    assert padding_fraction([4, 4]) == 0.0 and padding_fraction([1, 3]) == pytest.approx(1 / 3) and padding_fraction([]) == 0.0


def test_grouped_order_keeps_ties_in_stream_order():
    order = grouped_order([(0, 0, 5)] * 6, 2, np.random.default_rng(0))
    assert sorted(order) == list(range(6))
    assert all(order[i] < order[i + 1] for i in range(0, 6, 2))  # each batch keeps its samples' order
