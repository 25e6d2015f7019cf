"""Score an answers file of a benchmark without the model: ``lm-mini score --benchmark NAME --answers FILE``.

:func:`score_answers` is what ``lm-mini score`` and the benchmark runner call after generating: it writes the
benchmark's submission / judge input file and scores what can be scored here (the official scorer, or the
user's judge command for GPT-judged benchmarks).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lm_mini.eval.benchmarks.base import (BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question, SubmissionNotWritten,
                                          check_one_source, read_answers)
from lm_mini.eval.benchmarks.common import check_unique_answers

Answers = Union[PathLike, Sequence[Mapping[str, Any]]]
Questions = Union[PathLike, Sequence[Question], None]


def get_benchmark(name: Union[str, Benchmark]) -> Benchmark:
    """A benchmark by its registered name (unknown names list the known ones)."""
    return name if isinstance(name, Benchmark) else BENCHMARKS.create(name)


def score_answers(benchmark: Union[str, Benchmark], answers: Answers, questions: Questions = None,
                  annotations: Optional[PathLike] = None, out_dir: Optional[PathLike] = None,
                  judge: Optional[str] = None, submission_questions: Questions = None,
                  questions_file: Optional[PathLike] = None) -> BenchmarkResult:
    """Score ``answers`` (an answers file or its lines) of ``benchmark`` as its official scorer does.

    ``questions``: the benchmark's question file (or its :class:`Question` list); ``annotations``: its reference
    answers in the official format (see each benchmark); ``out_dir``: where the submission / judge input file
    goes (not written when None); ``judge``: the judge command of a GPT-judged benchmark;
    ``submission_questions``: the questions the submission file lists when they are not ``questions`` (VQAv2:
    every test2015 question for a test-dev run; by default LLaVA's test2015 file found beside a test-dev question
    file, :meth:`Benchmark.submission_questions_for`). A benchmark that needs annotations is not scored without
    them (the result says so); one that needs the question file refuses to run without it. Answers of different
    models, checkpoints or generation options in one file are refused (:func:`check_one_source`); so is an
    incomplete file where the official scorer refuses one (:attr:`Benchmark.missing_answers`)."""
    bench = get_benchmark(benchmark)
    where = str(answers) if isinstance(answers, (str, Path)) else "the answers"
    answer_lines = read_answers(answers) if isinstance(answers, (str, Path)) else list(answers)
    if isinstance(questions, (str, Path)):  # ``questions_file``: where a Question list was read from
        questions_file, questions = questions, bench.read_questions(questions)
    if bench.needs_questions and questions is None:
        raise ValueError(f"{bench.name}: scoring needs the question file (--questions)")
    check_one_source([(f"{where}:{i}", a) for i, a in enumerate(answer_lines, 1)], where)
    repeats = check_unique_answers(bench, answer_lines)
    files, notes = {}, []
    if submission_questions is None and questions_file is not None:
        submission_questions, note = bench.submission_questions_for(questions_file)
        notes += [note] if note and out_dir is not None else []
    if isinstance(submission_questions, (str, Path)):
        submission_questions = bench.read_questions(submission_questions)
    if out_dir is not None:
        try:
            written = bench.write_submission(answer_lines, out_dir,
                                             submission_questions if submission_questions is not None else questions,
                                             annotations)
        except SubmissionNotWritten as e:
            notes.append(f"submission not written: {e}")
        else:
            if written is not None:
                files["judge_input" if bench.judged else "submission"] = str(written)
    if bench.needs_annotations and annotations is None and not bench.judged:
        result = BenchmarkResult(bench.name, n=0, notes=[
            f"no --annotations: {bench.name} is not scored here" + (" (its submission file is written)" if files else "")])
    else:
        result = bench.score(answer_lines, questions, annotations, judge=judge)
    if repeats and questions is None:
        result.notes.append(f"{repeats} answers repeat the (question_id, prompt) of an earlier answer: each scored as "
                            "its own question, as the official script reads the file (give --questions to check them "
                            "against the question file)")
    result.files.update(files)
    result.notes = notes + result.notes
    return result


def format_result(result: BenchmarkResult) -> str:
    """A result as lines for a terminal."""
    lines = [f"{result.benchmark}: {result.n} questions scored" if result.scores or result.n else f"{result.benchmark}: not scored"]
    width = max((len(k) for k in result.scores), default=0)
    lines += [f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) and math.isfinite(v) else f"  {k:<{width}}  {v}"
              for k, v in result.scores.items()]
    if result.excluded:
        lines.append(f"  excluded (no reference answer): {len(result.excluded)}, e.g. {result.excluded[:5]}")
    if result.unanswered:
        lines.append(f"  questions without an answer: {len(result.unanswered)}, e.g. {result.unanswered[:5]} (see the note)")
    lines += [f"  {what}: {path}" for what, path in result.files.items()]
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)
