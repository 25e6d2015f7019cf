"""Short-answer VQA benchmarks: VQAv2, GQA, VizWiz, TextVQA.

All four are asked with ``model_vqa_loader.py`` (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786,
``llavamini/eval/model_vqa_loader.py``): the question file's ``text`` as the prompt (LLaVA's files already
end in "Answer the question using a single word or phrase."), greedy, 128 new tokens. The answer rules are
in :mod:`lm_mini.eval.answer_processing`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lm_mini.eval.answer_processing import evalai_answer, textvqa_accuracy, vqaeval_accuracy
from lm_mini.eval.benchmarks.base import (BENCHMARKS, Benchmark, BenchmarkResult, IncompleteAnswers, PathLike,
                                          SubmissionNotWritten)
from lm_mini.eval.benchmarks.common import Referenced, load_json, mean, pair_answers, percent, require, write_json


def _answer_strings(answers: Any, where: str) -> Optional[List[str]]:
    """The annotators' answers of an official annotation (``[{"answer": ...}, ...]``); None when there are none."""
    if not answers:
        return None
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a list of {{'answer': str, ...}} (the official annotation format)")
    return [a["answer"] for a in answers]


@BENCHMARKS.register("vqav2")
class VQAv2(Benchmark):
    """VQAv2. Local score on a split with annotations (val): ``convert_vqav2_for_submission.py``'s answer
    processing (``EvalAIAnswerProcessor``, m4c_evaluator.py) then ``vqaEval.py``'s accuracy
    (GT-Vision-Lab/VQA@a013f0043c1e2cdc995922dfe257f7149aa9af06), overall and per answer type.

    ``--annotations``: the official annotations JSON (``v2_mscoco_val2014_annotations.json``:
    ``{"annotations": [{"question_id", "answer_type", "answers": [{"answer", ...} x10], ...}]}``); answers are
    matched by ``question_id``. The questions scored are the annotated questions of the question file; one of
    them without an answer is scored as the empty answer, which ``convert_vqav2_for_submission.py`` writes for it
    (so it counts wrong). Without the question file the set is the annotation file's, as ``vqaEval.py`` takes it:
    its ``loadRes`` refuses results that do not answer every annotated question, and so does this scorer.

    Always writes the submission as ``convert_vqav2_for_submission.py`` (ictnlp/LLaVA-Mini@47da1137,
    ``scripts/``) does: ``[{"question_id", "answer"}]`` for every question of LLaVA's *test2015* question file
    (``llava_vqav2_mscoco_test2015.jsonl``: the VQA server wants an answer for every test2015 question, also in
    the test-dev phase), ``""`` where there is no answer. The test2015 file is found beside a test-dev question
    file (LLaVA's ``playground/data/eval/vqav2`` layout), or given as ``--submission-questions`` (suite key
    ``submission_questions``); else the submission lists the question file's questions and says so."""

    name = "vqav2"
    needs_annotations = True
    missing_answers = "wrong"
    missing_rule = ("convert_vqav2_for_submission.py submits the empty answer for it, which vqaEval.py and the server "
                    "score")

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        data = load_json(require(annotations, self, "--annotations (the official VQA annotations JSON)"),
                         "the official VQA annotations JSON ({'annotations': [...]})")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{annotations}: expected the official VQA annotations JSON ({{'annotations': [...]}})")
        by_id = {ann["question_id"]: ann for ann in data["annotations"]}
        pairs, unanswered = pair_answers(self, answers, questions)

        def reference(a, q):
            ann = by_id.get(a["question_id"])
            return None if ann is None else _answer_strings(ann.get("answers"), f"{annotations}: question {a['question_id']!r}")

        ref = Referenced(self, pairs, reference, str(annotations))
        if questions is None:  # vqaEval.py alone: the annotation file's questions, every one answered (loadRes)
            answered = {a["question_id"] for a in answers}
            missing = [qid for qid in by_id if qid not in answered]
            if missing:
                raise IncompleteAnswers(
                    f"vqav2: {len(missing)} of the {len(by_id)} questions of {annotations} have no answer (e.g. "
                    f"{missing[:3]}); vqaEval.py refuses results that do not answer every annotated question. Give "
                    "--questions (the question file of these answers): its annotated questions are scored, a missing "
                    "answer as the empty answer convert_vqav2_for_submission.py submits")
        else:
            missing = [qid for qid in unanswered if qid in by_id]
        per_type: Dict[str, List[float]] = defaultdict(list)
        accs = []
        scored = [(a["question_id"], a["text"], gts) for a, _, gts in ref.scored]
        scored += [(qid, "", _answer_strings(by_id[qid].get("answers"), f"{annotations}: question {qid!r}") or [])
                   for qid in missing]
        for qid, text, gts in scored:
            acc = vqaeval_accuracy(evalai_answer(text), gts) if gts else 0.0
            accs.append(acc)
            per_type[str(by_id[qid].get("answer_type", "unknown")).replace("/", "_")].append(acc)
        scores = {"accuracy": percent(mean(accs))}
        scores.update({f"{t}/accuracy": percent(mean(v)) for t, v in sorted(per_type.items())})
        return ref.result(self, scores, missing, missing_scored=len(missing), total=len(scored))

    def submission_questions_for(self, questions_file: PathLike) -> Tuple[Optional[Path], Optional[str]]:
        path = Path(questions_file)
        if "test-dev2015" not in path.name:
            return None, None
        full = path.with_name(path.name.replace("test-dev2015", "test2015"))
        if full.is_file():
            return full, f"the submission lists every question of {full} (as convert_vqav2_for_submission.py)"
        return None, (f"the submission lists only the questions of {path.name}; the VQA server wants an answer to every "
                      f"test2015 question: give --submission-questions {full.name} (LLaVA's file, beside it in its layout)")

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        results = {a["question_id"]: a["text"] for a in answers}
        ids = [q.question_id for q in questions] if questions is not None else list(results)
        listed = set(ids)
        stray = [qid for qid in results if qid not in listed]
        if stray:  # the converter would drop them without a word
            raise SubmissionNotWritten(f"{len(stray)} answers are to questions the submission's question list does not "
                                       f"have (e.g. {stray[:3]}); give the test2015 question file these answers belong to")
        rows = [{"question_id": qid, "answer": evalai_answer(results[qid]) if qid in results else ""} for qid in ids]
        return write_json(Path(out_dir) / "vqav2_submission.json", rows)


@BENCHMARKS.register("gqa")
class GQA(Benchmark):
    """GQA testdev-balanced. ``convert_gqa_for_eval.py`` (ictnlp/LLaVA-Mini@47da1137, ``scripts/``) turns each
    answer into ``text.rstrip('.').lower()``; the GQA ``eval.py`` that ``eval_image/gqa.sh`` runs
    (https://cs.stanford.edu/people/dorarad/gqa/evaluate.html; ``--tier testdev_balanced``) scores accuracy as
    exact equality with the question's ``answer`` over the questions with ``isBalanced``, and splits it into
    binary (structural type not "query") and open questions. Percentages.

    ``--annotations``: the GQA questions JSON (``testdev_balanced_questions.json``: ``{questionId: {"answer",
    "isBalanced", "types": {"structural", ...}, ...}}``). Every question of it needs an answer, as eval.py
    refuses predictions that lack one (an incomplete answers file is refused, naming the missing ones). Always
    writes ``testdev_balanced_predictions.json`` (``[{"questionId", "prediction"}]``) as the convert script does."""

    name = "gqa"
    needs_annotations = True
    missing_answers = "refuse"
    missing_rule = ("GQA's eval.py needs a prediction for every question of the questions JSON (it raises 'missing "
                    "predictions')")

    @staticmethod
    def prediction(text: str) -> str:
        return text.rstrip(".").lower()

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        gqa = load_json(require(annotations, self, "--annotations (GQA's testdev_balanced_questions.json)"),
                        "GQA's questions JSON ({questionId: {...}})")
        if not isinstance(gqa, dict):
            raise ValueError(f"{annotations}: expected GQA's questions JSON, an object keyed by questionId")
        pairs, unanswered = pair_answers(self, answers, questions)

        def reference(a, q):  # GQA ids are strings of digits; LLaVA's question file keeps them as strings
            question = gqa.get(str(a["question_id"]))
            return question if question is not None and question.get("answer") is not None else None

        ref = Referenced(self, pairs, reference, str(annotations))
        answered = {str(a["question_id"]) for a in answers}
        missing = [qid for qid in gqa if qid not in answered]  # eval.py reads predictions[qid] for every question
        scores: Dict[str, List[float]] = defaultdict(list)
        unbalanced = 0
        for a, _, question in ref.scored:
            if not question.get("isBalanced"):
                unbalanced += 1
                continue
            correct = float(self.prediction(a["text"]) == question["answer"])
            scores["accuracy"].append(correct)
            structural = question.get("types", {}).get("structural")
            scores["open/accuracy" if structural == "query" else "binary/accuracy"].append(correct)
        notes = [f"{unbalanced} answers to questions without isBalanced: not scored (GQA's accuracy is over the "
                 "balanced questions)"] if unbalanced else []
        result = ref.result(self, {k: percent(mean(v)) for k, v in sorted(scores.items())}, missing, notes,
                            total=len(gqa))
        result.n -= unbalanced
        return result

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        rows = [{"questionId": a["question_id"], "prediction": self.prediction(a["text"])} for a in answers]
        return write_json(Path(out_dir) / "testdev_balanced_predictions.json", rows)


@BENCHMARKS.register("vizwiz")
class VizWiz(Benchmark):
    """VizWiz-VQA. Writes the submission as ``convert_vizwiz_for_submission.py`` (ictnlp/LLaVA-Mini@47da1137,
    ``scripts/``): ``[{"image", "answer": EvalAIAnswerProcessor(text)}]`` per question of the question file
    (which gives the image names: the script's ``--annotation-file`` is LLaVA's ``llava_test.jsonl``).

    The paper's number comes from the VizWiz server (test-dev); there is no official local score. With
    ``--annotations`` (VizWiz's own ``val.json``: ``[{"image", "answers": [{"answer", ...} x10], "answer_type",
    ...}]``) this scores a *local* number, ``vqaeval_accuracy``: the submitted answer against the ten annotators by
    GT-Vision-Lab ``vqaEval.py``'s rule (annotators and answer normalised only where the annotators disagree;
    leave-one-out over distinct annotator answers), matched by image name. That is not the rule of VizWiz's own
    evaluation code (its ``VQAEval``, after Qing Li's VizWiz API: the answer always normalised, compared with the
    annotators' answers as written, leave-one-out by position), which gives other values, e.g. 60 instead of 100
    for "yes" against Yes x2, yes x2, no x6: compare this number only with ``vqaEval.py``-rule numbers. An
    incomplete answers file is refused, as the submission converter asserts every question is answered."""

    name = "vizwiz"
    needs_annotations = True
    needs_questions = True
    headline = "vqaeval_accuracy"
    missing_answers = "refuse"
    missing_rule = "convert_vizwiz_for_submission.py asserts that every question of the question file has an answer"

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        data = load_json(require(annotations, self, "--annotations (VizWiz's val.json, 10 answers per image)"),
                         "VizWiz's annotations ([{'image', 'answers', ...}])")
        if not isinstance(data, list):
            raise ValueError(f"{annotations}: expected VizWiz's annotations, a list of {{'image', 'answers', ...}}")
        by_image = {ann["image"]: ann for ann in data}
        pairs, unanswered = pair_answers(self, answers, require(questions, self, "the question file (--questions)"))

        def reference(a, q):
            ann = by_image.get(q.media)
            return None if ann is None else _answer_strings(ann.get("answers"), f"{annotations}: image {q.media!r}")

        ref = Referenced(self, pairs, reference, str(annotations))
        per_type: Dict[str, List[float]] = defaultdict(list)
        accs = []
        for a, q, gts in ref.scored:
            acc = vqaeval_accuracy(evalai_answer(a["text"]), gts)
            accs.append(acc)
            per_type[str(by_image[q.media].get("answer_type", "unknown")).replace("/", "_")].append(acc)
        scores = {"vqaeval_accuracy": percent(mean(accs))}
        scores.update({f"{t}/vqaeval_accuracy": percent(mean(v)) for t, v in sorted(per_type.items())})
        return ref.result(self, scores, unanswered, [
            "vqaeval_accuracy is a local number by GT-Vision-Lab vqaEval.py's rule, not VizWiz's evaluation code "
            "(which compares differently); the paper's VizWiz is the server's test-dev score of the submission"])

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        if questions is None:
            return None  # the submission names images, which only the question file gives
        results = {a["question_id"]: a["text"] for a in answers}
        missing = [q.question_id for q in questions if q.question_id not in results]
        if missing:
            raise SubmissionNotWritten(f"{len(missing)} of {len(questions)} questions have no answer (e.g. {missing[:3]}); "
                                       f"{self.missing_rule} (the server wants them all)")
        rows = [{"image": q.media, "answer": evalai_answer(results[q.question_id])} for q in questions]
        return write_json(Path(out_dir) / "vizwiz_submission.json", rows)


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str) -> str:
    """``prompt_processor`` of ``eval_textvqa.py`` (ictnlp/LLaVA-Mini@47da1137, ``llavamini/eval/``): the
    question inside an answers line's ``prompt``, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"TextVQA prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:  # the original: assert False
        raise ValueError(f"TextVQA prompt in none of the forms eval_textvqa.py reads (question + OCR tokens + "
                         f"instruction, or question + instruction): {prompt!r}")
    return question.lower()


@BENCHMARKS.register("textvqa")
class TextVQA(Benchmark):
    """TextVQA val, as ``eval_textvqa.py`` (ictnlp/LLaVA-Mini@47da1137, ``llavamini/eval/``) scores it: each answer
    finds its annotation by ``(question_id, prompt_processor(prompt))`` -- LLaVA's question_id is the *image*
    id, and the question text comes back from the answers line's ``prompt`` -- and is scored by
    ``TextVQAAccuracyEvaluator`` (m4c_evaluator.py): EvalAI-processed answer against the ten processed
    annotator answers, min(#others / 3, 1) averaged. Percent. The denominator is the answers file's lines, as
    the script's: a question of the question file without an answer is not counted (the result notes how many).

    ``--annotations``: ``TextVQA_0.5.1_val.json`` (``{"data": [{"image_id", "question", "answers", ...}]}``)."""

    name = "textvqa"
    needs_annotations = True
    missing_answers = "not_counted"
    missing_rule = "eval_textvqa.py scores the lines of the answers file only"

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        data = load_json(require(annotations, self, "--annotations (TextVQA_0.5.1_val.json)"),
                         "TextVQA's annotations ({'data': [...]})")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{annotations}: expected TextVQA's annotations JSON ({{'data': [...]}})")
        by_key = {(ann["image_id"], ann["question"].lower()): ann for ann in data["data"]}
        pairs, unanswered = pair_answers(self, answers, questions)

        def reference(a, q):
            prompt = a.get("prompt", q.text if q is not None else None)
            if prompt is None:
                raise ValueError(f"textvqa: answer to {a['question_id']!r} has no 'prompt' (the scorer finds the "
                                 "question by it)")
            ann = by_key.get((a["question_id"], textvqa_question(prompt)))
            return None if ann is None or not ann.get("answers") else list(ann["answers"])

        ref = Referenced(self, pairs, reference, str(annotations))
        accs = [textvqa_accuracy(a["text"], gts) for a, _, gts in ref.scored]
        return ref.result(self, {"accuracy": percent(mean(accs))}, unanswered)
