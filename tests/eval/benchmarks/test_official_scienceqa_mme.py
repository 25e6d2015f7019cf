"""ScienceQA (eval_science_qa.py) and MME (convert_answer_to_mme.py + calculation.py) from their official files."""
import json

import pytest

from lm_mini.eval.benchmarks import BENCHMARKS
from lm_mini.eval.benchmarks.scoring import score_answers

SUFFIX = "\nAnswer the question using a single word or phrase."


def test_scienceqa_prompt_and_img_accuracy(tmp_path):
    bench = BENCHMARKS.create("scienceqa")
    problems = {  # problem id: (number of choices, answer index, has an image, the model's answer, right?)
        "1": (3, 1, True, "(B)", False),  # eval_science_qa.py reads "B", "B. ..." or "The answer is B." only
        "2": (2, 0, False, "A", True),
        "3": (4, 2, True, "The answer is C.", True),
        "4": (3, 1, True, "b", False),  # lower case is not an option letter
        "5": (2, 1, False, "B. blue", True),
    }
    (tmp_path / "problems.json").write_text(json.dumps({
        pid: {"question": f"Q{pid}", "choices": [f"c{i}" for i in range(n)], "answer": ans,
              "image": "image.png" if img else None, "split": "test"}
        for pid, (n, ans, img, _, _) in problems.items()} | {"6": {"choices": ["x", "y"], "answer": 0, "split": "val"}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": ["6"]}))
    llava = [{"id": pid, **({"image": f"{pid}/image.png"} if img else {}),
              "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + f"Context: none\nQuestion: Q{pid}\n"
                                 f"Options: (A) c0 (B) c1"}, {"from": "gpt", "value": "B"}]}
             for pid, (_, _, img, _, _) in problems.items()]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(llava))
    questions = bench.read_questions(tmp_path / "llava_test_CQM-A.json")
    # model_vqa_science.py --single-pred-prompt: <image> removed, stripped, the fixed suffix
    assert bench.prompt(questions[0]) == ("Context: none\nQuestion: Q1\nOptions: (A) c0 (B) c1\n"
                                          "Answer with the option's letter from the given choices directly.")
    assert bench.answer_prompt(questions[0]).startswith("<image>\nContext") and questions[0].media == "1/image.png"
    assert bench.answer_prompt(questions[1]).startswith("Context") and questions[1].media is None
    answers = [{"question_id": q.question_id, "prompt": bench.answer_prompt(q), "text": problems[q.question_id][3]}
               for q in questions]
    answers.append({"question_id": "6", "prompt": "Q6", "text": "A"})  # a val problem: not in the test split
    result = score_answers(bench, answers, annotations=tmp_path)
    assert result.scores["accuracy"] == pytest.approx(100 * 3 / 5)
    assert result.scores["img/accuracy"] == pytest.approx(100 * 1 / 3)  # problems 1, 3, 4 have images; 3 is right
    assert result.excluded == ["6"] and result.n == 5
    assert bench.max_new_tokens == 1024 and bench.headline == "img/accuracy"


MME_FILLERS = [t for t in ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                            "artwork", "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation",
                            "code_reasoning") if t not in ("existence", "artwork", "code_reasoning")]


def _mme_folder(tmp_path):
    """An MME_Benchmark_release_version with all 14 subtasks: the three the test looks at, and one image of two
    questions in every other (answered right by :func:`_mme_answers`: 200 points each)."""
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)  # a flat category: image and its .txt side by side
    (root / "existence" / "000.txt").write_text("Is there a train in this image? Please answer yes or no.\tYes\n"
                                                "Is there a bus in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "001.txt").write_text("Is there a cat in this image? Please answer yes or no.\tYes\n"
                                                "Is there a dog in this image? Please answer yes or no.\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)  # images/ + questions_answers_YN/
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Dali?  Please answer yes or no.\tNo\n")  # two spaces, as some MME files have
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text("Does the code print 3? Please answer yes or no.\tYes\n"
                                                      "Does the code print 4? Please answer yes or no.\tNo\n")
    for task in MME_FILLERS:
        (root / task).mkdir()
        (root / task / "1.txt").write_text(f"Is it {task}? Please answer yes or no.\tYes\n"
                                           f"Is it not {task}? Please answer yes or no.\tNo\n")
    return root


def _mme_answers():
    rows = [  # question_id, prompt as in llava_mme.jsonl, the model's answer (calculation.py: first 4 characters)
        ("existence/000.jpg", "Is there a train in this image?" + SUFFIX, "Yes"),
        ("existence/000.jpg", "Is there a bus in this image?" + SUFFIX, "No, there is not."),
        ("existence/001.jpg", "Is there a cat in this image?" + SUFFIX, "yes"),
        ("existence/001.jpg", "Is there a dog in this image?" + SUFFIX, "There is none"),  # "ther": other, wrong
        ("artwork/images/10002.jpg", "Is this artwork by Monet?" + SUFFIX, "Yes, it is."),
        ("artwork/images/10002.jpg", "Is this artwork by Dali?" + SUFFIX, "yes"),  # wrong
        ("code_reasoning/0020.png", "Does the code print 3? Please answer yes or no.", "Yes."),
        ("code_reasoning/0020.png", "Does the code print 4? Please answer yes or no.", "No"),
    ]
    for task in MME_FILLERS:
        rows += [(f"{task}/1.jpg", f"Is it {task}?" + SUFFIX, "Yes"), (f"{task}/1.jpg", f"Is it not {task}?" + SUFFIX, "No")]
    return [{"question_id": q, "prompt": p, "text": t} for q, p, t in rows]


def test_mme_subtask_and_total_scores(tmp_path):
    root = _mme_folder(tmp_path)
    answers = _mme_answers()
    result = score_answers("mme", answers, annotations=root)
    s = result.scores
    # existence: 3 of 4 right (75), 1 of 2 images with both right (50) -> 125; artwork: 50 + 0; code: 100 + 100;
    # the other 11 subtasks 200 each
    assert (s["existence/accuracy"], s["existence/accuracy_plus"], s["existence/score"]) == (75.0, 50.0, 125.0)
    assert (s["artwork/accuracy"], s["artwork/accuracy_plus"]) == (50.0, 0.0)
    assert (s["perception"], s["cognition"], s["total"]) == (125 + 50 + 8 * 200, 4 * 200, 125 + 50 + 8 * 200 + 800)
    assert result.n == 8 + 2 * 11 and not result.notes
    # calculation.py pairs consecutive lines; here pairs are by image, so any order scores the same
    assert score_answers("mme", answers[::-1], annotations=root).scores == s


def test_mme_incomplete_answers_and_partial_question_files(tmp_path):
    """The official pipeline breaks on a missing answer (calculation.py pairs a subtask's lines two by two, and reads
    every subtask's file): an incomplete file is refused; with a question file of part of MME its subtasks are
    scored, but no perception / cognition sum over some of their subtasks (it used to be summed silently)."""
    from lm_mini.eval.benchmarks.base import IncompleteAnswers, Question

    root = _mme_folder(tmp_path)
    answers = _mme_answers()
    with pytest.raises(IncompleteAnswers, match=r"mme: 1 of 30 questions have no answer .*calculation.py pairs"):
        score_answers("mme", answers[1:], annotations=root)
    existence = [Question(a["question_id"], a["prompt"], a["question_id"]) for a in answers[:4]]
    part = score_answers("mme", answers[:4], existence, annotations=root)
    assert part.scores == {"existence/accuracy": 75.0, "existence/accuracy_plus": 50.0, "existence/score": 125.0}
    assert any("no perception score" in n for n in part.notes) and any("no cognition score" in n for n in part.notes)
    with pytest.raises(IncompleteAnswers, match="1 of 4 questions"):
        score_answers("mme", answers[:3], existence, annotations=root)
    # a question file asking one question of an image: in accuracy, not in accuracy_plus (noted)
    once = score_answers("mme", answers[:3], existence[:3], annotations=root)
    assert once.scores["existence/accuracy"] == 100.0 and once.scores["existence/accuracy_plus"] == 100.0
    assert any("1 images with one answer" in n for n in once.notes)


def test_mme_question_missing_from_ground_truth_is_excluded(tmp_path):
    root = _mme_folder(tmp_path)
    answers = _mme_answers() + [{"question_id": "existence/000.jpg", "prompt": "Is there a plane?" + SUFFIX, "text": "Yes"}]
    result = score_answers("mme", answers, annotations=root)
    assert result.excluded == ["existence/000.jpg"] and result.n == 30
