"""Building shard sets: LLaVA JSON/JSONL + media -> WebDataset shards with ``index.json`` (``lm-mini shards build``).

Input records are LLaVA's (``conversations`` + an ``image`` or ``video`` path) or Video-ChatGPT's own
(``video_id``, ``q``, ``a``), read by :mod:`lm_mini.data.llava_records`. The layout written is
:mod:`lm_mini.data.shard_format`'s.

Building is deterministic: shard i depends only on its range of input records, so the same input
gives byte-identical shards with any number of worker processes. Shards are written under temporary
names and renamed; ``index.json`` is written last, so a directory with an ``index.json`` is complete.
An interrupted build keeps its state in ``.build/`` and ``resume=True`` finishes it. A build whose
``out_dir`` is a URL (``s3://bucket/set``, any fsspec URL) is made in a local staging folder and uploaded:
the shards, ``skipped.json``, then ``index.json``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import webdataset as wds

from lm_mini.data.errors import SampleError, SkipCounter
from lm_mini.data.llava_records import BadLine, InputFile, check_media_root, load_media, media_file, read_input
from lm_mini.data.remote import RemoteOptions, check_writable, is_remote, local_path, redact, scheme, upload
from lm_mini.data.shard_format import (FORMAT, INDEX_FILE, SKIPPED_FILE, STATE_DIR, ShardBuildError, check_record, media_kind,
                                       media_path, shard_name)
from lm_mini.data.shard_reader import read_index

TAR_MTIME = 0  # fixed member time/owner so the same input gives byte-identical tars
log = logging.getLogger(__name__)


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
    if isinstance(record, BadLine):
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
        ext, data = load_media(kind, media_file(media_root, kind, rel), sample_id)
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


def _build_params(sources: Sequence[InputFile], shard_size: int) -> dict:
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
    sources = [read_input(p) for p in json_files]
    if not any(s.records for s in sources):
        raise ShardBuildError(f"no records in {', '.join(s.path for s in sources)}")
    check_media_root(sources, Path(media_root))
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
                           _build_params([read_input(p) for p in json_files], shard_size))
        if diff:
            raise ShardBuildError(f"{redact(url)} holds a finished build of other inputs ({diff}); refusing to overwrite it")
        return _report(Path(), existing, [], shards_written=0)._replace_out(url)
    try:
        check_writable(url, remote)
    except Exception as e:  # fsspec's stores raise their own kinds (PermissionError, ClientError, ...)
        raise ShardBuildError(f"cannot write the shard set to {redact(url)} ({type(e).__name__}: {redact(str(e))}); "
                              "nothing was built") from e
    stage = Path(staging) if staging is not None else Path(tempfile.mkdtemp(prefix="lm_mini-shards-"))
    report = build_shards(json_files, media_root, stage, shard_size=shard_size, workers=workers, resume=resume)
    if report.num_samples == 0:  # nothing to train on: not published (the caller reports why)
        return report._replace_out(url)
    names = [s["name"] for s in read_index(stage)["shards"]] + [SKIPPED_FILE, INDEX_FILE]
    try:
        upload(stage, names, url, remote)
    except OSError as e:
        raise ShardBuildError(f"{e}; the built set stays in {stage}: upload it by running the same command again with "
                              f"--staging {stage} --resume") from e
    if staging is None:
        shutil.rmtree(stage, ignore_errors=True)
    return report._replace_out(url)


def _read_skipped(out: Path) -> List[dict]:
    path = out / SKIPPED_FILE
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _report(out: Path, index: dict, skipped_records: List[dict], shards_written: int) -> BuildReport:
    return BuildReport(str(out), index["num_samples"], len(index["shards"]), dict(index["media"]),
                       dict(index["skipped"]), shards_written, skipped_records)
