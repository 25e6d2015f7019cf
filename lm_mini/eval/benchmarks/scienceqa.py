"""ScienceQA (the paper's SQA-IMG), asked as ``model_vqa_science.py --single-pred-prompt`` and scored as
``eval_science_qa.py`` (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786, ``llavamini/eval/``;
``scripts/llavamini/eval_image/sqa.sh``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from lm_mini.eval.answer_processing import SCIENCEQA_OPTIONS, scienceqa_choice
from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question
from lm_mini.eval.benchmarks.common import Referenced, load_json, mean, pair_answers, percent, require

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def read_scienceqa_problems(annotations: PathLike, split: str = "test") -> Dict[str, Dict[str, Any]]:
    """The problems of ``split``, as ``eval_science_qa.py --base-dir`` reads them: ``problems.json`` and
    ``pid_splits.json`` in one folder (``annotations`` is that folder or its ``problems.json``)."""
    path = Path(annotations)
    base = path if path.is_dir() else path.parent
    problems = load_json(base / "problems.json" if path.is_dir() else path, "ScienceQA's problems.json")
    splits = load_json(base / "pid_splits.json", "ScienceQA's pid_splits.json (beside problems.json)")
    if split not in splits:
        raise ValueError(f"{base / 'pid_splits.json'}: no split {split!r} (has {', '.join(sorted(splits))})")
    missing = [pid for pid in splits[split] if pid not in problems]
    if missing:
        raise ValueError(f"{base}: problems.json lacks {len(missing)} problems of split {split!r} (first {missing[0]!r})")
    return {pid: problems[pid] for pid in splits[split]}


@BENCHMARKS.register("scienceqa")
class ScienceQA(Benchmark):
    """ScienceQA test. Questions: LLaVA's ``llava_test_CQM-A.json`` (a JSON list of ``{"id", "image"?,
    "conversations"}``); the prompt is the first turn without ``<image>``, stripped, then
    ``"\\nAnswer with the option's letter from the given choices directly."`` (``--single-pred-prompt``,
    as ``sqa.sh`` runs it); 1024 new tokens. The answers line's ``prompt`` starts with ``"<image>\\n"`` for
    questions with an image, which is how ``eval_science_qa.py`` tells IMG questions.

    Score (``--annotations``: the folder with ``problems.json`` and ``pid_splits.json``, split ``test``): the
    option letter as ``eval_science_qa.py`` reads it (:func:`scienceqa_choice`: ``"B"``, ``"B. ..."`` or one
    ``"The answer is B."``; ``"(B)"``/``"b"`` are wrong) against ``problems[pid]["answer"]``: ``accuracy`` and
    ``img/accuracy`` (its IMG-Accuracy, the paper's SQA-IMG), in percent. The denominators are the script's:
    every problem of the test split, whether or not the question file or the answers file has it; a problem
    without an answer counts wrong in ``accuracy`` (the script's ``'FAILED'``) and is left out of ``img/accuracy``
    (its ``'Unknown'`` prompt has no ``<image>``)."""

    name = "scienceqa"
    max_new_tokens = 1024
    needs_annotations = True
    headline = "img/accuracy"
    missing_answers = "wrong"
    missing_rule = ("eval_science_qa.py scores every problem of the test split ('FAILED' without a prediction; its "
                    "IMG-Accuracy leaves such a problem out)")

    def read_questions(self, path: PathLike) -> List[Question]:
        data = load_json(path, "LLaVA's ScienceQA question file (a JSON list of {'id', 'conversations', 'image'?})")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{'id', 'conversations', 'image'?}} (llava_test_CQM-A.json)")
        out = []
        for number, rec in enumerate(data, 1):
            turns = rec.get("conversations") if isinstance(rec, dict) else None
            if "id" not in rec or not turns or not isinstance(turns[0].get("value"), str):
                raise ValueError(f"{path}: question {number} has no 'id' or first conversation turn")
            text = turns[0]["value"].replace("<image>", "").strip()
            out.append(Question(rec["id"], text, rec.get("image"), False, None, rec))
        return out

    def prompt(self, question: Question) -> str:
        return question.text + "\n" + SINGLE_PRED_PROMPT

    def answer_prompt(self, question: Question) -> str:
        return ("<image>\n" if question.media else "") + question.text + "\n" + SINGLE_PRED_PROMPT

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        problems = read_scienceqa_problems(require(annotations, self, "--annotations (the folder of problems.json "
                                                                      "and pid_splits.json)"))
        pairs, _ = pair_answers(self, answers, questions)
        ref = Referenced(self, pairs, lambda a, q: problems.get(str(a["question_id"])), str(annotations))
        answered = {str(a["question_id"]) for a, _, _ in ref.scored}
        missing = [pid for pid in problems if pid not in answered]  # the script's 'FAILED': wrong, not IMG
        correct, img = [0.0] * len(missing), []
        for a, _, prob in ref.scored:
            hit = float(scienceqa_choice(a["text"], len(prob["choices"])) == SCIENCEQA_OPTIONS[prob["answer"]])
            correct.append(hit)
            if "<image>" in a.get("prompt", ""):  # eval_science_qa.py: is_multimodal
                img.append(hit)
        scores = {"accuracy": percent(mean(correct))}
        if img:
            scores["img/accuracy"] = percent(mean(img))
        return ref.result(self, scores, missing, missing_scored=len(missing), total=len(problems))
