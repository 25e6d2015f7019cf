"""The official answer rules the paper's scorers apply, in pure Python (no torch), quirks included.

Each function reproduces one official function on every input (its source file and commit in the
docstring); the benchmark scorers (:mod:`lm_mini.eval.benchmarks`) and the metrics that carry a
benchmark's name (:mod:`lm_mini.eval.metrics`) both use them. Sources:

- ``vqaEval.py``: GT-Vision-Lab/VQA@a013f0043c1e2cdc995922dfe257f7149aa9af06,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (the VQAv2 server's rules);
- ``m4c_evaluator.py``: ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786,
  ``llavamini/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, ``TextVQAAccuracyEvaluator``; the same
  file as haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd ``llava/eval/m4c_evaluator.py``);
- ``eval_pope.py`` / ``eval_science_qa.py``: ictnlp/LLaVA-Mini@47da1137, ``llavamini/eval/``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

LLAVA_MINI_COMMIT = "ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786"
VQA_COMMIT = "GT-Vision-Lab/VQA@a013f0043c1e2cdc995922dfe257f7149aa9af06"

# --------------------------------------------------------------------------- shared word tables
# vqaEval.py's ``contractions`` / ``manualMap`` / ``articles`` / ``punct`` (EvalAIAnswerProcessor copies them).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# ``(?!<=\d)`` is a typo for a lookbehind in the original (it is a lookahead for the text "<="): kept.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# Both originals call ``periodStrip.sub("", text, re.UNICODE)``: the third argument is ``count``, and
# ``re.UNICODE == 32``, so at most 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_VQAEVAL_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # m4c_evaluator.py


def _process_punctuation(text: str, comma_strip: "re.Pattern[str]") -> str:
    out = text
    digit_comma = comma_strip.search(text) is not None
    for p in PUNCTUATION:
        # A mark touching a space (or any mark, when the text has a digit comma) is dropped, else it becomes a space.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


# --------------------------------------------------------------------------- vqaEval.py
def vqaeval_normalize(text: str) -> str:
    """``VQAEval.processPunctuation`` then ``processDigitArticle`` (vqaEval.py): punctuation, lower case,
    number words to digits, articles dropped, contractions restored. ``"man's"`` keeps its apostrophe."""
    return _process_digit_article(_process_punctuation(text, _VQAEVAL_COMMA_STRIP))


def _vqaeval_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqaeval_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """One question's accuracy as ``VQAEval.evaluate`` computes it (vqaEval.py), in [0, 1].

    Newlines/tabs become spaces and both sides are stripped; then, *only when the annotators disagree*
    (``len(set(gtAnswers)) > 1``), both sides are normalised (:func:`vqaeval_normalize`) -- ten identical
    annotator answers are compared to the answer as written. The answer scores min(#matching other
    annotators / 3, 1) against each annotator left out in turn, averaged. The official loop removes
    "other" answers by dict inequality (``answer_id`` differs per annotator); this is leave-one-out by
    position. One annotator answer leaves no other one: 0."""
    if not gt_answers:
        raise ValueError("vqaeval_accuracy needs at least one annotator answer")
    gts = [_vqaeval_clean(a) for a in gt_answers]
    res = _vqaeval_clean(answer)
    if len(set(gts)) > 1:
        gts = [vqaeval_normalize(a) for a in gts]
        res = vqaeval_normalize(res)
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- m4c_evaluator.py
def evalai_answer(text: str) -> str:
    """``EvalAIAnswerProcessor()(text)`` (m4c_evaluator.py), as LLaVA's ``convert_vqav2_for_submission.py`` and
    ``convert_vizwiz_for_submission.py`` apply it to every answer: lower case, *every* comma and question
    mark removed, ``'s`` split off (``"man's"`` -> ``"man 's"``), then the vqaEval punctuation, digit and
    article rules."""
    item = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(item, _EVALAI_COMMA_STRIP))


def vqav2_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The VQAv2 score LLaVA reports: the model's text through :func:`evalai_answer` (the submission file),
    scored by the server's :func:`vqaeval_accuracy` against the annotators' answers."""
    return vqaeval_accuracy(evalai_answer(prediction), gt_answers)


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """``TextVQAAccuracyEvaluator`` for one entry (m4c_evaluator.py): every answer through :func:`evalai_answer`
    (always, agreeing annotators or not); the prediction's leave-one-out score min(#other matching / 3, 1)
    averaged over the annotators, 0 when no annotator gave it. The original asserts 10 answers."""
    if len(gt_answers) != 10:
        raise ValueError(f"TextVQA needs 10 annotator answers per question (TextVQAAccuracyEvaluator asserts it), "
                         f"got {len(gt_answers)}")
    answers = [evalai_answer(a) for a in gt_answers]
    pred = evalai_answer(prediction)
    if pred not in answers:
        return 0.0
    accs = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == pred) / 3) for i in range(len(answers))]
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- eval_pope.py
def pope_answer(text: str) -> str:
    """``eval_pope.py``'s reading of an answer: the text before the first ``.``, commas removed, split on
    single spaces; ``"no"`` if a word is exactly ``No``, ``no`` or ``not``, else ``"yes"``. So ``"NO"``,
    ``"No!"``, ``"Not sure."`` and ``"no\\nthere"`` read as yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def yes_no_scores(tp: int, fp: int, tn: int, fn: int) -> Dict[str, float]:
    """``eval_pope.py``'s accuracy, precision, recall, F1 and yes-ratio (fractions) from a confusion matrix;
    where it would divide by zero, 0 (NaN for an empty matrix)."""
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / total if total else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / total if total else float("nan"),
    }


# --------------------------------------------------------------------------- eval_science_qa.py
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(text: str, n_choices: int) -> Optional[str]:
    """``eval_science_qa.py``'s option letter of an answer, or None (``FAILED`` / not an option of this problem).

    Exactly one of A-E; or a letter then ``". "`` (``"B. red"``); or ``"The answer is X."`` (any character
    after X) found exactly once. ``"(B)"``, ``"b"``, ``"B)"``, ``"Answer: B"`` are not read."""
    if text in SCIENCEQA_OPTIONS:
        answer = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        answer = text[0]
    else:
        found = _SCIENCEQA_ANSWER_IS.findall(text)
        answer = found[0] if len(found) == 1 else "FAILED"
    # get_pred_idx: a letter past the problem's choices is -1 (wrong)
    return answer if answer in SCIENCEQA_OPTIONS[:n_choices] else None


def option_letters(n: int) -> List[str]:
    return [chr(ord("A") + i) for i in range(n)]
