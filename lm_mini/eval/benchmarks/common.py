"""What every benchmark scorer does the same way: pair answers with questions, find references, count."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Hashable, List, Mapping, Optional, Sequence, Tuple, TypeVar

from lm_mini.eval.benchmarks.base import Benchmark, BenchmarkResult, PathLike, Question, answer_key

R = TypeVar("R")


def percent(fraction: float) -> float:
    """A fraction in [0, 1] as the paper's percentage."""
    return 100.0 * fraction


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def load_json(path: PathLike, what: str) -> Any:
    """A JSON file; a bad one is an error naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}); expected {what}") from None


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pair_answers(bench: Benchmark, answers: Sequence[Mapping[str, Any]], questions: Optional[Sequence[Question]]
                 ) -> Tuple[List[Tuple[Mapping[str, Any], Optional[Question]]], List[Any]]:
    """Each answer with its question (None for all when no question file is given) and the ids of the questions
    without an answer. An answer belongs to the question with its ``(question_id, prompt)``
    (:meth:`Benchmark.answer_key`), or, where its prompt differs, to the only question with its ``question_id``.
    An answer to no question, or a second answer to one question, is an error naming it."""
    if questions is None:
        check_unique_answers(bench, answers)
        return [(a, None) for a in answers], []
    by_key: Dict[Tuple[Hashable, str], Question] = {}
    by_id: Dict[Hashable, List[Question]] = {}
    for q in questions:
        key = bench.answer_key(q)
        if key in by_key:
            raise ValueError(f"{bench.name}: the question file has question {q.question_id!r} twice (same prompt)")
        by_key[key] = q
        by_id.setdefault(_hashable(q.question_id), []).append(q)
    pairs, seen = [], {}
    for number, a in enumerate(answers, 1):
        q = by_key.get(answer_key(a))
        if q is None:
            same_id = by_id.get(_hashable(a["question_id"]), [])
            if len(same_id) != 1:
                why = "no question has" if not same_id else f"{len(same_id)} questions have (and none has its prompt)"
                raise ValueError(f"{bench.name}: answer {number} (question_id {a['question_id']!r}): {why} this "
                                 "question_id in the question file; is it the answers file of another question file?")
            q = same_id[0]
        if id(q) in seen:
            raise ValueError(f"{bench.name}: answers {seen[id(q)]} and {number} both answer question "
                             f"{q.question_id!r} (chunks merged twice?)")
        seen[id(q)] = number
        pairs.append((a, q))
    unanswered = [q.question_id for q in questions if id(q) not in seen]
    return pairs, unanswered


def check_unique_answers(bench: Benchmark, answers: Sequence[Mapping[str, Any]]) -> None:
    """Refuse an answers file with two lines of one ``(question_id, prompt)`` (chunks merged twice?)."""
    first: Dict[Tuple[Hashable, str], int] = {}
    for number, a in enumerate(answers, 1):
        key = (_hashable(a["question_id"]), a.get("prompt", ""))
        if key in first:
            raise ValueError(f"{bench.name}: answers {first[key]} and {number} both answer question "
                             f"{a['question_id']!r} with the same prompt (chunks merged twice?)")
        first[key] = number


def _hashable(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else json.dumps(value, sort_keys=True)


class Referenced(Generic[R]):
    """Answers split into those with a reference (``scored``: (answer, question, reference)) and the ids of the
    others (``excluded``): a question without a reference is never scored, never counted correct."""

    def __init__(self, bench: Benchmark, pairs: Sequence[Tuple[Mapping[str, Any], Optional[Question]]],
                 reference: Callable[[Mapping[str, Any], Optional[Question]], Optional[R]], source: str):
        self.scored: List[Tuple[Mapping[str, Any], Optional[Question], R]] = []
        self.excluded: List[Any] = []
        for a, q in pairs:
            ref = reference(a, q)
            if ref is None:
                self.excluded.append(a["question_id"])
            else:
                self.scored.append((a, q, ref))
        if pairs and not self.scored:
            raise ValueError(f"{bench.name}: none of the {len(pairs)} answers has a reference answer in {source} "
                             f"(first question_id {pairs[0][0]['question_id']!r}); is it the annotation file of "
                             "these questions?")

    def result(self, bench: Benchmark, scores: Dict[str, float], unanswered: Sequence[Any] = (),
               notes: Sequence[str] = ()) -> BenchmarkResult:
        """The result over :attr:`scored`, saying what was left out."""
        notes = list(notes)
        if self.excluded:
            notes.append(f"{len(self.excluded)} answers have no reference answer: not scored (see excluded)")
        if unanswered:
            notes.append(f"{len(unanswered)} questions of the question file have no answer: not scored (the official "
                         "script counts a missing answer as wrong or refuses the file; see unanswered)")
        return BenchmarkResult(bench.name, n=len(self.scored), scores=scores, excluded=list(self.excluded),
                               notes=notes, unanswered=list(unanswered))


def require(value: Any, bench: Benchmark, what: str) -> Any:
    """``value``, or an error saying the benchmark's scorer needs ``what``."""
    if value is None:
        raise ValueError(f"{bench.name}: scoring needs {what}")
    return value
