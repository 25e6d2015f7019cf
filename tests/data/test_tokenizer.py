"""The small byte-level BPE tokenizer: training, saving, offline reload, no automatic BOS."""
import filecmp
import json

import pytest
from transformers import AutoTokenizer

from lm_mini.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What colour is the square? ASSISTANT: The square is red.</s>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nThere are 3 circles.<|eot_id|>",
    "a small blue triangle at the top left of the image\n",
] * 20
SAMPLES = [
    "USER: How many shapes? ASSISTANT: 12 shapes.</s>USER: ok",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "unseen words: zebra, 東京, émigré 🙂\ttabs  and   spaces\n\n\n",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(CORPUS, out, vocab_size=400), out


def test_reloads_offline_with_identical_encodings(trained):
    tok, out = trained
    reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(reloaded) == len(tok)
    for text in SAMPLES:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text  # byte-level: any text round-trips, no <unk>
        assert tok.unk_token_id not in ids


def test_special_tokens_are_single_ids_and_set(trained):
    tok, out = trained
    tok = load_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ids["<unk>"], ids["<s>"], ids["</s>"], ids["<pad>"])
    for t in SPECIAL_TOKENS:  # templates write these in their text; each must stay one token
        assert tok(f"x{t}y", add_special_tokens=False)["input_ids"][1:-1] == [ids[t]]


def test_no_bos_or_eos_added_automatically(trained):
    tok, _ = trained
    with_specials = tok("hello there")["input_ids"]
    assert with_specials == tok("hello there", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in with_specials and tok.eos_token_id not in with_specials


def test_vocab_bounded_and_merges_learned(trained):
    tok, out = trained
    assert len(tok) <= 400
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) > 0 and len(tok) == 256 + len(SPECIAL_TOKENS) + len(merges)
    # Frequent corpus words became single tokens.
    assert len(tok(" assistant", add_special_tokens=False)["input_ids"]) == 1


def test_deterministic_files(trained, tmp_path):
    _, out = trained
    train_tokenizer(CORPUS, tmp_path, vocab_size=400)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(out, tmp_path, names, shallow=False)
    assert mismatch == [] and errors == [] and match == names


def test_vocab_size_below_bytes_and_specials_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(CORPUS, tmp_path, vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)
