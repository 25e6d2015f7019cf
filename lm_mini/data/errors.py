"""Bad input is skipped and counted, never a crash and never silent."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

# Reasons a sample is skipped (or, for the last two, kept but altered). Counted per reason.
SKIP_REASONS = (
    "corrupt_image",  # image bytes PIL cannot decode (or truncated)
    "missing_media",  # record names a media file that is not there / shard record without its media
    "bad_video",  # zero-length or undecodable video
    "malformed_record",  # JSON not of the LLaVA form (id, conversations [{from, value}])
    "placeholder_mismatch",  # number of <image>/<video> tags != number of media
    "truncated_tar",  # shard ends mid-record
    "shard_unavailable",  # a remote shard's unread samples, after its retries failed (unreachable, 5xx, cut off)
    "unsafe_member_name",  # tar member named with an absolute path or '..' (never read, nothing extracted)
    "media_past_max_length",  # the media slot lies beyond data.max_length: truncating would cut it off
    "unaligned_mask",  # kept (ALTERED), but every label masked (answer spans could not be aligned)
    "too_long",  # kept (ALTERED), truncated at max_length
)


ALTERED = ("unaligned_mask", "too_long")  # the reasons whose samples are still used


def describe_skips(counts: Mapping[str, int]) -> str:
    """``"skipped corrupt_image 2, bad_video 1; kept but altered: too_long 3"`` (reasons in SKIP_REASONS order)."""
    def listed(reasons: Sequence[str]) -> str:
        return ", ".join(f"{r} {int(counts[r])}" for r in reasons if counts.get(r))

    skipped, altered = listed([r for r in SKIP_REASONS if r not in ALTERED]), listed(ALTERED)
    parts = ([f"skipped {skipped}"] if skipped else []) + ([f"kept but altered: {altered}"] if altered else [])
    return "; ".join(parts) or "no samples skipped"


class SampleError(Exception):
    """A sample that cannot be used. ``reason`` is one of SKIP_REASONS; the message names the sample."""

    def __init__(self, reason: str, message: str, sample_id: Optional[str] = None):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.reason = reason
        self.sample_id = sample_id
        super().__init__(f"[{reason}] {sample_id + ': ' if sample_id else ''}{message}")


class SkipCounter(Counter):
    """Counts skipped/altered samples per reason; ``+`` merges counters from workers and ranks."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] += n

    def as_dict(self) -> Dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}


def sum_over_ranks(counts: Mapping[str, int], reduce: Optional[Callable[..., Any]] = None, device: Any = "cpu") -> Dict[str, int]:
    """This rank's skip counts summed over all ranks with ``reduce`` (a sum all-reduce, e.g. a Lightning
    strategy's ``reduce``; None: one rank). Every rank must call it: one collective. Nonzero counts only."""
    import torch

    totals = torch.tensor([float(counts.get(r, 0)) for r in SKIP_REASONS], device=device)
    if reduce is not None:
        totals = reduce(totals, reduce_op="sum")
    return {reason: int(value) for reason, value in zip(SKIP_REASONS, totals.tolist()) if value}
