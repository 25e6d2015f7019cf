import io
import json
import tarfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from lm_mini.cli import main as cli_main
from lm_mini.config import load_config
from lm_mini.data.shards import build_shards
from lm_mini.eval.evaluate import score
from lm_mini.interop.pretrained import build_model, save_pretrained
from lm_mini.eval.generation import GenerationEval

ROOT = Path(__file__).resolve().parents[2]


def test_score_uses_record_fields_and_breaks_down_by_type():
    preds = [
        {"id": "a", "prediction": "two", "gold": "2"},
        {"id": "b", "prediction": "The answer is B", "gold": "B"},
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
    assert s["all/exact_match"] == pytest.approx(1 / 3)  # "two" is among the annotators' answers
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
