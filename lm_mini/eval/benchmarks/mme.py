"""MME, scored as LLaVA's ``convert_answer_to_mme.py`` + MME's ``eval_tool/calculation.py`` compute it.

Sources: ``scripts/llavamini/eval_image/mme.sh`` (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786)
asks ``llava_mme.jsonl`` with ``model_vqa_loader.py``, then runs ``convert_answer_to_mme.py`` (shipped in
LLaVA's ``playground/data/eval/MME`` bundle, haotian-liu/LLaVA ``docs/Evaluation.md``) and MME's
``calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-Models@dd2950902889cd614d4edf606827240166d29381, the
Evaluation branch, ``tools/eval_tool.zip``: ``eval_tool/calculation.py``).
"""
from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Tuple

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike
from lm_mini.eval.benchmarks.common import Referenced, pair_answers, require, unanswered_notes

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def read_mme_ground_truth(root: PathLike) -> Dict[Tuple[str, str, str], str]:
    """``get_gt`` of ``convert_answer_to_mme.py``: ``(category, file.txt, question) -> "Yes"/"No"`` from
    ``MME_Benchmark_release_version`` (``<category>/questions_answers_YN/*.txt`` where the category has an
    ``images`` folder, else ``<category>/*.txt``; lines ``question<TAB>answer``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected the MME_Benchmark_release_version folder")
    gt = {}
    for category in sorted(os.listdir(root)):
        category_dir = root / category
        if not category_dir.is_dir():
            continue
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").exists() else category_dir
        if not qa_dir.is_dir():
            raise FileNotFoundError(f"{qa_dir}: MME category {category!r} has images/ but no questions_answers_YN/")
        for file in sorted(os.listdir(qa_dir)):
            if not file.endswith(".txt"):
                continue
            with (qa_dir / file).open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{qa_dir / file}:{number}: expected 'question<TAB>answer'")
                    gt[(category, file, parts[0])] = parts[1]
    if not gt:
        raise ValueError(f"{root}: no MME question files found (<category>/[questions_answers_YN/]*.txt)")
    return gt


def mme_key(gt: Dict[Tuple[str, str, str], str], question_id: str, prompt: str) -> Tuple[str, str, str]:
    """``convert_answer_to_mme.py``'s ground-truth key ``(category, file.txt, question)`` of one answers line."""
    category = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    if _SHORT_ANSWER in prompt:
        prompt = prompt.replace(_SHORT_ANSWER, "").strip()
    if _YES_NO not in prompt:
        prompt = prompt + " " + _YES_NO
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" " + _YES_NO, "  " + _YES_NO)
    return (category, file, prompt)


def mme_lookup(gt: Dict[Tuple[str, str, str], str], question_id: str, prompt: str):
    """``convert_answer_to_mme.py``'s ground-truth lookup of one answers line: ``(category, "Yes"/"No")``, None
    where it has none."""
    key = mme_key(gt, question_id, prompt)
    answer = gt.get(key)
    return None if answer is None else (key[0], answer)


def mme_answer(text: str) -> str:
    """``parse_pred_ans`` of ``calculation.py`` on the lower-cased answer: "yes"/"no" as such, else "yes" or "no"
    if its first four characters contain it (yes first), else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


@BENCHMARKS.register("mme")
class MME(Benchmark):
    """MME perception and cognition. Per subtask, as ``calculation.py``: ``accuracy`` over the questions and
    ``accuracy_plus`` over the images with both questions right (percent), ``score`` = their sum; then
    ``perception`` and ``cognition`` (sums over their subtasks, MME's points, the paper's MME is the
    perception score) and ``total``. An answer finds its ground truth as ``convert_answer_to_mme.py`` does:
    category and question file from the ``question_id`` (``<category>/.../<image>``), the question from the
    answers line's ``prompt`` (without "Answer the question using a single word or phrase.", with "Please
    answer yes or no.").

    ``calculation.py`` pairs consecutive lines of a category file; here the two answers of an image are found
    by their ``question_id`` (the same pairs on LLaVA's files, in any order). An incomplete answers file is
    refused (the official pipeline fails on one: a missing answer breaks the pairs, a subtask without answers
    has no result file): the set is the question file's questions, or without it every question of the 14
    subtasks in ``--annotations``. With a question file of part of MME, its subtasks are scored; ``perception``
    / ``cognition`` only when all their subtasks are (and ``total`` when both are), an image asked once counts in
    ``accuracy`` only (noted).

    The official pipeline cannot read an answer holding a newline or a tab (``convert_answer_to_mme.py`` joins
    the fields with tabs into a text file read back line by line); such answers are scored here as
    ``calculation.py`` would read their text, a case no official number exists for.

    ``--annotations``: the ``MME_Benchmark_release_version`` folder."""

    name = "mme"
    needs_annotations = True
    headline = "perception"
    missing_answers = "refuse"
    missing_rule = ("MME's pipeline needs both answers of every image (calculation.py pairs a subtask's lines two by "
                    "two and reads every subtask's file)")

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        gt = read_mme_ground_truth(require(annotations, self, "--annotations (the MME_Benchmark_release_version folder)"))
        pairs, unanswered = pair_answers(self, answers, questions)

        def reference(a, q):
            found = mme_lookup(gt, str(a["question_id"]), a.get("prompt", q.text if q is not None else ""))
            if found is not None and found[0] not in PERCEPTION + COGNITION:
                return None  # calculation.py scores its 14 subtasks only
            return found

        ref = Referenced(self, pairs, reference, str(annotations))
        if questions is None:  # the set: every question of the 14 subtasks
            found = {mme_key(gt, str(a["question_id"]), a.get("prompt", "")) for a, _, _ in ref.scored}
            unanswered = [f"{category}/{file}: {question}" for (category, file, question) in gt
                          if category in PERCEPTION + COGNITION and (category, file, question) not in found]
        unanswered_notes(self, unanswered, len(unanswered) + len(ref.scored))  # refuses an incomplete file
        images: Dict[str, "OrderedDict[Any, List[bool]]"] = defaultdict(OrderedDict)
        for a, _, (category, gold) in ref.scored:
            if gold.lower() not in ("yes", "no"):
                raise ValueError(f"{annotations}: ground truth of {a['question_id']!r} is {gold!r}; calculation.py "
                                 "takes yes or no")
            images[category].setdefault(a["question_id"], []).append(mme_answer(a["text"]) == gold.lower())
        scores: Dict[str, float] = {}
        notes = []
        for part, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
            total = 0.0
            for task in tasks:
                if task not in images:
                    continue
                per_image = list(images[task].values())
                if any(len(hits) > 2 for hits in per_image):
                    raise ValueError(f"mme: an image of {task!r} has more than two answers (MME asks two questions per image)")
                both = [all(hits) for hits in per_image if len(hits) == 2]
                flat = [h for hits in per_image for h in hits]
                if len(both) < len(per_image):
                    notes.append(f"{task}: {len(per_image) - len(both)} images with one answer: in accuracy, not in "
                                 "accuracy_plus")
                acc = 100.0 * sum(flat) / len(flat)
                acc_plus = 100.0 * sum(both) / len(both) if both else 0.0
                scores.update({f"{task}/accuracy": acc, f"{task}/accuracy_plus": acc_plus, f"{task}/score": acc + acc_plus})
                total += acc + acc_plus
            missing = [t for t in tasks if t not in images]
            if missing:
                notes.append(f"{part}: no answers for {', '.join(missing)}: no {part} score (MME's is the sum over all "
                             f"its subtasks)")
            else:
                scores[part] = total
        if "perception" in scores and "cognition" in scores:
            scores["total"] = scores["perception"] + scores["cognition"]
        return ref.result(self, scores, unanswered, notes)
