"""The majority-answer baseline: what a model scores that answers every question with the most frequent
answer of its question type, without looking at the image. A held-out score means something only above it."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, Iterable


def majority_baseline(records: Iterable[dict]) -> Dict[str, dict]:
    """Per question type (a record's ``question_type``), the most frequent answer and the accuracy of always
    answering it (ties go to the alphabetically first answer); ``overall`` = that per-type guesser on all records.
    Every answer of a multi-turn record counts."""
    answers: Dict[str, Counter] = defaultdict(Counter)
    for r in records:
        gpt = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        answers[r.get("question_type", "unknown")].update(gpt)
    out: Dict[str, dict] = {}
    for qtype, counts in sorted(answers.items()):
        answer, hits = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        out[qtype] = {"answer": answer, "accuracy": hits / sum(counts.values()), "n": sum(counts.values())}
    total = sum(v["n"] for v in out.values())
    out["overall"] = {"accuracy": sum(v["accuracy"] * v["n"] for v in out.values()) / max(total, 1), "n": total}
    return out
