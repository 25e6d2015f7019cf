"""MMBench (TSV, model_vqa_mmbench.py prompt, upload sheet, VLMEvalKit accuracy) and SEED-Bench from official files."""
import base64
import io
import json

import pytest
from PIL import Image

from lm_mini.eval.benchmarks import BENCHMARKS
from lm_mini.eval.benchmarks.scoring import score_answers

SUFFIX = "\nAnswer the question using a single word or phrase."


def _png_b64():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(tmp_path, with_answers=True):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [  # index 1e6 + i is a circular shift of question i (VLMEvalKit's convention)
        [0, "What color?", "A hint", "red", "blue", "", "", "B", "color", _png_b64(), "s", "l2", "", "dev"],
        [1000000, "What color?", "A hint", "blue", "red", "", "", "A", "color", "0", "s", "l2", "", "dev"],  # row 0's
        [1, "How many?", "", "one", "two", "three", "four", "C", "count", _png_b64(), "s", "l2", "", "dev"],
        [1000001, "How many?", "", "two", "three", "four", "one", "B", "count", _png_b64(), "s", "l2", "", "dev"],
        [2, "Which animal?", "None", "cat", "dog", "", "", "A", "animal", _png_b64(), "s", "l2", "", "dev"],
        [3, "Which shape?", "", "square", "circle", "", "", "A", "shape", _png_b64(), "s", "l2", "", "dev"],
    ]
    if not with_answers:
        header.remove("answer")
        rows = [r[:7] + r[8:] for r in rows]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    path.write_text("\n".join("\t".join(str(c) for c in row) for row in [header] + rows) + "\n")
    return path


def test_mmbench_prompt_is_model_vqa_mmbench(tmp_path):
    bench = BENCHMARKS.create("mmbench")
    questions = bench.read_questions(_mmbench_tsv(tmp_path))
    assert [q.question_id for q in questions] == [0, 1000000, 1, 1000001, 2, 3]
    assert all(type(q.question_id) is int for q in questions)
    # hint, question, the options up to the first empty one, then --single-pred-prompt's suffix
    assert bench.prompt(questions[0]) == ("A hint\nWhat color?\nA. red\nB. blue\n"
                                          "Answer with the option's letter from the given choices directly.")
    assert bench.answer_prompt(questions[0]) == "A hint\nWhat color?\nA. red\nB. blue"  # cur_prompt: no suffix
    assert bench.prompt(questions[4]).startswith("Which animal?\nA. cat\nB. dog\n")  # hint "None": no hint
    assert bench.answer_prompt(questions[2]) == "How many?\nA. one\nB. two\nC. three\nD. four"
    assert Image.open(io.BytesIO(questions[0].media)).size == (4, 4)
    assert questions[1].media == questions[0].media  # an image cell holding another row's index (VLMEvalKit TSVs)
    assert BENCHMARKS.create("mmbench_cn_llava15").prompt(questions[0]).endswith("\n请直接回答选项字母。")
    assert BENCHMARKS.create("mmbench_cn").prompt(questions[0]) == bench.prompt(questions[0])  # LLaVA-Mini's script


def test_mmbench_accuracy_circular_accuracy_and_upload_sheet(tmp_path):
    bench = BENCHMARKS.create("mmbench")
    tsv = _mmbench_tsv(tmp_path)
    questions = bench.read_questions(tsv)
    texts = {0: "B", 1000000: "(A)", 1: "The answer is C", 1000001: "C",
             2: "I think it is a cat"}  # no letter stands alone, and too long for can_infer_text: unmatched
    answers = [{"question_id": q.question_id, "prompt": bench.answer_prompt(q), "text": texts[q.question_id]}
               for q in questions if q.question_id in texts]
    result = score_answers(bench, answers, tsv, out_dir=tmp_path / "upload")
    # rows 0, 1e6, 1 right; 1e6+1 and 2 wrong; row 3 has no prediction: VLMEvalKit scores every row of the sheet,
    # so it counts wrong (it used to be left out: 3 / 5)
    assert result.scores["accuracy"] == pytest.approx(100 * 3 / 6)
    # circular: question 0 right in both shifts; question 1 wrong in its shift; questions 2 and 3 wrong
    assert result.scores["circular_accuracy"] == pytest.approx(100 / 4)
    assert result.scores["unmatched"] == 1 and result.unanswered == [3] and result.n == 6
    assert any("1 of 6 questions have no answer: counted wrong" in n for n in result.notes)
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    sheet = pd.read_excel(result.files["submission"])
    # convert_mmbench_for_submission.py: hint/category/source/image/comment/l2-category dropped, prediction 7th
    assert list(sheet.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert sheet["prediction"].tolist()[:5] == ["B", "(A)", "The answer is C", "C", "I think it is a cat"]
    assert pd.isna(sheet["prediction"].tolist()[5])


def test_mmbench_test_split_writes_the_sheet_only(tmp_path):
    tsv = _mmbench_tsv(tmp_path, with_answers=False)
    answers = [{"question_id": 0, "prompt": "x", "text": "A"}]
    result = score_answers("mmbench", answers, tsv, out_dir=tmp_path / "up")
    assert result.n == 0 and not result.scores and "no answers" in result.notes[0]
    assert result.files["submission"].endswith((".xlsx", ".tsv"))
    with pytest.raises(ValueError, match="question file"):
        score_answers("mmbench", answers)


def test_seed_bench_exact_letter_and_image_accuracy(tmp_path):
    seed = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 3},
            "questions": [
                {"question_id": "0", "data_type": "image", "question_type_id": 1, "answer": "A", "data_id": "a.jpg"},
                {"question_id": "1", "data_type": "image", "question_type_id": 1, "answer": "B", "data_id": "b.jpg"},
                {"question_id": "2", "data_type": "image", "question_type_id": 2, "answer": "C", "data_id": "c.jpg"},
                {"question_id": "3", "data_type": "video", "question_type_id": 3, "answer": "D", "data_id": "d.mp4"},
                {"question_id": "4", "data_type": "image", "question_type_id": 2, "answer": "A", "data_id": "e.jpg"}]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed))
    # LLaVA's llava-seed-bench.jsonl keeps integer ids; the script looks them up with int(question_id)
    answers = [{"question_id": 0, "prompt": "p", "text": "A"}, {"question_id": 1, "prompt": "p", "text": "B."},
               {"question_id": 2, "prompt": "p", "text": "C"}, {"question_id": 3, "prompt": "p", "text": "D"}]
    result = score_answers("seed_bench", answers, annotations=tmp_path / "SEED-Bench.json", out_dir=tmp_path / "up")
    # row['text'] == question_data['answer']: "B." is wrong; question 4 has no answer: eval_single counts every
    # question of SEED-Bench.json, so it is wrong in its type, in image and in the total (no --questions needed)
    assert result.scores == pytest.approx({"accuracy": 60.0, "image/accuracy": 50.0, "video/accuracy": 100.0,
                                           "Scene Understanding/accuracy": 50.0, "Instance Identity/accuracy": 50.0,
                                           "Action Recognition/accuracy": 100.0})
    assert result.n == 5 and result.unanswered == ["4"]
    # the script fails writing the upload on the missing id: none is written, and the result says why
    assert "submission" not in result.files and not (tmp_path / "up" / "seed_bench_upload.jsonl").exists()
    assert any(n.startswith("submission not written: 1 of the 5 questions") for n in result.notes)
    answers.append({"question_id": 4, "prompt": "p", "text": "A"})
    complete = score_answers("seed_bench", answers, annotations=tmp_path / "SEED-Bench.json", out_dir=tmp_path / "up")
    assert complete.scores["accuracy"] == 80.0 and not complete.unanswered
    lines = [json.loads(l) for l in (tmp_path / "up" / "seed_bench_upload.jsonl").read_text().splitlines()]
    assert lines == [{"question_id": "0", "prediction": "A"}, {"question_id": "1", "prediction": "B."},
                     {"question_id": "2", "prediction": "C"}, {"question_id": "3", "prediction": "D"},
                     {"question_id": "4", "prediction": "A"}]
