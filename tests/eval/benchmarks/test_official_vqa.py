"""VQAv2, GQA, VizWiz, TextVQA: files in their official formats, hand-written answers, scores derived by hand."""
import json

import pytest

from lm_mini.eval.benchmarks import BENCHMARKS
from lm_mini.eval.benchmarks.scoring import score_answers
from lm_mini.eval.benchmarks.vqa import textvqa_question

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_line(qid, prompt, text):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": f"a{qid}", "model_id": "m", "metadata": {}}


def vqa_annotation(qid, answers, answer_type="other"):
    return {"question_id": qid, "image_id": 1, "question_type": "what", "answer_type": answer_type,
            "multiple_choice_answer": answers[0] if answers else "",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def test_vqav2_val_score_and_test_dev_submission(tmp_path):
    cases = [  # question_id, annotators, answer type, model's answer, the official score (rule)
        (1, ["man's"] * 10, "other", "man's", 0.0),  # EvalAI splits the 's; ten agreeing annotators are not normalised
        (2, ["2"] * 3 + ["3"] * 7, "number", "Two.", 0.9),  # 3 agree: (3 x 2/3 + 7 x 1) / 10
        (3, ["red, white"] * 10, "other", "red, white", 0.0),  # EvalAI drops the comma; the unanimous answer keeps it
        (4, ["red, white"] * 9 + ["red"], "other", "Red, white", 1.0),  # disagreeing: vqaEval drops ", " as well
        (5, ["yes"] * 10, "yes/no", "Yes", 1.0),  # EvalAI lower-cases
        (6, ["3,000"] * 4 + ["3000"] * 6, "number", "3,000", 1.0),  # a digit comma: every mark dropped on both sides
    ]
    questions = [{"question_id": q, "image": f"{q}.jpg", "text": f"Q{q}?" + SUFFIX, "category": "default"}
                 for q in range(1, 10)]
    annotations = [vqa_annotation(q, gts, t) for q, gts, t, _, _ in cases] + [vqa_annotation(8, [])]  # 7: none at all
    answers = [answer_line(q, f"Q{q}?" + SUFFIX, text) for q, _, _, text, _ in cases]
    answers += [answer_line(7, "Q7?" + SUFFIX, "dog"), answer_line(8, "Q8?" + SUFFIX, "cat")]  # 9: not answered
    qfile = write_jsonl(tmp_path / "llava_vqav2_val.jsonl", questions)
    afile = write_jsonl(tmp_path / "answers.jsonl", answers)
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": annotations}))
    result = score_answers("vqav2", afile, qfile, tmp_path / "ann.json", out_dir=tmp_path / "upload")
    expected = [c[-1] for c in cases]
    assert result.scores["accuracy"] == pytest.approx(100 * sum(expected) / 6)  # 65.0
    assert result.scores["other/accuracy"] == pytest.approx(100 * (0 + 0 + 1) / 3)
    assert result.scores["number/accuracy"] == pytest.approx(100 * (0.9 + 1) / 2)
    assert result.scores["yes_no/accuracy"] == 100.0
    # 7 and 8 have no annotators' answers: excluded; 9 is unanswered but not annotated either: not counted
    assert (result.n, result.excluded, result.unanswered) == (6, [7, 8], [])
    # convert_vqav2_for_submission.py: every question of the question file, EvalAI-processed, "" when unanswered
    submission = json.loads((tmp_path / "upload" / "vqav2_submission.json").read_text())
    assert submission[0] == {"question_id": 1, "answer": "man 's"} and submission[1] == {"question_id": 2, "answer": "2"}
    assert submission[-1] == {"question_id": 9, "answer": ""} and len(submission) == 9
    assert result.files["submission"] == str(tmp_path / "upload" / "vqav2_submission.json")


def test_vqav2_refuses_annotations_of_other_questions(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [vqa_annotation(100, ["x"] * 10)]}))
    with pytest.raises(ValueError, match="none of the 1 answers has a reference"):
        score_answers("vqav2", [answer_line(1, "Q", "x")], annotations=tmp_path / "ann.json")
    result = score_answers("vqav2", [answer_line(1, "Q", "x")])  # test-dev: no annotations, no score
    assert result.n == 0 and not result.scores and "not scored" in result.notes[0]


def test_gqa_accuracy_over_balanced_questions(tmp_path):
    gqa = {
        "201": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"answer": "table", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
        "203": {"answer": "left", "isBalanced": False, "types": {"structural": "query", "semantic": "rel"}},
        "204": {"answer": "table", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
    }
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(gqa))
    answers = [answer_line("201", "p", "Yes."),  # convert_gqa_for_eval: rstrip('.').lower() -> "yes": right
               answer_line("202", "p", "The table."),  # -> "the table": no article removal, wrong
               answer_line("203", "p", "left"),  # not balanced: eval.py does not score it
               answer_line("204", "p", "Table..")]  # every final period stripped -> "table": right
    result = score_answers("gqa", answers, annotations=tmp_path / "testdev_balanced_questions.json", out_dir=tmp_path)
    assert result.scores == pytest.approx({"accuracy": 100 * 2 / 3, "binary/accuracy": 100.0, "open/accuracy": 50.0})
    assert result.n == 3
    predictions = json.loads((tmp_path / "testdev_balanced_predictions.json").read_text())
    assert predictions[1] == {"questionId": "202", "prediction": "the table"} and len(predictions) == 4


def test_vizwiz_submission_and_vqaeval_accuracy(tmp_path):
    questions = [{"question_id": 0, "image": "VizWiz_val_00000000.jpg", "text": "What is this?" + SUFFIX},
                 {"question_id": 1, "image": "VizWiz_val_00000001.jpg", "text": "What drink?" + SUFFIX},
                 {"question_id": 2, "image": "VizWiz_val_00000002.jpg", "text": "Color?" + SUFFIX}]
    annotations = [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_00000001.jpg", "question": "What drink?", "answer_type": "other",
         "answers": [{"answer": "coca cola", "answer_confidence": "yes"}] * 5 + [{"answer": "coke", "answer_confidence": "no"}] * 5},
    ]
    qfile = write_jsonl(tmp_path / "llava_val.jsonl", questions)
    (tmp_path / "val.json").write_text(json.dumps(annotations))
    answers = [answer_line(0, questions[0]["text"], "Unanswerable."), answer_line(1, questions[1]["text"], "Pepsi"),
               answer_line(2, questions[2]["text"], "Blue")]
    result = score_answers("vizwiz", answers, qfile, tmp_path / "val.json", out_dir=tmp_path / "up")
    # "unanswerable" x10 (as written) vs EvalAI("Unanswerable.") = "unanswerable": 1; "pepsi": 0; image 2: no annotation
    assert result.scores["vqaeval_accuracy"] == pytest.approx(50.0)
    assert result.scores["unanswerable/vqaeval_accuracy"] == 100.0 and result.excluded == [2]
    submission = json.loads((tmp_path / "up" / "vizwiz_submission.json").read_text())
    assert submission == [{"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
                          {"image": "VizWiz_val_00000001.jpg", "answer": "pepsi"},
                          {"image": "VizWiz_val_00000002.jpg", "answer": "blue"}]
    with pytest.raises(ValueError, match="question file"):
        score_answers("vizwiz", answers, annotations=tmp_path / "val.json")


def test_textvqa_finds_questions_by_image_id_and_prompt(tmp_path):
    # LLaVA's TextVQA question_id is the image id: two questions of one image share it, their prompts differ
    questions = [
        {"question_id": "img1", "image": "img1.jpg", "text": "what brand is it?\nReference OCR token: Nikon, 2019" + SUFFIX},
        {"question_id": "img1", "image": "img1.jpg", "text": "What year?" + SUFFIX},
        {"question_id": "img2", "image": "img2.jpg", "text": "whose hat?" + SUFFIX},
    ]
    data = [
        {"image_id": "img1", "question": "What brand is it?", "answers": ["nikon"] * 2 + ["canon"] * 8},
        {"image_id": "img1", "question": "what year?", "answers": ["2019"] * 10},
        {"image_id": "img2", "question": "Whose hat?", "answers": ["man's"] * 10},
    ]
    qfile = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", questions)
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    answers = [answer_line("img1", questions[1]["text"], "2019."),  # any order: the prompt names the question
               answer_line("img1", questions[0]["text"], "Nikon"),
               answer_line("img2", questions[2]["text"], "man's")]
    result = score_answers("textvqa", answers, qfile, tmp_path / "TextVQA_0.5.1_val.json")
    # TextVQAAccuracyEvaluator: "nikon" given by 2 of 10 -> (2 x 1/3 + 8 x 2/3) / 10 = 0.6; "2019" 1.0; "man's" is
    # processed on both sides (unlike vqaEval's unanimous rule) -> "man 's" == "man 's": 1.0
    assert result.scores["accuracy"] == pytest.approx(100 * (0.6 + 1.0 + 1.0) / 3)
    assert result.n == 3 and BENCHMARKS.get("textvqa").needs_annotations


@pytest.mark.parametrize("prompt, question", [
    ("What?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what?"),
    ("Reference OCR token: A, B\nWhat?\nAnswer the question using a single word or phrase.", "what?"),
    ("OCR tokens: a b Question: What is It? Short answer:", "what is it?"),
    ("What?\nAnswer the question using a single word or phrase.", "what?"),
])
def test_textvqa_prompt_processor(prompt, question):
    assert textvqa_question(prompt) == question


def test_textvqa_prompt_in_another_form_is_an_error():
    with pytest.raises(ValueError, match="none of the forms"):
        textvqa_question("one line only")
