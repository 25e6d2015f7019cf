"""MVBench / MLVU / EgoSchema (LLaVA-Mini's *_mc.py) and the GPT-judged benchmarks' judge protocol."""
import json
import sys

import pytest

from lm_mini.eval.benchmarks import BENCHMARKS
from lm_mini.eval.benchmarks.scoring import score_answers
from lm_mini.eval.benchmarks.video_mc import MLVU, MVBench


def _task_folder(tmp_path, bench_cls, data):
    root = tmp_path / bench_cls.name
    (root / "json").mkdir(parents=True)
    for task, (json_file, _) in bench_cls.TASKS.items():
        (root / json_file).write_text(json.dumps(data.get(task, [])))
    return root


def test_mvbench_prompt_and_check_ans_accuracy(tmp_path):
    root = _task_folder(tmp_path, MVBench, {
        "Action Sequence": [
            {"video": "v1.mp4", "question": "What did he do first?", "candidates": ["open door", "close door", "sit"],
             "answer": "close door"},
            {"video": "v2.mp4", "question": "Then?", "candidates": ["stand", "run", "sit"], "answer": "sit"},
            {"video": "v3.mp4", "question": "Odd?", "candidates": ["a", "b"], "answer": "c"},  # not a candidate
        ],
        "Object Shuffle": [
            {"video": "s1.mp4", "question": "Where?", "candidates": ["left", "right"], "answer": "left"},
            {"video": "s2.mp4", "question": "Where now?", "candidates": ["up", "down", "middle"], "answer": "up"},
            {"video": "s3.mp4", "question": "And?", "candidates": ["x", "y", "z"], "answer": "z"},
        ]})
    bench = BENCHMARKS.create("mvbench")
    questions = bench.read_questions(root)
    assert [q.question_id for q in questions] == ["action_sequence/0", "action_sequence/1", "action_sequence/2",
                                                  "object_shuffle/0", "object_shuffle/1", "object_shuffle/2"]
    # qa_template + "\nAnswer with one letter."; the answers line's prompt is the question (the script's 'question')
    assert bench.prompt(questions[0]) == ("Question: What did he do first?\nOptions:\n(A) open door\n(B) close door\n"
                                          "(C) sit\nAnswer with one letter.")
    assert questions[0].media == "video/star/Charades_v1_480/v1.mp4" and questions[0].is_video
    texts = ["(B) close door",  # check_ans: the letter before the first ")" -> B, right
             "C. sit",  # no ")": the whole answer is compared with "C", wrong
             "A",
             "A",  # right
             "A)",  # "A", right
             "c)"]  # "c" is not "C", wrong
    answers = [{"question_id": q.question_id, "prompt": bench.answer_prompt(q), "text": t} for q, t in zip(questions, texts)]
    result = score_answers(bench, answers, root)
    # "c" is not a candidate: the script's qa_template makes the gold "(@) c", which the question still counts in
    # its task's total (never right): 1 of 3, not 1 of 2 (it used to be left out as "no reference")
    assert result.scores["Action Sequence/accuracy"] == pytest.approx(100 / 3) and result.excluded == []
    assert result.n == 6 and any("not among their candidates (action_sequence/2)" in n for n in result.notes)
    assert result.scores["Object Shuffle/accuracy"] == pytest.approx(200 / 3)
    assert result.scores["accuracy"] == pytest.approx((100 / 3 + 200 / 3) / 2)  # the script's Avg: mean over the tasks
    # the script answers every question before it scores: an incomplete file is refused
    from lm_mini.eval.benchmarks.base import IncompleteAnswers

    with pytest.raises(IncompleteAnswers, match=r"mvbench: 1 of 6 questions have no answer \('object_shuffle/2'\)"):
        score_answers(bench, answers[:-1], root)
    assert bench.video_max_frames == 1000 and bench.max_new_tokens == 1024


def test_mlvu_needs_all_its_task_files(tmp_path):
    root = _task_folder(tmp_path, MLVU, {"count": [{"video": "c.mp4", "question": "How many?", "candidates": ["1", "2"],
                                                    "answer": "2", "question_type": "count"}]})
    bench = BENCHMARKS.create("mlvu")
    questions = bench.read_questions(root / "json")  # the json folder itself is fine too
    assert questions[0].media == "video/4_count/c.mp4"
    answers = [{"question_id": "4_count/0", "prompt": questions[0].text, "text": "(B) 2"}]
    assert score_answers(bench, answers, root).scores == {"count/accuracy": 100.0, "accuracy": 100.0}
    (root / "json" / "3_ego.json").unlink()
    with pytest.raises(FileNotFoundError, match="json/3_ego.json"):
        bench.read_questions(root)


def test_egoschema_first_letter_and_video_extensions(tmp_path):
    options = {f"option {i}": f"opt{i}" for i in range(5)}
    mc = [dict(q_uid="u1", question="What did C do?", answer=2, **options),
          dict(q_uid="u2", question="Why?", answer=1, **options),
          dict(q_uid="u3", question="Where?", answer=2, **options),
          dict(q_uid="u4", question="When?", **options)]  # the hidden part: no answer
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    bench = BENCHMARKS.create("egoschema")
    questions = bench.read_questions(tmp_path / "mc.json")
    assert bench.prompt(questions[0]).startswith("You are a helpful expert in first person view video analysis.")
    assert "\nWhat did C do?\nChoices:\nA: opt0\nB: opt1\nC: opt2\nD: opt3\nE: opt4\n\nAnswer with one letter." in bench.prompt(questions[0])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "u1.avi").write_bytes(b"")
    assert bench.media_path(questions[0], tmp_path / "videos").name == "u1.avi"  # .mp4, .avi, .mov, .mkv in turn
    texts = ["C", "The answer is B", "Definitely C", "A"]  # first of A-E anywhere: "D" of "Definitely", wrong
    answers = [{"question_id": q.question_id, "prompt": q.text, "text": t} for q, t in zip(questions, texts)]
    result = score_answers(bench, answers, tmp_path / "mc.json")
    assert result.scores == {"accuracy": pytest.approx(200 / 3)} and result.excluded == ["u4"]
    assert bench.max_new_tokens == 128
    # egoschema_mc.py's total counts every question of its file: one without an answer is wrong (u3 here; u1, u2 right)
    partial = score_answers(bench, answers[:2] + answers[3:], tmp_path / "mc.json")
    assert partial.scores == {"accuracy": pytest.approx(200 / 3)} and partial.unanswered == ["u3"] and partial.n == 3
    (tmp_path / "full.json").write_text(json.dumps([{k: v for k, v in q.items() if k != "answer"} for q in mc]))
    hidden = score_answers(bench, answers[3:], tmp_path / "full.json", out_dir=tmp_path / "up")  # the full set: no answers
    assert hidden.n == 0 and not hidden.scores and "Kaggle" in hidden.notes[0]
    assert (tmp_path / "up" / "egoschema_submission.csv").read_text().splitlines() == ["q_uid,answer", "u4,0"]


JUDGE = """
import json, sys, os
path = sys.argv[1]
rows = [json.loads(l) for l in open(path)] if path.endswith(".jsonl") else json.load(open(path))
assert os.environ["LM_MINI_BENCHMARK"]
print("judging...")
print(json.dumps({"n_rows": len(rows), "first_pred": 1.0 if "pred" in rows[0] else 0.0}))
"""


def test_video_qa_judge_protocol(tmp_path):
    (tmp_path / "test_q.json").write_text(json.dumps([{"video_name": "vid1", "question_id": "q1", "question": "what is it?"},
                                                      {"video_name": "vid2", "question_id": "q2", "question": "who?"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([{"answer": "dog", "type": 0, "question_id": "q1"},
                                                      {"answer": "man", "type": 1, "question_id": "q2"}]))
    (tmp_path / "judge.py").write_text(JUDGE)
    bench = BENCHMARKS.create("activitynet_qa")
    questions = bench.read_questions(tmp_path / "test_q.json")
    assert bench.prompt(questions[0]).startswith("Answer the question based on the video.")
    assert bench.prompt(questions[0]).endswith("Answer the question with one complete sentence:\nwhat is it?")
    assert questions[0].media == "v_vid1"  # run_inference_video_qa_act.py: v_<video_name>.<ext>
    answers = [{"question_id": q.question_id, "prompt": q.text, "text": t} for q, t in zip(questions, ["A dog.", "A man."])]
    # without a judge: the judge input is written, nothing is scored
    result = score_answers(bench, answers, tmp_path / "test_q.json", tmp_path / "test_a.json", out_dir=tmp_path / "up")
    assert result.scores == {} and "--judge" in result.notes[0]
    rows = [json.loads(l) for l in (tmp_path / "up" / "merge.jsonl").read_text().splitlines()]
    assert rows[0] == {"id": "q1", "question": "what is it?", "answer": "dog", "pred": "A dog."}  # eval_video_qa.py's input
    judged = score_answers(bench, answers, tmp_path / "test_q.json", tmp_path / "test_a.json",
                           judge=f"{sys.executable} {tmp_path / 'judge.py'}")
    assert judged.scores == {"n_rows": 2.0, "first_pred": 1.0} and judged.n == 2
    (tmp_path / "bad.py").write_text("print('accuracy: 40')")
    with pytest.raises(RuntimeError, match="JSON object of score names to numbers"):
        score_answers(bench, answers, tmp_path / "test_q.json", tmp_path / "test_a.json",
                      judge=f"{sys.executable} {tmp_path / 'bad.py'}")
    (tmp_path / "fail.py").write_text("import sys; sys.exit('no API key')")
    with pytest.raises(RuntimeError, match="exited with 1:\nno API key"):
        score_answers(bench, answers, tmp_path / "test_q.json", tmp_path / "test_a.json",
                      judge=f"{sys.executable} {tmp_path / 'fail.py'}")


def test_mmvet_and_llava_bench_judge_inputs(tmp_path):
    answers = [{"question_id": 0, "prompt": "What?", "text": "A cat", "answer_id": "x", "model_id": "m", "metadata": {}}]
    result = score_answers("mmvet", answers, out_dir=tmp_path)
    assert json.loads((tmp_path / "mmvet_results.json").read_text()) == {"v1_0": "A cat"}  # convert_mmvet_for_eval.py
    assert result.files["judge_input"].endswith("mmvet_results.json") and not result.scores
    score_answers("llava_bench", answers, out_dir=tmp_path)
    assert json.loads((tmp_path / "judge_input.jsonl").read_text()) == answers[0]
    assert all(BENCHMARKS.get(n).judged for n in ("llava_bench", "mmvet", "msvd_qa", "msrvtt_qa", "activitynet_qa"))
