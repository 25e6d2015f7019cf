"""POPE (object hallucination), scored as ``eval_pope.py`` (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786,
``llavamini/eval/eval_pope.py``; ``scripts/llavamini/eval_image/pope.sh`` asks with ``model_vqa_loader.py``)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lm_mini.eval.answer_processing import pope_answer, yes_no_scores
from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question, read_jsonl
from lm_mini.eval.benchmarks.common import Referenced, mean, pair_answers, percent, require

_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def read_pope_labels(annotations: PathLike) -> Dict[str, List[Dict[str, Any]]]:
    """POPE's label files by split: a folder of ``coco_pope_<split>.json`` (JSON lines ``question_id, image,
    text, label``), as ``eval_pope.py --annotation-dir`` reads it, or one such file."""
    path = Path(annotations)
    files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: expected POPE's label files coco_pope_<split>.json (a folder of them or one)")
    out = {}
    for f in files:
        if not (f.name.startswith("coco_pope_") and f.name.endswith(".json")):
            raise ValueError(f"{f}: a POPE label file is named coco_pope_<split>.json (eval_pope.py takes the split "
                             "from the name)")
        labels = read_jsonl(f, "label")
        for number, rec in enumerate(labels, 1):
            if rec.get("label") not in ("yes", "no") or "image" not in rec or "text" not in rec:
                raise ValueError(f"{f}:{number}: a POPE label line has image, text and label 'yes' or 'no'")
        out[f.name[len("coco_pope_"):-len(".json")]] = labels
    return out


def pair_with_labels(pairs, labels: Dict[str, List[Dict[str, Any]]]) -> Dict[int, Tuple[str, str]]:
    """``id(answer) -> (split, label)`` for the answers of the splits that have a label file.

    Each answer finds its label line by its question's image and text (the label's question starts LLaVA's).
    Where that does not single out one line for every answer of a split, the split is paired as ``eval_pope.py``
    does, by position (the k-th answer of the split, in file order, with the k-th label line), and every pair
    must show the same image -- else an error, rather than answers scored against another image's labels."""
    by_split: Dict[str, List[Tuple[Mapping[str, Any], Question]]] = defaultdict(list)
    for a, q in pairs:
        if q.category in labels:
            by_split[q.category].append((a, q))
    out: Dict[int, Tuple[str, str]] = {}
    for split, members in by_split.items():
        lines = labels[split]
        index: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for line in lines:
            index[line["image"]].append(line)
        by_content = {}
        for a, q in members:
            hits = [line for line in index.get(q.media, []) if q.text.startswith(line["text"])]
            if len(hits) != 1:
                break
            by_content[id(a)] = hits[0]
        if len(by_content) == len(members) and len({id(line) for line in by_content.values()}) == len(members):
            out.update({key: (split, line["label"]) for key, line in by_content.items()})
            continue
        if len(members) > len(lines):
            raise ValueError(f"pope: {len(members)} answers of split {split!r} but coco_pope_{split}.json has "
                             f"{len(lines)} lines")
        for k, ((a, q), line) in enumerate(zip(members, lines)):
            if line["image"] != q.media:
                raise ValueError(f"pope: answer {k + 1} of split {split!r} (question {q.question_id!r}, {q.media}) "
                                 f"pairs by position with line {k + 1} of coco_pope_{split}.json, which is about "
                                 f"{line['image']}: the answers are not in the label file's order")
            out[id(a)] = (split, line["label"])
    return out


@BENCHMARKS.register("pope")
class POPE(Benchmark):
    """POPE per split (``adversarial``, ``popular``, ``random``: the question file's ``category``), as
    ``eval_pope.py`` computes it: an answer is "no" when a word of its first sentence (commas dropped, split on
    single spaces) is ``No``, ``no`` or ``not`` (:func:`pope_answer`), else "yes"; accuracy, precision,
    recall, F1 with "yes" positive, and the yes-ratio, as ``<split>/<metric>`` in percent. The plain
    ``<metric>`` keys average the splits (the paper's POPE number is the mean F1 of the three splits).

    ``eval_pope.py`` pairs the answers of a split with the lines of ``coco_pope_<split>.json`` by position
    (:func:`pair_with_labels`: here by content where it can, so answers in any order score right, and
    never against a label of another image). Where ``eval_pope.py`` divides by zero, 0.

    ``--annotations``: the folder of ``coco_pope_<split>.json`` files (``--annotation-dir``); without it, a
    ``label`` field on the question records is used (LLaVA's ``llava_pope_test.jsonl`` has none: the runner asks
    for ``--annotations`` before generating). Needs the question file (the category of each answer). As
    ``eval_pope.py``, a split's scores are over the answers given: a question without an answer is not counted
    (noted)."""

    name = "pope"
    needs_questions = True
    headline = "f1"
    missing_answers = "not_counted"
    missing_rule = "eval_pope.py scores the answers it is given (zipped with the first lines of the label file)"

    def check_scorable(self, questions, annotations) -> None:
        if annotations is None and not any(q.record.get("label") in ("yes", "no") for q in questions):
            raise ValueError("pope: the question file has no 'label' fields (LLaVA's llava_pope_test.jsonl has none): "
                             "give --annotations, the folder of coco_pope_<split>.json label files (eval_pope.py's "
                             "--annotation-dir)")

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        questions = require(questions, self, "the question file (--questions: each answer's category is its split)")
        self.check_scorable(questions, annotations)
        pairs, unanswered = pair_answers(self, answers, questions)
        if annotations is not None:
            labels = read_pope_labels(annotations)
            source = str(annotations)
            assigned = pair_with_labels(pairs, labels)

            def reference(a, q: Question) -> Optional[Tuple[str, str]]:
                return assigned.get(id(a))  # None: a split without a label file (eval_pope.py does not score it)
        else:
            source = "the question records' 'label' field (no --annotations)"

            def reference(a, q: Question) -> Optional[Tuple[str, str]]:
                label = q.record.get("label")
                return (q.category or "all", label) if label in ("yes", "no") else None

        ref = Referenced(self, pairs, reference, source)
        counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        for a, _, (split, label) in ref.scored:
            pred_yes, gold_yes = pope_answer(a["text"]) == "yes", label == "yes"
            key = ("t" if pred_yes == gold_yes else "f") + ("p" if pred_yes else "n")
            counts[split][key] += 1
        per_split = {split: yes_no_scores(**c) for split, c in sorted(counts.items())}
        scores = {f"{split}/{m}": percent(v[m]) for split, v in per_split.items() for m in _METRICS}
        scores.update({m: percent(mean([v[m] for v in per_split.values()])) for m in _METRICS})
        return ref.result(self, scores, unanswered)
