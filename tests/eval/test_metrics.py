import pytest
import torch

from lm_mini.eval.metrics import (
    ExactMatch,
    LenientMultipleChoiceAccuracy,
    LenientPOPEMetrics,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAAccuracy,
    build_metric,
    extract_choice_lenient,
    normalize_vqa_answer,
    parse_yes_no_lenient,
    vqa_score,
)
from lm_mini.registry import METRICS


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words
        ("the dog.", "dog"),  # article and final period
        ("A Red-Car", "red car"),  # a hyphen between words becomes a space
        ("yes!", "yes"),
        ("dont", "don't"),  # contractions
        ("3,000", "3000"),  # a digit comma removes every punctuation mark
        ("it is 1.5", "it is 1.5"),  # a period before a digit stays
        ("  ten\n", "10"),
        ("left , right", "left right"),  # a mark touching a space is dropped
    ],
)
def test_vqa_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        # 1 of 10 annotators agrees: the 9 subsets without him score 1/3, his own subset 0.
        (1, 9 * (1 / 3) / 10),
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
        (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9
        (4, 1.0),
        # vqaEval.py normalises only when the annotators disagree: ten "two"s are compared to "2" as written
        (10, 0.0),
    ],
)
def test_vqa_score_partial_agreement(n_match, expected):
    answers = ["two"] * n_match + ["three"] * (10 - n_match)
    assert vqa_score("2", answers) == pytest.approx(expected)


def test_vqa_metric_accumulates_and_normalises():
    m = VQAAccuracy()
    # "the cat" -> EvalAIAnswerProcessor (convert_vqav2_for_submission) -> "cat", equal to the unanimous "cat"
    m.update(["Two.", "the cat"], [["2"] * 3 + ["3"] * 7, ["cat"] * 10])
    m.update(["no"], [["yes"] * 10])
    assert m.compute().item() == pytest.approx((0.9 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize(
    "prediction, annotators, expected",
    [
        # vqaEval.py: ten identical answers are not normalised -- "Man's" is not "man 's" (EvalAI split the 's)
        ("man's", ["man's"] * 10, 0.0),
        ("man's", ["man's"] * 9 + ["man"], 0.0),  # disagreeing: normalised, but "man's" keeps its apostrophe
        ("red, white", ["red white"] * 10, 1.0),  # EvalAI removes every comma from the prediction
        ("red, white", ["red, white"] * 10, 0.0),  # ... the unanimous "red, white" stays as written
        ("red, white", ["red, white"] * 9 + ["red"], 1.0),  # disagreeing: vqaEval drops ", " too
        ("3,000", ["3000"] * 4 + ["3"] * 6, 1.0),  # digit commas: all punctuation dropped
        ("Yes", ["Yes"] * 10, 0.0),  # EvalAI lower-cases the prediction; unanimous "Yes" stays capitalised
    ],
)
def test_vqa_score_follows_the_official_pipeline(prediction, annotators, expected):
    assert vqa_score(prediction, annotators) == pytest.approx(expected)


def test_exact_match_with_alternatives():
    m = ExactMatch()
    m.update(["Red.", "blue", "A circle"], ["red", ["green", "teal"], ["circle", "round"]])
    assert m.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        m.update(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. a red circle", "B"),
        ("B) a red circle", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("I choose option C because", "C"),
        ("E", None),  # only four options
        ("no idea", None),
        ("b", "B"), ("(b)", "B"), ("b.", "B"), ("c) blue", "C"),  # lower case, given plainly
        ("B is correct", "B"),
        ("I think it is D", "D"),  # "I" is a word here, not option I
        ("A red circle", None),  # "A" is an article: no letter given (option texts decide, below)
        ("the answer is a red one", None),
    ],
)
def test_lenient_multiple_choice_extraction(text, letter):
    assert extract_choice_lenient(text, 4) == letter


def test_lenient_multiple_choice_by_option_text():
    assert extract_choice_lenient("it is a square", ["circle", "square", "triangle"]) == "B"
    assert extract_choice_lenient("A red circle", ["a blue square", "a red circle"]) == "B"  # not option A by its article
    m = LenientMultipleChoiceAccuracy()
    m.update(["(A)", "The answer is C", "hmm"], ["A", "B", "C"], [3, 3, 3])
    assert m.compute().item() == pytest.approx(1 / 3)
    assert m.unparsed.item() == 1
    golds = LenientMultipleChoiceAccuracy()  # gold answers written "(B)" / "B." / "c" are their letters
    golds.update(["B", "B", "C"], ["(B)", "B.", "c"], [3, 3, 3])
    assert golds.compute().item() == 1.0


def test_multiple_choice_reads_letters_as_eval_science_qa_does():
    # eval_science_qa.py: a bare letter, "X. ...", or "The answer is X." once; "(B)", "b", "B)", "Answer: B" fail
    m = MultipleChoiceAccuracy()
    preds = ["B", "B. blue", "The answer is B.", "(B)", "b", "B)", "Answer: B", "The answer is B", "D"]
    m.update(preds, ["B"] * len(preds), [3] * len(preds))
    assert m.compute().item() == pytest.approx(3 / len(preds))
    assert m.unparsed.item() == 6  # "D" is past the 3 choices: get_pred_idx gives -1


def test_pope_reads_answers_as_eval_pope_does():
    # eval_pope.py: first sentence, commas dropped, split on " "; no if a word is "No", "no" or "not"
    m = POPEMetrics()
    m.update(["NO", "No!", "Not sure.", "no", "No, it is not.", "There is no dog"], ["no"] * 6)
    out = m.compute()
    assert out["accuracy"].item() == pytest.approx(3 / 6)  # "NO", "No!", "Not sure." read as yes
    lenient = LenientPOPEMetrics()
    lenient.update(["NO", "No!", "Not sure.", "no", "No, it is not.", "There is no dog"], ["no"] * 6)
    assert lenient.compute()["accuracy"].item() == 1.0
    assert parse_yes_no_lenient("Not at all. Yes.") == "no"


def test_pope_on_known_confusion_matrix():
    # 4 TP, 1 FN, 2 FP, 3 TN
    preds = ["Yes, there is."] * 4 + ["No."] + ["yes"] * 2 + ["There is not a dog.", "no", "No, there isn't."]
    gold = ["yes"] * 5 + ["no"] * 5
    m = POPEMetrics()
    m.update(preds, gold)
    out = m.compute()
    assert out["accuracy"].item() == pytest.approx(7 / 10)
    assert out["precision"].item() == pytest.approx(4 / 6)
    assert out["recall"].item() == pytest.approx(4 / 5)
    assert out["f1"].item() == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert out["yes_ratio"].item() == pytest.approx(6 / 10)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        m.update(["yes"], ["maybe"])


def test_metric_states_merge_like_ranks():
    a, b = VQAAccuracy(), VQAAccuracy()
    a.update(["2"], [["2"] * 10])
    b.update(["3"], [["2"] * 10])
    a.merge_state(b)  # what a cross-rank sync does with dist_reduce_fx="sum"
    assert a.compute().item() == pytest.approx(0.5)
    assert torch.isnan(VQAAccuracy().compute())


def test_unknown_metric_lists_known():
    with pytest.raises(KeyError, match="exact_match"):
        build_metric("bleu")


def test_metrics_registry_names_each_metric_and_what_it_scores():
    assert sorted(METRICS) == ["exact_match", "multiple_choice", "multiple_choice_lenient", "pope", "pope_lenient",
                               "vqa_accuracy"]
    kinds = {name: build_metric(name).target_kind for name in METRICS}
    assert kinds == {"exact_match": "answers", "vqa_accuracy": "answers", "multiple_choice": "choice",
                     "multiple_choice_lenient": "choice", "pope": "yes_no", "pope_lenient": "yes_no"}
    assert isinstance(build_metric("lm_mini.eval.metrics:ExactMatch"), ExactMatch)  # a class by its import path


def test_a_single_reference_answer_counts_as_unanimous():
    assert vqa_score("Two", ["2"]) == 1.0 and vqa_score("3", ["2"]) == 0.0
    m = VQAAccuracy()
    m.update(["red", "blue"], ["red", ["red"]])
    assert m.compute().item() == pytest.approx(0.5)
