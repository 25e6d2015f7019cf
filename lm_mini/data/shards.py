"""WebDataset shards: the schema, the builder (LLaVA JSON/JSONL + media -> shards) and the raw reader.

Schema (DESIGN §4). One sample = one group of tar members sharing a ``__key__``:

    <key>.json                  the LLaVA record: id, conversations [{from, value}], source, image|video path
    <key>.jpg|png|webp          image bytes, as found on disk          } at most one media member;
    <key>.mp4|webm|mkv|avi      video bytes, decoded at load time      } none for a text-only record

Input records are LLaVA's (``conversations`` + an ``image`` or ``video`` path) or Video-ChatGPT's own
(``video_id``, ``q``, ``a``), which are turned into LLaVA records (:func:`from_video_chatgpt`).

Caption shards made by img2dataset (``<key>.jpg`` + ``<key>.txt`` [+ metadata ``<key>.json``]) are
read too, as a one-turn caption record for the ``plain`` template.

A built shard set is a directory::

    shard-000000.tar ...   shard i holds the valid records among input records [i*shard_size, (i+1)*shard_size)
    index.json             shards (samples per shard and media kind, sha256), sources (sha256), build parameters
    skipped.json           every skipped input record with its reason (data/errors.py)

Building is deterministic: shard i depends only on its range of input records, so the same input
gives byte-identical shards with any number of worker processes. Shards are written under temporary
names and renamed; ``index.json`` is written last, so a directory with an ``index.json`` is complete.
An interrupted build keeps its state in ``.build/`` and ``resume=True`` finishes it. A build whose
``out_dir`` is a URL (``s3://bucket/set``, any fsspec URL) is made in a local staging folder and uploaded:
the shards, ``skipped.json``, then ``index.json``.

A shard set is read from a local path or pattern, an ``http(s)://`` or other fsspec URL (``s3://``,
``gs://``, ...) or a ``pipe:`` command (:mod:`lm_mini.data.remote`); a remote set is read through its
``index.json``, fetched from the same place as its shards, and a remote shard that fails mid-read is
retried from the record where it failed.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_PLACEHOLDER
from lm_mini.data.conversation import ASSISTANT, normalize_turns
from lm_mini.data.errors import SampleError, SkipCounter
from lm_mini.data.media import decode_image, probe_video
from lm_mini.data.remote import (TAR_SUFFIXES, RemoteOptions, describe, is_remote, join, local_path, open_shard,
                                 read_bytes, redact, scheme, sibling, split, upload)

FORMAT = "lm_mini.shards/1"
IMAGE_EXTS = ("jpg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")
EXT_ALIASES = {"jpeg": "jpg", "m4v": "mp4", "mov": "mp4"}  # same formats under another file suffix
_PIL_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL's format name -> member extension
INDEX_FILE, SKIPPED_FILE, STATE_DIR = "index.json", "skipped.json", ".build"
TAR_MTIME = 0  # fixed member time/owner so the same input gives byte-identical tars
log = logging.getLogger(__name__)


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


class ShardBuildError(RuntimeError):
    """The build cannot start (unreadable input file, output directory in the way, ...)."""


# ------------------------------------------------------------------------------------- records


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


def from_video_chatgpt(record: Any) -> Any:
    """Video-ChatGPT's own record (``VideoInstruct100K.json``: ``{"video_id", "q", "a"}``) as a LLaVA
    record: one exchange about the video ``video_id`` (see :func:`media_file`). Anything else is returned as is."""
    if not (isinstance(record, dict) and "conversations" not in record and _is_record(record)):
        return record
    q, a = record["q"], record["a"]
    return {"id": record["video_id"], "video": record["video_id"],
            "conversations": [{"from": "human", "value": f"{VIDEO_PLACEHOLDER}\n{q}" if isinstance(q, str) else q},
                              {"from": "gpt", "value": a}]}


def media_file(media_root: Path, kind: str, rel: str) -> Path:
    """The file a record's media path names under ``media_root``.

    A video path without a video suffix names the video of that name in any container: a bare id
    (Video-ChatGPT's own records) or a feature file such as ``v_x.pkl`` (Video-ChatGPT's converted
    training JSON points at its CLIP features) finds ``v_x.mp4`` / ``.mkv`` / ``.webm`` ... beside it
    (ActivityNet mixes containers). Without such a file the path is returned as given."""
    path = media_root / rel
    if kind != "video" or media_kind(path.suffix.lower().lstrip(".")) == "video" or path.is_file():
        return path
    names = [path.name] + ([path.stem] if path.suffix else [])
    for name in names:
        for ext in (*VIDEO_EXTS, *EXT_ALIASES):
            candidate = path.with_name(f"{name}.{ext}")
            if media_kind(ext) == "video" and candidate.is_file():
                return candidate
    return path


def _load_media(kind: str, path: Path, sample_id: str) -> Tuple[str, bytes]:
    """Read and check one media file -> (member extension, bytes to store)."""
    try:
        if not path.is_file():
            raise SampleError("missing_media", f"{kind} file not found: {path}", sample_id)
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # name too long, NUL byte, permission denied, I/O error: skip this record only
        raise SampleError("missing_media", f"cannot read {kind} file {str(path)[:200]!r}: {getattr(e, 'strerror', None) or e}",
                          sample_id) from e
    ext = path.suffix.lower().lstrip(".")
    ext = EXT_ALIASES.get(ext, ext)
    if kind == "image":
        image = decode_image(data, sample_id)  # full decode: a truncated JPEG fails here, not in training
        # The member is named by what the bytes are, not by the file's suffix (a PNG saved as .jpg is png).
        ext = _PIL_EXTS.get(Image.open(io.BytesIO(data)).format, ext)
        if ext not in IMAGE_EXTS:  # gif, bmp, tiff, ...: store losslessly as PNG
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            ext, data = "png", buf.getvalue()
        return ext, data
    if ext not in VIDEO_EXTS:
        raise SampleError("bad_video", f"unsupported video container '.{ext}' ({', '.join(VIDEO_EXTS)})", sample_id)
    probe_video(data, sample_id)
    return ext, data


# ------------------------------------------------------------------------------------- input


@dataclass
class _Source:
    path: str
    sha256: str
    records: List[Tuple[int, Any]]  # (line or list position, record or a JSONL parse error)


class _BadLine(str):
    """A JSONL line that is not JSON; kept in place so it is reported as a malformed record."""


def _read_source(path: Union[str, Path]) -> _Source:
    """A LLaVA JSON list or a JSONL file (one record per line), told apart by the first character."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # a leading BOM (Windows tools) is not part of the data
    except (OSError, UnicodeDecodeError) as e:
        raise ShardBuildError(f"cannot read {path}: {e}") from e
    sha = hashlib.sha256(raw).hexdigest()
    if text.lstrip().startswith("{"):  # one JSON object over the whole file: one record, or a wrapper of records
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict) and not _is_record(whole):
            keys = ", ".join(map(repr, list(whole)[:5]))
            raise ShardBuildError(f"{path} holds one JSON object (keys {keys}), not LLaVA records: expected a JSON list "
                                  "of records or JSON lines (one record per line)")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardBuildError(f"{path} is not valid JSON: {e}") from e
        return _Source(str(path), sha, [(i, from_video_chatgpt(r)) for i, r in enumerate(records)])
    out: List[Tuple[int, Any]] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((line_no, from_video_chatgpt(json.loads(line))))
            except json.JSONDecodeError as e:
                out.append((line_no, _BadLine(f"line is not JSON: {e}")))
    if out and not any(isinstance(r, dict) for _, r in out):  # e.g. pretty-printed JSON that is not records
        raise ShardBuildError(f"{path} is neither a JSON list of records nor JSON lines of records (no line is a "
                              "JSON object)")
    return _Source(str(path), sha, out)


def _is_record(obj: dict) -> bool:
    return "conversations" in obj or {"video_id", "q", "a"} <= obj.keys()


# ------------------------------------------------------------------------------------- writing


@dataclass
class _ShardTask:
    index: int
    first_key: int  # global position of the first record: keys are positions, so unique and ordered
    records: List[Tuple[str, int, Any]]  # (source path, line/position, record)
    media_root: str
    out_dir: str


def _make_sample(key: str, source: str, record: Any, media_root: Path) -> dict:
    """One input record -> the tar members of its sample (raises ``SampleError``)."""
    if isinstance(record, _BadLine):
        raise SampleError("malformed_record", str(record))
    sample_id = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None
    kind, rel = media_path(record, sample_id) if isinstance(record, dict) else (None, None)
    sample_id = check_record(record, kind is not None, sample_id)
    record = {**record, "source": record.get("source", Path(source).name)}  # "id" as the input has it (7 stays an int)
    try:
        encoded = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except UnicodeEncodeError as e:  # JSON allows "\ud83d" alone; no tokenizer can take it
        raise SampleError("malformed_record", f"text holds an unpaired UTF-16 surrogate (invalid Unicode): {e.reason}",
                          sample_id) from e
    sample = {"__key__": key, "json": encoded}
    if kind is not None:
        ext, data = _load_media(kind, media_file(media_root, kind, rel), sample_id)
        sample[ext] = data
    return sample


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(task: _ShardTask) -> dict:
    """Validate and write one shard (temp name, then rename) and its done-marker; returns its summary."""
    out_dir, name = Path(task.out_dir), shard_name(task.index)
    media = {"image": 0, "video": 0, "text": 0}
    skipped = []
    tmp = out_dir / (name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user="", group="") as writer:
        for offset, (source, line, record) in enumerate(task.records):
            key = f"{task.first_key + offset:09d}"
            try:
                sample = _make_sample(key, source, record, Path(task.media_root))
            except SampleError as e:
                skipped.append({"key": key, "id": e.sample_id, "source": source, "line": line, "reason": e.reason, "message": str(e)})
                continue
            writer.write(sample)
            media[next((media_kind(k) for k in sample if media_kind(k)), None) or "text"] += 1
    os.replace(tmp, out_dir / name)
    summary = {"name": name, "samples": sum(media.values()), "media": media, "sha256": _sha256_file(out_dir / name),
               "bytes": (out_dir / name).stat().st_size, "skipped": skipped}
    _write_json(out_dir / STATE_DIR / f"{name}.json", summary)  # the shard is done once this exists
    return summary


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader sees the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    # backslashreplace: an id or message with an unpaired surrogate (invalid Unicode in the input) stays readable
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8",
                   errors="backslashreplace")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    out_dir: str
    num_samples: int
    num_shards: int
    media: Dict[str, int]  # samples per media kind: image / video / text
    skipped: Dict[str, int]  # skipped input records per reason
    shards_written: int  # shards written by this call (fewer than num_shards on resume)
    skipped_records: List[dict] = field(default_factory=list, repr=False)

    def _replace_out(self, out_dir: str) -> "BuildReport":
        return dataclasses.replace(self, out_dir=redact(out_dir))

    def summary(self) -> str:
        media = ", ".join(f"{k} {self.media.get(k, 0)}" for k in ("image", "video", "text"))  # also as read back from index.json
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"
        return (f"{self.out_dir}: {self.num_samples} samples in {self.num_shards} shards ({media}); "
                f"wrote {self.shards_written} shards; skipped: {skipped}")


def _build_params(sources: Sequence[_Source], shard_size: int) -> dict:
    """What makes two builds the same build (compared on resume). Worker count is not part of it."""
    return {"shard_size": shard_size,
            "sources": [{"path": s.path, "sha256": s.sha256, "records": len(s.records)} for s in sources]}


def _same_build(old: dict, new: dict) -> Optional[str]:
    """None when ``old`` and ``new`` build parameters describe the same build, else what differs."""
    if old.get("shard_size") != new["shard_size"]:
        return f"shard_size {old.get('shard_size')} != {new['shard_size']}"
    old_sums = [s.get("sha256") for s in old.get("sources", [])]
    new_sums = [s["sha256"] for s in new["sources"]]
    if old_sums != new_sums:
        return "the source JSON files differ (sha256)"
    if "media_root" in old and "media_root" in new and old["media_root"] != new["media_root"]:
        return f"the media root differs ({old['media_root']} != {new['media_root']})"
    return None


def _check_out_dir(out: Path, params: dict, resume: bool) -> str:
    """Decide what to do with ``out``: 'fresh', 'resume' or 'complete'; refuse anything else."""
    state_file = out / STATE_DIR / "state.json"
    if out.exists() and not out.is_dir():
        raise ShardBuildError(f"{out} exists and is not a directory; choose another --out")
    if (out / INDEX_FILE).is_file():
        if not resume:
            raise ShardBuildError(f"{out} already holds a finished shard set (index.json); "
                                  "choose another --out or delete it (nothing was written)")
        index = read_index(out)
        build = index["build"]  # its media root as given (relative paths keep a shipped index portable)
        given = Path(build.get("media_root", "."))
        now = Path(params["media_root"])
        # A relative root was relative to the directory that build ran in, which the index does not know:
        # from here, or a root that ends in the same folders (the same build run from elsewhere) is the same.
        same_root = given.resolve() == now or (not given.is_absolute() and now.parts[-len(given.parts):] == given.parts)
        diff = _same_build({"shard_size": build["shard_size"], "sources": index["sources"],
                            "media_root": str(now if same_root else given.resolve())}, params)
        if diff:
            raise ShardBuildError(f"{out} holds a finished build of other inputs ({diff}); refusing to overwrite it")
        return "complete"
    if state_file.is_file():
        if not resume:
            raise ShardBuildError(f"{out} holds an unfinished build; pass --resume (resume=True) to finish it, "
                                  "or delete the directory")
        diff = _same_build(json.loads(state_file.read_text()), params)
        if diff:
            raise ShardBuildError(f"cannot resume the build in {out}: {diff}")
        return "resume"
    if out.exists() and any(out.iterdir()):
        raise ShardBuildError(f"{out} is not empty and holds no lm_mini shard build; choose an empty or new directory")
    return "fresh"


def _done_shards(out: Path, n: int) -> Dict[int, dict]:
    """Shards of an interrupted build that are complete: done-marker present and tar checksum matching."""
    done = {}
    for i in range(n):
        marker, tar = out / STATE_DIR / f"{shard_name(i)}.json", out / shard_name(i)
        if marker.is_file() and tar.is_file():
            summary = json.loads(marker.read_text())
            if summary["sha256"] == _sha256_file(tar):
                done[i] = summary
    return done


def _run_tasks(tasks: List[_ShardTask], workers: int) -> Iterator[dict]:
    """Write the shards (in worker processes when workers > 1), yielding their summaries in order."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_write_shard, tasks)
        return
    # fork: workers only read files and run PIL/PyAV, and re-importing torch per worker (spawn) costs seconds.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                             initializer=_exit_with_parent) as pool:
        yield from pool.map(_write_shard, tasks)


def _exit_with_parent() -> None:
    """Linux: a writer process gets SIGTERM when the build process dies, even by SIGKILL (else it waits
    forever on the task pipe, which its forked siblings keep open)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def build_shards(json_files: Sequence[Union[str, Path]], media_root: Union[str, Path], out_dir: Union[str, Path],
                 shard_size: int = 1000, workers: int = 1, resume: bool = False, staging: Optional[Union[str, Path]] = None,
                 remote: Optional[RemoteOptions] = None) -> BuildReport:
    """LLaVA JSON/JSONL files + media -> WebDataset shards in ``out_dir`` with ``index.json``.

    Every record is checked (conversation form, placeholders, media present and decodable); bad
    records are skipped and listed by reason in ``skipped.json``. Refuses an ``out_dir`` that holds
    anything but an interrupted build of the same inputs (``resume=True`` finishes that one).
    ``out_dir`` may be an fsspec URL (``s3://bucket/set``): see :func:`_build_and_upload` (``staging``,
    ``remote``).
    """
    if is_remote(str(out_dir)):
        return _build_and_upload(json_files, media_root, str(out_dir), shard_size, workers, resume, staging,
                                 remote or RemoteOptions())
    out_dir = local_path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not json_files:
        raise ValueError("no input JSON files")
    if not Path(media_root).is_dir():
        raise ShardBuildError(f"media root {media_root} is not a directory (--media-root: the records' media paths "
                              "are relative to it)")
    sources = [_read_source(p) for p in json_files]
    if not any(s.records for s in sources):
        raise ShardBuildError(f"no records in {', '.join(s.path for s in sources)}")
    _check_media_root(sources, Path(media_root))
    params = {**_build_params(sources, shard_size), "media_root": str(Path(media_root).resolve())}
    out = Path(out_dir)
    action = _check_out_dir(out, params, resume)
    if action == "complete":
        return _report(out, read_index(out), _read_skipped(out), shards_written=0)

    flat = [(s.path, line, rec) for s in sources for line, rec in s.records]
    n_shards = max(1, -(-len(flat) // shard_size))
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if action == "fresh":
        _write_json(out / STATE_DIR / "state.json", params)
    done = _done_shards(out, n_shards) if action == "resume" else {}
    tasks = [_ShardTask(i, i * shard_size, flat[i * shard_size:(i + 1) * shard_size], str(media_root), str(out))
             for i in range(n_shards) if i not in done]
    for k, (task, summary) in enumerate(zip(tasks, _run_tasks(tasks, workers)), 1):
        done[task.index] = summary
        log.info("%s: %d samples, %d skipped [%d/%d]", summary["name"], summary["samples"], len(summary["skipped"]), k, len(tasks))
    summaries = [done[i] for i in range(n_shards)]

    skipped_records = [r for s in summaries for r in s.pop("skipped")]
    counts = SkipCounter()
    for r in skipped_records:
        counts.add(r["reason"])
    media = {k: sum(s["media"][k] for s in summaries) for k in ("image", "video", "text")}
    index = {"format": FORMAT, "num_samples": sum(media.values()), "media": media, "shards": summaries,
             "skipped": counts.as_dict(), "sources": params["sources"],
             "build": {"shard_size": shard_size, "media_root": str(media_root)}}  # not workers: same shards with any
    _write_json(out / SKIPPED_FILE, {"counts": counts.as_dict(), "records": skipped_records})
    _write_json(out / INDEX_FILE, index)  # last: its presence marks the set complete
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return _report(out, index, skipped_records, shards_written=len(tasks))


def _build_and_upload(json_files: Sequence[Union[str, Path]], media_root: Union[str, Path], url: str, shard_size: int,
                      workers: int, resume: bool, staging: Optional[Union[str, Path]], remote: RemoteOptions) -> BuildReport:
    """Build in a local staging folder (``staging``, else a temporary one), then upload the shards,
    ``skipped.json`` and, last, ``index.json``: a reader never finds an index whose shards are not all
    there. A URL that already holds an index is refused (with ``resume``: the same build is reported
    done). If the upload fails, the built set stays in the staging folder for ``--staging DIR --resume``."""
    if scheme(url) == "pipe":
        raise ShardBuildError("--out cannot be a pipe: command; give a directory or an fsspec URL (s3://bucket/set)")
    url = url.rstrip("/")
    try:  # also checks, before any work, that the store is reachable with the environment's credentials
        existing = read_index(url, remote)
    except FileNotFoundError:
        existing = None
    except (OSError, ValueError) as e:
        raise ShardBuildError(f"cannot write the shard set to {redact(url)}: {e}") from e
    if existing is not None:
        if not resume:
            raise ShardBuildError(f"{redact(url)} already holds a finished shard set (index.json); choose another --out "
                                  "or delete it (nothing was written)")
        diff = _same_build({"shard_size": existing.get("build", {}).get("shard_size"), "sources": existing.get("sources", [])},
                           _build_params([_read_source(p) for p in json_files], shard_size))
        if diff:
            raise ShardBuildError(f"{redact(url)} holds a finished build of other inputs ({diff}); refusing to overwrite it")
        return _report(Path(), existing, [], shards_written=0)._replace_out(url)
    stage = Path(staging) if staging is not None else Path(tempfile.mkdtemp(prefix="lm_mini-shards-"))
    report = build_shards(json_files, media_root, stage, shard_size=shard_size, workers=workers, resume=resume)
    if report.num_samples == 0:  # nothing to train on: not published (the caller reports why)
        return report._replace_out(url)
    names = [s["name"] for s in read_index(stage)["shards"]] + [SKIPPED_FILE, INDEX_FILE]
    try:
        upload(stage, names, url, remote)
    except OSError as e:
        raise ShardBuildError(f"{e}; the built set stays in {stage}: upload it with --staging {stage} --resume") from e
    if staging is None:
        shutil.rmtree(stage, ignore_errors=True)
    return report._replace_out(url)


def _check_media_root(sources: Sequence[_Source], media_root: Path, probe: int = 100) -> None:
    """Refuse a media root under which none of the first ``probe`` media paths exists: a wrong
    ``--media-root`` would otherwise skip every media record as ``missing_media`` and still succeed."""
    checked: List[Tuple[str, bool]] = []
    for rec in (rec for s in sources for _, rec in s.records if isinstance(rec, dict)):
        try:
            kind, rel = media_path(rec)
            if rel is not None:
                checked.append((rel, media_file(media_root, kind, rel).exists()))
        except (SampleError, OSError, ValueError):  # malformed path, name the OS refuses: no clue to the root
            continue
        if len(checked) == probe:
            break
    if checked and not any(exists for _, exists in checked):
        raise ShardBuildError(f"none of the first {len(checked)} media files exists under the media root "
                              f"{media_root.resolve()} (e.g. {media_root / checked[0][0]}); pass the directory the "
                              "records' paths are relative to as --media-root")


def _read_skipped(out: Path) -> List[dict]:
    path = out / SKIPPED_FILE
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _report(out: Path, index: dict, skipped_records: List[dict], shards_written: int) -> BuildReport:
    return BuildReport(str(out), index["num_samples"], len(index["shards"]), dict(index["media"]),
                       dict(index["skipped"]), shards_written, skipped_records)


def read_index(path: Union[str, Path], remote: Optional[RemoteOptions] = None) -> dict:
    """The parsed ``index.json`` of a shard directory or URL (raises ``FileNotFoundError`` when unfinished/absent)."""
    if is_remote(str(path)):
        return _read_remote_index(join(str(path), INDEX_FILE), remote or RemoteOptions())
    path = local_path(path)
    index_path = Path(path) / INDEX_FILE
    if not index_path.is_file():
        hint = " (an unfinished build: run it again with --resume)" if (Path(path) / STATE_DIR).is_dir() else ""
        raise FileNotFoundError(f"no {INDEX_FILE} in {path}{hint}")
    return _parse_index(index_path.read_text(encoding="utf-8"), str(index_path))


def _read_remote_index(url: str, remote: RemoteOptions) -> dict:
    try:
        raw = read_bytes(url, remote)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no {INDEX_FILE} at {redact(url)} ({describe(e.__cause__ or e)}): a remote shard set "
                                f"is read through its {INDEX_FILE} (shard names and sample counts), beside its shards; "
                                "lm-mini shards build writes it (--out may be a URL)") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{redact(url)}: not a shard set index (not UTF-8 text)") from e
    return _parse_index(text, redact(url))


def _parse_index(text: str, where: str) -> dict:
    try:
        index = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e}); expected a shard set index") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{where}: unknown shard format {found!r}, expected {FORMAT!r}")
    return index


class Shard(NamedTuple):
    """One shard of a set: where it is, and what the set's ``index.json`` says of it (None without an index)."""

    url: str
    samples: Optional[int] = None
    bytes: Optional[int] = None
    sha256: Optional[str] = None


def _indexed(url: str, entry: dict) -> Shard:
    return Shard(url, int(entry["samples"]), entry.get("bytes"), entry.get("sha256"))


def list_shards(path: Union[str, Path], remote: Optional[RemoteOptions] = None) -> List[Shard]:
    """The shards a path names, in order, with their sample counts, sizes and checksums when an ``index.json``
    gives them.

    ``path``: a shard directory with ``index.json`` (counts from it); a directory of tars without one
    (e.g. img2dataset output); a tar file; or a glob/brace pattern (``cc/{00000..00009}.tar``,
    ``cc/*.tar``). Files a directory or pattern holds besides tars (img2dataset's ``.parquet`` and
    ``_stats.json``) are passed over; a path that names no tar is an error. A remote path (URL or
    ``pipe:``) is read through the ``index.json`` beside its shards (see :func:`_remote_shards`).
    """
    if is_remote(str(path)):
        return _remote_shards(str(path), remote or RemoteOptions())
    path = Path(local_path(path))
    if (path / INDEX_FILE).is_file() or (path / STATE_DIR).is_dir():  # an unfinished build: read_index says so
        return [_indexed(str(path / s["name"]), s) for s in read_index(path)["shards"]]
    if path.is_file() and not path.name.endswith(TAR_SUFFIXES):
        raise ValueError(f"{path} is not a tar file ({', '.join(TAR_SUFFIXES)}); expected a shard directory with "
                         f"{INDEX_FILE}, a directory of tars, a tar file or a glob/brace pattern of them")
    pattern = str(path / "*") if path.is_dir() else str(path)
    matches = sorted(f for u in wds.shardlists.expand_urls(pattern) for f in glob.glob(u) if os.path.isfile(f))
    urls = [f for f in matches if f.endswith(TAR_SUFFIXES)]
    if not urls:
        found = f"; it matches {len(matches)} other files, e.g. {matches[0]}" if matches else ""
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no tar files ({', '.join(TAR_SUFFIXES)}){found}")
    return [Shard(u) for u in urls]


def _remote_shards(path: str, remote: RemoteOptions) -> List[Shard]:
    """A remote set's shards from its ``index.json``: a folder URL (``s3://bucket/mix665k``) lists every shard
    of its index; a shard URL or pattern (``https://host/set/shard-{000000..000099}.tar``, ``.../*.tar``, a
    ``pipe:`` command reading ``shard-{...}.tar``) names some of them, and their counts come from the index
    in the same folder (for ``pipe:``, fetched by the same command). Remote tars are not counted from their
    headers: that would download the whole set before training starts."""
    if not names_shards(path):
        return [_indexed(join(path, s["name"]), s) for s in read_index(path, remote)["shards"]]
    indexes: Dict[str, Dict[str, dict]] = {}
    shards: List[Shard] = []
    for url in wds.shardlists.expand_urls(path):
        index_url = sibling(url, INDEX_FILE)
        if index_url not in indexes:
            indexes[index_url] = {s["name"]: s for s in _read_remote_index(index_url, remote)["shards"]}
        entries, name = indexes[index_url], split(url)[1]
        names = [n for n in entries if fnmatch.fnmatchcase(n, name)] if glob.has_magic(name) else [name]
        if not names or names[0] not in entries:
            listed = ", ".join(list(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise FileNotFoundError(f"{redact(url)}: no such shard in {redact(index_url)} (it lists {len(entries)}: "
                                    f"{listed or 'none'})")
        shards += [_indexed(sibling(url, n), entries[n]) for n in names]
    return shards


def _is_pattern(name: str) -> bool:
    return glob.has_magic(name) or "{" in name


def names_shards(path: Union[str, Path]) -> bool:
    """Does ``path`` name shards (a tar, a glob/brace pattern of them, a ``pipe:`` command) rather than the
    folder of a set?"""
    path = str(path)
    if not is_remote(path):
        return not Path(local_path(path)).is_dir()
    return scheme(path) == "pipe" or path.rstrip("/").endswith(TAR_SUFFIXES) or _is_pattern(split(path)[1])


def find_shards(path: Union[str, Path], remote: Optional[RemoteOptions] = None) -> Tuple[List[str], Optional[List[int]]]:
    """The shard URLs a path names (see :func:`list_shards`), in order, with their sample counts when an
    ``index.json`` gives them (None: tars without an index, to be counted from their headers)."""
    shards = list_shards(path, remote)
    counts = [s.samples for s in shards]
    return [s.url for s in shards], None if None in counts else counts


def count_tar_samples(url: str) -> int:
    """Samples (distinct keys) in a local tar, from its member headers only.

    A tar cut short counts the keys before the cut (reading it then reports the lost ones as
    ``truncated_tar``); one that cannot be read at all counts 0. Both are logged, naming the file.
    """
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isreg():
                    keys.add(member_key(member.name)[0])
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        log.warning("%s: unreadable past %d samples (%s: %s); the rest of it is skipped as truncated_tar",
                    url, len(keys - {None}), type(e).__name__, e)
    return len(keys - {None})


def shard_paths(path: Union[str, Path]) -> List[str]:
    """Paths (URLs) of the shards listed in a directory's ``index.json``, in order."""
    if is_remote(str(path)):
        return [join(str(path), s["name"]) for s in read_index(path)["shards"]]
    return [str(Path(local_path(path)) / s["name"]) for s in read_index(path)["shards"]]


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample. ``record`` is a checked LLaVA record; ``source`` is the shard it came from;
    ``template`` is the one its layout implies (``plain`` for img2dataset captions), else None. It is not
    a record field: a record's own keys are the user's data and never choose how it is rendered."""

    key: str
    record: dict
    media_kind: Optional[str]  # "image" | "video" | None (text-only)
    media_ext: Optional[str]
    media_bytes: Optional[bytes]
    source: str
    template: Optional[str] = None


def _caption_record(key: str, sample: dict, url: str) -> dict:
    """img2dataset ``jpg`` + ``txt`` [+ metadata ``json``] -> a one-turn caption record (``plain`` template)."""
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError("malformed_record", f"caption is not UTF-8 text ({e.reason} at byte {e.start})", key) from e
    if not caption:
        raise SampleError("malformed_record", "empty caption", key)
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    sample_id = str(meta.get("key") or key) if isinstance(meta, dict) else key
    return {"id": sample_id, "source": Path(url).name,
            "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": caption}]}


def to_raw_sample(sample: dict, url: str) -> RawSample:
    """A grouped tar sample -> ``RawSample`` (raises ``SampleError`` for unusable ones)."""
    key = sample["__key__"]
    if unsafe_member_name(key):
        names = ", ".join(f"{key}.{ext}" if ext else key for ext in sample if not ext.startswith("__"))
        raise SampleError("unsafe_member_name", f"tar member(s) {names}: an absolute path or '..' is never read", key)
    media = [(EXT_ALIASES.get(k, k), v) for k, v in sample.items() if media_kind(k)]
    if len(media) > 1:
        raise SampleError("malformed_record", f"{len(media)} media members; one per sample", key)
    ext, data = media[0] if media else (None, None)
    kind = media_kind(ext)
    record, template = None, None
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except ValueError as e:
            raise SampleError("malformed_record", f"json member is not JSON: {e}", key) from e
    if not (isinstance(record, dict) and "conversations" in record):
        if "txt" in sample:  # img2dataset caption layout (its json, if any, is metadata)
            if kind != "image":
                raise SampleError("missing_media", "caption record without an image", key)
            record, template = _caption_record(key, sample, url), "plain"
        elif record is None:
            raise SampleError("malformed_record", "sample has no json record", key)
    wanted = media_path(record, key)[0] if isinstance(record, dict) else None
    if wanted is not None and kind != wanted:  # e.g. its media member was lost
        raise SampleError("missing_media", f"record names a {wanted} but the shard holds {kind or 'no media'}",
                          str(record.get("id", key)))
    check_record(record, kind is not None, key)
    return RawSample(key, record, kind, ext, data, url, template)


def _complete_tar(url: str) -> bool:
    """Does a local uncompressed tar end with the end-of-archive marker (two zero blocks)?

    Needed because a tar cut exactly at a member boundary reads without any error.
    """
    path = Path(local_path(url))
    if not url.endswith(".tar") or not path.is_file():
        return True  # compressed: truncation shows up as a read error instead
    size = path.stat().st_size
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


Item = Union[RawSample, SampleError]
# Errors that say the bytes are not a whole tar (as opposed to a transfer that failed): a remote shard that
# still ends this way after its retries is stored cut short (truncated_tar), not unreachable.
_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error)


def _tar_items(stream: Any, url: str, errors: List[Exception], skip: int = 0) -> Iterator[Item]:
    """The records of an open tar stream in order from record ``skip`` on (the earlier ones are stepped over
    undecoded), each a ``RawSample`` or the ``SampleError`` that rules it out. A read error ends them and is
    appended to ``errors``; the last record before it may be incomplete."""
    def stop(exn: Exception) -> bool:  # a read error ends the shard: nothing after it is trustworthy
        errors.append(exn)
        return False

    files = tar_file_expander([{"url": url, "stream": stream}], handler=stop, eof_value=None)
    for i, sample in enumerate(group_by_keys(files, keys=member_key, handler=stop)):
        if i >= skip:
            try:
                yield to_raw_sample(sample, url)
            except SampleError as e:
                yield e


def read_shard(shard: Union[str, Shard], remote: Optional[RemoteOptions] = None) -> Iterator[Item]:
    """Every record of one shard in order: a ``RawSample``, or the ``SampleError`` that rules it out.

    A bad record keeps its place, so positions within the shard stay those the streaming plan counts
    on (a dropped record would shift every later position). A shard cut short (a read error, or no
    end-of-archive marker) ends with one ``SampleError("truncated_tar")``, in place of its last sample
    when that one is incomplete (e.g. its image member lost); a last sample complete in itself is kept.
    A remote shard (URL or ``pipe:``) is read as :func:`_read_remote_shard` says.
    """
    shard = shard if isinstance(shard, Shard) else Shard(str(shard))
    if is_remote(shard.url):
        yield from _read_remote_shard(shard, remote or RemoteOptions())
        return
    url, errors = shard.url, []
    pending: Optional[Item] = None
    n = 0
    with wds.gopen(url) as stream:  # opened here, not by the handler: a missing shard is an error, not a skip
        for item in _tar_items(stream, url, errors):
            if pending is not None:  # held back one sample: in a truncated shard the last one may be partial
                yield pending
                n += 1
            pending = item
    if errors or not _complete_tar(url):
        if isinstance(pending, RawSample):
            yield pending
            n += 1
        cause = f": {type(errors[0]).__name__}: {errors[0]}" if errors else " (no end-of-archive marker)"
        yield SampleError("truncated_tar", f"{url} is cut short after {n} samples{cause}")
    elif pending is not None:
        yield pending


def _read_remote_shard(shard: Shard, remote: RemoteOptions) -> Iterator[Item]:
    """A remote shard's records, read again after a failure (connection reset, 5xx, a stream cut short, or
    fewer records than its index counts) from the first record not yet yielded: the shard is opened anew
    and the records before it stepped over, so every record is yielded once, in order, whatever the retries.
    ``remote.retries`` failures in a row (a try that yields a record starts the count again) end the
    shard: the last record read is kept if it is complete in itself (as for a local shard cut short), one
    ``SampleError`` stands for the next (``shard_unavailable``, or ``truncated_tar`` when the bytes
    themselves end short), its later records are missing, and a warning names the URL. Before that, the
    record held back until the next one starts (it may be cut) is read again by the retry."""
    url, done, failures = shard.url, 0, 0
    while True:
        errors: List[Exception] = []
        pending: Optional[Item] = None
        progress = False
        try:
            with open_shard(url, remote, shard.bytes, shard.sha256) as stream:
                for item in _tar_items(stream, url, errors, skip=done):
                    if pending is not None:
                        yield pending
                        done, progress = done + 1, True
                    pending = item
        except Exception as e:  # noqa: BLE001 - opening it, or closing it (a pipe's exit status): retried
            errors.append(e)
        read = done + (pending is not None)
        if not errors and (shard.samples is None or read >= shard.samples):
            if pending is not None:
                yield pending
            return
        # A transfer error (a pipe's exit status comes last, at close) explains a tar error that came with it.
        error = next((e for e in errors if not isinstance(e, _DATA_ERRORS)), errors[0] if errors else
                     EOFError(f"the shard ended after {read} of its {shard.samples} samples"))
        failures = 1 if progress else failures + 1
        if failures > remote.retries:
            if isinstance(pending, RawSample):  # complete in itself (a cut member would have failed its checks)
                yield pending
                done += 1
            reason = "truncated_tar" if isinstance(error, _DATA_ERRORS) else "shard_unavailable"
            message = (f"{redact(url)}: unreadable after {failures} tries in a row ({describe(error)}); its samples "
                       f"from {done} on are skipped and counted as {reason}")
            log.warning("data: %s", message)
            yield SampleError(reason, message)
            return
        delay = remote.backoff(failures)
        log.warning("data: %s failed after %d samples (%s); retry %d of %d in %.1f s", redact(url), done,
                    describe(error), failures, remote.retries, delay)
        time.sleep(delay)


def _shard_samples(shard: Union[str, Shard], counter: SkipCounter, remote: Optional[RemoteOptions]) -> Iterator[RawSample]:
    for item in read_shard(shard, remote):
        if isinstance(item, SampleError):
            counter.add(item.reason)
        else:
            yield item


def iter_raw_samples(urls: Iterable[Union[str, dict, Shard]], counter: SkipCounter,
                     remote: Optional[RemoteOptions] = None) -> Iterator[RawSample]:
    """Samples of the given shards in order; bad ones are skipped and counted in ``counter``.

    ``urls`` are paths / URLs, :class:`Shard`s (:func:`list_shards`), or ``{"url": ...}`` dicts as yielded by
    webdataset's shard lists and node/worker splitters. A shard cut short (``truncated_tar``) yields the
    complete samples before the cut.
    """
    for url in urls:
        yield from _shard_samples(url if isinstance(url, Shard) else url["url"] if isinstance(url, dict) else str(url),
                                  counter, remote)


# ------------------------------------------------------------------------------------- CLI


def cli_build(args: argparse.Namespace) -> int:
    data_log = logging.getLogger("lm_mini.data")
    level = data_log.level
    data_log.setLevel(logging.INFO)  # one progress line per shard (and upload); not the libraries' info
    try:
        report = build_shards(args.json, args.media_root, args.out, shard_size=args.shard_size,
                              workers=args.workers, resume=args.resume, staging=getattr(args, "staging", None))
    except (ShardBuildError, ValueError) as e:
        print(f"lm-mini shards build: {e}")
        return 1
    finally:
        data_log.setLevel(level)
    print(report.summary())
    if report.skipped:
        listed = join(report.out_dir, SKIPPED_FILE) if is_remote(args.out) else Path(args.out) / SKIPPED_FILE
        print(f"skipped records are listed in {listed}")
    if report.num_samples == 0:  # every record skipped: the input's layout or the media root is almost surely wrong
        print(f"lm-mini shards build: no usable record: all {sum(report.skipped.values())} were skipped; see the reasons above")
        return 1
    return 0


def _describe_media(s: RawSample) -> str:
    sid = s.record.get("id")
    try:
        if s.media_kind == "image":
            w, h = decode_image(s.media_bytes, sid).size
            return f"image {s.media_ext} {w}x{h}"
        if s.media_kind == "video":
            info = probe_video(s.media_bytes, sid)
            return f"video {s.media_ext} {info['frames']} frames {info['width']}x{info['height']}"
    except SampleError as e:
        return f"{s.media_kind} {s.media_ext} UNREADABLE {e}"
    return "text-only"


def _token_layout(s: RawSample, tokenizer: Any, template: str) -> List[str]:
    """Tokens in runs of the same role: ``ctx`` (no loss) or ``LOSS`` (trained); the media slot shown as <media>."""
    from lm_mini.data.conversation import tokenize_conversation

    t = tokenize_conversation(s.record["conversations"], tokenizer, template, max_length=1 << 30,
                              has_media=s.media_kind is not None, sample_id=str(s.record.get("id")))
    lines, run, trained = [f"  tokens {len(t.input_ids)}, trained {sum(l != IGNORE_INDEX for l in t.labels)}"
                           + (" (UNALIGNED: all masked)" if t.unaligned else "")], [], None

    def flush() -> None:
        if run:  # decode each stretch of text whole: a character may span several byte-level tokens
            pieces, chunk = [], []
            for i in run + [IMAGE_TOKEN_INDEX]:
                if i == IMAGE_TOKEN_INDEX:
                    pieces.append(tokenizer.decode(chunk) if chunk else "")
                    chunk = []
                else:
                    chunk.append(i)
            text = "<media>".join(pieces)
            lines.append(f"  {'LOSS' if trained else 'ctx '} | {text!r}")

    for i, label in zip(t.input_ids, t.labels):
        if (label != IGNORE_INDEX) != trained:
            flush()
            run, trained = [], label != IGNORE_INDEX
        run.append(i)
    flush()
    return lines


def cli_inspect(args: argparse.Namespace) -> int:
    try:
        return _inspect(args)
    except (OSError, ValueError, KeyError) as e:  # OSError: also a remote set that cannot be read (RemoteError)
        print(f"lm-mini shards inspect: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
        return 1


def _inspect(args: argparse.Namespace) -> int:
    path = args.path if is_remote(args.path) else Path(local_path(args.path))
    if not is_remote(path) and not path.exists() and not glob.has_magic(str(path)) and "{" not in str(path):
        raise FileNotFoundError(f"{path} does not exist (expected a shard directory with index.json, a directory "
                                "of tars, a .tar file or a pattern of them)")
    if args.template:
        from lm_mini.registry import TEMPLATES

        TEMPLATES.get(args.template)  # an unknown name fails now, listing the known templates
    shards = list_shards(path)
    counts = None if any(s.samples is None for s in shards) else [s.samples for s in shards]
    if counts is not None and names_shards(path):
        print(f"{redact(str(path))}: {sum(counts)} samples in {len(shards)} shards (counts from their {INDEX_FILE})")
    elif counts is not None:  # from index.json
        index = read_index(path)
        print(f"{redact(str(path))}: {index['num_samples']} samples in {len(index['shards'])} shards; media "
              + ", ".join(f"{k} {v}" for k, v in index["media"].items())
              + f"; skipped at build: {index['skipped'] or 'none'}")
        for s in index["shards"]:
            print(f"  {s['name']}: {s['samples']} samples ({', '.join(f'{k} {v}' for k, v in s['media'].items())})")
    else:
        print(f"{path}: {len(shards)} tar files without {INDEX_FILE} (read as they are, e.g. img2dataset output)")
    tokenizer = None
    if args.tokenizer:
        from lm_mini.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    counter, shown = SkipCounter(), 0
    # (position in its shard, samples index.json gives the shard or None, item)
    items = ((k, None if counts is None else counts[i], item)
             for i, shard in enumerate(shards) for k, item in enumerate(read_shard(shard)))
    for position, expected, item in items:
        if shown == args.num_samples:
            break
        if isinstance(item, SampleError):
            lost = 1
            if item.reason == "truncated_tar" and expected is not None:
                lost = max(1, expected - position)  # every sample from here on, as the training loader counts them
            counter.add(item.reason, lost)
            print(f"--- skipped: {item}" + (f" ({lost} samples lost)" if lost > 1 else ""))
            continue
        shown += 1
        s = item
        print(f"--- {s.key} id={s.record['id']} source={s.record.get('source')} | {_describe_media(s)}")
        for turn in s.record["conversations"]:
            print(f"  {turn['from']}: {turn['value']!r}")
        if tokenizer is not None:
            try:
                print("\n".join(_token_layout(s, tokenizer, args.template or s.template or "vicuna_v1")))
            except SampleError as e:
                print(f"  cannot tokenize: {e}")
    if counter:
        print(f"skipped while reading: {counter.as_dict()}")
    return 0
