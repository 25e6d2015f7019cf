"""LLaVA's answers files on disk: chunks (``get_chunk``, ``<dir>/<stem>/N_K.jsonl``), continuing an interrupted
file, merging chunks, and which weights wrote them. One JSON line per question
(:class:`lm_mini.eval.benchmarks.base.Answer`); a file continues only the run that wrote it (same questions in
order, same model, weights and generation options: ``metadata.weights`` holds :func:`weights_record`)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lm_mini.eval.benchmarks.base import (MixedAnswers, answer_key, check_one_source, describe_provenance, provenance,
                                          read_answers)

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- chunks (LLaVA's get_chunk)
def split_list(items: Sequence[Any], n: int) -> List[Sequence[Any]]:
    """LLaVA's ``split_list``: pieces of ``ceil(len / n)`` items (so there may be fewer than ``n`` pieces)."""
    if n < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {n}")
    size = max(1, math.ceil(len(items) / n))
    return [items[i:i + size] for i in range(0, len(items), size)]


def get_chunk(items: Sequence[Any], n: int, k: int) -> List[Any]:
    """Piece ``k`` of :func:`split_list` (empty where LLaVA's script would fail with an IndexError: fewer
    questions than chunks)."""
    if not 0 <= k < n:
        raise ValueError(f"--chunk-idx must be in [0, {n - 1}] for --num-chunks {n}, got {k}")
    pieces = split_list(items, n)
    return list(pieces[k]) if k < len(pieces) else []


def chunk_file(answers_file: PathLike, n: int, k: int) -> Path:
    """Where chunk ``k`` of ``n`` of ``answers_file`` is written: ``<dir>/<stem>/<n>_<k>.jsonl`` (LLaVA's layout,
    ``answers/<ckpt>/<CHUNKS>_<IDX>.jsonl`` merged into ``answers/<ckpt>.jsonl``)."""
    p = Path(answers_file)
    return p.parent / p.stem / f"{n}_{k}.jsonl"


# --------------------------------------------------------------------------- answers files
def read_finished(path: Path) -> List[Dict[str, Any]]:
    """The complete answer lines of a (possibly interrupted) answers file; a last line cut off mid-write is
    dropped from the file (it is regenerated)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # killed while writing its last line
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (%d bytes)", path, len(data) - cut)
        with path.open("r+b") as f:
            f.truncate(cut)
    return read_answers(path)


def check_resumable(path: Path, done: Sequence[Mapping[str, Any]], keys: Sequence[Tuple[Any, str]],
                    expected: Mapping[str, Any]) -> None:
    """An existing answers file continues this run only if it answers this run's questions, in order, and was
    written by this run's model, weights and generation options (``expected``: an answers line of this run, whose
    :func:`provenance` every line must share)."""
    if len(done) > len(keys):
        raise ValueError(f"{path} holds {len(done)} answers but this run has {len(keys)} questions: "
                         "another question file or chunk? Pass another --answers-file or delete it")
    for i, (a, k) in enumerate(zip(done, keys)):
        if answer_key(a) != k:
            raise ValueError(f"{path}: line {i + 1} answers question {a['question_id']!r} where this run's question "
                             f"{i + 1} is {k[0]!r} (another question file, chunk or benchmark?). Pass another "
                             "--answers-file or delete it")
        if provenance(a) != provenance(expected):
            raise MixedAnswers(f"{path}: line {i + 1} was written by {describe_provenance(a)}; this run is "
                               f"{describe_provenance(expected)}. Its answers are not continued with another model, "
                               "checkpoint or generation options: pass another --answers-file (or --model-id) or "
                               "delete it")


@dataclass
class Merged:
    """What :func:`merge_chunks` wrote."""

    answers_file: Path
    chunks: int  # chunk files concatenated
    answers: List[Dict[str, Any]]


def merge_chunks(answers_file: PathLike, num_chunks: int, questions: Optional[Sequence[Tuple[Any, str]]] = None) -> Merged:
    """Concatenate the chunk files of ``answers_file`` in chunk order into it (LLaVA's merge loop). With the
    questions' answer keys, each chunk must answer exactly its piece of them (no merge of an unfinished job); the
    chunks must come from one model, checkpoint and set of generation options (a chunk left by an earlier
    checkpoint or setting is named, not mixed in)."""
    out = Path(answers_file)
    parts = [chunk_file(out, num_chunks, k) for k in range(num_chunks)]
    absent = [str(p) for p in parts if not p.is_file()]
    pieces = split_list(list(questions), num_chunks) if questions is not None else None
    if pieces is not None:  # chunks past the last piece have no questions: an absent file is fine there
        absent = [str(p) for k, p in enumerate(parts) if not p.is_file() and k < len(pieces)]
    if absent:
        raise FileNotFoundError(f"--merge {out}: chunk file(s) missing: {', '.join(absent)}")
    merged: List[Dict[str, Any]] = []
    lines: List[Tuple[str, Dict[str, Any]]] = []
    found = 0
    for k, part in enumerate(parts):
        if not part.is_file():
            continue
        found += 1
        answers = read_answers(part)
        if pieces is not None:
            want = list(pieces[k]) if k < len(pieces) else []
            got = [answer_key(a) for a in answers]
            if got != want:
                raise ValueError(f"--merge: {part} has {len(got)} answers, chunk {k} of {num_chunks} has {len(want)} "
                                 "questions" + ("" if len(got) != len(want) else " (other questions)")
                                 + ": finish that chunk first (run it again with the same --answers-file)")
        lines += [(f"{part}:{i}", a) for i, a in enumerate(answers, 1)]
        merged += answers
    check_one_source(lines, f"--merge {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(a) + "\n" for a in merged), encoding="utf-8")
    tmp.replace(out)
    return Merged(out, found, merged)


# --------------------------------------------------------------------------- which weights wrote them
def weights_fingerprint(model: Any, samples: int = 4096) -> str:
    """A fingerprint of a model's weights: SHA-256 over every tensor of its state dict (name, dtype, shape and the
    bytes of ``samples`` evenly spaced elements), 16 hex digits. Two checkpoints of one run differ in it (every
    trained tensor moves), the same weights loaded twice, on any device, do not; it costs one small gather per
    tensor, not a pass over the weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples:
            index = torch.arange(samples, device=flat.device) * (flat.numel() - 1) // (samples - 1)
            flat = flat[index]
        digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_tag(info: Mapping[str, Any]) -> Optional[str]:
    """The checkpoint a source's weights come from, as a folder name (``step=00000200``); None for a model directory."""
    name = info.get("checkpoint")
    return str(name).split(".ckpt")[0] if name else None


def weights_record(model: Any, info: Mapping[str, Any], path: Optional[Path]) -> Dict[str, Any]:
    """``metadata.weights`` of the answers lines: the weights' fingerprint, and where they come from (checkpoint
    file and global step of a run, or the model directory)."""
    record: Dict[str, Any] = {"fingerprint": weights_fingerprint(model)}
    if info.get("checkpoint"):
        record["checkpoint"] = str(info["checkpoint"])
    if info.get("global_step") is not None:
        record["step"] = int(info["global_step"])
    record["source"] = str(Path(info["run_dir"]) if info.get("run_dir") else path)
    return record


def answers_weights(answers: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The ``metadata.weights`` record of an answers file (one source: checked by scoring), {} where it has none."""
    meta = answers[0].get("metadata") if answers else None
    weights = meta.get("weights") if isinstance(meta, Mapping) else None
    return weights if isinstance(weights, Mapping) else {}
