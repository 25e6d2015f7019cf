"""benchmarks/data_throughput.py: its LLaVA-loader row delivers what ours does, and the script runs end to end."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llava_row_gives_our_tokens_and_labels(bench, tmp_path):
    """The re-created LLaVA ``preprocess_v1`` masking equals ours on single- and multi-turn records, so the
    benchmark compares the cost of the same output."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from lm_mini.data.conversation import VICUNA_V1, tokenize_conversation

    bench.make_data(tmp_path, 6, 40)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    llava = bench.LlavaLazyDataset(tmp_path, tokenizer, CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}), VICUNA_V1.system)
    turns = []
    for i, record in enumerate(llava.records):
        item = llava[i]
        ours = tokenize_conversation(record["conversations"], tokenizer, "vicuna_v1", 512, has_media=True)
        assert item["input_ids"].tolist() == ours.input_ids
        assert item["labels"].tolist() == ours.labels
        assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
        assert item["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1
        trained = item["labels"] != IGNORE_INDEX
        # one trained span (answer + "</s>") per gpt turn
        turns.append((len(record["conversations"]) // 2, int((trained[1:] & ~trained[:-1]).sum())))
    assert {t for t, _ in turns} == {1, 2}, "the data has single- and multi-turn records"
    assert all(expected == spans for expected, spans in turns)
    batch = bench.LlavaCollator(pad_id=0, max_length=512)([llava[0], llava[1]])
    assert batch["images"].shape == (2, 3, 28, 28) and batch["input_ids"].shape == batch["labels"].shape


def test_script_runs_and_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--n", "24", "--rounds", "1", "--workers", "0",
                          "--batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("streaming shards (ours)", "llava-style", "layout only", "ceiling", "ours vs llava-style"):
        assert row in out.stdout
