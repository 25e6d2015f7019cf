"""POPE: coco_pope_<split>.json label files, LLaVA's question file, hand-written answers, eval_pope.py's numbers."""
import json
import random

import pytest

import _official_reference as official
from lm_mini.eval.benchmarks.scoring import score_answers

SUFFIX = "\nAnswer the question using a single word or phrase."
# split, question, image, label, model answer, what eval_pope.py reads (its rule: first sentence, commas dropped,
# split on " ", "no" iff a word is exactly "No", "no" or "not")
CASES = [
    ("adversarial", "Is there a dog in the image?", "COCO_1.jpg", "yes", "Yes, there is a dog.", "yes"),
    ("adversarial", "Is there a cat in the image?", "COCO_1.jpg", "no", "NO", "yes"),  # "NO" is no word it knows
    ("adversarial", "Is there a car in the image?", "COCO_2.jpg", "no", "No!", "yes"),  # nor is "No!"
    ("adversarial", "Is there a bus in the image?", "COCO_2.jpg", "no", "no", "no"),
    ("random", "Is there a dog in the image?", "COCO_3.jpg", "yes", "Not sure.", "yes"),  # "Not" != "not"
    ("random", "Is there a cup in the image?", "COCO_3.jpg", "yes", "No, there is not.", "no"),
    ("random", "Is there a cat in the image?", "COCO_4.jpg", "no", "There is no cat.", "no"),
    ("random", "Is there a bed in the image?", "COCO_4.jpg", "no", "Yes", "yes"),
]


def _files(tmp_path):
    labels = tmp_path / "coco"
    labels.mkdir()
    for split in ("adversarial", "random"):
        rows = [{"question_id": i + 1, "image": img, "text": q, "label": label}
                for i, (s, q, img, label, _, _) in enumerate(c for c in CASES if c[0] == split)]
        (labels / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = [{"question_id": i, "image": img, "text": q + SUFFIX, "category": split}
                 for i, (split, q, img, _, _, _) in enumerate(CASES)]
    questions.append({"question_id": 99, "image": "COCO_9.jpg", "text": "Is there a kite in the image?" + SUFFIX,
                      "category": "popular"})  # no coco_pope_popular.json: eval_pope.py does not score it
    qfile = tmp_path / "llava_pope_test.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": c[4] if i < len(CASES) else "yes"}
               for i, (q, c) in enumerate(zip(questions, CASES + [None]))]
    return labels, qfile, answers


def test_pope_scores_each_split_as_eval_pope(tmp_path):
    labels, qfile, answers = _files(tmp_path)
    result = score_answers("pope", answers, qfile, labels)
    # adversarial: TP 1, FP 2 ("NO", "No!"), TN 1 -> acc 1/2, precision 1/3, recall 1, F1 1/2, yes-ratio 3/4
    adversarial = {"accuracy": 50.0, "precision": 100 / 3, "recall": 100.0, "f1": 50.0, "yes_ratio": 75.0}
    # random: TP 1 ("Not sure."), FN 1, TN 1, FP 1 -> everything 1/2
    random_split = {m: 50.0 for m in adversarial}
    assert {k: v for k, v in result.scores.items() if k.startswith("adversarial/")} == pytest.approx(
        {f"adversarial/{m}": v for m, v in adversarial.items()})
    assert {k: v for k, v in result.scores.items() if k.startswith("random/")} == pytest.approx(
        {f"random/{m}": v for m, v in random_split.items()})
    # the plain keys average the splits (the paper's POPE: mean F1 of the splits)
    assert result.scores["f1"] == pytest.approx(50.0) and result.scores["precision"] == pytest.approx((100 / 3 + 50) / 2)
    assert result.excluded == [99] and result.n == 8
    # the copy of eval_pope.py on the same answers, label files in their order
    for split, expected in (("adversarial", adversarial), ("random", random_split)):
        rows = [c for c in CASES if c[0] == split]
        got = official.eval_pope([{"text": c[4]} for c in rows], [c[3] for c in rows])
        assert {m: 100 * v for m, v in got.items()} == pytest.approx(expected)


def test_pope_pairs_answers_with_labels_in_any_order(tmp_path):
    labels, qfile, answers = _files(tmp_path)
    shuffled = list(answers)
    random.Random(0).shuffle(shuffled)
    assert score_answers("pope", shuffled, qfile, labels).scores == score_answers("pope", answers, qfile, labels).scores


def test_pope_needs_the_question_file_and_pairs_by_position_where_texts_differ(tmp_path):
    labels, qfile, answers = _files(tmp_path)
    with pytest.raises(ValueError, match="question file"):
        score_answers("pope", answers, None, labels)
    # a question worded unlike its label line: the split is paired by position, as eval_pope.py pairs it
    (tmp_path / "reworded.jsonl").write_text(qfile.read_text().replace("Is there a bus", "Is there a boat"))
    reworded = [dict(a, prompt=a["prompt"].replace("Is there a bus", "Is there a boat")) for a in answers]
    assert score_answers("pope", reworded, tmp_path / "reworded.jsonl", labels).scores == \
        score_answers("pope", answers, qfile, labels).scores
    # ... and out of the label file's order, a pair would join another image's label: refused
    with pytest.raises(ValueError, match="not in the label file's order"):
        score_answers("pope", reworded[::-1], tmp_path / "reworded.jsonl", labels)


def test_pope_labels_on_the_questions(tmp_path):
    rows = [{"question_id": i, "image": "x.jpg", "text": f"Q{i}", "category": "random", "label": label}
            for i, label in enumerate(["yes", "no", "no"])]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [{"question_id": i, "prompt": f"Q{i}", "text": t} for i, t in enumerate(["yes", "No.", "NO"])]
    result = score_answers("pope", answers, qfile)
    assert result.scores["random/accuracy"] == pytest.approx(200 / 3)  # "NO" reads yes: a false positive
