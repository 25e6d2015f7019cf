"""Length-grouped batches (``data.group_by_length``): LLaVA's ``group_by_modality_length``, inside each worker's
stream, so that everything the streaming loader promises still holds.

LLaVA-1.5 sorts each mega-batch of samples by length, separately for multimodal and text-only samples,
so that a batch pads little and holds one modality. Here a worker takes the samples its shuffle buffer
emits in windows of ``k`` batches (``k * batch_size`` samples), sorts each window by
:func:`length_key` — modality first (text-only, image, video by frame count), then tokens — cuts it
into batches and shuffles the order of its full batches (a partial batch, the rank's very last, stays
last). Grouping only permutes samples inside a window whose edges are batch edges, so:

- every sample still appears exactly once per epoch, and every rank yields the same number of batches;
- the order is a pure function of (seed, epoch, rank, worker) and the samples' content: a resumed worker
  re-reads the window it stopped in, regroups it identically and skips what it had delivered.

Cost: a worker holds up to one window of processed samples (pixels included) besides its shuffle
buffer, and a resume re-decodes at most one window.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

_GROUPING = 4  # purpose folded into the seed (plan.py uses 1-3), so this shuffle is independent of the others


def length_key(sample: Dict[str, Any]) -> Tuple[int, int, int]:
    """(modality, frames, tokens): text-only 0, image 1, video 2 (then by frame count), then text tokens.

    Within one modality (and frame count) the LLM sequence is the text plus the same number of media
    tokens, so ordering by text tokens orders by LLM length without knowing the compressor.
    """
    frames = int(sample.get("frames") or 0)
    modality = 0 if not frames else (2 if sample.get("is_video") else 1)
    return modality, frames if modality == 2 else 0, len(sample["input_ids"])


def window_start(delivered: int, batch_size: int, batches_per_group: int) -> int:
    """First stream position of the window holding position ``delivered`` (``delivered`` itself when off)."""
    if batches_per_group <= 0:
        return delivered
    size = batch_size * batches_per_group
    return delivered - delivered % size


def group_by_length(samples: Iterable[Dict[str, Any]], batch_size: int, batches_per_group: int,
                    seed: Sequence[int], first_window: int = 0) -> Iterator[Dict[str, Any]]:
    """``samples`` (a worker's stream from a window's first position) regrouped window by window.

    ``seed``: ints (seed, epoch, rank, worker) of the batch shuffle; ``first_window``: the index of the
    first window in the epoch (a resumed stream starts mid-epoch), so each window gets its own shuffle.
    """
    size = batch_size * batches_per_group
    it = iter(samples)
    window_index = first_window
    while True:
        window = _take(it, size)
        if not window:
            return
        rng = np.random.default_rng([*(int(s) for s in seed), _GROUPING, window_index])
        for i in grouped_order([length_key(s) for s in window], batch_size, rng):
            yield window[i]
        window_index += 1


def grouped_order(keys: Sequence[Tuple[int, ...]], batch_size: int, rng: np.random.Generator) -> List[int]:
    """Indices of one window in grouped order: sorted by key (ties by position), cut into batches,
    full batches shuffled, a partial one last."""
    ranked = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    batches = [ranked[b : b + batch_size] for b in range(0, len(ranked), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    return [i for b in [full[j] for j in rng.permutation(len(full))] + partial for i in b]


def padding_fraction(lengths: Sequence[int]) -> float:
    """Share of a batch's ``[B, max(lengths)]`` positions that are padding (0 for an empty batch)."""
    if len(lengths) == 0:
        return 0.0
    longest = max(lengths)
    return 1.0 - sum(lengths) / (len(lengths) * longest) if longest else 0.0


def _take(it: Iterator[Any], n: int) -> List[Any]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out
