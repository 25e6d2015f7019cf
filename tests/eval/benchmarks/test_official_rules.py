"""Our answer rules against copies of the official functions (``_official_reference.py``) on varied inputs,
and against the official ``m4c_evaluator.py`` itself where a mirror of LLaVA-Mini is on this machine."""
import importlib.util
import random
import subprocess
from pathlib import Path

import pytest

import _official_reference as official
from lm_mini.eval.answer_processing import (
    evalai_answer,
    pope_answer,
    scienceqa_choice,
    textvqa_accuracy,
    vqaeval_accuracy,
    vqaeval_normalize,
)
from lm_mini.eval.benchmarks.mmbench import can_infer
from lm_mini.eval.benchmarks.mme import mme_answer
from lm_mini.eval.benchmarks.video_mc import check_ans, egoschema_choice

# Pieces of answers that exercise every rule: case, articles, number words, contractions, possessives, commas
# (plain and between digits), periods (final, decimal, many), each punctuation mark touching a space or not,
# newlines and tabs, parentheses and option letters.
PIECES = ["Two", "two", "2", "the", "A", "an", "man's", "mans", "dont", "Don't", "yes", "Yes", "NO", "No!", "no",
          "not", "Not", "3,000", "3000", "1.5", "red,", "red", ",", "white", "dog.", "...", "(B)", "B", "b", "B)",
          "B.", "C", "E", "The answer is B.", "The answer is B", "Answer: B", "left-right", "a/b", '"quoted"', "x?",
          "ten", "none", "it's", "isnt", "\n", "\t", "  ", "ok;", "[1]", "@home", "`x`", "=", "+", "_", "<3", ">",
          "!", "yes.", "NO.", "no,", "Not sure.", "There is no dog", "I", "D:", "A red car", "y'all", "oclock"]


def _texts(n, seed, max_pieces=4):
    rng = random.Random(seed)
    return [" ".join(rng.choice(PIECES) for _ in range(rng.randint(1, max_pieces))) for _ in range(n)]


def test_evalai_processor_equals_m4c_evaluator_on_varied_answers():
    processor = official.EvalAIAnswerProcessor()
    for text in _texts(3000, seed=0) + PIECES:
        assert evalai_answer(text) == processor(text), text


def test_vqaeval_normalisation_equals_vqaeval_py():
    vqa_eval = official.VQAEval()
    for text in _texts(3000, seed=1) + PIECES + ["a." * 40 + "b"]:  # 40 periods: the original strips only 32
        assert vqaeval_normalize(text) == vqa_eval.processDigitArticle(vqa_eval.processPunctuation(text)), text


def test_vqa_accuracy_equals_vqaeval_py_on_varied_annotations():
    rng = random.Random(2)
    vqa_eval = official.VQAEval()
    for _ in range(1500):
        pool = _texts(3, seed=rng.random(), max_pieces=2)
        k = rng.choice([1, 2, 3, 10])  # 10 identical answers (not normalised), or disagreeing ones
        gts = [rng.choice(pool[:k] if k < 10 else pool[:1]) for _ in range(10)]
        annotations = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(gts)]
        pred = evalai_answer(rng.choice(pool + _texts(1, seed=rng.random())))  # LLaVA submits processed answers
        assert vqaeval_accuracy(pred, gts) == pytest.approx(vqa_eval.evaluate_one(annotations, pred)), (pred, gts)


def test_textvqa_accuracy_equals_m4c_evaluator():
    rng = random.Random(3)
    evaluator = official.TextVQAAccuracyEvaluator()
    for _ in range(1000):
        pool = _texts(3, seed=rng.random(), max_pieces=2)
        gts = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + _texts(1, seed=rng.random()))
        expected = evaluator.eval_pred_list([{"pred_answer": pred, "gt_answers": gts}])
        assert textvqa_accuracy(pred, gts) == pytest.approx(expected), (pred, gts)


def test_pope_reading_equals_eval_pope():
    texts = _texts(2000, seed=4) + PIECES
    labels = ["yes", "no"] * (len(texts) // 2) + ["yes"] * (len(texts) % 2)
    ours = [pope_answer(t) for t in texts]
    tp = sum(p == "yes" and l == "yes" for p, l in zip(ours, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(ours, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(ours, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(ours, labels))
    expected = official.eval_pope([{"text": t} for t in texts], labels)
    assert expected["accuracy"] == pytest.approx((tp + tn) / len(texts))
    assert expected["precision"] == pytest.approx(tp / (tp + fp))
    assert expected["yes_ratio"] == pytest.approx((tp + fp) / len(texts))
    for t in texts:  # one answer at a time (beside a "yes" and a "no", so eval_pope never divides by zero)
        yes_ratio = official.eval_pope([{"text": t}, {"text": "yes"}, {"text": "no"}], ["yes", "yes", "no"])["yes_ratio"]
        assert (pope_answer(t) == "yes") == (yes_ratio == pytest.approx(2 / 3)), t


def test_scienceqa_choice_equals_eval_science_qa():
    for text in _texts(3000, seed=5, max_pieces=3) + PIECES:
        for n in (2, 3, 5):
            expected = official.sqa_pred_idx(text, n)
            ours = scienceqa_choice(text, n)
            assert (ours is None and expected == -1) or "ABCDE".index(ours) == expected, (text, n)


def test_mme_answer_equals_calculation_py():
    for text in _texts(2000, seed=6) + PIECES + ["Yes", "No", "noo", "ye", "yes\n"]:
        # calculation.py reads "<answer>\n" back from its text file and lower-cases it
        assert mme_answer(text) == official.mme_parse_pred_ans((text + "\n").lower()), text


def test_video_choice_rules_equal_the_mc_scripts():
    for text in _texts(2000, seed=7) + PIECES + [")", "(A)", "A)", "x)y", "(B) dog", ""]:
        for gt in ("(A) a cat", "(B) dog", "(C) (x)"):
            assert check_ans(text, gt) == official.check_ans(text, gt), (text, gt)
        assert egoschema_choice(text) == official.egoschema_first_char_as_answer(text), text


def test_mmbench_can_infer_equals_vlmevalkit():
    choices = {"A": "a red car", "B": "blue", "C": "two dogs", "D": "none"}
    for text in _texts(3000, seed=8) + PIECES + ["The correct answer is **C**", "Cannot determine the answer", "Z"]:
        assert can_infer(text, dict(choices)) == official.can_infer(text, dict(choices)), text


MIRROR = Path("/work/.mirror/ictnlp+LLaVA-Mini/repo")


@pytest.mark.skipif(not MIRROR.exists(), reason="no mirror of ictnlp/LLaVA-Mini on this machine")
def test_against_the_mirrored_m4c_evaluator(tmp_path):
    source = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:llavamini/eval/m4c_evaluator.py"],
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "m4c_evaluator.py").write_text(source)
    spec = importlib.util.spec_from_file_location("m4c_evaluator", tmp_path / "m4c_evaluator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    processor, evaluator = module.EvalAIAnswerProcessor(), module.TextVQAAccuracyEvaluator()
    for text in _texts(1000, seed=9) + PIECES:
        assert evalai_answer(text) == processor(text), text
    rng = random.Random(10)
    for _ in range(300):
        pool = _texts(3, seed=rng.random(), max_pieces=2)
        gts = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool)
        assert textvqa_accuracy(pred, gts) == pytest.approx(
            evaluator.eval_pred_list([{"pred_answer": pred, "gt_answers": gts}]))
