"""SEED-Bench, scored as ``convert_seed_for_submission.py`` (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786,
``scripts/``; ``scripts/llavamini/eval_image/seed.sh`` asks ``llava-seed-bench.jsonl`` with ``model_vqa_loader.py``)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, SubmissionNotWritten
from lm_mini.eval.benchmarks.common import Referenced, load_json, mean, pair_answers, percent, require, write_jsonl


def _id_key(question_id: Any) -> Any:
    """SEED ids as the script looks them up: ``int(question_id)`` where that works, else as given."""
    try:
        return int(question_id)
    except (TypeError, ValueError):
        return question_id


@BENCHMARKS.register("seed_bench")
class SEEDBench(Benchmark):
    """SEED-Bench: an answer is right when its text *equals* the question's ``answer`` letter (``"A"``; ``"A."``
    is wrong), as the script's ``row['text'] == question_data['answer']``. Scores in percent over the script's
    denominators, every question of ``SEED-Bench.json`` (a question without an answer counts wrong, as in the
    script): ``accuracy``, ``image/accuracy`` (``data_type == "image"``: the paper's SEED-I) and
    ``video/accuracy``, and ``<question type>/accuracy`` per type. Writes the upload file as the script does
    (``{"question_id", "prediction"}`` lines, in the annotation's order) when every question has an answer (the
    script fails on a missing one, and the leaderboard wants them all).

    ``--annotations``: ``SEED-Bench.json`` (``{"questions": [{"question_id", "answer", "data_type",
    "question_type_id"}], "question_type": {name: id}}``)."""

    name = "seed_bench"
    needs_annotations = True
    headline = "image/accuracy"
    missing_answers = "wrong"
    missing_rule = ("convert_seed_for_submission.py counts every question of SEED-Bench.json (in its type, in "
                    "image/video and in the total)")

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        data = self._annotations(require(annotations, self, "--annotations (SEED-Bench.json)"))
        by_id = {_id_key(q["question_id"]): q for q in data["questions"]}
        names = {type_id: name for name, type_id in data.get("question_type", {}).items()}
        pairs, _ = pair_answers(self, answers, questions)

        def reference(a, q) -> Optional[Dict[str, Any]]:
            question = by_id.get(_id_key(a["question_id"]))
            return question if question is not None and question.get("answer") else None

        ref = Referenced(self, pairs, reference, str(annotations))
        answered = {_id_key(a["question_id"]) for a, _, _ in ref.scored}
        missing = [q for key, q in by_id.items() if key not in answered and q.get("answer")]
        groups: Dict[str, List[float]] = defaultdict(list)
        for text, question in [(a["text"], question) for a, _, question in ref.scored] + [(None, q) for q in missing]:
            hit = float(text == question["answer"])  # no answer: wrong
            groups["accuracy"].append(hit)
            groups[f"{question.get('data_type', 'unknown')}/accuracy"].append(hit)
            type_id = question.get("question_type_id")
            groups[f"{names.get(type_id, type_id)}/accuracy"].append(hit)
        return ref.result(self, {k: percent(mean(v)) for k, v in sorted(groups.items())},
                          [q["question_id"] for q in missing], missing_scored=len(missing), total=len(groups["accuracy"]))

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        if annotations is None:
            results = [{"question_id": a["question_id"], "prediction": a["text"]} for a in answers]
        else:
            by_id = {_id_key(a["question_id"]): a for a in answers}
            listed = self._annotations(annotations)["questions"]
            missing = [q["question_id"] for q in listed if _id_key(q["question_id"]) not in by_id]
            if missing:
                raise SubmissionNotWritten(f"{len(missing)} of the {len(listed)} questions of {annotations} have no answer "
                                           f"(e.g. {missing[:3]}): convert_seed_for_submission.py fails on a missing one, "
                                           "and the leaderboard wants them all")
            results = [{"question_id": q["question_id"], "prediction": by_id[_id_key(q["question_id"])]["text"]}
                       for q in listed]
        return write_jsonl(Path(out_dir) / "seed_bench_upload.jsonl", results)

    @staticmethod
    def _annotations(path) -> Dict[str, Any]:
        data = load_json(path, "SEED-Bench.json ({'questions': [...], 'question_type': {...}})")
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise ValueError(f"{path}: expected SEED-Bench.json ({{'questions': [...], 'question_type': {{...}}}})")
        return data
