"""A toy benchmark for the runner's tests: LLaVA's question file, a fixed prompt suffix, exact match in percent
against an annotations JSON ``{question_id (as a string): answer}``; questions without an annotation are excluded."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, Question

SUFFIX = "\nAnswer the question using a single word or phrase."


class ToyVQA(Benchmark):
    name = "toy_vqa"
    max_new_tokens = 3
    needs_annotations = True

    def prompt(self, question: Question) -> str:
        return question.text + SUFFIX

    def score(self, answers: Sequence[Mapping[str, Any]], questions: Optional[Sequence[Question]] = None,
              annotations: Optional[str] = None, judge: Optional[str] = None) -> BenchmarkResult:
        gold = json.loads(open(annotations).read())
        scored = [a for a in answers if str(a["question_id"]) in gold]
        hits = sum(a["text"].strip().lower() == gold[str(a["question_id"])].lower() for a in scored)
        excluded = [a["question_id"] for a in answers if str(a["question_id"]) not in gold]
        answered = {str(a["question_id"]) for a in answers}
        unanswered = [q.question_id for q in questions or [] if str(q.question_id) not in answered]
        return BenchmarkResult(self.name, len(scored), {"accuracy": 100.0 * hits / max(1, len(scored))}, excluded,
                               unanswered=unanswered)


if "toy_vqa" not in BENCHMARKS._entries:
    BENCHMARKS.register("toy_vqa")(ToyVQA)
