"""Fixtures of the evaluation tests: a tiny exported model (random weights, built offline in a second) and a
toy benchmark registered for the runner's tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A micro LLaVA-Mini (llama3 template) saved as a model directory, with its own tokenizer."""
    import torch
    from interop_helpers import VOCAB, tiny_config

    from lm_mini.data.conversation import template_corpus
    from lm_mini.data.tokenizer import train_tokenizer
    from lm_mini.interop.pretrained import save_pretrained
    from lm_mini.models.llava_mini import LlavaMini

    root = tmp_path_factory.mktemp("tiny")
    records = [([{"from": "human", "value": f"<image>\nWhat colour is the {s}? Answer the question using a single word or phrase."},
                 {"from": "gpt", "value": f"The {s} is red."}], True) for s in ("square", "circle", "triangle")]
    train_tokenizer(template_corpus(records), root / "tokenizer", vocab_size=VOCAB)
    torch.manual_seed(7)
    cfg = tiny_config(template="llama3")
    model = LlavaMini.from_config(cfg.model)
    return save_pretrained(root / "model", model.state_dict(), cfg, root / "tokenizer", card="# tiny\n")
