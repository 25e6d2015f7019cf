"""``lm-mini score``: the JSON object, the human-readable report, errors, and no torch import."""
import json
import re
import subprocess
import sys

from lm_mini.cli import main as cli_main
from lm_mini.eval.benchmarks import BENCHMARKS, BenchmarkResult


def _pope_files(tmp_path):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": f"Q{i}?",
                                                          "category": "random", "label": l}) + "\n"
                                              for i, l in enumerate(["yes", "no"])))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question_id": i, "prompt": f"Q{i}?", "text": t, "answer_id": "x",
                                                          "model_id": "m", "metadata": {}}) + "\n"
                                              for i, t in enumerate(["Yes", "No."])))


def test_score_json_object(tmp_path, capsys):
    _pope_files(tmp_path)
    assert cli_main(["score", "--benchmark", "pope", "--answers", str(tmp_path / "a.jsonl"),
                     "--questions", str(tmp_path / "q.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "pope" and out["n"] == 2
    assert out["scores"]["random/f1"] == 100.0 and out["scores"]["f1"] == 100.0
    assert cli_main(["score", "--benchmark", "pope", "--answers", str(tmp_path / "a.jsonl"),
                     "--questions", str(tmp_path / "q.jsonl")]) == 0
    assert re.search(r"random/accuracy +100.00", capsys.readouterr().out)
    # nothing scored (test-dev without annotations): said so, not "0 questions scored"
    assert cli_main(["score", "--benchmark", "vqav2", "--answers", str(tmp_path / "a.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("vqav2: not scored\n") and "no --annotations: vqav2 is not scored here" in printed


def test_score_errors_name_the_problem(tmp_path, capsys):
    _pope_files(tmp_path)
    assert cli_main(["score", "--benchmark", "popee", "--answers", str(tmp_path / "a.jsonl")]) == 2
    assert "unknown benchmark 'popee'" in capsys.readouterr().err
    assert cli_main(["score", "--benchmark", "pope", "--answers", str(tmp_path / "a.jsonl")]) == 2
    assert "needs the question file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"question_id": 0, "text": "x"}\nnot json\n')
    assert cli_main(["score", "--benchmark", "vqav2", "--answers", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: not a JSON answer" in capsys.readouterr().err
    (tmp_path / "twice.jsonl").write_text((tmp_path / "a.jsonl").read_text() * 2)
    assert cli_main(["score", "--benchmark", "vqav2", "--answers", str(tmp_path / "twice.jsonl")]) == 2
    assert "answers 1 and 3 both answer question 0" in capsys.readouterr().err


def test_score_does_not_import_torch(tmp_path):
    _pope_files(tmp_path)
    code = ("import sys; from lm_mini.cli import main; "
            f"rc = main(['score', '--benchmark', 'pope', '--answers', {str(tmp_path / 'a.jsonl')!r}, "
            f"'--questions', {str(tmp_path / 'q.jsonl')!r}, '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_benchmark_is_documented_and_cites_its_source():
    ours = [n for n in BENCHMARKS.names() if BENCHMARKS.get(n).__module__.startswith("lm_mini.eval.benchmarks.")]
    assert len(ours) >= 19  # other tests may register toy benchmarks of their own
    for name in ours:
        cls = BENCHMARKS.get(name)
        assert cls.name == name
        doc = sys.modules[cls.__module__].__doc__ + (cls.__doc__ or "")
        assert "47da1137" in doc or "ictnlp/LLaVA-Mini" in doc, name  # the official file's commit
    assert BenchmarkResult("x", 1, {"a": 1.0}, excluded=[3], unanswered=[4]).to_json() == {
        "benchmark": "x", "n": 1, "scores": {"a": 1.0}, "excluded": {"n": 1, "question_ids": [3]},
        "unanswered": {"n": 1, "question_ids": [4]}}
