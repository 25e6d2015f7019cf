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


def _sentencepiece_dir(out, legacy=False):
    """A tokenizer as the LLaVA-1.5 / Vicuna releases ship it: tokenizer.model (SentencePiece BPE with byte fallback,
    unk 0, <s> 1, </s> 2, dummy prefix) + a LlamaTokenizer tokenizer_config.json, no tokenizer.json."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line.replace("\n", " ") for line in CORPUS]), model_prefix=str(out / "tokenizer"),
        vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    specials = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": True} for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "model_max_length": 4096,
        "added_tokens_decoder": specials}))
    return out


def test_loads_a_sentencepiece_only_tokenizer(tmp_path):
    """LLaVA-1.5's and Vicuna's tokenizer.model loads (sentencepiece is a dependency) and encodes as SentencePiece
    itself does; padding falls back to <unk>, as LLaVA pads."""
    import sentencepiece as spm

    from lm_mini.data.conversation import build_prompt

    out = _sentencepiece_dir(tmp_path / "vicuna")
    tok = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in ["A chat between a curious user", "USER: What colour is the square? ASSISTANT:", "zebra 東京"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    ids = build_prompt([{"from": "human", "value": "What colour is the square?"}], tok, "vicuna_v1", has_media=False)
    assert ids[0] == 1 and ids[1:] == sp.encode(
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
        "and polite answers to the user's questions. USER: What colour is the square? ASSISTANT:")


def test_sentencepiece_missing_is_named(tmp_path, monkeypatch):
    """Without the sentencepiece package the error names it (transformers' own fallback names tiktoken)."""
    import lm_mini.data.tokenizer as tokenizer_module

    out = _sentencepiece_dir(tmp_path / "vicuna")
    monkeypatch.setattr(tokenizer_module, "sentencepiece_available", lambda: False)
    with pytest.raises(ValueError, match=r"SentencePiece tokenizer only .*'sentencepiece' package: pip install sentencepiece"):
        load_tokenizer(out)
