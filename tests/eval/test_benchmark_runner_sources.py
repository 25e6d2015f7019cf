"""The benchmark runner keeps one answers file to one source: which weights (checkpoint, step, fingerprint) and
generation options wrote it (resume, merge and scoring refuse a mix), each checkpoint its own default file and
MLflow step; and the runner's user-facing edges: Ctrl-C, bad prompts and missing labels found before the first
answer, sampling seeds, repeated questions, VQAv2's test2015 submission, MMBench's answers lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import toy_benchmark  # noqa: F401  (registers toy_vqa)
from PIL import Image

from lm_mini.cli import main
from lm_mini.eval import benchmark_runner as runner
from lm_mini.eval import generation
from lm_mini.eval.benchmarks.base import read_answers

SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = [{"question_id": i, "image": "red.png" if i % 2 else "blue.png", "text": f"What colour is thing {i}?"}
             for i in range(5)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "images" / "red.png")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(d / "images" / "blue.png")
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "gold.json").write_text(json.dumps({str(q["question_id"]): "red" for q in QUESTIONS}))
    return d


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tiny_model_dir, tmp_path_factory):
    """A run directory as training leaves it (config.yaml, mlflow.json, checkpoints/step=2 and step=4 with other
    weights), on the tiny model; an MLflow run to log to."""
    import torch
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from lm_mini.interop.pretrained import read_safetensors

    run = tmp_path_factory.mktemp("runs") / "demo" / "finetune-1"
    (run / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.load(tiny_model_dir / "config.yaml")
    cfg.data.tokenizer = str(tiny_model_dir)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    uri = f"sqlite:///{run.parent.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("demo")).info.run_id
    (run / "mlflow.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "experiment": "demo"}))
    weights = read_safetensors(tiny_model_dir)
    for step, shift in ((2, 0.0), (4, 0.01)):  # step 4: every floating tensor moved, as training moves them
        state = {f"model.{k}": v + shift if v.is_floating_point() else v for k, v in weights.items()}
        torch.save({"state_dict": state, "global_step": step, "epoch": 0}, run / "checkpoints" / f"step={step:08d}.ckpt")
    return run, client, run_id


def _eval(source, files, *extra):
    return ["eval", str(source), "--benchmark", "toy_vqa", "--questions", str(files / "questions.jsonl"),
            "--image-folder", str(files / "images"), "--annotations", str(files / "gold.json"), "--device", "cpu",
            "--max-new-tokens", "2", *extra]


# --------------------------------------------------------------------------- F8: which checkpoint wrote the answers
def test_each_checkpoint_has_its_own_answers_and_mlflow_step(run_with_two_checkpoints, files, capsys):
    """Every answers line records the weights that wrote it; RUN (its newest checkpoint, step 4) does not reuse the
    step-2 checkpoint's answers (it used to: one default file per run, 'nothing generated', step 2's answers
    logged at step 4), and a file half written by step 2 is not continued by step 4."""
    run, client, run_id = run_with_two_checkpoints
    assert main(_eval(run / "checkpoints" / "step=00000002.ckpt", files)) == 0
    step2 = run / "eval" / "step=00000002" / "toy_vqa.jsonl"
    lines = read_answers(step2)
    weights = lines[0]["metadata"]["weights"]
    assert weights["checkpoint"] == "step=00000002.ckpt" and weights["step"] == 2 and len(weights["fingerprint"]) == 16
    assert weights["source"] == str(run) and {json.dumps(a["metadata"]) for a in lines} == {json.dumps(lines[0]["metadata"])}
    capsys.readouterr()
    assert main(_eval(run, files)) == 0
    assert "5 generated now" in capsys.readouterr().out
    step4 = read_answers(run / "eval" / "step=00000004" / "toy_vqa.jsonl")
    assert step4[0]["metadata"]["weights"]["step"] == 4
    assert step4[0]["metadata"]["weights"]["fingerprint"] != weights["fingerprint"]
    history = client.get_metric_history(run_id, "eval/toy_vqa/accuracy")
    assert sorted(m.step for m in history) == [2, 4]
    # the same weights by another path (the checkpoint RUN names) continue its file: nothing generated
    assert main(_eval(run / "checkpoints" / "step=00000004.ckpt", files)) == 0
    assert "nothing generated" in capsys.readouterr().out
    # a file half written by step 2, given to step 4: refused, naming both, nothing appended
    half = run.parent / "half.jsonl"
    half.write_text("".join(json.dumps(a) + "\n" for a in lines[:2]))
    assert main(_eval(run, files, "--answers-file", str(half))) == 2
    err = capsys.readouterr().err
    assert "line 1 was written by model 'finetune-1', step=00000002.ckpt step 2 weights" in err
    assert "this run is model 'finetune-1', step=00000004.ckpt step 4 weights" in err
    assert len(read_answers(half)) == 2
    # an answers file without a weights record (older lm_mini, another tool) is not continued either
    half.write_text("".join(json.dumps(dict(a, metadata={"generation": a["metadata"]["generation"]})) + "\n" for a in lines[:2]))
    assert main(_eval(run, files, "--answers-file", str(half))) == 2
    assert "no weights record" in capsys.readouterr().err


# --------------------------------------------------------------------------- F7 + N1: merge one source only
def test_merge_refuses_chunks_of_other_weights_or_options_and_says_what_it_merged(run_with_two_checkpoints, files, capsys):
    run, client, run_id = run_with_two_checkpoints
    out = run.parent / "merge" / "toy.jsonl"
    ck2, ck4 = run / "checkpoints" / "step=00000002.ckpt", run / "checkpoints" / "step=00000004.ckpt"
    chunk = ["--answers-file", str(out), "--num-chunks", "2", "--no-mlflow"]
    assert main(_eval(ck2, files, *chunk, "--chunk-idx", "0")) == 0
    assert main(_eval(ck4, files, *chunk, "--chunk-idx", "1")) == 0  # a chunk re-run with another checkpoint
    capsys.readouterr()
    merge = ["eval", "--merge", "--benchmark", "toy_vqa", "--questions", str(files / "questions.jsonl"), "--annotations",
             str(files / "gold.json"), "--answers-file", str(out), "--num-chunks", "2"]
    assert main(merge) == 2
    err = capsys.readouterr().err
    assert f"--merge {out}: answers of different models, weights or generation options" in err
    assert f"{out.parent / 'toy' / '2_0.jsonl'}:1" in err and f"{out.parent / 'toy' / '2_1.jsonl'}:1" in err
    assert not out.exists()
    # chunk 1 again by step 2 but with other generation options: refused too
    (out.parent / "toy" / "2_1.jsonl").unlink()
    assert main(_eval(ck2, files, *chunk, "--chunk-idx", "1", "--max-new-tokens", "3")) == 0
    assert main(merge) == 2 and '"max_new_tokens": 3' in capsys.readouterr().err
    (out.parent / "toy" / "2_1.jsonl").unlink()
    assert main(_eval(ck2, files, *chunk, "--chunk-idx", "1")) == 0
    capsys.readouterr()
    # merged with SOURCE: it must be the checkpoint that wrote them, and the scores go to its step
    assert main(merge[:1] + [str(run)] + merge[1:]) == 2
    assert "written by checkpoint step=00000002.ckpt, but" in capsys.readouterr().err
    assert main(merge[:1] + [str(ck2)] + merge[1:]) == 0
    printed = capsys.readouterr().out
    assert f"toy_vqa: merged 2 chunks (5 answers) into {out}" in printed and "nothing generated" not in printed
    assert [m.step for m in client.get_metric_history(run_id, "eval/toy_vqa/accuracy") if m.step == 2]


# --------------------------------------------------------------------------- F6: Ctrl-C
def test_ctrl_c_keeps_the_answers_says_so_in_one_line_and_exits_130(tiny_model_dir, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.jsonl"
    original, calls = generation.generate_answers, []

    def interrupted_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_answers", interrupted_on_the_third_batch)
    assert main(_eval(tiny_model_dir, files, "--answers-file", str(out), "--no-mlflow")) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"lm-mini eval: interrupted: 2 of 5 answers kept in {out}; run the same command again to continue"
    assert len(read_answers(out)) == 2
    assert main(_eval(tiny_model_dir, files, "--answers-file", str(out), "--no-mlflow", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 3 and len(read_answers(out)) == 5


# --------------------------------------------------------------------------- N2, F5: found before the first answer
def test_a_prompt_the_template_cannot_render_fails_before_any_answer(tiny_model_dir, files, tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:3] + [
        {"question_id": 9, "image": "red.png", "text": "<image> and <image>?"}]))
    out = tmp_path / "a.jsonl"
    args = _eval(tiny_model_dir, files, "--answers-file", str(out), "--no-mlflow")
    args[args.index(str(files / "questions.jsonl"))] = str(bad)
    assert main(args) == 2
    assert "toy_vqa: question 9:" in capsys.readouterr().err
    assert not out.exists() or not out.read_text()  # it used to answer questions 0-2 first


def test_pope_without_labels_or_annotations_is_refused_before_generating(tiny_model_dir, files, tmp_path, capsys,
                                                                         monkeypatch):
    """Said before the model is even loaded (it used to answer every question, then fail: 'is it the annotation
    file of these questions?' although none was given)."""
    def not_now(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(runner, "load_for_benchmarks", not_now)
    (tmp_path / "llava_pope_test.jsonl").write_text(json.dumps(
        {"question_id": 1, "image": "red.png", "text": "Is there a dog?" + SUFFIX, "category": "random"}) + "\n")
    out = tmp_path / "pope.jsonl"
    assert main(["eval", str(tiny_model_dir), "--benchmark", "pope", "--questions", str(tmp_path / "llava_pope_test.jsonl"),
                 "--image-folder", str(files / "images"), "--answers-file", str(out), "--device", "cpu"]) == 2
    assert "give --annotations, the folder of coco_pope_<split>.json" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- N3: sampling is seeded and recorded
def test_sampled_answers_are_reproducible_across_chunks_and_resume(tiny_model_dir, files, tmp_path, capsys):
    sample = ["--temperature", "1.0", "--max-new-tokens", "6", "--no-mlflow", "--seed", "5"]
    whole = tmp_path / "whole.jsonl"
    assert main(_eval(tiny_model_dir, files, "--answers-file", str(whole), *sample)) == 0
    lines = read_answers(whole)
    assert lines[0]["metadata"]["generation"]["seed"] == 5 and lines[0]["metadata"]["generation"]["temperature"] == 1.0
    split = tmp_path / "split.jsonl"
    for k in (0, 1):
        assert main(_eval(tiny_model_dir, files, "--answers-file", str(split), "--num-chunks", "2", "--chunk-idx", str(k),
                          *sample)) == 0
    assert main(["eval", "--merge", "--benchmark", "toy_vqa", "--questions", str(files / "questions.jsonl"),
                 "--answers-file", str(split), "--num-chunks", "2"]) == 0
    assert [a["text"] for a in read_answers(split)] == [a["text"] for a in lines]
    # killed after two answers: the resumed run samples the rest as the fresh run did
    whole.write_text("".join(json.dumps(a) + "\n" for a in lines[:2]))
    assert main(_eval(tiny_model_dir, files, "--answers-file", str(whole), *sample)) == 0
    assert [a["text"] for a in read_answers(whole)] == [a["text"] for a in lines]
    capsys.readouterr()
    other_seed = sample[:-1] + ["6"]
    assert main(_eval(tiny_model_dir, files, "--answers-file", str(whole), *other_seed)) == 2  # another seed: refused
    assert '"seed": 5' in capsys.readouterr().err
    greedy = read_answers(tmp_path / "g.jsonl") if main(_eval(tiny_model_dir, files, "--answers-file", str(tmp_path / "g.jsonl"),
                                                                "--no-mlflow")) == 0 else None
    assert "seed" not in greedy[0]["metadata"]["generation"]  # greedy: no seed recorded (nothing to seed)


# --------------------------------------------------------------------------- F4, F9, N4 through the runner
def test_a_repeated_question_is_answered_and_scored(tiny_model_dir, files, tmp_path, capsys):
    rows = [{"question_id": "img0", "image": "red.png", "text": "what is written?" + SUFFIX}] * 2 + [
        {"question_id": "img1", "image": "blue.png", "text": "what brand?" + SUFFIX}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ann.json").write_text(json.dumps({"data": [
        {"image_id": "img0", "question": "what is written?", "answers": ["a"] * 10},
        {"image_id": "img1", "question": "what brand?", "answers": ["b"] * 10}]}))
    assert main(["eval", str(tiny_model_dir), "--benchmark", "textvqa", "--questions", str(tmp_path / "q.jsonl"),
                 "--image-folder", str(files / "images"), "--annotations", str(tmp_path / "ann.json"), "--answers-file",
                 str(tmp_path / "a.jsonl"), "--device", "cpu", "--max-new-tokens", "2", "--json", "--no-mlflow"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and "accuracy" in result["scores"] and result["generated"] == 3


def test_vqav2_test_dev_run_submits_every_test2015_question(tiny_model_dir, files, tmp_path, capsys):
    test = [{"question_id": i, "image": "red.png", "text": f"q{i}?" + SUFFIX, "category": "default"} for i in range(6)]
    for name, rows in (("llava_vqav2_mscoco_test2015.jsonl", test), ("llava_vqav2_mscoco_test-dev2015.jsonl", test[::2])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"root: {tmp_path}\nbenchmarks:\n  - name: vqav2\n    questions: llava_vqav2_mscoco_test-dev2015.jsonl\n"
                     f"    image_folder: {files / 'images'}\n")
    assert main(["eval", str(tiny_model_dir), "--suite", str(suite), "--answers-dir", str(tmp_path / "ans"), "--device", "cpu",
                 "--max-new-tokens", "2", "--no-mlflow", "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    rows = json.loads(Path(run["files"]["submission"]).read_text())
    assert [r["question_id"] for r in rows] == list(range(6)) and [r["answer"] for r in rows[1::2]] == ["", "", ""]
    assert run["questions"] == 3 and any("lists every question of" in n for n in run["notes"])


def test_mmbench_answers_lines_are_model_vqa_mmbench_lines(tiny_model_dir, tmp_path):
    """model_vqa_mmbench.py writes question_id, round_id, prompt, text, options, option_char, answer_id, model_id,
    metadata."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    from test_official_mmbench_seed import _mmbench_tsv

    tsv = _mmbench_tsv(tmp_path)
    out = tmp_path / "mmb.jsonl"
    assert main(["eval", str(tiny_model_dir), "--benchmark", "mmbench", "--questions", str(tsv), "--answers-file", str(out),
                 "--device", "cpu", "--max-new-tokens", "1", "--no-mlflow", "--batch-size", "6"]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert list(first) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                           "model_id", "metadata"]
    assert (first["round_id"], first["options"], first["option_char"]) == (0, ["red", "blue"], ["A", "B"])
