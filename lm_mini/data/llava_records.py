"""The builder's input: LLaVA JSON / JSONL files of records (or Video-ChatGPT's own ``{"video_id", "q", "a"}``),
and the media files they name under a media root, read and checked before anything is written
(:mod:`lm_mini.data.shard_builder` writes the shards)."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

from PIL import Image

from lm_mini.constants import VIDEO_PLACEHOLDER
from lm_mini.data.errors import SampleError
from lm_mini.data.media import decode_image, probe_video
from lm_mini.data.shard_format import EXT_ALIASES, IMAGE_EXTS, VIDEO_EXTS, ShardBuildError, media_kind, media_path

_PIL_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL's format name -> member extension


def from_video_chatgpt(record: Any) -> Any:
    """Video-ChatGPT's own record (``VideoInstruct100K.json``: ``{"video_id", "q", "a"}``) as a LLaVA
    record: one exchange about the video ``video_id`` (see :func:`media_file`). Anything else is returned as is."""
    if not (isinstance(record, dict) and "conversations" not in record and is_record(record)):
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


def load_media(kind: str, path: Path, sample_id: str) -> Tuple[str, bytes]:
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


# ------------------------------------------------------------------------------------- input files


@dataclass
class InputFile:
    path: str
    sha256: str
    records: List[Tuple[int, Any]]  # (line or list position, record or a JSONL parse error)


class BadLine(str):
    """A JSONL line that is not JSON; kept in place so it is reported as a malformed record."""


def read_input(path: Union[str, Path]) -> InputFile:
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
        if isinstance(whole, dict) and not is_record(whole):
            keys = ", ".join(map(repr, list(whole)[:5]))
            raise ShardBuildError(f"{path} holds one JSON object (keys {keys}), not LLaVA records: expected a JSON list "
                                  "of records or JSON lines (one record per line)")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardBuildError(f"{path} is not valid JSON: {e}") from e
        return InputFile(str(path), sha, [(i, from_video_chatgpt(r)) for i, r in enumerate(records)])
    out: List[Tuple[int, Any]] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((line_no, from_video_chatgpt(json.loads(line))))
            except json.JSONDecodeError as e:
                out.append((line_no, BadLine(f"line is not JSON: {e}")))
    if out and not any(isinstance(r, dict) for _, r in out):  # e.g. pretty-printed JSON that is not records
        raise ShardBuildError(f"{path} is neither a JSON list of records nor JSON lines of records (no line is a "
                              "JSON object)")
    return InputFile(str(path), sha, out)


def is_record(obj: dict) -> bool:
    return "conversations" in obj or {"video_id", "q", "a"} <= obj.keys()



def check_media_root(sources: Sequence[InputFile], media_root: Path, probe: int = 100) -> None:
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
