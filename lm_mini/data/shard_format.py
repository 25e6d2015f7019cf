"""The shard schema: what builder and reader agree on (DESIGN §4).

One sample = one group of tar members sharing a ``__key__``::

    <key>.json                  the LLaVA record: id, conversations [{from, value}], source, image|video path
    <key>.jpg|png|webp          image bytes, as found on disk          } at most one media member;
    <key>.mp4|webm|mkv|avi      video bytes, decoded at load time      } none for a text-only record

A built shard set is a directory (or a folder at a URL)::

    shard-000000.tar ...   shard i holds the valid records among input records [i*shard_size, (i+1)*shard_size)
    index.json             shards (samples per shard and media kind, sha256), sources (sha256), build parameters
    skipped.json           every skipped input record with its reason (data/errors.py)
    .build/                an unfinished build's state (gone once index.json is written)

Caption shards made by img2dataset (``<key>.jpg`` + ``<key>.txt`` [+ metadata ``<key>.json``]) are read too.
Writing: :mod:`lm_mini.data.shard_builder`; reading: :mod:`lm_mini.data.shard_reader`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from webdataset.tariterators import base_plus_ext

from lm_mini.data.conversation import ASSISTANT, normalize_turns
from lm_mini.data.errors import SampleError

FORMAT = "lm_mini.shards/1"
IMAGE_EXTS = ("jpg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")
EXT_ALIASES = {"jpeg": "jpg", "m4v": "mp4", "mov": "mp4"}  # same formats under another file suffix
INDEX_FILE, SKIPPED_FILE, STATE_DIR = "index.json", "skipped.json", ".build"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def media_kind(ext: Optional[str]) -> Optional[str]:
    """'image' | 'video' | None (text-only / unknown) for a member extension."""
    ext = EXT_ALIASES.get(ext, ext)
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def unsafe_member_name(name: str) -> bool:
    """Does a tar member's name leave the shard (absolute, or a ``..`` part)? Such members are never used:
    reading keeps members in memory (nothing is extracted), and each one is skipped as ``unsafe_member_name``."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts


def member_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``(sample key, extension)`` of a tar member, as webdataset groups them; an unsafe name (see
    :func:`unsafe_member_name`) is a sample of its own even without an extension, so it is counted and skipped."""
    key, ext = base_plus_ext(name)
    if key is None and unsafe_member_name(name):
        return name, ""
    return key, ext



# ------------------------------------------------------------------------------------- LLaVA records
def check_record(record: Any, has_media: bool, sample_id: Optional[str] = None) -> str:
    """Check a LLaVA record (raises ``SampleError``) and return its id as a string.

    The conversation rules (roles, alternation, one media placeholder at most, none without media)
    are those of the templates, ``lm_mini.data.conversation.normalize_turns``, so a record that
    passes here can be rendered.
    """
    if not isinstance(record, dict):
        raise SampleError("malformed_record", f"record is a {type(record).__name__}, not an object", sample_id)
    if "question_id" in record and "conversations" not in record:  # LLaVA's benchmark question files are not training data
        raise SampleError("malformed_record", "record has 'question_id' and no 'conversations': a LLaVA benchmark question file "
                          "(not shard data); evaluate on it with `lm-mini eval SOURCE --benchmark NAME --questions FILE "
                          "--image-folder DIR`", sample_id)
    if record.get("id") is None or str(record["id"]).strip() == "":
        raise SampleError("malformed_record", "record has no 'id'" if record.get("id") is None else "record has an empty 'id'", sample_id)
    sample_id = str(record["id"])
    if "image" in record and "video" in record:
        raise SampleError("malformed_record", "record has both 'image' and 'video'; one media item per sample", sample_id)
    _, turns = normalize_turns(record.get("conversations"), has_media, sample_id)
    if not any(role == ASSISTANT for role, _ in turns):
        raise SampleError("malformed_record", "no gpt turn: nothing to train or evaluate on", sample_id)
    return sample_id


def media_path(record: dict, sample_id: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(kind, relative path) of a record's media: ('image', 'coco/1.jpg'), ('video', ...) or (None, None)."""
    for kind in ("image", "video"):
        if kind in record:
            path = record[kind]
            if isinstance(path, list) and len(path) == 1:  # some sets wrap a single file in a list
                path = path[0]
            if not isinstance(path, str) or not path:
                raise SampleError("malformed_record", f"'{kind}' must be one file path, got {path!r:.80}", sample_id)
            return kind, path
    return None, None


class ShardBuildError(RuntimeError):
    """The build cannot start (unreadable input file, output directory in the way, ...)."""
