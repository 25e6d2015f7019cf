import io
import json
import tarfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from lm_mini.cli import main as cli_main
from lm_mini.config import load_config
from lm_mini.data.shard_builder import build_shards
from lm_mini.eval.evaluate import score
from lm_mini.interop.pretrained import save_pretrained
from lm_mini.models.build import build_model
from lm_mini.eval.generation import GenerationEval

ROOT = Path(__file__).resolve().parents[2]


def test_score_uses_record_fields_and_breaks_down_by_type():
    preds = [
        {"id": "a", "prediction": "two", "gold": "2"},
        {"id": "b", "prediction": "B", "gold": "B"},
        {"id": "c", "prediction": "yes", "gold": "no"},
    ]
    records = {
        "a": {"answers": ["2"] * 2 + ["3"] * 8, "question_type": "count"},
        "b": {"conversations": [{"from": "human", "value": "<image>\nWhich?\nA. red\nB. blue\nC. green"}], "question_type": "mc"},
        "c": {"question_type": "count"},
    }
    s = score(preds, records, ["vqa_accuracy", "exact_match", "multiple_choice"])
    assert s["all/n"] == 3 and s["type/count/n"] == 2 and s["type/mc/n"] == 1
    assert s["type/count/vqa_accuracy"] == pytest.approx((0.6 + 0.0) / 2)  # 2 of 10 annotators said "2"
    assert s["all/exact_match"] == pytest.approx(2 / 3)  # "two" is among the annotators' answers; "B" is "B"
    assert s["type/mc/multiple_choice"] == 1.0
    pope = score([{"id": "x", "prediction": "No.", "gold": "no"}, {"id": "y", "prediction": "yes", "gold": "no"}], {}, ["pope"])
    assert pope["all/pope_accuracy"] == pytest.approx(0.5) and pope["all/pope_precision"] == 0.0
    # predictions from two shard sets: scored on each as well (ids are "<set name>/<key>")
    two = score([{"id": "gqa/val/0", "prediction": "red", "gold": "red"}, {"id": "coco/val/0", "prediction": "x", "gold": "y"},
                 {"id": "coco/val/1", "prediction": "y", "gold": "y"}], {}, ["exact_match"])
    assert (two["all/n"], two["set/gqa/val/exact_match"], two["set/coco/val/exact_match"], two["set/coco/val/n"]) == (3, 1.0, 0.5, 2)
    assert not any(k.startswith("set/") for k in score([{"id": "a/0", "prediction": "p", "gold": "p"}], {}, ["exact_match"]))
    # a set with other questions too: POPE on its yes/no ones, the other metrics on all (it used to raise)
    mixed = score([{"id": "x", "prediction": "No.", "gold": "no"}, {"id": "z", "prediction": "red", "gold": "red"}], {},
                  ["pope", "exact_match"])
    assert mixed["all/pope_accuracy"] == 1.0 and mixed["all/exact_match"] == 1.0 and mixed["all/n"] == 2


def test_score_dispatches_on_what_each_metric_scores():
    # official parsers under the benchmark rule's name, lenient ones under *_lenient (lm_mini.eval.metrics)
    records = {"b": {"conversations": [{"from": "human", "value": "Which?\nA. red\nB. blue"}]}}
    mc = score([{"id": "b", "prediction": "The answer is B", "gold": "B"}], records,
               ["multiple_choice", "multiple_choice_lenient"])
    assert mc["all/multiple_choice"] == 0.0 and mc["all/multiple_choice_lenient"] == 1.0  # eval_science_qa.py wants "B."
    pope = score([{"id": "x", "prediction": "NO", "gold": "no"}], {}, ["pope", "pope_lenient"])
    assert pope["all/pope_accuracy"] == 0.0 and pope["all/pope_lenient_accuracy"] == 1.0  # eval_pope.py reads "NO" as yes


def test_eval_cli_on_a_trained_run_writes_predictions_and_logs_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli_main(["train", "experiments/demo.yaml", "train.max_steps=2", "data.batch_size=2", "eval.max_samples=4",
                     "eval.max_new_tokens=2", "eval.metrics=[exact_match,vqa_accuracy]",
                     "run_name=ev", f"logging.runs_dir={tmp_path / 'runs'}", f"logging.tracking_uri={uri}"]) == 0
    run = tmp_path / "runs" / "demo" / "ev"
    # the end-of-training eval scores every metric of eval.metrics, into eval.json, MLflow and the report
    at_end = json.loads((run / "eval.json").read_text())
    assert at_end["n"] == 4 and set(at_end["scores"]) >= {"all/vqa_accuracy", "all/n"}
    assert "lm-mini: held-out scores: vqa_accuracy " in capsys.readouterr().out
    logged_at_end = MlflowClient(uri).get_run(json.loads((run / "mlflow.json").read_text())["run_id"]).data.metrics
    assert logged_at_end["eval/vqa_accuracy"] == pytest.approx(at_end["scores"]["all/vqa_accuracy"])
    assert "eval/exact_match" in logged_at_end
    capsys.readouterr()
    generate, batches = GenerationEval._generate, []

    def recording(self, prompt, g):
        batches.append(prompt["input_ids"].shape[0])
        return generate(self, prompt, g)

    monkeypatch.setattr(GenerationEval, "_generate", recording)
    # eval.batch_size (4), not the run's data.batch_size (2); max_samples=6 is exactly 6: the loader reads 6 (4 + 2)
    assert cli_main(["eval", str(run), "eval.max_samples=6", "eval.batch_size=4", "eval.max_new_tokens=2", "--data",
                     "data_shards/demo/eval", "--metric", "exact_match", "vqa_accuracy", "--json"]) == 0
    assert batches == [4, 2]
    result = json.loads(capsys.readouterr().out)
    lines = [json.loads(l) for l in Path(result["predictions_file"]).read_text().splitlines()]
    assert result["n"] == len(lines) == 6 and all({"id", "prediction", "gold", "question_type"} <= set(l) for l in lines)
    assert Path(result["predictions_file"]) == run / "eval" / "eval.jsonl"
    exact = sum(l["prediction"].strip().lower() == l["gold"].strip().lower() for l in lines) / 6
    assert result["scores"]["all/exact_match"] == pytest.approx(exact)
    # without --metric: the metrics of eval.metrics (the run's config, or an override)
    assert cli_main(["eval", str(run), "eval.max_samples=2", "eval.max_new_tokens=2", "eval.metrics=[vqa_accuracy]",
                     "--data", "data_shards/demo/eval", "--no-mlflow", "--json", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert {k for k in json.loads(capsys.readouterr().out)["scores"] if k.startswith("all/")} == {"all/vqa_accuracy", "all/n"}
    # overrides after --metric are overrides; an unknown metric is refused before anything is generated
    assert cli_main(["eval", str(run), "--data", "data_shards/demo/eval", "--no-mlflow", "--json", "--out", str(tmp_path / "q.jsonl"),
                     "--metric", "multiple_choice", "eval.max_samples=1", "eval.max_new_tokens=1"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1
    assert cli_main(["eval", str(run), "--data", "data_shards/demo/eval", "--metric", "accuracy"]) == 2
    assert "unknown metric 'accuracy'" in capsys.readouterr().err
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["eval/eval/exact_match"] == pytest.approx(exact)
    assert "eval/eval/vqa_accuracy" in logged


def _turns(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def test_eval_cli_scores_a_record_whose_image_comes_in_a_later_turn(tmp_path, capsys):
    """The demo's (untrained) model on three records, one of them with ``<image>`` in its second human
    turn: its evaluated answer is the one after the image, and the prompt keeps the image slot."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    records = [
        {"id": "first", "image": "red.png", "conversations": _turns("<image>\nWhat colour is the square?", "red")},
        {"id": "later", "image": "red.png", "conversations": _turns("Hello", "Hi.", "<image>\nWhat colour is this?", "red")},
        {"id": "text", "conversations": _turns("Name a colour.", "blue")},
        {"id": "broken", "image": "red.png", "conversations": _turns("<image>\nWhat colour?", "red")},  # cut below
    ]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    build_shards([tmp_path / "qa.json"], tmp_path, tmp_path / "qa")
    shard = next((tmp_path / "qa").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:  # the last record's image is cut short inside the shard
        for m, data in members:
            data = data[:40] if m.name.endswith(".png") and m.name.startswith("000000003") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    cfg = load_config(ROOT / "experiments" / "demo.yaml")
    save_pretrained(tmp_path / "model", build_model(cfg.model).state_dict(), cfg, ROOT / cfg.data.tokenizer, card="")
    rc = cli_main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "qa"), "eval.max_new_tokens=2",  # after --data
                   "--out", str(tmp_path / "pred.jsonl"), "--device", "cpu", "--no-mlflow", "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    preds = sorted(map(json.loads, (tmp_path / "pred.jsonl").read_text().splitlines()), key=lambda p: p["id"])
    assert result["n"] == result["scores"]["all/n"] == 3 and "all/exact_match" in result["scores"]
    assert result["skipped"] == {"corrupt_image": 1}  # what the 3 of 4 leave out, said, not silent
    assert [p["gold"] for p in preds] == ["red", "red", "blue"]  # ids are record positions: "later" is scored on "red", not "Hi."


def test_eval_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
    assert "no such model directory, run directory or checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path), "--data", str(tmp_path / "missing")]) == 2
    assert "--data" in capsys.readouterr().err


def _model_dir(tmp_path):
    cfg = load_config(ROOT / "experiments" / "demo.yaml")
    return save_pretrained(tmp_path / "model", build_model(cfg.model).state_dict(), cfg, ROOT / cfg.data.tokenizer, card="")


def test_eval_takes_the_attention_backend_as_an_override_and_refuses_other_model_keys(tmp_path, capsys):
    """A saved model is built from its own config: `model.attn_implementation=...` chooses the kernel (the same
    answers), and any other model key, which the built model would silently ignore, is refused before loading."""
    model = _model_dir(tmp_path)
    data = str(ROOT / "data_shards" / "demo" / "eval")
    base = ["eval", str(model), "--data", data, "--no-mlflow", "--json", "eval.max_samples=4", "eval.max_new_tokens=3"]
    answers = []
    for extra in ([], ["model.attn_implementation=eager"]):
        assert cli_main(base + extra) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == 4
        answers.append([json.loads(line)["prediction"] for line in Path(result["predictions_file"]).read_text().splitlines()])
    assert answers[0] == answers[1] and len(answers[0]) == 4
    assert cli_main(base + ["model.compressor.grid=2"]) == 2
    assert "model.compressor.grid=2: a saved model is built from the config saved with its weights" in capsys.readouterr().err


def test_multi_set_eval_logs_each_set_to_mlflow_and_leaves_out_unanswered_questions(tmp_path, capsys, monkeypatch):
    """Two shard sets, one with questions that have no reference answer: every set's score is printed and logged
    (names MLflow accepts: "eval/A+B/..." was refused and lost the run), eval.max_samples is per set, and the
    unanswered questions are reported, never scored (empty prediction == empty gold used to count as correct)."""
    from mlflow import MlflowClient

    from lm_mini import runs

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    a = [{"id": f"a{i}", "image": "red.png", "conversations": _turns("<image>\nWhat colour is the square?", "red")} for i in range(3)]
    b = [{"id": 7, "image": "red.png", "conversations": _turns("<image>\nWhat colour?", "")},  # empty answer: no reference
         {"id": 8, "conversations": _turns("Name a colour.", " ")},
         {"id": 9, "conversations": _turns("Name a colour.", "blue")}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    build_shards([tmp_path / "a.json"], tmp_path, tmp_path / "sets" / "alpha+1")  # a name MLflow refuses
    build_shards([tmp_path / "b.json"], tmp_path, tmp_path / "sets" / "beta")
    model = _model_dir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    resolve = runs.resolve_source

    def with_run(path):  # the model directory as if it came from a run with an MLflow run
        found = resolve(path)
        found.info.update(run_id=run_id, tracking_uri=uri, global_step=3)
        return found

    monkeypatch.setattr(runs, "resolve_source", with_run)
    args = ["eval", str(model), "--data", str(tmp_path / "sets" / "alpha+1"), str(tmp_path / "sets" / "beta"), "--metric",
            "vqa_accuracy", "exact_match", "eval.max_samples=2", "eval.max_new_tokens=2", "--out", str(tmp_path / "p.jsonl")]
    assert cli_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    preds = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    # the first 2 of each set (not the first 2 of the first set); beta's two are unanswered
    assert [p["record_id"] for p in preds] == ["a0", "a1", 7, 8]  # the record's own id, of its JSON type
    assert "evaluated 2 samples (alpha+1: 2, beta: 0)" in out
    assert "not scored: 2 samples without a reference answer (beta/000000000, beta/000000001)" in out
    assert "set/alpha+1/exact_match" in out and "set/beta/n" in out
    logged = client.get_run(run_id).data.metrics
    assert {k for k in logged} == {"eval/alpha_1/vqa_accuracy", "eval/alpha_1/exact_match", "eval/all/vqa_accuracy",
                                   "eval/all/exact_match"}
    exact = sum(p["prediction"].strip().lower() == "red" for p in preds[:2]) / 2
    assert logged["eval/alpha_1/exact_match"] == pytest.approx(exact) == pytest.approx(logged["eval/all/exact_match"])
    # one set: eval/<set>/<metric>; the unanswered-only set scores nothing and says so
    assert cli_main(["eval", str(model), "--data", str(tmp_path / "sets" / "beta"), "--metric", "exact_match",
                     "eval.max_samples=2", "eval.max_new_tokens=1", "--json", "--out", str(tmp_path / "q.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 0 and result["excluded"]["n"] == 2 and "all/exact_match" not in result["scores"]


def test_shard_builder_points_llava_question_files_to_the_benchmark_runner(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "What?", "category": "d"}) + "\n"
                                              for i in (1, 2)))  # llava_textvqa_val_v051_ocr.jsonl's layout
    assert cli_main(["shards", "build", "--json", str(tmp_path / "q.jsonl"), "--media-root", str(tmp_path), "--out",
                     str(tmp_path / "s")]) == 1
    skipped = (tmp_path / "s" / "skipped.json").read_text()
    assert "LLaVA benchmark question file" in skipped and "lm-mini eval SOURCE --benchmark NAME --questions FILE" in skipped


def test_score_dispatches_on_each_metrics_target_kind():
    """Registered metrics say what they take (target_kind): the lenient variants and POPE's are fed accordingly."""
    preds = [{"id": "a", "prediction": "(b)", "gold": "B"}, {"id": "b", "prediction": "NO", "gold": "no"}]
    records = {"a": {"options": ["red", "blue"]}}
    s = score(preds[:1], records, ["multiple_choice", "multiple_choice_lenient"])
    assert (s["all/multiple_choice"], s["all/multiple_choice_lenient"]) == (0.0, 1.0)  # "(b)": official parser says no
    p = score(preds[1:], {}, ["pope", "pope_lenient"])
    assert p["all/pope_accuracy"] == 0.0 and p["all/pope_lenient_accuracy"] == 1.0  # eval_pope.py reads "NO" as yes


def test_eval_data_reads_shard_sets_over_http_as_train_does(tmp_path, capsys):
    """`lm-mini eval SOURCE --data URL` (issue 18): a shard set served over HTTP is evaluated as its local copy is,
    the same samples and predictions (it used to be refused: `--data URL: no such shard directory`); a URL that
    names no set fails before the model is loaded, naming it."""
    from remote_servers import ShardServer

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"id": f"q{i}", "image": "red.png", "conversations": _turns("<image>\nWhat colour is the square?", "red")}
               for i in range(3)] + [{"id": "t", "conversations": _turns("Name a colour.", "blue")}]
    (tmp_path / "q.json").write_text(json.dumps(records))
    build_shards([tmp_path / "q.json"], tmp_path, tmp_path / "served" / "colours")
    model = _model_dir(tmp_path)
    common = ["--metric", "exact_match", "eval.max_new_tokens=2", "--no-mlflow", "--json"]
    assert cli_main(["eval", str(model), "--data", str(tmp_path / "served" / "colours"), "--out", str(tmp_path / "local.jsonl"),
                     *common]) == 0
    local = json.loads(capsys.readouterr().out)
    with ShardServer(tmp_path / "served") as server:
        assert cli_main(["eval", str(model), "--data", server.url("colours"), "--out", str(tmp_path / "http.jsonl"), *common]) == 0
        remote = json.loads(capsys.readouterr().out)
        assert server.requests["/colours/index.json"] >= 1
        assert cli_main(["eval", str(model), "--data", server.url("nothing"), *common]) == 2
    err = capsys.readouterr().err
    assert f"--data {server.url('nothing')}:" in err and "index.json" in err
    assert remote["n"] == local["n"] == 4 and remote["scores"] == local["scores"]
    read = lambda name: [json.loads(l) for l in (tmp_path / name).read_text().splitlines()]
    assert read("http.jsonl") == read("local.jsonl")  # same ids (the set's folder name), answers, record ids


def test_eval_data_keeps_a_url_or_pipe_holding_an_equals_sign_as_data(monkeypatch, tmp_path):
    """`--data A key=value` hands the override to --data; a shard set URL or pipe: command with "=" in it is data."""
    from lm_mini.eval import evaluate as evaluate_module

    seen = {}

    def fake(source, data, metrics, out, overrides, device, log_mlflow):
        seen.update(data=list(data), overrides=list(overrides))
        raise ValueError("stop here")

    monkeypatch.setattr(evaluate_module, "evaluate_source", fake)
    pipe = "pipe:aws s3 cp s3://bucket/split=val/shard-{000000..000003}.tar -"
    assert cli_main(["eval", str(tmp_path), "--data", pipe, "https://host/sets?version=2", "eval.max_samples=2"]) == 2
    assert seen == {"data": [pipe, "https://host/sets?version=2"], "overrides": ["eval.max_samples=2"]}
