"""Score an answers file of a benchmark without the model: ``lm-mini score --benchmark NAME --answers FILE``.

:func:`score_answers` is what ``lm-mini score`` and the benchmark runner call after generating: it writes the
benchmark's submission / judge input file and scores what can be scored here (the official scorer, or the
user's judge command for GPT-judged benchmarks).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question, read_answers
from lm_mini.eval.benchmarks.common import check_unique_answers

Answers = Union[PathLike, Sequence[Mapping[str, Any]]]
Questions = Union[PathLike, Sequence[Question], None]


def get_benchmark(name: Union[str, Benchmark]) -> Benchmark:
    """A benchmark by its registered name (unknown names list the known ones)."""
    return name if isinstance(name, Benchmark) else BENCHMARKS.create(name)


def score_answers(benchmark: Union[str, Benchmark], answers: Answers, questions: Questions = None,
                  annotations: Optional[PathLike] = None, out_dir: Optional[PathLike] = None,
                  judge: Optional[str] = None) -> BenchmarkResult:
    """Score ``answers`` (an answers file or its lines) of ``benchmark`` as its official scorer does.

    ``questions``: the benchmark's question file (or its :class:`Question` list); ``annotations``: its reference
    answers in the official format (see each benchmark); ``out_dir``: where the submission / judge input file
    goes (not written when None); ``judge``: the judge command of a GPT-judged benchmark. A benchmark that
    needs annotations is not scored without them (the result says so); one that needs the question file
    refuses to run without it."""
    bench = get_benchmark(benchmark)
    if not isinstance(answers, (str, Path)):
        answer_lines = list(answers)
    else:
        answer_lines = read_answers(answers)
    if questions is not None and isinstance(questions, (str, Path)):
        questions = bench.read_questions(questions)
    if bench.needs_questions and questions is None:
        raise ValueError(f"{bench.name}: scoring needs the question file (--questions)")
    check_unique_answers(bench, answer_lines)
    files = {}
    if out_dir is not None:
        written = bench.write_submission(answer_lines, out_dir, questions, annotations)
        if written is not None:
            files["judge_input" if bench.judged else "submission"] = str(written)
    if bench.needs_annotations and annotations is None and not bench.judged:
        result = BenchmarkResult(bench.name, n=0, notes=[
            f"no --annotations: {bench.name} is not scored here" + (" (its submission file is written)" if files else "")])
    else:
        result = bench.score(answer_lines, questions, annotations, judge=judge)
    result.files.update(files)
    return result


def format_result(result: BenchmarkResult) -> str:
    """A result as lines for a terminal."""
    lines = [f"{result.benchmark}: {result.n} answers scored"]
    width = max((len(k) for k in result.scores), default=0)
    lines += [f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) and math.isfinite(v) else f"  {k:<{width}}  {v}"
              for k, v in result.scores.items()]
    if result.excluded:
        lines.append(f"  excluded (no reference answer): {len(result.excluded)}, e.g. {result.excluded[:5]}")
    if result.unanswered:
        lines.append(f"  unanswered (not scored): {len(result.unanswered)}, e.g. {result.unanswered[:5]}")
    lines += [f"  {what}: {path}" for what, path in result.files.items()]
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)
