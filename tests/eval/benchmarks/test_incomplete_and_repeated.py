"""Answers files that are incomplete, repeat a question, or mix models: scored as the official script scores them
(its denominators, its rule for a missing answer), refused where it refuses, never a silent partial number.

Each expected number is derived by hand from the official rule named next to it. (Refusals are ValueErrors:
IncompleteAnswers, MixedAnswers, which the CLI reports with exit 2.)"""
import json

import pytest

from lm_mini.eval.benchmarks import BENCHMARKS
from lm_mini.eval.benchmarks.scoring import format_result, score_answers

SUFFIX = "\nAnswer the question using a single word or phrase."


def _line(qid, prompt, text, answer_id=None, model="m", weights=None, generation=None):
    meta = {k: v for k, v in (("weights", weights), ("generation", generation)) if v is not None}
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": answer_id or f"a-{qid}-{text}",
            "model_id": model, "metadata": meta}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- F2: the split's denominators without --questions
def test_scienceqa_without_questions_counts_the_splits_unanswered_problems_wrong(tmp_path):
    """eval_science_qa.py loops over every problem of pid_splits[test]: a problem without a prediction is 'FAILED'
    (wrong) in Accuracy, and left out of IMG-Accuracy (its prompt 'Unknown' has no <image>). lm-mini score without
    --questions used to score the answered problems only, without a word (3 of 3 here, 100%)."""
    problems = {str(i): {"choices": ["a", "b"], "answer": 0, "split": "test"} for i in range(1, 6)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    answers = [_line("1", "<image>\nQ1", "A"), _line("2", "Q2", "A"), _line("3", "<image>\nQ3", "B")]  # 4, 5: none
    result = score_answers("scienceqa", answers, annotations=tmp_path)
    assert result.scores["accuracy"] == pytest.approx(100 * 2 / 5)  # Total: 5, Correct: 2
    assert result.scores["img/accuracy"] == pytest.approx(100 * 1 / 2)  # problems 1 and 3 are multimodal
    assert result.n == 5 and result.unanswered == ["4", "5"]
    assert "2 of 5 questions have no answer: counted wrong, as eval_science_qa.py" in format_result(result)


def test_seed_without_questions_counts_every_annotated_question(tmp_path):
    """convert_seed_for_submission.py's eval_single counts every question of SEED-Bench.json in type_counts; a
    question without an answer only misses its correct count."""
    seed = {"question_type": {"Scene": 1}, "questions": [
        {"question_id": str(i), "data_type": "image" if i < 3 else "video", "question_type_id": 1, "answer": "A"}
        for i in range(4)]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed))
    result = score_answers("seed_bench", [_line(0, "p", "A"), _line(3, "p", "A")], annotations=tmp_path / "SEED-Bench.json")
    assert result.scores["image/accuracy"] == pytest.approx(100 / 3) and result.scores["accuracy"] == 50.0
    assert result.scores["video/accuracy"] == 100.0 and result.unanswered == ["1", "2"]


@pytest.mark.parametrize("bench, rule", [("gqa", "eval.py needs a prediction for every question"),
                                         ("vqav2", "vqaEval.py refuses results that do not answer every annotated")])
def test_refused_where_the_official_scorer_refuses_an_incomplete_file(tmp_path, bench, rule):
    if bench == "gqa":  # GQA's eval.py: "no prediction for question ... Please add prediction for all questions."
        (tmp_path / "ann.json").write_text(json.dumps({q: {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}}
                                                       for q in ("1", "2")}))
    else:  # vqa.py loadRes: assert set(annsQuesIds) == set(self.getQuesIds())
        (tmp_path / "ann.json").write_text(json.dumps({"annotations": [
            {"question_id": q, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10} for q in ("1", "2")]}))
    with pytest.raises(ValueError, match=rule):
        score_answers(bench, [_line("1", "p", "yes")], annotations=tmp_path / "ann.json")


def test_vqav2_with_questions_scores_a_missing_answer_as_the_empty_submission(tmp_path):
    """convert_vqav2_for_submission.py writes "" for a question of the question file without an answer; that is what
    vqaEval.py (or the server) scores: 0 against ten "yes"."""
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10} for q in (1, 2)]}))
    questions = _write(tmp_path / "q.jsonl", [{"question_id": q, "image": "x.jpg", "text": f"Q{q}?"} for q in (1, 2, 3)])
    result = score_answers("vqav2", [_line(1, "Q1?", "Yes")], questions, tmp_path / "ann.json")
    assert result.scores["accuracy"] == 50.0 and result.n == 2 and result.unanswered == [2]  # 3: not annotated
    assert any("counted wrong, as convert_vqav2_for_submission.py submits the empty answer" in n for n in result.notes)


def test_textvqa_and_pope_score_the_answers_given_and_say_so(tmp_path):
    """eval_textvqa.py loops over the answers file's lines; eval_pope.py over the answers of a split (zipped with its
    labels): a question without an answer is not in their denominators -- noted, not hidden."""
    (tmp_path / "ann.json").write_text(json.dumps({"data": [
        {"image_id": i, "question": f"what is {i}?", "answers": ["a"] * 10} for i in ("x", "y")]}))
    questions = _write(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": f"what is {i}?" + SUFFIX}
                                               for i in ("x", "y")])
    result = score_answers("textvqa", [_line("x", "what is x?" + SUFFIX, "a")], questions, tmp_path / "ann.json")
    assert result.scores == {"accuracy": 100.0} and result.unanswered == ["y"]
    assert any("1 of 2 questions have no answer: not counted, as eval_textvqa.py" in n for n in result.notes)


def test_vizwiz_incomplete_file_is_refused_and_no_submission_written(tmp_path):
    """convert_vizwiz_for_submission.py: ``assert x['question_id'] in results`` for every question of the file."""
    questions = _write(tmp_path / "q.jsonl", [{"question_id": i, "image": f"VizWiz_{i}.jpg", "text": "What?"} for i in (1, 2)])
    result = score_answers("vizwiz", [_line(1, "What?", "dog")], questions, out_dir=tmp_path / "up")
    assert "submission" not in result.files and not (tmp_path / "up" / "vizwiz_submission.json").exists()
    assert "submission not written: 1 of 2 questions have no answer" in result.notes[0]
    (tmp_path / "val.json").write_text(json.dumps([{"image": f"VizWiz_{i}.jpg", "answers": [{"answer": "dog"}] * 10,
                                                    "answer_type": "other"} for i in (1, 2)]))
    with pytest.raises(ValueError, match="asserts that every question"):
        score_answers("vizwiz", [_line(1, "What?", "dog")], questions, tmp_path / "val.json")


# --------------------------------------------------------------------------- F3: VizWiz's local number says which rule it is
def test_vizwiz_local_score_is_vqaeval_rule_and_says_it_is_not_vizwiz_code(tmp_path):
    """vqaEval.py normalises the annotators only when they disagree and compares distinct answers: "yes" against
    Yes x2, yes x2, no x6 scores 1.0 (both spellings normalise to "yes": 4 matches); VizWiz's own evaluation
    code (answers as written, by position) would give 0.6. The key names the rule, the note says it."""
    questions = _write(tmp_path / "q.jsonl", [{"question_id": 1, "image": "VizWiz_1.jpg", "text": "Is it?"}])
    (tmp_path / "val.json").write_text(json.dumps([{"image": "VizWiz_1.jpg", "answer_type": "yes/no", "answers":
                                                    [{"answer": a} for a in ["Yes"] * 2 + ["yes"] * 2 + ["no"] * 6]}]))
    result = score_answers("vizwiz", [_line(1, "Is it?", "yes")], questions, tmp_path / "val.json")
    assert result.scores["vqaeval_accuracy"] == 100.0 and "accuracy" not in result.scores
    assert any("not VizWiz's evaluation code" in n for n in result.notes)
    doc = BENCHMARKS.get("vizwiz").__doc__
    assert "what VizWiz's evaluation uses" not in doc and "not the rule of VizWiz's own" in doc


# --------------------------------------------------------------------------- F1 lives in test_official_video_judged.py
# --------------------------------------------------------------------------- F4: a question the question file asks twice
def test_a_question_the_question_file_repeats_is_scored_as_eval_textvqa_does(tmp_path):
    """TextVQA's question_id is the image id: two annotators asking the same question give two identical
    (question_id, prompt) lines. eval_textvqa.py scores each answers line against annotations[(image, question)]:
    here 2 of 3 right (66.67). It used to be refused as 'chunks merged twice?'."""
    (tmp_path / "ann.json").write_text(json.dumps({"data": [
        {"image_id": "img0", "question": "what is written?", "answers": ["a"] * 10},
        {"image_id": "img1", "question": "what brand?", "answers": ["b"] * 10}]}))
    rows = [{"question_id": "img0", "image": "0.jpg", "text": "what is written?" + SUFFIX}] * 2 + [
        {"question_id": "img1", "image": "1.jpg", "text": "what brand?" + SUFFIX}]
    questions = _write(tmp_path / "q.jsonl", rows)
    answers = [_line("img0", rows[0]["text"], "a", "u1"), _line("img0", rows[0]["text"], "x", "u2"),
               _line("img1", rows[2]["text"], "b", "u3")]
    for given in (questions, None):  # with the question file, and as `lm-mini score` runs without it
        result = score_answers("textvqa", answers, given, tmp_path / "ann.json")
        assert result.scores["accuracy"] == pytest.approx(200 / 3) and result.n == 3 and not result.unanswered
    assert any("1 answers repeat the (question_id, prompt)" in n for n in result.notes)  # without: said
    # one answer more than the question file asks: refused, saying how often the file asks it
    with pytest.raises(ValueError, match=r"answers 1, 2 and 4 all answer question 'img0' .*asks 2 times"):
        score_answers("textvqa", answers + [_line("img0", rows[0]["text"], "a", "u4")], questions, tmp_path / "ann.json")
    # the same line twice (same answer_id): a double merge, with or without the question file
    with pytest.raises(ValueError, match="answers 1 and 4 both answer question 'img0' with the same prompt and answer_id 'u1'"):
        score_answers("textvqa", answers + answers[:1], None, tmp_path / "ann.json")


# --------------------------------------------------------------------------- F7/F8 at scoring: one source per file
def test_scoring_refuses_answers_of_two_checkpoints_or_generation_settings(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"data": [
        {"image_id": i, "question": "q?", "answers": ["a"] * 10} for i in ("x", "y")]}))
    greedy = {"max_new_tokens": 3, "temperature": 0.0, "top_p": None, "num_beams": 1}
    step200 = {"checkpoint": "step=00000200.ckpt", "step": 200, "fingerprint": "aaaa"}
    step300 = {"checkpoint": "step=00000300.ckpt", "step": 300, "fingerprint": "bbbb"}
    same = [_line(i, "q?" + SUFFIX, "a", weights=step200, generation=greedy) for i in ("x", "y")]
    assert score_answers("textvqa", same, annotations=tmp_path / "ann.json").scores == {"accuracy": 100.0}
    mixed = _write(tmp_path / "mixed.jsonl", same[:1] + [_line("y", "q?" + SUFFIX, "a", weights=step300, generation=greedy)])
    with pytest.raises(ValueError, match=r"mixed.jsonl:1 \(model 'm', step=00000200.ckpt step 200 weights aaaa.*"
                                           r"mixed.jsonl:2 \(model 'm', step=00000300.ckpt step 300 weights bbbb"):
        score_answers("textvqa", mixed, annotations=tmp_path / "ann.json")
    sampled = dict(greedy, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="generation"):
        score_answers("textvqa", same[:1] + [_line("y", "q?" + SUFFIX, "a", weights=step200, generation=sampled)],
                      annotations=tmp_path / "ann.json")
    # LLaVA's own answers files: one model_id, metadata {} -- one source
    llava = [_line(i, "q?" + SUFFIX, "a") for i in ("x", "y")]
    assert score_answers("textvqa", llava, annotations=tmp_path / "ann.json").n == 2


# --------------------------------------------------------------------------- F9: VQAv2's submission lists all of test2015
def test_vqav2_submission_lists_every_test2015_question(tmp_path):
    """convert_vqav2_for_submission.py reads the test-dev answers but lists llava_vqav2_mscoco_test2015.jsonl, ""
    for every question not answered (the VQA server wants all of test2015, also for test-dev). Found beside the
    test-dev file as in LLaVA's layout, or given; it used to list the test-dev questions only."""
    test = [{"question_id": i, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"q{i}?" + SUFFIX} for i in range(6)]
    dev = _write(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", test[::2])
    answers = [_line(q["question_id"], q["text"], "Two dogs.") for q in test[::2]]
    result = score_answers("vqav2", answers, dev, out_dir=tmp_path / "alone")  # no test2015 file beside: said
    assert len(json.loads((tmp_path / "alone" / "vqav2_submission.json").read_text())) == 3
    assert any("--submission-questions llava_vqav2_mscoco_test2015.jsonl" in n for n in result.notes)
    _write(tmp_path / "llava_vqav2_mscoco_test2015.jsonl", test)
    result = score_answers("vqav2", answers, dev, out_dir=tmp_path / "up")
    rows = json.loads((tmp_path / "up" / "vqav2_submission.json").read_text())
    assert rows == [{"question_id": i, "answer": "2 dogs" if i % 2 == 0 else ""} for i in range(6)]
    assert any("lists every question of" in n for n in result.notes)
    other = _write(tmp_path / "elsewhere.jsonl", test[:4])  # given explicitly; answers outside it are not dropped
    result = score_answers("vqav2", answers, dev, out_dir=tmp_path / "x", submission_questions=other)
    assert "submission" not in result.files and "1 answers are to questions the submission's question list" in result.notes[0]


# --------------------------------------------------------------------------- F5 / N5 at the scorer
def test_pope_without_labels_says_to_give_the_annotation_folder(tmp_path):
    questions = _write(tmp_path / "llava_pope_test.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?",
                                                             "category": "random"}])
    with pytest.raises(ValueError, match=r"give --annotations, the folder of coco_pope_<split>.json"):
        score_answers("pope", [_line(1, "Is there a dog?", "yes")], questions)


def test_mmvet_judge_input_is_dumped_as_convert_mmvet_for_eval(tmp_path):
    """convert_mmvet_for_eval.py: json.dump(cur_result, f, indent=2)."""
    answers = [_line(0, "q", "a cat"), _line(1, "q", "two")]
    path = BENCHMARKS.create("mmvet").write_submission(answers, tmp_path)
    assert path.read_text() == json.dumps({"v1_0": "a cat", "v1_1": "two"}, indent=2)
