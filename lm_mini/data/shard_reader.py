"""Reading shard sets: which shards a path names (with their counts from ``index.json``), and their records.

A shard set is read from a local path or pattern, an ``http(s)://`` or other fsspec URL (``s3://``,
``gs://``, ...) or a ``pipe:`` command (:mod:`lm_mini.data.remote`); a remote set is read through its
``index.json``, fetched from the same place as its shards, and a remote shard that fails mid-read is
retried from the record where it failed. The layout is :mod:`lm_mini.data.shard_format`'s; img2dataset
caption shards (``jpg`` + ``txt``) become one-turn caption records for the ``plain`` template.
"""
from __future__ import annotations

import fnmatch
import re
import glob
import json
import logging
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from lm_mini.data.errors import SampleError, SkipCounter
from lm_mini.data.remote import (TAR_SUFFIXES, RemoteOptions, describe, is_remote, join, local_path, open_shard, read_bytes,
                                 redact, scheme, sibling, split)
from lm_mini.data.shard_format import (EXT_ALIASES, FORMAT, INDEX_FILE, STATE_DIR, check_record, media_kind, media_path,
                                       member_key, unsafe_member_name)

log = logging.getLogger(__name__)


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
    for i, entry in enumerate(index.get("shards", [])):
        # A shard's name is joined to the set's folder or URL and, for pipe: sets, spliced into a shell command:
        # anything but a plain file name (a path, '..', shell syntax) could read or run what the index's author chose.
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise ValueError(f"{where}: shards[{i}] has name {name!r}; a shard set's index names plain files in its own "
                             "folder (letters, digits, '.', '_', '-'; e.g. shard-000000.tar)")
        if not isinstance(entry.get("samples"), int) or entry["samples"] < 0:
            raise ValueError(f"{where}: shards[{i}] ({name}) has samples {entry.get('samples')!r}; expected a count >= 0")
    return index


_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


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
