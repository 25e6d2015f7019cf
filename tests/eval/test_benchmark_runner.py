"""``lm-mini eval SOURCE --benchmark NAME``: LLaVA question file in, LLaVA answers file out (ids of their JSON
type, chunks, merge, resume), prompts as LLaVA-Mini's model_vqa_loader.py builds them, scores to MLflow, suites."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import toy_benchmark  # noqa: F401  (registers toy_vqa)
from PIL import Image
from toy_benchmark import SUFFIX

from lm_mini.cli import main
from lm_mini.constants import IMAGE_TOKEN_INDEX
from lm_mini.eval import answers_files, suites
from lm_mini.eval import benchmark_runner as runner
from lm_mini.eval import generation
from lm_mini.eval.benchmarks.base import BENCHMARKS, read_answers

# question ids of both JSON types, as LLaVA files have them (TextVQA: int, MME: a path string); one text-only question
QUESTIONS = [
    {"question_id": 3, "image": "red.png", "text": "What colour is the square?", "category": "default"},
    {"question_id": "q-7", "image": "blue.png", "text": "What colour is the circle?"},
    {"question_id": 11, "text": "Name a colour."},
    {"question_id": 0, "image": "red.png", "text": "What colour is the triangle?"},
    {"question_id": 12, "image": "blue.png", "text": "Is the square red?"},
]
GOLD = {"3": "red", "q-7": "blue", "0": "red", "12": "no"}  # question 11 has no reference: excluded


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "images" / "red.png")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(d / "images" / "blue.png")
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "gold.json").write_text(json.dumps(GOLD))
    return d


def _eval(model_dir, files, out, *extra):
    return ["eval", str(model_dir), "--benchmark", "toy_vqa", "--questions", str(files / "questions.jsonl"),
            "--image-folder", str(files / "images"), "--annotations", str(files / "gold.json"), "--answers-file", str(out),
            "--device", "cpu", *extra]


def _strip(lines):
    return [{k: v for k, v in a.items() if k != "answer_id"} for a in lines]


def test_chunks_follow_llava_get_chunk():
    # split_list: pieces of ceil(len / n) -> 10 items in 4 chunks are 3, 3, 3, 1; 5 items in 4 chunks are 2, 2, 1
    assert [len(answers_files.get_chunk(list(range(10)), 4, k)) for k in range(4)] == [3, 3, 3, 1]
    assert [answers_files.get_chunk(list(range(5)), 4, k) for k in range(4)] == [[0, 1], [2, 3], [4], []]
    assert answers_files.chunk_file("answers/ckpt.jsonl", 4, 1) == Path("answers/ckpt/4_1.jsonl")
    with pytest.raises(ValueError, match="--chunk-idx"):
        answers_files.get_chunk([1, 2], 2, 2)


def test_answers_file_has_one_line_per_question_with_original_ids(tiny_model_dir, bench_files, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, out, "--max-new-tokens", "3", "--json", "--no-mlflow")) == 0
    result = json.loads(capsys.readouterr().out)
    lines = read_answers(out)
    assert [a["question_id"] for a in lines] == [q["question_id"] for q in QUESTIONS]
    assert [type(a["question_id"]) for a in lines] == [int, str, int, int, int]  # JSON types kept
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in lines)
    assert [a["prompt"] for a in lines] == [q["text"] for q in QUESTIONS]  # model_vqa_loader.py's cur_prompt
    assert {a["model_id"] for a in lines} == {"model"} and len({a["answer_id"] for a in lines}) == 5
    assert lines[0]["metadata"]["generation"] == {"max_new_tokens": 3, "temperature": 0.0, "top_p": None, "num_beams": 1}
    # scored by the benchmark's scorer: question 11 has no reference -> excluded, reported
    hits = sum(a["text"].strip().lower() == GOLD[str(a["question_id"])] for a in lines if str(a["question_id"]) in GOLD)
    assert result["benchmark"] == "toy_vqa" and result["n"] == 4
    assert result["scores"]["accuracy"] == pytest.approx(100 * hits / 4)
    assert result["excluded"] == {"n": 1, "question_ids": [11]}
    assert result["generated"] == 5 and result["answers_file"] == str(out)


def test_prompt_is_the_templates_user_turn_with_image_then_question(tiny_model_dir, bench_files):
    """As model_vqa_loader.py: ``<image>\\n`` + the question (+ the benchmark's suffix) as the one user turn of the
    model's template, ending at the assistant prefix; a question without media has no image slot."""
    loaded = runner.load_for_benchmarks(tiny_model_dir, "cpu")
    bench = BENCHMARKS.create("toy_vqa")
    data = runner.QuestionDataset(bench.read_questions(bench_files / "questions.jsonl"), bench, bench_files / "images",
                                  loaded.tokenizer, loaded.cfg.data.template, loaded.images)
    image_q, text_q = data[0], data[2]
    assert image_q["input_ids"].count(IMAGE_TOKEN_INDEX) == 1 and text_q["input_ids"].count(IMAGE_TOKEN_INDEX) == 0
    assert image_q["pixel_values"].shape[0] == 1 and text_q["pixel_values"] is None
    tok = loaded.tokenizer
    slot = image_q["input_ids"].index(IMAGE_TOKEN_INDEX)
    before, after = tok.decode(image_q["input_ids"][:slot]), tok.decode(image_q["input_ids"][slot + 1:])
    assert before.endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert after == "\nWhat colour is the square?" + SUFFIX + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(text_q["input_ids"]).endswith("user<|end_header_id|>\n\nName a colour." + SUFFIX + "<|eot_id|>"
                                                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_two_chunks_merged_equal_one_run(tiny_model_dir, bench_files, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, whole, "--no-mlflow")) == 0
    merged = tmp_path / "merged.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, merged, "--num-chunks", "2", "--chunk-idx", "0", "--no-mlflow")) == 0
    assert [a["question_id"] for a in read_answers(tmp_path / "merged" / "2_0.jsonl")] == [3, "q-7", 11]  # ceil(5 / 2)
    # merging before every chunk is done is refused, naming the missing chunk
    assert main(_eval(tiny_model_dir, bench_files, merged, "--num-chunks", "2", "--merge")) == 2
    assert "2_1.jsonl" in capsys.readouterr().err
    assert main(_eval(tiny_model_dir, bench_files, merged, "--num-chunks", "2", "--chunk-idx", "1", "--no-mlflow")) == 0
    capsys.readouterr()
    assert main(["eval", "--merge", "--benchmark", "toy_vqa", "--questions", str(bench_files / "questions.jsonl"),
                 "--annotations", str(bench_files / "gold.json"), "--answers-file", str(merged), "--num-chunks", "2", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert _strip(read_answers(merged)) == _strip(read_answers(whole))
    assert scored["n"] == 4 and "accuracy" in scored["scores"]


def test_finished_file_is_not_regenerated_and_an_unfinished_one_continues(tiny_model_dir, bench_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, out, "--no-mlflow")) == 0
    first = out.read_text()
    capsys.readouterr()
    calls = []
    original = generation.generate_answers

    def counting(model, batch, *a, **k):
        calls.append(len(batch["sample_ids"]))
        return original(model, batch, *a, **k)

    monkeypatch.setattr(generation, "generate_answers", counting)
    assert main(_eval(tiny_model_dir, bench_files, out, "--no-mlflow", "--json")) == 0
    assert calls == [] and json.loads(capsys.readouterr().out)["generated"] == 0 and out.read_text() == first
    # killed after two answers, in the middle of writing the third line: the rest is generated, the same answers
    lines = first.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:17])
    assert main(_eval(tiny_model_dir, bench_files, out, "--no-mlflow", "--json")) == 0
    assert calls == [1, 1, 1] and json.loads(capsys.readouterr().out)["generated"] == 3
    assert _strip(read_answers(out)) == _strip([json.loads(x) for x in lines])


def test_batched_generation_gives_the_batch_of_one_answers(tiny_model_dir, bench_files, tmp_path):
    """Left padding and the KV cache make a batch of several prompts (text-only among them) answer as one at a time."""
    one, three = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, one, "--no-mlflow", "--max-new-tokens", "6")) == 0
    assert main(_eval(tiny_model_dir, bench_files, three, "--no-mlflow", "--max-new-tokens", "6", "--batch-size", "3")) == 0
    assert [a["text"] for a in read_answers(one)] == [a["text"] for a in read_answers(three)]


def test_bad_inputs_are_refused_before_generation(tiny_model_dir, bench_files, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, out, "--image-folder", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "media of 4 of 5 questions not found" in err and "red.png" in err and not out.exists()
    # an answers file of other questions is not continued (nor overwritten)
    out.write_text(json.dumps({"question_id": 99, "prompt": "?", "text": "x", "answer_id": "a", "model_id": "model",
                               "metadata": {}}) + "\n")
    assert main(_eval(tiny_model_dir, bench_files, out)) == 2
    assert "line 1 answers question 99" in capsys.readouterr().err and len(out.read_text().splitlines()) == 1
    assert main(_eval(tiny_model_dir, bench_files, tmp_path / "y.jsonl", "--benchmark", "no_such_bench")) == 2
    assert "unknown benchmark 'no_such_bench'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "image": "red.png", "text": "ok"}\n{"image": "red.png", "text": "no id"}\n')
    assert main(["eval", str(tiny_model_dir), "--benchmark", "toy_vqa", "--questions", str(bad), "--image-folder",
                 str(bench_files / "images")]) == 2
    assert f"{bad}:2: question has no 'question_id'" in capsys.readouterr().err


def test_scores_go_to_the_sources_mlflow_run(tiny_model_dir, bench_files, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    loaded = runner.load_for_benchmarks(tiny_model_dir, "cpu")
    loaded.info = {"run_id": run_id, "tracking_uri": uri, "global_step": 5}
    spec = suites.BenchmarkSpec("toy_vqa", str(bench_files / "questions.jsonl"), str(bench_files / "images"),
                                str(bench_files / "gold.json"), label="toy vqa+val")  # characters MLflow refuses
    run = runner.run_benchmark(loaded, spec, tmp_path / "answers.jsonl")
    assert run.mlflow_run_id == run_id
    logged = client.get_run(run_id).data.metrics
    assert logged == {"eval/toy vqa_val/accuracy": pytest.approx(run.result.scores["accuracy"])}
    assert client.get_metric_history(run_id, "eval/toy vqa_val/accuracy")[0].step == 5
    assert [f.path for f in client.list_artifacts(run_id, "eval/toy vqa+val")] == ["eval/toy vqa+val/answers.jsonl"]


def test_suite_runs_its_benchmarks(tiny_model_dir, bench_files, tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""root: {bench_files}
benchmarks:
  - name: toy_vqa
    questions: questions.jsonl
    image_folder: images
    annotations: gold.json
  - name: toy_vqa
    label: toy_short
    questions: questions.jsonl
    image_folder: images
    annotations: gold.json
    max_new_tokens: 1
""")
    assert main(["eval", str(tiny_model_dir), "--suite", str(suite), "--answers-dir", str(tmp_path / "ans"), "--device", "cpu",
                 "--json", "--no-mlflow"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r.get("label", r["benchmark"]) for r in runs] == ["toy_vqa", "toy_short"]
    assert all(len(read_answers(tmp_path / "ans" / f"{n}.jsonl")) == 5 for n in ("toy_vqa", "toy_short"))
    assert read_answers(tmp_path / "ans" / "toy_short.jsonl")[0]["metadata"]["generation"]["max_new_tokens"] == 1
    # every missing path is named before anything runs
    suite.write_text(suite.read_text().replace("image_folder: images\n    annotations", "image_folder: imgs\n    annotations", 1)
                     .replace("questions: questions.jsonl\n    image_folder: images", "questions: q2.jsonl\n    image_folder: images"))
    assert main(["eval", str(tiny_model_dir), "--suite", str(suite), "--answers-dir", str(tmp_path / "ans2")]) == 2
    err = capsys.readouterr().err
    assert "2 suite path(s) not found" in err and "toy_vqa.image_folder" in err and "toy_short.questions" in err
    assert not (tmp_path / "ans2").exists()


@pytest.mark.parametrize("suite", sorted((Path(__file__).resolve().parents[2] / "experiments" / "benchmarks").glob("*.yaml")))
def test_shipped_suites_name_registered_benchmarks(suite, monkeypatch):
    monkeypatch.setenv("LLAVA_EVAL_ROOT", "/data/eval")
    loaded = suites.load_suite(suite)
    assert loaded.benchmarks and all(BENCHMARKS.get(b.name) for b in loaded.benchmarks)
    if "video" not in suite.name:
        assert loaded.root == "/data/eval" and all(b.questions.startswith("/data/eval/") for b in loaded.benchmarks)


def test_a_registered_benchmark_runs_end_to_end(tiny_model_dir, tmp_path):
    """POPE in its official files (LLaVA question file with splits as categories, coco_pope_<split>.json labels): the
    runner's scores are those `lm-mini score` computes from the answers file, logged per split to MLflow."""
    from mlflow import MlflowClient

    from lm_mini.eval.benchmarks.scoring import score_answers

    (tmp_path / "img").mkdir()
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img" / "a.jpg")
    questions, labels = [], {"adversarial": [], "random": []}
    for i, (split, colour, label) in enumerate([("adversarial", "red", "yes"), ("adversarial", "blue", "no"),
                                                ("random", "red", "yes"), ("random", "green", "no")]):
        text = f"Is there a {colour} square in the image?"
        questions.append({"question_id": i, "image": "a.jpg", "text": text + "\nAnswer the question using a single word or phrase.",
                          "category": split})
        labels[split].append({"question_id": i, "image": "a.jpg", "text": text, "label": label})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for split, lines in labels.items():
        (tmp_path / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("pope")).info.run_id
    loaded = runner.load_for_benchmarks(tiny_model_dir, "cpu")
    loaded.info = {"run_id": run_id, "tracking_uri": uri}
    spec = suites.BenchmarkSpec("pope", str(tmp_path / "q.jsonl"), str(tmp_path / "img"), str(tmp_path / "coco"))
    run = runner.run_benchmark(loaded, spec, tmp_path / "answers.jsonl")
    again = score_answers("pope", tmp_path / "answers.jsonl", tmp_path / "q.jsonl", tmp_path / "coco")
    assert run.result.scores == again.scores and run.result.n == 4
    assert {"adversarial/f1", "random/accuracy", "f1"} <= set(run.result.scores)
    logged = client.get_run(run_id).data.metrics
    assert logged == {f"eval/pope/{k}": pytest.approx(v) for k, v in again.scores.items()}


def test_devices_split_the_benchmark_by_itself(tiny_model_dir, bench_files, tmp_path, capsys, monkeypatch):
    """--devices d0,d1: one process per device answers its chunk, then the chunks are merged and scored (here two
    CPU processes stand in for two GPUs): the same answers file as one run."""
    whole, split = tmp_path / "whole.jsonl", tmp_path / "split.jsonl"
    assert main(_eval(tiny_model_dir, bench_files, whole, "--no-mlflow")) == 0
    capsys.readouterr()
    # the worker processes find the test's benchmark by module:Class (it is not registered in a fresh process)
    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{os.environ.get('PYTHONPATH', '')}")
    args = _eval(tiny_model_dir, bench_files, split, "--no-mlflow", "--devices", "cpu,cpu", "--json")
    args[args.index("toy_vqa")] = "toy_benchmark:ToyVQA"
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert _strip(read_answers(split)) == _strip(read_answers(whole))
    assert [len(read_answers(tmp_path / "split" / f"2_{k}.jsonl")) for k in (0, 1)] == [3, 2] and result["n"] == 4
