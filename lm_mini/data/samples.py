"""One raw shard record -> a model-ready sample; samples -> the batch of docs/internals.md.

A sample is a small dict (``input_ids``/``labels`` lists, ``pixel_values [V,3,S,S]`` or None,
``frames``, ``is_video``, ``sample_id``, ``flags``). ``flags`` names the reasons (data/errors.py)
this sample was skipped or altered; :func:`collate` tallies them into the batch's ``skipped``
entry, which is how counts made in DataLoader worker processes reach the main process.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Optional, Sequence

import torch
from torch.utils.data import get_worker_info

from lm_mini.constants import IGNORE_INDEX
from lm_mini.data.errors import SkipCounter

SKIPPED = "skipped"  # batch key: {reason: count} for the samples of this batch


class SampleProcessor:
    """``RawSample`` -> sample dict; raises ``SampleError`` for a sample that must be skipped.

    The template is the shard set's, else the one the sample's layout implies (``plain`` for
    img2dataset captions), else ``data.template``. Videos: ``video_frames`` frames when given (the
    training loader's ``data.train_video_frames``, official LLaVA-Mini training: 8), else about
    ``video_fps`` a second, at most ``max_frames`` (as official inference samples 1 fps).
    """

    def __init__(self, tokenizer: Any, template: str, max_length: int, image_processor: Any,
                 video_fps: float = 1.0, max_frames: int = 64, video_frames: Optional[int] = None):
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.images, self.video_fps, self.max_frames = image_processor, video_fps, max_frames
        self.video_frames = video_frames

    def for_inference(self) -> "SampleProcessor":
        """This processor with the inference frame sampling (``video_fps`` / ``max_frames``), for held-out data."""
        if self.video_frames is None:
            return self
        other = copy.copy(self)
        other.video_frames = None
        return other

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def __call__(self, raw: Any, sample_id: str, template: Optional[str] = None) -> Dict[str, Any]:
        from lm_mini.data.conversation import tokenize_conversation
        from lm_mini.data.media import decode_image, decode_video

        record = raw.record
        template = template or raw.template or self.template
        # Tokenize first: it is cheap and rejects malformed records before any decoding.
        tok = tokenize_conversation(record.get("conversations"), self.tokenizer, template, self.max_length,
                                    has_media=raw.media_kind is not None, sample_id=sample_id)
        pixels, frames = None, 0
        if raw.media_kind == "image":
            pixels, frames = self.images.image(decode_image(raw.media_bytes, sample_id)), 1
        elif raw.media_kind == "video":
            clip = decode_video(raw.media_bytes, self.video_fps, self.max_frames, sample_id, self.video_frames)
            pixels, frames = self.images.video(clip), len(clip)
        flags = [r for r, on in (("too_long", tok.truncated), ("unaligned_mask", tok.unaligned)) if on]
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": pixels, "frames": frames,
                "is_video": raw.media_kind == "video", "sample_id": sample_id, "flags": flags}

    def padding(self, reason: Optional[str] = None) -> Dict[str, Any]:
        """A sample that trains nothing (all labels IGNORE, no media).

        It has one attended pad token: a row with no attended token at all makes attention NaN.
        """
        return {"input_ids": [self.pad_id], "labels": [IGNORE_INDEX], "pixel_values": None, "frames": 0,
                "is_video": False, "sample_id": None, "flags": [reason] if reason else []}


def collate(samples: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Samples -> the batch of docs/internals.md (right-padded with ``pad_id``) plus ``skipped``."""
    n, length = len(samples), max(len(s["input_ids"]) for s in samples)
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
        "pixel_values": _concat(views) if views else None,
        "frames_per_sample": torch.tensor([s["frames"] for s in samples], dtype=torch.long),
        "is_video": torch.tensor([s["is_video"] for s in samples], dtype=torch.bool),
        "sample_ids": [s["sample_id"] for s in samples],
        SKIPPED: SkipCounter(itertools.chain.from_iterable(s["flags"] for s in samples)).as_dict(),
    }


def _concat(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of the views; inside a DataLoader worker the result is allocated in shared memory
    (as torch's ``default_collate`` does), so handing the batch to the main process copies nothing."""
    out = None
    if get_worker_info() is not None:
        first = views[0]
        storage = first._typed_storage()._new_shared(sum(v.numel() for v in views), device=first.device)
        out = first.new(storage).resize_(sum(v.shape[0] for v in views), *first.shape[1:])
    return torch.cat(list(views), out=out)


class Collator:
    """``collate`` with the pad id bound; picklable, so it runs inside the DataLoader workers."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        return collate(samples, self.pad_id)
