"""The lmms-eval adapter (``lmms-eval --model lm_mini``): its methods on lmms-eval's request layout (``Instance.args``),
checked against lm_mini's own generation (``lm-mini generate``'s code path) and a hand-computed log-likelihood.
lmms-eval itself is optional (see README): where it is installed, its registry finds the adapter and runs a tiny local
task end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from lm_mini.eval.lmms_adapter import LmMiniLMM
from lm_mini.interop.generate import open_conversation

QUESTION = "What colour is the square?"


@dataclass
class FakeInstance:  # lmms_eval.api.instance.Instance: the adapter reads .args only
    request_type: str
    arguments: tuple

    @property
    def args(self):
        return self.arguments


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("lmms")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    lmm = LmMiniLMM(pretrained=str(tiny_model_dir), device="cpu", max_new_tokens=6)
    lmm.task_dict = {"toy": {"test": [{"image": str(d / "red.png")}, {"image": None}]}}
    lmm.image_path = d / "red.png"
    return lmm


def _visual(doc):
    return [Image.open(doc["image"])] if doc["image"] else []


def test_generate_until_answers_as_lm_mini_generate_does(adapter, tiny_model_dir):
    conv = open_conversation(str(tiny_model_dir), str(adapter.image_path), None, "cpu")
    expected = conv.ask(QUESTION, max_new_tokens=6)["answer"]
    reqs = [FakeInstance("generate_until", (QUESTION, {"max_new_tokens": 6, "temperature": 0}, _visual, 0, "toy", "test")),
            FakeInstance("generate_until", ("Name a colour.", {"max_new_tokens": 3}, _visual, 1, "toy", "test"))]
    got = adapter.generate_until(reqs)
    assert got[0] == expected and isinstance(got[1], str)
    if len(expected) > 1:  # `until` strings end the answer before their first occurrence
        cut = adapter.generate_until([FakeInstance("generate_until", (QUESTION, {"max_new_tokens": 6, "until": [expected[1:]]},
                                                                      _visual, 0, "toy", "test"))])
        assert cut == [expected[:1]]


def test_loglikelihood_is_the_continuations_log_probability(adapter):
    """Against generation forced through the continuation's tokens (the KV-cache path, one token at a time): the
    log-probability is the sum of each token's log-softmax, and "greedy" says whether every token is the argmax."""
    doc = adapter.task_dict["toy"]["test"][0]
    prompt = adapter._batch(QUESTION, _visual(doc), "toy/test/0")

    def forced(text):
        ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            gen = adapter.model.generate(prompt, max_new_tokens=len(ids), do_sample=False, output_logits=True,
                                         return_dict_in_generate=True, eos_token_id=None,
                                         prefix_allowed_tokens_fn=lambda b, seen: [ids[min(len(seen), len(ids) - 1)]])
        assert gen.sequences[0, -len(ids):].tolist() == ids
        steps = [torch.log_softmax(step[0].float(), -1) for step in gen.logits]
        return sum(float(x[t]) for x, t in zip(steps, ids)), all(int(x.argmax()) == t for x, t in zip(steps, ids))

    greedy_text = adapter.generate_until([FakeInstance("generate_until", (QUESTION, {"max_new_tokens": 3}, _visual, 0, "toy", "test"))])[0]
    for text in (" red square", "blue", " " + greedy_text if greedy_text else " red"):
        (logprob, greedy), = adapter.loglikelihood([FakeInstance("loglikelihood", (QUESTION, text, _visual, 0, "toy", "test"))])
        expected, expected_greedy = forced(text)
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy
        assert logprob < 0


def test_bad_requests_are_refused_clearly(adapter, tiny_model_dir):
    two = lambda doc: [Image.open(doc["image"])] * 2  # noqa: E731
    with pytest.raises(ValueError, match="toy/test/0 has 2 visuals"):
        adapter.generate_until([FakeInstance("generate_until", (QUESTION, {}, two, 0, "toy", "test"))])
    with pytest.raises(ValueError, match="unknown --model_args colour"):
        LmMiniLMM(pretrained=str(tiny_model_dir), device="cpu", colour="red")


TASK_YAML = """task: lm_mini_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
"""


def test_lmms_eval_runs_a_tiny_local_task_with_the_adapter(tiny_model_dir, tmp_path):
    """lmms-eval (installed apart, see README) finds ``--model lm_mini`` through the entry point and scores a local task."""
    pytest.importorskip("lmms_eval")
    task = tmp_path / "task"
    task.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"question": QUESTION, "answer": "red", "image": str(tmp_path / "red.png")}] * 2
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "lm_mini_toy.yaml").write_text(TASK_YAML.format(data=tmp_path / "toy.jsonl"))
    (task / "utils.py").write_text(TASK_UTILS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "lm_mini", "--model_args",
                           f"pretrained={tiny_model_dir},device=cpu", "--tasks", "lm_mini_toy", "--include_path", str(task),
                           "--batch_size", "1", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("*results.json"))
    assert results, proc.stdout[-2000:]
    scores = json.loads(results[0].read_text())["results"]["lm_mini_toy"]
    assert "exact_match,none" in scores and 0.0 <= scores["exact_match,none"] <= 1.0
