"""What every benchmark scorer does the same way: pair answers with questions, find references, count."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Hashable, List, Mapping, Optional, Sequence, Tuple, TypeVar

from lm_mini.eval.benchmarks.base import Benchmark, BenchmarkResult, IncompleteAnswers, PathLike, Question

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


def write_json(path: Path, obj: Any, indent: Optional[int] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
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
    A question the file asks several times (TextVQA's ``question_id`` is the image's: two annotators may ask the
    same) takes that many answers, in order. An answer to no question, or one more answer than the question file
    asks its question, is an error naming it."""
    if questions is None:
        check_unique_answers(bench, answers)
        return [(a, None) for a in answers], []
    by_key: Dict[Tuple[Hashable, str], List[Question]] = {}
    by_id: Dict[Hashable, List[Question]] = {}
    for q in questions:
        question_id, prompt = bench.answer_key(q)
        by_key.setdefault((_hashable(question_id), prompt), []).append(q)
        by_id.setdefault(_hashable(q.question_id), []).append(q)
    pairs: List[Tuple[Mapping[str, Any], Optional[Question]]] = []
    taken: Dict[Tuple[Hashable, str], List[int]] = {}  # key -> numbers of the answers given to its questions
    answered = set()
    for number, a in enumerate(answers, 1):
        key = (_hashable(a["question_id"]), a.get("prompt", ""))
        asked = by_key.get(key)
        if asked is None:
            same_id = by_id.get(_hashable(a["question_id"]), [])
            if len(same_id) != 1:
                why = "no question has" if not same_id else f"{len(same_id)} questions have (and none has its prompt)"
                raise ValueError(f"{bench.name}: answer {number} (question_id {a['question_id']!r}): {why} this "
                                 "question_id in the question file; is it the answers file of another question file?")
            question_id, prompt = bench.answer_key(same_id[0])
            key = (_hashable(question_id), prompt)
            asked = by_key[key]
        numbers = taken.setdefault(key, [])
        if len(numbers) >= len(asked):
            times = "once" if len(asked) == 1 else f"{len(asked)} times"
            verb = "both answer" if len(numbers) == 1 else "all answer"
            raise ValueError(f"{bench.name}: answers {', '.join(map(str, numbers))} and {number} {verb} question "
                             f"{a['question_id']!r} (prompt {key[1][:60]!r}), which the question file asks {times}: "
                             "an answers file of two runs or chunks put together?")
        pairs.append((a, asked[len(numbers)]))
        answered.add(id(asked[len(numbers)]))
        numbers.append(number)
    unanswered = [q.question_id for q in questions if id(q) not in answered]
    return pairs, unanswered


def check_unique_answers(bench: Benchmark, answers: Sequence[Mapping[str, Any]]) -> int:
    """Refuse an answers file that holds one answer twice (two lines of one ``(question_id, prompt)`` with the same
    ``answer_id``: chunks merged twice). Lines of one ``(question_id, prompt)`` with different (or no) answer ids
    answer a question the question file asks more than once, which is legal: returns how many lines repeat an
    earlier line's question (the caller notes them; with the question file they are checked against it)."""
    first: Dict[Tuple[Hashable, str, Hashable], int] = {}
    keys = set()
    repeats = 0
    for number, a in enumerate(answers, 1):
        key = (_hashable(a["question_id"]), a.get("prompt", ""))
        answer_id = a.get("answer_id")
        if answer_id not in (None, ""):
            line = key + (_hashable(answer_id),)
            if line in first:
                raise ValueError(f"{bench.name}: answers {first[line]} and {number} both answer question "
                                 f"{a['question_id']!r} with the same prompt and answer_id {answer_id!r}: the same "
                                 "answer twice (chunks merged twice?)")
            first[line] = number
        if key in keys:
            repeats += 1
        keys.add(key)
    return repeats


def _hashable(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else json.dumps(value, sort_keys=True)


def unanswered_notes(bench: Benchmark, unanswered: Sequence[Any], total: Optional[int] = None) -> List[str]:
    """What the benchmark's official scorer does with questions of its set that have no answer
    (:attr:`Benchmark.missing_answers`): raise :class:`IncompleteAnswers` ("refuse"), or the note saying that they
    were counted wrong / not counted, quoting :attr:`Benchmark.missing_rule`. The scorer counts them itself."""
    if not unanswered:
        return []
    n = len(unanswered)
    of = f" of {total}" if total is not None else ""
    shown = ", ".join(repr(q) for q in list(unanswered)[:5]) + (", ..." if n > 5 else "")
    if bench.missing_answers == "refuse":
        raise IncompleteAnswers(f"{bench.name}: {n}{of} questions have no answer ({shown}): not scored, as "
                                f"{bench.missing_rule}. Finish the answers file (lm-mini eval with the same "
                                "--answers-file answers the rest) or score the answers of a complete run")
    if bench.missing_answers == "wrong":
        return [f"{n}{of} questions have no answer: counted wrong, as {bench.missing_rule} (see unanswered)"]
    return [f"{n}{of} questions have no answer: not counted, as {bench.missing_rule} (see unanswered)"]


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
               notes: Sequence[str] = (), missing_scored: int = 0, total: Optional[int] = None) -> BenchmarkResult:
        """The result over :attr:`scored` (plus ``missing_scored`` unanswered questions the scorer counted wrong),
        saying what was left out; ``unanswered`` (of ``total`` questions in the benchmark's set; default: the
        question file's) goes through :func:`unanswered_notes`, which refuses where the official scorer does."""
        notes = list(notes)
        if self.excluded:
            notes.append(f"{len(self.excluded)} answers have no reference answer: not scored (see excluded)")
        if total is None:  # the set is the question file's: the answered questions and the others
            total = len(self.scored) + len(self.excluded) + len(unanswered)
        notes += unanswered_notes(bench, unanswered, total)
        return BenchmarkResult(bench.name, n=len(self.scored) + missing_scored, scores=scores,
                               excluded=list(self.excluded), notes=notes, unanswered=list(unanswered))


def require(value: Any, bench: Benchmark, what: str) -> Any:
    """``value``, or an error saying the benchmark's scorer needs ``what``."""
    if value is None:
        raise ValueError(f"{bench.name}: scoring needs {what}")
    return value
